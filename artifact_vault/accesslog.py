"""
The access log: one line per request, buffered and written in batches.

``access_log`` in the configuration says where the lines go:

``PATH``   a file of its own, opened for appending; reopened on SIGHUP or
           SIGUSR1 (logrotate renames the file, then signals the vault);
``"-"``    standard output (the default; where ``twistd -n`` logs too).  When
           twistd's own log does not go to standard output (``--logfile``,
           or daemonized), the lines go into that log instead, one log event
           each, as they always did (`LOG`);
``off``    no access log.

A line is formatted here, without the logging system: the time (to the
second, the vault log's format), then `line`: client, request line without
its query, status, body bytes, cache outcome, duration, user agent.  Lines
wait in memory until a second has passed since the first of them, or until
`FLUSH_BYTES` are waiting, then go out in one ``write`` (to a pipe or a
terminal, in pieces of whole lines no longer than ``PIPE_BUF``, so that the
lines of several processes writing to it never mix).  Each worker process
writes its own lines to the same file or standard output.
"""

import os
import re
import select
import signal
import stat
import time

from .logs import VaultLogger

log = VaultLogger()

#: seconds a line may wait in memory
FLUSH_EVERY = 1.0
#: bytes that make a batch go out at once, whatever the time
FLUSH_BYTES = 64 * 1024
#: bytes kept while the target does not take them (a full pipe); older lines are dropped beyond
MAX_PENDING = 4 * 1024 * 1024
#: what `parse` returns for "the lines go into the vault's log" (twistd does not log to stdout)
LOG = "log"
#: the signals that make a file access log reopen its file
REOPEN_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)


def line(request) -> bytes:
    """The access log line of `request`, without the time and the newline."""
    addr = request.getClientAddress()
    ip = getattr(addr, "host", "-")
    started = getattr(request, "started", None)
    duration = f"{time.monotonic() - started:.3f}s" if started is not None else "-"
    # The query is not logged: a client may put a credential there.
    target = request.path + (b"?..." if b"?" in request.uri else b"")
    proxied = getattr(request, "proxy_target", None)
    if proxied is not None:  # an absolute-form request (the vault as the client's proxy)
        target = f"{proxied.scheme}://{proxied.authority}".encode("ascii") + target
    return b'%s "%s %s %s" %d %d %s %s "%s"' % (
        ip.encode("ascii", "replace"), _escape(request.method), _escape(target), _escape(request.clientproto),
        request.code, request.sentLength, (getattr(request, "outcome", None) or "-").encode("ascii"),
        duration.encode("ascii"), _escape(request.getHeader(b"user-agent") or b"-"),
    )


#: bytes written as they are: printable ASCII but '"' and '\\'
_PLAIN = re.compile(rb'[\x20\x21\x23-\x5b\x5d-\x7e]*')


def _escape(value: bytes) -> bytes:
    """Printable ASCII as it is; any other byte, '"' and '\\' as \\xNN: a client cannot forge a line."""
    if _PLAIN.fullmatch(value):
        return value
    return b"".join(bytes((c,)) if 32 <= c < 127 and c not in (34, 92) else b"\\x%02x" % c for c in value)


class AccessLog:
    """
    Lines for one file or descriptor, written in batches.  With `path`, the
    file is opened (for appending) now and again on `reopen`; with `fd`, the
    descriptor is used as it is (standard output, or the one a worker was
    given) and never closed.
    """

    def __init__(self, reactor, path: str | None = None, fd: int | None = None):
        self.reactor = reactor
        self.path = path
        self._own_fd = path is not None
        self.fd = self._open(path) if path is not None else fd
        self._atomic = self._whole_writes(self.fd)
        self._lines: list[bytes] = []
        self._size = 0
        self._timer = None
        self._stamp_second = None
        self._stamp = b""
        self._closed = False
        self._dropped = 0
        self._last_warning = 0.0

    @staticmethod
    def _open(path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    @staticmethod
    def _whole_writes(fd: int) -> bool:
        """True for a regular file (an appending write lands whole); False for pipes, terminals, sockets."""
        try:
            return stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            return False

    def add(self, request) -> None:
        """The line of a finished request."""
        now = time.time()
        second = int(now)
        if second != self._stamp_second:
            self._stamp_second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z ", time.localtime(now)).encode("ascii")
        data = self._stamp + line(request) + b"\n"
        self._lines.append(data)
        self._size += len(data)
        if self._closed or self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = self.reactor.callLater(FLUSH_EVERY, self.flush)

    def flush(self) -> None:
        """Write what is waiting."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines, self._size = [], 0
        try:
            rest = self._write(data)
        except OSError as e:
            lost = data.count(b"\n")
            self._warn(f"cannot write the access log ({e.strerror}); {lost} lines lost")
            return
        if rest:
            # The target takes no more now (a full pipe): keep the rest for the next batch, bounded.
            if len(rest) > MAX_PENDING:
                cut = rest.index(b"\n", len(rest) - MAX_PENDING) + 1
                self._dropped += rest[:cut].count(b"\n")
                rest = rest[cut:]
            self._lines, self._size = [rest], len(rest)
            if self._timer is None and not self._closed:
                self._timer = self.reactor.callLater(FLUSH_EVERY, self.flush)

    def _write(self, data: bytes) -> bytes:
        """Write `data`; returns what the target would not take without blocking (normally nothing)."""
        view = memoryview(data)
        limit = len(data) if self._atomic else select.PIPE_BUF
        while view:
            piece = view[:limit]
            if len(piece) < len(view):
                end = bytes(piece).rfind(b"\n") + 1  # whole lines only
                piece = view[:end or limit]
            try:
                n = os.write(self.fd, piece)
            except BlockingIOError:
                return bytes(view)
            except InterruptedError:
                continue
            view = view[n:]
        return b""

    def reopen(self) -> None:
        """Write what waits to the old file, then open the path again (after a rotation)."""
        self.flush()
        if not self._own_fd or self._closed:
            return
        try:
            fd = self._open(self.path)
        except OSError as e:
            self._warn(f"cannot reopen the access log {self.path} ({e.strerror}); writing to the old file")
            return
        old, self.fd = self.fd, fd
        self._atomic = self._whole_writes(fd)
        os.close(old)
        if self._dropped:
            self._warn(f"{self._dropped} access log lines were dropped: the log did not take them in time")
            self._dropped = 0

    def close(self) -> None:
        """Write what waits; from now on every line goes out at once (requests that end after the stop)."""
        self._closed = True
        self.flush()

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 60:
            self._last_warning = now
            log.warn("{message}", message=message)


def target(configured, stdout_is_log: bool = True):
    """
    Where the lines go, from ``config.access_log`` (None, "-" or a path):
    None (off), a path, "-" (standard output, batched) or, when the vault's
    log does not go to standard output, `LOG` (into that log, line by line).
    """
    if configured == "-" and not stdout_is_log:
        return LOG
    return configured


def open_target(target, reactor):
    """An `AccessLog` for a `target` (a path, "-", or a descriptor); None for off and `LOG`."""
    if target is None or target == LOG:
        return None
    if target == "-":
        return AccessLog(reactor, fd=1)
    if isinstance(target, int):
        return AccessLog(reactor, fd=target)
    return AccessLog(reactor, path=target)


def on_reopen_signals(reactor, callback) -> None:
    """Call `callback` in the reactor on SIGHUP and SIGUSR1; a handler already there (twistd's) still runs."""
    for signum in REOPEN_SIGNALS:
        previous = signal.getsignal(signum)

        def handler(number, frame, previous=previous):
            reactor.callFromThread(callback)
            if callable(previous):
                previous(number, frame)

        signal.signal(signum, handler)


__all__ = ["AccessLog", "FLUSH_BYTES", "FLUSH_EVERY", "LOG", "line", "on_reopen_signals", "open_target", "target"]
