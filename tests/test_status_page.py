"""
The status page at ``/_vault/`` (`artifact_vault.status_page`), in-process
over real sockets: the numbers in the server-rendered HTML, escaping of what
clients chose, and the live page in a real headless browser (Debian's
chromium, where installed) while a download is in flight.
"""

import html
import os
import re
import shutil
import subprocess

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.test_core import BODY, SMALL, backend, stream, until

CHROMIUM = "/usr/bin/chromium"
ADMIN = "admin-token-0123456789"


async def held_download(http, v, upstream, path, upto, url_path=None):
    """Start a download of `path` that upstream stops after `upto` bytes; returns the client's stream."""
    _, s = await stream(http, v.url + "/files" + (url_path or path))
    upstream.release(path, upto=upto)
    await until(lambda: len(s.data) >= upto)
    return s


async def finish(upstream, path, s):
    upstream.release(path)
    await s.done


@pytest_twisted.ensureDeferred
async def test_status_page_shows_use_ratio_requests_downloads_and_errors(vault_factory, upstream, http):
    upstream.add("/a.json", SMALL)
    upstream.add("/big.bin", BODY, hold=True)
    upstream.add("/gone", b"", status=503)
    v = vault_factory(backend(upstream), max_cache_size="10M", admin_token=ADMIN)
    for _ in range(3):
        await (await http.get(v.url + "/files/a.json")).content()
    await (await http.get(v.url + "/files/gone")).content()
    await v.vault.janitor.scan()
    s = await held_download(http, v, upstream, "/big.bin", len(BODY) // 4)

    response = await http.get(v.url + "/_vault/", headers={"X-Admin-Token": ADMIN})
    page = (await response.content()).decode("utf-8")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    assert response.headers.getRawHeaders("cache-control") == ["no-store"]
    assert "script-src 'nonce-" in response.headers.getRawHeaders("content-security-policy")[0]
    # no outside assets
    assert not re.search(r'(src|href)="(?!#)', page) and "@import" not in page and "url(" not in page
    assert 'fetch("status.json"' in page

    cards = dict(re.findall(r'<div class="value" id="([a-z-]+)">([^<]*)</div>', page))
    assert cards == {"cache-bytes": f"{len(SMALL)} B of 10.0 MiB", "cache-files": "1",
                     "hit-ratio": "50.0 %", "inflight": "1"}  # hits 2 of (1 miss, 2 hits, 1 error)
    outcomes = dict(re.findall(r'<tr><td>([a-z]+)</td><td class="num">(\d+)</td></tr>', page))
    assert outcomes == {"hit": "2", "miss": "1", "joined": "0", "stale": "0", "forwarded": "0", "error": "1"}
    assert f"<tr><td>files</td><td>http</td><td>/files/</td><td>{len(SMALL)} B</td><td>1</td><td>–</td></tr>" in page
    assert '<span class="dl-name">files/big.bin</span><span class="dl-pct">25.0 %</span>' in page
    assert '<progress max="100" value="25.0">' in page
    assert "312.5 KiB of 1.2 MiB" in page and "1 client · " in page
    assert "<td>502</td><td>GET /files/gone</td><td>upstream http://127.0.0.1:" in page
    await finish(upstream, "/big.bin", s)


@pytest_twisted.ensureDeferred
async def test_names_from_clients_are_escaped(vault_factory, upstream, http):
    name = '<script>alert("x")</script><img src=x onerror=alert(1)>.bin'
    upstream.add("/" + name, BODY, hold=True)
    v = vault_factory(backend(upstream), admin_token=ADMIN)
    quoted = name.replace("<", "%3C").replace(">", "%3E").replace('"', "%22").replace(" ", "%20")
    s = await held_download(http, v, upstream, "/" + name, 1000, url_path="/" + quoted)
    page = (await (await http.get(v.url + "/_vault/", headers={"X-Admin-Token": ADMIN})).content()).decode("utf-8")
    assert "<script>alert" not in page and "<img" not in page
    assert page.count("<script") == 2  # our own: the caps JSON and the code
    assert html.escape("files/" + name, quote=True) in page
    await finish(upstream, "/" + name, s)


@pytest_twisted.ensureDeferred
async def test_page_renders_without_data_before_the_first_scan(vault_factory, upstream, http):
    v = vault_factory(backend(upstream))
    response = await http.get(v.url + "/_vault/")
    page = (await response.content()).decode("utf-8")
    assert response.code == 200
    assert 'id="cache-bytes">not measured yet<' in page and 'id="hit-ratio">–<' in page
    assert "No downloads in flight." in page and "No errors recently." in page
    response = await http.head(v.url + "/_vault/")
    assert response.code == 200 and await response.content() == b""


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason=f"no headless browser: {CHROMIUM} is not installed (apt-get install chromium)")
@pytest_twisted.ensureDeferred
async def test_a_real_browser_shows_the_progress_of_a_download(vault_factory, upstream, http, tmp_path):
    upstream.add("/model.safetensors", BODY, hold=True)
    v = vault_factory(backend(upstream))
    s = await held_download(http, v, upstream, "/model.safetensors", int(len(BODY) * 0.4))
    profile = tmp_path / "chromium-profile"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-proxy-server", f"--user-data-dir={profile}", "--virtual-time-budget=3000",
               "--dump-dom", v.url + "/_vault/"]
    env = {"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    # In a thread, so that the reactor goes on serving the page and status.json to the browser.
    done = await deferToThread(subprocess.run, command, capture_output=True, text=True, timeout=90, env=env)
    dom = done.stdout
    assert done.returncode == 0 and "<body" in dom, done.stderr[-2000:]
    updates = int(re.search(r'<body[^>]*data-updates="(\d+)"', dom).group(1))
    assert updates >= 1, "the page's script did not redraw from status.json"
    item = re.search(r'<li class="download">.*?</li>', dom, re.DOTALL).group(0)
    assert "(name shown with the admin token)" in item  # a browser sends no admin token
    percent = float(re.search(r'class="dl-pct">([\d.]+) %<', item).group(1))
    assert 1 <= percent <= 99 and percent == pytest.approx(40, abs=1)
    assert re.search(r'<progress max="100" value="40(\.0)?"', item)
    await finish(upstream, "/model.safetensors", s)
    shutil.rmtree(profile, ignore_errors=True)
