"""A fake upstream HTTP file server for testing the proxy.

In-process use (same reactor as the code under test)::

    up = FakeUpstream()
    up.listen(reactor)                 # 127.0.0.1, ephemeral port; sets up.url
    up.add("/a/b.tar.gz", b"...", throttle=(1024, 0.01))
    up.add_file("/big.bin", "/tmp/big.bin")
    ...
    yield up.close()                   # stop listening, abort connections

Standalone use::

    python -m tests.upstream --listen 127.0.0.1:0 --ready-file PATH [--files DIR]

writes ``{"url": "http://127.0.0.1:NNNN"}`` to PATH (atomically) and to
stdout once listening.

Behaviours accepted by ``add`` / ``add_file`` (keyword arguments):

``status``          response code (default 200); non-2xx codes answer with the
                    given data, or a short text body when the data is empty.
``headers``         dict of extra response headers (override the defaults).
``cut_after``       send headers (full Content-Length) and K body bytes, then
                    abort the connection.
``chunked``         no Content-Length: chunked transfer encoding.
``throttle``        ``(chunk_bytes, delay_seconds)``: pause between chunks.
``stall_after``     send K body bytes, then go silent with the connection open.
``delay_headers``   seconds to wait before sending status and headers.
``hold``            send headers only, until ``release(path[, upto])``.
``redirect``        ``(status, location)``.
``gzip_if_asked``   gzip the body when Accept-Encoding allows it.
``etag``            ETag value to use instead of the md5 of the content.
``content_type``    Content-Type instead of the guess from the extension.
``conditional``     answer If-None-Match / If-Modified-Since with 304
                    (default True).
``ranges``          honour Range requests and send Accept-Ranges (default True).
``require_auth``    Authorization value required; otherwise 401.

Control endpoints (not recorded in the request log):
``GET /_fake/requests``, ``POST /_fake/reset[?files=1]``,
``POST /_fake/release?path=P[&upto=K]``, ``POST /_fake/add`` (JSON body with
``path``, one of ``data`` / ``data_b64`` / ``file``, and behaviour keys).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import mimetypes
import os
import re
import sys
import zlib
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Set
from urllib.parse import parse_qs, unquote

from twisted.internet import defer
from twisted.web import http, server

from tests.fakeserve import Listening, PushBody, origin, owner_site, reply, request_headers, write_ready

__all__ = ["FakeUpstream", "Recorded", "LAST_MODIFIED"]

CHUNK = 64 * 1024
LAST_MODIFIED = "Mon, 01 Jan 2024 00:00:00 GMT"
_LAST_MODIFIED_TS = 1704067200  # the same instant as a POSIX timestamp

_BEHAVIOURS = frozenset(
    [
        "status",
        "headers",
        "cut_after",
        "chunked",
        "throttle",
        "stall_after",
        "delay_headers",
        "hold",
        "redirect",
        "gzip_if_asked",
        "etag",
        "content_type",
        "conditional",
        "ranges",
        "require_auth",
    ]
)
_REDIRECT_CODES = frozenset([301, 302, 303, 307, 308])
_COMPRESSED_TYPES = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "compress": "application/x-compress",
    "br": "application/x-brotli",
}


class Recorded(NamedTuple):
    method: str
    path: str  # raw request target, query included
    headers: Dict[str, str]  # lower-cased name -> value (repeats joined by ", ")
    server_name: str


# ---------------------------------------------------------------------------
# body sources


class _BytesSource:
    def __init__(self, data: bytes, start: int = 0, length: Optional[int] = None):
        self._data = memoryview(data)
        self._pos = start
        self._end = len(data) if length is None else start + length

    def read(self, n: int) -> bytes:
        n = min(n, self._end - self._pos)
        if n <= 0:
            return b""
        chunk = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return chunk

    def close(self) -> None:
        self._data = memoryview(b"")


class _FileSource:
    def __init__(self, filename: str, start: int = 0, length: Optional[int] = None):
        self._fh = open(filename, "rb")
        self._fh.seek(start)
        self._left = length  # None: until EOF

    def read(self, n: int) -> bytes:
        if self._fh is None:
            return b""
        if self._left is not None:
            n = min(n, self._left)
            if n <= 0:
                return b""
        chunk = self._fh.read(n)
        if self._left is not None:
            self._left -= len(chunk)
        return chunk

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _GzipSource:
    """Compresses another source on the fly (gzip container)."""

    def __init__(self, inner):
        self._inner = inner
        self._z = zlib.compressobj(6, zlib.DEFLATED, 31)
        self._buf = bytearray()
        self._eof = False

    def read(self, n: int) -> bytes:
        while len(self._buf) < n and not self._eof:
            raw = self._inner.read(CHUNK)
            if raw:
                self._buf += self._z.compress(raw)
            else:
                self._buf += self._z.flush()
                self._eof = True
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        return chunk

    def close(self) -> None:
        self._inner.close()


# ---------------------------------------------------------------------------
# entries


class _Entry:
    def __init__(self, path, data, filename, size, behaviour):
        self.path = path
        self.data = data
        self.filename = filename
        self.size = size
        self.b = behaviour
        # gate: None = open, int = number of body bytes allowed out
        self.gate: Optional[int] = 0 if behaviour.get("hold") else None
        self.active: Set["_Sender"] = set()
        self.etag = behaviour.get("etag")
        if self.etag is None and "etag" not in {
            k.lower() for k in (behaviour.get("headers") or {})
        }:
            self.etag = '"%s"' % self._md5()

    def _md5(self) -> str:
        h = hashlib.md5()
        if self.data is not None:
            h.update(self.data)
        else:
            with open(self.filename, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()

    def open(self, start=0, length=None):
        if self.data is not None:
            return _BytesSource(self.data, start, length)
        return _FileSource(self.filename, start, length)


def _check_behaviour(behaviour: Dict[str, Any]) -> Dict[str, Any]:
    unknown = set(behaviour) - _BEHAVIOURS
    if unknown:
        raise TypeError("unknown behaviour(s): %s" % ", ".join(sorted(unknown)))
    if "redirect" in behaviour and behaviour["redirect"] is not None:
        code, location = behaviour["redirect"]
        if int(code) not in _REDIRECT_CODES:
            raise ValueError("redirect status must be one of %s" % sorted(_REDIRECT_CODES))
        behaviour["redirect"] = (int(code), str(location))
    if behaviour.get("throttle") is not None:
        size, delay = behaviour["throttle"]
        if int(size) <= 0:
            raise ValueError("throttle chunk size must be positive")
        behaviour["throttle"] = (int(size), float(delay))
    return behaviour


def _guess_type(path: str) -> str:
    ctype, encoding = mimetypes.guess_type(path, strict=False)
    if encoding in _COMPRESSED_TYPES:
        return _COMPRESSED_TYPES[encoding]
    return ctype or "application/octet-stream"


def _accepts_gzip(value: Optional[str]) -> bool:
    if not value:
        return False
    for item in value.split(","):
        parts = [p.strip() for p in item.split(";")]
        if parts[0].lower() not in ("gzip", "x-gzip", "*"):
            continue
        q = 1.0
        for p in parts[1:]:
            if p.lower().startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        if q > 0:
            return True
    return False


_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.I)


def _parse_range(value: str, size: int):
    """Return (start, length), "unsatisfiable", or None (ignore the header)."""
    if "," in value:
        return None  # multiple ranges: answer with the whole file
    m = _RANGE_RE.match(value)
    if not m or (m.group(1) == "" and m.group(2) == ""):
        return None
    first, last = m.group(1), m.group(2)
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        start = max(0, size - suffix)
        return start, size - start
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if last != "" and int(last) < start:
        return None  # syntactically invalid: ignore
    if start >= size:
        return "unsatisfiable"
    return start, end - start + 1


# ---------------------------------------------------------------------------
# sending a body


class _Sender(PushBody):
    """Pushes one response body to a request, applying the behaviours.

    Its own pump (not ``FileBody``'s): holds and stalls wait with the
    headers sent, the throttle is (bytes, seconds) per slice, a cut resets the
    connection once the bytes before it are flushed, and the timers are the
    owner's (cancelled by its close()).
    """

    def __init__(self, up: "FakeUpstream", request, entry: _Entry, source):
        super().__init__(request)
        self.up = up
        self.entry = entry
        self.source = source
        b = entry.b
        self.cut = b.get("cut_after")
        self.stall = b.get("stall_after")
        self.throttle = b.get("throttle")
        self.sent = 0
        self._busy = False
        self._timer = None

    def start(self):
        self.entry.active.add(self)
        self.up._senders.add(self)
        self.request.notifyFinish().addErrback(lambda _: self.close())
        self.request.registerProducer(self, True)
        self.request.write(b"")  # status line and headers go out now
        self._pump()

    def poke(self):
        self._pump()

    def _limit(self) -> Optional[int]:
        limits = [x for x in (self.cut, self.stall, self.entry.gate) if x is not None]
        return min(limits) if limits else None

    def _tick(self):
        self._timer = None
        self._pump()

    def _pump(self):
        if self._busy or self.done or self.paused or self._timer is not None:
            return
        self._busy = True
        try:
            while not (self.done or self.paused):
                limit = self._limit()
                if limit is not None and self.sent >= limit:
                    gate = self.entry.gate
                    if self.cut is not None and self.sent >= self.cut and (gate is None or gate > self.cut):
                        self._abort_when_flushed()  # (a hold at the cut point holds: release to cut)
                    return  # held, stalled, or cut
                n = CHUNK
                if self.throttle:
                    n = min(n, self.throttle[0])
                if limit is not None:
                    n = min(n, limit - self.sent)
                data = self.source.read(n)
                if not data:
                    self._complete()
                    return
                self.sent += len(data)
                self.request.write(data)
                if self.throttle and not self.done:
                    self._timer = self.up._call_later(self.throttle[1], self._tick)
                    return
        finally:
            self._busy = False

    def _abort_when_flushed(self):
        # abortConnection() discards whatever the transport still buffers,
        # so wait until the bytes already written have reached the kernel.
        if self.done:
            return
        self.close()
        channel = self.request.channel
        transport = getattr(channel, "transport", None)
        if transport is None:
            return
        self.up._abort_after_flush(transport)

    def close(self):
        if self.done:
            return
        self.done = True
        if self._timer is not None:
            self.up._cancel(self._timer)
            self._timer = None
        self.entry.active.discard(self)
        self.up._senders.discard(self)
        self.source.close()


def _buffered(transport) -> int:
    try:
        return (
            len(transport.dataBuffer)
            - transport.offset
            + transport._tempDataLen
        )
    except AttributeError:
        return 0


# ---------------------------------------------------------------------------


class FakeUpstream(Listening):
    """A scriptable HTTP file server (see the module docstring)."""

    def __init__(self, name: str = "default", interface: Optional[str] = None,
                 files_dir: Optional[str] = None, reactor=None):
        self.name = name
        self.interface = interface or ("127.0.0.2" if name == "other" else "127.0.0.1")
        self.files_dir = os.path.abspath(files_dir) if files_dir else None
        self.url: Optional[str] = None
        self.requests: List[Recorded] = []
        self._init_listening(reactor)
        self._files: Dict[str, _Entry] = {}
        self._dir_cache: Dict[tuple, _Entry] = {}
        self._calls: Set[Any] = set()
        self._senders: Set[_Sender] = set()
        self._waiters: List[tuple] = []
        self._site = owner_site(self)

    # -- setup -------------------------------------------------------------

    def listen(self, reactor=None, interface: Optional[str] = None, host_port: int = 0):
        """Listen on interface:host_port (0: any free port); sets ``self.url``.

        Returns the IListeningPort.  ``interface`` defaults to 127.0.0.1, or
        127.0.0.2 for ``FakeUpstream(name="other")``.
        """
        if reactor is not None:
            self._reactor = reactor
        iface = interface or self.interface
        port = self._listen(self._site, iface, host_port)
        self.url = origin(iface, port)
        return port

    def add(self, path: str, data: bytes = b"", **behaviour) -> None:
        """Serve ``data`` at ``path`` (no query) with the given behaviours."""
        if not path.startswith("/"):
            raise ValueError("path must start with '/'")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("data must be bytes")
        data = bytes(data)
        self._files[path] = _Entry(path, data, None, len(data), _check_behaviour(behaviour))

    def add_file(self, path: str, filename: str, **behaviour) -> None:
        """Serve the file ``filename`` at ``path``, streamed from disk."""
        if not path.startswith("/"):
            raise ValueError("path must start with '/'")
        filename = os.fspath(filename)
        size = os.path.getsize(filename)
        self._files[path] = _Entry(path, None, filename, size, _check_behaviour(behaviour))

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        self.add(path, b"", redirect=(status, location))

    def remove(self, path: str) -> None:
        self._files.pop(path, None)

    # -- holding -----------------------------------------------------------

    def release(self, path: str, upto: Optional[int] = None) -> int:
        """Let a ``hold=True`` path send up to ``upto`` body bytes (None: all).

        Applies to responses in flight and to later requests for the path.
        Returns the number of responses in flight for it.
        """
        entry = self._files[path]
        if upto is None:
            entry.gate = None
        elif entry.gate is not None:
            entry.gate = max(entry.gate, int(upto))
        for sender in list(entry.active):
            sender.poke()
        return len(entry.active)

    def hold(self, path: str) -> None:
        """Close the gate of a path again (new responses send headers only)."""
        self._files[path].gate = 0

    def in_flight(self, path: Optional[str] = None) -> int:
        return sum(1 for s in self._senders if path is None or s.entry.path == path)

    # -- the request log ---------------------------------------------------

    def count(self, path: str, method: Optional[str] = "GET") -> int:
        """Requests seen for ``path`` (query ignored); method=None: any method."""
        return sum(
            1
            for r in self.requests
            if r.path.split("?", 1)[0] == path and (method is None or r.method == method)
        )

    def wait_for(self, path: str, count: int = 1, method: Optional[str] = "GET") -> defer.Deferred:
        """Deferred firing once ``count(path, method) >= count``."""
        d = defer.Deferred()
        if self.count(path, method) >= count:
            d.callback(None)
        else:
            self._waiters.append((path, count, method, d))
        return d

    def reset(self, files: bool = False) -> None:
        """Forget the request log (and the added files when files=True)."""
        del self.requests[:]
        if files:
            self._files.clear()
            self._dir_cache.clear()

    # -- teardown ----------------------------------------------------------

    def close(self) -> defer.Deferred:
        """Stop listening, cancel pending calls, abort every open connection.

        The Deferred fires when the ports are closed and the connections gone.
        """
        for call in list(self._calls):
            if call.active():
                call.cancel()
        self._calls.clear()
        for sender in list(self._senders):
            sender.close()
        return self._shut().addCallback(lambda _: None)

    # -- internals ---------------------------------------------------------

    def _call_later(self, delay: float, f: Callable, *args):
        holder = []

        def run():
            self._calls.discard(holder[0])
            f(*args)

        call = self.reactor.callLater(delay, run)
        holder.append(call)
        self._calls.add(call)
        return call

    def _cancel(self, call):
        self._calls.discard(call)
        if call.active():
            call.cancel()

    def _abort_after_flush(self, transport, tries: int = 0):
        if getattr(transport, "disconnected", False):
            return
        if _buffered(transport) > 0 and tries < 500:
            self._call_later(0.005, self._abort_after_flush, transport, tries + 1)
            return
        transport.abortConnection()

    def _lookup(self, path: str) -> Optional[_Entry]:
        entry = self._files.get(path)
        if entry is not None:
            return entry
        decoded = unquote(path)
        entry = self._files.get(decoded)
        if entry is not None or self.files_dir is None:
            return entry
        if "\x00" in decoded:
            return None
        rel = os.path.normpath(decoded.lstrip("/"))
        if rel.startswith("..") or os.path.isabs(rel) or rel == ".":
            return None
        full = os.path.join(self.files_dir, rel)
        try:
            st = os.stat(full)
        except OSError:
            return None
        if not os.path.isfile(full):
            return None
        key = (full, st.st_size, st.st_mtime_ns)
        entry = self._dir_cache.get(key)
        if entry is None:
            entry = _Entry(decoded, None, full, st.st_size, {})
            self._dir_cache[key] = entry
        return entry

    def _record(self, request, path_raw: str, method: str):
        self.requests.append(Recorded(method, path_raw, request_headers(request), self.name))

    def _notify_waiters(self, path: str):
        for waiter in list(self._waiters):
            wpath, wcount, wmethod, d = waiter
            if wpath == path and self.count(wpath, wmethod) >= wcount:
                self._waiters.remove(waiter)
                d.callback(None)

    def _handle(self, request):
        path_raw = request.uri.decode("latin-1")
        path = path_raw.split("?", 1)[0]
        method = request.method.decode("latin-1")
        if path.startswith("/_fake/"):
            return self._control(request, method, path, path_raw)
        self._record(request, path_raw, method)
        try:
            return self._dispatch(request, path, method)
        finally:
            # after the response is set up, so waiters see it in flight
            self._notify_waiters(path)

    def _dispatch(self, request, path: str, method: str):
        entry = self._lookup(path)
        if entry is None:
            return _simple(request, 404)
        if method not in ("GET", "HEAD"):
            request.setHeader("Allow", "GET, HEAD")
            return _simple(request, 405)

        state = {"lost": False}

        def lost(_):
            state["lost"] = True

        request.notifyFinish().addErrback(lost)

        def go():
            if not state["lost"]:
                self._respond(request, entry, method)

        delay = entry.b.get("delay_headers")
        if delay:
            self._call_later(float(delay), go)
        else:
            go()
        return server.NOT_DONE_YET

    def _respond(self, request, entry: _Entry, method: str):
        b = entry.b
        redirect = b.get("redirect")
        if redirect:
            code, location = redirect
            request.setHeader("Location", location)
            _apply_headers(request, b)
            _finish_simple(request, code)
            return

        wanted = b.get("require_auth")
        if wanted is not None and request.getHeader("authorization") != wanted:
            request.setHeader("WWW-Authenticate", 'Basic realm="fake"')
            _apply_headers(request, b)
            _finish_simple(request, 401)
            return

        status = int(b.get("status", 200))
        if not 200 <= status < 300:
            if entry.size:
                request.setResponseCode(status)
                request.setHeader("Content-Type", b.get("content_type") or "text/plain")
                _apply_headers(request, b)
                self._send_body(request, entry, method, entry.open(), entry.size)
            else:
                _apply_headers(request, b)
                _finish_simple(request, status)
            return

        request.setResponseCode(status)
        request.setHeader("Content-Type", b.get("content_type") or _guess_type(entry.path))
        if entry.etag:
            request.setHeader("ETag", entry.etag)
        request.setHeader("Last-Modified", LAST_MODIFIED)
        ranges = b.get("ranges", True)
        if ranges:
            request.setHeader("Accept-Ranges", "bytes")
        else:
            request.setHeader("Accept-Ranges", "none")
        use_gzip = bool(b.get("gzip_if_asked")) and _accepts_gzip(
            request.getHeader("accept-encoding")
        )
        if b.get("gzip_if_asked"):
            request.setHeader("Vary", "Accept-Encoding")

        if status == 200 and b.get("conditional", True) and _not_modified(request, entry):
            _apply_headers(request, b)
            request.responseHeaders.removeHeader("Content-Type")
            request.setResponseCode(304)
            request.finish()
            return

        start, length = 0, entry.size
        range_header = request.getHeader("range")
        if status == 200 and ranges and range_header and not use_gzip and _if_range_ok(request, entry):
            parsed = _parse_range(range_header, entry.size)
            if parsed == "unsatisfiable":
                request.setHeader("Content-Range", "bytes */%d" % entry.size)
                request.responseHeaders.removeHeader("ETag")
                request.responseHeaders.removeHeader("Content-Type")
                _apply_headers(request, b)
                _finish_simple(request, 416)
                return
            if parsed is not None:
                start, length = parsed
                request.setResponseCode(206)
                request.setHeader(
                    "Content-Range", "bytes %d-%d/%d" % (start, start + length - 1, entry.size)
                )

        source = entry.open(start, length)
        if use_gzip:
            request.setHeader("Content-Encoding", "gzip")
            source = _GzipSource(source)
            length = None
        _apply_headers(request, b)
        self._send_body(request, entry, method, source, length)

    def _send_body(self, request, entry, method, source, length):
        if length is not None and not entry.b.get("chunked"):
            if not request.responseHeaders.hasHeader(b"content-length"):
                request.setHeader("Content-Length", str(length))
        else:
            request.responseHeaders.removeHeader(b"content-length")
        if method == "HEAD":
            source.close()
            request.finish()
            return
        _Sender(self, request, entry, source).start()

    def _control(self, request, method, path, path_raw):
        query = parse_qs(path_raw.split("?", 1)[1]) if "?" in path_raw else {}
        if path == "/_fake/requests" and method == "GET":
            body = json.dumps([r._asdict() for r in self.requests]).encode()
            return _json(request, body)
        if path == "/_fake/reset" and method == "POST":
            self.reset(files=query.get("files", ["0"])[0] not in ("0", "", "false"))
            return _json(request, b'{"ok": true}')
        if path == "/_fake/release" and method == "POST":
            target = query.get("path", [None])[0]
            upto = query.get("upto", [None])[0]
            if target not in self._files:
                return _simple(request, 404)
            n = self.release(target, None if upto is None else int(upto))
            return _json(request, json.dumps({"in_flight": n}).encode())
        if path == "/_fake/add" and method == "POST":
            try:
                spec = json.loads(request.content.read() or b"{}")
                target = spec.pop("path")
                if "data" in spec:
                    data = spec.pop("data").encode("utf-8")
                    self.add(target, data, **spec)
                elif "data_b64" in spec:
                    self.add(target, base64.b64decode(spec.pop("data_b64")), **spec)
                else:
                    self.add_file(target, spec.pop("file"), **spec)
            except (KeyError, TypeError, ValueError, OSError) as exc:
                request.setResponseCode(400)
                return _json(request, json.dumps({"error": str(exc)}).encode())
            return _json(request, b'{"ok": true}')
        return _simple(request, 404)


def _apply_headers(request, behaviour):
    for name, value in (behaviour.get("headers") or {}).items():
        if value is None:
            request.responseHeaders.removeHeader(name)
        else:
            request.setHeader(name, str(value))


def _simple(request, code: int):
    _finish_simple(request, code)
    return server.NOT_DONE_YET


def _finish_simple(request, code: int):
    request.setResponseCode(code)
    if code in (204, 304):
        request.finish()
        return
    body = b"%d %s\n" % (code, http.RESPONSES.get(code, b"Status"))
    if not request.responseHeaders.hasHeader(b"content-type"):
        request.setHeader("Content-Type", "text/plain")
    request.setHeader("Content-Length", str(len(body)))
    if request.method != b"HEAD":
        request.write(body)
    request.finish()


def _json(request, body: bytes):
    return reply(request, body, "application/json")


def _not_modified(request, entry: _Entry) -> bool:
    inm = request.getHeader("if-none-match")
    if inm is not None:
        if entry.etag is None:
            return False
        tags = [t.strip() for t in inm.split(",")]
        plain = entry.etag[2:] if entry.etag.startswith("W/") else entry.etag
        return "*" in tags or any(
            (t[2:] if t.startswith("W/") else t) == plain for t in tags
        )
    ims = request.getHeader("if-modified-since")
    if ims is not None:
        try:
            when = http.stringToDatetime(ims.encode("latin-1"))
        except Exception:
            return False
        return when >= _LAST_MODIFIED_TS
    return False


def _if_range_ok(request, entry: _Entry) -> bool:
    value = request.getHeader("if-range")
    if value is None:
        return True
    value = value.strip()
    if value.startswith('"') or value.startswith("W/"):
        return entry.etag is not None and value == entry.etag
    return value == LAST_MODIFIED


# ---------------------------------------------------------------------------
# standalone process


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Fake upstream HTTP file server")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT")
    parser.add_argument("--ready-file", help="write {\"url\": ...} here once listening")
    parser.add_argument("--files", help="serve this directory's files")
    parser.add_argument("--name", default="default", help="server_name in the request log")
    args = parser.parse_args(argv)

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        parser.error("--listen must be HOST:PORT")
    host = host.strip("[]")

    from twisted.internet import reactor

    up = FakeUpstream(name=args.name, interface=host, files_dir=args.files, reactor=reactor)
    up.listen(reactor, interface=host, host_port=int(port))
    payload = json.dumps({"url": up.url}).encode()
    if args.ready_file:
        write_ready(args.ready_file, payload)
    sys.stdout.write(payload.decode() + "\n")
    sys.stdout.flush()
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
