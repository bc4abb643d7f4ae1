"""
Who may read what the vault has cached from the Hugging Face Hub.

A cached file of a private or gated repo must reach only clients the hub
would let read it.  The hub is the judge: every answer it gives about a repo
for a given identity (the client's token, the vault's token, or nobody) is
remembered as a yes or a no, per repo and per scope ("files": resolve;
"api": the listings, which the hub shows for gated repos too).  Before the
vault answers from its cache without asking the hub, it looks for a yes no
older than ``access_ttl``; a yes for the anonymous identity means the repo is
public and opens it to everyone.  Without a fresh answer it asks the hub a
cheap HEAD with the client's identity.  While the hub is unreachable, only
a yes no older than ``offline_access_grace`` is honoured (offline never
means public), except that a repo the hub showed to anonymous clients stays
open to everyone: it was public when last asked.

Identities: ``access: shared`` (default, the integration guide's setup) lets a
client without a token of its own act with the vault's token, so whoever
reaches the vault reads what that token can read.  ``access: per-client``
never lends the vault's token to a client: each reads only what its own
token (or no token) can read.
"""

import hashlib
import json
import time

from twisted.internet.defer import inlineCallbacks

from ..errors import UpstreamStatus, UpstreamTimeout, UpstreamUnavailable, VaultError
from ..fetch import error_headers
from ..logs import VaultLogger

log = VaultLogger()

DENIED_CODES = ("RepoNotFound", "GatedRepo")


class AccessPolicy:
    def __init__(self, backend):
        self.backend = backend
        options = backend.config.options
        self.mode = options.get("access", "shared")
        self.ttl = float(options.get("access_ttl", 300))
        self.grace = float(options.get("offline_access_grace", 86400))
        self._memory: dict[str, dict] = {}

    # -- identities ------------------------------------------------------------

    def identity(self, request) -> tuple[str, dict]:
        """(identity name for records, the Authorization to send upstream for this client)."""
        client = request.getHeader(b"authorization")
        if client:
            digest = hashlib.sha256(client).hexdigest()[:32]
            return f"client-{digest}", {"Authorization": client.decode("latin-1")}
        token = self.backend.token
        if token and self.mode == "shared":
            return "vault", {"Authorization": f"Bearer {token}"}
        return "anonymous", {}

    # -- records ---------------------------------------------------------------

    def _key(self, repo, scope: str, ident: str) -> str:
        return f"{self.backend.name}/access/{repo.key}/{scope}/{ident}"

    def recall(self, repo, scope: str, ident: str) -> dict | None:
        key = self._key(repo, scope, ident)
        record = self._memory.get(key)
        if record is None:
            entry = self.backend.store.lookup(key)
            if entry is not None:
                try:
                    with open(entry.path, "rb") as f:
                        record = json.load(f)
                except (OSError, ValueError):
                    record = None
                if record is not None:
                    self._memory[key] = record
        return record

    def note(self, repo, scope: str, ident: str, allowed: bool, status=None, headers=None) -> None:
        key = self._key(repo, scope, ident)
        previous = self.recall(repo, scope, ident)
        record = {"allowed": allowed, "at": time.time(), "status": status, "headers": headers or {}}
        self._memory[key] = record
        # Disk is for restarts while the hub is away: write when the answer
        # changes, or when the stored one is getting old.
        if previous is None or previous["allowed"] != allowed or time.time() - previous["at"] > self.ttl / 2:
            self.backend.keep_small(key, json.dumps(record).encode())

    def note_answer(self, repo, scope: str, ident: str, code: int, headers: dict) -> None:
        """Learn from any answer the hub gave this identity about this repo."""
        if 200 <= code < 400 or (code == 404 and headers.get("x-error-code") not in DENIED_CODES):
            self.note(repo, scope, ident, True)
        elif code in (401, 403) or (code == 404 and headers.get("x-error-code") in DENIED_CODES):
            kept = {k: v for k, v in headers.items() if k in ("x-error-code", "x-error-message")}
            self.note(repo, scope, ident, False, code, kept)

    def _fresh(self, record, age: float) -> bool:
        return record is not None and time.time() - record["at"] < age

    # -- the check ---------------------------------------------------------------

    @inlineCallbacks
    def authorize(self, request, repo, scope: str, check_url: str):
        """Fires when the client may read `repo` in `scope`; fails with the hub's no otherwise."""
        ident, auth = self.identity(request)
        for who in {ident, "anonymous"}:
            record = self.recall(repo, scope, who)
            if self._fresh(record, self.ttl) and record["allowed"]:
                return None
        record = self.recall(repo, scope, ident)
        if self._fresh(record, self.ttl) and not record["allowed"]:
            raise self._denial(repo, record)
        if self.backend.hub_is_down():
            return self._offline(repo, scope, ident, "the hub is down")
        try:
            response = yield self.backend.request_upstream(
                "HEAD", check_url, auth, timeout=self.backend.offline_timeout, same_origin_redirects_only=True)
        except (UpstreamUnavailable, UpstreamTimeout) as e:
            self.backend.note_hub_down(e)
            return self._offline(repo, scope, ident, e.message)
        headers = error_headers(response)
        if response.code >= 500 or response.code == 429:
            self.backend.note_hub_down(UpstreamStatus(response.code, check_url, headers))
            return self._offline(repo, scope, ident, f"the hub answered {response.code}")
        self.note_answer(repo, scope, ident, response.code, headers)
        record = self.recall(repo, scope, ident)
        if record is None or not self._fresh(record, max(self.ttl, 1)):
            # an answer that is neither a yes nor a no (400, 410, ...): pass it on, remember nothing
            raise UpstreamStatus(response.code, check_url, headers)
        if not record["allowed"]:
            raise self._denial(repo, record)
        return None

    def _offline(self, repo, scope, ident, why):
        public = self.recall(repo, scope, "anonymous")
        if public is not None and public["allowed"]:
            return None  # public when last asked: what it served then, it may serve now
        record = self.recall(repo, scope, ident)
        if self._fresh(record, self.grace) and record["allowed"]:
            return None
        log.info("Not serving {repo} from the cache: access cannot be checked ({why})", repo=repo.name, why=why)
        raise VaultError(
            f"{repo.name}: the hub cannot confirm access right now ({why}), and this client has no recent"
            " confirmed access; try again when the hub is reachable", 503, {"Retry-After": "30"})

    @staticmethod
    def _denial(repo, record) -> VaultError:
        return VaultError(f"{repo.name}: the hub refused access", record["status"] or 403, record["headers"])
