"""
The vault as a client of a registry that wants credentials.

A registry answers 401 with ``WWW-Authenticate: Bearer realm=...,
service=...,scope=repository:<name>:pull``: the vault gets a token from the
realm (anonymously, or with the backend's ``username``/``password`` as Basic
auth), keeps it per scope until shortly before it expires, and sends the
request again, once.  A registry that asks for ``Basic`` gets the login on
every request.  Once the realm is known, a token for a new scope is asked
for before the first request, which saves the 401 round trip.

Where credentials go: the login goes to the token realm only when the realm
is HTTPS or on the registry's own host (a registry could otherwise name any
host as its realm and collect the password); a token goes to the registry's
origin only, never on a redirect to another origin (a blob's 307 to a CDN:
the redirect agent drops Authorization there); neither is logged or handed
to a client.
"""

import base64
import json
import re
import time
from urllib.parse import urlencode, urlsplit

from twisted.internet.defer import inlineCallbacks

from ...bounded import LRU
from ...errors import UpstreamStatus, UpstreamUnavailable, safe_url
from ...fetch import Discard, error_headers, read_body
from ...freshness import Coalescer
from ...logs import VaultLogger

log = VaultLogger()

TOKEN_ANSWER_LIMIT = 256 * 1024
DEFAULT_EXPIRES_IN = 60  # seconds, as the token spec says
#: scopes whose tokens are kept (a client can name any number of repositories)
TOKENS_KEPT = 2048

_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)\s*,?')


def parse_challenge(header: str) -> tuple[str, dict] | None:
    """``Bearer realm="..",service="..",scope=".."`` -> ("bearer", {params}); the first challenge only."""
    scheme, _, rest = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme not in ("bearer", "basic"):
        return None
    params = {}
    for m in _PARAM.finditer(rest):
        value = m.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[m.group(1).lower()] = value
    return scheme, params


class RegistryAuth:
    def __init__(self, backend):
        self.backend = backend
        options = backend.config.options
        self.username = options.get("username") or ""
        self.password = options.get("password") or ""
        self.origin = urlsplit(backend.config.base_url)
        #: scope -> (Authorization value, monotonic time it stops being used)
        self.tokens = LRU(TOKENS_KEPT)
        #: the registry's last challenge: ("bearer", realm, service) or ("basic",), or None
        self.challenge = None
        self._getting = Coalescer()
        self._warned_realm = False
        #: the registry answered the probe (asking nothing, or naming its scheme)
        self.probed = False

    def has_login(self) -> bool:
        return bool(self.username or self.password)

    # -- what to send -------------------------------------------------------------------

    @inlineCallbacks
    def authorization(self, scope: str, timeout: float):
        """
        ``(headers, fresh)``: the Authorization header for a request in
        `scope` ({} while the registry has asked for nothing), and whether a
        token was fetched just now for it.
        """
        if self.challenge is None and not self.probed:
            yield self.probe(timeout)
        if self.challenge is None:
            return {}, False
        if self.challenge[0] == "basic":
            return (self._basic() if self.has_login() else {}), False
        kept = self.tokens.get(scope)
        if kept is not None and time.monotonic() < kept[1]:
            return {"Authorization": kept[0]}, False
        _, realm, service = self.challenge
        value = yield self._token(realm, service, scope, timeout)
        return {"Authorization": value}, True

    @inlineCallbacks
    def request(self, method: str, url: str, scope: str, headers: dict | None = None, *, timeout: float,
                same_origin_redirects_only: bool = False):
        """
        One upstream request with the credentials `scope` needs; on a 401
        that names a scheme, authenticate as asked and send it again, once.
        Fires with the (unread) response.
        """
        headers = dict(headers or {})
        sent, fresh = yield self.authorization(scope, timeout)
        response = yield self.backend.request_upstream(
            method, url, {**headers, **sent}, timeout=timeout, same_origin_redirects_only=same_origin_redirects_only)
        if response.code != 401:
            return response
        values = response.headers.getRawHeaders(b"www-authenticate") or []
        challenge = parse_challenge(values[0].decode("latin-1")) if values else None
        if challenge is None:
            return response
        scheme, params = challenge
        if scheme == "basic":
            if not self.has_login() or sent:
                return response  # nothing (else) to answer it with
            self.challenge = ("basic",)
            retry = self._basic()
        else:
            realm, service = params.get("realm", ""), params.get("service", "")
            target = urlsplit(realm)
            if target.scheme not in ("http", "https") or not target.hostname:
                log.warn("{name}: the registry's token realm {realm!r} is not an http(s) URL",
                         name=self.backend.name, realm=realm[:200])
                return response
            known = self.challenge == ("bearer", realm, service)
            self.challenge = ("bearer", realm, service)
            self.tokens.pop(scope, None)
            if fresh and known and params.get("error") != "invalid_token":
                return response  # a token got just now was refused: another one would be too
            value = yield self._token(realm, service, params.get("scope") or scope, timeout, cache_as=scope)
            retry = {"Authorization": value}
        response.deliverBody(Discard())
        response = yield self.backend.request_upstream(
            method, url, {**headers, **retry}, timeout=timeout, same_origin_redirects_only=same_origin_redirects_only)
        return response

    def probe(self, timeout: float):
        """
        Learn what the registry asks for before the first request of this
        process that needs it (``GET /v2/``, its 401 names the realm): a
        blob's download is one plain GET that cannot answer a challenge.
        Never fails; asked again until an answer comes, then never (a later
        challenge is learned from the 401 that carries it).
        """
        def ask():
            d = self.backend.request_upstream("GET", self.backend.config.base_url + "/v2/", timeout=timeout)
            return d.addCallback(self._probed)

        return self._getting.share("probe", ask).addErrback(lambda failure: None)

    def _probed(self, response):
        response.deliverBody(Discard())
        self.probed = True
        values = response.headers.getRawHeaders(b"www-authenticate") or []
        challenge = parse_challenge(values[0].decode("latin-1")) if response.code == 401 and values else None
        if challenge is None or self.challenge is not None:
            return
        scheme, params = challenge
        if scheme == "basic":
            self.challenge = ("basic",)
        elif urlsplit(params.get("realm", "")).scheme in ("http", "https"):
            self.challenge = ("bearer", params["realm"], params.get("service", ""))

    def _basic(self) -> dict:
        login = f"{self.username}:{self.password}".encode("utf-8")
        return {"Authorization": "Basic " + base64.b64encode(login).decode("ascii")}

    # -- tokens -------------------------------------------------------------------------------

    def _token(self, realm: str, service: str, scope: str, timeout: float, cache_as: str | None = None):
        """A token for `scope` from `realm` (one request for identical concurrent asks)."""
        key = cache_as or scope
        return self._getting.share((realm, service, scope, key),
                                   lambda: self._fetch_token(realm, service, scope, timeout, key))

    @inlineCallbacks
    def _fetch_token(self, realm: str, service: str, scope: str, timeout: float, key: str):
        target = urlsplit(realm)
        query = urlencode([(k, v) for k, v in (("service", service), ("scope", scope)) if v])
        url = realm + ("&" if target.query else "?") + query
        headers = {}
        if self.has_login():
            if target.scheme == "https" or (target.hostname or "").lower() == (self.origin.hostname or "").lower():
                headers = self._basic()
            elif not self._warned_realm:
                self._warned_realm = True
                log.warn("{name}: not sending the login to the token realm {realm}: it is neither HTTPS nor on "
                         "the registry's host; asking for an anonymous token", name=self.backend.name,
                         realm=safe_url(realm))
        log.debug("{name}: asking {realm} for a token for {scope}", name=self.backend.name, realm=safe_url(realm),
                  scope=scope)
        # the token server is asked directly: no Accept, no backend headers, its own redirects followed
        # with the login dropped on another origin
        response = yield self.backend.upstream.request(
            "GET", url, headers, timeout=timeout, max_redirects=self.backend.config.max_redirects,
            sensitive_headers=["authorization"], ca_file=self.backend.config.ca_file)
        if response.code != 200:
            response.deliverBody(Discard())
            # the registry cannot be used now, as if it answered so itself: kept answers serve meanwhile
            if response.code == 429 or response.code >= 500:
                raise UpstreamStatus(response.code, realm, error_headers(response))
            refused = " (it refused the vault's login)" if response.code in (401, 403) and headers else ""
            raise UpstreamUnavailable(f"the registry's token server {safe_url(realm)} answered "
                                      f"{response.code}{refused}")
        body = yield read_body(response, TOKEN_ANSWER_LIMIT, timeout=timeout, clock=self.backend.machinery.reactor)
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        token = None
        if isinstance(document, dict):
            token = document.get("token") or document.get("access_token")
        if not isinstance(token, str) or not token or len(token) > 64 * 1024 or not token.isprintable():
            raise UpstreamUnavailable(f"the registry's token server {safe_url(realm)} sent no usable token")
        expires_in = document.get("expires_in")
        if not isinstance(expires_in, (int, float)) or isinstance(expires_in, bool) or expires_in <= 0:
            expires_in = DEFAULT_EXPIRES_IN
        # used until shortly before it expires: 10 s early, or halfway for short-lived tokens
        lifetime = max(expires_in - 10, expires_in / 2)
        value = "Bearer " + token
        self.tokens[key] = (value, time.monotonic() + lifetime)
        return value
