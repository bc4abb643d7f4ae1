"""
Core pieces the apt backend brought, tested without it:

* `freshness.KeptFiles` / `Backend.serve_kept_file`: a mutable file of any
  size kept on disk with its validators, served for a TTL, revalidated by a
  conditional GET that runs as the key's one download (304 renews, 200
  replaces while streaming), served stale when upstream fails;
* absolute-form request lines (a client using the vault as its HTTP proxy):
  `site.ProxyTarget`, `site.ProxyRouter` and the root's rules (403 for any
  URL no backend offers, CONNECT refused, a URL of the vault itself served
  normally), and access tokens in ``Proxy-Authorization`` / Basic.

The kept-file tests turn the generic http backend's files into mutable ones
(`volatile`), so that the flow is exercised exactly as a backend uses it.
"""

import base64
import hashlib
import socket

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults
from twisted.internet.threads import deferToThread
from twisted.web.client import ResponseDone

from artifact_vault.site import ProxyRouter, ProxyTarget
from tests.test_core import backend, raw_get, sleep, stream, temp_files, until

BIG = hashlib.sha256(b"kept").digest() * 200_000  # 6.4 MB


def volatile(vault, ttl, wait=1.0):
    """Make the vault's http backend serve every file as a kept mutable file."""
    files = vault.vault.backends[0]

    def handle(request, subpath):
        files.check_method(request)
        name = subpath.decode()
        spec = files.download_spec(f"files/{name}", f"{files.config.base_url}/{name}", label=name)
        return files.serve_kept_file(request, spec, ttl=ttl, wait=wait)

    files.handle = handle
    return files


def gets(upstream, path):
    return [r for r in upstream.requests if r.method == "GET" and r.path == path]


@pytest_twisted.ensureDeferred
async def test_kept_within_ttl_then_revalidated_with_its_validators(vault_factory, upstream, http):
    upstream.add("/index", b"one\n" * 1000)
    vault = vault_factory(backend(upstream))
    volatile(vault, ttl=0.3)
    status, headers, body = await raw_get(vault.url, "/files/index", headers={"Cache-Control": "max-age=0"})
    headers = {k.lower(): v for k, v in headers.items()}
    assert status == 200 and body == b"one\n" * 1000
    assert (await raw_get(vault.url, "/files/index"))[2] == body
    assert len(gets(upstream, "/index")) == 1  # within the TTL: the kept copy, whatever the client asks
    assert (await raw_get(vault.url, "/files/index", headers={"If-None-Match": headers["etag"]}))[0] == 304
    await sleep(0.35)
    assert (await raw_get(vault.url, "/files/index"))[2] == body
    again = gets(upstream, "/index")
    assert len(again) == 2 and again[1].headers["if-none-match"] == headers["etag"]
    assert again[1].headers["if-modified-since"] == headers["last-modified"]
    # the 304 renewed the copy: another TTL without asking
    assert (await raw_get(vault.url, "/files/index"))[2] == body
    assert len(gets(upstream, "/index")) == 2


@pytest_twisted.ensureDeferred
async def test_a_new_version_streams_to_every_waiting_client_and_replaces_the_copy(vault_factory, upstream, http):
    upstream.add("/big", b"old")
    vault = vault_factory(backend(upstream))
    volatile(vault, ttl=0.2)
    assert (await raw_get(vault.url, "/files/big"))[2] == b"old"
    old_path = vault.store.lookup("files/big").path
    upstream.add("/big", BIG, hold=True)
    await sleep(0.25)
    streams = [await stream(http, vault.url + "/files/big") for _ in range(5)]
    upstream.release("/big", upto=1_000_000)
    await until(lambda: all(len(s.data) >= 1_000_000 for _, s in streams))  # streamed while written
    assert vault.store.lookup("files/big").size == 3  # the old copy stays until the new one is complete
    upstream.release("/big")
    for response, s in streams:
        assert response.code == 200 and (await s.done).reason.check(ResponseDone)
        assert bytes(s.data) == BIG
    assert len(gets(upstream, "/big")) == 2  # one for all five
    entry = vault.store.lookup("files/big")
    assert entry.size == len(BIG) and entry.path == old_path
    assert not temp_files(vault.config.cache_dir)


@pytest.mark.parametrize("failure", ["503", "refused", "slow"])
@pytest_twisted.ensureDeferred
async def test_the_kept_copy_answers_when_upstream_fails(vault_factory, upstream, http, logged, failure):
    upstream.add("/index", b"kept copy")
    vault = vault_factory(backend(upstream))
    files = volatile(vault, ttl=0.1, wait=0.5)
    assert (await raw_get(vault.url, "/files/index"))[2] == b"kept copy"
    if failure == "503":
        upstream.add("/index", b"maintenance", status=503)
    elif failure == "refused":
        await upstream.close()
    else:
        upstream.add("/index", b"new", delay_headers=3)
    await sleep(0.15)
    status, _, body = await raw_get(vault.url, "/files/index")
    assert (status, body) == (200, b"kept copy")
    assert "Answering index from the cache" in logged.text()
    assert files.health.is_down()  # judged on the vault's own request: the next ones do not wait
    status, _, body = await raw_get(vault.url, "/files/index")
    assert (status, body) == (200, b"kept copy")


@pytest_twisted.ensureDeferred
async def test_without_a_kept_copy_upstream_errors_pass_and_nothing_is_kept(vault_factory, upstream, http):
    upstream.add("/down", b"maintenance", status=503)
    upstream.add("/missing", b"no", status=404)
    vault = vault_factory(backend(upstream))
    volatile(vault, ttl=10)
    assert (await raw_get(vault.url, "/files/down"))[0] == 502
    assert (await raw_get(vault.url, "/files/missing"))[0] == 404
    assert vault.store.lookup("files/down") is None and vault.store.lookup("files/missing") is None


@pytest_twisted.ensureDeferred
async def test_a_file_gone_upstream_is_removed(vault_factory, upstream, http):
    upstream.add("/index", b"here")
    vault = vault_factory(backend(upstream))
    volatile(vault, ttl=0.1)
    assert (await raw_get(vault.url, "/files/index"))[2] == b"here"
    upstream.add("/index", b"gone", status=404)
    await sleep(0.15)
    assert (await raw_get(vault.url, "/files/index"))[0] == 404
    assert vault.store.lookup("files/index") is None


@pytest_twisted.ensureDeferred
async def test_a_second_process_follows_the_replacement(vault_factory, upstream, http):
    upstream.add("/index", b"old")
    a = vault_factory(backend(upstream))
    b = vault_factory(backend(upstream))
    volatile(a, ttl=0.1)
    volatile(b, ttl=0.1)
    assert (await raw_get(a.url, "/files/index"))[2] == b"old"
    upstream.add("/index", BIG, hold=True)
    await sleep(0.15)
    _, from_a = await stream(http, a.url + "/files/index")
    upstream.release("/index", upto=500_000)
    await until(lambda: len(from_a.data) >= 500_000)
    _, from_b = await stream(http, b.url + "/files/index")  # b follows a's download of the new version
    upstream.release("/index")
    for s in (from_a, from_b):
        assert (await s.done).reason.check(ResponseDone)
        assert bytes(s.data) == BIG
    assert len(gets(upstream, "/index")) == 2


# -- absolute-form requests --------------------------------------------------------------------


def test_proxy_target_parsing():
    t = ProxyTarget.parse(b"HTTP://Deb.Example.ORG./debian/dists/x?y=1")
    assert (t.scheme, t.host, t.port, t.path, t.authority) == ("http", "deb.example.org", 80,
                                                                b"/debian/dists/x?y=1", "deb.example.org")
    t = ProxyTarget.parse(b"https://[::1]:8443")
    assert (t.scheme, t.host, t.port, t.path, t.authority) == ("https", "::1", 8443, b"/", "[::1]:8443")
    for bad in (b"ftp://x/y", b"http://user:pw@x/y", b"http://x:99999/", b"http:///nohost", b"http://x/a b",
                b"http://x/\xff", b"http://x/#frag"):
        assert ProxyTarget.parse(bad) is None, bad


class _Backend:
    def __init__(self, *bases):
        self.bases = bases

    def proxy_bases(self):
        return self.bases


class _Request:
    def __init__(self, url):
        self.proxy_target = ProxyTarget.parse(url)
        self.path = self.proxy_target.path.split(b"?")[0]
        self.subpath = None


def test_proxy_router_matches_whole_segments_of_the_longest_base():
    debian, security, deep = _Backend("http://h.example/debian"), _Backend("http://H.example:80/debian-security"), \
        _Backend("http://h.example/debian/sub")
    router = ProxyRouter([debian, security, deep])
    cases = {
        b"http://h.example/debian/dists/x": (debian, b"dists/x"),
        b"http://h.example/debian-security/dists/x": (security, b"dists/x"),
        b"http://h.example/debian/sub/pool/a.deb": (deep, b"pool/a.deb"),
        b"http://h.example/deb%69an/dists/x": (debian, b"dists/x"),
        b"http://h.example/debian/": (debian, b""),
        b"http://h.example/debian": (None, None),
        b"http://h.example/debianx/y": (None, None),
        b"https://h.example/debian/y": (None, None),
        b"http://h.example:8080/debian/y": (None, None),
        b"http://other.example/debian/y": (None, None),
    }
    for url, (expected, subpath) in cases.items():
        request = _Request(url)
        assert router.route(request) is expected, url
        assert request.subpath == subpath, url
    assert not ProxyRouter([_Backend()])


def _raw(url, wire):
    host, port = url.split("//")[1].split(":")

    def run():
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(wire)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return data
                data += chunk

    return deferToThread(run)


@pytest_twisted.ensureDeferred
async def test_the_root_is_no_open_proxy(vault_factory, upstream, logged):
    upstream.add("/a.txt", b"hello")
    vault = vault_factory(backend(upstream))  # the http backend offers no proxy bases
    port = vault.url.rsplit(":", 1)[1]
    up = upstream.url.split("//")[1]

    async def status(target, method=b"GET", host=up.encode()):
        data = await _raw(vault.url, b"%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (
            method, target, host))
        return int(data.split(b" ", 2)[1]), data

    assert (await status(b"http://%s/a.txt" % up.encode()))[0] == 403
    assert (await status(b"http://%s/files/a.txt" % up.encode()))[0] == 403
    assert (await status(up.encode(), b"CONNECT"))[0] == 403
    assert (await status(b"gopher://x/"))[0] == 400
    # the vault's own URL in absolute form is an ordinary request (RFC 9112 3.2.2)
    code, data = await status(b"http://127.0.0.1:%s/files/a.txt" % port.encode(), host=b"whatever")
    assert code == 200 and data.endswith(b"hello")
    code, data = await status(b"http://localhost:%s/files/a.txt" % port.encode())
    assert code == 200
    assert upstream.count("/a.txt") == 1
    assert f'"GET http://{up}/a.txt HTTP/1.1" 403' in logged.text()  # the access log names the URL


@pytest_twisted.ensureDeferred
async def test_tokens_as_basic_credentials_and_proxy_authorization(vault_factory, upstream):
    upstream.add("/a.txt", b"hello")
    token = "vault-token-123"
    vault = vault_factory(backend(upstream), access_tokens=[token])

    def basic(password):
        return "Basic " + base64.b64encode(f"anyone:{password}".encode()).decode()

    assert (await raw_get(vault.url, "/files/a.txt"))[0] == 401
    assert (await raw_get(vault.url, "/files/a.txt", headers={"Authorization": basic("wrong-token")}))[0] == 401
    assert (await raw_get(vault.url, "/files/a.txt", headers={"Authorization": basic(token)}))[0] == 200
    assert (await raw_get(vault.url, "/files/a.txt", headers={"Proxy-Authorization": basic(token)}))[0] == 200
    assert (await raw_get(vault.url, "/files/a.txt", headers={"Authorization": "Basic !!"}))[0] == 401
    for r in upstream.requests:
        assert "authorization" not in r.headers and "proxy-authorization" not in r.headers
    # a proxied request without a token is asked for one the proxy way
    data = await _raw(vault.url, b"GET http://example.org/x HTTP/1.1\r\nHost: example.org\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 407") and b"Proxy-Authenticate: Basic" in data


@pytest_twisted.ensureDeferred
async def test_concurrent_revalidations_share_one_conditional_request(vault_factory, upstream, http):
    upstream.add("/index", b"same")
    vault = vault_factory(backend(upstream))
    volatile(vault, ttl=0.1)
    assert (await raw_get(vault.url, "/files/index"))[2] == b"same"
    await sleep(0.15)
    results = await gatherResults([raw_get(vault.url, "/files/index") for _ in range(8)])
    assert {r[2] for r in results} == {b"same"}
    assert len(gets(upstream, "/index")) == 2


@pytest_twisted.ensureDeferred
async def test_a_file_url_that_lands_on_a_folder_is_not_kept(vault_factory, upstream):
    """A real mirror answers pool/main/v with a redirect to pool/main/v/ and a listing: kept as the
    file pool/main/v it would block every pool/main/v/... (and the same for a kept mutable file)."""
    upstream.redirect("/pool/v", "/pool/v/", 301)
    upstream.add("/pool/v/", b"<html>listing</html>", content_type="text/html")
    upstream.add("/pool/v/a.deb", b"deb")
    vault = vault_factory(backend(upstream))
    status, headers, _ = await raw_get(vault.url, "/files/pool/v")
    assert status == 301 and headers["Location"] == "/files/pool/v/"  # the generic backend sends clients on
    assert (await raw_get(vault.url, "/files/pool/v/a.deb"))[2] == b"deb"
    volatile(vault, ttl=10)
    assert (await raw_get(vault.url, "/files/pool/v"))[0] in (301, 404)
    assert vault.store.lookup("files/pool/v") is None
