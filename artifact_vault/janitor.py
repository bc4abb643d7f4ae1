"""
Keeping the cache within ``max_cache_size`` and knowing how big it is.

Every `SCAN_INTERVAL` seconds, and soon after a download that may have
pushed the cache over a cap, the janitor walks the cache in a thread
(`CacheStore.walk`) and lists the entries: size, and last use (the mtime of
the sidecar, which `CacheStore.touch` sets on every hit and every read of a
record; atime is not relied on).  Back in the reactor it updates the usage
gauges and, where a cap is exceeded, removes the least recently used entries
(file contents and the small records beside them alike), never one that a
client is reading right now, until the cap holds again: first each
backend's own cap, then the global one.
"""

from dataclasses import dataclass

from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread

from .logs import VaultLogger
from .store import open_readers

log = VaultLogger()

SCAN_INTERVAL = 60.0
SOON = 1.0


@dataclass
class _Entry:
    key: str
    backend: str
    size: int
    used: float


class Janitor(service.Service):
    def __init__(self, machinery, config, reactor):
        self.store = machinery.store
        self.metrics = machinery.metrics
        self.cap = config.max_cache_size
        self.backends = {b.name: b for b in machinery.backends}
        self.reactor = reactor
        self.total = 0
        #: cache use as the last scan measured it (the status page shows it)
        self.usage: dict = {}
        machinery.downloads.observe(lambda d: d.entry is not None and self.note_added(d.entry.size))
        self._soon = None
        self._scanning = None
        self._loop = LoopingCall(self.scan)
        self._loop.clock = reactor

    def startService(self):
        super().startService()
        self._loop.start(SCAN_INTERVAL, now=True)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        return self._scanning

    def note_added(self, size: int) -> None:
        """A download was committed: scan soon if that may break a cap."""
        self.total += size
        capped = self.cap is not None or any(b.config.max_cache_size for b in self.backends.values())
        if capped and (self._soon is None or not self._soon.active()):
            self._soon = self.reactor.callLater(SOON, self.scan)

    def scan(self):
        if self._scanning is not None:
            return self._scanning
        d = self._scanning = deferToThread(self._collect)

        def done(result):
            self._scanning = None
            return result

        d.addCallback(self._apply)
        d.addErrback(lambda f: log.failure("Cache scan failed", f))
        return d.addBoth(done)

    def _collect(self) -> list[_Entry]:
        return [_Entry(e["key"], e["backend"], e["size"], e["last_used"]) for e in self.store.walk()]

    def _apply(self, entries: list[_Entry]) -> None:
        usage: dict[str, dict] = {}
        for e in entries:
            u = usage.setdefault(e.backend, {"bytes": 0, "files": 0})
            u["bytes"] += e.size
            u["files"] += 1
        for name, backend in self.backends.items():
            cap = backend.config.max_cache_size
            if cap is not None:
                self._evict([e for e in entries if e.backend == name], cap, usage)
        if self.cap is not None:
            self._evict(entries, self.cap, usage)
        self._publish(usage)

    def _publish(self, usage: dict) -> None:
        """Usage after this scan's evictions: gauges and the status page."""
        self.total = sum(u["bytes"] for u in usage.values())
        metrics = self.metrics
        if metrics is not None:
            for name, u in usage.items():
                metrics.cache_bytes.labels(name).set(u["bytes"])
                metrics.cache_files.labels(name).set(u["files"])
        self.usage = {"bytes": self.total, "files": sum(u["files"] for u in usage.values()),
                            "max_bytes": self.cap, "backends": usage}

    def _evict(self, entries: list[_Entry], cap: int, usage: dict) -> None:
        held = sum(e.size for e in entries)
        if held <= cap:
            return
        reading = open_readers()
        for e in sorted(entries, key=lambda e: e.used):
            if held <= cap:
                break
            if e.size == 0:
                continue
            path = self.store.path_for(e.key)
            if reading.get(path):
                continue
            size, e.size = e.size, 0
            self.store.remove(e.key)
            held -= size
            usage[e.backend]["bytes"] -= size
            usage[e.backend]["files"] -= 1
            if self.metrics is not None:
                self.metrics.evictions.labels(e.backend).inc()
                self.metrics.evicted_bytes.labels(e.backend).inc(size)
            log.info("Evicted {key} (least recently used) to keep the cache under {cap} bytes", key=e.key, cap=cap)
