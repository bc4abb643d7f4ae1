"""
Assembling one vault process: the store, the upstream client, the downloads,
the backends, the web tree and the services around them.  The tap (the
twistd plugin) and the worker processes both build their vault here.

`Machinery` is what every backend is handed: the shared parts, one each per
process.  `VaultService` is the service tree's top: it sweeps leftovers of a
crash before the port opens and, on stop, aborts the downloads still running
once the port is closed.
"""

import time
from dataclasses import dataclass, field

from twisted.application import service
from twisted.internet.defer import DeferredList

from . import accesslog, logs
from .admin import admin_pages
from .backends import backend_class, routers
from .cluster import Peers, new_instance
from .downloads import Downloads
from .fetch import Upstream
from .janitor import Janitor
from .metrics import VaultMetrics
from .site import HealthPage, HostCheck, MetricsPage, ProxyRouter, VaultPages, VaultRoot, make_site
from .status_page import ClusterJson, StatusJson, StatusPage
from .store import CacheStore

log = logs.VaultLogger()


@dataclass
class Machinery:
    """The shared parts of one vault process, handed to every backend."""

    reactor: object
    config: object
    store: CacheStore
    upstream: Upstream
    downloads: Downloads
    metrics: VaultMetrics
    started: float = field(default_factory=time.time)
    backends: list = field(default_factory=list)
    janitor: Janitor | None = None
    #: the web side: the root Resource and the Site serving it
    root: object = None
    site: object = None
    #: a random name of this process (a vault listed among its own peers knows itself by it)
    instance: str = field(default_factory=new_instance)
    #: the other vaults of the cluster (``peers:``), or None
    peers: Peers | None = None
    #: the batched access log (`accesslog.AccessLog`), if the lines are not off or in the vault's log
    access_log: object = None

    def backend(self, name: str):
        return next((b for b in self.backends if b.name == name), None)


def assemble(config, reactor, access_target="config") -> Machinery:
    """
    Everything one vault process needs, wired together (nothing listens
    yet).  `access_target` is where access log lines go (`accesslog.target`;
    by default ``config.access_log``, "-" being standard output).
    """
    logs.set_level(config.log_level)
    store = CacheStore(config.cache_dir)
    metrics = VaultMetrics()
    upstream = Upstream(reactor, metrics=metrics)
    downloads = Downloads(store, upstream, reactor)
    m = Machinery(reactor, config, store, upstream, downloads, metrics)
    metrics.watch_downloads(downloads)
    m.backends = [backend_class(b.type)(b, m) for b in config.backends]
    if config.peers:
        m.peers = Peers(upstream, config.peers, config.peers_token, m.instance)
    m.janitor = Janitor(m, config, reactor)
    pages = VaultPages({
        b"": StatusPage(m),
        b"health": HealthPage(m),
        b"metrics": MetricsPage(metrics),
        b"status.json": StatusJson(m),
        b"cluster.json": ClusterJson(m),
        b"admin": admin_pages(m),
    })
    # absolute-form requests (clients using the vault as their HTTP proxy) for the upstreams backends offer,
    # then /v2/ for the oci backends
    proxy = ProxyRouter(m.backends)
    m.root = VaultRoot(m.backends, pages, HostCheck.from_config(config), config.access_tokens,
                       routers=([proxy] if proxy else []) + routers(m.backends))
    if access_target == "config":
        access_target = config.access_log
    m.access_log = accesslog.open_target(access_target, reactor)
    m.site = make_site(m.root, reactor, m.access_log, access_target)
    return m


def raise_open_file_limit() -> None:
    """Every client streams from its own descriptor: take all the descriptors the system allows."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def steady_heap(trim: int = 32 << 20, mmap: int = 4 << 20) -> bool:
    """
    Keep glibc's heap from shrinking and growing again at every socket read.

    A download passes through buffers of up to 1 MiB each (a socket read,
    the TLS records of one read joined), freed as soon as they are written.
    glibc's malloc gives the top of its heap back to the system once more
    than its trim threshold is free there; that threshold moves with what
    happened before (twice the largest mmapped block freed so far, 128 KiB
    at first), so a process could end up returning ~2 MiB and taking it back
    on every read: two fresh pages faulted in per 4 KiB received (490,000
    minor faults per GiB over HTTPS), a quarter of the throughput lost.
    Whether it did depended on the start-up's allocations: it did when the
    package ran from compiled .pyc files, not when it compiled its sources.
    Fixed thresholds take the history out: blocks below `mmap` come from
    the heap, and up to `trim` of free heap stays with the process.
    True when set (glibc only; elsewhere nothing is done).
    """
    try:
        import ctypes
        import platform

        if platform.libc_ver()[0] != "glibc":
            return False
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim))
    except (ImportError, OSError, AttributeError, ValueError):
        return False


def vault_service(machinery: Machinery, listener, sweep: bool = True) -> "VaultService":
    """The service tree of one process: the listening port, then the janitor, under a `VaultService`."""
    top = VaultService(machinery, sweep)
    listener.setServiceParent(top)
    machinery.janitor.setServiceParent(top)
    return top


class VaultService(service.MultiService):
    """
    Sweeps leftovers of a crash before the listening port opens; on stop
    (SIGTERM), stops listening first, then aborts the downloads still in
    flight: their temp files are removed and their clients cut off (a client
    retries; a half file is never published).
    """

    def __init__(self, machinery: Machinery, sweep=True):
        super().__init__()
        self.machinery = machinery
        self.sweep = sweep

    def startService(self):
        if self.sweep:
            removed = self.machinery.store.sweep()
            if removed:
                log.info("Removed {n} unfinished temp files from the cache", n=removed)
        super().startService()

    def stopService(self):
        d = super().stopService()  # children (the listening port, workers, the janitor) stop first
        running = len(self.machinery.downloads)
        if running:
            log.info("Shutting down: aborting {n} downloads in flight", n=running)
        self.machinery.downloads.abort_all("the vault is shutting down")
        for backend in self.machinery.backends:
            backend.stopped()
        if self.machinery.access_log is not None:
            self.machinery.access_log.close()  # what waits goes out now; later lines at once
        # the records written in threads land before the process ends
        return DeferredList([d, self.machinery.store.settled()], consumeErrors=True)
