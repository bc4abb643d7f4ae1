"""
The shared machinery through the generic `http` backend, in-process, over
real sockets: a FakeUpstream origin, the vault, and treq / raw sockets as
clients.
"""

import gzip
import hashlib
import http.client
import json
import os
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.client import ResponseDone

from artifact_vault import fetch

BODY = hashlib.sha256(b"seed").digest() * 40000  # 1.28 MB, not compressible by accident
SMALL = b'{"architectures": ["BertModel"], "hidden_size": 384}\n'


def sleep(seconds):
    return deferLater(reactor, seconds, lambda: None)


async def until(predicate, timeout=5.0):
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await sleep(0.01)
    raise AssertionError("condition not met in time")


def backend(upstream, **config):
    return [{"type": "http", "name": "files", "config": {"prefix": "/files/", "base_url": upstream.url, **config}}]


def temp_files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".vault-tmp")]


class Stream(Protocol):
    """Collects a response body as it arrives; `done` fires with the reason."""

    def __init__(self):
        self.data = bytearray()
        self.done = Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.reason = reason
        self.done.callback(self)


async def stream(http, url, headers=None):
    response = await http.get(url, headers=headers, unbuffered=True)
    s = Stream()
    response.deliverBody(s)
    return response, s


def raw_get(url, path, method="GET", headers=None):
    """A request with the path exactly as given (no client normalisation)."""
    host, port = url.split("//")[1].split(":")

    def run():
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        body = r.read()
        conn.close()
        return r.status, dict(r.getheaders()), body

    return deferToThread(run)


# -- hits and misses ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_miss_then_hit_serves_identical_bytes_with_one_upstream_get(vault_factory, upstream, http, logged):
    upstream.add("/pkg/model.bin", BODY)
    v = vault_factory(backend(upstream))
    r1 = await http.get(v.url + "/files/pkg/model.bin")
    assert r1.code == 200
    assert await r1.content() == BODY
    r2 = await http.get(v.url + "/files/pkg/model.bin")
    assert r2.code == 200
    assert await r2.content() == BODY
    assert upstream.count("/pkg/model.bin") == 1
    assert r2.length == len(BODY)  # Twisted's client moves Content-Length into .length
    assert r2.headers.getRawHeaders("content-type") == ["application/octet-stream"]
    assert r2.headers.getRawHeaders("etag") == r1.headers.getRawHeaders("etag") != None  # noqa: E711
    assert r2.headers.getRawHeaders("last-modified")
    assert "Cache hit for files/pkg/model.bin" in logged.text()
    assert f"Caching {len(BODY)} bytes for files/pkg/model.bin" in logged.text()
    entry = v.store.lookup("files/pkg/model.bin")
    assert entry.meta["sha256"] == hashlib.sha256(BODY).hexdigest()
    assert entry.meta["upstream_url"] == upstream.url + "/pkg/model.bin"
    assert {"size", "content_type", "etag", "last_modified", "fetched_at"} <= set(entry.meta)


@pytest_twisted.ensureDeferred
async def test_head_on_hit_has_length_and_no_body(vault_factory, upstream, http):
    upstream.add("/a.txt", SMALL)
    v = vault_factory(backend(upstream))
    await (await http.get(v.url + "/files/a.txt")).content()
    status, headers, body = await raw_get(v.url, "/files/a.txt", method="HEAD")
    assert status == 200
    assert headers["Content-Length"] == str(len(SMALL))
    assert body == b""
    assert upstream.count("/a.txt", method=None) == 1


@pytest_twisted.ensureDeferred
async def test_conditional_requests_give_304(vault_factory, upstream, http):
    upstream.add("/a.txt", SMALL)
    v = vault_factory(backend(upstream))
    r = await http.get(v.url + "/files/a.txt")
    await r.content()
    etag = r.headers.getRawHeaders("etag")[0]
    lm = r.headers.getRawHeaders("last-modified")[0]
    r = await http.get(v.url + "/files/a.txt", headers={"If-None-Match": etag})
    assert r.code == 304 and await r.content() == b""
    r = await http.get(v.url + "/files/a.txt", headers={"If-Modified-Since": lm})
    assert r.code == 304
    r = await http.get(v.url + "/files/a.txt", headers={"If-None-Match": '"other"'})
    assert r.code == 200 and await r.content() == SMALL


# -- one download, every client streams ----------------------------------------


@pytest_twisted.ensureDeferred
async def test_concurrent_clients_share_one_upstream_get(vault_factory, upstream, http):
    upstream.add("/big.bin", BODY, throttle=(64 * 1024, 0.01))
    v = vault_factory(backend(upstream))
    from twisted.internet.defer import gatherResults

    async def one():
        r = await http.get(v.url + "/files/big.bin")
        return r.code, await r.content()

    results = await gatherResults([Deferred.fromCoroutine(one()) for _ in range(20)])
    assert upstream.count("/big.bin") == 1
    assert all(code == 200 and body == BODY for code, body in results)


@pytest_twisted.ensureDeferred
async def test_first_bytes_reach_client_before_upstream_finishes(vault_factory, upstream, http):
    upstream.add("/held.bin", BODY, hold=True)
    v = vault_factory(backend(upstream))
    response, s = await stream(http, v.url + "/files/held.bin")
    assert response.code == 200
    upstream.release("/held.bin", upto=100_000)
    await until(lambda: len(s.data) >= 100_000)
    assert not s.done.called  # upstream still holds the rest
    upstream.release("/held.bin")
    reason = (await s.done).reason
    assert reason.check(ResponseDone)
    assert bytes(s.data) == BODY


@pytest_twisted.ensureDeferred
async def test_late_joiner_gets_the_whole_body(vault_factory, upstream, http, logged):
    upstream.add("/held.bin", BODY, hold=True)
    v = vault_factory(backend(upstream))
    _, first = await stream(http, v.url + "/files/held.bin")
    upstream.release("/held.bin", upto=len(BODY) // 2)
    await until(lambda: len(first.data) >= len(BODY) // 2)
    _, late = await stream(http, v.url + "/files/held.bin")
    await until(lambda: len(late.data) >= len(BODY) // 2)
    upstream.release("/held.bin")
    await first.done
    await late.done
    assert bytes(first.data) == BODY and bytes(late.data) == BODY
    assert upstream.count("/held.bin") == 1
    assert "Joining the download of files/held.bin" in logged.text()


@pytest_twisted.ensureDeferred
async def test_client_that_leaves_does_not_stop_the_download(vault_factory, upstream, http):
    upstream.add("/held.bin", BODY, hold=True)
    v = vault_factory(backend(upstream))
    response, s = await stream(http, v.url + "/files/held.bin")
    upstream.release("/held.bin", upto=50_000)
    await until(lambda: len(s.data) >= 50_000)
    s.transport.stopProducing()  # the client goes away
    await s.done
    upstream.release("/held.bin")
    await until(lambda: v.store.lookup("files/held.bin") is not None)
    r = await http.get(v.url + "/files/held.bin")
    assert await r.content() == BODY
    assert upstream.count("/held.bin") == 1


@pytest_twisted.ensureDeferred
async def test_range_on_a_file_in_flight(vault_factory, upstream, http):
    upstream.add("/held.bin", BODY, hold=True)
    v = vault_factory(backend(upstream))
    _, whole = await stream(http, v.url + "/files/held.bin")
    response, part = await stream(http, v.url + "/files/held.bin", headers={"Range": "bytes=1000000-1000099"})
    assert response.code == 206
    assert response.headers.getRawHeaders("content-range") == [f"bytes 1000000-1000099/{len(BODY)}"]
    upstream.release("/held.bin", upto=500_000)
    await sleep(0.1)
    assert len(part.data) == 0  # the range is not on disk yet
    upstream.release("/held.bin")
    await part.done
    assert bytes(part.data) == BODY[1000000:1000100]
    await whole.done
    assert upstream.count("/held.bin") == 1


# -- Range on a hit -------------------------------------------------------------


@pytest.mark.parametrize(
    "header, status, content_range, piece",
    [
        ("bytes=0-9", 206, "bytes 0-9/{n}", slice(0, 10)),
        ("bytes=20-", 206, "bytes 20-{last}/{n}", slice(20, None)),
        ("bytes=-5", 206, "bytes {m5}-{last}/{n}", slice(-5, None)),
        ("bytes=-999999999", 206, "bytes 0-{last}/{n}", slice(None)),  # longer suffix: the whole file
        ("bytes=10-999999999", 206, "bytes 10-{last}/{n}", slice(10, None)),
        ("bytes=999999999-", 416, "bytes */{n}", None),
        ("bytes=-0", 416, "bytes */{n}", None),
        ("bytes=0-1,5-6", 200, None, slice(None)),  # multi-range: whole body
        ("bytes=9-2", 200, None, slice(None)),  # invalid: ignored
        ("items=0-5", 200, None, slice(None)),
    ],
)
@pytest_twisted.ensureDeferred
async def test_range_on_a_hit(vault_factory, upstream, http, header, status, content_range, piece):
    upstream.add("/c.json", SMALL)
    v = vault_factory(backend(upstream))
    await (await http.get(v.url + "/files/c.json")).content()
    r = await http.get(v.url + "/files/c.json", headers={"Range": header})
    assert r.code == status
    n = len(SMALL)
    if content_range:
        assert r.headers.getRawHeaders("content-range") == [content_range.format(n=n, last=n - 1, m5=n - 5)]
    body = await r.content()
    if piece is not None:
        assert body == SMALL[piece]
        assert r.length == len(SMALL[piece])
    assert upstream.count("/c.json") == 1


@pytest_twisted.ensureDeferred
async def test_if_range_mismatch_serves_whole_file(vault_factory, upstream, http):
    upstream.add("/c.json", SMALL)
    v = vault_factory(backend(upstream))
    await (await http.get(v.url + "/files/c.json")).content()
    r = await http.get(v.url + "/files/c.json", headers={"Range": "bytes=0-3", "If-Range": '"stale"'})
    assert r.code == 200 and await r.content() == SMALL


# -- failures -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_mid_body_failure_aborts_clients_caches_nothing_and_retry_succeeds(vault_factory, upstream, http):
    upstream.add("/cut.bin", BODY, cut_after=300_000, hold=True)
    v = vault_factory(backend(upstream))
    response, s = await stream(http, v.url + "/files/cut.bin")
    response2, s2 = await stream(http, v.url + "/files/cut.bin")
    assert response.code == 200
    upstream.release("/cut.bin")
    for reason in ((await s.done).reason, (await s2.done).reason):
        assert not reason.check(ResponseDone)  # an error, never a clean end
    assert len(s.data) < len(BODY)
    assert v.store.lookup("files/cut.bin") is None
    await until(lambda: not temp_files(v.config.cache_dir))
    upstream.add("/cut.bin", BODY)
    r = await http.get(v.url + "/files/cut.bin")
    assert await r.content() == BODY
    assert upstream.count("/cut.bin") == 2  # one failed GET shared by both clients, one retry


@pytest_twisted.ensureDeferred
async def test_chunked_body_cut_is_an_error_too(vault_factory, upstream, http):
    upstream.add("/cut.bin", BODY, cut_after=200_000, chunked=True)
    v = vault_factory(backend(upstream))
    response, s = await stream(http, v.url + "/files/cut.bin")
    reason = (await s.done).reason
    assert not reason.check(ResponseDone)
    assert v.store.lookup("files/cut.bin") is None


@pytest.mark.parametrize("up_status, status", [(404, 404), (410, 410), (401, 401), (403, 403),
                                               (500, 502), (503, 502)])
@pytest_twisted.ensureDeferred
async def test_upstream_error_statuses(vault_factory, upstream, http, up_status, status):
    upstream.add("/e", b"nope", status=up_status)
    v = vault_factory(backend(upstream))
    r = await http.get(v.url + "/files/e")
    assert r.code == status
    text = (await r.content()).decode()
    assert upstream.url + "/e" in text
    assert "Traceback" not in text
    assert v.store.lookup("files/e") is None


@pytest_twisted.ensureDeferred
async def test_refused_upstream_is_502(vault_factory, http):
    from twisted.internet.protocol import Factory

    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    await port.stopListening()
    v = vault_factory([{"type": "http", "name": "files", "config": {"prefix": "/files/", "base_url": url}}])
    r = await http.get(v.url + "/files/x")
    assert r.code == 502
    assert url in (await r.content()).decode()


@pytest_twisted.ensureDeferred
async def test_upstream_that_never_answers_is_504(vault_factory, upstream, http):
    upstream.add("/slow", BODY, delay_headers=30)
    v = vault_factory(backend(upstream, timeout=0.5))
    r = await http.get(v.url + "/files/slow")
    assert r.code == 504


@pytest_twisted.ensureDeferred
async def test_stalled_body_is_aborted_after_timeout(vault_factory, upstream, http):
    upstream.add("/stall", BODY, stall_after=10_000)
    v = vault_factory(backend(upstream, timeout=0.5))
    response, s = await stream(http, v.url + "/files/stall")
    reason = (await s.done).reason
    assert not reason.check(ResponseDone)
    assert v.store.lookup("files/stall") is None


@pytest_twisted.ensureDeferred
async def test_timeout_bounds_silence_not_the_whole_transfer(vault_factory, upstream, http):
    # 1.28 MB in 64 KiB pieces every 0.1 s: about 2 s in all, never silent for 0.5 s.
    upstream.add("/trickle", BODY, throttle=(64 * 1024, 0.1))
    v = vault_factory(backend(upstream, timeout=0.5))
    r = await http.get(v.url + "/files/trickle")
    assert r.code == 200 and await r.content() == BODY


@pytest_twisted.ensureDeferred
async def test_progress_is_logged_for_long_downloads(vault_factory, upstream, http, logged, monkeypatch):
    monkeypatch.setattr(fetch, "PROGRESS_EVERY", 0.2)
    upstream.add("/trickle", BODY, throttle=(64 * 1024, 0.05))
    v = vault_factory(backend(upstream))
    await (await http.get(v.url + "/files/trickle")).content()
    lines = [m for m in logged.messages() if m.startswith("Downloading files/trickle")]
    assert lines and "%" in lines[0] and "MB/s" in lines[0]


# -- redirects ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_redirect_chain_is_followed_and_logged(vault_factory, upstream, http, logged):
    upstream.add("/final.bin", SMALL)
    upstream.redirect("/r3", "/final.bin", 308)
    upstream.redirect("/r2", upstream.url + "/r3", 307)
    upstream.redirect("/r1", "/r2", 301)
    v = vault_factory(backend(upstream))
    r = await http.get(v.url + "/files/r1")
    assert r.code == 200 and await r.content() == SMALL
    assert f"Following redirect from {upstream.url}/r1 to {upstream.url}/r2" in logged.text()
    assert f"Following redirect from {upstream.url}/r3 to {upstream.url}/final.bin" in logged.text()


@pytest_twisted.ensureDeferred
async def test_redirect_loop_is_502_naming_the_loop(vault_factory, upstream, http):
    upstream.redirect("/loop-a", "/loop-b")
    upstream.redirect("/loop-b", "/loop-a")
    v = vault_factory(backend(upstream, max_redirects=3))
    r = await http.get(v.url + "/files/loop-a")
    assert r.code == 502
    assert "redirect" in (await r.content()).decode()
    assert upstream.count("/loop-a") + upstream.count("/loop-b") == 4


@pytest_twisted.ensureDeferred
async def test_credentials_are_dropped_on_a_hop_to_another_origin(vault_factory, upstream, other_origin, http):
    other_origin.add("/blob", BODY)
    upstream.add("/same", SMALL)
    upstream.redirect("/to-other", other_origin.url + "/blob")
    upstream.redirect("/to-same", "/same")
    v = vault_factory(backend(upstream, headers={"Authorization": "Bearer s3cret", "X-Api-Key": "k3y"}))
    assert await (await http.get(v.url + "/files/to-other")).content() == BODY
    assert await (await http.get(v.url + "/files/to-same")).content() == SMALL
    first = [r for r in upstream.requests if r.path == "/to-other"][0]
    assert first.headers["authorization"] == "Bearer s3cret" and first.headers["x-api-key"] == "k3y"
    hop = [r for r in other_origin.requests if r.path == "/blob"][0]
    assert "authorization" not in hop.headers and "x-api-key" not in hop.headers
    same = [r for r in upstream.requests if r.path == "/same"][0]
    assert same.headers["authorization"] == "Bearer s3cret"


@pytest_twisted.ensureDeferred
async def test_vault_asks_for_identity_and_stores_the_plain_bytes(vault_factory, upstream, http):
    upstream.add("/text.json", SMALL * 100, gzip_if_asked=True)
    v = vault_factory(backend(upstream))
    r = await http.get(v.url + "/files/text.json")  # treq itself asks for gzip
    assert await r.content() == SMALL * 100
    assert upstream.requests[0].headers["accept-encoding"] == "identity"
    with open(v.store.lookup("files/text.json").path, "rb") as f:
        assert f.read() == SMALL * 100
    assert gzip.compress(b"") != b""  # gzip is importable: the fake really could compress


# -- requests the vault refuses ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_methods_other_than_get_and_head_get_405_with_allow(vault_factory, upstream, http):
    v = vault_factory(backend(upstream))
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        r = await http.request(method, v.url + "/files/a.txt", data=b"x")
        assert r.code == 405
        assert r.headers.getRawHeaders("allow") == ["GET, HEAD"]
    assert upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_unknown_prefix_is_404_and_health_is_json(vault_factory, upstream, http):
    v = vault_factory(backend(upstream))
    r = await http.get(v.url + "/nothing/here")
    assert r.code == 404
    r = await http.get(v.url + "/_vault/health")
    assert r.code == 200
    doc = json.loads(await r.content())
    assert doc["status"] == "ok" and doc["backends"][0]["prefix"] == "/files/"


TRAVERSALS = [
    "/files/../../etc/passwd",
    "/files/a/../../../etc/passwd",
    "/files/%2e%2e/%2e%2e/etc/passwd",
    "/files/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "/files/a%2fb",
    "/files/a%5c..%5cb",
    "/files/a\\..\\b",
    "/files/%252e%252e/x",
    "/files/a/%00b",
    "/files//etc/passwd",
    "/files/" + "x" * 300,
    "/files/a/./b",
    "/files/x.vault-meta",
    "/files/x.abc.vault-tmp",
    "/files/%ff%fe",
]


@pytest.mark.parametrize("path", TRAVERSALS)
@pytest_twisted.ensureDeferred
async def test_paths_that_would_leave_the_cache_are_refused(vault_factory, upstream, path, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    v = vault_factory(backend(upstream))
    status, _, body = await raw_get(v.url, path)
    assert 400 <= status < 500
    assert b"top secret" not in body
    assert upstream.requests == []
    outside = {p for p in tmp_path.rglob("*") if not str(p).startswith(v.config.cache_dir)}
    assert outside == {secret}


# -- start-up -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_leftover_temp_files_are_swept_at_start(vault_factory, upstream, tmp_path):
    folder = tmp_path / "cache" / "files" / "a"
    folder.mkdir(parents=True)
    (folder / "b.bin.0123abcd.vault-tmp").write_bytes(b"half a file")
    vault_factory(backend(upstream))
    assert not (folder / "b.bin.0123abcd.vault-tmp").exists()


@pytest_twisted.ensureDeferred
async def test_trailing_slash_and_query_are_forwarded_uncached(vault_factory, upstream, http):
    upstream.add("/dir/", b"<html>listing</html>", content_type="text/html")
    upstream.add("/q", b"answer")
    v = vault_factory(backend(upstream))
    for _ in range(2):
        r = await http.get(v.url + "/files/dir/")
        assert r.code == 200 and await r.content() == b"<html>listing</html>"
        r = await http.get(v.url + "/files/q?x=1")
        assert await r.content() == b"answer"
    assert upstream.count("/dir/") == 2 and upstream.count("/q") == 2
    assert v.store.lookup("files/q") is None


@pytest_twisted.ensureDeferred
async def test_access_tokens_gate_every_client(vault_factory, upstream, http):
    upstream.add("/a.txt", SMALL)
    v = vault_factory(backend(upstream, headers={"Authorization": "Bearer upstream-secret"}),
                      access_tokens=["vault-token-1", "vault-token-2"])
    r = await http.get(v.url + "/files/a.txt")
    assert r.code == 401 and r.headers.getRawHeaders("www-authenticate")
    r = await http.get(v.url + "/files/a.txt", headers={"Authorization": "Bearer wrong-token"})
    assert r.code == 401
    assert upstream.requests == []
    r = await http.get(v.url + "/files/a.txt", headers={"X-Vault-Token": "vault-token-2"})
    assert r.code == 200 and await r.content() == SMALL
    r = await http.get(v.url + "/files/a.txt", headers={"Authorization": "Bearer vault-token-1"})
    assert r.code == 200 and await r.content() == SMALL
    assert (await http.get(v.url + "/_vault/health")).code == 200  # probes need no token
    # the vault's own tokens never travel upstream
    assert all("vault-token" not in " ".join(r.headers.values()) for r in upstream.requests)


@pytest_twisted.ensureDeferred
async def test_an_access_token_as_the_password_of_basic_auth(vault_factory, upstream, http):
    """What docker, podman, containerd and pip send for a ``user:token`` login."""
    import base64

    upstream.add("/a.txt", SMALL)
    v = vault_factory(backend(upstream), access_tokens=["vault-token-1"])
    for user in ("me", "", "__token__"):
        basic = "Basic " + base64.b64encode(f"{user}:vault-token-1".encode()).decode()
        r = await http.get(v.url + "/files/a.txt", headers={"Authorization": basic})
        assert r.code == 200 and await r.content() == SMALL
    for wrong in (b"me:vault-token-2", b"vault-token-1", b"vault-token-1:"):
        r = await http.get(v.url + "/files/a.txt", headers={"Authorization": "Basic " + base64.b64encode(wrong).decode()})
        assert r.code == 401, wrong
    r = await http.get(v.url + "/files/a.txt", headers={"Authorization": "Basic %%%not-base64"})
    assert r.code == 401
    assert all("authorization" not in {k.lower() for k in r.headers} for r in upstream.requests)


@pytest_twisted.ensureDeferred
async def test_a_tls_client_hello_on_the_plain_port_gets_an_answer_at_once(vault_factory, upstream):
    """
    Clients told that a server is insecure (skopeo --tls-verify=false, docker's
    insecure-registries) try HTTPS first and fall back on an error: a server
    that stays silent costs each of them its handshake timeout (10 s).
    """
    import socket
    import ssl

    upstream.add("/a.txt", SMALL)
    v = vault_factory(backend(upstream))
    port = int(v.url.rsplit(":", 1)[1])

    def handshake():
        started = time.monotonic()
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            try:
                context.wrap_socket(sock, server_hostname="127.0.0.1")
            except ssl.SSLError as e:
                failed = e
            else:
                failed = None
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64)
            answer = sock.recv(4096)
        return failed, answer, time.monotonic() - started

    failed, answer, took = await deferToThread(handshake)
    assert failed is not None and took < 2
    assert answer.startswith(b"HTTP/1.0 400 Bad Request\r\n")
    status, _, body = await raw_get(v.url, "/files/a.txt")
    assert (status, body) == (200, SMALL)  # plain HTTP as before


@pytest_twisted.ensureDeferred
async def test_a_file_larger_than_the_free_space_is_507_and_nothing_is_written(vault_factory, upstream, http,
                                                                                 monkeypatch):
    upstream.add("/small.txt", SMALL)
    upstream.add("/big.bin", BODY)
    v = vault_factory(backend(upstream))
    small = await http.get(v.url + "/files/small.txt")
    assert small.code == 200 and await small.content()
    monkeypatch.setattr(v.store, "free_space", lambda key: len(BODY) - 1)
    r = await http.get(v.url + "/files/big.bin")
    assert r.code == 507 and "space" in (await r.content()).decode()
    assert not temp_files(v.config.cache_dir) and v.store.lookup("files/big.bin") is None
    r = await http.get(v.url + "/files/small.txt")  # hits are still served
    assert r.code == 200 and await r.content() == SMALL


@pytest_twisted.ensureDeferred
async def test_forwarded_answers_stream_through_at_any_size(vault_factory, upstream, http):
    upstream.add("/dl.bin", BODY, hold=True)
    upstream.add("/cut.bin", BODY, cut_after=100_000)
    v = vault_factory(backend(upstream))
    response, s = await stream(http, v.url + "/files/dl.bin?download=1")
    assert response.code == 200 and response.length == len(BODY)
    upstream.release("/dl.bin", upto=200_000)
    await until(lambda: len(s.data) >= 200_000)  # bytes flow before upstream has finished
    upstream.release("/dl.bin")
    assert (await s.done).reason.check(ResponseDone) and bytes(s.data) == BODY
    response, s = await stream(http, v.url + "/files/cut.bin?x=1")
    assert not (await s.done).reason.check(ResponseDone)  # a cut upstream is a cut for the client
    assert v.store.lookup("files/dl.bin") is None and v.store.lookup("files/cut.bin") is None
