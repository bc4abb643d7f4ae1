"""The fake PyPI (tests/fakepypi.py) is realistic: the real pip and uv install from it.

Most tests talk to one standalone fake (``python -m tests.fakepypi``) started for the module and
reset (log, faults, options, catalog) before each test; the clients run isolated through
tests/pypienv.py.  The last tests use the fake in-process, on the test's reactor, as later tests
put it behind an in-process vault.
"""

import gzip
import hashlib
import html.parser
import io
import json
import os
import socket
import zipfile
import zlib
from http.client import HTTPConnection, IncompleteRead
from urllib.parse import urljoin, urlsplit

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.fakepypi import (HTML_V1, JSON_V1, TEXT_HTML, FakePyPI, build_wheel, negotiate, normalize,
                            read_wheel_metadata)
from tests.pypienv import (fake_pypi, fetch, in_thread, new_env, new_uv_env, pip_download, pip_install,
                           uv_pip_install)

PIP_ACCEPT = "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, text/html; q=0.01"
UV_ACCEPT = "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with fake_pypi(tmp_path_factory.mktemp("fakepypi")) as fake:
        yield fake


@pytest.fixture
def pypi(server):
    server.options(html_only=False, same_host=False, gzip_index=False, strict_accept=True)
    server.reset(catalog=True)
    return server


def get(url, accept=None, method="GET", **headers):
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    if accept is not None:
        hdrs["Accept"] = accept
    return fetch(method, url, hdrs)


def project_json(pypi, name):
    status, headers, body = get(pypi.index + name + "/", JSON_V1)
    assert status == 200 and headers["content-type"] == JSON_V1, (status, headers)
    return json.loads(body)


class Anchors(html.parser.HTMLParser):
    def __init__(self, text):
        super().__init__()
        self.links, self._open = [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._open = dict(attrs)

    def handle_data(self, data):
        if self._open is not None:
            self.links.append((data, self._open))
            self._open = None


def by_server(requests, server_name):
    return [r for r in requests if r["server"] == server_name]


def file_requests(requests, filename):
    return [(r["method"], r["headers"].get("range"), r["status"]) for r in requests
            if r["path"].endswith("/" + filename)]


# ---------------------------------------------------------------------------------------------
# The index over plain HTTP


def test_standalone_urls_and_names(pypi):
    assert urlsplit(pypi.index).hostname == "127.0.0.1" and pypi.index.endswith("/simple/")
    assert urlsplit(pypi.files).hostname == "127.0.0.2"
    status, _, body = get(pypi.index, JSON_V1)
    listing = json.loads(body)
    assert status == 200 and listing["meta"]["api-version"] == "1.1"
    assert {p["name"] for p in listing["projects"]} == {"alpha", "beta", "gamma", "delta", "Zeta_Utils"}
    status, _, body = get(pypi.index, "text/html")
    assert status == 200 and b'<a href="/simple/zeta-utils/">Zeta_Utils</a>' in body

    base = pypi.base
    for path, location in [("/simple/Zeta_Utils/", "/simple/zeta-utils/"), ("/simple/zeta.utils", "/simple/zeta-utils/"),
                           ("/simple/ALPHA/", "/simple/alpha/"), ("/simple/alpha", "/simple/alpha/"),
                           ("/simple", "/simple/")]:
        status, headers, _ = get(base + path, JSON_V1)
        assert (status, headers.get("location")) == (301, location), path
    assert get(base + "/simple/no-such-project/")[0] == 404
    assert get(pypi.files + "/simple/alpha/")[0] == 404  # the file host is not an index
    assert get(base + "/simple/alpha/", method="POST")[0] == 405
    # the log has both hosts and no control requests
    log = pypi.requests()
    assert {r["server"] for r in log} == {"index", "files"}
    assert not [r for r in log if r["path"].startswith("/_fake/")]
    assert all(r["host"] and r["status"] for r in log)


@pytest.mark.parametrize("accept, expected", [
    (PIP_ACCEPT, JSON_V1),
    (UV_ACCEPT, JSON_V1),
    (None, TEXT_HTML),
    ("", TEXT_HTML),
    ("*/*", TEXT_HTML),
    ("text/html", TEXT_HTML),
    ("text/*", TEXT_HTML),
    (HTML_V1, HTML_V1),
    ("application/vnd.pypi.simple.latest+json", JSON_V1),
    ("application/vnd.pypi.simple.v1+json;q=0, text/html;q=0.5", TEXT_HTML),
    ("application/vnd.pypi.simple.v1+json;q=0.5, */*;q=0.9", TEXT_HTML),
    ("application/*;q=0.5, text/html;q=0.1", HTML_V1),  # equal q: v1+html before JSON, as PyPI
    ("application/json", None),
    ("text/plain, application/vnd.pypi.simple.v2+json", None),
])
def test_negotiation_rules(accept, expected):
    assert negotiate(accept) == expected
    assert negotiate(accept, strict=False) == (expected or TEXT_HTML)


def test_negotiation_over_http(pypi):
    url = pypi.index + "alpha/"
    for accept, ctype in [(PIP_ACCEPT, JSON_V1), (UV_ACCEPT, JSON_V1), (HTML_V1, HTML_V1),
                          ("text/html", "text/html; charset=utf-8"), (None, "text/html; charset=utf-8")]:
        status, headers, body = get(url, accept)
        assert (status, headers["content-type"], headers["vary"]) == (200, ctype, "Accept"), accept
    status, headers, _ = get(url, "application/json")
    assert (status, headers["vary"]) == (406, "Accept")
    pypi.options(strict_accept=False)
    status, headers, _ = get(url, "application/json")
    assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
    pypi.options(html_only=True)
    status, headers, _ = get(url, JSON_V1)
    assert (status, headers["content-type"], headers.get("vary")) == (200, "text/html; charset=utf-8", None)


def test_project_pages_json_and_html(pypi):
    alpha = project_json(pypi, "alpha")
    assert alpha["meta"]["api-version"] == "1.1" and alpha["name"] == "alpha"
    assert alpha["versions"] == ["1.0", "2.0"]
    names = [f["filename"] for f in alpha["files"]]
    assert names == ["alpha-1.0-py3-none-any.whl", "alpha-1.0.tar.gz", "alpha-2.0-py3-none-any.whl", "alpha-2.0.tar.gz"]
    for f in alpha["files"]:
        assert set(f) >= {"filename", "url", "hashes", "yanked", "size", "upload-time"}
        assert f["yanked"] is False and "requires-python" not in f
        assert f["upload-time"].startswith("2024-01-0") and f["upload-time"].endswith("Z")
        assert urlsplit(f["url"]).netloc == urlsplit(pypi.files).netloc
        status, headers, body = get(f["url"])
        assert status == 200 and len(body) == f["size"] == int(headers["content-length"])
        assert hashlib.sha256(body).hexdigest() == f["hashes"]["sha256"]
        if f["filename"].endswith(".whl"):
            metadata = read_wheel_metadata(io.BytesIO(body))
            assert f["core-metadata"] == {"sha256": hashlib.sha256(metadata).hexdigest()}
            assert get(f["url"] + ".metadata")[2] == metadata
            _check_record(body)
        else:
            assert "core-metadata" not in f
            assert get(f["url"] + ".metadata")[0] == 404
    assert b"Requires-Dist: beta>=1.0" in get(alpha["files"][2]["url"] + ".metadata")[2]

    beta_wheel = project_json(pypi, "beta")["files"][0]
    assert beta_wheel["filename"] == "beta-1.0-py3-none-any.whl" and "core-metadata" not in beta_wheel
    gamma = {f["filename"]: f for f in project_json(pypi, "gamma")["files"]}
    assert gamma["gamma-1.1-py3-none-any.whl"]["yanked"] == 'broken <build> & "bad" wheel'
    delta = {f["filename"]: f for f in project_json(pypi, "delta")["files"]}
    assert delta["delta-2.0-py3-none-any.whl"]["requires-python"] == ">=4.0"
    assert b"Requires-Python: >=4.0" in get(delta["delta-2.0-py3-none-any.whl"]["url"] + ".metadata")[2]
    assert project_json(pypi, "zeta-utils")["name"] == "zeta-utils"

    # HTML: the same facts, escaped
    for name, files in [("gamma", gamma), ("delta", delta)]:
        status, _, raw = get(pypi.index + name + "/", "text/html")
        text = raw.decode()
        links = Anchors(text).links
        assert [t for t, _ in links] == list(files)
        for filename, attrs in links:
            f = files[filename]
            assert attrs["href"] == "%s#sha256=%s" % (f["url"], f["hashes"]["sha256"])
            if "core-metadata" in f:
                expected = "sha256=" + f["core-metadata"]["sha256"]
                assert attrs["data-core-metadata"] == attrs["data-dist-info-metadata"] == expected
            else:
                assert "data-core-metadata" not in attrs and "data-dist-info-metadata" not in attrs
            assert attrs.get("data-requires-python") == f.get("requires-python")
            assert attrs.get("data-yanked", False) == f["yanked"]
    assert 'data-requires-python="&gt;=4.0"' in get(pypi.index + "delta/")[2].decode()
    assert 'data-yanked="broken &lt;build&gt; &amp; &quot;bad&quot; wheel"' in get(pypi.index + "gamma/")[2].decode()
    assert b"data-core-metadata" not in get(pypi.index + "beta/")[2]


def _check_record(wheel_bytes):
    """Every member but RECORD is listed in RECORD with its right sha256 and size."""
    with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as zf:
        assert zf.testzip() is None
        record_name = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        rows = [line.split(",") for line in zf.read(record_name).decode().splitlines()]
        listed = {path: (digest, size) for path, digest, size in rows}
        assert set(listed) == set(zf.namelist())
        for name in zf.namelist():
            if name == record_name:
                continue
            data = zf.read(name)
            expected = "sha256=" + _b64(hashlib.sha256(data).digest())
            assert listed[name] == (expected, str(len(data))), name


def _b64(digest):
    import base64

    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def test_index_validators_and_runtime_release(pypi):
    url = pypi.index + "beta/"
    status, first, _ = get(url, JSON_V1)
    assert first["cache-control"] == "max-age=600, public" and first["etag"] and first["last-modified"]
    html_etag = get(url, "text/html")[1]["etag"]
    assert html_etag != first["etag"]  # one ETag per representation
    assert get(url, JSON_V1, if_none_match=first["etag"])[0] == 304
    assert get(url, JSON_V1, if_modified_since=first["last-modified"])[0] == 304
    status, headers, body = get(url, JSON_V1, method="HEAD")
    assert status == 200 and body == b"" and headers["etag"] == first["etag"]

    added = pypi.add_release("beta", "1.1", sdist=True)
    assert [f["filename"] for f in added] == ["beta-1.1-py3-none-any.whl", "beta-1.1.tar.gz"]
    status, after, body = get(url, JSON_V1, if_none_match=first["etag"])
    assert status == 200 and after["etag"] != first["etag"]
    assert json.loads(body)["versions"] == ["1.0", "1.1"]
    assert int(after["x-pypi-last-serial"]) > int(first["x-pypi-last-serial"])
    assert get(url, JSON_V1, if_modified_since=first["last-modified"])[0] == 200
    assert get(url, JSON_V1, if_modified_since=after["last-modified"])[0] == 304

    # back to the start catalog: the same files, a new serial (so a new ETag) and a later Last-Modified
    pypi.reset(catalog=True)
    status, restored, body = get(url, JSON_V1)
    assert json.loads(body)["versions"] == ["1.0"] and restored["etag"] not in (first["etag"], after["etag"])
    assert int(restored["x-pypi-last-serial"]) > int(after["x-pypi-last-serial"])
    assert get(url, JSON_V1, if_modified_since=after["last-modified"])[0] == 200
    assert get(pypi.index + "alpha/", JSON_V1, if_modified_since=first["last-modified"])[0] == 304  # untouched


def test_dist_built_elsewhere_is_published(pypi, tmp_path):
    path = build_wheel(tmp_path, "Kept-Big", "3.0", pad_bytes=100_000)
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    added = pypi.add_dist("Kept-Big", path, sha256=sha)
    assert added["filename"] == "kept_big-3.0-py3-none-any.whl" and added["sha256"] == sha
    assert added["version"] == "3.0" and added["metadata_sha256"] is None
    (entry,) = project_json(pypi, "kept-big")["files"]
    assert entry["hashes"]["sha256"] == sha and entry["size"] == os.path.getsize(path)
    status, _, body = get(entry["url"])
    assert status == 200 and hashlib.sha256(body).hexdigest() == sha


def test_files_host_ranges_and_validators(pypi):
    wheel = project_json(pypi, "beta")["files"][0]
    url, size = wheel["url"], wheel["size"]
    status, headers, whole = get(url)
    assert status == 200 and headers["accept-ranges"] == "bytes" and headers["etag"]
    assert headers["content-type"] == "application/octet-stream" and "content-encoding" not in headers
    status, head, body = get(url, method="HEAD")
    assert status == 200 and body == b"" and head["content-length"] == str(size) and head["etag"] == headers["etag"]

    for rng, start, end in [("bytes=0-9", 0, 9), ("bytes=-100", size - 100, size - 1),
                            ("bytes=%d-" % (size - 5), size - 5, size - 1), ("bytes=10-99999999", 10, size - 1)]:
        status, h, body = get(url, range=rng)
        assert status == 206 and h["content-range"] == "bytes %d-%d/%d" % (start, end, size), rng
        assert body == whole[start:end + 1] and h["content-length"] == str(end - start + 1)
    status, h, _ = get(url, range="bytes=%d-" % size)
    assert status == 416 and h["content-range"] == "bytes */%d" % size
    assert get(url, range="bytes=0-1,5-6")[0] == 200  # several ranges: the whole file
    assert get(url, range="bytes=0-9", if_range=headers["etag"])[0] == 206
    assert get(url, range="bytes=0-9", if_range='"other"')[0] == 200
    assert get(url, if_none_match=headers["etag"])[0] == 304

    sdist = project_json(pypi, "beta")["files"][1]
    status, h, body = get(sdist["url"], accept_encoding="gzip")
    assert status == 200 and "content-encoding" not in h and body[:2] == b"\x1f\x8b"
    assert get(pypi.files + "/packages/00/00/nothing/x.whl")[0] == 404


def test_gzip_index_pages(pypi, tmp_path):
    pypi.options(gzip_index=True)
    status, headers, body = get(pypi.index + "alpha/", JSON_V1, accept_encoding="gzip")
    assert headers["content-encoding"] == "gzip" and headers["vary"] == "Accept, Accept-Encoding"
    assert json.loads(gzip.decompress(body))["name"] == "alpha"
    assert "content-encoding" not in get(pypi.index + "alpha/", JSON_V1)[1]
    env = new_uv_env(tmp_path / "uv")
    res = uv_pip_install(pypi.index, "alpha", target_env=env)
    assert res.returncode == 0, res.stderr
    assert env.installed() == {"alpha": "2.0", "beta": "1.0"}


def test_faults(pypi):
    alpha = pypi.index + "alpha/"
    wheel_url = project_json(pypi, "alpha")["files"][0]["url"]
    pypi.fault("down5xx", "index")
    assert get(alpha)[0] == 503 and get(wheel_url)[0] == 200
    pypi.fault("429", "files", retry_after=3)
    status, headers, _ = get(wheel_url)
    assert (status, headers["retry-after"]) == (429, "3") and get(alpha)[0] == 503  # each target its own mode
    pypi.fault("normal", "index")
    assert get(alpha)[0] == 200 and get(wheel_url)[0] == 429
    pypi.fault("down5xx", "both", count=1)
    assert get(alpha)[0] == 503 and get(alpha)[0] == 200  # count=1: once, then normal
    pypi.fault("down5xx", "index", only="/gamma/")
    assert get(pypi.index + "gamma/")[0] == 503 and get(alpha)[0] == 200

    pypi.fault("cut", "files", cut_after=100)
    conn = HTTPConnection("127.0.0.2", urlsplit(pypi.files).port, timeout=5)
    conn.request("GET", urlsplit(wheel_url).path)
    resp = conn.getresponse()
    assert resp.status == 200 and int(resp.getheader("content-length")) > 100
    with pytest.raises(IncompleteRead) as info:
        resp.read()
    assert len(info.value.partial) == 100
    conn.close()
    assert get(alpha)[0] == 200  # cut only touches file bodies

    pypi.fault("hang", "files")
    with pytest.raises(socket.timeout):
        fetch("GET", wheel_url, timeout=0.5)
    pypi.reset()
    assert get(wheel_url)[0] == 200
    state = pypi.state()
    assert {t: f["mode"] for t, f in state["faults"].items()} == {"index": "normal", "files": "normal"}
    assert state["request_count"] == 1

    announced = project_json(pypi, "alpha")["files"][0]
    pypi.fault("corrupt", "files", only="alpha-1.0-py3")
    status, _, body = get(wheel_url)
    assert status == 200 and len(body) == announced["size"]
    assert hashlib.sha256(body).hexdigest() != announced["hashes"]["sha256"]
    _, _, part = get(wheel_url, range="bytes=0-99")
    assert part == body[:100]  # the first bytes are intact; the middle one is not


# ---------------------------------------------------------------------------------------------
# The real clients


def test_pip_install(pypi, tmp_path):
    env = new_env(tmp_path / "env")
    res = pip_install(pypi.index, "alpha", "gamma", "delta", "Zeta_Utils", target_env=env)
    assert res.returncode == 0, res.stderr
    assert env.installed() == {"alpha": "2.0", "beta": "1.0", "gamma": "1.0", "delta": "1.0", "zeta-utils": "0.5"}
    assert env.version_of("alpha") == "2.0" and env.version_of("zeta_utils") == "0.5"

    log = pypi.requests()
    pages = by_server(log, "index")
    assert {r["path"] for r in pages} == {"/simple/alpha/", "/simple/gamma/", "/simple/delta/", "/simple/zeta-utils/",
                                          "/simple/beta/"}
    assert {r["headers"]["accept"] for r in pages} == {PIP_ACCEPT}
    assert {r["headers"].get("cache-control") for r in pages} == {"max-age=0"}
    # PEP 658: metadata first, then the wheel; beta has no .metadata, so its wheel is fetched whole
    assert file_requests(log, "alpha-2.0-py3-none-any.whl.metadata") == [("GET", None, 200)]
    assert file_requests(log, "alpha-2.0-py3-none-any.whl") == [("GET", None, 200)]
    assert file_requests(log, "beta-1.0-py3-none-any.whl") == [("GET", None, 200)]
    # neither the yanked release nor the one needing Python >= 4 was touched
    assert not [r for r in log if "gamma-1.1" in r["path"] or "delta-2.0" in r["path"]]


def test_uv_pip_install(pypi, tmp_path):
    env = new_uv_env(tmp_path / "env")
    res = uv_pip_install(pypi.index, "alpha", "gamma", "delta", "Zeta_Utils", target_env=env)
    assert res.returncode == 0, res.stderr
    assert env.installed() == {"alpha": "2.0", "beta": "1.0", "gamma": "1.0", "delta": "1.0", "zeta-utils": "0.5"}
    assert env.version_of("beta") == "1.0"

    log = pypi.requests()
    pages = by_server(log, "index")
    assert {r["headers"]["accept"] for r in pages} == {UV_ACCEPT}
    assert {r["headers"].get("accept-encoding") for r in pages} == {"gzip, deflate, zstd"}
    assert file_requests(log, "alpha-2.0-py3-none-any.whl.metadata") == [("GET", None, 200)]
    # no .metadata for beta: uv reads the wheel's tail by Range (HEAD first), then fetches it whole
    beta = file_requests(log, "beta-1.0-py3-none-any.whl")
    assert beta[0] == ("HEAD", None, 200) and beta[-1] == ("GET", None, 200)
    ranged = [r for r in beta if r[1]]
    assert ranged and all(status == 206 for _, _, status in ranged)
    assert not [r for r in log if "gamma-1.1" in r["path"] or "delta-2.0" in r["path"]]


def test_html_only_index(pypi, tmp_path):
    pypi.options(html_only=True)
    pip_env, uv_env = new_env(tmp_path / "pip"), new_uv_env(tmp_path / "uv")
    res = pip_install(pypi.index, "alpha", "gamma", target_env=pip_env)
    assert res.returncode == 0, res.stderr
    res = uv_pip_install(pypi.index, "alpha", "gamma", target_env=uv_env)
    assert res.returncode == 0, res.stderr
    for env in (pip_env, uv_env):
        assert env.installed() == {"alpha": "2.0", "beta": "1.0", "gamma": "1.0"}
    # both still asked for JSON first, and read HTML (data-core-metadata: alpha's .metadata was used)
    log = pypi.requests()
    assert {r["headers"]["accept"] for r in by_server(log, "index")} == {PIP_ACCEPT, UV_ACCEPT}
    assert len(file_requests(log, "alpha-2.0-py3-none-any.whl.metadata")) == 2


def test_same_host_relative_urls(pypi, tmp_path):
    pypi.options(same_host=True)
    status, _, body = get(pypi.index + "alpha/", "text/html")
    hrefs = [a["href"] for _, a in Anchors(body.decode()).links]
    assert hrefs and all(h.startswith("../../packages/") for h in hrefs)
    assert json.loads(get(pypi.index + "alpha/", JSON_V1)[2])["files"][0]["url"].startswith("../../packages/")
    target = urljoin(pypi.index + "alpha/", hrefs[0].split("#")[0])
    assert get(target)[0] == 200
    pypi.reset()
    pip_env, uv_env = new_env(tmp_path / "pip"), new_uv_env(tmp_path / "uv")
    res = pip_install(pypi.index, "alpha", target_env=pip_env)
    assert res.returncode == 0, res.stderr
    res = uv_pip_install(pypi.index, "alpha", target_env=uv_env)
    assert res.returncode == 0, res.stderr
    for env in (pip_env, uv_env):
        assert env.installed() == {"alpha": "2.0", "beta": "1.0"}
    log = pypi.requests()
    assert not by_server(log, "files") and len([r for r in log if r["path"].startswith("/packages/")]) >= 6


def test_corrupt_file_fails_the_hash_check(pypi, tmp_path):
    sha = project_json(pypi, "beta")["files"][0]["hashes"]["sha256"]
    pypi.fault("corrupt", "files", only="beta-1.0-py3-none-any.whl")
    pip_env = new_env(tmp_path / "pip")
    res = pip_install(pypi.index, "beta", target_env=pip_env)
    assert res.returncode != 0
    assert "THESE PACKAGES DO NOT MATCH THE HASHES" in res.stderr and "Expected sha256 " + sha in res.stderr
    assert pip_env.version_of("beta") is None

    # a flipped byte inside a member: uv's streaming unzip sees the bad CRC first
    uv_env = new_uv_env(tmp_path / "uv")
    res = uv_pip_install(pypi.index, "beta", target_env=uv_env)
    assert res.returncode != 0 and "Bad CRC" in res.stderr
    # a flipped byte the zip does not check: only the sha256 tells
    pypi.fault("corrupt", "files", only="beta-1.0-py3-none-any.whl", corrupt_at=10)
    res = uv_pip_install(pypi.index, "beta", target_env=uv_env)
    assert res.returncode != 0 and "Hash mismatch" in res.stderr and "sha256:" + sha in res.stderr
    assert uv_env.version_of("beta") is None


def test_release_added_at_runtime_is_installed(pypi, tmp_path):
    pip_env, uv_env = new_env(tmp_path / "pip"), new_uv_env(tmp_path / "uv")
    res = uv_pip_install(pypi.index, "beta", target_env=uv_env)
    assert res.returncode == 0 and uv_env.version_of("beta") == "1.0", res.stderr
    pypi.add_release("beta", "1.1")
    res = pip_install(pypi.index, "beta", target_env=pip_env)
    assert res.returncode == 0 and pip_env.version_of("beta") == "1.1", res.stderr
    res = uv_pip_install(pypi.index, "beta", target_env=uv_env, extra_args=["--upgrade"])
    assert res.returncode == 0 and uv_env.version_of("beta") == "1.1", res.stderr
    # yanked at runtime: not chosen any more, unless pinned
    pypi.yank("beta", "1.1", "regression")
    fresh = new_uv_env(tmp_path / "fresh")
    res = uv_pip_install(pypi.index, "beta", target_env=fresh)
    assert res.returncode == 0 and fresh.version_of("beta") == "1.0", res.stderr
    res = uv_pip_install(pypi.index, "beta==1.1", target_env=fresh)
    assert res.returncode == 0 and fresh.version_of("beta") == "1.1", res.stderr
    assert "regression" in res.stderr  # uv warns about the yanked pin, with the reason


def test_pip_download_and_sdists(pypi, tmp_path):
    dest = tmp_path / "dl"
    res = pip_download(pypi.index, "alpha", dest=dest)
    assert res.returncode == 0, res.stderr
    files = {f["filename"]: f for name in ("alpha", "beta") for f in project_json(pypi, name)["files"]}
    got = sorted(os.listdir(dest))
    assert got == ["alpha-2.0-py3-none-any.whl", "beta-1.0-py3-none-any.whl"]
    for name in got:
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == files[name]["hashes"]["sha256"]
    # sdists carry a standard-library build backend: they build offline
    env = new_uv_env(tmp_path / "uv")
    res = uv_pip_install(pypi.index, "--no-binary", ":all:", "alpha", target_env=env)
    assert res.returncode == 0, res.stderr
    assert env.installed() == {"alpha": "2.0", "beta": "1.0"} and env.version_of("alpha") == "2.0"
    assert file_requests(pypi.requests(), "alpha-2.0.tar.gz") == [("GET", None, 200)]


# ---------------------------------------------------------------------------------------------
# Building blocks and in-process use


def test_build_wheel_padding_is_deterministic_and_incompressible(tmp_path):
    one = build_wheel(tmp_path, "Big-Pkg", "3.0", pad_bytes=3 * 1024 * 1024 + 7, seed=5)
    (tmp_path / "again").mkdir()
    two = build_wheel(tmp_path / "again", "Big-Pkg", "3.0", pad_bytes=3 * 1024 * 1024 + 7, seed=5)
    assert os.path.basename(one) == "big_pkg-3.0-py3-none-any.whl"
    data = open(one, "rb").read()
    assert data == open(two, "rb").read() and len(data) > 3 * 1024 * 1024
    _check_record(data)
    with zipfile.ZipFile(one) as zf:
        pad = zf.read("big_pkg/_padding.bin")
        assert zf.getinfo("big_pkg/_padding.bin").compress_type == zipfile.ZIP_STORED
        assert zf.namelist()[-1] == "big_pkg-3.0.dist-info/RECORD"
    assert len(pad) == 3 * 1024 * 1024 + 7
    assert len(zlib.compress(pad[:1 << 20], 9)) > (1 << 20)
    assert b"Name: Big-Pkg" in read_wheel_metadata(one)
    assert normalize("Big_Pkg.x") == "big-pkg-x"


@pytest_twisted.ensureDeferred
async def test_in_process(tmp_path, http):
    """The fake on the test's reactor; a client runs in a thread meanwhile."""
    fake = FakePyPI(tmp_path / "work")
    fake.listen(reactor)
    try:
        big = build_wheel(tmp_path, "big", "1.0", pad_bytes=2 * 1024 * 1024)
        dist = fake.add_dist("big", big)  # no .metadata: uv reads the tail by Range
        assert dist.version == "1.0" and dist.metadata_sha256 is None
        resp = await http.get(fake.index_url + "big/", headers={"Accept": JSON_V1})
        page = json.loads(await resp.content())
        assert page["files"][0]["url"] == fake.file_url("big-1.0-py3-none-any.whl")
        assert page["files"][0]["size"] == os.path.getsize(big)

        env = await in_thread(new_uv_env, tmp_path / "env")
        res = await in_thread(uv_pip_install, fake.index_url, "big", "alpha", target_env=env)
        assert res.returncode == 0, res.stderr
        assert (await in_thread(env.installed)) == {"big": "1.0", "alpha": "2.0", "beta": "1.0"}
        requests = [(r["method"], r["status"], r["headers"].get("range")) for r in fake.requests
                    if r["path"].endswith("/big-1.0-py3-none-any.whl")]
        ranged = [r for r in requests if r[2]]
        assert ranged and all(status == 206 for _, status, _ in ranged) and ("GET", 200, None) in requests
        assert fake.count("/simple/big/") == 2  # ours and uv's

        fake.set_fault("down5xx", "index")
        resp = await http.get(fake.index_url + "alpha/")
        assert resp.code == 503
        await resp.content()
    finally:
        await fake.close()
    assert os.path.isdir(tmp_path / "work")  # a workdir we gave is kept
