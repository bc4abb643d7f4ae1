"""
One download per key, watched by every client that wants it.

A `Transfer` is one upstream GET on its way into the cache.  It goes through
two phases: until upstream has answered with a good status it is *pending*
(`ready()` Deferreds wait; an error status fails them all), then it is
*streaming*: bytes land in the writer's temp file and every watcher is told,
so each client streams the bytes already on disk and then the live ones, at
its own pace.  It ends *committed* (the entry is in the cache) or *failed*
(the temp file is gone, watchers abort their clients).

`Inflight` maps keys to running transfers: the first miss starts one, later
misses join it.  A finished transfer leaves the map before anyone is told, so
a request that comes after sees the committed entry in the store.
"""

import os
import time

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from .errors import UpstreamUnavailable
from .logs import VaultLogger
from .store import CacheWriter, Entry

log = VaultLogger()

#: seconds a download that every client left waits for one to come back (clients retry)
ABANDON_GRACE = 10.0
#: a download that every client left is finished anyway when no more than this remains...
FINISH_IF_REMAINING = 64 * 1024 * 1024
# ...or when at least half of it is in: the bytes already fetched are worth the rest.


class Transfer:
    def __init__(self, key: str, url: str, label: str | None = None, clock=None):
        self.key = key
        #: the reactor, for the grace period of a download nobody waits for (None: no such rule)
        self.clock = clock
        #: client requests attached now (waiting or streaming)
        self.interested = 0
        self._abandon_timer = None
        self.url = url
        #: how logs name it: the path clients asked for, where that says more than the key
        self.label = label or key
        self.writer: CacheWriter | None = None
        #: bytes upstream announced (Content-Length or the size a backend knows), if known
        self.total: int | None = None
        #: what clients are told about the body (content type, etag, ...), set when streaming starts
        self.meta: dict = {}
        self.entry: Entry | None = None
        self.failure: Failure | None = None
        self._ready_waiters: list[Deferred] = []
        self._done_waiters: list[Deferred] = []
        self._watchers: list = []
        self._on_finished = []
        self._on_streaming = []
        #: a callable that stops the upstream transfer (set by the fetcher)
        self.cancel_upstream = None
        self.streaming = False
        #: how many client requests this transfer served (metrics)
        self.clients = 0
        self.started_at = time.monotonic()

    # -- what the fetcher calls -------------------------------------------

    def start_streaming(self, writer: CacheWriter, total: int | None, meta: dict) -> None:
        self.writer = writer
        self.total = total
        self.meta = meta
        self.streaming = True
        for callback in self._on_streaming:
            callback(self)
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(self)

    def data_written(self) -> None:
        for watcher in list(self._watchers):
            watcher()

    def committed(self, entry: Entry) -> None:
        if self.finished:
            return
        self.entry = entry
        self._finish()

    def failed(self, failure: Failure) -> None:
        if self.finished:
            return
        self.failure = failure
        self._finish()

    def abort(self, reason: str) -> None:
        """Stop now (shutdown): the temp file goes, every client is cut off."""
        if self.finished:
            return
        if self.writer is not None:
            self.writer.abort()
        self.failed(Failure(UpstreamUnavailable(reason)))
        if self.cancel_upstream is not None:
            self.cancel_upstream()

    # -- what clients use ---------------------------------------------------

    def attach(self) -> None:
        """A client request waits for (or streams) this download."""
        self.interested += 1
        self.clients += 1
        if self._abandon_timer is not None and self._abandon_timer.active():
            self._abandon_timer.cancel()

    def detach(self) -> None:
        """
        A client request is over (answered, or the client left).  When the
        last one goes, the download is given `ABANDON_GRACE` seconds for a
        client to come back, then stopped unless it is worth finishing.
        """
        self.interested -= 1
        if self.interested <= 0 and not self.finished and self.clock is not None:
            self._abandon_timer = self.clock.callLater(ABANDON_GRACE, self._abandoned)

    def worth_finishing(self) -> bool:
        """Nobody waits: finish only what is nearly done or half done (and of known size)."""
        if not self.streaming or self.total is None:
            return False
        written = self.available()
        remaining = self.total - written
        return remaining <= FINISH_IF_REMAINING or written >= remaining

    def _abandoned(self) -> None:
        if self.interested > 0 or self.finished:
            return
        if self.worth_finishing():
            log.info("Every client left the download of {label}; finishing it ({done} of {total} bytes are in)",
                     label=self.label, done=self.available(), total=self.total)
            return
        log.info("Stopping the download of {label}: every client left and most of it is still to come",
                 label=self.label)
        self.abort("every client left")

    @property
    def finished(self) -> bool:
        return self.entry is not None or self.failure is not None

    def ready(self) -> Deferred:
        """Fires with this transfer once it streams, or fails like upstream did."""
        if self.streaming or self.entry is not None:
            d = Deferred()
            d.callback(self)
            return d
        if self.failure is not None:
            return fail(self.failure)
        d = Deferred()
        self._ready_waiters.append(d)
        return d

    def done(self) -> Deferred:
        """Fires with the committed `Entry`, or fails."""
        d = Deferred()
        if self.entry is not None:
            d.callback(self.entry)
        elif self.failure is not None:
            d.errback(self.failure)
        else:
            self._done_waiters.append(d)
        return d

    def on_finished(self, callback) -> None:
        self._on_finished.append(callback)

    def on_streaming(self, callback) -> None:
        self._on_streaming.append(callback)

    def available(self) -> int:
        if self.entry is not None:
            return self.entry.size
        return self.writer.size if self.writer is not None else 0

    @property
    def size(self) -> int | None:
        if self.entry is not None:
            return self.entry.size
        return self.total

    @property
    def complete(self) -> bool:
        return self.entry is not None

    def open(self) -> int:
        """A read descriptor on the bytes so far (valid across the final rename)."""
        if self.entry is not None:
            return os.open(self.entry.path, os.O_RDONLY | os.O_CLOEXEC)
        return os.open(self.writer.temp_path, os.O_RDONLY | os.O_CLOEXEC)

    def closed(self) -> None:
        """A reader let go of its descriptor (nothing to count for a file still being written)."""

    def watch(self, callback) -> None:
        self._watchers.append(callback)

    def unwatch(self, callback) -> None:
        try:
            self._watchers.remove(callback)
        except ValueError:
            pass

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)

    # -- internals ------------------------------------------------------------

    def _finish(self) -> None:
        if self._abandon_timer is not None and self._abandon_timer.active():
            self._abandon_timer.cancel()
        for callback in self._on_finished:
            callback(self)
        self._on_finished = []
        self._on_streaming = []
        ready, self._ready_waiters = self._ready_waiters, []
        done, self._done_waiters = self._done_waiters, []
        for d in ready:
            if self.failure is not None:
                d.errback(self.failure)
            else:
                d.callback(self)
        for d in done:
            if self.failure is not None:
                d.errback(self.failure)
            else:
                d.callback(self.entry)
        for watcher in list(self._watchers):
            watcher()


class HolderGone(Exception):
    """The process that held a key's download lock let go before streaming: try again."""


class RemoteTransfer(Transfer):
    """
    A download that another process (sharing the cache) is doing: the holder
    of the key's lock publishes the temp path and metadata in the lock file;
    this follower polls the growing file, the lock and the store.  The
    holder commits before it releases the lock, so "lock free and no entry"
    means the download failed or its process died.
    """

    POLL = 0.05

    def __init__(self, key: str, store, reactor, label: str | None = None):
        super().__init__(key, "another vault process", label)
        self.store = store
        self.lock = store.lock(key)
        self._fd: int | None = None
        self._poller = LoopingCall(self._poll)
        self._poller.clock = reactor
        self._poller.start(self.POLL, now=True)

    def _poll(self):
        if self.finished:
            self._stop()
            return
        if self.streaming:
            self._follow()
            return
        if not self.lock.held_elsewhere():
            self._stop()
            entry = self.store.lookup(self.key)
            if entry is not None:
                self.committed(entry)
            else:
                self.failed(Failure(HolderGone(self.key)))
            return
        info = self.lock.read_info()
        if not info:
            return
        try:
            self._fd = os.open(info["temp"], os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # renamed or removed meanwhile: the next poll sees which
        self.total = info.get("total")
        self.meta = info.get("meta") or {}
        self.streaming = True
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(self)
        self.data_written()

    def _follow(self):
        """
        The file we follow either becomes the entry (the same inode under the
        final name) or dies (unlinked, or the lock let go without a commit).
        A later download of the same key is a different inode: not ours.
        """
        followed = os.fstat(self._fd)
        entry = self.store.lookup(self.key)
        if entry is not None:
            try:
                final = os.stat(entry.path)
                ours = (final.st_ino, final.st_dev) == (followed.st_ino, followed.st_dev)
            except OSError:
                ours = False
            self._stop()
            if ours:
                self.committed(entry)
            else:
                self._lost()
            return
        if followed.st_nlink == 0 or not self.lock.held_elsewhere():
            self._stop()
            self._lost()
            return
        self.data_written()

    def _lost(self):
        self.failed(Failure(UpstreamUnavailable(
            f"the download of {self.label} in another vault process did not complete")))

    def _stop(self):
        if self._poller.running:
            self._poller.stop()

    def available(self) -> int:
        if self.entry is not None:
            return self.entry.size
        if self._fd is None:
            return 0
        return os.fstat(self._fd).st_size

    def open(self) -> int:
        if self.entry is not None:
            return os.open(self.entry.path, os.O_RDONLY | os.O_CLOEXEC)
        return os.dup(self._fd)

    def _finish(self):
        self._stop()
        super()._finish()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Inflight:
    """key -> running `Transfer`; at most one per key in this process."""

    def __init__(self):
        self._running: dict[str, Transfer] = {}

    def get(self, key: str) -> Transfer | None:
        return self._running.get(key)

    def join(self, key: str, start) -> tuple[Transfer, bool]:
        """
        The running transfer for `key`, or a new one from ``start()``.
        Returns (transfer, started_here).
        """
        running = self._running.get(key)
        if running is not None:
            return running, False
        transfer = start()
        if not transfer.finished:
            self._running[key] = transfer
            transfer.on_finished(lambda t: self._running.pop(key, None) if self._running.get(key) is t else None)
        return transfer, True

    def __len__(self) -> int:
        return len(self._running)

    def transfers(self) -> list[Transfer]:
        return list(self._running.values())
