"""
Hugging Face Hub backend: what ``HF_ENDPOINT=http://vault/huggingface`` needs.

Resolve (``[datasets/|spaces/]{repo}/resolve/{rev}/{path}``)
    The vault asks the hub a HEAD itself, follows the hub's same-origin
    redirects (``/api/resolve-cache/...``, renamed repos) and stops at the
    redirect to the CDN, whose headers carry the file's metadata.  The client
    gets a 200 with ``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``/``-Size``
    and ``Content-Length``: never a Location to the CDN, never the Xet
    headers, so it downloads the bytes from the vault.  A GET fetches
    ``resolve/{commit}/{path}`` through the hub's redirects (the token goes to
    the hub's origin only) into the cache while streaming it.

Cache layout (below ``cache_dir/<name>/``; records: see `records`)
    ``blobs/<2 hex>/<sha256>``                   LFS content, once across repos and revisions
    ``files/<type>/<repo>/<commit>/<path>``      regular (git) files, per immutable commit
    ``api/<type>/<repo>/<kind>/<rev>/<digest>``  answers of the API calls clients make first
    ``access/<type>/<repo>/...``                 who the hub let read what (see `access`)

Revisions
    A commit sha needs no hub once its metadata is kept.  A branch or tag is
    resolved by the hub (a HEAD) unless it was resolved less than
    ``revision_ttl`` seconds ago.  When the hub is unreachable, hangs longer
    than ``offline_timeout`` (when there is something kept to answer with),
    answers 5xx or 429, the last known commit and the kept metadata answer.

API
    ``/api/{models,datasets,spaces}/{repo}`` (and ``/revision/{rev}``),
    ``/tree/{rev}[/{path}]``, ``POST /paths-info/{rev}`` and ``/refs`` are
    asked with the lent identity and their answers kept (`freshness`: per
    commit for good, for a branch as the last answer) for offline use;
    ``xetHash`` fields are removed and the absolute hub URLs in ``Link`` are
    rewritten to the vault.  Any other ``GET /api/`` is relayed with the
    client's own credentials only; any other write is refused with 405.
"""

import hashlib
import json
import time
from urllib.parse import quote

from twisted.internet.defer import inlineCallbacks

from ...errors import MethodNotAllowed, NotFound, UpstreamStatus, VaultError
from ...freshness import Answer, Coalescer, is_offline_error
from ...logs import VaultLogger
from ...serve import send_small, set_entity_headers
from ..base import Backend
from .access import AccessPolicy
from .hub import (COMMIT, REF_KINDS, REPO_TYPES, Hub, Repo, attachment, check_forwarded_path, kept_query,
                  parse_revision, segments, strip_xet, worth_keeping)
from .records import Records

log = VaultLogger()

API_KEYWORDS = {b"revision", b"tree", b"paths-info", b"refs", b"xet-read-token", b"commits", b"treesize",
                b"parquet", b"discussions", b"settings", b"commit", b"preupload", b"lfs-files"}
REQUEST_BODY_LIMIT = 1024 * 1024
#: headers of an API answer that are kept with it and relayed
API_HEADERS = ("content-type", "link")
ERROR_HEADERS = ("retry-after", "x-error-code", "x-error-message", "x-repo-commit")


class HuggingFaceBackend(Backend):
    def __init__(self, config, machinery):
        super().__init__(config, machinery)
        self.token = config.options.get("token") or None
        self.offline_timeout = float(config.options.get("offline_timeout", 4))
        self.hub = Hub(self)
        self.records = Records(self)
        self.access = AccessPolicy(self)
        #: metadata HEADs and visibility checks under way, shared by identical requests
        self._asking = Coalescer()

    def render_POST(self, request):  # paths-info
        return self._dispatch(request)

    def stopped(self) -> None:
        self.access.flush()

    def prefetch(self, request, body: dict):
        from .prefetch import prefetch

        return prefetch(self, request, body)

    def _timeout(self, fallback) -> float:
        """How long to wait for the hub: short when the cache can answer instead or the hub is down."""
        return self.offline_timeout if fallback is not None or self.health.is_down() else self.config.timeout

    # -- routing -------------------------------------------------------------

    def handle(self, request, subpath: bytes):
        raw = subpath.split(b"/")
        if raw[0] == b"api":
            return self.handle_api(request, raw[1:])
        self.check_method(request)
        repo, rev, path = self.parse_resolve(raw)
        return self.resolve(request, repo, rev, path)

    def parse_resolve(self, raw: list[bytes]):
        kind, start = "models", 0
        if raw and raw[0] in (b"datasets", b"spaces"):
            kind, start = raw[0].decode(), 1
        for width in (2, 1):
            at = start + width
            if len(raw) > at + 2 and raw[at] == b"resolve":
                repo = Repo(kind, "/".join(segments(b"/".join(raw[start:at]))))
                # As the hub reads it: an unencoded refs/pr/1 (or refs/heads|tags|convert/x)
                # is one revision, the rest is the path.
                width_rev = 1
                if raw[at + 1] == b"refs" and raw[at + 2] in REF_KINDS:
                    if len(raw) <= at + 4:  # the hub reads refs/pr/1 as the revision: no file is named
                        raise NotFound(f"no file named after revision refs/{raw[at + 2].decode()}/...")
                    width_rev = 3
                rev = parse_revision(b"%2F".join(raw[at + 1:at + 1 + width_rev]))
                path = "/".join(segments(b"/".join(raw[at + 1 + width_rev:])))
                return repo, rev, path
        raise NotFound("not a Hugging Face resolve or API URL")

    def public_base(self, request) -> str:
        host = request.getHeader(b"host")
        if not host:
            h = request.getHost()
            host = f"{h.host}:{h.port}".encode()
        scheme = "https" if request.isSecure() else "http"
        return f"{scheme}://{host.decode('latin-1')}{self.config.prefix.rstrip('/')}"

    # -- file metadata --------------------------------------------------------

    @inlineCallbacks
    def file_info(self, request, repo: Repo, rev: str, path: str):
        """
        What the hub says of (repo, rev, path), from the cache when it can or
        must: (info, asked), where `asked` tells whether the hub answered this
        client just now (which also settles its access).
        """
        records = self.records
        commit = rev if COMMIT.match(rev) else records.fresh_commit(repo, rev, time.time())
        if commit:
            info = records.load_info(repo, commit, path)
            if info is not None:
                return info, False
        known = commit or records.last_commit(repo, rev)
        fallback = records.load_info(repo, known, path) if known else None
        if fallback is not None and self.health.is_down():
            request.set_outcome("stale")
            return fallback, False
        ident, auth = self.access.identity(request)
        asked_rev = commit or rev
        try:
            info = yield self._asking.share(("head", repo.key, asked_rev, path, ident),
                                            lambda: self.hub.file_info(repo, asked_rev, path, auth,
                                                                       self._timeout(fallback)))
        except VaultError as e:
            if is_offline_error(e):
                self.health.failed(e, ident)
                if fallback is not None:
                    log.info("Answering {repo}@{rev}/{path} from the cache ({why})",
                             repo=repo.name, rev=rev, path=path, why=e.message)
                    request.set_outcome("stale")
                    return fallback, False
            if not isinstance(e, UpstreamStatus):
                raise
            self.access.note_answer(repo, "files", ident, e.code, e.headers, path)
            commit = e.headers.get("x-repo-commit") or ""
            if e.code == 404 and e.headers.get("x-error-code") == "EntryNotFound" and COMMIT.match(commit):
                records.remember_ref(repo, rev, commit, time.time())
                records.note_missing(repo, commit, path, e.headers.get("x-error-message") or f"{path} does not exist")
            raise
        self.access.note_answer(repo, "files", ident, 200, {}, path)
        records.remember_ref(repo, rev, info["commit"], time.time())
        records.save_info(repo, info["commit"], path, info)
        if self.access.visibility(repo, self.access.ttl) is None:
            self.learn_visibility(repo)  # for offline answers later; nobody waits for it
        return info, True

    def learn_visibility(self, repo: Repo):
        """
        Ask the hub, as nobody, whether `repo` is public (its API info), so
        that public files need no check per client.  Never fails: without an
        answer the visibility stays unknown.
        """
        url = self.hub.api_url(repo, "info")

        def learned(answer):
            if answer.code >= 500 or answer.code == 429:
                self.health.failed(UpstreamStatus(answer.code, url, answer.errors), "anonymous")
            else:
                self.access.anonymous_answer(repo, answer.code, answer.errors, answer.body)

        def failed(failure):
            if failure.check(VaultError) and is_offline_error(failure.value):
                self.health.failed(failure.value, "anonymous")
            elif not failure.check(VaultError):
                log.failure("Asking the hub whether {repo} is public failed", failure, repo=repo.name)

        d = self._asking.share(("visibility", repo.key),
                               lambda: self.hub.ask("GET", url, {}, None, self.offline_timeout))
        return d.addCallbacks(learned, failed)

    # -- resolve ------------------------------------------------------------

    @inlineCallbacks
    def resolve(self, request, repo: Repo, rev: str, path: str):
        info, asked = yield self.file_info(request, repo, rev, path)
        if not asked:
            yield self.access.authorize(request, repo, "files", self.hub.resolve_url(repo, info["commit"], path), path)
        if info.get("missing"):
            raise VaultError(
                f"{path} does not exist in {repo.name} at {info['commit']}",
                404,
                {"X-Error-Code": info["error_code"], "X-Error-Message": info["error_message"],
                 "X-Repo-Commit": info["commit"]},
            )
        # A repo file is data, never a page of the vault's origin: a browser
        # downloads it instead of rendering it (the CDN does the same for LFS files).
        headers = {"X-Repo-Commit": info["commit"], "Content-Disposition": attachment(path)}
        if info.get("sha256"):
            headers["X-Linked-Etag"] = info.get("linked_etag") or f'"{info["sha256"]}"'
            if info.get("size") is not None:
                headers["X-Linked-Size"] = str(info["size"])
        meta = {"content_type": info["content_type"], "etag": info["etag"], "headers": headers,
                "last_modified": None}
        if info.get("sha256"):
            key = f"{self.name}/blobs/{info['sha256'][:2]}/{info['sha256']}"
        else:
            key = f"{self.name}/files/{repo.key}/{info['commit']}/{path}"
        label = f"{repo.url_prefix}{repo.name}/resolve/{rev}/{path}"
        if request.method == b"HEAD":
            entry = self.store.lookup(key)
            if entry is not None:
                return (yield self.serve_hit(request, entry, label, meta))
            if request.disconnected:
                return None
            request.set_outcome("miss" if asked else "hit")
            set_entity_headers(request, meta)
            if info.get("size") is not None:
                request.setHeader(b"content-length", b"%d" % info["size"])
            request.finish()
            return None
        spec = self.download_spec(key, self.hub.resolve_url(repo, info["commit"], path),
                                  headers=self.access.identity(request)[1], expected_size=info.get("size"),
                                  expected_sha256=info.get("sha256"), label=label)
        return (yield self.serve_cached(request, spec, meta))

    # -- API ------------------------------------------------------------------

    def handle_api(self, request, raw: list[bytes]):
        method = request.method
        if not raw or raw[0] not in REPO_TYPES or len(raw) < 2:
            if method not in (b"GET", b"HEAD"):
                raise MethodNotAllowed("the vault is a read-only mirror of the hub")
            return self.forward_api(request)
        kind = raw[0].decode()
        if len(raw) >= 4 and raw[3] in API_KEYWORDS:
            name_raw, sub = raw[1:3], raw[3:]
        elif len(raw) >= 3 and raw[2] in API_KEYWORDS:
            name_raw, sub = raw[1:2], raw[2:]
        elif len(raw) <= 3:
            name_raw, sub = raw[1:], []
        else:
            raise NotFound("unknown API route")
        repo = Repo(kind, "/".join(segments(b"/".join(name_raw))))
        if sub and sub[0] == b"paths-info" and len(sub) == 2:
            if method != b"POST":
                raise MethodNotAllowed("paths-info takes POST", ("POST",))
            rev = parse_revision(sub[1])
            body = request.content.read(REQUEST_BODY_LIMIT + 1) if request.content is not None else b""
            if len(body) > REQUEST_BODY_LIMIT:
                raise VaultError("request body too large", 413)
            return self.api_cached(request, repo, "paths-info", rev, "", body)
        if method not in (b"GET", b"HEAD"):
            raise MethodNotAllowed("the vault is a read-only mirror of the hub: uploads and changes go to the hub")
        if not sub:
            return self.api_cached(request, repo, "info", "", "")
        if sub[0] == b"revision" and len(sub) == 2:
            return self.api_cached(request, repo, "info", parse_revision(sub[1]), "")
        if sub[0] == b"tree" and len(sub) >= 2:
            rev = parse_revision(sub[1])
            path = "/".join(segments(b"/".join(sub[2:]))) if len(sub) > 2 and sub[2:] != [b""] else ""
            return self.api_cached(request, repo, "tree", rev, path)
        if sub == [b"refs"]:
            return self.api_cached(request, repo, "refs", "", "")
        return self.forward_api(request)

    def forward_api(self, request):
        """
        Any other API call is relayed with the client's own credentials only:
        the vault's token opens the routes of `api_cached` (what downloads
        need), never account endpoints (whoami-v2, orgs, settings) nor the
        minting of credentials that work without the vault (xet-read-token).
        """
        check_forwarded_path(request.path[len(self.config.prefix):])
        url = self.config.base_url + request.uri[len(self.config.prefix) - 1:].decode("ascii", "replace")
        return self.forward(
            request, "GET", url, headers=self.access.own_identity(request)[1],
            rewrite=lambda body, response: clean_json(body),
            relayed=("content-type", "retry-after", "x-error-code", "x-error-message"),
        )

    def _link(self, request, hub_link: str | None) -> dict:
        if not hub_link:
            return {}
        return {"Link": hub_link.replace(self.config.base_url, self.public_base(request))}

    @inlineCallbacks
    def api_cached(self, request, repo: Repo, kind: str, rev: str, path: str, body: bytes | None = None):
        """
        An API call a fresh client makes first (repo info, tree, paths-info,
        refs): asked with the lent identity; its answer kept for offline use
        when its query is one the vault knows (`kept_query`), reused without
        asking when it is about a commit, served stale when the hub fails.
        """
        raw_query = request.uri.partition(b"?")[2]
        query = kept_query(kind, raw_query, body)
        url = self.hub.api_url(repo, kind, rev, path, raw_query.decode("ascii", "replace"))
        check_url = url if body is None else self.hub.api_url(repo, "info", rev)
        ident, headers = self.access.identity(request)
        headers = dict(headers)
        if body is not None:
            headers["Content-Type"] = (request.getHeader(b"content-type")
                                       or b"application/x-www-form-urlencoded").decode("latin-1")
        method = "POST" if body is not None else "GET"
        if query is None:  # not kept: asked and relayed
            answer = yield self._asking.share(("api", url, body, ident), lambda: self.hub.ask(
                method, url, headers, body, self.config.timeout))
            return self._relay_api(request, repo, kind, rev, ident, answer)

        digest = hashlib.sha256(b"\0".join([path.encode(), query.encode()])).hexdigest()[:32]
        # "@" for the repo's default revision: quote() never leaves a bare "@", so no branch can be it
        key = f"{self.name}/api/{repo.key}/{kind}/{quote(rev, safe='') or '@'}/{digest}"
        missing = self.records.api_missing(repo, key)

        @inlineCallbacks
        def answer_missing(outcome):
            request.set_outcome(outcome)
            yield self.access.authorize(request, repo, "api", check_url)
            return send_small(request, missing["content_type"], missing["body"].encode("utf-8", "surrogateescape"),
                              missing["status"], missing["headers"])

        if missing is not None and (COMMIT.match(rev) or self.health.is_down()):
            return (yield answer_missing("hit" if COMMIT.match(rev) else "stale"))

        def ask(kept):
            # the hub sends no validators with API answers: each question is asked in full
            d = self.hub.ask(method, url, headers, body, self._timeout(kept if kept is not None else missing))
            return d.addCallback(self._as_answer)

        # A body is the client's own: a failure it causes says nothing about the hub (health).
        asked_as = ident if body is None else ident + "+body"
        try:
            answer = yield self.kept.get(
                key, ask, ttl=float("inf") if COMMIT.match(rev) else 0.0, health=self.health, identity=asked_as,
                keep=lambda a: a.status == 200 and worth_keeping(kind, a.body), name=key)
        except VaultError as e:
            if missing is not None and is_offline_error(e):
                return (yield answer_missing("stale"))
            raise
        if missing is not None and (answer.status >= 500 or answer.status == 429):
            return (yield answer_missing("stale"))
        if answer.source in ("kept", "stale"):
            if answer.source == "kept":
                self.log_hit(key)
            request.set_outcome("hit" if answer.source == "kept" else "stale")
            yield self.access.authorize(request, repo, "api", check_url)
            return send_small(request, answer.headers.get("content-type", "application/json"), answer.body, 200,
                              self._link(request, answer.headers.get("link")))
        self.access.note_answer(repo, "api", ident, answer.status, answer.headers)
        if answer.status == 200:
            request.set_outcome("miss")
            if kind == "info":
                self._learn_commit(repo, rev, answer.body)
                self.access.note_info(repo, answer.status, answer.headers, answer.body)
            return send_small(request, answer.headers.get("content-type", "application/json"), answer.body, 200,
                              self._link(request, answer.headers.get("link")))
        if answer.status >= 500:
            raise UpstreamStatus(answer.status, url, answer.headers)
        relayed = {k: v for k, v in answer.headers.items() if k in ERROR_HEADERS}
        if answer.status == 404 and relayed.get("x-error-code") == "EntryNotFound":
            # A path that does not exist (transformers probes some): remembered like an answer.
            self.records.note_api_missing(repo, key, {
                "status": 404, "headers": relayed, "content_type": answer.headers.get("content-type", "text/plain"),
                "body": answer.body.decode("utf-8", "surrogateescape")})
        return send_small(request, answer.headers.get("content-type", "text/plain"), answer.body, answer.status,
                          relayed)

    @staticmethod
    def _as_answer(hub_answer) -> Answer:
        headers = dict(hub_answer.errors)
        headers["content-type"] = hub_answer.content_type
        if hub_answer.link:
            headers["link"] = hub_answer.link
        body = clean_json(hub_answer.body) if hub_answer.code == 200 else hub_answer.body
        return Answer(hub_answer.code, headers, body)

    def _relay_api(self, request, repo, kind, rev, ident, hub_answer):
        """An answer that is not kept: access noted, passed on (a 5xx as 502)."""
        if hub_answer.code >= 500 or hub_answer.code == 429:
            self.health.failed(UpstreamStatus(hub_answer.code, "", hub_answer.errors), ident)
        if hub_answer.code >= 500:
            raise UpstreamStatus(hub_answer.code, self.hub.api_url(repo, kind, rev), hub_answer.errors)
        self.access.note_answer(repo, "api", ident, hub_answer.code, hub_answer.errors)
        request.set_outcome("forwarded")
        if hub_answer.code == 200:
            return send_small(request, hub_answer.content_type, clean_json(hub_answer.body), 200,
                              self._link(request, hub_answer.link))
        relayed = {k: v for k, v in hub_answer.errors.items() if k in ERROR_HEADERS}
        return send_small(request, hub_answer.content_type, hub_answer.body, hub_answer.code, relayed)

    def _learn_commit(self, repo: Repo, rev: str, answer: bytes) -> None:
        try:
            commit = json.loads(answer).get("sha")
        except (ValueError, AttributeError):
            return
        if isinstance(commit, str):
            self.records.remember_ref(repo, rev or "@", commit, time.time())


def clean_json(body: bytes) -> bytes:
    """The hub's JSON without ``xetHash`` fields (clients then never switch to Xet)."""
    try:
        document = json.loads(body)
    except ValueError:
        return body
    return json.dumps(strip_xet(document)).encode()

