"""
The root of the web tree: routes by prefix to the backends, answers
``/_vault/`` itself, and is the one place where failures become responses.
"""

import hmac
import json
import os
import time

from twisted.internet.defer import maybeDeferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from .errors import NotFound, VaultError
from .logs import VaultLogger

log = VaultLogger()


def respond_error(failure, request, what="request"):
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
    if getattr(request, "_disconnected", False) or request.finished:
        return None
    if request.startedWriting:
        # Headers (and maybe part of the body) are out: the only honest signal left.
        request.channel.transport.abortConnection()
        return None
    request.setResponseCode(error.status)
    for name in (b"etag", b"last-modified", b"accept-ranges", b"content-range", b"content-encoding"):
        request.responseHeaders.removeHeader(name)
    for name, value in error.headers.items():
        request.setHeader(name, value)
    body = f"{error.status} {error.message}\n".encode("utf-8", "replace")
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % len(body))
    if request.method != b"HEAD":
        request.write(body)
    request.finish()
    return None


class VaultRoot(Resource):
    """Leaf resource: the raw request path is matched against backend prefixes."""

    isLeaf = True

    def __init__(self, backends, vault, reactor, access_tokens=()):
        super().__init__()
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
        if presented is not None:
            request.requestHeaders.removeHeader(b"x-vault-token")
            return any(hmac.compare_digest(presented, t) for t in self.access_tokens)
        auth = request.getHeader(b"authorization") or b""
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and any(hmac.compare_digest(token.strip(), t) for t in self.access_tokens):
            request.requestHeaders.removeHeader(b"authorization")
            return True
        return False

    def render(self, request):
        path = request.path
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
                prefix = backend.config.prefix.encode("ascii")
                d = maybeDeferred(backend.handle, request, path[len(prefix):])
                what = f"{request.method.decode('ascii', 'replace')} {path.decode('ascii', 'replace')[:300]}"
        d.addErrback(respond_error, request, what)
        return NOT_DONE_YET

    def backend_for(self, path: bytes):
        for backend in self.backends:
            prefix = backend.config.prefix.encode("ascii")
            if path.startswith(prefix) or path + b"/" == prefix:
                return backend
        return None

    def render_vault(self, request, what: bytes):
        if request.method not in (b"GET", b"HEAD"):
            from .errors import MethodNotAllowed

            raise MethodNotAllowed("the status pages are read-only")
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
        raise NotFound("unknown status page")

    def _json(self, request, document):
        body = json.dumps(document, indent=1).encode() + b"\n"
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.setHeader(b"cache-control", b"no-store")
        if request.method != b"HEAD":
            request.write(body)
        request.finish()


def _raise(error):
    raise error


def make_site(root, reactor) -> Site:
    site = Site(root, reactor=reactor)
    site.displayTracebacks = False
    return site
