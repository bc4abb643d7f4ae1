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

Cache layout (below ``cache_dir/<name>/``)
    ``blobs/<sha256>``                           LFS content, once across repos and revisions
    ``files/<type>/<repo>/<commit>/<path>``      regular (git) files, per immutable commit
    ``meta/<type>/<repo>/<commit>/<path>``       what the hub said of that file (or its 404)
    ``refs/<type>/<repo>/<rev>``                 last commit seen for a branch or tag
    ``api/<type>/<repo>/<kind>/<rev>/<digest>``  answers of the API calls clients make first

Revisions
    A commit sha needs no hub once its metadata is cached.  A branch or tag is
    resolved by the hub (a HEAD) unless it was resolved less than
    ``revision_ttl`` seconds ago.  When the hub is unreachable, hangs longer
    than ``offline_timeout`` (when there is something cached to answer with),
    answers 5xx or 429, the last known commit and the cached metadata answer.

API
    ``/api/{models,datasets,spaces}/{repo}`` (and ``/revision/{rev}``),
    ``/tree/{rev}[/{path}]``, ``POST /paths-info/{rev}`` and ``/refs`` are
    forwarded and their answers kept (per commit, or as the last answer for a
    branch) for offline use; ``xetHash`` fields are removed and the absolute
    hub URLs in ``Link`` are rewritten to the vault.  Any other ``GET /api/``
    is forwarded uncached; any other write is refused with 405.
"""

import hashlib
import json
import mimetypes
import re
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote_to_bytes, urlencode

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.python.failure import Failure

from ..errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    UpstreamStatus,
    UpstreamUnavailable,
    VaultError,
)
from ..bounded import LRU
from ..fetch import error_headers, read_body
from ..freshness import UpstreamHealth, is_offline_error
from ..logs import VaultLogger
from ..serve import StoredBody, send_small, serve, set_entity_headers
from ..store import UnsafePath, safe_segments
from .base import FORWARD_LIMIT, Backend, set_outcome
from .hf_access import AccessPolicy

log = VaultLogger()

COMMIT = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
REPO_TYPES = (b"models", b"datasets", b"spaces")
REF_KINDS = (b"pr", b"heads", b"tags", b"convert")
API_KEYWORDS = {b"revision", b"tree", b"paths-info", b"refs", b"xet-read-token", b"commits", b"treesize",
                b"parquet", b"discussions", b"settings", b"commit", b"preupload", b"lfs-files"}
REQUEST_BODY_LIMIT = 1024 * 1024
#: entries of the in-memory maps (commits of branches, not-found records)
MEMORY_LIMIT = 100_000
#: paths one commit's not-found record names (the oldest go first)
MISSING_LIMIT = 1000


@dataclass(frozen=True)
class _HubAnswer:
    """An API answer of the hub, read whole (so several clients can share it)."""

    code: int
    content_type: str
    link: str | None
    errors: dict
    body: bytes


@dataclass(frozen=True)
class Repo:
    kind: str  # "models", "datasets" or "spaces"
    name: str  # "org/name" or a legacy "name"

    @property
    def url_prefix(self) -> str:
        return "" if self.kind == "models" else f"{self.kind}/"

    @property
    def key(self) -> str:
        # Always two segments: a legacy single-name repo ("gpt2") goes under
        # "%", which no org name can be (no path segment may hold a "%"), so
        # it never shares a folder with an org's repo ("gpt2/<x>").
        return f"{self.kind}/{self.name}" if "/" in self.name else f"{self.kind}/%/{self.name}"


def parse_revision(raw: bytes) -> str:
    """A revision from its (percent-encoded) path segment: branch, tag, refs/pr/N or sha."""
    try:
        rev = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("revision is not UTF-8") from None
    if not rev or len(rev) > 255 or "%" in rev or "\\" in rev or any(ord(c) < 0x21 or ord(c) == 0x7F for c in rev):
        raise BadRequest(f"invalid revision {rev[:60]!r}")
    if any(part in ("", ".", "..") for part in rev.split("/")):
        raise BadRequest(f"invalid revision {rev[:60]!r}")
    return rev


def _segments(raw: bytes) -> list[str]:
    try:
        return safe_segments(raw)
    except UnsafePath as e:
        raise BadRequest(f"bad path: {e}") from None


def _header(response, name: str) -> str | None:
    values = response.headers.getRawHeaders(name.encode("ascii"))
    return values[0].decode("latin-1") if values else None


def _unquote_etag(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


def _check_forwarded_path(raw: bytes) -> None:
    """
    A path the vault relays as it is must not climb out of /api/ (or out of
    base_url's path) on a hub or front end that resolves dot segments.
    Encoded slashes stay allowed (revisions like refs%2Fpr%2F1), but no
    part of a decoded segment may be '.' or '..', and no backslash, NUL,
    control character or second level of encoding may appear.
    """
    for segment in raw.split(b"/"):
        decoded = unquote_to_bytes(segment)
        if b"%" in decoded or b"\\" in decoded or any(c < 0x20 or c == 0x7F for c in decoded):
            raise BadRequest("bad path: encoded control characters, backslashes or double encoding")
        if any(part in (b".", b"..") for part in decoded.split(b"/")):
            raise BadRequest("bad path: '.' and '..' segments are not allowed")


#: query parameters of the API calls whose answers are kept, per kind (anything else: relayed, not kept)
KEPT_PARAMETERS = {
    "info": {"blobs", "expand", "securityStatus", "files_metadata"},
    "tree": {"recursive", "expand", "cursor", "limit"},
    "refs": {"include_prs"},
    "paths-info": set(),
}
PATHS_INFO_FIELDS = {"paths", "expand"}


def kept_query(kind: str, raw: bytes, body: bytes | None) -> str | None:
    """
    The query (and, for paths-info, the form body) in one normal form, or
    None when the answer must not be kept: an unknown parameter, an
    overlong value, a paths-info call about more than one path.  So junk
    query strings cannot each leave a record behind.
    """
    try:
        pairs = parse_qsl(raw.decode("ascii"), keep_blank_values=True, strict_parsing=bool(raw))
        fields = parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=bool(body)) \
            if body is not None else []
    except (UnicodeDecodeError, ValueError):
        return None
    allowed = KEPT_PARAMETERS[kind]
    if len(pairs) > 16 or any(k not in allowed or len(v) > 512 for k, v in pairs):
        return None
    if body is not None:
        paths = [v for k, v in fields if k == "paths"]
        if len(paths) != 1 or any(k not in PATHS_INFO_FIELDS or len(v) > 1024 for k, v in fields):
            return None
        pairs = pairs + [("body." + k, v) for k, v in fields]
    return urlencode(sorted(pairs))


def worth_keeping(kind: str, answer: bytes) -> bool:
    """A paths-info answer naming nothing (a path that does not exist) is not kept."""
    return kind != "paths-info" or answer.strip() not in (b"[]", b"")


def attachment(path: str) -> str:
    """``Content-Disposition: attachment`` naming the file, also when its name is not ASCII."""
    name = path.rsplit("/", 1)[-1]
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def strip_xet(node):
    """Remove every ``xetHash`` key, so that clients never switch to the Xet protocol."""
    if isinstance(node, dict):
        return {k: strip_xet(v) for k, v in node.items() if k != "xetHash"}
    if isinstance(node, list):
        return [strip_xet(v) for v in node]
    return node


class HuggingFaceBackend(Backend):
    def __init__(self, config, vault):
        super().__init__(config, vault)
        self.token = config.options.get("token") or None
        self.revision_ttl = float(config.options.get("revision_ttl", 60))
        self.offline_timeout = float(config.options.get("offline_timeout", 4))
        #: (repo key, rev) -> (commit, monotonic time it was learned from the hub)
        self._refs = LRU(MEMORY_LIMIT)
        #: per (repo, commit): the paths the hub said do not exist -> its message
        self._missing = LRU(MEMORY_LIMIT // 10)
        #: hub requests under way (metadata HEADs, API calls): key -> waiting Deferreds
        self._asking: dict[tuple, list[Deferred]] = {}
        #: whether the hub answers at all: while it does not, the cache answers what it can at once
        self.health = UpstreamHealth(self.name)
        self.access = AccessPolicy(self)

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
                repo = Repo(kind, "/".join(_segments(b"/".join(raw[start:at]))))
                # As the hub reads it: an unencoded refs/pr/1 (or refs/heads|tags|convert/x)
                # is one revision, the rest is the path.
                width_rev = 3 if raw[at + 1] == b"refs" and raw[at + 2] in REF_KINDS and len(raw) > at + 4 else 1
                rev = parse_revision(b"%2F".join(raw[at + 1:at + 1 + width_rev]))
                path = "/".join(_segments(b"/".join(raw[at + 1 + width_rev:])))
                return repo, rev, path
        raise NotFound("not a Hugging Face resolve or API URL")

    # -- auth ------------------------------------------------------------------

    def auth_headers(self, request) -> dict:
        """
        What goes upstream for this client (to the hub's origin only): its own
        Authorization, else, with ``access: shared``, the configured token.
        """
        return self.access.identity(request)[1]

    def public_base(self, request) -> str:
        host = request.getHeader(b"host")
        if not host:
            h = request.getHost()
            host = f"{h.host}:{h.port}".encode()
        scheme = "https" if request.isSecure() else "http"
        return f"{scheme}://{host.decode('latin-1')}{self.config.prefix.rstrip('/')}"

    # -- revisions ------------------------------------------------------------

    def _ref_key(self, repo: Repo, rev: str) -> str:
        return f"{self.name}/refs/{repo.key}/{quote(rev, safe='')}"

    def fresh_commit(self, repo: Repo, rev: str) -> str | None:
        known = self._refs.get((repo.key, rev))
        if known and time.monotonic() - known[1] < self.revision_ttl:
            return known[0]
        return None

    def last_commit(self, repo: Repo, rev: str) -> str | None:
        """The last commit the hub named for `rev`, however old (offline use)."""
        if COMMIT.match(rev):
            return rev
        known = self._refs.get((repo.key, rev))
        if known:
            return known[0]
        record = self.load_record(self._ref_key(repo, rev))
        commit = record.get("commit") if isinstance(record, dict) else None
        return commit if isinstance(commit, str) and COMMIT.match(commit) else None

    def remember_ref(self, repo: Repo, rev: str, commit: str) -> None:
        if COMMIT.match(rev) or not COMMIT.match(commit or ""):
            return
        previous = self.last_commit(repo, rev)
        self._refs[(repo.key, rev)] = (commit, time.monotonic())
        if previous != commit:
            self.keep_small(self._ref_key(repo, rev), json.dumps({"commit": commit, "revision": rev}).encode())

    # -- file metadata --------------------------------------------------------

    def _meta_key(self, repo: Repo, commit: str, path: str) -> str:
        return f"{self.name}/meta/{repo.key}/{commit}/{path}"

    def load_info(self, repo: Repo, commit: str, path: str) -> dict | None:
        """What the hub said of `path` at `commit`: its metadata, or that it does not exist."""
        info = self.load_record(self._meta_key(repo, commit, path))
        if info is not None:
            return info
        message = self._missing_paths(repo, commit).get(path)
        if message is None:
            return None
        return {"missing": True, "commit": commit, "error_code": "EntryNotFound", "error_message": message}

    def load_record(self, key: str):
        """A small JSON record of ours, or None; a record in use is marked as used (eviction)."""
        entry = self.store.lookup(key)
        if entry is None:
            return None
        self.store.touch(entry)
        try:
            with open(entry.path, "rb") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _missing_key(self, repo: Repo, commit: str) -> str:
        return f"{self.name}/missing/{repo.key}/{commit}"

    def _missing_paths(self, repo: Repo, commit: str) -> dict:
        """
        The paths the hub said do not exist at `commit` (transformers probes a
        few optional files per model): one record per commit, at most
        `MISSING_LIMIT` paths, so that asking for made-up paths neither
        creates a file per path nor lets a made-up folder ("config.json/x")
        stand where a real file belongs.
        """
        found = self._missing.get((repo.key, commit))
        if found is None:
            found = self.load_record(self._missing_key(repo, commit))
            found = found if isinstance(found, dict) else {}
            self._missing[(repo.key, commit)] = found
        return found

    def note_missing(self, repo: Repo, commit: str, path: str, message: str) -> None:
        paths = self._missing_paths(repo, commit)
        if paths.get(path) == message:
            return
        paths.pop(path, None)
        paths[path] = message
        while len(paths) > MISSING_LIMIT:
            paths.pop(next(iter(paths)))
        self.keep_small(self._missing_key(repo, commit), json.dumps(paths).encode())

    def save_info(self, repo: Repo, commit: str, path: str, info: dict) -> None:
        self.keep_small(self._meta_key(repo, commit, path), json.dumps(info, sort_keys=True).encode())

    def keep_small(self, key: str, body: bytes, meta: dict | None = None):
        """
        Store a small record (metadata, refs, access answers, API answers).
        Failing to keep it (disk full, read-only) costs offline use later,
        not the answer now: it is logged, not raised.
        """
        try:
            return self.store.write_small(key, body, meta or {"content_type": "application/json"})
        except OSError as e:
            log.warn("Could not keep {key} in the cache: {why}", key=key, why=e.strerror)
            return None

    @inlineCallbacks
    def file_info(self, request, repo: Repo, rev: str, path: str):
        """
        What the hub says of (repo, rev, path), from the cache when it can or
        must: (info, asked), where `asked` tells whether the hub answered this
        client just now (which also settles its access).
        """
        commit = rev if COMMIT.match(rev) else self.fresh_commit(repo, rev)
        if commit:
            info = self.load_info(repo, commit, path)
            if info is not None:
                return info, False
        known = commit or self.last_commit(repo, rev)
        fallback = self.load_info(repo, known, path) if known else None
        if fallback is not None and self.health.is_down():
            set_outcome(request, "stale")
            return fallback, False
        ident = self.access.identity(request)[0]
        try:
            info = yield self._coalesced_head(request, repo, commit or rev, path, self._timeout(fallback))
        except VaultError as e:
            if is_offline_error(e):
                self.health.failed(e, ident)
                if fallback is not None:
                    log.info("Answering {repo}@{rev}/{path} from the cache ({why})",
                             repo=repo.name, rev=rev, path=path, why=e.message)
                    set_outcome(request, "stale")
                    return fallback, False
            if not isinstance(e, UpstreamStatus):
                raise
            self.access.note_answer(repo, "files", ident, e.code, e.headers, path)
            commit = e.headers.get("x-repo-commit") or ""
            if e.code == 404 and e.headers.get("x-error-code") == "EntryNotFound" and COMMIT.match(commit):
                self.remember_ref(repo, rev, commit)
                self.note_missing(repo, commit, path, e.headers.get("x-error-message") or f"{path} does not exist")
            raise
        self.access.note_answer(repo, "files", ident, 200, {}, path)
        self.remember_ref(repo, rev, info["commit"])
        self.save_info(repo, info["commit"], path, info)
        if self.access.visibility(repo, self.access.ttl) is None:
            self.learn_visibility(repo)  # for offline answers later; nobody waits for it
        return info, True

    def learn_visibility(self, repo: Repo) -> Deferred:
        """
        Ask the hub, as nobody, whether `repo` is public (its API info), so
        that public files need no check per client.  Never fails: without an
        answer the visibility stays unknown.
        """
        url = f"{self.config.base_url}/api/{repo.kind}/{repo.name}"

        def start():
            return self._ask_api_now("GET", url, {}, None, self.offline_timeout)

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

        return self._shared(("visibility", repo.key), start).addCallbacks(learned, failed)

    def _shared(self, key: tuple, start) -> Deferred:
        """
        One hub request for identical requests that arrive together: the
        first calls ``start()``, the others wait for its result (each gets
        its own Deferred).  Keys include the identity, so answers are shared
        only between clients the hub would treat alike.
        """
        d = Deferred()
        waiting = self._asking.get(key)
        if waiting is not None:
            waiting.append(d)
            return d
        self._asking[key] = [d]

        def fan_out(result):
            for waiter in self._asking.pop(key, []):
                waiter.callback(result) if not isinstance(result, Failure) else waiter.errback(result)

        maybeDeferred(start).addBoth(fan_out)
        return d

    def _coalesced_head(self, request, repo, rev, path, timeout) -> Deferred:
        ident, auth = self.access.identity(request)
        return self._shared(("head", repo.key, rev, path, ident),
                            lambda: self.head_upstream(repo, rev, path, auth, timeout))

    def _ask_api(self, key, ident, method, url, headers, body, timeout) -> Deferred:
        """The hub's answer to an API call, read whole: a `_HubAnswer`."""
        return self._shared(("api", key, ident, method),
                            lambda: self._ask_api_now(method, url, headers, body, timeout))

    def _ask_api_now(self, method, url, headers, body, timeout) -> Deferred:
        d = self.request_upstream(method, url, headers, data=body, timeout=timeout)

        def read(response):
            return read_body(response, FORWARD_LIMIT, timeout=timeout, clock=self.vault.reactor).addCallback(
                lambda answer: _HubAnswer(
                    response.code, _header(response, "content-type") or "application/json",
                    _header(response, "link"), error_headers(response), answer))

        return d.addCallback(read)

    def resolve_url(self, repo: Repo, rev: str, path: str) -> str:
        return (f"{self.config.base_url}/{repo.url_prefix}{repo.name}/resolve/"
                f"{quote(rev, safe='')}/{quote(path)}")

    def head_upstream(self, repo, rev, path, auth, timeout) -> Deferred:
        url = self.resolve_url(repo, rev, path)
        d = self.request_upstream("HEAD", url, auth, timeout=timeout, same_origin_redirects_only=True)

        def got(response):
            code = response.code
            if code not in (200, 301, 302, 303, 307, 308):
                raise UpstreamStatus(code, url, error_headers(response))
            commit = _header(response, "x-repo-commit")
            if not commit or not COMMIT.match(commit):
                raise UpstreamUnavailable(f"the hub's answer for {repo.name}/{path} has no X-Repo-Commit")
            linked_etag = _header(response, "x-linked-etag")
            linked_size = _header(response, "x-linked-size")
            etag = _header(response, "etag")
            sha256 = _unquote_etag(linked_etag)
            if sha256 is not None and not SHA256.match(sha256):
                sha256 = None
            size = linked_size if linked_size is not None else (
                _header(response, "content-length") if code == 200 else None)
            try:
                size = int(size) if size is not None else None
            except ValueError:
                size = None
            info = {
                "commit": commit,
                "etag": f'"{sha256}"' if sha256 else etag,
                "sha256": sha256,
                "linked_etag": linked_etag,
                "size": size,
                "content_type": (_header(response, "content-type") if code == 200 else None)
                or mimetypes.guess_type(path)[0] or "application/octet-stream",
            }
            if info["etag"] is None:
                raise UpstreamUnavailable(f"the hub's answer for {repo.name}/{path} has no ETag")
            return info

        return d.addCallback(got)

    # -- resolve ------------------------------------------------------------

    @inlineCallbacks
    def resolve(self, request, repo: Repo, rev: str, path: str):
        info, asked = yield self.file_info(request, repo, rev, path)
        if not asked:
            yield self.access.authorize(request, repo, "files", self.resolve_url(repo, info["commit"], path), path)
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
        if request.method == b"HEAD":
            entry = self.store.lookup(key)
            if entry is not None:
                self.log_hit(f"{repo.url_prefix}{repo.name}/resolve/{rev}/{path}")
                set_outcome(request, "hit")
                return (yield serve(request, StoredBody(entry), meta))
            if getattr(request, "_disconnected", False):
                return None
            set_outcome(request, "miss" if asked else "hit")
            set_entity_headers(request, meta)
            if info.get("size") is not None:
                request.setHeader(b"content-length", b"%d" % info["size"])
            request.finish()
            return None
        return (yield self.serve_cached(
            request,
            key,
            self.resolve_url(repo, info["commit"], path),
            headers=self.auth_headers(request),
            expected_size=info.get("size"),
            expected_sha256=info.get("sha256"),
            meta_override=meta,
            label=f"{repo.url_prefix}{repo.name}/resolve/{rev}/{path}",
        ))

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
        repo = Repo(kind, "/".join(_segments(b"/".join(name_raw))))
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
            path = "/".join(_segments(b"/".join(sub[2:]))) if len(sub) > 2 and sub[2:] != [b""] else ""
            return self.api_cached(request, repo, "tree", rev, path)
        if sub == [b"refs"]:
            return self.api_cached(request, repo, "refs", "", "")
        return self.forward_api(request)

    def _api_url(self, repo: Repo, kind: str, rev: str, path: str, query: str) -> str:
        base = f"{self.config.base_url}/api/{repo.kind}/{repo.name}"
        if kind == "info":
            url = base + (f"/revision/{quote(rev, safe='')}" if rev else "")
        elif kind == "tree":
            url = f"{base}/tree/{quote(rev, safe='')}" + (f"/{quote(path, safe='')}" if path else "")
        elif kind == "paths-info":
            url = f"{base}/paths-info/{quote(rev, safe='')}"
        else:
            url = f"{base}/{kind}"
        return url + ("?" + query if query else "")

    def forward_api(self, request):
        """
        Any other API call is relayed with the client's own credentials only:
        the vault's token opens the routes of `api_cached` (what downloads
        need), never account endpoints (whoami-v2, orgs, settings) nor the
        minting of credentials that work without the vault (xet-read-token).
        """
        _check_forwarded_path(request.path[len(self.config.prefix):])
        url = self.config.base_url + request.uri[len(self.config.prefix) - 1:].decode("ascii", "replace")
        return self.forward(
            request, "GET", url, headers=self.access.own_identity(request)[1],
            rewrite=lambda body, response: self._clean_json(body),
            relayed=("content-type", "retry-after", "x-error-code", "x-error-message"),
        )

    def _clean_json(self, body: bytes) -> bytes:
        try:
            document = json.loads(body)
        except ValueError:
            return body
        return json.dumps(strip_xet(document)).encode()

    def _link(self, request, hub_link: str | None) -> dict:
        if not hub_link:
            return {}
        return {"Link": hub_link.replace(self.config.base_url, self.public_base(request))}

    @inlineCallbacks
    def api_cached(self, request, repo: Repo, kind: str, rev: str, path: str, body: bytes | None = None):
        """
        An API call a fresh client makes first (repo info, tree, paths-info,
        refs): asked with the lent identity, kept for offline use when its
        query is one the vault knows (`kept_query`), answered from the cache
        when it is immutable (a commit) or the hub is down.
        """
        query = kept_query(kind, request.uri.partition(b"?")[2], body)
        url = self._api_url(repo, kind, rev, path, request.uri.partition(b"?")[2].decode("ascii", "replace"))
        key = entry = None
        if query is not None:
            digest = hashlib.sha256(b"\0".join([path.encode(), query.encode()])).hexdigest()[:32]
            # "@" for the repo's default revision: quote() never leaves a bare "@", so no branch can be it
            key = f"{self.name}/api/{repo.key}/{kind}/{quote(rev, safe='') or '@'}/{digest}"
            entry = self.store.lookup(key)
        immutable = bool(COMMIT.match(rev))
        check_url = url if body is None else self._api_url(repo, "info", rev, "", "")

        @inlineCallbacks
        def from_cache(why, outcome="hit"):
            if why:
                log.info("Answering {key} from the cache ({why})", why=why, key=key)
                outcome = "stale"
            set_outcome(request, outcome)
            yield self.access.authorize(request, repo, "api", check_url)
            if isinstance(entry, dict):  # a remembered "no such path"
                return self._answer(request, entry["status"], entry["headers"], entry["content_type"],
                                    entry["body"].encode("utf-8", "surrogateescape"))
            meta = dict(entry.meta, headers=self._link(request, entry.meta.get("hub_link")))
            return (yield serve(request, StoredBody(entry), meta))

        if entry is None and key is not None:
            entry = self._api_missing(repo).get(key)
        if entry is not None and immutable:
            self.log_hit(key)
            return (yield from_cache(None))
        if entry is not None and self.health.is_down():
            return (yield from_cache("the hub is down"))
        ident, headers = self.access.identity(request)
        headers = dict(headers)
        if body is not None:
            headers["Content-Type"] = (request.getHeader(b"content-type")
                                       or b"application/x-www-form-urlencoded").decode("latin-1")
        try:
            response = yield self._ask_api(key or url, ident, "POST" if body is not None else "GET", url, headers,
                                           body, self._timeout(entry))
            answer = response.body
        except VaultError as e:
            if not is_offline_error(e):
                raise
            self.health.failed(e, ident)
            if entry is not None:
                return (yield from_cache(e.message))
            raise
        if response.code >= 500 or response.code == 429:
            self.health.failed(UpstreamStatus(response.code, url, response.errors), ident)
        else:
            self.access.note_answer(repo, "api", ident, response.code, response.errors)
        if response.code == 200:
            answer = self._clean_json(answer)
            meta = {"content_type": response.content_type, "hub_link": response.link,
                    "upstream_url": url.split("?")[0]}
            if kind == "info":
                self._learn_commit(repo, rev, answer)
                self.access.note_info(repo, response.code, response.errors, answer)
            kept = self.keep_small(key, answer, meta) if key is not None and worth_keeping(kind, answer) else None
            if kept is None:  # not kept: answer it anyway
                set_outcome(request, "forwarded" if key is None else "miss")
                return self._answer(request, 200, self._link(request, meta["hub_link"]), meta["content_type"],
                                    answer)
            entry = kept
            return (yield from_cache(None, "miss"))
        if (response.code >= 500 or response.code == 429) and entry is not None:
            return (yield from_cache(f"the hub answered {response.code}"))
        if response.code >= 500:
            raise UpstreamStatus(response.code, url, response.errors)
        relayed = {k: v for k, v in response.errors.items()
                   if k in ("retry-after", "x-error-code", "x-error-message", "x-repo-commit")}
        content_type = response.content_type
        if response.code == 404 and relayed.get("x-error-code") == "EntryNotFound" and key is not None:
            # A path that does not exist (transformers probes some): remembered like an answer.
            self._note_api_missing(repo, key, {"status": 404, "headers": relayed, "content_type": content_type,
                                               "body": answer.decode("utf-8", "surrogateescape")})
        return self._answer(request, response.code, relayed, content_type, answer)

    def _api_missing_key(self, repo: Repo) -> str:
        return f"{self.name}/api-missing/{repo.key}"

    def _api_missing(self, repo: Repo) -> dict:
        """API answers "no such path" of one repo: one record, at most `MISSING_LIMIT` of them."""
        found = self._missing.get(("api", repo.key))
        if found is None:
            found = self.load_record(self._api_missing_key(repo))
            found = found if isinstance(found, dict) else {}
            self._missing[("api", repo.key)] = found
        return found

    def _note_api_missing(self, repo: Repo, key: str, answer: dict) -> None:
        answers = self._api_missing(repo)
        answers.pop(key, None)
        answers[key] = answer
        while len(answers) > MISSING_LIMIT:
            answers.pop(next(iter(answers)))
        self.keep_small(self._api_missing_key(repo), json.dumps(answers).encode())

    @staticmethod
    def _answer(request, status: int, headers: dict, content_type: str, body: bytes):
        return send_small(request, content_type, body, status, headers)

    def _learn_commit(self, repo: Repo, rev: str, answer: bytes) -> None:
        try:
            commit = json.loads(answer).get("sha")
        except (ValueError, AttributeError):
            return
        if isinstance(commit, str):
            self.remember_ref(repo, rev or "@", commit)

