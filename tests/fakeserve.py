"""
What the fake upstreams in tests/ share as Twisted HTTP servers.

tests/upstream.py (a generic origin), tests/fakehub.py (hub + CDN),
tests/fakepypi.py (index + file host), tests/fakeregistry.py (registry,
token server, CDN) and tests/fakeapt.py (a mirror on two addresses) each
serve real sockets.  The pieces here are the ones whose logic is the same in
all of them; each fake keeps its own wire format (error bodies, header
order) and its own faults' meaning, and passes its differences in as
parameters or small subclass hooks:

- ``PushBody``: the IPushProducer side of a streamed body (paused / done,
  pumping again on resume, the end of a complete body).
- ``FileBody``: streams a byte range of a file with the cut / corrupt /
  throttle faults; the knobs are where the fakes differ (chunk size, throttle
  slices, pumping at once or from the reactor, a pause after the last slice).
- ``Handoff``, ``QuietSite``, ``owner_site``: a site that logs nothing and
  hands every request to its owner's ``_handle``.
- ``request_headers``, ``record_request``, ``reply``: the request logs and a
  plain body answer.
- ``TrackedChannel`` and ``Listening``: the ports and open connections of a
  fake, so that ``close()`` can abort them all and fire once they are gone.
- ``host_port`` and ``write_ready``: the standalone processes' HOST:PORT
  arguments and ready files.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Dict, Optional, Tuple

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.web import http, resource, server
from zope.interface import implementer

CHUNK = 256 * 1024


# ---------------------------------------------------------------------------
# streamed bodies


@implementer(IPushProducer)
class PushBody:
    """A body pushed into ``request``; subclasses write ``_pump`` and ``close``.

    ``_pump`` sends while neither ``done`` nor ``paused``; ``close`` ends the
    sending (idempotent).  ``_kick`` is how pumping starts again after a
    pause: at once here, from the reactor in ``FileBody`` when it has one.
    """

    def __init__(self, request):
        self.request = request
        self.paused = False
        self.done = False

    # IPushProducer
    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self._kick()

    def stopProducing(self):
        self.close()

    def _kick(self):
        self._pump()

    def _pump(self):
        raise NotImplementedError

    def close(self):
        raise NotImplementedError

    def _complete(self):
        """The whole body is out: end the response normally."""
        if self.done:
            return
        self.close()
        self.request.unregisterProducer()
        self.request.finish()


class FileBody(PushBody):
    """Streams bytes [start, start + length) of a file, with the body faults.

    open_file   a callable returning the binary file object (opened by start())
    cut         body bytes to send before closing the connection (FIN after
                what is buffered) short of Content-Length; None: no cut.  A cut
                at or past ``length`` still closes instead of finishing (pass
                None for a cut that should not fire then)
    corrupt_at  offset in the file whose byte goes out flipped (xor 0xFF)
    throttle_bps  bytes a second: slices of max(slice_min, bps // slice_div)
                bytes, each followed by a pause of len(slice) / bps; none after
                the body's last slice unless ``pause_after_last``
    chunk       the most bytes written at once
    reactor     pumps are scheduled with its callLater (at start and on
                resume, and after each throttled slice); None: pump at once
    live        a set the body is in while it streams (the owner's close()
                closes those still in it)
    A file that ends early ends the body as a cut.  ``_progress`` runs before
    each write (a hook: the sent count is ``self.sent``).
    """

    def __init__(self, request, open_file: Callable, start: int, length: int, *, cut: Optional[int] = None,
                 corrupt_at: Optional[int] = None, throttle_bps=None, slice_min: int = 1024,
                 slice_div: int = 10, pause_after_last: bool = False, chunk: int = CHUNK, reactor=None,
                 live: Optional[set] = None):
        super().__init__(request)
        self.open_file = open_file
        self.pos = start
        self.end = start + length
        self.cut = cut
        self.corrupt_at = corrupt_at
        self.throttle_bps = throttle_bps or None
        self.slice_min = slice_min
        self.slice_div = slice_div
        self.pause_after_last = pause_after_last
        self.chunk = chunk
        self.reactor = reactor
        self.live = live
        self.sent = 0
        self.fh = None
        self._call = None

    def start(self):
        self.fh = self.open_file()
        self.fh.seek(self.pos)
        if self.live is not None:
            self.live.add(self)
        self.request.notifyFinish().addBoth(lambda _: self.close())
        self.request.registerProducer(self, True)
        self._kick()

    def _kick(self):
        if self.reactor is None:
            self._pump()
        else:
            self._schedule(0)

    def _schedule(self, delay: float):
        if self._call is None and not self.done:
            self._call = self.reactor.callLater(delay, self._pump)

    def _progress(self):
        pass

    def _pump(self):
        self._call = None
        while not (self.done or self.paused):
            n = min(self.chunk, self.end - self.pos)
            if self.throttle_bps:
                n = min(n, max(self.slice_min, int(self.throttle_bps) // self.slice_div))
            if self.cut is not None:
                n = min(n, self.cut - self.sent)
                if n <= 0:
                    self._cut()
                    return
            if n <= 0:
                self._complete()
                return
            data = self.fh.read(n)
            if not data:  # the file shrank under us
                self._cut()
                return
            if self.corrupt_at is not None and self.pos <= self.corrupt_at < self.pos + len(data):
                i = self.corrupt_at - self.pos
                data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
            self.pos += len(data)
            self.sent += len(data)
            self._progress()
            self.request.write(data)
            if self.throttle_bps and (self.pos < self.end or self.pause_after_last):
                self._schedule(len(data) / float(self.throttle_bps))
                return

    def _cut(self):
        # loseConnection sends what is buffered first: the client gets exactly the bytes written
        self.close()
        self.request.unregisterProducer()
        transport = self.request.channel.transport if self.request.channel else None
        if transport is not None:
            transport.loseConnection()

    def close(self):
        if self.done:
            return
        self.done = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        if self.live is not None:
            self.live.discard(self)


# ---------------------------------------------------------------------------
# request logs and plain answers


def request_headers(request) -> Dict[str, str]:
    """The request's headers, names in lower case, repeated ones joined with ", "."""
    headers = {}
    for name, values in request.requestHeaders.getAllRawHeaders():
        headers[name.decode("latin-1").lower()] = ", ".join(v.decode("latin-1") for v in values)
    return headers


def record_request(requests: list, request, entry: dict, status_when_lost: bool = True) -> dict:
    """Append ``entry`` to ``requests``; its "status" is the code answered.

    If the connection goes before the response is complete the entry gets
    "aborted": True and (``status_when_lost``) the status sent, if any.
    """
    requests.append(entry)

    def done(_):
        entry["status"] = request.code

    def lost(_):
        entry["aborted"] = True  # connection closed before the response was complete
        if status_when_lost:
            entry["status"] = request.code if request.startedWriting else None

    request.notifyFinish().addCallbacks(done, lost)
    return entry


def reply(request, data: bytes, content_type: str):
    """Answer ``data`` whole (HEAD: the headers only) and finish the request."""
    request.setHeader("Content-Type", content_type)
    request.setHeader("Content-Length", str(len(data)))
    if request.method != b"HEAD":
        request.write(data)
    request.finish()
    return server.NOT_DONE_YET


# ---------------------------------------------------------------------------
# twisted.web plumbing


class Handoff(resource.Resource):
    """A leaf resource answering every request with ``handle(*leading, request)``.

    A handler that returns None has answered (or will answer) by itself.
    """

    isLeaf = True

    def __init__(self, handle: Callable, *leading):
        super().__init__()
        self.handle = handle
        self.leading = leading

    def render(self, request):
        result = self.handle(*self.leading, request)
        return server.NOT_DONE_YET if result is None else result


class QuietSite(server.Site):
    """A site that logs no request (keeps test output quiet).

    ``owner`` and ``server_name`` are there for the channels to read;
    ``protocol`` replaces the channel class.
    """

    def __init__(self, root, owner=None, server_name: Optional[str] = None, protocol=None):
        super().__init__(root)
        self.owner = owner
        self.server_name = server_name
        if protocol is not None:
            self.protocol = protocol

    def log(self, request):
        pass


def owner_site(owner, server_name: Optional[str] = None, protocol=None) -> QuietSite:
    """A quiet site handing each request to ``owner._handle([server_name,] request)``."""
    leading = () if server_name is None else (server_name,)
    return QuietSite(Handoff(owner._handle, *leading), owner, server_name,
                     TrackedChannel if protocol is None else protocol)


class TrackedChannel(http.HTTPChannel):
    """Tells the site's owner (a ``Listening``) when it opens and closes."""

    def connectionMade(self):
        super().connectionMade()
        self.site.owner._channel_made(self)

    def connectionLost(self, reason):
        try:
            super().connectionLost(reason)
        finally:
            self.site.owner._channel_lost(self)


class Listening:
    """A fake's reactor, listening ports and open connections (a mixin).

    Call ``_init_listening`` from ``__init__``; ``_shut`` is the common part of
    ``close()``.
    """

    def _init_listening(self, reactor=None):
        self._reactor = reactor
        self._ports = []
        self._channels = {}  # open connection -> Deferred fired when it is closed

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def _listen(self, site, interface: str, port: int = 0):
        """Listen with ``site`` on interface:port (0: any free one); returns the IListeningPort."""
        listening = self.reactor.listenTCP(port, site, interface=interface)
        self._ports.append(listening)
        return listening

    def _channel_made(self, channel) -> None:
        self._channels[channel] = defer.Deferred()

    def _channel_lost(self, channel) -> None:
        d = self._channels.pop(channel, None)
        if d is not None:
            d.callback(None)

    def _shut(self) -> defer.Deferred:
        """Abort every open connection, stop listening; fires when all are gone."""
        waits = list(self._channels.values())
        for channel in list(self._channels):
            if channel.transport is not None:
                channel.transport.abortConnection()
        for port in self._ports:
            waits.append(defer.maybeDeferred(port.stopListening))
        self._ports = []
        return defer.gatherResults(waits, consumeErrors=True)


def origin(interface: str, listening) -> str:
    """``http://interface:port`` of a listening port."""
    return "http://%s:%d" % (interface, listening.getHost().port)


# ---------------------------------------------------------------------------
# standalone processes


def host_port(value: str) -> Tuple[str, int]:
    """An argparse type: HOST:PORT (an IPv6 host may be in brackets)."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT, got %r" % value)
    return host.strip("[]"), int(port)


def write_ready(path: str, payload) -> None:
    """Write the ready file atomically (str or bytes)."""
    if isinstance(payload, str):
        payload = payload.encode()
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "wb") as fh:
        fh.write(payload)
    os.replace(tmp, path)
