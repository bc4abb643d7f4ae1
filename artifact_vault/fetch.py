"""
Talking to upstreams, and pouring an upstream body into the cache.

`Upstream.request` is treq over our own agent stack (bottom to top):
a pooled `Agent` (connect timeout), `_TimeoutAgent` (each hop's answer must
start within `timeout`), `_VaultRedirectAgent` (logs each hop, drops
credentials on a hop to another origin, insists on identity encoding).  treq
is told not to buffer and not to follow redirects itself.

`Upstream.fetch` is the one GET of a download: a good status opens a writer
(through the caller: `downloads.Download.open_writer`) and the body flows
through `_BodyIntoWriter` into it; the Deferred fires once the body is
complete and verified (size, sha256), or fails with the error a client
should see.  It knows nothing of the clients waiting for the download.
"""

import errno
import fcntl
import os
import time
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.internet import error as ierror
from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import error as werror
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RedirectAgent,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web._newclient import RequestTransmissionFailed
from twisted.web.client import _HTTP11ClientFactory
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.internet.interfaces import IReadDescriptor
from twisted.web.iweb import IAgent
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.client import ResponseDone
from zope.interface import implementer

from .connect import CertificateRejected, Endpoints, TrustPolicy
from .errors import (
    IntegrityError,
    NotAFile,
    StorageFull,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
    VaultError,
    safe_url,
)
from .logs import VaultLogger

log = VaultLogger()

PROGRESS_EVERY = 5.0  # seconds between progress lines of a long download
RECEIVE_SIZE = 1024 * 1024  # bytes asked of the socket per read while a body flows
#: splice(2) moves the body when at least this much of it is left (plain TCP, Content-Length known)
SPLICE_MIN = 8 * 1024 * 1024
#: bytes one readiness of the upstream socket may move before other connections get their turn
SPLICE_PER_READ = 4 * 1024 * 1024
PIPE_SIZE = 1024 * 1024  # asked for the splice pipe (F_SETPIPE_SZ); the kernel may give less
SPLICE = hasattr(os, "splice")
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032  # <fcntl.h>, Linux


def origin(url: bytes | str) -> tuple:
    if isinstance(url, bytes):
        url = url.decode("ascii", "replace")
    p = urlsplit(url)
    try:
        port = p.port
    except ValueError:  # a Location with a port that is no port
        raise UpstreamUnavailable(f"upstream redirected to a malformed URL: {safe_url(url)}") from None
    return (p.scheme, (p.hostname or "").lower(), port or (443 if p.scheme == "https" else 80))


@implementer(IAgent)
class _TimeoutAgent:
    """Each request through it must get its response headers within `timeout`."""

    def __init__(self, agent, timeout, reactor):
        self._agent = agent
        self._timeout = timeout
        self._reactor = reactor

    def request(self, method, uri, headers=None, bodyProducer=None):
        d = self._agent.request(method, uri, headers, bodyProducer)
        timer = self._reactor.callLater(self._timeout, d.cancel)

        def done(result):
            if timer.active():
                timer.cancel()
            elif isinstance(result, Failure) and result.check(CancelledError, ResponseNeverReceived):
                raise UpstreamTimeout(f"upstream {safe_url(uri)} did not answer within {self._timeout:g} s")
            return result

        return d.addBoth(done)


class _VaultRedirectAgent(RedirectAgent):
    """
    Twisted's RedirectAgent with the vault's rules: every hop is logged, the
    body of each 3xx is read and thrown away (so its connection goes back to
    the pool), credentials are dropped on a hop to another origin (Twisted
    does that for the names it is given), and every request asks for the
    identity encoding, because what we store must be the bytes and the size
    that upstream announced (treq adds an Accept-Encoding of its own above us).
    """

    def __init__(self, agent, redirect_limit, sensitive_headers=(), same_origin_only=False):
        super().__init__(agent, redirect_limit, sensitive_headers)
        self.same_origin_only = same_origin_only

    def _handleResponse(self, response, method, uri, headers, redirectCount):
        if self.same_origin_only and response.code in (301, 302, 303, 307, 308):
            location = response.headers.getRawHeaders(b"location", [b""])[0]
            if location and origin(self._resolveLocation(uri, location)) != origin(uri):
                # The caller wants this answer itself (the hub's redirect to its CDN).
                response.deliverBody(Discard())
                return response
        return super()._handleResponse(response, method, uri, headers, redirectCount)

    def request(self, method, uri, headers=None, bodyProducer=None):
        headers = headers.copy() if headers is not None else Headers()
        headers.setRawHeaders(b"Accept-Encoding", [b"identity"])
        return super().request(method, uri, headers, bodyProducer)

    def _handleRedirect(self, response, method, uri, headers, redirectCount):
        # Twisted's version resolves every later hop against the first URI
        # (and compares origins with it); each hop must be taken from where
        # the previous one landed.
        response.deliverBody(Discard())
        if redirectCount >= self._redirectLimit:
            raise ResponseFailed([Failure(werror.InfiniteRedirection(
                response.code, b"Infinite redirection detected", location=uri))], response)
        location = response.headers.getRawHeaders(b"location", [b""])[0]
        if not location:
            raise ResponseFailed([Failure(werror.RedirectWithNoLocation(
                response.code, b"No location header field", uri))], response)
        target = self._resolveLocation(uri, location)
        log.info("Following redirect from {src} to {dst}", src=safe_url(uri), dst=safe_url(target))
        if headers is not None and origin(target) != origin(uri):
            headers = Headers({name: values for name, values in headers.getAllRawHeaders()
                               if name not in self._sensitiveHeaderNames})
        d = self._agent.request(method, target, headers)

        def chain(new_response):
            new_response.setPreviousResponse(response)
            return new_response

        d.addCallback(chain)
        return d.addCallback(self._handleResponse, method, target, headers, redirectCount + 1)


class Discard(Protocol):
    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        pass


def upstream_failure(failure: Failure, url) -> Failure:
    """Map a failure of a request to `url` onto the VaultError a client should see."""
    if failure.check(VaultError):
        return failure
    for inner in getattr(failure.value, "reasons", None) or ():
        if isinstance(inner, Failure) and inner.check(CertificateRejected):
            return Failure(UpstreamUnavailable(f"upstream {safe_url(url)}: {inner.getErrorMessage()}"))
    if failure.check(ResponseFailed):
        inner = failure.value.reasons[0] if failure.value.reasons else None
        if inner is not None and inner.check(werror.InfiniteRedirection):
            return Failure(UpstreamUnavailable(f"too many redirects (redirect loop?) starting at {safe_url(url)}"))
        if inner is not None and inner.check(werror.RedirectWithNoLocation):
            return Failure(UpstreamUnavailable(f"redirect without Location from {safe_url(url)}"))
    if not failure.check(ResponseFailed, ResponseNeverReceived, ierror.ConnectError, ierror.DNSLookupError,
                         ierror.TimeoutError, ierror.ConnectionLost, ierror.ConnectionDone, CancelledError,
                         RequestTransmissionFailed):
        return failure  # not a network problem: a bug, reported as such
    if failure.check(ierror.TimeoutError, CancelledError):
        return Failure(UpstreamTimeout(f"upstream {safe_url(url)} timed out"))
    if failure.check(ierror.DNSLookupError):
        return Failure(UpstreamUnavailable(f"upstream host of {safe_url(url)} is unknown"))
    if failure.check(ierror.ConnectError):
        return Failure(UpstreamUnavailable(f"cannot connect to upstream {safe_url(url)}"))
    return Failure(UpstreamUnavailable(f"upstream {safe_url(url)} failed: {failure.getErrorMessage()[:200]}"))


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False  # one "Starting factory" line per upstream connection is noise


class Upstream:
    """The vault's one HTTP client."""

    def __init__(self, reactor, pool: HTTPConnectionPool | None = None, metrics=None, agent=None):
        self.reactor = reactor
        self.metrics = metrics
        #: an agent to use instead of our pooled ones (in-memory tests: treq.testing)
        self._given_agent = agent
        if pool is None:
            pool = HTTPConnectionPool(reactor, persistent=True)
            pool.maxPersistentPerHost = 8
            pool.cachedConnectionTimeout = 60
            pool._factory = _QuietClientFactory
        self.pool = pool
        self._agents: dict[tuple, Agent] = {}
        #: ca_file -> (policy, pool): a connection verified against other CAs is never reused for it
        self._trusted: dict[str, tuple] = {}

    def _agent(self, timeout: float, ca_file: str | None = None) -> Agent:
        if self._given_agent is not None:
            return self._given_agent
        agent = self._agents.get((timeout, ca_file))
        if agent is None:
            if ca_file is None:
                policy, pool = None, self.pool
            else:
                if ca_file not in self._trusted:
                    self._trusted[ca_file] = (TrustPolicy(ca_file), self._another_pool())
                policy, pool = self._trusted[ca_file]
            agent = Agent.usingEndpointFactory(self.reactor, Endpoints(self.reactor, policy, timeout), pool)
            self._agents[(timeout, ca_file)] = agent
        return agent

    def _another_pool(self) -> HTTPConnectionPool:
        pool = HTTPConnectionPool(self.reactor, persistent=True)
        pool.maxPersistentPerHost = self.pool.maxPersistentPerHost
        pool.cachedConnectionTimeout = self.pool.cachedConnectionTimeout
        pool._factory = self.pool._factory
        return pool

    def request(
        self,
        method: str,
        url: str,
        headers: dict | None = None,
        *,
        timeout: float = 60,
        max_redirects: int = 5,
        sensitive_headers=(),
        data: bytes | None = None,
        same_origin_redirects_only: bool = False,
        ca_file: str | None = None,
    ) -> Deferred:
        """
        Send one request (following redirects; with `same_origin_redirects_only`,
        a redirect to another origin is returned instead of followed) and fire
        with the unbuffered treq response, or fail with a `VaultError`.
        With `ca_file`, an https:// upstream (every hop) must have a
        certificate from one of its CAs instead of the system's.
        """
        agent = _VaultRedirectAgent(
            _TimeoutAgent(self._agent(timeout, ca_file), timeout, self.reactor),
            max_redirects,
            [n.encode("ascii") for n in sensitive_headers],
            same_origin_redirects_only,
        )
        client = HTTPClient(agent)
        d = client.request(
            method,
            url,
            headers={k: v for k, v in (headers or {}).items() if v is not None},
            data=data,
            allow_redirects=False,
            unbuffered=True,
        )
        return d.addErrback(upstream_failure, url)

    def fetch(self, spec, open_writer) -> Deferred:
        """
        GET ``spec.url`` into the cache.  When upstream answers 200,
        ``open_writer(total, meta)`` gives the writer the body goes into
        (``meta``: the entity headers worth keeping); the body is checked
        against the announced and expected size and sha256.  Fires with the
        writer once the body is complete and verified (nothing committed
        yet), or fails with the `VaultError` a client should see.
        Cancelling stops the transfer.
        """
        body = []

        def stop(_):
            if body:
                body[0].stop(UpstreamUnavailable(f"the download of {spec.name} was stopped"))
            else:
                requesting.cancel()

        result = Deferred(stop)
        requesting = self.request("GET", spec.url, spec.headers, timeout=spec.timeout,
                                  max_redirects=spec.max_redirects, sensitive_headers=spec.sensitive_headers,
                                  ca_file=spec.ca_file)

        def got_response(response):
            if result.called:  # stopped while waiting for the answer
                response.deliverBody(Discard())
                return None
            if response.code != 200:
                response.deliverBody(Discard())  # read and dropped: the connection goes back to the pool
                raise UpstreamStatus(response.code, spec.url, error_headers(response))
            landed = final_url(response)
            if landed and urlsplit(landed).path.endswith("/") and not urlsplit(spec.url).path.endswith("/"):
                # "a" redirected to "a/": a folder listing.  Kept as the file "a", it would stand
                # where the folder of every "a/..." must be.
                response.deliverBody(Discard())
                raise NotAFile(f"upstream answers {safe_url(spec.url)} with the folder {safe_url(landed)},"
                               " not a file")
            declared = _content_length(response)
            if declared is not None and spec.expected_size is not None and declared != spec.expected_size:
                response.deliverBody(Discard())
                raise IntegrityError(f"upstream {safe_url(spec.url)} announced {declared} bytes,"
                                     f" expected {spec.expected_size}")
            meta = describe_response(response)
            meta["upstream_url"] = safe_url(spec.url)
            total = declared if declared is not None else spec.expected_size
            try:
                writer = open_writer(total, meta)
            except BaseException:
                response.deliverBody(Discard())
                raise
            into = _BodyIntoWriter(spec, writer, total, self.reactor, self._fetched_counter(spec.key), declared)
            body.append(into)
            response.deliverBody(into)
            return into.verified

        def deliver(outcome):
            if not result.called:
                if isinstance(outcome, Failure):
                    result.errback(upstream_failure(outcome, spec.url))
                else:
                    result.callback(outcome)

        requesting.addCallback(got_response).addBoth(deliver)
        return result

    def _fetched_counter(self, key: str):
        return self.metrics.fetched_bytes.labels(key.split("/")[0]) if self.metrics is not None else None


def final_url(response) -> str | None:
    """The URL an answer came from, after the redirects followed (None when unknown)."""
    uri = getattr(getattr(response, "request", None), "absoluteURI", None)
    return uri.decode("ascii", "replace") if isinstance(uri, bytes) else uri


def describe_response(response) -> dict:
    """The entity headers of an upstream response worth keeping and replaying."""
    h = response.headers

    def first(name):
        v = h.getRawHeaders(name.encode("ascii"))
        return v[0].decode("latin-1") if v else None

    meta = {
        "content_type": first("content-type") or "application/octet-stream",
        "etag": first("etag"),
        "last_modified": first("last-modified"),
    }
    encoding = first("content-encoding")
    if encoding and encoding.lower() != "identity":
        meta["content_encoding"] = encoding
    return meta


def _content_length(response) -> int | None:
    length = response.length
    return length if isinstance(length, int) else None


def error_headers(response) -> dict:
    out = {}
    for name in ("retry-after", "x-error-code", "x-error-message", "x-repo-commit", "ratelimit", "ratelimit-policy"):
        v = response.headers.getRawHeaders(name.encode("ascii"))
        if v:
            out[name] = v[0].decode("latin-1")
    return out


def read_body(response, limit: int, timeout: float = 60, clock=None) -> Deferred:
    """
    Read a small upstream body into memory: at most `limit` bytes (more
    fails the read), failing too when it breaks off or stays silent for
    `timeout` seconds.  Cancelling the Deferred stops the transfer.
    """
    if clock is None:
        from twisted.internet import reactor as clock

    def cancel(_):
        collect.cancelled = True
        if collect.transport is not None:
            collect.transport.stopProducing()

    d = Deferred(cancel)

    class Collect(Protocol):
        def __init__(self):
            self.parts, self.size, self.too_big, self.stalled = [], 0, False, False
            self.idle = None
            self.cancelled = False

        def connectionMade(self):
            if self.cancelled:
                self.transport.stopProducing()
                return
            self.idle = clock.callLater(timeout, self._stall)

        def _stall(self):
            self.stalled = True
            self.transport.stopProducing()

        def dataReceived(self, data):
            if self.idle is not None and self.idle.active():
                self.idle.reset(timeout)
            if self.too_big:
                return
            if self.size + len(data) > limit:
                self.too_big = True
                self.transport.stopProducing()
                return
            self.parts.append(data)
            self.size += len(data)

        def connectionLost(self, reason):
            if self.idle is not None and self.idle.active():
                self.idle.cancel()
            if d.called:  # cancelled: the caller has its answer already
                return
            if self.stalled:
                d.errback(UpstreamTimeout(f"upstream answer stalled for {timeout:g} s"))
            elif self.too_big:
                d.errback(UpstreamUnavailable(f"upstream answer is larger than {limit} bytes"))
            elif reason.check(ResponseDone, PotentialDataLoss):
                d.callback(b"".join(self.parts))
            else:
                d.errback(UpstreamUnavailable(f"upstream answer broke off: {reason.getErrorMessage()[:120]}"))

    collect = Collect()
    response.deliverBody(collect)
    return d


def within(d: Deferred, seconds: float, clock, what: str) -> Deferred:
    """
    `d`, cancelled and failed with `UpstreamTimeout` unless it fires within
    `seconds`: a bound on a whole upstream exchange (answer and body), for
    callers that have something else to answer with when upstream is slow.
    """
    timer = clock.callLater(seconds, d.cancel)

    def done(result):
        if timer.active():
            timer.cancel()
        elif isinstance(result, Failure) and result.check(CancelledError, UpstreamTimeout):
            raise UpstreamTimeout(f"{what} took longer than {seconds:g} s")
        return result

    return d.addBoth(done)


def storage_error(e: OSError, key: str) -> VaultError:
    """The answer for a cache that cannot take `key` now."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left in the cache to store {key}")
    if e.errno in (errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG):
        return VaultError(f"{key} cannot be stored in the cache (path conflict)", 502)
    if e.errno in (errno.EMFILE, errno.ENFILE):
        return VaultError("the vault has too many open files right now; try again", 503, {"Retry-After": "5"})
    return VaultError(f"cannot write {key} to the cache: {e.strerror}", 503)


class _BodyIntoWriter(Protocol):
    """
    Receives an upstream body: each chunk goes to the writer (disk; the hash
    follows in its thread).  When the hash falls behind, the upstream
    transport is paused until it catches up.  A silent gap longer than the
    timeout stops the transfer; the end is checked against the announced
    size and the expected sha256.

    A long body with a Content-Length on a plain TCP connection is moved by
    splice(2) instead (`_Splice`): socket to pipe to file, never through
    Python; the connection is closed after its last byte.
    """

    def __init__(self, spec, writer, total, reactor, fetched_counter=None, length=None):
        self.spec = spec
        self.writer = writer
        self.total = total
        self.reactor = reactor
        self.fetched_counter = fetched_counter
        #: the Content-Length upstream sent (None: chunked or until the end of the connection)
        self.length = length
        #: fires with the writer once the body is complete and verified, or fails
        self.verified = Deferred()
        self.idle = None
        self.error: VaultError | None = None
        self.paused = False
        self.started = self.last_log = time.monotonic()
        self.last_logged_bytes = 0
        self.ended = False
        self.splice: _Splice | None = None
        self._socket = None

    def connectionMade(self):
        self.idle = self.reactor.callLater(self.spec.timeout, self._stalled)
        # Read big bodies in large pieces: fewer trips through Python per byte.  The
        # proxy's _producer is the HTTP protocol's transport: for http:// the TCP
        # connection, whose read size is all that changes; for https:// protocol
        # wrappers (TLS, connect._OneDelivery), which would keep the assignment for
        # themselves: walk down to the socket.
        socket_transport = getattr(self.transport, "_producer", None)
        plain = not isinstance(socket_transport, ProtocolWrapper)
        while isinstance(socket_transport, ProtocolWrapper):
            socket_transport = socket_transport.transport
        if hasattr(socket_transport, "bufferSize"):
            socket_transport.bufferSize = RECEIVE_SIZE
        if plain and SPLICE and isinstance(socket_transport, tcp.Connection) and self.length is not None \
                and self.length >= SPLICE_MIN:
            self._socket = socket_transport
            # once the bytes read with the headers have been delivered (right after this)
            self.reactor.callLater(0, self._start_splice)

    def _start_splice(self):
        if self.ended or self.error is not None or self.length - self.writer.size < SPLICE_MIN:
            return
        try:
            self.splice = _Splice(self, self._socket)
        except OSError:
            return  # no pipe or descriptor to spare: Twisted goes on reading
        if not self.paused:
            self.splice.start()

    def dataReceived(self, data):
        if self.error is not None:
            return
        try:
            behind = self.writer.write(data)
        except OSError as e:
            self.stop(storage_error(e, self.spec.key))
            return
        self._received(len(data), behind)

    def _received(self, count: int, behind: bool):
        """`count` more bytes are in the writer; `behind`: the hash is far behind."""
        if self.idle.active():
            self.idle.reset(self.spec.timeout)
        if self.fetched_counter is not None:
            self.fetched_counter.inc(count)
        if self.total is not None and self.writer.size > self.total:
            self.stop(IntegrityError(f"upstream sent more than the {self.total} bytes announced for {self.spec.key}"))
            return
        if behind and not self.paused:
            # The hash thread is behind: let upstream wait rather than the reactor.
            self.paused = True
            if self.splice is not None:
                self.splice.pause()
            else:
                self.transport.pauseProducing()
            self.writer.drained().addCallbacks(self._resume, self._hash_failed)
        now = time.monotonic()
        if now - self.last_log >= PROGRESS_EVERY:
            self._log_progress(now)

    def _hash_failed(self, failure):
        failure.trap(OSError)
        self.stop(storage_error(failure.value, self.spec.key))

    def _resume(self, _):
        if self.paused and self.error is None:
            self.paused = False
            if self.splice is not None:
                self.splice.start()
            else:
                self.transport.resumeProducing()

    def _log_progress(self, now):
        size, total = self.writer.size, self.total
        rate = (size - self.last_logged_bytes) / (now - self.last_log) / 1e6
        pct = f" ({100 * size / total:.0f}%)" if total else ""
        log.info(
            "Downloading {label}: {size} bytes{pct} at {rate:.1f} MB/s",
            label=self.spec.name, size=size, pct=pct, rate=rate,
        )
        self.last_log, self.last_logged_bytes = now, size

    def _stalled(self):
        self.stop(UpstreamTimeout(f"upstream {safe_url(self.spec.url)} sent nothing for {self.spec.timeout:g} s"))

    def stop(self, error: VaultError):
        """Give up on this body: the error is what the download fails with."""
        if self.error is None:
            self.error = error
        if self.splice is not None:
            self.splice.close()
            self._socket.abortConnection()
        elif self.transport is not None:
            if self.paused:
                self.transport.resumeProducing()  # a paused transport would never report its end
            self.transport.stopProducing()

    def connectionLost(self, reason):
        if self.ended:
            return  # the end of a spliced body, reported already
        self.ended = True
        if self.idle is not None and self.idle.active():
            self.idle.cancel()
        if self.splice is not None:
            if self.error is None and not self.splice.done:
                self.splice.drain()  # the connection ended: what the kernel still holds is ours
            self.splice.close()
            if self.splice.done and self.error is None:
                reason = Failure(ResponseDone())  # Twisted's parser did not see the bytes we moved
        try:
            self._check_end(reason)
        except VaultError as e:
            self.verified.errback(Failure(e))
            return
        self.writer.digest().addCallback(self._verify).chainDeferred(self.verified)

    def _check_end(self, reason):
        url, size = safe_url(self.spec.url), self.writer.size
        if self.error is not None:
            raise self.error
        if not reason.check(ResponseDone, PotentialDataLoss):
            raise UpstreamUnavailable(f"upstream {url} broke off after {size} bytes"
                                      f" ({reason.getErrorMessage()[:120]})")
        if reason.check(PotentialDataLoss) and self.total is None:
            # No length and no chunked framing: the end of the connection is the only
            # end, and a reset looks the same. Nothing proves the body complete.
            raise UpstreamUnavailable(
                f"upstream {url} sent a body without length or chunked framing;"
                " its completeness cannot be checked, so it is not kept")
        if self.total is not None and size != self.total:
            raise IntegrityError(f"upstream {url} sent {size} bytes, {self.total} were announced")

    def spliced_to_the_end(self):
        """The splice moved the last byte: end the connection (it is not reused) and the body."""
        self.splice.close()
        self._socket.abortConnection()  # Twisted then reports the end: connectionLost

    def _verify(self, sha256):
        expected = self.spec.expected_sha256
        if expected is not None and sha256 != expected:
            raise IntegrityError(f"sha256 of {self.spec.key} is {sha256}, upstream announced {expected}")
        return self.writer


@implementer(IReadDescriptor)
class _Splice:
    """
    Moves the rest of a body from the upstream socket to the cache file
    with splice(2) (socket to pipe, pipe to file): the bytes never pass
    through Python.  It reads from a duplicate of the socket's descriptor,
    with a reader of its own in the reactor, after Twisted's transport has
    stopped reading; Twisted's HTTP parser never sees these bytes, so the
    connection is closed at the end (`_BodyIntoWriter.spliced_to_the_end`).
    Exactly the announced length is taken: nothing beyond the body.
    """

    def __init__(self, body: _BodyIntoWriter, transport):
        self.body = body
        self.reactor = body.reactor
        self.fd = os.dup(transport.fileno())
        try:
            self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            os.close(self.fd)
            raise
        try:
            fcntl.fcntl(self.pipe_w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
        self.chunk = fcntl.fcntl(self.pipe_w, F_GETPIPE_SZ)
        transport.stopReading()
        self.reading = False
        self.closed = False
        #: the last byte of the body has been moved
        self.done = False

    # IReadDescriptor
    def fileno(self):
        return -1 if self.closed else self.fd

    def doRead(self):
        self.move(SPLICE_PER_READ)

    def connectionLost(self, reason):
        self.close()

    def logPrefix(self):
        return "upstream body (splice)"

    def start(self):
        if not self.reading and not self.closed:
            self.reading = True
            self.reactor.addReader(self)
            self.move(SPLICE_PER_READ)  # bytes may be waiting already: the reactor only reports new ones

    def pause(self):
        if self.reading:
            self.reading = False
            self.reactor.removeReader(self)

    def drain(self):
        """Move what the kernel holds now, however much (the connection is ending)."""
        self.move(None)

    def move(self, budget):
        body = self.body
        writer = body.writer
        moved = 0
        end = False
        while not self.closed and (budget is None or moved < budget):
            left = body.length - writer.size
            if left <= 0:
                end = True
                break
            try:
                n = os.splice(self.fd, self.pipe_w, min(self.chunk, left), flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                break
            except OSError as e:
                body.stop(UpstreamUnavailable(f"upstream {safe_url(body.spec.url)} broke off after {writer.size}"
                                              f" bytes ({e.strerror})"))
                return
            if n == 0:  # upstream closed before the end: Twisted reports it once we let go
                self.close()
                body._socket.abortConnection()
                return
            try:
                behind = writer.write_from_pipe(self.pipe_r, n)
            except OSError as e:
                body.stop(storage_error(e, body.spec.key))
                return
            moved += n
            if behind:
                body._received(moved, True)
                return
        if moved:
            body._received(moved, False)
        if end or (not self.closed and body.length - writer.size <= 0):
            self.done = True
            if not body.ended and body.error is None:
                body.spliced_to_the_end()

    def close(self):
        if self.closed:
            return
        if self.reading:
            self.reading = False
            self.reactor.removeReader(self)
        self.closed = True
        for fd in (self.fd, self.pipe_r, self.pipe_w):
            try:
                os.close(fd)
            except OSError:
                pass
