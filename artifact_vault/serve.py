"""
Serving a body from the cache: a committed entry, or a transfer still growing.

Order of checks (as `twisted.web.static.File` does, with RFC 9110 fixed
where it differs): conditional request (304), then Range (206/416, or the
whole body when Range is absent, malformed, multi-part or defeated by
If-Range), then HEAD (headers only).  The body is pushed by `_Streamer`, a
push producer that reads with ``os.pread`` from its own descriptor, so each
client goes at its own pace; when it catches up with a growing file it waits
for the transfer to say more bytes arrived.  The last byte of a growing file
is held back until the transfer is verified and committed; if it fails, the
client's connection is aborted: never a body that looks complete but is not.
"""

import os
from email.utils import parsedate_to_datetime

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from .errors import VaultError
from .logs import VaultLogger
from .store import Entry, open_readers
from .zerocopy import ZeroCopy

log = VaultLogger()

CHUNK = 256 * 1024
SMALL_BODY = 64 * 1024


class StoredBody:
    """
    A committed entry, with the same face as a `Transfer`.  With the `store`
    it came from, a small body is read from the store's memory of small
    bodies (`CacheStore.small_body`).
    """

    failure = None
    complete = True

    def __init__(self, entry: Entry, store=None):
        self.entry = entry
        self.size = entry.size
        self.store = store

    def small(self) -> bytes | None:
        """The whole body from memory (read once), or None: read the file."""
        if self.store is None:
            return None
        try:
            return self.store.small_body(self.entry)
        except OSError as e:
            raise VaultError(f"cannot open the cached file: {e.strerror}", 503, {"Retry-After": "5"}) from None

    def available(self) -> int:
        return self.size

    def open(self) -> int:
        fd = os.open(self.entry.path, os.O_RDONLY | os.O_CLOEXEC)
        open_readers()[self.entry.path] += 1  # eviction leaves it alone meanwhile
        return fd

    def closed(self):
        readers = open_readers()
        readers[self.entry.path] -= 1
        if readers[self.entry.path] <= 0:
            del readers[self.entry.path]

    def watch(self, callback):
        pass

    def unwatch(self, callback):
        pass

    def published(self):
        return succeed(self.entry)


class BytesBody:
    """
    A small body held in memory (a kept answer: an APT InRelease, an index
    page), with the face `serve` needs, so that it gets the same Range,
    If-Range, conditional and HEAD handling as a file.
    """

    failure = None
    complete = True

    def __init__(self, data: bytes):
        self.data = data
        self.size = len(data)

    def available(self) -> int:
        return self.size

    def done(self):
        return succeed(None)


def parse_range(header: bytes | None, size: int):
    """
    The single byte range a Range header asks of a body of `size` bytes:
    (start, end_exclusive), "unsatisfiable", or None (serve the whole body:
    no header, not bytes, malformed, or several ranges).
    """
    if not header:
        return None
    try:
        text = header.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    unit, _, spec = text.partition("=")
    if unit.strip().lower() != "bytes" or not spec or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    first, last = first.strip(), last.strip()
    if not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        suffix = _position(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return (max(0, size - suffix), size)
    start = _position(first)
    end = _position(last) + 1 if last else size
    if last and end <= start:
        return None  # last < first: invalid, ignored as RFC 9110 says
    if start >= size:
        return "unsatisfiable"
    return (start, min(end, size))


def _position(digits: str) -> int:
    """
    A byte position as written in a Range header.  Any number of digits is
    valid (RFC 9110); past 18 of them the value is beyond every file, and is
    not converted (Python refuses int() of very long strings).
    """
    return int(digits) if len(digits) <= 18 else 1 << 62


def _etag_matches(header: bytes, etag: str | None, weak=True) -> bool:
    if etag is None:
        return False
    text = header.decode("latin-1")
    if text.strip() == "*":
        return True
    mine = etag[2:] if etag.startswith("W/") else etag
    for candidate in text.split(","):
        candidate = candidate.strip()
        if candidate.startswith("W/"):
            if not weak:
                continue
            candidate = candidate[2:]
        if candidate == mine:
            return True
    return False


def _not_modified(request, meta) -> bool:
    inm = request.getHeader(b"if-none-match")
    if inm is not None:
        return _etag_matches(inm, meta.get("etag"))
    ims = request.getHeader(b"if-modified-since")
    lm = meta.get("last_modified")
    if ims and lm:
        try:
            return parsedate_to_datetime(lm) <= parsedate_to_datetime(ims.decode("latin-1"))
        except (TypeError, ValueError, OverflowError):
            return False
    return False


def _range_allowed(request, meta) -> bool:
    """If-Range: use the Range only when the validator still matches."""
    ir = request.getHeader(b"if-range")
    if ir is None:
        return True
    if ir.startswith((b'"', b"W/")):
        etag = meta.get("etag")
        return etag is not None and not etag.startswith("W/") and _etag_matches(ir, etag, weak=False)
    return ir.decode("latin-1") == meta.get("last_modified")


def set_entity_headers(request, meta: dict) -> None:
    request.setHeader(b"content-type", meta.get("content_type") or "application/octet-stream")
    request.setHeader(b"accept-ranges", b"bytes")
    for name, header in (("etag", b"etag"), ("last_modified", b"last-modified"), ("content_encoding", b"content-encoding")):
        if meta.get(name):
            request.setHeader(header, meta[name])
    for name, value in (meta.get("headers") or {}).items():
        request.setHeader(name, value)


def send_small(request, content_type, body: bytes, status: int | None = None, headers=None) -> None:
    """A whole small body in one go (error texts, JSON, metrics); HEAD gets the headers only."""
    if request.disconnected:
        return
    if status is not None:
        request.setResponseCode(status)
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"content-length", b"%d" % len(body))
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


def serve(request, body, meta: dict) -> Deferred:
    """
    Answer `request` from `body` (a `StoredBody` or a streaming `Transfer`).
    The returned Deferred fires once the response is under way; the streamer
    then finishes (or aborts) the request by itself.
    """
    if request.disconnected:
        return succeed(None)  # the client left while we were getting ready
    set_entity_headers(request, meta)
    if _not_modified(request, meta):
        request.setResponseCode(304)
        request.finish()
        return succeed(None)

    size = body.size
    wants_range = request.getHeader(b"range") is not None and _range_allowed(request, meta)
    if size is None and wants_range:
        # A growing body of unknown length cannot name its ranges yet: wait for the end.
        return body.published().addCallback(lambda entry: serve(request, StoredBody(entry), meta))

    start, end = 0, size
    if size is not None and wants_range:
        rng = parse_range(request.getHeader(b"range"), size)
        if rng == "unsatisfiable":
            request.setResponseCode(416)
            request.setHeader(b"content-range", f"bytes */{size}")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            msg = f"Range not satisfiable: the file has {size} bytes\n".encode()
            request.setHeader(b"content-length", b"%d" % len(msg))
            request.responseHeaders.removeHeader(b"etag")
            request.write(msg)
            request.finish()
            return succeed(None)
        if rng is not None:
            start, end = rng
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {start}-{end - 1}/{size}")
    if end is not None:
        request.setHeader(b"content-length", b"%d" % (end - start))

    if request.method == b"HEAD" or end == start:
        request.finish()
        return succeed(None)
    if isinstance(body, BytesBody):
        request.write(body.data[start:end])
        request.finish()
        return succeed(None)
    if body.complete and end - start <= SMALL_BODY:
        # Small and complete (configs, tokenizers' JSON): one read (or none: kept in memory), one write.
        request.write(_read_small(body, start, end))
        request.finish()
        return succeed(None)
    try:
        streamer = _Streamer(request, body, start, end)
    except OSError as e:
        raise VaultError(f"cannot open the cached file: {e.strerror}", 503, {"Retry-After": "5"}) from None
    streamer.start()
    return succeed(None)


def _read_small(body, start: int, end: int) -> bytes:
    kept = body.small() if isinstance(body, StoredBody) else None
    if kept is not None:
        data = kept[start:end]
    else:
        try:
            fd = body.open()
        except OSError as e:
            raise VaultError(f"cannot open the cached file: {e.strerror}", 503, {"Retry-After": "5"}) from None
        try:
            data = os.pread(fd, end - start, start)
        finally:
            os.close(fd)
            body.closed()
    if len(data) != end - start:
        raise VaultError("the cached file is shorter than its metadata says", 503)
    return data


@implementer(IPushProducer)
class _Streamer:
    """Push bytes [start, end) of `body` into `request`, following a growing file."""

    def __init__(self, request, body, start: int, end: int | None):
        self.request = request
        self.body = body
        self.pos = start
        self.end = end
        self.fd = body.open()
        self.paused = False
        self.stopped = False
        self._pumping = False
        self._zero_copy = ZeroCopy.for_request(request, None if end is None else end - start, body.complete)

    def start(self):
        if self.request.disconnected:
            self._close()
            return
        self.body.watch(self._more)
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addBoth(self._client_gone)
        self.request.write(b"")  # status and headers go out now, before the first byte arrives
        self._pump()

    def _more(self):
        if not self.paused:
            self._pump()

    def _target(self) -> int | None:
        return self.end if self.end is not None else (self.body.size if self.body.complete else None)

    def _pump(self):
        if self._pumping or self.stopped:
            return
        self._pumping = True
        try:
            while not self.paused and not self.stopped:
                target = self._target()
                if target is not None and self.pos >= target:
                    self._finish()
                    return
                available = self.body.available()
                if not self.body.complete and self.body.size is not None:
                    # The file's last byte waits for the verified commit: a client that
                    # has every byte takes the body as good, so a failed check (size,
                    # sha256) must still be able to break the transfer.
                    available = min(available, self.body.size - 1)
                if target is not None:
                    available = min(available, target)
                if self.pos >= available:
                    if self.body.failure is not None:
                        self._abort()
                    return  # wait for the transfer to call _more
                if self._zero_copy is not None:
                    if not self._send_zero_copy(available):
                        return
                    continue
                data = os.pread(self.fd, min(CHUNK, available - self.pos), self.pos)
                if not data:  # the file is shorter than it claims: never pretend
                    self._abort()
                    return
                self.pos += len(data)
                self.request.write(data)
        finally:
            self._pumping = False

    def _send_zero_copy(self, available: int) -> bool:
        """Send what is available without copying it through Python; False: wait (or gave up)."""
        try:
            sent = self._zero_copy.send(self.fd, self.pos, available - self.pos)
        except OSError:
            self._abort()
            return False
        if sent is None:  # end of file before the size we were promised: never pretend
            self._abort()
            return False
        if sent == 0:
            self.paused = True  # the transport's next drain resumes us
            return False
        self.pos += sent
        self.request.sentLength += sent
        return True

    def _finish(self):
        self._close()
        self.request.unregisterProducer()
        self.request.finish()

    def _abort(self):
        self._close()
        self.request.unregisterProducer()
        transport = getattr(self.request.channel, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def _close(self):
        if not self.stopped:
            self.stopped = True
            if self._zero_copy is not None:
                self._zero_copy.release()
            self.body.unwatch(self._more)
            os.close(self.fd)
            self.body.closed()

    def _client_gone(self, result):
        self._close()

    # IPushProducer
    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self._pump()

    def stopProducing(self):
        self._close()
