"""
The web tree: the root holds a child Resource per backend prefix and the
``/_vault`` subtree (health, metrics, status, admin); `VaultRequest` carries
each request's own state; `respond_error` is the one place where failures
become responses.

Every request first passes the root's checks: the Host header against
``allowed_hosts`` and, where ``access_tokens`` are set, the client's token
(``/_vault/health`` needs neither).
"""

import base64
import binascii
import hmac
import io
import ipaddress
import json
import re
import os
import socket
import time
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes, urlsplit

from twisted.internet.defer import maybeDeferred
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from . import accesslog
from .errors import (IntegrityError, MethodNotAllowed, NotFound, UpstreamStatus, UpstreamTimeout,
                     UpstreamUnavailable, VaultError)
from .logs import VaultLogger
from .serve import send_small

log = VaultLogger()


#: bytes a request body may have: the vault takes small form and JSON bodies only
#: (paths-info, admin calls); a larger one is refused before it is stored anywhere
MAX_REQUEST_BODY = 1024 * 1024

_ABSOLUTE_FORM = re.compile(rb"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class ProxyTarget:
    """
    The URL of an absolute-form request line (``GET http://host/path HTTP/1.1``),
    which is what a client that uses the vault as its HTTP proxy sends.
    """

    scheme: str  # lower case
    host: str  # lower case, without a trailing dot; an IPv6 address without brackets
    port: int
    #: the origin-form target: path (at least "/") and query, still percent-encoded
    path: bytes

    @property
    def origin(self) -> tuple:
        return (self.scheme, self.host, self.port)

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = {"http": 80, "https": 443}.get(self.scheme)
        return host if self.port == default else f"{host}:{self.port}"

    @classmethod
    def parse(cls, target: bytes) -> "ProxyTarget | None":
        """The parts of an absolute URL, or None when it is not an http(s) URL we can name an upstream with."""
        try:
            text = target.decode("ascii")
        except UnicodeDecodeError:
            return None
        if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            return None
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            return None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc or parts.fragment:
            return None
        path = (parts.path or "/").encode("ascii")
        if not path.startswith(b"/"):
            return None
        if parts.query:
            path += b"?" + parts.query.encode("ascii")
        host = parts.hostname.lower().rstrip(".")
        return cls(scheme, host, port or (443 if scheme == "https" else 80), path)


class VaultRequest(Request):
    """A request with what the vault tracks for it (the access log and metrics read it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started = time.monotonic()
        #: name of the backend that answers it, if any
        self.backend: str | None = None
        #: how the cache answered: hit, miss, joined, stale, forwarded (or None)
        self.outcome: str | None = None
        #: ``error_page(error) -> (content_type, body)``: the form of this request's error
        #: answers, where its clients expect one of their own (a registry's JSON errors)
        self.error_page = None
        self._body_refused = False
        #: the URL of an absolute-form request line (the client uses the vault as its proxy), else None
        self.proxy_target: ProxyTarget | None = None
        #: an absolute-form request line that names no http(s) URL
        self.bad_target = False
        #: the path below its backend, when a router chose the backend (else the part below the prefix)
        self.subpath: bytes | None = None

    def gotLength(self, length):
        # In memory, never a temp file: the body is small or refused.
        self.content = io.BytesIO()
        if length is not None and length > MAX_REQUEST_BODY:
            self._refuse_body()

    def handleContentChunk(self, data):
        if self._body_refused:
            return
        if self.content.tell() + len(data) > MAX_REQUEST_BODY:
            self._refuse_body()
            return
        self.content.write(data)

    def _refuse_body(self):
        self._body_refused = True
        message = b"413 request body too large\n"
        self.channel.transport.write(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(message), message))
        self.channel.transport.loseConnection()

    def requestReceived(self, command, path, version):
        """
        An absolute-form request target (``GET http://host/a/b``) is kept as
        `proxy_target`; ``uri`` and ``path`` get its origin form (``/a/b``),
        so that everything after (routing, backends, the access log) reads the
        path the same way in both forms.  twisted.web would leave the whole URL
        in ``path``.  Whether the vault answers such a request is decided by
        `VaultRoot`.
        """
        if self._body_refused:
            return  # answered already (413); nothing of it is processed
        if _ABSOLUTE_FORM.match(path):
            self.proxy_target = ProxyTarget.parse(path)
            if self.proxy_target is None:
                self.bad_target = True
                path = b"/"
            else:
                path = self.proxy_target.path
        super().requestReceived(command, path, version)

    @property
    def disconnected(self) -> bool:
        """The client went away: nothing more may be written."""
        return self._disconnected

    def set_outcome(self, outcome: str) -> None:
        """Record how the cache answered; "stale" sticks (a stale part makes the whole answer stale)."""
        if self.outcome != "stale":
            self.outcome = outcome


def respond_error(failure, request, what="request", metrics=None):
    """
    Turn a failure into the answer the client sees (or an aborted connection).
    `what` names the request in the log (a callable gives it only when needed).
    """
    if callable(what):
        what = what()
    if failure.check(VaultError):
        error = failure.value
        if error.status >= 500:
            log.warn("{what} failed: {status} {message}", what=what, status=error.status, message=error.message)
        else:
            log.debug("{what}: {status} {message}", what=what, status=error.status, message=error.message)
    else:
        log.failure("Unexpected error while answering {what}", failure, what=what)
        error = VaultError("internal error, see the vault's log", 500)
    if metrics is not None:
        if error.status >= 500 or error.status == 429:
            metrics.error(what, error.status, error.message)
        if failure.check(UpstreamStatus):
            metrics.upstream_errors.labels(request.backend or "-", str(failure.value.code)).inc()
        elif failure.check(UpstreamUnavailable, UpstreamTimeout, IntegrityError):
            kind = {UpstreamTimeout: "timeout", IntegrityError: "integrity"}.get(type(failure.value), "unreachable")
            metrics.upstream_errors.labels(request.backend or "-", kind).inc()
    if request.disconnected or request.finished:
        return None
    if request.startedWriting:
        # Headers (and maybe part of the body) are out: the only honest signal left.
        request.channel.transport.abortConnection()
        return None
    for name in (b"etag", b"last-modified", b"accept-ranges", b"content-range", b"content-encoding"):
        request.responseHeaders.removeHeader(name)
    error_page = getattr(request, "error_page", None)
    if error_page is not None:
        content_type, body = error_page(error)
    else:
        content_type, body = b"text/plain; charset=utf-8", f"{error.status} {error.message}\n".encode("utf-8", "replace")
    send_small(request, content_type, body, error.status, error.headers)
    return None


def answer(request, produce, what: str, metrics=None):
    """Run ``produce()`` (a Deferred or a plain result) for `request`; failures go to `respond_error`."""
    maybeDeferred(produce).addErrback(respond_error, request, what, metrics)
    return NOT_DONE_YET


class ErrorPage(Resource):
    """Answers every request with one error (routing failures, refused clients)."""

    isLeaf = True

    def __init__(self, error: VaultError, what: str = "request"):
        super().__init__()
        self.error = error
        self.what = what

    def render(self, request):
        respond_error(Failure(self.error), request, self.what)
        return NOT_DONE_YET


class VaultPage(Resource):
    """A page below ``/_vault/``: ``answer(request)`` for the methods it allows, 405 for the rest."""

    isLeaf = True
    methods = (b"GET", b"HEAD")

    def render(self, request):
        what = request.path.decode("ascii", "replace")
        if request.method not in self.methods:
            allowed = tuple(m.decode() for m in self.methods)
            return answer(request, lambda: _raise(MethodNotAllowed(
                f"{request.method.decode('ascii', 'replace')} is not supported here", allowed)), what)
        return answer(request, lambda: self.answer(request), what)

    def answer(self, request):
        """The page's answer: each page below ``/_vault/`` defines its own (this base answers none)."""
        raise NotImplementedError(f"{type(self).__name__} defines no answer")


class HostCheck:
    """
    Which names in the Host header the vault answers to (``allowed_hosts``).

    A web page on some other site can make a browser send requests to a
    name that the attacker's DNS points at the vault (DNS rebinding); those
    carry the attacker's name in Host, which is refused.  IP addresses are
    always accepted (rebinding needs a name), and so is a request without a
    Host header.  ``*.example.org`` matches every name below example.org,
    ``*`` any name.  The default: localhost, the name in ``http_host``, and
    for a wildcard ``http_host`` (0.0.0.0, ::) this machine's names.
    """

    #: Host header values remembered with their verdict (clients send a few, over and over)
    MEMO_LIMIT = 1024

    def __init__(self, names):
        self.any = "*" in names
        self.names = {n for n in names if not n.startswith("*")}
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*."))
        self._verdicts: dict[bytes, bool] = {}

    @classmethod
    def from_config(cls, config) -> "HostCheck":
        if config.allowed_hosts:
            return cls(config.allowed_hosts)
        names = {"localhost"}
        host = config.http_host.lower().strip("[]")
        if host in ("0.0.0.0", "::", "*"):
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        elif not _is_address(host):
            names.add(host.rstrip("."))
        return cls(names)

    def allows(self, header: bytes | None) -> bool:
        """A missing Host is allowed; one that is no host name (or [address]) and port never is."""
        if header is None:
            return True
        verdict = self._verdicts.get(header)
        if verdict is None:
            if len(self._verdicts) >= self.MEMO_LIMIT:
                self._verdicts.clear()
            verdict = self._verdicts[header] = self._allows(header)
        return verdict

    def _allows(self, header: bytes) -> bool:
        try:
            match = _HOST_HEADER.match(header.decode("ascii").strip().lower())
        except UnicodeDecodeError:
            return False
        if match is None:
            return False
        if match.group("v6") is not None:
            return _is_address(match.group("v6"))
        name = match.group("name").rstrip(".")
        if self.any or _is_address(name):
            return True
        return name in self.names or name.endswith(self.suffixes)


#: a Host header: a name (or IPv4 address) or a bracketed IPv6 address, and an optional port
_HOST_HEADER = re.compile(r"^(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9](?:[a-z0-9.-]{0,252})?))(?::[0-9]{1,5})?$")


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


#: on every answer made of upstream content: it is data, never a page of the
#: vault's origin (an .html or .svg from a repo must not run script here)
CONTENT_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"content-security-policy", b"sandbox"))


class VaultRoot(Resource):
    """
    The root: ``/_vault`` goes to its own subtree, every other path to the
    backend whose prefix it starts with (the longest; a prefix may span
    several segments).  Backends are leaves: they read the rest of the raw,
    still percent-encoded path themselves.

    Absolute-form requests (a client that uses the vault as its HTTP proxy)
    go only where a router sends them (`ProxyRouter`: the upstream URLs
    that backends offer to proxy), or, when the URL names the vault itself,
    on the ordinary way; any other URL, and every CONNECT, gets 403: the
    vault is not an open proxy.  Their Host header names the upstream, so the
    ``allowed_hosts`` check does not apply to them; access tokens do (also as
    ``Proxy-Authorization``), and a proxied request without one gets 407.
    """

    def __init__(self, backends, pages: Resource, hosts=None, access_tokens=(), routers=()):
        super().__init__()
        self.backends = sorted((b for b in backends if b.config.prefix),
                               key=lambda b: len(b.config.prefix), reverse=True)
        #: (prefix as bytes, backend, segments of the prefix after its first): the longest first
        self._prefixes = [(b.config.prefix.encode("ascii"), b, b.config.prefix.strip("/").count("/"))
                          for b in self.backends]
        self.pages = pages
        self.hosts = hosts or HostCheck(["*"])
        self.access_tokens = [t.encode() for t in access_tokens]
        #: consulted before the prefixes: objects with ``route(request) -> Resource | None``
        #: (requests that no prefix describes, such as a proxy's absolute-form request lines)
        self.routers = list(routers)

    def getChildWithDefault(self, name, request):
        path = request.path
        if request.method == b"CONNECT":
            return ErrorPage(VaultError("CONNECT is refused: the vault is not an open proxy", 403),
                             "CONNECT request")
        if getattr(request, "bad_target", False):
            return ErrorPage(VaultError("the request target is not an http:// or https:// URL the vault can serve",
                                        400), "request with a bad target")
        target = getattr(request, "proxy_target", None)
        if target is not None and not self.names_me(request, target):
            if not self.client_allowed(request):
                return ErrorPage(VaultError(
                    "this vault needs an access token (Proxy-Authorization: Basic with the token as password,"
                    " X-Vault-Token, or Authorization: Bearer)", 407,
                    {"Proxy-Authenticate": 'Basic realm="artifact-vault"'}), "unauthenticated proxy request")
            for router in self.routers:
                resource = router.route(request)
                if resource is not None:
                    return resource
            return ErrorPage(VaultError(
                f"the vault is not an open proxy: it serves {target.scheme}://{target.authority}/... only if a"
                " backend's base_url names it", 403), "proxy request for an unknown upstream")
        host = request.getHeader(b"host")
        if target is not None:
            # a URL of the vault itself: an ordinary request, whose authority is the URL's (RFC 9112 3.2.2)
            request.proxy_target = None
            host = target.authority.encode("ascii")
        if path != b"/_vault/health" and not self.hosts.allows(host):
            return ErrorPage(VaultError(
                "this vault does not answer to that host name (see allowed_hosts in its configuration)", 421),
                "request for another host")
        resource = self.route(name, request)
        if path != b"/_vault/health" and not self.client_allowed(request):
            # the resource may say how its clients are asked for the token (a registry asks
            # docker and containerd for Basic credentials: they send none unchallenged)
            refuse = getattr(resource, "unauthorized", None)
            if refuse is not None:
                return refuse(request)
            return ErrorPage(VaultError(
                "this vault needs an access token (X-Vault-Token, or Authorization: Bearer)", 401,
                {"WWW-Authenticate": 'Bearer realm="artifact-vault"'}), "unauthenticated request")
        return resource

    def route(self, name, request) -> Resource:
        """The resource that answers an ordinary (origin-form) request; nothing is answered or checked yet."""
        for router in self.routers:
            resource = router.route(request)
            if resource is not None:
                return resource
        if name == b"_vault":
            return self.pages
        path = request.path
        for prefix, backend, more in self._prefixes:
            if path.startswith(prefix) or path + b"/" == prefix:
                # the prefix's other segments are the backend's, not its path's
                for _ in range(more):
                    if request.postpath:
                        request.prepath.append(request.postpath.pop(0))
                return backend
        return ErrorPage(NotFound("no backend is configured for this path"))

    def render(self, request):
        return ErrorPage(NotFound("no backend is configured for this path")).render(request)

    def names_me(self, request, target: ProxyTarget) -> bool:
        """
        Does an absolute-form URL name the vault itself (HTTP/1.1 servers must
        accept that form)?  Its port must be the one the request came in on,
        its host the address it came in on or one of the names in
        ``allowed_hosts`` (a wildcard ``*`` is not enough: it would take every
        host on that port for the vault).
        """
        local = request.getHost()
        if target.port != getattr(local, "port", None):
            return False
        host = target.host
        if host == getattr(local, "host", None):
            return True
        return host in self.hosts.names or (bool(self.hosts.suffixes) and host.endswith(self.hosts.suffixes))

    def backend_for(self, path: bytes):
        for prefix, backend, _ in self._prefixes:
            if path.startswith(prefix) or path + b"/" == prefix:
                return backend
        return None

    def client_allowed(self, request) -> bool:
        """
        With ``access_tokens`` set, a client must present one: as
        ``X-Vault-Token: T``, as ``Authorization: Bearer T`` (what HF_TOKEN=T
        makes huggingface_hub send), as the password of ``Authorization:
        Basic`` (apt's and pip's credentials in a URL or auth.conf), or, to
        the vault as a proxy, in ``Proxy-Authorization`` (Basic with the token
        as password, or Bearer).  A vault token found in one of these
        headers is taken off the request, so that it never travels upstream.
        """
        if not self.access_tokens:
            return True
        presented = request.getHeader(b"x-vault-token")
        request.requestHeaders.removeHeader(b"x-vault-token")
        found = presented is not None and self._is_vault_token(presented)
        for header in (b"authorization", b"proxy-authorization"):
            token = _credential(request.getHeader(header))
            if token is not None and self._is_vault_token(token):
                request.requestHeaders.removeHeader(header)
                found = True
        return found

    def _is_vault_token(self, token: bytes) -> bool:
        return any(hmac.compare_digest(token, t) for t in self.access_tokens)


def _credential(header: bytes | None) -> bytes | None:
    """The token in an Authorization-style header: a Bearer token, or the password of Basic credentials."""
    if not header:
        return None
    scheme, _, value = header.partition(b" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == b"bearer":
        return value
    if scheme == b"basic":
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
        return decoded.partition(b":")[2]
    return None


class ProxyRouter:
    """
    Sends an absolute-form request to the backend whose proxied upstream URL
    (`Backend.proxy_bases`, e.g. an apt backend's ``base_url``) it lies under:
    scheme, host and port compared case-insensitively (default ports
    filled in), the path segment by segment (percent-decoded), so that
    ``http://h/debian-security/x`` is not under ``http://h/debian``, and the
    URL must go on below the base.  The backend gets the rest of the path as
    its ``subpath``.
    """

    def __init__(self, backends):
        self.bases = []
        for backend in backends:
            for url in backend.proxy_bases():
                base = ProxyTarget.parse(url.encode("ascii"))
                if base is None:
                    continue
                segments = [unquote_to_bytes(s) for s in base.path.rstrip(b"/").split(b"/")[1:]]
                self.bases.append((base.origin, segments, backend))
        self.bases.sort(key=lambda b: len(b[1]), reverse=True)

    def __bool__(self) -> bool:
        return bool(self.bases)

    def route(self, request):
        target = getattr(request, "proxy_target", None)
        if target is None:
            return None
        raw = request.path.split(b"/")[1:]
        decoded = [unquote_to_bytes(s) for s in raw]
        for origin, segments, backend in self.bases:
            if origin == target.origin and len(decoded) > len(segments) and decoded[:len(segments)] == segments:
                request.subpath = b"/".join(raw[len(segments):])
                return backend
        return None


class VaultPages(Resource):
    """``/_vault/``: the status page, ``health``, ``metrics``, ``status.json`` and ``admin/``."""

    def __init__(self, children: dict):
        super().__init__()
        for name, page in children.items():
            self.putChild(name, page)

    def getChild(self, name, request):
        return ErrorPage(NotFound("unknown status page"))

    def render(self, request):  # "/_vault" without its slash
        return self.getChild(b"", request).render(request)


class HealthPage(VaultPage):
    def __init__(self, machinery):
        super().__init__()
        self.machinery = machinery

    def answer(self, request):
        m = self.machinery
        send_json(request, {
            "status": "ok",
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - m.started, 1),
            "backends": [{"name": b.name, "type": b.config.type, "prefix": b.config.prefix} for b in m.backends],
            "downloads_in_flight": len(m.downloads),
        })


class MetricsPage(VaultPage):
    def __init__(self, metrics):
        super().__init__()
        self.metrics = metrics

    def answer(self, request):
        send_small(request, b"text/plain; version=0.0.4; charset=utf-8", self.metrics.render())


def check_token(machinery, request) -> None:
    """Fails unless `request` carries the admin token (and the admin endpoints are on)."""
    expected_token = machinery.config.admin_token
    if not expected_token:
        raise VaultError("admin endpoints are off: set admin_token", 403)
    expected = expected_token.encode()
    presented = request.getHeader(b"x-admin-token")
    if presented is None:
        scheme, _, token = (request.getHeader(b"authorization") or b"").partition(b" ")
        presented = token.strip() if scheme.lower() == b"bearer" else b""
    if not hmac.compare_digest(presented, expected):
        raise VaultError("admin token missing or wrong (Authorization: Bearer, or X-Admin-Token)", 401,
                         {"WWW-Authenticate": 'Bearer realm="artifact-vault admin"'})


def is_admin(machinery, request) -> bool:
    """Did the request come with the admin token?"""
    try:
        check_token(machinery, request)
    except VaultError:
        return False
    return True


def send_json(request, document, status: int | None = None) -> None:
    send_small(request, b"application/json", json.dumps(document, indent=1).encode() + b"\n", status,
               headers={b"cache-control": b"no-store"})


def _raise(error):
    raise error


def access_log_line(timestamp, request) -> str:
    """The access log line of `request` (`accesslog.line`), for the vault's log (``accesslog.LOG``)."""
    return accesslog.line(request).decode("ascii")


class VaultChannel(HTTPChannel):
    """
    Twisted's HTTP/1.1 channel, with two changes:

    * a TLS ClientHello is answered at once.  Clients told that a plain-HTTP
      server is "insecure" (skopeo and podman with --tls-verify=false,
      docker's insecure-registries, containerd's skip_verify) try HTTPS first
      and fall back to HTTP on an error; a server that says nothing to the
      handshake costs each of them its TLS handshake timeout (10 s in skopeo)
      on every connection.  Go's servers answer such a connection with a
      plain 400 and close it, which makes the fallback immediate; so does the
      vault;
    * the status line and headers of an answer go to the transport as one
      piece: Twisted hands it four pieces per header (name, ": ", value,
      CRLF), each checked and queued on its own, about a tenth of the time a
      small hit takes.  The bytes are the same.
    """

    _first = True

    def dataReceived(self, data):
        if self._first:
            self._first = False
            if data[:1] == b"\x16" and data[1:2] in (b"", b"\x03"):  # a TLS handshake record
                self.transport.write(b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\n"
                                     b"Connection: close\r\n\r\n"
                                     b"Client sent an HTTPS request to an HTTP server.\n")
                self.transport.loseConnection()
                return
        super().dataReceived(data)

    def writeHeaders(self, version, code, reason, headers):
        if not isinstance(headers, Headers):
            return super().writeHeaders(version, code, reason, headers)
        parts = [b"%s %s %s\r\n" % (version, code, reason)]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                parts.append(b"%s: %s\r\n" % (name, value))
        parts.append(b"\r\n")
        self.transport.write(b"".join(parts))


class VaultSite(Site):
    """
    Twisted's Site, with the vault's access log: lines batched to a file or
    standard output (`accesslog.AccessLog`), or through the vault's log, or
    none.  Its channels are `VaultChannel`s (HTTP/1.1: the vault does not
    offer HTTP/2).
    """

    protocol = VaultChannel

    def __init__(self, root, reactor, access_log=None, access_target=accesslog.LOG):
        super().__init__(root, requestFactory=VaultRequest, reactor=reactor, logFormatter=access_log_line)
        self.displayTracebacks = False
        #: the batched access log; without one, ``access_target`` says LOG (the vault's log) or None (off)
        self.access_log = access_log
        self.access_target = access_target

    def log(self, request):
        if self.access_log is not None:
            self.access_log.add(request)
        elif self.access_target == accesslog.LOG:
            super().log(request)


def make_site(root, reactor, access_log=None, access_target=accesslog.LOG) -> Site:
    return VaultSite(root, reactor, access_log, access_target)
