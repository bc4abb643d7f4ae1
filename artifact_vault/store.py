"""
The cache on disk.

Layout: every entry is a file at ``cache_dir/<key>`` (a key is a relative
POSIX path that starts with the backend's name) with a JSON sidecar
``<file>.vault-meta`` beside it.  A download is written to
``<file>.<random>.vault-tmp`` beside its final name and becomes visible only
through `CacheWriter.commit`: data fsynced, sidecar written and renamed, then
the data renamed over the final name.  The data rename is the commit point, so
a crash at any moment leaves either the old state or the new one, plus
leftover ``.vault-tmp`` files that `CacheStore.sweep` removes at start.

Keys are built by backends from path segments that `safe_segments` has
checked; `CacheStore.path_for` checks again that the result stays below
``cache_dir``, so no key can name a file outside it.
"""

import collections
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred, DeferredList
from twisted.python.failure import Failure

from .logs import VaultLogger
from twisted.internet.threads import deferToThread

log = VaultLogger()

META_SUFFIX = ".vault-meta"
TEMP_SUFFIX = ".vault-tmp"
RESERVED_SUFFIXES = (META_SUFFIX, TEMP_SUFFIX)
MAX_SEGMENT = 200  # bytes; leaves room for the temp suffix under NAME_MAX (255)
MAX_PATH = 3000


_READERS: collections.Counter = collections.Counter()


def open_readers() -> collections.Counter:
    """path -> how many clients of this process are reading that committed file now."""
    return _READERS


class UnsafePath(ValueError):
    """A request path that cannot name a cache entry (traversal, encoding tricks)."""


#: request paths checked lately and their segments (clients ask for the same files over and over)
_CHECKED: dict = {}
_CHECKED_LIMIT = 4096


def safe_segments(raw: bytes) -> list[str]:
    """
    Split a raw (still percent-encoded) request path into decoded segments,
    refusing anything that could leave its folder or mean two things; see
    `_safe_segments`.  Paths that passed lately are remembered (a bounded
    memo), so a hot file is not checked again on every request.
    """
    segments = _CHECKED.get(raw)
    if segments is None:
        segments = _safe_segments(raw)
        if len(_CHECKED) >= _CHECKED_LIMIT:
            _CHECKED.clear()
        _CHECKED[raw] = segments
    return list(segments)


def _safe_segments(raw: bytes) -> tuple:
    """
    Split a raw (still percent-encoded) request path into decoded segments,
    refusing anything that could leave its folder or mean two things.

    Rejects: empty segments (``//``), ``.`` and ``..`` (also encoded), an
    encoded ``/`` or ``\\`` inside a segment, backslashes, NUL and other
    control characters, a ``%`` left after decoding (double encoding),
    non-UTF-8 bytes, overlong segments and paths, and our own reserved
    file suffixes.
    """
    if len(raw) > MAX_PATH:
        raise UnsafePath("path too long")
    if not raw:
        raise UnsafePath("empty path")
    segments = []
    for part in raw.split(b"/"):
        decoded = unquote_to_bytes(part)
        try:
            text = decoded.decode("utf-8")
        except UnicodeDecodeError:
            raise UnsafePath("path is not UTF-8") from None
        if text in ("", ".", ".."):
            raise UnsafePath(f"path segment {text!r} is not allowed")
        if "/" in text or "\\" in text or "%" in text:
            raise UnsafePath("encoded separators or double encoding are not allowed")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            raise UnsafePath("control characters are not allowed")
        if len(decoded) > MAX_SEGMENT:
            raise UnsafePath("path segment too long")
        if text.endswith(RESERVED_SUFFIXES):
            raise UnsafePath("reserved file name")
        segments.append(text)
    return tuple(segments)


@dataclass(frozen=True)
class Entry:
    """A committed cache entry: the data file and what we know about it."""

    key: str
    path: str
    meta: dict

    @property
    def size(self) -> int:
        return self.meta["size"]


class CacheStore:
    #: entries whose sidecar was read, checked against a stat of the data file on every lookup
    MEMO_LIMIT = 100_000
    #: a hit moves an entry's last-use mark at most this often (seconds)
    TOUCH_EVERY = 60.0
    #: bodies this small are kept in memory once read (`small_body`), up to SMALL_BODIES_BYTES in all
    SMALL_BODY = 64 * 1024
    SMALL_BODIES_BYTES = 16 * 1024 * 1024

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self._memo: dict[str, tuple[tuple, Entry]] = {}
        self._touched: dict[str, float] = {}
        self._small: collections.OrderedDict = collections.OrderedDict()  # key -> (entry, bytes)
        self._small_bytes = 0
        #: writers with a promised size, until they commit or abort
        self._writing: set = set()
        #: small writes running in threads (`write_later`)
        self._pending: set = set()

    def path_for(self, key: str) -> str:
        path = os.path.normpath(os.path.join(self.root, key))
        if not path.startswith(self.root + os.sep):
            raise UnsafePath(f"key {key!r} leaves the cache")
        return path

    def lookup(self, key: str) -> Entry | None:
        """
        The committed entry for `key`, or None (also for a damaged one).  A
        commit replaces the data file (a new inode), so one stat tells
        whether the sidecar read last time still describes it, in this
        process or after another one changed the cache.
        """
        path = self.path_for(key)
        try:
            st = os.stat(path)
        except OSError:
            self._memo.pop(key, None)
            return None
        signature = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)
        memo = self._memo.get(key)
        if memo is not None and memo[0] == signature:
            return memo[1]
        try:
            with open(path + META_SUFFIX, "rb") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("size") != st.st_size:
            return None
        entry = Entry(key, path, meta)
        if len(self._memo) >= self.MEMO_LIMIT:
            self._memo.clear()
        self._memo[key] = (signature, entry)
        return entry

    def small_body(self, entry: Entry) -> bytes | None:
        """
        The body of `entry` (as `lookup` returned it) when it is small: read
        once, then from memory while `lookup` keeps returning the same entry
        (the data file's stat unchanged).  None for a larger one.  The least
        recently served go when more than `SMALL_BODIES_BYTES` are kept.
        """
        size = entry.size
        if size > self.SMALL_BODY:
            return None
        kept = self._small.get(entry.key)
        if kept is not None and kept[0] is entry:
            self._small.move_to_end(entry.key)
            return kept[1]
        fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(fd, size + 1, 0)
        finally:
            os.close(fd)
        if len(data) != size:
            raise OSError(errno.EIO, "the cached file is not as long as its metadata says")
        if kept is not None:
            self._small_bytes -= len(kept[1])
        self._small[entry.key] = (entry, data)
        self._small.move_to_end(entry.key)
        self._small_bytes += size
        while self._small_bytes > self.SMALL_BODIES_BYTES:
            _, (_, dropped) = self._small.popitem(last=False)
            self._small_bytes -= len(dropped)
        return data

    def touch(self, entry: Entry) -> None:
        """Mark `entry` as just used: its sidecar's mtime is the clock of LRU eviction."""
        now = time.monotonic()
        if now - self._touched.get(entry.key, -self.TOUCH_EVERY) < self.TOUCH_EVERY:
            return
        if len(self._touched) >= self.MEMO_LIMIT:
            self._touched.clear()
        self._touched[entry.key] = now
        try:
            os.utime(entry.path + META_SUFFIX)
        except OSError:
            pass

    def publish(self, writer: "CacheWriter", meta: dict) -> Deferred:
        """Commit `writer` (fsyncs and renames) in a thread; fires with the `Entry`."""
        return deferToThread(writer.commit, meta)

    def walk(self, backend: str | None = None, prefix: str = "", details: bool = False):
        """
        Every committed entry below `backend` (all when None) whose key below
        the backend starts with `prefix`, in key order: dicts with ``key``,
        ``backend``, ``size``, ``last_used`` (the sidecar's mtime, which
        `touch` moves) and, with `details`, ``fetched_at`` and
        ``upstream_url``.  It reads the disk: run it in a thread.  The one
        walker of the cache (janitor, admin).
        """
        wanted = f"{backend}/{prefix}" if backend else ""
        start = os.path.join(self.root, os.path.dirname(wanted)) if wanted else self.root
        for folder, dirs, files in os.walk(start):
            if folder == self.root and ".locks" in dirs:
                dirs.remove(".locks")
            dirs.sort()
            names = set(files)
            for name in sorted(files):
                if name.endswith(RESERVED_SUFFIXES) or name + META_SUFFIX not in names:
                    continue
                path = os.path.join(folder, name)
                key = os.path.relpath(path, self.root).replace(os.sep, "/")
                if not key.startswith(wanted):
                    continue
                try:
                    size = os.stat(path).st_size
                    used = os.stat(path + META_SUFFIX).st_mtime
                except OSError:
                    continue  # removed meanwhile
                entry = {"key": key, "backend": key.split("/", 1)[0], "size": size, "last_used": used}
                if details:
                    try:
                        with open(path + META_SUFFIX, "rb") as f:
                            meta = json.load(f)
                    except (OSError, ValueError):
                        meta = {}
                    meta = meta if isinstance(meta, dict) else {}
                    entry["fetched_at"] = meta.get("fetched_at")
                    entry["upstream_url"] = meta.get("upstream_url")
                yield entry

    def writer(self, key: str, expected: int | None = None) -> "CacheWriter":
        """
        A writer for `key`.  `expected` (bytes) is promised to it: until it
        commits or aborts, `free_space` leaves that much room for it.
        """
        writer = CacheWriter(self, key, self.path_for(key), expected)
        if expected:
            self._writing.add(writer)
        return writer

    def promised(self) -> int:
        """Bytes that downloads under way have announced and not written yet."""
        return sum(max(0, w.expected - w.size) for w in self._writing)

    def free_space(self, key: str) -> int:
        """Bytes free on the filesystem that would hold `key`, less what running downloads will still write."""
        folder = os.path.dirname(self.path_for(key))
        while not os.path.isdir(folder) and folder != self.root:
            folder = os.path.dirname(folder)
        try:
            free = shutil.disk_usage(folder if os.path.isdir(folder) else self.root).free
        except OSError:
            return 1 << 62
        return free - self.promised()

    def remove(self, key: str) -> None:
        self._memo.pop(key, None)
        self._touched.pop(key, None)
        path = self.path_for(key)
        for p in (path, path + META_SUFFIX):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def lock(self, key: str) -> "KeyLock":
        """
        The advisory lock that makes one process, among all that share this
        cache, the downloader of `key`.  Lock files live apart from the
        entries (``.locks/``) and are never deleted, so that every process
        locks the same inode.
        """
        digest = hashlib.sha256(key.encode()).hexdigest()
        return KeyLock(os.path.join(self.root, ".locks", digest[:2], digest))

    def sweep(self) -> int:
        """
        Remove temp files left by a crash; return how many.  A temp file whose
        key another process is downloading right now is left alone.
        """
        removed = 0
        for folder, dirs, files in os.walk(self.root):
            if folder == self.root and ".locks" in dirs:
                dirs.remove(".locks")
            for name in files:
                if not name.endswith(TEMP_SUFFIX):
                    continue
                path = os.path.join(folder, name)
                final = name[: -len(TEMP_SUFFIX)].rsplit(".", 1)[0]
                if final.endswith(META_SUFFIX):
                    final = final[: -len(META_SUFFIX)]
                key = os.path.relpath(os.path.join(folder, final), self.root)
                if self.lock(key).held_elsewhere():
                    continue
                try:
                    os.unlink(path)
                    removed += 1
                except OSError:
                    pass
        for folder, _dirs, files in os.walk(os.path.join(self.root, ".locks")):
            for name in files:
                # a lock file left by a process that died holding it
                KeyLock(os.path.join(folder, name)).remove_if_free()
        return removed

    def write_later(self, key: str, data: bytes, meta: dict) -> Deferred:
        """
        `write_small` in a thread (records, kept answers): fires with the
        `Entry`, or with None when it could not be written.  Failing to keep
        a record (disk full, read-only) costs offline use later, not the
        answer now: it is logged, not raised.
        """
        d = deferToThread(self.write_small, key, data, meta)
        self._pending.add(d)

        def done(result):
            self._pending.discard(d)
            if isinstance(result, Failure):
                if result.check(OSError):
                    log.warn("Could not keep {key} in the cache: {why}", key=key, why=result.value.strerror)
                else:
                    log.failure("Could not keep {key} in the cache", result, key=key)
                return None
            return result

        return d.addBoth(done)

    def settled(self) -> Deferred:
        """Fires once the writes started by `write_later` so far are done (shutdown waits for it)."""
        return DeferredList(list(self._pending), consumeErrors=True).addCallback(lambda _: None)

    def write_small(self, key: str, data: bytes, meta: dict) -> Entry:
        """Store a small body (records, API answers) in one go, with the same commit rules."""
        path = self.path_for(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temp = f"{path}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
        meta = dict(meta, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        meta.setdefault("fetched_at", time.time())
        meta_temp = f"{path}{META_SUFFIX}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
        try:
            for target, body in ((temp, data), (meta_temp, json.dumps(meta, sort_keys=True).encode())):
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                try:
                    view = memoryview(body)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(meta_temp, path + META_SUFFIX)
            os.replace(temp, path)
        except BaseException:
            for p in (meta_temp, temp):
                try:
                    os.unlink(p)
                except OSError:
                    pass
            raise
        _fsync_dir(os.path.dirname(path))
        return Entry(key, path, meta)


class KeyLock:
    """
    An flock(2) on one lock file.  The holder writes what followers need to
    stream the growing file (temp path, announced size, metadata) into the
    lock file; the kernel releases the lock when the holder dies, which is how
    followers learn that a download will never complete.
    """

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def _open(self) -> int:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def try_acquire(self) -> bool:
        for _ in range(100):
            fd = self._open()
            for attempt in (1, 2):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        os.close(fd)
                        raise
                    if attempt == 2 or self.read_info() is not None:
                        os.close(fd)
                        return False
                    # Nobody published yet: maybe only another process's held_elsewhere()
                    # probe (a shared lock for a moment). Look once more.
                    time.sleep(0.001)
            if not self._still_linked(fd):
                # The holder we waited for removed this lock file as it let go:
                # the lock that counts is on whatever file the name holds now.
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
            except OSError:
                os.close(fd)
                raise
            self.fd = fd
            return True
        return False

    def _still_linked(self, fd: int) -> bool:
        try:
            here, there = os.fstat(fd), os.stat(self.path)
        except OSError:
            return False
        return (here.st_ino, here.st_dev) == (there.st_ino, there.st_dev)

    def publish(self, info: dict) -> bool:
        """Best effort: without it (disk full), followers wait for the commit instead of streaming."""
        data = json.dumps(info).encode()
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)
        except OSError:
            return False
        return True

    def release(self) -> None:
        """
        Let go, and remove the lock file while still holding it, so that lock
        files never pile up (one per key ever asked for).  Whoever opened the
        old file meanwhile sees that it is no longer linked and starts over.
        """
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                if self._still_linked(fd):
                    os.unlink(self.path)
            except OSError:
                pass
            finally:
                os.close(fd)  # closing drops the flock

    def remove_if_free(self) -> None:
        """Remove the lock file unless someone holds it (start-up sweep)."""
        try:
            acquired = self.try_acquire()
        except OSError:
            return
        if acquired:
            self.release()

    def held_elsewhere(self) -> bool:
        """True while some other open file description holds the lock."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False

    def read_info(self) -> dict | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            return json.loads(data) if data else None
        except (OSError, ValueError):
            return None


HASH_CHUNK = 1024 * 1024
#: bytes a writer may have ahead of its hash before it asks its producer to pause
HASH_BACKLOG = 8 * 1024 * 1024
#: bytes written between two requests to the kernel to start writing them to disk
WRITEBACK_EVERY = 8 * 1024 * 1024
SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writing the dirty pages of a range; do not wait


def _sync_file_range():
    """sync_file_range(2) of the C library (Linux), or None where there is none."""
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()


class CacheWriter:
    """
    One entry being written: bytes go straight to a temp file (os.write on an
    unbuffered descriptor, so other readers of the temp file see them at once).

    The sha256 is computed in a helper thread that reads the temp file back
    (from the page cache) behind the writer: no bytes are held for it, and
    the reactor never waits for it.  `write` says when the hash has fallen
    more than `HASH_BACKLOG` behind; the caller then pauses its producer
    until `drained()` fires.  `digest()` fires with the hash of everything
    written; `commit` (blocking: fsyncs and renames) runs in a thread through
    `CacheStore.publish`.

    Every `WRITEBACK_EVERY` bytes, the kernel is asked (from the writeback
    thread: asking may wait for the device) to start writing what came so
    far to disk.  Otherwise a big file waits whole in the page cache for the
    commit's fsync, and its last byte with it (~0.45 s per GiB here).
    """

    def __init__(self, store: CacheStore, key: str, final_path: str, expected: int | None = None, reactor=None):
        self.store = store
        self.key = key
        self.final_path = final_path
        self.expected = expected or 0
        os.makedirs(os.path.dirname(final_path), exist_ok=True)
        self.temp_path = f"{final_path}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
        self.fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.size = 0
        self.closed = False
        self._hash = _FileHash(self.temp_path, reactor)
        self._written_back = 0  # bytes whose write to disk has been asked for
        self._writing_back = False

    def write(self, data) -> bool:
        """Write all of `data`; True when the hash is far behind (pause, then wait for `drained`)."""
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        return self._wrote(len(data))

    def write_from_pipe(self, pipe: int, count: int) -> bool:
        """
        Move `count` bytes waiting in `pipe` to the file with splice(2), so that
        they never pass through Python; otherwise as `write`.
        """
        left = count
        while left:
            n = os.splice(pipe, self.fd, left)
            if n == 0:
                raise OSError(errno.EIO, "the pipe ran dry before the bytes it held were written")
            left -= n
        return self._wrote(count)

    def _wrote(self, count: int) -> bool:
        self.size += count
        self._hash.advance(self.size)
        if self.size - self._written_back >= WRITEBACK_EVERY and not self._writing_back and _SYNC_FILE_RANGE:
            self._write_back()
        return self.size - self._hash.hashed > HASH_BACKLOG

    def _write_back(self) -> None:
        # The job gets a descriptor of its own: this one may be closed before it runs.
        start, end = self._written_back, self.size
        self._written_back = end
        fd = os.dup(self.fd)
        self._writing_back = True

        def job():  # in the writeback thread
            try:
                _SYNC_FILE_RANGE(fd, start, end - start, SYNC_FILE_RANGE_WRITE)  # best effort
            finally:
                os.close(fd)
                self._writing_back = False

        _pool("writeback").callInThread(job)

    def drained(self) -> Deferred:
        """Fires once the hash is back within `HASH_BACKLOG` of the writer."""
        return self._hash.when(lambda: self.size - self._hash.hashed <= HASH_BACKLOG // 2)

    def digest(self) -> Deferred:
        """Fires with the sha256 (hex) of everything written so far."""
        size = self.size
        return self._hash.when(lambda: self._hash.hashed >= size).addCallback(lambda _: self._hash.hexdigest())

    def commit(self, meta: dict) -> Entry:
        """
        fsync, write the sidecar, rename into place; return the entry.  Blocking:
        call it in a thread (`CacheStore.publish`), after `digest()` has fired.
        """
        self.store._writing.discard(self)
        os.fsync(self.fd)
        os.close(self.fd)
        self.closed = True
        self._hash.close()
        meta = dict(meta, size=self.size, sha256=self._hash.hexdigest())
        meta.setdefault("fetched_at", time.time())
        meta_temp = f"{self.final_path}{META_SUFFIX}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
        try:
            with open(meta_temp, "w", encoding="utf-8") as f:
                json.dump(meta, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(meta_temp, self.final_path + META_SUFFIX)
            os.replace(self.temp_path, self.final_path)
        except BaseException:
            for p in (meta_temp, self.temp_path):
                try:
                    os.unlink(p)
                except OSError:
                    pass
            raise
        _fsync_dir(os.path.dirname(self.final_path))
        return Entry(self.key, self.final_path, meta)

    def abort(self) -> None:
        self.store._writing.discard(self)
        self._hash.close()
        if not self.closed:
            self.closed = True
            try:
                os.close(self.fd)
            except OSError:
                pass
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass


class _FileHash:
    """
    sha256 of a file that is being written, computed in the shared hash
    thread: `advance(n)` says that n bytes are on disk; at most one job per
    file is queued, and it hashes whatever has been written when it runs.
    """

    def __init__(self, path: str, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.sha = hashlib.sha256()
        self.hashed = 0
        self.target = 0
        self.queued = False
        self.closing = False
        self.failure = None
        self._waiting: list[tuple] = []

    def advance(self, written: int) -> None:
        self.target = written
        if not self.queued and not self.closing:
            self.queued = True
            _pool("sha256").callInThread(self._run)

    def _run(self) -> None:  # in the hash thread
        try:
            while self.hashed < self.target and self.fd is not None:
                data = os.pread(self.fd, min(HASH_CHUNK, self.target - self.hashed), self.hashed)
                if not data:
                    raise OSError(errno.EIO, "the temp file is shorter than what was written")
                self.sha.update(data)
                self.hashed += len(data)
        except (OSError, TypeError) as e:
            self.failure = e
        self.reactor.callFromThread(self._ran)

    def _ran(self) -> None:
        self.queued = False
        if self.closing:
            self.close()
        elif self.failure is None and self.hashed < self.target:
            self.advance(self.target)
        self._check()

    def when(self, condition) -> Deferred:
        d = Deferred()
        self._waiting.append((condition, d))
        self._check()
        return d

    def _check(self) -> None:
        waiting, self._waiting = self._waiting, []
        for condition, d in waiting:
            if self.failure is not None:
                d.errback(self.failure)
            elif condition():
                d.callback(None)
            else:
                self._waiting.append((condition, d))

    def hexdigest(self) -> str:
        return self.sha.hexdigest()

    def close(self) -> None:
        """Let go of the file; while the thread still reads it, the thread's end does."""
        self.closing = True
        if self.fd is not None and not self.queued:
            fd, self.fd = self.fd, None
            os.close(fd)


_POOLS: dict = {}


def _pool(name: str):
    """
    One thread per kind of work, shared by every writer: "sha256" hashes
    (hashlib lets go of the GIL while it works), "writeback" asks the kernel
    to write to disk.
    """
    pool = _POOLS.get(name)
    if pool is None:
        from twisted.internet import reactor
        from twisted.python.threadpool import ThreadPool

        pool = _POOLS[name] = ThreadPool(1, 1, name)
        pool.start()
        reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
    return pool


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
