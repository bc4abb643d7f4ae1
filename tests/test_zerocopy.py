"""
The zero-copy path (`artifact_vault.zerocopy`) reaches into Twisted's TCP
transport: these tests fail loudly when a Twisted upgrade changes what it
uses, instead of letting big hits break or slow down quietly.
"""

import os
import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol

from artifact_vault import zerocopy
from tests.test_core import BODY, backend


@pytest_twisted.ensureDeferred
async def test_twisted_tcp_server_transports_still_have_what_zero_copy_uses():
    connected = Deferred()

    class Catch(Protocol):
        def connectionMade(self):
            connected.callback(self.transport)

    port = reactor.listenTCP(0, Factory.forProtocol(Catch), interface="127.0.0.1")
    try:
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol())
        transport = await connected
        assert zerocopy.check_transport_internals(transport) == [], (
            "twisted.internet.tcp.Server changed: artifact_vault/zerocopy.py needs updating")
        assert isinstance(transport.dataBuffer, (bytes, bytearray, memoryview)) and isinstance(transport.offset, int)
        client.transport.loseConnection()
        transport.loseConnection()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_big_hit_goes_out_with_sendfile(vault_factory, upstream, http, monkeypatch):
    calls = []
    real = os.sendfile

    def counting(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(zerocopy.os, "sendfile", counting)
    upstream.add("/big.bin", BODY)
    v = vault_factory(backend(upstream))
    assert await (await http.get(v.url + "/files/big.bin")).content() == BODY  # the miss
    calls.clear()
    assert await (await http.get(v.url + "/files/big.bin")).content() == BODY  # the hit
    assert calls, "the hit did not use sendfile"


@pytest_twisted.ensureDeferred
async def test_a_big_hit_goes_out_corked_and_the_socket_is_uncorked_after_it(vault_factory, upstream, http,
                                                                             monkeypatch):
    """
    A hit bigger than one sendfile call goes out in full TCP segments (TCP_CORK set
    on the client's socket while sendfile runs), and the cork is taken off when the
    body is out, or a keep-alive connection's next small answer could wait 200 ms.
    """
    if zerocopy.CORK is None:
        pytest.skip("TCP_CORK is Linux's")
    big = os.urandom(zerocopy.SENDFILE_CHUNK + 12345)
    seen, released = [], []
    real_send, real_release = zerocopy.ZeroCopy.send, zerocopy.ZeroCopy.release

    def send(self, *args):
        seen.append(self.transport.socket.getsockopt(socket.IPPROTO_TCP, zerocopy.CORK))
        return real_send(self, *args)

    def release(self):
        real_release(self)
        released.append(self.transport.socket.getsockopt(socket.IPPROTO_TCP, zerocopy.CORK))

    monkeypatch.setattr(zerocopy.ZeroCopy, "send", send)
    monkeypatch.setattr(zerocopy.ZeroCopy, "release", release)
    upstream.add("/big.bin", big)
    v = vault_factory(backend(upstream))
    assert await (await http.get(v.url + "/files/big.bin")).content() == big  # the miss: streamed while written
    assert seen and set(seen) == {0}, "a body still being written must not be corked"
    seen.clear()
    released.clear()
    assert await (await http.get(v.url + "/files/big.bin")).content() == big  # the hit
    assert seen and set(seen) == {1}, seen
    assert released == [0]
