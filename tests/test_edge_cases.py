"""
Edge cases found in review, each once broken: a body with no framing that is
cut, an error body that stalls, a client that leaves while the vault waits
for the hub, an access check the hub answers with neither yes nor no.
"""

import hashlib

import pytest_twisted
from twisted.internet import protocol, reactor
from twisted.web.client import ResponseDone

from artifact_vault.store import open_readers
from tests.test_core import BODY, raw_get, sleep, stream, temp_files
from tests.test_huggingface_faults import COMMIT, DATA, add_file, hub_backend, lfs_headers


class _Scripted(protocol.Protocol):
    """Answers every request with the bytes it was given, then closes or stays silent."""

    def __init__(self, answer: bytes, close: bool):
        self.answer, self.close, self.sent = answer, close, False

    def dataReceived(self, data):
        if not self.sent and b"\r\n\r\n" in data:
            self.sent = True
            self.transport.write(self.answer)
            if self.close:
                self.transport.abortConnection()


def scripted_origin(answer: bytes, close: bool):
    factory = protocol.Factory.forProtocol(lambda: _Scripted(answer, close))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return port, f"http://127.0.0.1:{port.getHost().port}"


@pytest_twisted.ensureDeferred
async def test_a_cut_body_without_length_or_chunks_is_not_kept(vault_factory, http):
    port, url = scripted_origin(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + BODY[:5000], close=True)
    try:
        v = vault_factory([{"type": "http", "name": "raw", "config": {"prefix": "/raw/", "base_url": url}}])
        response, s = await stream(http, v.url + "/raw/file.bin")
        clean = (await s.done).reason.check(ResponseDone)
        assert response.code == 502 or not clean  # an error either way, never a 200 that looks whole
        assert v.store.lookup("raw/file.bin") is None and not temp_files(v.config.cache_dir)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_error_body_that_stalls_does_not_hang_the_key(vault_factory, http):
    port, url = scripted_origin(b"HTTP/1.1 503 Busy\r\nContent-Length: 100\r\n\r\n0123456789", close=False)
    try:
        v = vault_factory([{"type": "http", "name": "raw",
                            "config": {"prefix": "/raw/", "base_url": url, "timeout": 0.5}}])
        for _ in range(2):  # and the key is free again afterwards
            r = await http.get(v.url + "/raw/file.bin")
            assert r.code == 502
        assert len(v.vault.downloads) == 0
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_while_the_hub_is_asked_leaks_nothing(vault_factory, upstream, http):
    big = hashlib.sha256(b"x").digest() * 8000  # 256 kB: served by the streamer, not in one write
    add_file(upstream, "w.bin", big, headers=lfs_headers(hashlib.sha256(big).hexdigest(), len(big)))
    v = vault_factory(hub_backend(upstream, revision_ttl=0))
    assert await (await http.get(v.url + "/huggingface/org/m/resolve/main/w.bin")).content() == big
    add_file(upstream, "w.bin", big, delay_headers=1.0,
             headers=lfs_headers(hashlib.sha256(big).hexdigest(), len(big)))
    d = http.get(v.url + "/huggingface/org/m/resolve/main/w.bin")
    await sleep(0.3)
    d.cancel()  # the client gives up while the vault waits for the hub's HEAD
    try:
        await d
    except Exception:  # noqa: BLE001 - the cancellation itself
        pass
    await sleep(1.5)
    assert not open_readers()


@pytest_twisted.ensureDeferred
async def test_an_access_check_answered_400_is_passed_on(vault_factory, upstream, http):
    add_file(upstream, "w.bin", DATA, headers=lfs_headers())
    v = vault_factory(hub_backend(upstream, access_ttl=0, revision_ttl=3600))
    assert await (await http.get(v.url + f"/huggingface/org/m/resolve/{COMMIT}/w.bin")).content() == DATA
    upstream.add(f"/org/m/resolve/{COMMIT}/w.bin", b"bad", status=400)
    status, _, _ = await raw_get(v.url, f"/huggingface/org/m/resolve/{COMMIT}/w.bin",
                                 headers={"Authorization": "Bearer someone-else"})
    assert status == 400
