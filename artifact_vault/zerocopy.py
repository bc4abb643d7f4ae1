"""
Zero-copy sends: ``os.sendfile`` from a cached file straight into a client's
socket.

This is the one place that reaches into Twisted's TCP transport beyond its
interfaces: to know whether its own write buffer has drained (the headers go
out through it first), to send on its socket, and to have its next drain
resume a paused producer.  `check_transport_internals` names every attribute
used; `tests/test_zerocopy.py` calls it, so a Twisted upgrade that changes
them fails a test loudly instead of breaking downloads quietly.
"""

import os
import socket

from twisted.internet import tcp

SENDFILE = hasattr(os, "sendfile")
SENDFILE_CHUNK = 8 * 1024 * 1024
SEND_BUFFER = 4 * 1024 * 1024
#: Linux's TCP_CORK (None elsewhere)
CORK = getattr(socket, "TCP_CORK", None)

#: what of `twisted.internet.tcp.Server` this module uses
TRANSPORT_ATTRIBUTES = ("dataBuffer", "offset", "_tempDataLen", "producerPaused", "startWriting", "socket",
                        "fileno")


def check_transport_internals(transport) -> list[str]:
    """The attributes this module needs that `transport` lacks (empty: all is well)."""
    return [name for name in TRANSPORT_ATTRIBUTES if not hasattr(transport, name)]


class ZeroCopy:
    """
    Sends bytes of an open file on a plain TCP connection's socket, once
    Twisted's own buffer is empty.  `for_request` gives one only where it
    applies: a plain TCP server transport (not TLS, not HTTP/2) and a known
    length.
    """

    def __init__(self, transport, length: int, whole: bool = False):
        self.transport = transport
        #: TCP_CORK is set: only full segments go out until `release`
        self.corked = False
        if length > SENDFILE_CHUNK:
            try:  # fewer, larger sends for big bodies: less waking up per byte
                transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            except OSError:
                pass
            if whole and CORK is not None:
                # A body that is all there goes out in full segments, as nginx's
                # tcp_nopush does: the kernel's work per byte of a 1 GiB hit drops
                # by about a third (bench/RESULTS.md, row 1).  Not for a file still
                # being written: a partial segment would wait up to 200 ms.
                try:
                    transport.socket.setsockopt(socket.IPPROTO_TCP, CORK, 1)
                    self.corked = True
                except OSError:
                    pass

    @classmethod
    def for_request(cls, request, length: int | None, whole: bool = False):
        """`whole`: every byte of the body is on disk already (a hit)."""
        transport = getattr(request.channel, "transport", None)
        if not SENDFILE or length is None or not isinstance(transport, tcp.Server):
            return None
        return cls(transport, length, whole)

    def release(self) -> None:
        """The body is out (or given up): let the last partial segment go at once."""
        if self.corked:
            self.corked = False
            try:
                self.transport.socket.setsockopt(socket.IPPROTO_TCP, CORK, 0)
            except OSError:
                pass

    def send(self, fd: int, offset: int, count: int) -> int | None:
        """
        Bytes sent (> 0); 0 when the socket (or Twisted's buffer) is full and
        the transport will resume its producer once it drained; None at end
        of file (the file is shorter than promised).  OSError: the client is gone.
        """
        t = self.transport
        if len(t.dataBuffer) - t.offset or t._tempDataLen:
            sent = 0
        else:
            try:
                sent = os.sendfile(t.fileno(), fd, offset, min(count, SENDFILE_CHUNK))
            except BlockingIOError:
                sent = 0
            else:
                if sent == 0:
                    return None
        if sent == 0:
            # Pause until the transport drains: it resumes a paused producer after
            # it wrote everything it had.
            t.producerPaused = True
            t.startWriting()
        return sent
