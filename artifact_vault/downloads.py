"""
One owner per download, from the first request to the published file.

`Downloads.join(spec)` returns the download running for ``spec.key`` — in
this process, or in another process sharing the cache (followed through the
key's lock file) — or starts one.  A `Download` has an explicit state:

``PENDING``    waiting for a download slot or for upstream's answer; ``ready()`` waits
``STREAMING``  bytes land in a temp file; each client streams what is on disk, then the live bytes
``COMMITTED``  verified and published: the entry is in the store
``FAILED``     the temp file is gone; clients still streaming are aborted

The upstream side (`fetch.Upstream.fetch`) knows nothing of clients: when
upstream answers well it opens a writer through `Download.open_writer`,
pours the body into it, and fires one Deferred once the body is complete
and verified.  The download then publishes the entry (fsync and renames, in
a thread) and tells its clients.  Metrics and the janitor observe finished
downloads through `Downloads.observe`, registered once.
"""

import enum
import os
import time
from dataclasses import dataclass, field
from typing import Mapping

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from .errors import StorageFull, UpstreamUnavailable, VaultError
from .fetch import storage_error
from .logs import VaultLogger
from .store import CacheStore, Entry

log = VaultLogger()

#: seconds a download that every client left waits for one to come back (clients retry)
ABANDON_GRACE = 10.0
#: a download that every client left is finished anyway when no more than this remains...
FINISH_IF_REMAINING = 64 * 1024 * 1024
# ...or when at least half of it is in: the bytes already fetched are worth the rest.


class State(enum.Enum):
    PENDING = "pending"
    STREAMING = "streaming"
    COMMITTED = "committed"
    FAILED = "failed"


@dataclass(frozen=True)
class DownloadSpec:
    """What to fetch into the cache, given once."""

    key: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    #: header names dropped on a redirect to another origin
    sensitive_headers: tuple = ()
    timeout: float = 60
    max_redirects: int = 5
    #: what upstream must send: the download fails (nothing published) otherwise
    expected_size: int | None = None
    expected_sha256: str | None = None
    #: how logs name it: the path clients asked for, where that says more than the key
    label: str | None = None
    #: a new version of a mutable file (`freshness.KeptFiles`): an entry already in the
    #: store does not make the download unnecessary, and the commit replaces it
    replaces: bool = False
    #: PEM CAs an https:// upstream must chain to (None: the system's CAs)
    ca_file: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.key


class Download:
    """One download of one key, watched by every client that wants it."""

    def __init__(self, spec: DownloadSpec, clock=None):
        self.spec = spec
        self.key = spec.key
        self.label = spec.name
        self.clock = clock
        self.state = State.PENDING
        self.writer = None
        #: bytes upstream announced (Content-Length, or the size the spec expects), if known
        self.total: int | None = None
        #: what clients are told about the body (content type, etag, ...), set when streaming starts
        self.meta: dict = {}
        self.entry: Entry | None = None
        self.failure: Failure | None = None
        self.started_at = time.monotonic()
        #: client requests attached now (waiting or streaming), and in all
        self.interested = 0
        self.clients = 0
        #: stops the step under way now: waiting for a slot, then fetching (set by whoever runs it)
        self.stop_upstream = None
        #: the body is in and verified; its publish (fsync, renames) runs in a thread
        self.publishing = False
        #: our own read descriptor on the temp file, which each reader gets a copy of (see `open`)
        self._reader_fd: int | None = None
        self._ready: list[Deferred] = []
        self._watchers: list = []
        self._on_streaming: list = []
        self._on_finished: list = []
        self._abandon_timer = None

    # -- state ---------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.state in (State.COMMITTED, State.FAILED)

    @property
    def complete(self) -> bool:
        return self.state is State.COMMITTED

    @property
    def size(self) -> int | None:
        return self.entry.size if self.entry is not None else self.total

    def available(self) -> int:
        if self.entry is not None:
            return self.entry.size
        return self.writer.size if self.writer is not None else 0

    def on_streaming(self, callback) -> None:
        self._on_streaming.append(callback)

    def on_finished(self, callback) -> None:
        if self.finished:
            callback(self)
        else:
            self._on_finished.append(callback)

    # -- what clients use ------------------------------------------------------------

    def ready(self) -> Deferred:
        """
        Fires with this download once it streams (or is committed), or fails
        like upstream did.  Cancelling it (the client left) only drops this
        waiter.
        """
        if self.state in (State.STREAMING, State.COMMITTED):
            return succeed(self)
        if self.state is State.FAILED:
            d = Deferred()
            d.errback(self.failure)
            return d
        d = Deferred(lambda d: self._ready.remove(d) if d in self._ready else None)
        self._ready.append(d)
        return d

    def published(self) -> Deferred:
        """Fires with the committed `Entry`, or fails."""
        d = Deferred()

        def finished(download):
            if download.entry is not None:
                d.callback(download.entry)
            else:
                d.errback(download.failure)

        self.on_finished(finished)
        return d

    def attach(self) -> None:
        """A client request waits for (or streams) this download."""
        self.interested += 1
        self.clients += 1
        if self._abandon_timer is not None and self._abandon_timer.active():
            self._abandon_timer.cancel()

    def detach(self) -> None:
        """
        A client request is over (answered, or the client left).  When the
        last one goes, the download gets `ABANDON_GRACE` seconds for a client
        to come back, then stops unless it is worth finishing.
        """
        self.interested -= 1
        if self.interested <= 0 and not self.finished and self.clock is not None:
            self._abandon_timer = self.clock.callLater(ABANDON_GRACE, self._abandoned)

    def worth_finishing(self) -> bool:
        """Nobody waits: finish only what is nearly done or half done (and of known size)."""
        if self.state is not State.STREAMING or self.total is None:
            return False
        written = self.available()
        remaining = self.total - written
        return remaining <= FINISH_IF_REMAINING or written >= remaining

    def open(self) -> int:
        """
        A read descriptor on the bytes so far (valid across the final rename).
        Before the commit it is a copy of the one opened with the temp file:
        the rename runs in a thread and may land between a client's look into
        the store and this call, when the temp file's name is already gone and
        the commit not yet told (readers read at explicit offsets, so a shared
        file position does not matter).
        """
        if self.entry is not None:
            return os.open(self.entry.path, os.O_RDONLY | os.O_CLOEXEC)
        if self._reader_fd is None:
            raise FileNotFoundError(2, "the download has no file (yet, or any more)")
        return os.dup(self._reader_fd)

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

    # -- what the upstream side calls ----------------------------------------------------

    def open_writer(self, store: CacheStore, total: int | None, meta: dict):
        """
        Upstream answered well: open the temp file (refused when the announced
        size does not fit) and start streaming.  Returns the writer the body
        goes into; each write tells the watchers.
        """
        if self.finished:
            raise UpstreamUnavailable(f"the download of {self.label} was stopped")
        try:
            if total is not None and total > store.free_space(self.key):
                raise OSError(28, "not enough free space for the announced size")
            writer = store.writer(self.key, expected=total)
        except OSError as e:
            raise storage_error(e, self.key) from None
        try:
            self._reader_fd = os.open(writer.temp_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            writer.abort()
            raise storage_error(e, self.key) from None
        log.info("Caching {size} bytes for {label}", size=total if total is not None else "unknown",
                 label=self.label)
        self.writer, self.total, self.meta = writer, total, meta
        self.state = State.STREAMING
        for callback in self._on_streaming:
            callback(self)
        waiting, self._ready = self._ready, []
        for d in waiting:
            d.callback(self)
        return _TellingWriter(writer, self)

    def progressed(self) -> None:
        for watcher in list(self._watchers):
            watcher()

    def committed(self, entry: Entry) -> None:
        if self.finished:
            return
        self.entry = entry
        self.state = State.COMMITTED
        self._finish()

    def failed(self, failure: Failure) -> None:
        if self.finished:
            return
        if self.writer is not None:
            self.writer.abort()
        self.failure = failure
        self.state = State.FAILED
        self._finish()

    def abort(self, reason: str) -> None:
        """
        Stop now (shutdown, abandoned): the temp file goes, every client is
        cut off.  A download already publishing is left to finish: its bytes
        are all in and verified, and its thread owns the file.
        """
        if self.finished or self.publishing:
            return
        self.failed(Failure(UpstreamUnavailable(reason)))
        if self.stop_upstream is not None:
            self.stop_upstream()

    # -- internals ----------------------------------------------------------------------

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

    def _finish(self) -> None:
        if self._abandon_timer is not None and self._abandon_timer.active():
            self._abandon_timer.cancel()
        if self._reader_fd is not None:
            os.close(self._reader_fd)
            self._reader_fd = None
        finished, self._on_finished = self._on_finished, []
        self._on_streaming = []
        for callback in finished:
            callback(self)
        waiting, self._ready = self._ready, []
        for d in waiting:
            if self.failure is not None:
                d.errback(self.failure)
            else:
                d.callback(self)
        for watcher in list(self._watchers):
            watcher()


class _TellingWriter:
    """The writer a download hands upstream: each write also tells the download's watchers."""

    def __init__(self, writer, download: Download):
        self.writer = writer
        self.download = download

    def write(self, data) -> bool:
        behind = self.writer.write(data)
        self.download.progressed()
        return behind

    def write_from_pipe(self, pipe: int, count: int) -> bool:
        behind = self.writer.write_from_pipe(pipe, count)
        self.download.progressed()
        return behind

    def __getattr__(self, name):
        return getattr(self.writer, name)


class HolderGone(Exception):
    """The process that held a key's download lock let go before streaming: try again."""


class RemoteDownload(Download):
    """
    A download that another process (sharing the cache) is doing: the holder
    of the key's lock publishes the temp path and metadata in the lock file;
    this follower polls the growing file, the lock and the store.  The
    holder commits before it releases the lock, so "lock free and no entry"
    means the download failed or its process died.
    """

    POLL = 0.05

    def __init__(self, spec: DownloadSpec, store: CacheStore, clock):
        super().__init__(spec, None)
        self.store = store
        self.lock = store.lock(spec.key)
        self._fd: int | None = None
        self._poller = LoopingCall(self._poll)
        self._poller.clock = clock
        self._poller.start(self.POLL, now=True)

    def _poll(self):
        if self.finished:
            self._stop()
            return
        if self.state is State.STREAMING:
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
        self.state = State.STREAMING
        waiting, self._ready = self._ready, []
        for d in waiting:
            d.callback(self)
        self.progressed()

    def _follow(self):
        """
        The file we follow either becomes the entry (the same inode under the
        final name) or dies (unlinked, or the lock let go without a commit).
        Another inode under the final name is an older version (a mutable
        file being replaced) while the holder still works, a later download
        of the same key once it let go: not ours either way.
        """
        followed = os.fstat(self._fd)
        if self._is_ours(self.store.lookup(self.key), followed):
            return
        if followed.st_nlink == 0 or not self.lock.held_elsewhere():
            self._stop()
            # it may have been committed between the lookup and the lock check
            if not self._is_ours(self.store.lookup(self.key), followed):
                self._lost()
            return
        self.progressed()

    def _is_ours(self, entry, followed) -> bool:
        """Commit when `entry` is the file we follow."""
        if entry is None:
            return False
        try:
            final = os.stat(entry.path)
        except OSError:
            return False
        if (final.st_ino, final.st_dev) != (followed.st_ino, followed.st_dev):
            return False
        self._stop()
        self.committed(entry)
        return True

    def _lost(self):
        self.failed(Failure(UpstreamUnavailable(
            f"the download of {self.label} in another vault process did not complete")))

    def _stop(self):
        if self._poller.running:
            self._poller.stop()

    def available(self) -> int:
        if self.entry is not None:
            return self.entry.size
        return os.fstat(self._fd).st_size if self._fd is not None else 0

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


class Downloads:
    """
    key -> running `Download`: at most one per key in this process, and,
    through the per-key lock files of the store, one across the processes
    that share the cache.
    """

    def __init__(self, store: CacheStore, upstream, clock):
        self.store = store
        self.upstream = upstream
        self.clock = clock
        self._running: dict[str, Download] = {}
        self._observers: list = []

    def observe(self, on_finished) -> None:
        """Call ``on_finished(download)`` for every download this process ran, once it ends."""
        self._observers.append(on_finished)

    def get(self, key: str) -> Download | None:
        return self._running.get(key)

    def __len__(self) -> int:
        return len(self._running)

    def running(self) -> list[Download]:
        return list(self._running.values())

    def join(self, spec: DownloadSpec, slots=None) -> tuple[Download, str]:
        """
        The download of ``spec.key`` running here, or in another process, or
        a new one (which waits for one of `slots`, a DeferredSemaphore, before
        it asks upstream).  Returns (download, how): how is "started",
        "joined" (running here), "following" (another process) or
        "committed" (it finished just now).
        """
        running = self._running.get(spec.key)
        if running is not None:
            return running, "following" if isinstance(running, RemoteDownload) else "joined"
        lock = self.store.lock(spec.key)
        try:
            acquired = lock.try_acquire()
        except OSError as e:
            raise storage_error(e, spec.key) from None
        if not acquired:
            remote = RemoteDownload(spec, self.store, self.clock)
            self._running[spec.key] = remote  # later clients of this process follow it too
            remote.on_finished(lambda d: self._running.pop(spec.key, None) if self._running.get(spec.key) is d
                               else None)
            return remote, "following"
        committed = self.store.lookup(spec.key)  # it may have finished just before we locked
        if committed is not None and not spec.replaces:
            lock.release()
            done = Download(spec)
            done.committed(committed)
            return done, "committed"
        download = Download(spec, self.clock)
        self._running[spec.key] = download
        download.on_streaming(lambda d: lock.publish(
            {"temp": d.writer.temp_path, "total": d.total, "meta": d.meta, "pid": os.getpid()}))
        download.on_finished(lambda d: self._ended(d, lock))
        self._start(download, slots)
        return download, "started"

    def ready(self, spec: DownloadSpec, slots=None) -> tuple[Download, str, Deferred]:
        """
        `join`, and a Deferred that fires with the download once it streams.
        When the other process we followed let go before streaming, the
        Deferred follows a second join (ours, this time, or another's).
        """
        download, how = self.join(spec, slots)
        d = download.ready()
        if how == "following":
            def again(failure):
                failure.trap(HolderGone)
                second, _ = self.join(spec, slots)
                return second.ready()

            d.addErrback(again)
        return download, how, d

    def abort_all(self, reason: str) -> int:
        running = self.running()
        for download in running:
            download.abort(reason)
        return len(running)

    # -- internals ------------------------------------------------------------------------

    def _start(self, download: Download, slots) -> None:
        if slots is None:
            self._fetch(download)
            return

        def begin(_):
            if download.finished:  # stopped while it waited
                slots.release()
                return
            download.on_finished(lambda d: slots.release())
            self._fetch(download)

        waiting = slots.acquire()
        download.stop_upstream = waiting.cancel
        waiting.addCallbacks(begin, lambda failure: failure.trap(CancelledError))

    def _fetch(self, download: Download) -> None:
        fetching = self.upstream.fetch(download.spec, lambda total, meta: download.open_writer(self.store, total, meta))
        download.stop_upstream = fetching.cancel

        def publish(writer):
            download.publishing = True
            return self.store.publish(writer.writer, dict(download.meta))

        def published(entry):
            elapsed = max(time.monotonic() - download.started_at, 1e-6)
            log.info("Cached {size} bytes for {label} in {secs:.1f} s ({rate:.1f} MB/s)",
                     size=entry.size, label=download.label, secs=elapsed, rate=entry.size / elapsed / 1e6)
            download.committed(entry)

        def failed(failure):
            if failure.check(OSError):
                failure = Failure(storage_error(failure.value, download.key))
            elif failure.check(CancelledError) and download.finished:
                return None
            if failure.check(VaultError) and download.writer is not None:
                log.warn("Download of {label} failed: {why}", label=download.label, why=failure.value.message)
            download.failed(failure)
            return None

        fetching.addCallback(publish).addCallbacks(published, failed)
        fetching.addErrback(lambda f: log.failure("Publishing {label} failed", f, label=download.label))

    def _ended(self, download: Download, lock) -> None:
        if self._running.get(download.key) is download:
            del self._running[download.key]
        lock.release()
        for observer in self._observers:
            observer(download)


__all__ = ["ABANDON_GRACE", "Download", "DownloadSpec", "Downloads", "FINISH_IF_REMAINING", "HolderGone",
           "RemoteDownload", "State", "StorageFull"]
