"""
Who may read what the vault has cached from the Hugging Face Hub.

A cached file of a private or gated repo must reach only clients the hub
would let read that file.  The hub is the judge, and it judges per file: a
gated repo shows README.md, LICENSE and .gitattributes to everyone and its
weights only to approved users.  So the vault remembers the hub's answers
per (repo, identity, file) — "files" scope — and, for the API listings
(which the hub shows for gated repos too), per (repo, identity) — "api"
scope.  An identity is the client's own token, the vault's token, or nobody.

Before the vault answers from its cache without asking the hub:

1. a yes for this identity about this file (or listing), no older than
   ``access_ttl``, or a yes for the anonymous identity about it (the file
   itself is public), lets the client read;
2. a repo the hub describes as public (``private: false, gated: false`` in
   its API answer, learned from any client's answer or asked anonymously
   once per ``access_ttl``) is open to everyone;
3. a recent no for this identity is answered as the hub answered it;
4. otherwise the vault asks the hub a cheap HEAD of that file with the
   client's identity.

Only what the hub confirmed is remembered: a yes is a 2xx/3xx, or a 404
``EntryNotFound`` (the hub looked inside the repo for this client); a no is a
401/403, or a 404 ``RepoNotFound``/``GatedRepo``.  Anything else (a 404
without a known code, a 400, a 5xx) is neither.  Yes answers are kept on disk
(for offline use after a restart, flushed every few seconds); no answers and
everything keyed by a client's token live in bounded memory only.

Offline (the hub unreachable, see `freshness.UpstreamHealth`): a repo last
seen public stays readable; otherwise only a yes for this identity about
this file no older than ``offline_access_grace`` counts.  Without one, a
client is refused as the hub would refuse an outsider: ``GatedRepo`` for a
gated repo, ``RepoNotFound`` for a private one, and 503 when the vault does
not know which the repo is.

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
from twisted.internet.task import LoopingCall

from ...bounded import LRU
from ...errors import UpstreamStatus, VaultError
from ...fetch import error_headers
from ...freshness import is_offline_error
from ...logs import VaultLogger

log = VaultLogger()

DENIED_CODES = ("RepoNotFound", "GatedRepo")
#: answers kept in memory: (repo, identity, scope, path) -> answer
MEMORY_LIMIT = 50_000
#: files one identity's record on disk names, per repo (the oldest go first)
RECORD_FILES_LIMIT = 20_000
FLUSH_EVERY = 2.0


def client_identity(authorization: bytes) -> str:
    """
    The name of a client's identity: a hash of its credentials in one
    spelling (``Bearer  X`` and ``bearer X`` are the same token to the hub,
    so they are one identity here).
    """
    scheme, _, credentials = authorization.strip().partition(b" ")
    normal = scheme.lower() + b" " + credentials.strip()
    return "client-" + hashlib.sha256(normal).hexdigest()[:32]


class AccessPolicy:
    def __init__(self, backend):
        self.backend = backend
        options = backend.config.options
        self.mode = options.get("access", "shared")
        self.ttl = float(options.get("access_ttl", 300))
        self.grace = float(options.get("offline_access_grace", 86400))
        self._answers = LRU(MEMORY_LIMIT)
        #: repo key -> {"visibility": "public"|"gated"|"private", "at": time}
        self._visibility = LRU(MEMORY_LIMIT // 10)
        #: (repo key, identity) -> {"files": {path: time}, "api": time} of yes answers, as on disk
        self._records = LRU(1000)
        self._dirty: dict[tuple, object] = {}
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = backend.machinery.reactor

    # -- identities ------------------------------------------------------------

    def identity(self, request) -> tuple[str, dict]:
        """(identity name for records, the Authorization to send upstream for this client)."""
        client = request.getHeader(b"authorization")
        if client:
            return client_identity(client), {"Authorization": client.decode("latin-1")}
        return self.lent_identity()

    def lent_identity(self) -> tuple[str, dict]:
        """Who a client without a token acts as: the vault (``shared``, with a token) or nobody."""
        token = self.backend.token
        if token and self.mode == "shared":
            return "vault", {"Authorization": f"Bearer {token}"}
        return "anonymous", {}

    def own_identity(self, request) -> tuple[str, dict]:
        """The client's own credentials, never the vault's (API calls outside the allow-list)."""
        client = request.getHeader(b"authorization")
        if client:
            return self.identity(request)
        return "anonymous", {}

    # -- what the hub said -------------------------------------------------------

    def note_answer(self, repo, scope: str, ident: str, code: int, headers: dict, path: str = "") -> dict | None:
        """
        Learn from an answer the hub gave `ident` about `path` of `repo` (or
        its listings); returns what it meant (None: neither a yes nor a no).
        """
        error_code = headers.get("x-error-code")
        now = time.time()
        if 200 <= code < 400 or (code == 404 and error_code == "EntryNotFound" and scope == "files"):
            answer = self._answers[(repo.key, ident, scope, path)] = {"allowed": True, "at": now}
            # On disk only what offline use needs: a real file of a repo that is not public
            # (a path that does not exist, or a public repo's file, stays in memory).
            if code < 400 and self.visibility(repo, self.ttl) != "public":
                self._remember_yes(repo, ident, scope, path, now)
            return answer
        if code in (401, 403) or (code == 404 and error_code in DENIED_CODES):
            kept = {k: v for k, v in headers.items() if k in ("x-error-code", "x-error-message")}
            answer = self._answers[(repo.key, ident, scope, path)] = {
                "allowed": False, "at": now, "status": code, "headers": kept}
            if error_code == "GatedRepo":
                self._set_visibility(repo, "gated")
            return answer
        return None

    def note_info(self, repo, code: int, headers: dict, body: bytes) -> None:
        """An API info answer about `repo` (for any identity) tells whether the repo is public."""
        if code == 200:
            try:
                document = json.loads(body)
            except ValueError:
                return
            if not isinstance(document, dict) or "private" not in document or "gated" not in document:
                return  # an expand= that left the fields out
            if document["private"] is True:
                self._set_visibility(repo, "private")
            elif document["gated"] not in (False, None):
                self._set_visibility(repo, "gated")
            elif document["private"] is False:
                self._set_visibility(repo, "public")

    def anonymous_answer(self, repo, code: int, headers: dict, body: bytes) -> None:
        """The hub's answer to an anonymous API info call: also says 'private' by refusing."""
        if code in (401, 404) and headers.get("x-error-code") == "RepoNotFound":
            self._set_visibility(repo, "private")
        else:
            self.note_info(repo, code, headers, body)

    def visibility(self, repo, max_age: float | None) -> str | None:
        record = self._visibility.get(repo.key)
        if record is None:
            record = self._load(self._visibility_key(repo))
            if record is None or record.get("visibility") not in ("public", "gated", "private"):
                return None
            self._visibility[repo.key] = record
        if max_age is not None and time.time() - record["at"] >= max_age:
            return None
        return record["visibility"]

    def _set_visibility(self, repo, visibility: str) -> None:
        previous = self._visibility.get(repo.key) or self._load(self._visibility_key(repo))
        record = {"visibility": visibility, "at": time.time()}
        self._visibility[repo.key] = record
        if previous is None or previous.get("visibility") != visibility or record["at"] - previous["at"] > self.ttl / 2:
            self._dirty[self._visibility_key(repo)] = record
            self._start_flushing()

    # -- the check ---------------------------------------------------------------

    @inlineCallbacks
    def authorize(self, request, repo, scope: str, check_url: str, path: str = ""):
        """Fires when the client may read `path` of `repo` (or its listings); fails with the hub's no otherwise."""
        ident, auth = self.identity(request)
        if self._yes(repo, scope, path, (ident, "anonymous"), self.ttl):
            return None
        visibility = self.visibility(repo, self.ttl)
        if visibility is None and not self.backend.health.is_down():
            yield self.backend.learn_visibility(repo)
            visibility = self.visibility(repo, self.ttl)
        if visibility == "public":
            return None
        answer = self._answers.get((repo.key, ident, scope, path))
        if answer is not None and not answer["allowed"] and time.time() - answer["at"] < self.ttl:
            raise self._denial(repo, answer)
        if self.backend.health.is_down():
            return self._offline(request, repo, scope, ident, path, "the hub is down")
        try:
            response = yield self.backend.request_upstream(
                "HEAD", check_url, auth, timeout=self.backend.offline_timeout, same_origin_redirects_only=True)
        except VaultError as e:
            if not is_offline_error(e):
                raise
            return self._failed(request, repo, scope, ident, path, e, e.message)
        headers = error_headers(response)
        if response.code >= 500 or response.code == 429:
            error = UpstreamStatus(response.code, check_url, headers)
            return self._failed(request, repo, scope, ident, path, error, f"the hub answered {response.code}")
        answer = self.note_answer(repo, scope, ident, response.code, headers, path)
        if answer is None:
            # neither a yes nor a no (400, 410, a 404 without a known code): pass it on
            raise UpstreamStatus(response.code, check_url, headers)
        if not answer["allowed"]:
            raise self._denial(repo, answer)
        return None

    def _failed(self, request, repo, scope, ident, path, error, why):
        """
        The check could not be made.  A 429 is the hub limiting this
        client's own token: it is passed on as it is (with its Retry-After)
        unless the hub is down for everyone, or a revoked token could open
        its old files by getting itself limited.  An unreachable, silent or
        failing hub (which no token can cause) brings the offline rules.
        """
        self.backend.health.failed(error, ident)
        if isinstance(error, UpstreamStatus) and error.code == 429 and not self.backend.health.is_down():
            raise error
        return self._offline(request, repo, scope, ident, path, why)

    def _yes(self, repo, scope, path, identities, max_age) -> bool:
        now = time.time()
        for ident in identities:
            answer = self._answers.get((repo.key, ident, scope, path))
            if answer is not None:
                if answer["allowed"] and now - answer["at"] < max_age:
                    return True
                continue
            at = self._recorded_yes(repo, ident, scope, path)
            if at is not None and now - at < max_age:
                return True
        return False

    def _offline(self, request, repo, scope, ident, path, why):
        if self.visibility(repo, None) == "public" or self._yes(repo, scope, path, ("anonymous",), float("inf")):
            return None  # public when last asked: what it served then, it may serve now
        if self._yes(repo, scope, path, (ident,), self.grace):
            return None
        log.info("Not serving {repo} from the cache: access cannot be checked ({why})", repo=repo.name, why=why)
        message = (f"{repo.name}: the hub cannot confirm access right now ({why}), and this client has no"
                   " recent confirmed access; try again when the hub is reachable")
        with_token = request.getHeader(b"authorization") is not None or ident == "vault"
        visibility = self.visibility(repo, None)
        if visibility == "gated":
            raise VaultError(message, 403 if with_token else 401,
                             {"X-Error-Code": "GatedRepo", "X-Error-Message": message})
        if visibility == "private":
            raise VaultError(message, 404 if with_token else 401,
                             {"X-Error-Code": "RepoNotFound", "X-Error-Message": message})
        raise VaultError(message, 503, {"Retry-After": "30"})

    @staticmethod
    def _denial(repo, answer) -> VaultError:
        return VaultError(f"{repo.name}: the hub refused access", answer["status"] or 403, answer["headers"])

    # -- records on disk (yes answers, for offline use after a restart) ----------------

    def _record_key(self, repo, ident: str) -> str:
        return f"{self.backend.name}/access/{repo.key}/{ident}"

    def _visibility_key(self, repo) -> str:
        return f"{self.backend.name}/access/{repo.key}/visibility"

    def _record(self, repo, ident: str) -> dict:
        record = self._records.get((repo.key, ident))
        if record is None:
            loaded = self._load(self._record_key(repo, ident))
            record = loaded if isinstance(loaded, dict) else {}
            if not isinstance(record.get("files"), dict):
                record["files"] = {}
            self._records[(repo.key, ident)] = record
        return record

    def _recorded_yes(self, repo, ident, scope, path):
        if ident.startswith("client-") and (repo.key, ident) not in self._records:
            # tokens nobody confirmed have no record: do not touch the disk for each one
            if self.backend.store.lookup(self._record_key(repo, ident)) is None:
                return None
        record = self._record(repo, ident)
        at = record["files"].get(path) if scope == "files" else record.get("api")
        return at if isinstance(at, (int, float)) else None

    def _remember_yes(self, repo, ident, scope, path, now) -> None:
        record = self._record(repo, ident)
        before = record["files"].get(path) if scope == "files" else record.get("api")
        if scope == "files":
            files = record["files"]
            files.pop(path, None)
            files[path] = now
            while len(files) > RECORD_FILES_LIMIT:
                files.pop(next(iter(files)))
        else:
            record["api"] = now
        # Disk is for restarts while the hub is away: write when the answer is new,
        # or when the stored one is getting old.
        if before is None or now - before > self.ttl / 2:
            self._dirty[self._record_key(repo, ident)] = record
            self._start_flushing()

    def _load(self, key: str):
        return self.backend.records.load(key)

    def _start_flushing(self) -> None:
        if not self._flusher.running:
            self._flusher.start(FLUSH_EVERY, now=False)

    def flush(self) -> None:
        """Write the records that changed (every few seconds, and when the vault stops)."""
        dirty, self._dirty = self._dirty, {}
        for key, record in dirty.items():
            self.backend.records.keep(key, dict(record, files=dict(record.get("files") or {}))
                                      if "files" in record else dict(record))
        if not self._dirty and self._flusher.running:
            self._flusher.stop()
