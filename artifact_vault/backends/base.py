"""
The request flow every backend shares.

A backend module is a policy: it maps a request path to a cache key and an
upstream URL and decides what may be cached.  It then calls one of the flows
here, which do the rest the same way for everyone:

* `Backend.serve_cached`: cache hit -> serve from disk; miss -> join or start
  the one upstream transfer for the key and stream it while it is written.
* `Backend.forward`: ask upstream and relay its (small) answer without
  caching it, optionally rewriting the body (API listings, directory pages).
"""

import os
import time
from dataclasses import dataclass
from typing import Callable

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from ..bounded import LRU
from ..config import BackendConfig
from ..errors import MethodNotAllowed, UpstreamStatus, VaultError, safe_url
from ..fetch import Upstream, Discard, read_body, storage_error
from ..inflight import HolderGone, Inflight, RemoteTransfer, Transfer
from ..logs import VaultLogger
from ..serve import StoredBody, serve
from ..store import CacheStore

log = VaultLogger()

FORWARD_LIMIT = 32 * 1024 * 1024  # bytes of an uncached answer we relay
HIT_LOG_EVERY = 60.0  # seconds between INFO "Cache hit" lines for one name


@dataclass
class Vault:
    """The shared machinery, one per daemon, handed to every backend."""

    reactor: object
    store: CacheStore
    inflight: Inflight
    upstream: Upstream
    metrics: object = None
    janitor: object = None
    #: cache use as the janitor last measured it (status page)
    usage: dict | None = None


#: response headers of an upstream answer worth relaying on a forwarded request
RELAYED_HEADERS = (
    "content-type",
    "etag",
    "last-modified",
    "cache-control",
    "link",
    "retry-after",
    "content-disposition",
)


class Backend:
    """
    Base of every backend type.  Each type defines ``handle(request,
    subpath)``: the raw path below its prefix in, a Deferred (or None) out,
    failures as VaultError.
    """

    methods = ("GET", "HEAD")

    def __init__(self, config: BackendConfig, vault: Vault):
        self.config = config
        self.name = config.name
        self.vault = vault
        self.store = vault.store
        #: headers sent upstream on every request (and dropped on a hop to another origin)
        self.upstream_headers = dict(config.headers)
        self._hits_logged = LRU(10_000)
        #: downloads this backend runs at once; more wait for a slot
        self.download_slots = DeferredSemaphore(config.max_downloads)

    def evictable(self, key: str) -> bool:
        """May the janitor remove this entry to respect max_cache_size?"""
        return True

    def check_method(self, request, allowed=None):
        allowed = allowed or self.methods
        if request.method.decode("ascii", "replace") not in allowed:
            raise MethodNotAllowed(
                f"{request.method.decode('ascii', 'replace')} is not supported here: the vault is a read-only cache",
                allowed,
            )

    # -- flows --------------------------------------------------------------

    def serve_cached(
        self,
        request,
        key: str,
        url: str,
        *,
        headers: dict | None = None,
        describe: Callable | None = None,
        expected_size: int | None = None,
        expected_sha256: str | None = None,
        meta_override: dict | None = None,
        label: str | None = None,
        _retried: bool = False,
    ) -> Deferred:
        """
        Serve `key` from the cache, or fetch `url` once into it while serving
        (or follow the download another process sharing the cache is doing).
        `label` names the request in logs (default: the key).
        """
        label = label or key
        entry = self.store.lookup(key)
        if entry is not None:
            self.log_hit(label)
            set_outcome(request, "hit")
            self.store.touch(entry)
            meta = dict(entry.meta, **(meta_override or {}))
            return serve(request, StoredBody(entry), meta)

        def start():
            lock = self.store.lock(key)
            try:
                acquired = lock.try_acquire()
            except OSError as e:
                raise storage_error(e, key) from None
            if not acquired:
                # Another process sharing this cache is downloading it: follow its file.
                return RemoteTransfer(key, self.store, self.vault.reactor, label)
            committed = self.store.lookup(key)  # it may have finished just before we locked
            if committed is not None:
                lock.release()
                done = Transfer(key, url, label)
                done.committed(committed)
                return done
            transfer = self.vault.upstream.transfer(
                key,
                url,
                self.store,
                headers={**self.upstream_headers, **(headers or {})},
                timeout=self.config.timeout,
                max_redirects=self.config.max_redirects,
                sensitive_headers=self.sensitive_headers(headers),
                describe=describe,
                expected_size=expected_size,
                expected_sha256=expected_sha256,
                label=label,
                slots=self.download_slots,
            )
            transfer.on_streaming(lambda t: lock.publish(
                {"temp": t.writer.temp_path, "total": t.total, "meta": t.meta, "pid": os.getpid()}))
            transfer.on_finished(lambda t: lock.release())
            if self.vault.metrics is not None:
                transfer.on_finished(lambda t: self.vault.metrics.waiters_per_download.observe(t.clients))
            if self.vault.janitor is not None:
                transfer.on_finished(lambda t: t.entry is not None and self.vault.janitor.note_added(t.entry.size))
            return transfer

        transfer, started = self.vault.inflight.join(key, start)
        transfer.attach()
        request.notifyFinish().addBoth(lambda _: transfer.detach())
        if isinstance(transfer, RemoteTransfer):
            log.info("Following the download of {label} by another vault process", label=label)
            set_outcome(request, "joined")
        elif started:
            log.info("Cache miss for {label}, fetching {url}", label=label, url=safe_url(url))
            set_outcome(request, "miss")
        else:
            log.info("Joining the download of {label}", label=label)
            set_outcome(request, "joined")

        def streaming(t):
            if getattr(request, "_disconnected", False):
                return None
            return serve(request, t, dict(t.meta, **(meta_override or {})))

        def holder_gone(failure):
            failure.trap(HolderGone)
            if _retried:
                raise VaultError(f"the download of {label} in another vault process failed", 502)
            return self.serve_cached(request, key, url, headers=headers, describe=describe,
                                     expected_size=expected_size, expected_sha256=expected_sha256,
                                     meta_override=meta_override, label=label, _retried=True)

        return transfer.ready().addCallbacks(streaming, holder_gone)

    def log_hit(self, label: str) -> None:
        """
        ``Cache hit for ...`` at INFO, at most once a minute per name (the
        access log has a line, with the outcome, for every request); the
        repeats go out at DEBUG.  A hot small file would otherwise spend a
        third of its serving time on this line alone.
        """
        now = time.monotonic()
        last = self._hits_logged.get(label)
        if last is not None and now - last < HIT_LOG_EVERY:
            log.debug("Cache hit for {label}", label=label)
            return
        self._hits_logged[label] = now
        log.info("Cache hit for {label}", label=label)

    def sensitive_headers(self, extra: dict | None = None):
        return list(self.upstream_headers) + ["authorization"] + list(extra or {})

    def request_upstream(self, method: str, url: str, headers: dict | None = None, **kw) -> Deferred:
        return self.vault.upstream.request(
            method,
            url,
            {**self.upstream_headers, **(headers or {})},
            timeout=kw.pop("timeout", self.config.timeout),
            max_redirects=kw.pop("max_redirects", self.config.max_redirects),
            sensitive_headers=self.sensitive_headers(headers),
            **kw,
        )

    def relay(self, request, method: str, url: str, *, headers: dict | None = None,
              relayed=RELAYED_HEADERS) -> Deferred:
        """
        Stream one upstream answer through without caching it, whatever its
        size (folder listings, URLs with a query, HEAD of an uncached file).
        """
        d = self.request_upstream(method, url, headers)
        set_outcome(request, "forwarded")

        def got(response):
            if response.code >= 500:
                response.deliverBody(Discard())
                raise UpstreamStatus(response.code, url, relay_headers(response, ("retry-after",)))
            if getattr(request, "_disconnected", False):
                response.deliverBody(Discard())
                return None
            request.setResponseCode(response.code)
            for name, value in relay_headers(response, relayed).items():
                request.setHeader(name, value)
            length = response.length if isinstance(response.length, int) else None
            if method == "HEAD":
                upstream_length = response.headers.getRawHeaders(b"content-length")
                if upstream_length:
                    request.setHeader(b"content-length", upstream_length[0])
                response.deliverBody(Discard())
                request.finish()
                return None
            if length is not None:
                request.setHeader(b"content-length", b"%d" % length)
            request.write(b"")  # status and headers now, before the first byte
            relay = _Relay(request, framed=length is not None
                           or b"chunked" in b",".join(response.headers.getRawHeaders(b"transfer-encoding", [])))
            response.deliverBody(relay)
            return relay.done

        return d.addCallback(got)

    def forward(
        self,
        request,
        method: str,
        url: str,
        *,
        headers: dict | None = None,
        data: bytes | None = None,
        rewrite: Callable | None = None,
        relayed=RELAYED_HEADERS,
    ) -> Deferred:
        """
        Relay one upstream answer (status, selected headers, body) without
        caching it.  `rewrite(body, response) -> body` may edit a good body.
        """
        d = self.request_upstream(method, url, headers, data=data)
        set_outcome(request, "forwarded")

        def got(response):
            return read_body(response, FORWARD_LIMIT, timeout=self.config.timeout,
                             clock=self.vault.reactor).addCallback(lambda body: (response, body))

        def answer(result):
            response, body = result
            if getattr(request, "_disconnected", False):
                return
            if response.code >= 500:
                raise UpstreamStatus(response.code, url, relay_headers(response, ("retry-after",)))
            if rewrite is not None and response.code == 200:
                body = rewrite(body, response)
            request.setResponseCode(response.code)
            relayed_now = relay_headers(response, relayed)
            for name, value in relayed_now.items():
                request.setHeader(name, value)
            if request.method != b"HEAD" or "content-length" not in relayed_now:
                request.setHeader(b"content-length", b"%d" % len(body))
            if request.method != b"HEAD":
                request.write(body)
            request.finish()

        return d.addCallback(got).addCallback(answer)


class _Relay(Protocol):
    """
    Streams an upstream body to a client as it comes, with backpressure both
    ways: the client's pace pauses the upstream transport, a client that
    leaves stops it, and an upstream that breaks off aborts the client.
    """

    def __init__(self, request, framed: bool):
        self.request = request
        self.framed = framed  # Content-Length or chunked: a clean end can be told from a cut
        self.done = Deferred()

    def connectionMade(self):
        self.request.registerProducer(self.transport, True)
        self.request.notifyFinish().addErrback(lambda _: self.transport.stopProducing())

    def dataReceived(self, data):
        if not getattr(self.request, "_disconnected", False):
            self.request.write(data)

    def connectionLost(self, reason):
        if not getattr(self.request, "_disconnected", False):
            self.request.unregisterProducer()
            if reason.check(ResponseDone) or (reason.check(PotentialDataLoss) and not self.framed):
                self.request.finish()
            else:
                self.request.channel.transport.abortConnection()
        self.done.callback(None)


def set_outcome(request, outcome: str) -> None:
    """How the cache answered this request (for metrics and the access log); "stale" sticks."""
    if getattr(request, "vault_outcome", None) != "stale":
        request.vault_outcome = outcome


def relay_headers(response, names) -> dict:
    out = {}
    for name in names:
        values = response.headers.getRawHeaders(name.encode("ascii"))
        if values:
            out[name] = values[0].decode("latin-1")
    return out
