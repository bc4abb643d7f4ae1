"""
The twistd plugin's options and service tree.

``twistd -n artifact-vault [--config FILE] [--listen STRPORT] [--cache-dir DIR]``.
A bad configuration is reported as one line on stderr and exit status 2,
before twistd daemonizes or opens its log.
"""

import sys

from twisted.application import service
from twisted.internet import endpoints
from twisted.python import usage

from . import logs
from .backends import backend_class
from .backends.base import Vault
from .config import ConfigError, load
from .fetch import Upstream
from .inflight import Inflight
from .janitor import Janitor
from .metrics import VaultMetrics
from .site import HostCheck, VaultRoot, make_site
from .store import CacheStore
from .workers import ListenService, WorkerPool


class Options(usage.Options):
    synopsis = "[--config FILE] [--listen STRPORT] [--cache-dir DIR]"
    longdesc = "A caching reverse proxy for the Hugging Face Hub and other artifact stores."
    optParameters = [
        ["config", "c", None, "YAML configuration file (default: the embedded default configuration)"],
        ["listen", "l", None, "Twisted strports description to listen on, overriding http_host/http_port "
                              "(e.g. tcp:8080:interface=0.0.0.0)"],
        ["cache-dir", None, None, "Cache folder, overriding cache_dir"],
    ]

    def postOptions(self):
        try:
            self.vault_config = load(self["config"], cache_dir=self["cache-dir"])
        except ConfigError as e:
            sys.stderr.write(f"artifact-vault: configuration error: {e}\n")
            sys.stderr.flush()
            raise SystemExit(2)


def listen_description(config, override=None) -> str:
    if override:
        return override
    host = config.http_host.replace(":", r"\:")
    # a deep accept queue: hundreds of clients may connect at once
    return f"tcp:{config.http_port}:interface={host}:backlog=1024"


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


class VaultService(service.MultiService):
    """
    Sweeps leftovers of a crash before the listening port opens; on stop
    (SIGTERM), stops listening first, then aborts the downloads still in
    flight: their temp files are removed and their clients cut off (a client
    retries; a half file is never published).
    """

    def __init__(self, vault, sweep=True):
        super().__init__()
        self.vault = vault
        self.sweep = sweep

    def startService(self):
        if self.sweep:
            removed = self.vault.store.sweep()
            if removed:
                logs.VaultLogger().info("Removed {n} unfinished temp files from the cache", n=removed)
        super().startService()

    def stopService(self):
        d = super().stopService()  # children (the listening port, workers) stop first
        transfers = self.vault.inflight.transfers()
        if transfers:
            logs.VaultLogger().info("Shutting down: aborting {n} downloads in flight", n=len(transfers))
        for transfer in transfers:
            transfer.abort("the vault is shutting down")
        return d


def build_site(config, reactor):
    """The web site of a vault with `config`: (site, root resource, shared machinery)."""
    logs.set_level(config.log_level)
    store = CacheStore(config.cache_dir)
    inflight = Inflight()
    metrics = VaultMetrics(inflight)
    vault = Vault(reactor=reactor, store=store, inflight=inflight, upstream=Upstream(reactor, metrics=metrics),
                  metrics=metrics)
    backends = [backend_class(b.type)(b, vault) for b in config.backends]
    vault.janitor = Janitor(vault, config, backends, reactor)
    root = VaultRoot(backends, vault, reactor, config.access_tokens, config.admin_token, HostCheck.from_config(config))
    return make_site(root, reactor), root, vault


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    config = getattr(options, "vault_config", None) or load(options.get("config"), cache_dir=options.get("cache-dir"))
    raise_open_file_limit()
    site, root, vault = build_site(config, reactor)
    top = VaultService(vault)
    description = listen_description(config, options.get("listen"))
    try:
        if config.workers > 1 and not options.get("listen"):
            server = ListenService.reuseport(reactor, config.http_host, config.http_port, site)
        else:
            server = ListenService(endpoints.serverFromString(reactor, description), site, description)
    except (ValueError, TypeError, KeyError) as e:
        sys.stderr.write(f"artifact-vault: configuration error: --listen {description!r}: {e}\n")
        raise SystemExit(2)
    server.setServiceParent(top)
    vault.janitor.setServiceParent(top)
    if config.workers > 1:
        WorkerPool(config.workers - 1, server, options, reactor).setServiceParent(top)
    top.vault = vault
    top.root = root
    return top
