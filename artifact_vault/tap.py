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

from . import accesslog
from .config import ConfigError, load
from .service import assemble, raise_open_file_limit, steady_heap, vault_service
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


def stdout_is_log(options) -> bool:
    """Does twistd log to standard output (``-n`` without ``--logfile``, or ``--logfile -``)?"""
    twistd = getattr(options, "parent", None)
    if twistd is None:
        return True  # not run by twistd
    if twistd.get("syslog"):
        return False
    return bool(twistd.get("nodaemon")) and twistd.get("logfile") in (None, "", "-")


class AccessLogSignals(service.Service):
    """
    On start (after twistd has set up its own log), SIGHUP and SIGUSR1 make
    the access log reopen its file, and are passed on to the workers, which
    reopen theirs.
    """

    def __init__(self, access_log, reactor, workers=None):
        self.access_log = access_log
        self.reactor = reactor
        self.workers = workers

    def startService(self):
        super().startService()
        accesslog.on_reopen_signals(self.reactor, self.reopen)

    def reopen(self):
        self.access_log.reopen()
        if self.workers is not None:
            self.workers.signal_all("HUP")


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    config = getattr(options, "vault_config", None) or load(options.get("config"), cache_dir=options.get("cache-dir"))
    raise_open_file_limit()
    steady_heap()
    access_target = accesslog.target(config.access_log, stdout_is_log(options))
    machinery = assemble(config, reactor, access_target)
    description = listen_description(config, options.get("listen"))
    try:
        if config.workers > 1 and not options.get("listen"):
            listener = ListenService.reuseport(reactor, config.http_host, config.http_port, machinery.site)
        else:
            listener = ListenService(endpoints.serverFromString(reactor, description), machinery.site, description)
    except (ValueError, TypeError, KeyError) as e:
        sys.stderr.write(f"artifact-vault: configuration error: --listen {description!r}: {e}\n")
        raise SystemExit(2)
    top = vault_service(machinery, listener)
    workers = None
    if config.workers > 1:
        workers = WorkerPool(config.workers - 1, listener, options, reactor, access_target)
        workers.setServiceParent(top)
    if machinery.access_log is not None and machinery.access_log.path is not None:
        AccessLogSignals(machinery.access_log, reactor, workers).setServiceParent(top)
    return top
