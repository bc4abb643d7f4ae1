"""
More processes on one listening socket (``workers: N``).

The twistd process listens, then starts N-1 worker processes
(``python -m artifact_vault.workers``) that adopt the same socket: the kernel
hands each new connection to one of them.  All of them share the cache
through the per-key locks of `artifact_vault.store.KeyLock`, so a file is
still downloaded once.  Workers log to a pipe that the main process copies
into its own log; a worker that dies is started again after a second; on
stop, workers get SIGTERM and are waited for.
"""

import argparse
import os
import socket
import sys

from twisted.application import service
from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger

from .accesslog import LOG, on_reopen_signals
from .logs import VaultLogger

log = VaultLogger()

RESTART_DELAY = 1.0


def reuseport_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """
    A listening socket of this process's own on host:port, with SO_REUSEPORT:
    every process of the vault has one, and the kernel spreads new
    connections evenly over them (one shared socket lets whichever process
    wakes first take a whole burst).
    """
    family, kind, proto, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class ReusePortEndpoint:
    """
    Listens on a socket of this process's own with SO_REUSEPORT (see
    `reuseport_socket`), handed to Twisted as an adopted port.
    """

    def __init__(self, reactor, host, port):
        self.reactor, self.host, self.port = reactor, host, port

    def listen(self, factory):
        try:
            sock = reuseport_socket(self.host, self.port)
        except OSError as e:
            return defer.fail(e)
        return endpoints.AdoptedStreamServerEndpoint(self.reactor, sock.detach(), sock.family).listen(factory)


class ListenService(service.Service):
    """Listens on an endpoint; keeps the port so workers can share its socket."""

    def __init__(self, endpoint, factory, description):
        self.endpoint = endpoint
        self.factory = factory
        self.description = description
        self.port = None

    @classmethod
    def reuseport(cls, reactor, host, port, factory):
        return cls(ReusePortEndpoint(reactor, host, port), factory, f"{host}:{port} (SO_REUSEPORT)")

    def startService(self):
        super().startService()
        d = self.endpoint.listen(self.factory)
        failures = []
        d.addCallbacks(lambda port: setattr(self, "port", port), failures.append)
        if failures:
            sys.stderr.write(f"artifact-vault: cannot listen on {self.description}: "
                             f"{failures[0].getErrorMessage()}\n")
            raise SystemExit(1)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, pool, number):
        self.pool = pool
        self.number = number
        self.ended = defer.Deferred()
        self._partial = b""

    def outReceived(self, data):
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            # the worker stamps its lines with the time; ours stamps them again
            stamp, _, rest = line.partition(b" ")
            if stamp[:1].isdigit() and rest:
                line = rest
            if line.strip():
                Logger(namespace=f"worker{self.number}").info(
                    "{line}", line=line.decode("utf-8", "replace"))

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(None)
        self.pool.ended(self)


#: the descriptor a worker writes its access log lines to, when they go to the main process's standard output
ACCESS_LOG_FD = 4


class WorkerPool(service.Service):
    """
    The N-1 worker processes.  Each writes its own access log lines: to the
    file (it opens it itself), or to the main process's standard output
    (handed to it as descriptor `ACCESS_LOG_FD`); only when the lines go into
    the vault's log do they travel through the worker's log pipe.
    """

    def __init__(self, count, listener: ListenService, options, reactor, access_target="-"):
        self.count = count
        self.listener = listener
        self.options = options
        self.reactor = reactor
        self.access_target = access_target
        self.running_workers: dict[int, _WorkerProtocol] = {}

    def startService(self):
        super().startService()
        for number in range(1, self.count + 1):
            self.spawn(number)

    def spawn(self, number):
        childFDs = {0: "w", 1: "r", 2: "r"}
        endpoint = self.listener.endpoint
        if isinstance(endpoint, ReusePortEndpoint):
            args = [sys.executable, "-m", "artifact_vault.workers", "--bind", f"{endpoint.host}:{endpoint.port}"]
        else:
            host = self.listener.port.getHost()
            family = "6" if ":" in getattr(host, "host", "") else "4"
            args = [sys.executable, "-m", "artifact_vault.workers", "--fd", "3", "--family", family]
            childFDs[3] = self.listener.port.fileno()
        if self.options.get("config"):
            args += ["--config", os.path.abspath(self.options["config"])]
        if self.options.get("cache-dir"):
            args += ["--cache-dir", os.path.abspath(self.options["cache-dir"])]
        if self.access_target == "-":
            args += ["--access-log", f"fd:{ACCESS_LOG_FD}"]
            childFDs[ACCESS_LOG_FD] = 1
        elif self.access_target == LOG:
            args += ["--access-log", "log"]
        proto = _WorkerProtocol(self, number)
        self.running_workers[number] = proto
        self.reactor.spawnProcess(proto, sys.executable, args, env=os.environ.copy(), childFDs=childFDs)
        log.info("Started worker {n}", n=number)

    def ended(self, proto):
        if self.running_workers.get(proto.number) is proto:
            del self.running_workers[proto.number]
            if self.running:
                log.warn("Worker {n} ended; starting it again", n=proto.number)
                self.reactor.callLater(RESTART_DELAY, self._respawn, proto.number)

    def signal_all(self, name: str) -> None:
        """Send signal `name` ("HUP", "TERM") to every running worker."""
        for proto in list(self.running_workers.values()):
            try:
                proto.transport.signalProcess(name)
            except Exception:  # noqa: BLE001 - it is ending already
                pass

    def _respawn(self, number):
        if self.running and number not in self.running_workers:
            self.spawn(number)

    def stopService(self):
        super().stopService()
        waits = []
        for proto in list(self.running_workers.values()):
            waits.append(proto.ended)
            try:
                proto.transport.signalProcess("TERM")
            except Exception:  # already gone
                pass
        return defer.DeferredList(waits)


def main(argv=None):
    """A worker process: adopt the listening socket and serve from the shared cache."""
    parser = argparse.ArgumentParser(prog="artifact_vault.workers")
    parser.add_argument("--fd", type=int, help="adopt this listening descriptor")
    parser.add_argument("--bind", help="HOST:PORT: open an SO_REUSEPORT socket of our own")
    parser.add_argument("--family", choices=["4", "6"], default="4")
    parser.add_argument("--config")
    parser.add_argument("--cache-dir")
    parser.add_argument("--access-log", help="fd:N (write access log lines there) or log (into the log); "
                                             "default: as the configuration says")
    args = parser.parse_args(argv)

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from .config import load
    from .service import assemble, raise_open_file_limit, steady_heap, vault_service

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    config = load(args.config, cache_dir=args.cache_dir)
    raise_open_file_limit()
    steady_heap()
    access_target = config.access_log
    if args.access_log == "log":
        access_target = LOG
    elif args.access_log and args.access_log.startswith("fd:"):
        access_target = int(args.access_log[3:])
    machinery = assemble(config, reactor, access_target)
    if args.bind:
        host, _, port = args.bind.rpartition(":")
        listener = ListenService.reuseport(reactor, host, int(port), machinery.site)
    else:
        family = socket.AF_INET6 if args.family == "6" else socket.AF_INET
        listener = ListenService(endpoints.AdoptedStreamServerEndpoint(reactor, args.fd, family), machinery.site,
                                 f"descriptor {args.fd}")
    top = vault_service(machinery, listener, sweep=False)
    top.startService()
    if machinery.access_log is not None and machinery.access_log.path is not None:
        on_reopen_signals(reactor, machinery.access_log.reopen)  # the main process passes its SIGHUP on
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
