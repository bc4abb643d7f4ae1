"""
The pypi backend against the fake index (tests/fakepypi.py: index on 127.0.0.1,
files on 127.0.0.2), with the real pip and uv run isolated (tests/pypienv.py).

Most tests run the fake and the vault in-process on the test's reactor, the
clients in threads; one runs the real daemon across a restart.  What each
asserts is what a user would check: what got installed, what the index and
file host were asked (their request logs), statuses, headers, bodies, the
cache on disk.
"""

import gzip
import hashlib
import html.parser
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from urllib.parse import urljoin, urlsplit

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.threads import deferToThread

from tests.fakepypi import HTML_V1, JSON_V1, FakePyPI
from tests.hfenv import vault_process
from tests.pypienv import (client_env, fake_pypi, new_env, new_uv_env, pip_install, uv_command,
                            uv_pip_install)
from tests.pypienv import run as run_client
from tests.test_core import temp_files

PIP_ACCEPT = "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, text/html; q=0.01"
UV_ACCEPT = "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"
FULL_CATALOG = {"alpha": "2.0", "beta": "1.0", "gamma": "1.0", "delta": "1.0", "zeta-utils": "0.5"}


# -- helpers -------------------------------------------------------------------------


@pytest.fixture
def fake(tmp_path):
    """The fake index in-process (its files are kept in tmp_path: it can stop and start again)."""
    pypi = FakePyPI(tmp_path / "fake")
    pypi.listen(reactor)
    yield pypi
    pytest_twisted.blockon(pypi.close())


def pypi_backend(fake, **config):
    return [{"type": "pypi", "config": {"base_url": fake.index_url.rstrip("/"), **config}}]


def fetch(url, method="GET", headers=None, timeout=10):
    """One raw request (path sent as given, nothing added): (status, {lower-case name: value}, body)."""
    u = urlsplit(url)
    conn = HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.putrequest(method, u.path + ("?" + u.query if u.query else ""), skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def get(url, method="GET", **headers):
    """`fetch` in a thread (the vault answers on this reactor meanwhile); header names with _ for -."""
    return deferToThread(fetch, url, method, {k.replace("_", "-"): v for k, v in headers.items()})


def run(func, *args, **kwargs):
    return deferToThread(func, *args, **kwargs)


def file_gets(fake, server="files"):
    """path -> number of GETs the fake's file host answered (HEADs and Range reads apart)."""
    counts = {}
    for r in fake.requests:
        if r["server"] == server and r["method"] == "GET" and r["path"].startswith("/packages/"):
            counts[r["path"]] = counts.get(r["path"], 0) + 1
    return counts


def page_gets(fake):
    return [r for r in fake.requests if r["server"] == "index" and r["path"].startswith("/simple/")]


def on_disk(vault, *under):
    root = os.path.join(vault.config.cache_dir, "pypi", *under)
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                  if not f.endswith(".vault-meta"))


class Anchors(html.parser.HTMLParser):
    def __init__(self, text):
        super().__init__()
        self.links = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links.append(dict(attrs))


async def project_json(vault, name, **headers):
    status, got, body = await get(f"{vault.url}/pypi/simple/{name}/", accept=JSON_V1, **headers)
    assert status == 200 and got["content-type"] == JSON_V1, (status, got, body)
    return json.loads(body)


# -- pages -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_negotiation_vary_and_406(fake, vault_factory):
    v = vault_factory(pypi_backend(fake))
    url = f"{v.url}/pypi/simple/alpha/"
    cases = [
        (PIP_ACCEPT, JSON_V1), (UV_ACCEPT, JSON_V1), ("text/html", "text/html; charset=utf-8"),
        (HTML_V1, HTML_V1), ("application/vnd.pypi.simple.latest+json", JSON_V1),
        (f"{JSON_V1};q=0, text/html;q=0.5", "text/html; charset=utf-8"),
        ("application/*", HTML_V1), ("text/*;q=0.3, application/vnd.pypi.simple.v1+json;q=0.2",
                                     "text/html; charset=utf-8"),
        ("*/*", "text/html; charset=utf-8"),
    ]
    for accept, expected in cases:
        status, headers, body = await get(url, accept=accept)
        assert status == 200 and headers["content-type"] == expected, (accept, status, headers)
        assert "Accept" in headers["vary"]
    # no Accept at all: either form will do (HTML, as for clients older than PEP 691)
    status, headers, body = await get(url)
    assert status == 200 and headers["content-type"].startswith(("text/html", "application/vnd.pypi"))
    # PEP 691's ?format= instead of Accept
    status, headers, _ = await get(url + "?format=" + JSON_V1, accept="text/html")
    assert status == 200 and headers["content-type"] == JSON_V1
    for accept in ("image/png", "application/json", f"{JSON_V1};q=0, text/html;q=0, {HTML_V1};q=0", "text/plain"):
        status, headers, body = await get(url, accept=accept)
        assert status == 406 and "Accept" in headers["vary"], accept
    # one upstream page fetch for all of that (in JSON, which the upstream offers)
    assert [r["headers"]["accept"] for r in page_gets(fake)] == [
        "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"]


@pytest_twisted.ensureDeferred
async def test_json_and_html_keep_every_field(fake, vault_factory):
    v = vault_factory(pypi_backend(fake))
    upstream = {f["filename"]: f for p in fake.info()["projects"].values() for f in p["files"]}
    for name in ("alpha", "beta", "gamma", "delta"):
        page = await project_json(v, name)
        assert page["meta"]["api-version"] == "1.1" and page["name"] == name
        status, headers, body = await get(f"{v.url}/pypi/simple/{name}/", accept="text/html")
        links = {a["href"].split("#")[0].rsplit("/", 1)[1]: a for a in Anchors(body.decode()).links}
        assert '<meta name="pypi:repository-version" content="1.1">' in body.decode()
        assert sorted(page["versions"]) == sorted({f["version"] for f in upstream.values()
                                                   if f["filename"].startswith(name)})
        for f in page["files"]:
            want = upstream[f["filename"]]
            assert f["hashes"] == {"sha256": want["sha256"]} and f["size"] == want["size"]
            assert f["upload-time"] == want["upload_time"]
            assert f.get("requires-python") == want["requires_python"]
            assert f["yanked"] == (want["yanked"] or True if want["yanked"] is not False else False)
            assert "dist-info-metadata" not in f
            if want["metadata_sha256"]:
                assert f["core-metadata"] == {"sha256": want["metadata_sha256"]}
            else:
                assert "core-metadata" not in f
            # the link points into the vault, under the file's sha256
            assert f["url"] == f"../../files/{name}/{want['sha256']}/{f['filename']}"
            a = links[f["filename"]]
            assert a["href"] == f"{f['url']}#sha256={want['sha256']}"
            assert a.get("data-requires-python") == want["requires_python"]
            assert a.get("data-yanked") == (want["yanked"] if want["yanked"] is not False else None)
            meta = f"sha256={want['metadata_sha256']}" if want["metadata_sha256"] else None
            assert a.get("data-core-metadata") == meta and a.get("data-dist-info-metadata") == meta
    # escaped in the HTML text itself
    _, _, body = await get(f"{v.url}/pypi/simple/delta/", accept="text/html")
    assert 'data-requires-python="&gt;=4.0"' in body.decode()
    _, _, body = await get(f"{v.url}/pypi/simple/gamma/", accept="text/html")
    assert 'data-yanked="broken &lt;build&gt; &amp; &quot;bad&quot; wheel"' in body.decode()


@pytest_twisted.ensureDeferred
async def test_names_are_normalised_and_unknown_projects_are_404(fake, vault_factory):
    v = vault_factory(pypi_backend(fake))
    bodies = set()
    for spelling in ("Zeta_Utils", "zeta-utils", "zeta.utils", "ZETA__utils"):
        status, headers, body = await get(f"{v.url}/pypi/simple/{spelling}/", accept=JSON_V1)
        assert status == 200
        bodies.add(body)
    assert len(bodies) == 1 and json.loads(bodies.pop())["name"] == "zeta-utils"
    assert [r["path"] for r in page_gets(fake)] == ["/simple/zeta-utils/"]  # one page, one fetch
    assert on_disk(v) == ["simple/zeta-utils"]
    status, headers, _ = await get(f"{v.url}/pypi/simple/Zeta_Utils")
    assert status == 301 and urljoin(f"{v.url}/pypi/simple/Zeta_Utils", headers["location"]) == \
        f"{v.url}/pypi/simple/zeta-utils/"
    status, headers, _ = await get(f"{v.url}/pypi/simple")
    assert status == 301 and urljoin(f"{v.url}/pypi/simple", headers["location"]) == f"{v.url}/pypi/simple/"
    status, _, body = await get(f"{v.url}/pypi/simple/no-such-project/", accept=PIP_ACCEPT)
    assert status == 404, body
    assert on_disk(v) == ["simple/zeta-utils"]  # nothing kept for it


@pytest_twisted.ensureDeferred
async def test_project_list(fake, vault_factory):
    v = vault_factory(pypi_backend(fake))
    status, headers, body = await get(f"{v.url}/pypi/simple/", accept=JSON_V1)
    assert status == 200 and headers["content-type"] == JSON_V1
    assert [p["name"] for p in json.loads(body)["projects"]] == ["alpha", "beta", "delta", "gamma", "Zeta_Utils"]
    status, headers, body = await get(f"{v.url}/pypi/simple/", accept="text/html")
    hrefs = [a["href"] for a in Anchors(body.decode()).links]
    assert hrefs == ["alpha/", "beta/", "delta/", "gamma/", "zeta-utils/"]


@pytest_twisted.ensureDeferred
async def test_answers_do_not_depend_on_accept_encoding(fake, vault_factory):
    v = vault_factory(pypi_backend(fake))
    url = f"{v.url}/pypi/simple/alpha/"
    _, plain_headers, plain = await get(url, accept=JSON_V1)
    _, identity_headers, identity = await get(url, accept=JSON_V1, accept_encoding="identity")
    status, headers, zipped = await get(url, accept=JSON_V1, accept_encoding="gzip, deflate, zstd")
    assert "content-encoding" not in plain_headers and "content-encoding" not in identity_headers
    assert headers["content-encoding"] == "gzip" and "Accept-Encoding" in headers["vary"]
    assert identity == plain == gzip.decompress(zipped)
    assert headers["etag"] != plain_headers["etag"]
    # revalidation by the client: 304 for its ETag
    status, _, body = await get(url, accept=JSON_V1, if_none_match=plain_headers["etag"])
    assert status == 304 and body == b""
    # files never get a Content-Encoding, whatever the client accepts
    page = json.loads(plain)
    sdist = next(f for f in page["files"] if f["filename"].endswith(".tar.gz"))
    status, headers, body = await get(urljoin(url, sdist["url"]), accept_encoding="gzip")
    assert status == 200 and "content-encoding" not in headers
    assert hashlib.sha256(body).hexdigest() == sdist["hashes"]["sha256"] and body[:2] == b"\x1f\x8b"


# -- installs with the real clients -------------------------------------------------------


async def install_all(index, tmp_path, name, client, *requirements):
    """A fresh environment, then pip or uv installs `requirements` (all of the catalog by default)."""
    make, installer = (new_env, pip_install) if client == "pip" else (new_uv_env, uv_pip_install)
    env = await run(make, tmp_path / name)
    res = await run(installer, index, *(requirements or ("alpha", "gamma", "delta", "Zeta_Utils")), target_env=env)
    assert res.returncode == 0, res.stderr
    return env, res


@pytest.mark.parametrize("client", ["pip", "uv"])
@pytest_twisted.ensureDeferred
async def test_install_then_again_without_upstream(client, fake, vault_factory, tmp_path, logged):
    v = vault_factory(pypi_backend(fake, index_ttl=0))
    index = f"{v.url}/pypi/simple/"
    env, _ = await install_all(index, tmp_path, "one", client)
    assert await run(env.installed) == FULL_CATALOG
    first = file_gets(fake)
    assert first and set(first.values()) == {1}  # each file once
    # neither the yanked release nor the one for Python >= 4 was fetched
    assert not [p for p in first if "gamma-1.1" in p or "delta-2.0" in p]
    if client == "uv":  # no .metadata for beta: uv's HEAD and Range reads went to the vault, not upstream
        assert not [r for r in fake.requests if r["method"] == "HEAD" or r["headers"].get("range")]

    # the second install asks upstream for pages only (index_ttl 0: revalidated, 304), no file
    fake.reset()
    env, _ = await install_all(index, tmp_path, "two", client)
    assert await run(env.installed) == FULL_CATALOG
    assert file_gets(fake) == {}
    pages = page_gets(fake)
    assert pages and {r["status"] for r in pages} == {304}
    assert all("if-none-match" in r["headers"] for r in pages)

    # upstream gone: the same install works from what the vault kept
    await fake.close()
    started = time.monotonic()
    env, _ = await install_all(index, tmp_path, "three", client)
    assert await run(env.installed) == FULL_CATALOG
    assert time.monotonic() - started < 15
    assert "from the cache" in logged.text()


@pytest_twisted.ensureDeferred
async def test_client_configuration_as_documented(fake, vault_factory, tmp_path):
    """PIP_INDEX_URL, pip.conf, UV_INDEX_URL and uv.toml, as docs/pypi.rst shows them."""
    v = vault_factory(pypi_backend(fake))
    index = f"{v.url}/pypi/simple/"
    (tmp_path / "pip.conf").write_text(f"[global]\nindex-url = {index}\n")
    (tmp_path / "uv.toml").write_text(f'[[index]]\nurl = "{index}"\ndefault = true\n')
    uv_toml_env = client_env()
    del uv_toml_env["UV_NO_CONFIG"]
    ways = [
        ("pip", client_env({"PIP_INDEX_URL": index}), []),
        ("pip", client_env({"PIP_CONFIG_FILE": str(tmp_path / "pip.conf")}), []),
        ("uv", client_env({"UV_INDEX_URL": index}), []),
        ("uv", uv_toml_env, ["--config-file", str(tmp_path / "uv.toml")]),
    ]
    for i, (client, environ, options) in enumerate(ways):
        if client == "pip":
            env = await run(new_env, tmp_path / f"env{i}")
            command = [env.python, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check", "beta"]
        else:
            env = await run(new_uv_env, tmp_path / f"env{i}")
            command = uv_command() + ["pip", "install", "--python", env.python, "--no-cache", *options, "beta"]
        res = await run(run_client, command, env=environ, timeout=60)
        assert res.returncode == 0 and await run(env.version_of, "beta") == "1.0", (client, options, res.stderr)
    assert set(file_gets(fake).values()) == {1}  # all four through the vault, which fetched once


@pytest_twisted.ensureDeferred
async def test_kept_pages_survive_a_restart_of_the_daemon(tmp_path):
    with fake_pypi(tmp_path / "fake") as upstream:
        backends = [{"type": "pypi", "config": {"base_url": upstream.index.rstrip("/"), "index_ttl": 0,
                                                "offline_timeout": 2}}]
        with vault_process(tmp_path / "vault", backends) as v:
            env, _ = await install_all(f"{v.url}/pypi/simple/", tmp_path, "before", "pip", "alpha")
    # the index and its file host are gone; a new daemon on the same cache still installs
    with vault_process(tmp_path / "vault", backends) as v:
        started = time.monotonic()
        env, res = await install_all(f"{v.url}/pypi/simple/", tmp_path, "after", "uv", "alpha")
        assert await run(env.installed) == {"alpha": "2.0", "beta": "1.0"}
        assert time.monotonic() - started < 15
        assert "Answering pypi simple/alpha/ from the cache" in v.log()


@pytest_twisted.ensureDeferred
async def test_new_release_appears_after_index_ttl(fake, vault_factory, tmp_path):
    ttl = 3
    v = vault_factory(pypi_backend(fake, index_ttl=ttl))
    index = f"{v.url}/pypi/simple/"
    started = time.monotonic()
    env, _ = await install_all(index, tmp_path, "one", "uv", "beta")
    assert await run(env.version_of, "beta") == "1.0"
    fake.add_release("beta", "1.1")
    env, _ = await install_all(index, tmp_path, "two", "pip", "beta")
    if time.monotonic() - started < ttl:  # still within the TTL: the page kept is reused, upstream not asked
        assert await run(env.version_of, "beta") == "1.0"
        assert len([r for r in page_gets(fake) if r["path"] == "/simple/beta/"]) == 1
    await deferToThread(time.sleep, max(0.0, started + ttl + 0.2 - time.monotonic()))
    env, _ = await install_all(index, tmp_path, "three", "pip", "beta")
    assert await run(env.version_of, "beta") == "1.1"
    asked = [r for r in page_gets(fake) if r["path"] == "/simple/beta/"]
    assert len(asked) == 2 and asked[1]["status"] == 200 and "if-none-match" in asked[1]["headers"]
    # a yank upstream shows after the TTL too
    fake.yank("beta", "1.1", "regression")
    await deferToThread(time.sleep, ttl + 0.2)
    page = await project_json(v, "beta")
    assert {f["filename"]: f["yanked"] for f in page["files"]}["beta-1.1-py3-none-any.whl"] == "regression"


@pytest_twisted.ensureDeferred
async def test_corrupted_wheel_is_refused_and_not_cached(fake, vault_factory, tmp_path, logged):
    v = vault_factory(pypi_backend(fake))
    index = f"{v.url}/pypi/simple/"
    wheel = fake.dist("beta-1.0-py3-none-any.whl")  # no .metadata: clients fetch the wheel itself
    upstream_path = f"/packages/{_split(wheel.sha256)}/{wheel.filename}"
    # a byte flipped where the zip does not look (a file header's date): only the sha256 can tell
    fake.set_fault("corrupt", "files", only=wheel.filename, corrupt_at=10)
    env = await run(new_env, tmp_path / "pip")
    res = await run(pip_install, index, "beta", target_env=env, extra_args=["--retries", "0"])
    assert res.returncode != 0 and await run(env.version_of, "beta") is None
    assert file_gets(fake)[upstream_path] == 1
    uv_env = await run(new_uv_env, tmp_path / "uv")
    res = await run(uv_pip_install, index, "beta", target_env=uv_env, env=client_env({"UV_HTTP_RETRIES": "0"}))
    assert res.returncode != 0 and await run(uv_env.version_of, "beta") is None
    assert file_gets(fake)[upstream_path] == 2  # tried again for the second client: nothing was kept
    assert on_disk(v, "files") == [] and not temp_files(v.config.cache_dir)
    assert f"sha256 of pypi/files/beta/{wheel.sha256}/{wheel.filename} is" in logged.text()
    # a client streaming it sees a broken transfer, never a clean wrong body
    status, headers, body = None, None, None
    try:
        status, headers, body = await get(f"{v.url}/pypi/files/beta/{wheel.sha256}/{wheel.filename}")
    except Exception as e:  # noqa: BLE001 - the connection is cut
        status = type(e).__name__
    assert status != 200 or len(body) < wheel.size, status
    # without the fault the next install fetches it again, verified, and keeps it
    fake.set_fault("normal")
    env, _ = await install_all(index, tmp_path, "again", "pip", "beta")
    assert await run(env.version_of, "beta") == "1.0"
    assert on_disk(v, "files") == [f"beta/{wheel.sha256}/{wheel.filename}"]


def _split(sha):
    return f"{sha[:2]}/{sha[2:4]}/{sha[4:]}"


@pytest_twisted.ensureDeferred
async def test_twenty_concurrent_installs_one_upstream_get_per_file(fake, vault_factory, tmp_path):
    v = vault_factory(pypi_backend(fake))
    index = f"{v.url}/pypi/simple/"
    clients = ["pip"] * 6 + ["uv"] * 14
    envs = await gatherResults([run(new_env if c == "pip" else new_uv_env, tmp_path / f"env{i}")
                                for i, c in enumerate(clients)])

    def install(i):
        installer = pip_install if clients[i] == "pip" else uv_pip_install
        return installer(index, "alpha", "gamma", "Zeta_Utils", target_env=envs[i], timeout=120)

    def all_at_once():
        with ThreadPoolExecutor(len(clients)) as pool:
            return list(pool.map(install, range(len(clients))))

    results = await run(all_at_once)
    assert [r.returncode for r in results] == [0] * len(clients), [r.stderr for r in results if r.returncode]
    for env in envs[:2] + envs[-2:]:
        assert await run(env.installed) == {"alpha": "2.0", "beta": "1.0", "gamma": "1.0", "zeta-utils": "0.5"}
    gets = file_gets(fake)
    assert len(gets) >= 6 and set(gets.values()) == {1}, gets
    pages = [r["path"] for r in page_gets(fake)]
    assert sorted(pages) == sorted(set(pages))  # and one page fetch per project


# -- upstream failing, offline answers -------------------------------------------------------


@pytest.mark.parametrize("mode", ["down5xx", "429", "hang"])
@pytest_twisted.ensureDeferred
async def test_kept_page_served_when_upstream_fails(mode, fake, vault_factory, logged):
    v = vault_factory(pypi_backend(fake, index_ttl=0, offline_timeout=1))
    page = await project_json(v, "alpha")
    fake.set_fault(mode, "index")
    started = time.monotonic()
    stale = await project_json(v, "alpha")
    assert time.monotonic() - started < 2.5  # a silent upstream holds it back offline_timeout at most
    assert "Answering pypi simple/alpha/ from the cache" in logged.text()
    for f in page["files"]:  # no .metadata is cached: none is offered while upstream cannot serve it
        f.pop("core-metadata", None)
    assert stale == page
    # a project never kept: upstream's failure shows (502, or its 429), never a 404 that would hide it
    status, _, _ = await get(f"{v.url}/pypi/simple/gamma/", accept=JSON_V1)
    assert status in (502, 504) or (mode == "429" and status == 429), status


@pytest_twisted.ensureDeferred
async def test_metadata_advertised_only_when_it_can_be_served(fake, vault_factory):
    v = vault_factory(pypi_backend(fake, index_ttl=0))
    page = await project_json(v, "alpha")
    wheels = {f["filename"]: f for f in page["files"] if f["filename"].endswith(".whl")}
    assert all("core-metadata" in f for f in wheels.values())
    base = f"{v.url}/pypi/simple/alpha/"
    old, new = wheels["alpha-1.0-py3-none-any.whl"], wheels["alpha-2.0-py3-none-any.whl"]
    status, _, body = await get(urljoin(base, old["url"]) + ".metadata")
    assert status == 200 and hashlib.sha256(body).hexdigest() == old["core-metadata"]["sha256"]
    assert b"Name: alpha" in body
    status, _, _ = await get(urljoin(base, new["url"]))  # the wheel, not its metadata
    assert status == 200
    fake.set_fault("down5xx", "both")
    offline = await project_json(v, "alpha")
    offered = {f["filename"]: "core-metadata" in f for f in offline["files"] if f["filename"].endswith(".whl")}
    assert offered == {"alpha-1.0-py3-none-any.whl": True, "alpha-2.0-py3-none-any.whl": False}
    _, _, body = await get(base, accept="text/html")
    links = {a["href"].split("#")[0].rsplit("/", 1)[1]: a for a in Anchors(body.decode()).links}
    assert "data-core-metadata" in links["alpha-1.0-py3-none-any.whl"]
    assert "data-core-metadata" not in links["alpha-2.0-py3-none-any.whl"]
    assert "data-dist-info-metadata" not in links["alpha-2.0-py3-none-any.whl"]


@pytest_twisted.ensureDeferred
async def test_file_head_and_range(fake, vault_factory):
    v = vault_factory(pypi_backend(fake))
    wheel = fake.dist("beta-1.0-py3-none-any.whl")
    data = open(wheel.path, "rb").read()
    url = f"{v.url}/pypi/files/beta/{wheel.sha256}/{wheel.filename}"
    await project_json(v, "beta")
    status, headers, body = await get(url, "HEAD")
    assert status == 200 and body == b""
    assert headers["content-length"] == str(len(data)) and headers["accept-ranges"] == "bytes"
    assert headers["etag"] == f'"{wheel.sha256}"'
    assert file_gets(fake) == {} and not [r for r in fake.requests if r["server"] == "files"]
    status, headers, body = await get(url, range="bytes=-100")  # where a zip keeps its directory
    assert status == 206 and body == data[-100:]
    assert headers["content-range"] == f"bytes {len(data) - 100}-{len(data) - 1}/{len(data)}"
    status, headers, body = await get(url, range="bytes=0-99")
    assert status == 206 and body == data[:100]
    status, headers, body = await get(url, "HEAD")
    assert status == 200 and headers["content-length"] == str(len(data)) and headers["etag"] == f'"{wheel.sha256}"'
    status, _, body = await get(url)
    assert status == 200 and body == data
    assert list(file_gets(fake).values()) == [1]


@pytest_twisted.ensureDeferred
async def test_html_only_upstream(fake, vault_factory, tmp_path):
    """A static HTML index (like the PyTorch one): JSON for pip and uv all the same, with every field."""
    fake.html_only = True
    v = vault_factory(pypi_backend(fake))
    page = await project_json(v, "gamma")
    assert page["meta"]["api-version"] == "1.0"  # HTML gives no sizes, which API 1.1 promises
    assert sorted(page["versions"]) == ["1.0", "1.1"]
    files = {f["filename"]: f for f in page["files"]}
    assert files["gamma-1.1-py3-none-any.whl"]["yanked"] == 'broken <build> & "bad" wheel'
    assert files["gamma-1.0-py3-none-any.whl"]["yanked"] is False
    want = fake.dist("gamma-1.0-py3-none-any.whl")
    assert files["gamma-1.0-py3-none-any.whl"]["hashes"] == {"sha256": want.sha256}
    assert files["gamma-1.0-py3-none-any.whl"]["core-metadata"] == {"sha256": want.metadata_sha256}
    delta = await project_json(v, "delta")
    assert {f["filename"]: f.get("requires-python") for f in delta["files"]}["delta-2.0.tar.gz"] == ">=4.0"
    index = f"{v.url}/pypi/simple/"
    env, _ = await install_all(index, tmp_path, "pip", "pip")
    assert await run(env.installed) == FULL_CATALOG
    env, _ = await install_all(index, tmp_path, "uv", "uv")
    assert await run(env.installed) == FULL_CATALOG
    upstream_types = {r["headers"]["accept"] for r in page_gets(fake)}
    assert upstream_types == {"application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2,"
                              " text/html;q=0.01"}
    assert set(file_gets(fake).values()) == {1}


@pytest_twisted.ensureDeferred
async def test_headers_go_to_the_index_origin_only(fake, vault_factory, tmp_path):
    secret = {"Authorization": "Basic c2VjcmV0OnNlY3JldA==", "X-Index-Key": "k-123"}
    v = vault_factory(pypi_backend(fake, headers=secret))
    env, _ = await install_all(f"{v.url}/pypi/simple/", tmp_path, "pip", "pip", "alpha")
    index_requests = [r for r in fake.requests if r["server"] == "index"]
    file_requests = [r for r in fake.requests if r["server"] == "files"]
    assert index_requests and file_requests
    assert all(r["headers"].get("authorization") == secret["Authorization"] for r in index_requests)
    assert all(r["headers"].get("x-index-key") == "k-123" for r in index_requests)
    assert not [r for r in file_requests if "authorization" in r["headers"] or "x-index-key" in r["headers"]]
    # files on the index's own origin (relative URLs, like a private index) get them
    fake.same_host = True
    fake.reset()
    v = vault_factory(pypi_backend(fake, headers=secret), cache_dir=str(tmp_path / "cache2"))
    env, _ = await install_all(f"{v.url}/pypi/simple/", tmp_path, "uv", "uv", "alpha")
    assert await run(env.installed) == {"alpha": "2.0", "beta": "1.0"}
    files = [r for r in fake.requests if r["path"].startswith("/packages/")]
    assert files and all(r["server"] == "index" for r in files)
    assert all(r["headers"].get("authorization") == secret["Authorization"] for r in files)


# -- attacks ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_bad_names_paths_and_queries_are_4xx_and_leave_nothing(fake, vault_factory):
    v = vault_factory(pypi_backend(fake))
    alpha = fake.dist("alpha-2.0-py3-none-any.whl")
    beta = fake.dist("beta-1.0-py3-none-any.whl")
    await project_json(v, "alpha")
    await project_json(v, "beta")
    fake.reset()
    sha = alpha.sha256
    attempts = [
        "/pypi/simple/..%2F..%2Fetc/", "/pypi/simple/%2e%2e/", "/pypi/simple/-alpha-/", "/pypi/simple/al%20pha/",
        "/pypi/simple/" + "a" * 300 + "/", "/pypi/simple/alpha%00/", "/pypi/simple/alpha/?url=http://127.0.0.2/x",
        "/pypi/simple/alpha/?format=text/html&format=x", "/pypi/simple/alpha/x", "/pypi/simple/alpha//",
        "/pypi/simple/%C3%A9t%C3%A9/", "/pypi/simple/alpha%2Fbeta/",
        f"/pypi/files/alpha/{sha}/..%2F..%2F..%2Fetc%2Fpasswd", f"/pypi/files/alpha/{sha}/%2e%2e",
        f"/pypi/files/alpha/{sha}/{alpha.filename}?u=http://127.0.0.2/", "/pypi/files/alpha/notahash/x.whl",
        f"/pypi/files/alpha/{'g' * 64}/{alpha.filename}", f"/pypi/files/alpha/{sha.upper()}/{alpha.filename}",
        f"/pypi/files/Alpha/{sha}/{alpha.filename}", f"/pypi/files/alpha/{'0' * 64}/{alpha.filename}",
        f"/pypi/files/alpha/{sha}/alpha-9.9-py3-none-any.whl", f"/pypi/files/alpha/{beta.sha256}/{beta.filename}",
        f"/pypi/files/alpha/url-{'0' * 32}/{alpha.filename}", f"/pypi/files/alpha/{sha}/{alpha.filename}.metadata.x",
        f"/pypi/files/beta/{beta.sha256}/{beta.filename}.metadata", f"/pypi/files/alpha/{sha}",
        f"/pypi/files/alpha/{sha}/{alpha.filename}/x", f"/pypi/files/alpha/{sha}/x.vault-meta",
        "/pypi/http://127.0.0.2/packages/x.whl", "/pypi/http%3A%2F%2F127.0.0.2%2Fx", f"/pypi/{fake.files_url}/x",
        "/pypi/", "/pypi/files/", "/pypi/files/alpha/",
    ]
    for path in attempts:
        status, _, body = await get(v.url + path, accept=JSON_V1)
        assert 400 <= status < 500, (path, status, body)
    for method in ("POST", "PUT", "DELETE"):
        status, headers, _ = await get(f"{v.url}/pypi/simple/alpha/", method)
        assert status == 405 and headers["allow"] == "GET, HEAD"
    assert [r for r in fake.requests if r["server"] == "files"] == []  # nothing fetched for anyone
    assert on_disk(v) == ["simple/alpha", "simple/beta"]
    assert not temp_files(v.config.cache_dir)
    # names upstream does not know: 404 each, nothing kept, nothing remembered without bound
    backend = v.vault.backend("pypi")
    for i in range(150):
        status, _, _ = await get(f"{v.url}/pypi/simple/no-such-project-{i}/", accept=JSON_V1)
        assert status == 404
    assert on_disk(v) == ["simple/alpha", "simple/beta"]
    assert len(backend.memo) <= 2 and len(backend.kept._asking) == 0
    assert not os.listdir(os.path.join(v.config.cache_dir, ".locks")) if os.path.isdir(
        os.path.join(v.config.cache_dir, ".locks")) else True


@pytest_twisted.ensureDeferred
async def test_a_page_names_only_what_the_vault_may_fetch(upstream, vault_factory):
    good = b"an sdist's bytes"
    sha = hashlib.sha256(good).hexdigest()
    upstream.add("/files/evil-1.0.tar.gz", good)
    upstream.add("/files/evil-3.0.tar.gz", b"no hash for me")
    page = {"meta": {"api-version": "1.1"}, "name": "evil", "files": [
        {"filename": "evil-1.0.tar.gz", "url": "../../files/evil-1.0.tar.gz", "hashes": {"sha256": sha}},
        {"filename": "passwd", "url": "file:///etc/passwd", "hashes": {}},
        {"filename": "../../escape.tar.gz", "url": "/files/evil-1.0.tar.gz", "hashes": {"sha256": sha}},
        {"filename": "evil-2.0.tar.gz", "url": "gopher://127.0.0.1/x", "hashes": {}},
        {"filename": "evil-3.0.tar.gz", "url": "/files/evil-3.0.tar.gz", "hashes": {"sha256": "not hex"},
         "yanked": {"x": 1}, "requires-python": "\x00>=3", "size": -1, "upload-time": "yesterday"},
        {"filename": "evil-4.0-py3-none-any.whl.metadata", "url": "/files/x", "hashes": {}},
        "not a file",
    ]}
    upstream.add("/simple/evil/", json.dumps(page).encode(), content_type=JSON_V1)
    v = vault_factory([{"type": "pypi", "config": {"base_url": upstream.url + "/simple"}}])
    got = await project_json(v, "evil")
    files = {f["filename"]: f for f in got["files"]}
    assert sorted(files) == ["evil-1.0.tar.gz", "evil-3.0.tar.gz"]
    unchecked = files["evil-3.0.tar.gz"]
    assert unchecked["hashes"] == {} and unchecked["yanked"] is False and "/url-" in unchecked["url"]
    assert not {"requires-python", "size", "upload-time"} & set(unchecked)
    base = f"{v.url}/pypi/simple/evil/"
    status, _, body = await get(urljoin(base, files["evil-1.0.tar.gz"]["url"]))
    assert status == 200 and body == good
    status, headers, body = await get(urljoin(base, unchecked["url"]))
    assert status == 200 and body == b"no hash for me" and "etag" in headers
    assert sorted(r.path for r in upstream.requests) == ["/files/evil-1.0.tar.gz", "/files/evil-3.0.tar.gz",
                                                         "/simple/evil/"]
