"""
The root of the web tree: routes by prefix to the backends, answers
``/_vault/`` itself, and is the one place where failures become responses.
"""

import hmac
import ipaddress
import json
import os
import socket
import time

from twisted.internet.defer import maybeDeferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from .errors import (IntegrityError, MethodNotAllowed, NotFound, UpstreamStatus, UpstreamTimeout,
                     UpstreamUnavailable, VaultError)
from .logs import VaultLogger
from .serve import send_small

log = VaultLogger()


def respond_error(failure, request, what="request", metrics=None):
    """Turn a failure into the answer the client sees (or an aborted connection)."""
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
            metrics.upstream_errors.labels(getattr(request, "vault_backend", "-"), str(failure.value.code)).inc()
        elif failure.check(UpstreamUnavailable, UpstreamTimeout, IntegrityError):
            kind = {UpstreamTimeout: "timeout", IntegrityError: "integrity"}.get(type(failure.value), "unreachable")
            metrics.upstream_errors.labels(getattr(request, "vault_backend", "-"), kind).inc()
    if getattr(request, "_disconnected", False) or request.finished:
        return None
    if request.startedWriting:
        # Headers (and maybe part of the body) are out: the only honest signal left.
        request.channel.transport.abortConnection()
        return None
    for name in (b"etag", b"last-modified", b"accept-ranges", b"content-range", b"content-encoding"):
        request.responseHeaders.removeHeader(name)
    send_small(request, b"text/plain; charset=utf-8", f"{error.status} {error.message}\n".encode("utf-8", "replace"),
               error.status, error.headers)
    return None


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

    def __init__(self, names):
        self.any = "*" in names
        self.names = {n for n in names if not n.startswith("*")}
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*."))

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
        if header is None or self.any:
            return True
        try:
            text = header.decode("ascii").strip().lower()
        except UnicodeDecodeError:
            return False
        if text.startswith("["):
            name = text[1:text.find("]")] if "]" in text else text
        else:
            name = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
        name = name.rstrip(".")
        return _is_address(name) or name in self.names or name.endswith(self.suffixes)


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
    """Leaf resource: the raw request path is matched against backend prefixes."""

    isLeaf = True

    def __init__(self, backends, vault, reactor, access_tokens=(), admin_token=None, hosts=None):
        super().__init__()
        self.hosts = hosts or HostCheck(["*"])
        self.admin_token = admin_token
        self.access_tokens = [t.encode() for t in access_tokens]
        self.backends = sorted(backends, key=lambda b: len(b.config.prefix), reverse=True)
        self.vault = vault
        self.reactor = reactor
        self.started = time.time()

    def client_allowed(self, request) -> bool:
        """
        With ``access_tokens`` set, a client must present one: as
        ``X-Vault-Token: T``, or as ``Authorization: Bearer T`` (what HF_TOKEN=T
        makes huggingface_hub send).  A vault token in Authorization is taken
        off the request, so that it never travels upstream.
        """
        if not self.access_tokens:
            return True
        presented = request.getHeader(b"x-vault-token")
        request.requestHeaders.removeHeader(b"x-vault-token")
        auth = request.getHeader(b"authorization") or b""
        scheme, _, token = auth.partition(b" ")
        in_authorization = scheme.lower() == b"bearer" and self._is_vault_token(token.strip())
        if in_authorization:
            request.requestHeaders.removeHeader(b"authorization")
        return in_authorization or (presented is not None and self._is_vault_token(presented))

    def _is_vault_token(self, token: bytes) -> bool:
        return any(hmac.compare_digest(token, t) for t in self.access_tokens)

    def render(self, request):
        path = request.path
        request.vault_started = time.monotonic()
        metrics = self.vault.metrics
        if path != b"/_vault/health" and not self.hosts.allows(request.getHeader(b"host")):
            d = maybeDeferred(_raise, VaultError(
                "this vault does not answer to that host name (see allowed_hosts in its configuration)", 421))
            d.addErrback(respond_error, request, "request for another host")
            return NOT_DONE_YET
        if path != b"/_vault/health" and not self.client_allowed(request):
            d = maybeDeferred(_raise, VaultError(
                "this vault needs an access token (X-Vault-Token, or Authorization: Bearer)", 401,
                {"WWW-Authenticate": 'Bearer realm="artifact-vault"'}))
            d.addErrback(respond_error, request, "unauthenticated request")
            return NOT_DONE_YET
        if path == b"/_vault" or path.startswith(b"/_vault/"):
            d = maybeDeferred(self.render_vault, request, path[len(b"/_vault/"):])
            what = path.decode("ascii", "replace")
        else:
            backend = self.backend_for(path)
            if backend is None:
                d = maybeDeferred(_raise, NotFound("no backend is configured for this path"))
                what = "request"
            else:
                request.vault_backend = backend.name
                for name, value in CONTENT_HEADERS:
                    request.setHeader(name, value)
                if metrics is not None:
                    request.notifyFinish().addBoth(self._account, request, metrics)
                prefix = backend.config.prefix.encode("ascii")
                d = maybeDeferred(backend.handle, request, path[len(prefix):])
                what = f"{request.method.decode('ascii', 'replace')} {path.decode('ascii', 'replace')[:300]}"
        d.addErrback(respond_error, request, what, metrics)
        return NOT_DONE_YET

    @staticmethod
    def _account(result, request, metrics):
        outcome = getattr(request, "vault_outcome", None) or "forwarded"
        if request.code >= 400:
            outcome = "error"
        metrics.count_request(request.vault_backend, outcome, request.sentLength)

    def backend_for(self, path: bytes):
        for backend in self.backends:
            prefix = backend.config.prefix.encode("ascii")
            if path.startswith(prefix) or path + b"/" == prefix:
                return backend
        return None

    def render_vault(self, request, what: bytes):
        if what.startswith(b"admin/"):
            from . import admin

            return admin.handle(self, request, what[len(b"admin/"):])
        if request.method not in (b"GET", b"HEAD"):
            raise MethodNotAllowed("the status pages are read-only")
        if what == b"" and request.path.endswith(b"/"):
            from .status_page import render_status_page

            return render_status_page(self, request)
        if what == b"health":
            return self._json(request, {
                "status": "ok",
                "pid": os.getpid(),
                "uptime_seconds": round(time.time() - self.started, 1),
                "backends": [
                    {"name": b.name, "type": b.config.type, "prefix": b.config.prefix} for b in self.backends
                ],
                "downloads_in_flight": len(self.vault.inflight),
            })
        if what == b"metrics" and self.vault.metrics is not None:
            return send_small(request, b"text/plain; version=0.0.4; charset=utf-8", self.vault.metrics.render())
        if what == b"status.json":
            return self._json(request, self.status(names=self.is_admin(request)))
        raise NotFound("unknown status page")

    def is_admin(self, request) -> bool:
        """Did the request come with the admin token (without it, the status shows no names)?"""
        from .admin import check_token

        try:
            check_token(self, request)
        except VaultError:
            return False
        return True

    def status(self, names: bool = False) -> dict:
        """
        What the status page shows: use, hit ratio, downloads in flight,
        recent errors.  The names of files being downloaded and the requests
        that failed (private repo and file names) only with `names`, which
        the caller grants to holders of the admin token; others see counts.
        """
        metrics = self.vault.metrics
        totals = metrics.totals() if metrics else {}
        answered = sum(totals.values())
        from_cache = totals.get("hit", 0) + totals.get("stale", 0)
        now = time.monotonic()
        downloads = []
        for t in self.vault.inflight.transfers():
            elapsed = max(now - t.started_at, 1e-3)
            got = t.available()
            downloads.append({
                **({"name": t.label} if names else {}), "bytes": got, "total": t.size,
                "percent": round(100 * got / t.size, 1) if t.size else None,
                "rate": round(got / elapsed), "clients": t.watcher_count, "seconds": round(elapsed, 1),
            })
        usage = getattr(self.vault, "usage", None) or {}
        return {
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 1),
            "backends": [{"name": b.name, "type": b.config.type, "prefix": b.config.prefix} for b in self.backends],
            "requests": totals,
            "hit_ratio": round(from_cache / answered, 3) if answered else None,
            "cache": usage,
            "downloads": downloads,
            "recent_errors": [e if names else {"time": e["time"], "status": e["status"]}
                              for e in (metrics.recent_errors if metrics else [])],
        }

    def _json(self, request, document):
        send_small(request, b"application/json", json.dumps(document, indent=1).encode() + b"\n",
                   headers={b"cache-control": b"no-store"})


def _raise(error):
    raise error


def access_log_line(timestamp, request) -> str:
    """One line per request: client, request line, status, body bytes, cache outcome, duration."""
    addr = request.getClientAddress()
    ip = getattr(addr, "host", "-")
    started = getattr(request, "vault_started", None)
    duration = f"{time.monotonic() - started:.3f}s" if started is not None else "-"
    # The query is not logged: a client may put a credential there.
    target = request.path + (b"?..." if b"?" in request.uri else b"")
    return '%s "%s %s %s" %d %d %s %s "%s"' % (
        ip, _escape(request.method), _escape(target), _escape(request.clientproto), request.code,
        request.sentLength, getattr(request, "vault_outcome", None) or "-", duration,
        _escape(request.getHeader(b"user-agent") or b"-"),
    )


def _escape(value: bytes) -> str:
    text = value.decode("ascii", "backslashreplace") if isinstance(value, bytes) else str(value)
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text  # the usual case, without the character-by-character walk
    return "".join(c if 32 <= ord(c) < 127 and c != '"' else "\\x%02x" % ord(c) for c in text)


def make_site(root, reactor) -> Site:
    site = Site(root, reactor=reactor, logFormatter=access_log_line)
    site.displayTracebacks = False
    return site
