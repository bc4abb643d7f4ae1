"""
What every backend shares.

A backend is a `Resource` mounted at its prefix, and a policy: it maps a
request path to a cache key and an upstream URL and decides what may be
cached.  Its ``handle(request, subpath)`` gets the raw (still
percent-encoded) path below the prefix and returns a Deferred (or None);
failures are `VaultError`s, which `site.respond_error` turns into answers.
It answers through the shared flows here:

* `Backend.serve_cached`: a cache hit is served from disk; a miss joins (or
  starts) the one download of the key and streams it while it is written.
* `Backend.relay`: stream one upstream answer through, uncached, at any size.
* `Backend.forward`: relay a small upstream answer, optionally rewritten.
* `Backend.kept`: small mutable answers with a TTL, revalidated, served
  stale when upstream fails (`freshness.KeptAnswers`).
* `Backend.serve_kept_file`: the same for files of any size (an index of
  tens of MB), kept on disk and revalidated through the one download of
  the key (`freshness.KeptFiles`).
* `Backend.fetch_entry`: bring a file into the cache without a client
  (the one download of the key, joined or started), for the entry.

A backend that also serves clients using the vault as their HTTP proxy names
the upstream URLs it serves that way in `proxy_bases`; `site.ProxyRouter`
then hands it those absolute-form requests, with ``request.subpath`` set.
"""

import time

from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, succeed
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.resource import Resource

from ..bounded import LRU
from ..config import BackendConfig
from ..downloads import DownloadSpec, HolderGone
from ..errors import MethodNotAllowed, UpstreamStatus, VaultError, safe_url
from ..fetch import Discard, origin, read_body
from ..freshness import KeptAnswers, KeptFiles, UpstreamHealth
from ..logs import VaultLogger
from ..serve import StoredBody, serve
from ..store import Entry
from ..site import CONTENT_HEADERS, answer

log = VaultLogger()

FORWARD_LIMIT = 8 * 1024 * 1024  # bytes of an upstream answer read whole (relayed small answers, API answers)
#: upstream answers read whole at once, per backend: with FORWARD_LIMIT, what clients can make it hold
BUFFERED_AT_ONCE = 4
HIT_LOG_EVERY = 60.0  # seconds between INFO "Cache hit" lines for one name

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


def _what(request) -> str:
    """How the log names a request that failed (built only when one does)."""
    what = f"{request.method.decode('ascii', 'replace')} {request.path.decode('ascii', 'replace')[:300]}"
    target = getattr(request, "proxy_target", None)
    if target is not None:
        what = what.replace(" ", f" {target.scheme}://{target.authority}", 1)
    return what


class Backend(Resource):
    """Base of every backend type."""

    isLeaf = True
    methods = ("GET", "HEAD")
    #: bytes of kept answers held in memory (None: `KeptAnswers.MEMORY_BYTES`)
    kept_memory_bytes: int | None = None

    def __init__(self, config: BackendConfig, machinery):
        super().__init__()
        self.config = config
        self.name = config.name
        self.machinery = machinery
        self.store = machinery.store
        self.downloads = machinery.downloads
        self.upstream = machinery.upstream
        #: headers sent with every request to the upstream's origin (never to another origin:
        #: see `configured_headers`; a redirect to another origin drops them too)
        self.upstream_headers = dict(config.headers)
        self.upstream_origin = origin(config.base_url) if config.base_url else None
        #: whether upstream answers at all (see freshness.UpstreamHealth)
        self.health = UpstreamHealth(self.name)
        #: small mutable answers of this backend (index pages, tags, API answers)
        self.kept = KeptAnswers(self.store, memory_bytes=self.kept_memory_bytes)
        #: mutable files of any size, kept on disk with their validators
        self.kept_files = KeptFiles(self.store, self.downloads, machinery.reactor)
        #: downloads this backend runs at once; more wait for a slot
        self.download_slots = DeferredSemaphore(config.max_downloads)
        #: upstream answers this backend reads whole at once (memory: BUFFERED_AT_ONCE x FORWARD_LIMIT)
        self.buffered_slots = DeferredSemaphore(BUFFERED_AT_ONCE)
        self._hits_logged = LRU(10_000)

    # -- the Resource ---------------------------------------------------------------

    def render_GET(self, request):
        return self._dispatch(request)

    render_HEAD = render_GET

    def render(self, request):
        """Every method goes to `handle`, which refuses what this backend does not support."""
        method = getattr(self, "render_" + request.method.decode("ascii", "replace"), None)
        return method(request) if method is not None else self._dispatch(request)

    def _dispatch(self, request):
        request.backend = self.name
        for name, value in CONTENT_HEADERS:
            request.setHeader(name, value)
        metrics = self.machinery.metrics
        if metrics is not None:
            request.notifyFinish().addBoth(lambda _: metrics.count_answer(request))
        subpath = getattr(request, "subpath", None)
        if subpath is None:
            subpath = request.path[len(self.config.prefix.encode("ascii")):]
        return answer(request, lambda: self.handle(request, subpath), lambda: _what(request), metrics)

    def handle(self, request, subpath: bytes):
        raise MethodNotAllowed(f"{self.config.type} backends answer no requests")

    def check_method(self, request, allowed=None):
        allowed = allowed or self.methods
        if request.method.decode("ascii", "replace") not in allowed:
            raise MethodNotAllowed(
                f"{request.method.decode('ascii', 'replace')} is not supported here: the vault is a read-only cache",
                allowed,
            )

    # -- hooks -----------------------------------------------------------------------

    def proxy_bases(self) -> tuple:
        """
        Upstream URLs whose files this backend also serves to clients that use
        the vault as their HTTP proxy (absolute-form requests below one of
        them); none unless a backend type offers it.
        """
        return ()

    def prefetch(self, request, body: dict) -> Deferred:
        """Warm the cache as the admin endpoint asks (backend types that offer it override this)."""
        from ..errors import BadRequest

        raise BadRequest(f"prefetch is not offered by {self.config.type} backends")

    def stopped(self) -> None:
        """The vault is stopping: write down what must survive a restart."""

    # -- flows ---------------------------------------------------------------------------

    def configured_headers(self, url: str) -> dict:
        """
        The configured ``headers`` for a request to `url`: all of them on the
        upstream's own origin (``base_url``'s scheme, host and port), none on
        any other (a file host an index names, a CDN): credentials go only
        where they were configured for.
        """
        if not self.upstream_headers:
            return {}
        try:
            same = origin(url) == self.upstream_origin
        except VaultError:
            same = False
        return dict(self.upstream_headers) if same else {}

    def download_spec(self, key: str, url: str, *, headers: dict | None = None, **kw) -> DownloadSpec:
        """What a download of `url` into `key` needs, with this backend's headers, timeouts and limits."""
        return DownloadSpec(
            key=key, url=url, headers={**self.configured_headers(url), **(headers or {})},
            sensitive_headers=tuple(self.sensitive_headers(headers)), timeout=self.config.timeout,
            max_redirects=self.config.max_redirects, ca_file=self.config.ca_file, **kw)

    def serve_cached(self, request, spec: DownloadSpec, meta_override: dict | None = None) -> Deferred:
        """
        Serve ``spec.key`` from the cache, or from the one download of it
        (this process's or another's), started here if need be.
        """
        entry = self.store.lookup(spec.key)
        if entry is not None:
            return self.serve_hit(request, entry, spec.name, meta_override)
        download, how, ready = self.downloads.ready(spec, self.download_slots)
        request.set_outcome("miss" if how == "started" else "joined")
        if how == "started":
            log.info("Cache miss for {label}, fetching {url}", label=spec.name, url=safe_url(spec.url))
        elif how == "following":
            log.info("Following the download of {label} by another vault process", label=spec.name)
        else:
            log.info("Joining the download of {label}", label=spec.name)
        download.attach()
        request.notifyFinish().addBoth(lambda _: (download.detach(), ready.cancel()))

        def streaming(download):
            if request.disconnected:
                return None
            return serve(request, download, dict(download.meta, **(meta_override or {})))

        # a client that left while waiting cancelled its wait: nothing to answer
        return ready.addCallback(streaming).addErrback(lambda failure: failure.trap(CancelledError))

    def serve_kept_file(self, request, spec: DownloadSpec, *, ttl: float, wait: float | None = None,
                        meta_override: dict | None = None) -> Deferred:
        """
        Serve a mutable file of any size (``spec.key``) as `freshness.KeptFiles`
        decides: the kept copy while younger than `ttl` seconds, else what a
        conditional GET says (the kept copy renewed on 304, the new version
        streamed while it replaces the kept one on 200), or the kept copy,
        logged as stale, when upstream fails or takes longer than `wait`.
        """
        d = self.kept_files.get(spec, ttl=ttl, health=self.health, slots=self.download_slots, wait=wait)
        request.notifyFinish().addErrback(lambda _: d.cancel())

        def got(result):
            body, source = result
            if isinstance(body, Entry):
                if source == "stale":
                    request.set_outcome("stale")
                    self.store.touch(body)
                    return serve(request, StoredBody(body), dict(body.meta, **(meta_override or {})))
                return self.serve_hit(request, body, spec.name, meta_override)
            request.set_outcome("miss")
            request.notifyFinish().addBoth(lambda _: body.detach())
            if request.disconnected:
                return None
            return serve(request, body, dict(body.meta, **(meta_override or {})))

        return d.addCallback(got).addErrback(lambda failure: failure.trap(CancelledError))

    def fetch_entry(self, spec: DownloadSpec) -> Deferred:
        """
        The committed entry of ``spec.key``: from the cache, or once the one
        download of it (running, or started here) is complete and verified.
        No client streams it; it fails like the download.
        """
        entry = self.store.lookup(spec.key)
        if entry is not None and not spec.replaces:
            return succeed(entry)

        def start(_=None):
            download, _how = self.downloads.join(spec, self.download_slots)
            return download.published()

        def again(failure):
            failure.trap(HolderGone)  # the other process let go before streaming: once more
            return start()

        return start().addErrback(again)

    def serve_hit(self, request, entry, label: str, meta_override: dict | None = None) -> Deferred:
        self.log_hit(label)
        request.set_outcome("hit")
        self.store.touch(entry)
        return serve(request, StoredBody(entry, self.store),
                     dict(entry.meta, **meta_override) if meta_override else entry.meta)

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
        return self.upstream.request(
            method,
            url,
            {**self.configured_headers(url), **(headers or {})},
            timeout=kw.pop("timeout", self.config.timeout),
            max_redirects=kw.pop("max_redirects", self.config.max_redirects),
            sensitive_headers=self.sensitive_headers(headers),
            ca_file=self.config.ca_file,
            **kw,
        )

    def relay(self, request, method: str, url: str, *, headers: dict | None = None,
              relayed=RELAYED_HEADERS) -> Deferred:
        """
        Stream one upstream answer through without caching it, whatever its
        size (folder listings, URLs with a query, HEAD of an uncached file).
        """
        d = self.request_upstream(method, url, headers)
        request.set_outcome("forwarded")

        def got(response):
            if response.code >= 500:
                response.deliverBody(Discard())
                raise UpstreamStatus(response.code, url, relay_headers(response, ("retry-after",)))
            if request.disconnected:
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
            return relay.ended

        return d.addCallback(got)

    def forward(
        self,
        request,
        method: str,
        url: str,
        *,
        headers: dict | None = None,
        data: bytes | None = None,
        rewrite=None,
        relayed=RELAYED_HEADERS,
    ) -> Deferred:
        """
        Relay one upstream answer (status, selected headers, body) without
        caching it.  ``rewrite(body, response) -> body`` may edit a good body.
        """
        request.set_outcome("forwarded")

        def got(response):
            return read_body(response, FORWARD_LIMIT, timeout=self.config.timeout,
                             clock=self.machinery.reactor).addCallback(lambda body: (response, body))

        d = self.buffered_slots.run(lambda: self.request_upstream(method, url, headers, data=data).addCallback(got))

        def answer_with(result):
            response, body = result
            if request.disconnected:
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

        return d.addCallback(answer_with)


class _Relay(Protocol):
    """
    Streams an upstream body to a client as it comes, with backpressure both
    ways: the client's pace pauses the upstream transport, a client that
    leaves stops it, and an upstream that breaks off aborts the client.
    """

    def __init__(self, request, framed: bool):
        self.request = request
        self.framed = framed  # Content-Length or chunked: a clean end can be told from a cut
        #: fires when the upstream body has ended (whatever the client saw)
        self.ended = Deferred()

    def connectionMade(self):
        self.request.registerProducer(self.transport, True)
        self.request.notifyFinish().addErrback(lambda _: self.transport.stopProducing())

    def dataReceived(self, data):
        if not self.request.disconnected:
            self.request.write(data)

    def connectionLost(self, reason):
        if not self.request.disconnected:
            self.request.unregisterProducer()
            if reason.check(ResponseDone) or (reason.check(PotentialDataLoss) and not self.framed):
                self.request.finish()
            else:
                self.request.channel.transport.abortConnection()
        self.ended.callback(None)


def relay_headers(response, names) -> dict:
    out = {}
    for name in names:
        values = response.headers.getRawHeaders(name.encode("ascii"))
        if values:
            out[name] = values[0].decode("latin-1")
    return out
