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
from tests.pypienv import fake_pypi, new_env, new_uv_env, pip_download, pip_install, uv_pip_install
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
