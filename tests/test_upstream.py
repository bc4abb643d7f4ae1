"""Tests of the fake upstream server itself, over real sockets with treq."""

import gzip
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.web._newclient import ResponseFailed
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

try:
    from tests.upstream import LAST_MODIFIED, FakeUpstream, Recorded
except ImportError:  # tests/ on sys.path but not the project root
    from upstream import LAST_MODIFIED, FakeUpstream, Recorded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BODY = bytes(range(256)) * 40  # 10240 bytes


def sleep(seconds):
    return deferLater(reactor, seconds, lambda: None)


async def until(predicate, timeout=3.0, step=0.005):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within %ss" % timeout)
        await sleep(step)


def header(resp, name):
    values = resp.headers.getRawHeaders(name)
    return None if values is None else values[0]


class _Collect(Protocol):
    def __init__(self, request):
        self.request = request
        self.chunks = []
        self.done = Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        self.done.callback(b"".join(self.chunks))


async def raw(url, method, path, extra=b""):
    """Send one request over a bare TCP connection; return everything received."""
    host, port = url[len("http://"):].rsplit(":", 1)
    proto = _Collect(
        b"%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n%s\r\n"
        % (method, path, host.encode(), extra)
    )
    await connectProtocol(TCP4ClientEndpoint(reactor, host, int(port)), proto)
    return await proto.done


def split_response(data):
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


@pytest_twisted.async_yield_fixture
async def up():
    server = FakeUpstream()
    server.listen(reactor, interface="127.0.0.1", host_port=0)
    yield server
    await server.close()
    assert not server._calls and not server._channels


@pytest.fixture
def client():
    pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent(reactor, pool=pool))


@pytest_twisted.ensureDeferred
async def test_plain_get_bytes_and_headers(up, client):
    up.add("/a/b.tar.gz", BODY, headers={"X-Extra": "yes"})
    up.add("/plain", b"hi")
    up.add("/page.json", b"{}")
    assert up.url.startswith("http://127.0.0.1:")

    resp = await client.get(up.url + "/a/b.tar.gz")
    assert resp.code == 200
    assert await resp.content() == BODY
    assert resp.length == len(BODY)
    assert header(resp, "content-type") == "application/gzip"
    assert header(resp, "etag") == '"%s"' % hashlib.md5(BODY).hexdigest()
    assert header(resp, "last-modified") == LAST_MODIFIED
    assert header(resp, "accept-ranges") == "bytes"
    assert header(resp, "x-extra") == "yes"

    resp = await client.get(up.url + "/plain")
    assert header(resp, "content-type") == "application/octet-stream"
    assert await resp.content() == b"hi"
    resp = await client.get(up.url + "/page.json")
    assert header(resp, "content-type") == "application/json"
    await resp.content()


@pytest_twisted.ensureDeferred
async def test_unknown_path_and_error_statuses(up, client):
    up.add("/gone", b"", status=410)
    up.add("/busy", b"", status=503, headers={"Retry-After": "1"})
    up.add("/boom", b"server exploded", status=500)

    resp = await client.get(up.url + "/nope")
    assert resp.code == 404
    assert b"404" in await resp.content()
    resp = await client.get(up.url + "/gone")
    assert resp.code == 410
    await resp.content()
    resp = await client.get(up.url + "/busy")
    assert resp.code == 503 and header(resp, "retry-after") == "1"
    await resp.content()
    resp = await client.get(up.url + "/boom")
    assert resp.code == 500 and await resp.content() == b"server exploded"
    resp = await client.post(up.url + "/boom", data=b"x")
    assert resp.code == 405
    await resp.content()


@pytest_twisted.ensureDeferred
async def test_head(up, client):
    up.add("/f.bin", BODY)
    resp = await client.head(up.url + "/f.bin")
    assert resp.code == 200
    assert header(resp, "etag") == '"%s"' % hashlib.md5(BODY).hexdigest()
    assert header(resp, "content-type") == "application/octet-stream"
    assert await resp.content() == b""

    code, headers, body = split_response(await raw(up.url, b"HEAD", b"/f.bin"))
    assert code == 200
    assert headers["content-length"] == str(len(BODY))
    assert headers["accept-ranges"] == "bytes"
    assert body == b""
    assert up.count("/f.bin", method="HEAD") == 2
    assert up.count("/f.bin") == 0


@pytest_twisted.ensureDeferred
async def test_range_requests(up, client):
    up.add("/r.bin", BODY)
    url = up.url + "/r.bin"
    size = len(BODY)

    resp = await client.get(url, headers={"Range": "bytes=10-19"})
    assert resp.code == 206
    assert header(resp, "content-range") == "bytes 10-19/%d" % size
    assert resp.length == 10
    assert await resp.content() == BODY[10:20]

    resp = await client.get(url, headers={"Range": "bytes=10000-"})
    assert resp.code == 206
    assert await resp.content() == BODY[10000:]

    resp = await client.get(url, headers={"Range": "bytes=-5"})
    assert resp.code == 206
    assert header(resp, "content-range") == "bytes %d-%d/%d" % (size - 5, size - 1, size)
    assert await resp.content() == BODY[-5:]

    resp = await client.get(url, headers={"Range": "bytes=%d-" % size})
    assert resp.code == 416
    assert header(resp, "content-range") == "bytes */%d" % size
    await resp.content()

    resp = await client.get(url, headers={"Range": "bytes=0-1,5-6"})
    assert resp.code == 200  # multiple ranges: whole body
    assert await resp.content() == BODY

    resp = await client.get(url, headers={"Range": "bytes=0-1", "If-Range": '"stale"'})
    assert resp.code == 200
    await resp.content()
    etag = '"%s"' % hashlib.md5(BODY).hexdigest()
    resp = await client.get(url, headers={"Range": "bytes=0-1", "If-Range": etag})
    assert resp.code == 206
    assert await resp.content() == BODY[:2]


@pytest_twisted.ensureDeferred
async def test_conditional_requests(up, client):
    up.add("/c.bin", BODY)
    etag = '"%s"' % hashlib.md5(BODY).hexdigest()
    resp = await client.get(up.url + "/c.bin", headers={"If-None-Match": etag})
    assert resp.code == 304
    assert header(resp, "etag") == etag
    assert await resp.content() == b""
    resp = await client.get(up.url + "/c.bin", headers={"If-None-Match": '"other"'})
    assert resp.code == 200
    await resp.content()
    resp = await client.get(up.url + "/c.bin", headers={"If-Modified-Since": LAST_MODIFIED})
    assert resp.code == 304
    await resp.content()


@pytest_twisted.ensureDeferred
async def test_cut_after_fails_the_client(up, client):
    up.add("/cut.bin", BODY, cut_after=1000)
    resp = await client.get(up.url + "/cut.bin")
    assert resp.code == 200
    assert resp.length == len(BODY)
    with pytest.raises((ResponseFailed, PotentialDataLoss)):
        await treq.content(resp)

    got = []
    resp = await client.get(up.url + "/cut.bin")
    with pytest.raises((ResponseFailed, PotentialDataLoss)):
        await treq.collect(resp, got.append)
    assert b"".join(got) == BODY[:1000]

    code, headers, body = split_response(await raw(up.url, b"GET", b"/cut.bin"))
    assert code == 200
    assert headers["content-length"] == str(len(BODY))
    assert body == BODY[:1000]


@pytest_twisted.ensureDeferred
async def test_cut_after_zero_and_chunked(up, client):
    up.add("/zero", BODY, cut_after=0)
    up.add("/cc", BODY, cut_after=300, chunked=True)
    resp = await client.get(up.url + "/zero")
    with pytest.raises((ResponseFailed, PotentialDataLoss)):
        await treq.content(resp)
    got = []
    resp = await client.get(up.url + "/cc")
    with pytest.raises((ResponseFailed, PotentialDataLoss)):
        await treq.collect(resp, got.append)
    assert b"".join(got) == BODY[:300]


@pytest_twisted.ensureDeferred
async def test_chunked(up, client):
    up.add("/ch.bin", BODY, chunked=True)
    resp = await client.get(up.url + "/ch.bin")
    assert resp.code == 200
    assert resp.length is UNKNOWN_LENGTH
    assert await resp.content() == BODY

    code, headers, body = split_response(await raw(up.url, b"GET", b"/ch.bin"))
    assert code == 200
    assert headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers
    assert body.endswith(b"\r\n0\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_throttle(up, client):
    up.add("/slow.bin", BODY[:400], throttle=(100, 0.05))
    got = []
    started = time.monotonic()
    resp = await client.get(up.url + "/slow.bin")
    await treq.collect(resp, got.append)
    elapsed = time.monotonic() - started
    assert b"".join(got) == BODY[:400]
    assert len(got) >= 4
    assert elapsed >= 0.15


@pytest_twisted.ensureDeferred
async def test_delay_headers(up, client):
    up.add("/late", b"x", delay_headers=0.2)
    started = time.monotonic()
    resp = await client.get(up.url + "/late")
    assert time.monotonic() - started >= 0.18
    assert await resp.content() == b"x"


@pytest_twisted.ensureDeferred
async def test_stall_after_then_close_aborts(up, client):
    up.add("/stall", BODY, stall_after=500)
    got = []
    resp = await client.get(up.url + "/stall")
    done = treq.collect(resp, got.append)
    await until(lambda: len(b"".join(got)) >= 500)
    await sleep(0.1)
    assert b"".join(got) == BODY[:500]
    assert not done.called
    assert up.in_flight("/stall") == 1

    await up.close()
    with pytest.raises(ResponseFailed):
        await done


@pytest_twisted.ensureDeferred
async def test_close_cancels_pending_calls(up, client):
    up.add("/never", b"x", delay_headers=30)
    d = client.get(up.url + "/never")
    await up.wait_for("/never")
    assert up._calls
    await up.close()
    assert not up._calls
    with pytest.raises(Exception):
        await d


@pytest_twisted.ensureDeferred
async def test_hold_and_release(up, client):
    up.add("/held.bin", BODY, hold=True)
    got = []
    resp = await client.get(up.url + "/held.bin")  # headers arrive
    assert resp.code == 200
    assert resp.length == len(BODY)
    done = treq.collect(resp, got.append)
    await sleep(0.05)
    assert got == [] and not done.called

    assert up.release("/held.bin", upto=100) == 1
    await until(lambda: len(b"".join(got)) >= 100)
    await sleep(0.05)
    assert b"".join(got) == BODY[:100]
    assert not done.called

    up.release("/held.bin")
    await done
    assert b"".join(got) == BODY

    # the gate stays open for later requests until hold() closes it again
    resp = await client.get(up.url + "/held.bin")
    assert await resp.content() == BODY
    up.hold("/held.bin")
    resp = await client.get(up.url + "/held.bin")
    done = treq.content(resp)
    await sleep(0.05)
    assert not done.called
    up.release("/held.bin")
    assert await done == BODY


@pytest_twisted.ensureDeferred
async def test_redirect(up, client):
    up.add("/target.txt", b"here")
    up.add("/rel", b"", redirect=(302, "/target.txt"))
    up.add("/abs", b"", redirect=(301, up.url + "/target.txt"))
    up.redirect("/perm", "/target.txt", status=308)

    resp = await client.get(up.url + "/rel", allow_redirects=False)
    assert resp.code == 302
    assert header(resp, "location") == "/target.txt"
    await resp.content()

    for path in ("/rel", "/abs", "/perm"):
        resp = await client.get(up.url + path)
        assert resp.code == 200
        assert await resp.content() == b"here"
    assert up.count("/target.txt") == 3

    with pytest.raises(ValueError):
        up.add("/bad", b"", redirect=(200, "/x"))


@pytest_twisted.ensureDeferred
async def test_gzip_if_asked(up, client):
    up.add("/z.txt", BODY, gzip_if_asked=True)

    # treq always asks for gzip and decodes it transparently
    resp = await client.get(up.url + "/z.txt")
    assert await resp.content() == BODY
    assert "gzip" in up.requests[-1].headers["accept-encoding"]

    code, headers, body = split_response(
        await raw(up.url, b"GET", b"/z.txt", b"Accept-Encoding: gzip, deflate\r\n")
    )
    assert code == 200
    assert headers["content-encoding"] == "gzip"
    assert headers["vary"] == "Accept-Encoding"
    assert "content-length" not in headers
    assert headers["transfer-encoding"] == "chunked"

    for extra in (b"", b"Accept-Encoding: gzip;q=0\r\n", b"Accept-Encoding: br\r\n"):
        code, headers, body = split_response(await raw(up.url, b"GET", b"/z.txt", extra))
        assert code == 200
        assert "content-encoding" not in headers
        assert headers["content-length"] == str(len(BODY))
        assert body == BODY


@pytest_twisted.ensureDeferred
async def test_gzip_body_decompresses(up):
    up.add("/z.txt", BODY, gzip_if_asked=True)
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, pool=pool)  # a bare Agent does not decode
    resp = await agent.request(
        b"GET", (up.url + "/z.txt").encode(),
        Headers({b"Accept-Encoding": [b"gzip"]}),
    )
    raw_body = await treq.content(resp)
    assert raw_body != BODY
    assert gzip.decompress(raw_body) == BODY


@pytest_twisted.ensureDeferred
async def test_add_file_streams_from_disk(up, client, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    fn = tmp_path / "big.bin"
    fn.write_bytes(data)
    up.add_file("/big.bin", str(fn))
    up.add_file("/big-slow.bin", str(fn), cut_after=200000)

    resp = await client.get(up.url + "/big.bin")
    assert resp.length == len(data)
    assert header(resp, "etag") == '"%s"' % hashlib.md5(data).hexdigest()
    assert await resp.content() == data

    resp = await client.get(up.url + "/big.bin", headers={"Range": "bytes=1000000-1000099"})
    assert resp.code == 206
    assert await resp.content() == data[1000000:1000100]

    got = []
    resp = await client.get(up.url + "/big-slow.bin")
    with pytest.raises(ResponseFailed):
        await treq.collect(resp, got.append)
    assert b"".join(got) == data[:200000]


@pytest_twisted.ensureDeferred
async def test_request_log_counting_and_reset(up, client):
    up.add("/a", b"a")
    for query in ("", "?x=1", "?y=2"):
        resp = await client.get(up.url + "/a" + query, headers={"X-Test": "t"})
        await resp.content()
    resp = await client.head(up.url + "/a")
    await resp.content()

    assert up.count("/a") == 3
    assert up.count("/a", method="HEAD") == 1
    assert up.count("/a", method=None) == 4
    assert up.count("/b") == 0
    rec = up.requests[1]
    assert isinstance(rec, Recorded)
    assert rec.method == "GET" and rec.path == "/a?x=1"
    assert rec.headers["x-test"] == "t"
    assert rec.headers["host"] == up.url[len("http://"):]
    assert rec.server_name == "default"
    await up.wait_for("/a", count=3)

    waiting = up.wait_for("/a", count=4)
    assert not waiting.called
    resp = await client.get(up.url + "/a")
    await resp.content()
    assert waiting.called

    up.reset()
    assert up.requests == [] and up.count("/a") == 0
    resp = await client.get(up.url + "/a")
    assert await resp.content() == b"a"  # files survive reset()
    up.reset(files=True)
    resp = await client.get(up.url + "/a")
    assert resp.code == 404
    await resp.content()

    with pytest.raises(TypeError):
        up.add("/typo", b"", cut_afetr=3)


@pytest_twisted.ensureDeferred
async def test_control_endpoints(up, client):
    up.add("/a", b"a")
    resp = await client.get(up.url + "/a?q=1")
    await resp.content()
    resp = await client.get(up.url + "/_fake/requests")
    log = json.loads(await resp.content())
    assert [(r["method"], r["path"], r["server_name"]) for r in log] == [
        ("GET", "/a?q=1", "default")
    ]
    assert "host" in log[0]["headers"]

    resp = await client.post(
        up.url + "/_fake/add",
        data=json.dumps({"path": "/added", "data": "new", "status": 200}).encode(),
    )
    assert resp.code == 200
    await resp.content()
    resp = await client.get(up.url + "/added")
    assert await resp.content() == b"new"

    resp = await client.post(up.url + "/_fake/reset")
    await resp.content()
    assert up.requests == []


@pytest_twisted.ensureDeferred
async def test_second_origin_gets_no_authorization(up, client):
    other = FakeUpstream(name="other")
    other.listen(reactor)
    try:
        assert other.url.startswith("http://127.0.0.2:")
        other.add("/file", b"from other")
        up.add("/same", b"", redirect=(302, "/here"))
        up.add("/here", b"from main")
        up.add("/away", b"", redirect=(302, other.url + "/file"))
        auth = {"Authorization": "Bearer s3cret"}

        resp = await client.get(up.url + "/same", headers=auth)
        assert await resp.content() == b"from main"
        resp = await client.get(up.url + "/away", headers=auth)
        assert await resp.content() == b"from other"

        by_path = {r.path: r for r in up.requests}
        assert by_path["/same"].headers["authorization"] == "Bearer s3cret"
        assert by_path["/here"].headers["authorization"] == "Bearer s3cret"
        assert by_path["/away"].headers["authorization"] == "Bearer s3cret"
        [seen] = other.requests
        assert seen.server_name == "other"
        assert seen.path == "/file"
        assert "authorization" not in seen.headers
    finally:
        await other.close()


@pytest_twisted.ensureDeferred
async def test_require_auth(up, client):
    up.add("/secret", b"s", require_auth="Bearer ok")
    resp = await client.get(up.url + "/secret")
    assert resp.code == 401
    await resp.content()
    resp = await client.get(up.url + "/secret", headers={"Authorization": "Bearer ok"})
    assert await resp.content() == b"s"


@pytest_twisted.ensureDeferred
async def test_standalone_process(client, tmp_path):
    files = tmp_path / "files"
    (files / "sub").mkdir(parents=True)
    (files / "sub" / "x.tar.gz").write_bytes(BODY)
    ready = tmp_path / "ready.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.upstream", "--listen", "127.0.0.1:0",
         "--ready-file", str(ready), "--files", str(files)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        await until(lambda: ready.exists() or proc.poll() is not None, timeout=8)
        assert proc.poll() is None, proc.stderr.read().decode()
        url = json.loads(ready.read_text())["url"]
        assert url.startswith("http://127.0.0.1:")
        assert json.loads(proc.stdout.readline()) == {"url": url}

        resp = await client.get(url + "/sub/x.tar.gz", headers={"Range": "bytes=0-9"})
        assert resp.code == 206
        assert await resp.content() == BODY[:10]
        resp = await client.get(url + "/sub/x.tar.gz")
        assert await resp.content() == BODY
        resp = await client.get(url + "/../etc/passwd")
        assert resp.code == 404
        await resp.content()

        resp = await client.get(url + "/_fake/requests")
        log = json.loads(await resp.content())
        assert [r["path"] for r in log][:2] == ["/sub/x.tar.gz", "/sub/x.tar.gz"]
        assert len(log) == 3
        resp = await client.post(url + "/_fake/reset")
        await resp.content()
        resp = await client.get(url + "/_fake/requests")
        assert json.loads(await resp.content()) == []
    finally:
        proc.terminate()
        proc.wait(5)
        proc.stdout.close()
        proc.stderr.close()
