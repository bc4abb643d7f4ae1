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
from urllib.parse import quote, unquote_to_bytes

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.failure import Failure

from ..errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
    VaultError,
)
from ..fetch import error_headers, read_body
from ..logs import VaultLogger
from ..serve import StoredBody, send_small, serve, set_entity_headers
from ..store import UnsafePath, safe_segments
from .base import FORWARD_LIMIT, Backend, set_outcome
from .hf_access import AccessPolicy

log = VaultLogger()

COMMIT = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
REPO_TYPES = (b"models", b"datasets", b"spaces")
API_KEYWORDS = {b"revision", b"tree", b"paths-info", b"refs", b"xet-read-token", b"commits", b"treesize",
                b"parquet", b"discussions", b"settings", b"commit", b"preupload", b"lfs-files"}
REQUEST_BODY_LIMIT = 1024 * 1024
#: seconds the hub counts as down after it failed to answer (a 429's Retry-After wins)
HUB_DOWN_PAUSE = 15


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
        return f"{self.kind}/{self.name}"


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
        self._refs: dict[tuple[str, str], tuple[str, float]] = {}
        #: hub requests under way (metadata HEADs, API calls): key -> waiting Deferreds
        self._asking: dict[tuple, list[Deferred]] = {}
        #: until when (monotonic) the hub counts as down: answers that the
        #: cache can give are given at once instead of waiting for it again
        self._hub_down_until = 0.0
        self.access = AccessPolicy(self)

    def evictable(self, key: str) -> bool:
        """Contents and blobs may go; the metadata that offline use needs stays."""
        return key.split("/")[1:2] in (["files"], ["blobs"])

    # -- hub health ------------------------------------------------------------

    def hub_is_down(self) -> bool:
        return time.monotonic() < self._hub_down_until

    def note_hub_down(self, error: VaultError) -> None:
        pause = HUB_DOWN_PAUSE
        retry_after = error.headers.get("retry-after", "")
        if retry_after.isdigit():
            pause = min(max(int(retry_after), 1), 300)
        if not self.hub_is_down():
            log.warn("Hub looks down ({why}); answering from the cache for {pause} s where it can",
                     why=error.message, pause=pause)
        self._hub_down_until = time.monotonic() + pause

    def _timeout(self, fallback) -> float:
        """How long to wait for the hub: short when the cache can answer instead or the hub is down."""
        return self.offline_timeout if fallback is not None or self.hub_is_down() else self.config.timeout

    @staticmethod
    def is_offline_error(error: VaultError) -> bool:
        """The hub cannot answer now (as opposed to: it answered no)."""
        if isinstance(error, (UpstreamUnavailable, UpstreamTimeout)):
            return True
        return isinstance(error, UpstreamStatus) and (error.code >= 500 or error.code == 429)

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
                rev = parse_revision(raw[at + 1])
                path = "/".join(_segments(b"/".join(raw[at + 2:])))
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
        entry = self.store.lookup(self._ref_key(repo, rev))
        if entry is None:
            return None
        try:
            with open(entry.path, "rb") as f:
                commit = json.load(f)["commit"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
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
        entry = self.store.lookup(self._meta_key(repo, commit, path))
        if entry is None:
            return None
        try:
            with open(entry.path, "rb") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

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
        if fallback is not None and self.hub_is_down():
            set_outcome(request, "stale")
            return fallback, False
        ident = self.access.identity(request)[0]
        try:
            info = yield self._coalesced_head(request, repo, commit or rev, path, self._timeout(fallback))
        except VaultError as e:
            if self.is_offline_error(e):
                self.note_hub_down(e)
                if fallback is not None:
                    log.info("Answering {repo}@{rev}/{path} from the cache ({why})",
                             repo=repo.name, rev=rev, path=path, why=e.message)
                    set_outcome(request, "stale")
                    return fallback, False
            if not isinstance(e, UpstreamStatus):
                raise
            self.access.note_answer(repo, "files", ident, e.code, e.headers)
            if e.code == 404 and e.headers.get("x-error-code") == "EntryNotFound" and e.headers.get("x-repo-commit"):
                missing = {
                    "missing": True,
                    "commit": e.headers["x-repo-commit"],
                    "error_code": "EntryNotFound",
                    "error_message": e.headers.get("x-error-message") or f"{path} does not exist",
                }
                if COMMIT.match(missing["commit"]):
                    self.remember_ref(repo, rev, missing["commit"])
                    self.save_info(repo, missing["commit"], path, missing)
            raise
        self.access.note_answer(repo, "files", ident, 200, {})
        self.remember_ref(repo, rev, info["commit"])
        self.save_info(repo, info["commit"], path, info)
        return info, True

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

        start().addBoth(fan_out)
        return d

    def _coalesced_head(self, request, repo, rev, path, timeout) -> Deferred:
        ident, auth = self.access.identity(request)
        return self._shared(("head", repo.key, rev, path, ident),
                            lambda: self.head_upstream(repo, rev, path, auth, timeout))

    def _ask_api(self, key, ident, method, url, headers, body, timeout) -> Deferred:
        """The hub's answer to an API call, read whole: a `_HubAnswer`."""

        def start():
            d = self.request_upstream(method, url, headers, data=body, timeout=timeout)

            def read(response):
                return read_body(response, FORWARD_LIMIT, timeout=timeout, clock=self.vault.reactor).addCallback(
                    lambda answer: _HubAnswer(
                        response.code, _header(response, "content-type") or "application/json",
                        _header(response, "link"), error_headers(response), answer))

            return d.addCallback(read)

        return self._shared(("api", key, ident, method), start)

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
            yield self.access.authorize(request, repo, "files", self.resolve_url(repo, info["commit"], path))
        if info.get("missing"):
            raise VaultError(
                f"{path} does not exist in {repo.name} at {info['commit']}",
                404,
                {"X-Error-Code": info["error_code"], "X-Error-Message": info["error_message"],
                 "X-Repo-Commit": info["commit"]},
            )
        headers = {"X-Repo-Commit": info["commit"]}
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

    def _api_url(self, request, repo: Repo, kind: str, rev: str, path: str) -> str:
        base = f"{self.config.base_url}/api/{repo.kind}/{repo.name}"
        if kind == "info":
            url = base + (f"/revision/{quote(rev, safe='')}" if rev else "")
        elif kind == "tree":
            url = f"{base}/tree/{quote(rev, safe='')}" + (f"/{quote(path, safe='')}" if path else "")
        elif kind == "paths-info":
            url = f"{base}/paths-info/{quote(rev, safe='')}"
        else:
            url = f"{base}/{kind}"
        query = request.uri.partition(b"?")[2]
        return url + ("?" + query.decode("ascii", "replace") if query else "")

    def forward_api(self, request):
        _check_forwarded_path(request.path[len(self.config.prefix):])
        url = self.config.base_url + request.uri[len(self.config.prefix) - 1:].decode("ascii", "replace")
        return self.forward(
            request, "GET", url, headers=self.auth_headers(request),
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
        query = request.uri.partition(b"?")[2]
        digest = hashlib.sha256(b"\0".join([path.encode(), query, body or b""])).hexdigest()[:32]
        key = f"{self.name}/api/{repo.key}/{kind}/{quote(rev, safe='') or '_default'}/{digest}"
        immutable = bool(COMMIT.match(rev))
        entry = self.store.lookup(key)

        url = self._api_url(request, repo, kind, rev, path)

        @inlineCallbacks
        def from_cache(why, outcome="hit"):
            if why:
                log.info("Answering {key} from the cache ({why})", why=why, key=key)
                outcome = "stale"
            set_outcome(request, outcome)
            yield self.access.authorize(request, repo, "api", url if body is None else
                                        self._api_url(request, repo, "info", rev, ""))
            if entry.meta.get("status", 200) != 200:
                with open(entry.path, "rb") as f:
                    return self._answer(request, entry.meta["status"], entry.meta.get("error_headers", {}),
                                        entry.meta["content_type"], f.read())
            meta = dict(entry.meta, headers=self._link(request, entry.meta.get("hub_link")))
            return (yield serve(request, StoredBody(entry), meta))

        if entry is not None and immutable:
            self.log_hit(key)
            return (yield from_cache(None))
        if entry is not None and self.hub_is_down():
            return (yield from_cache("the hub is down"))
        ident, headers = self.access.identity(request)
        headers = dict(headers)
        if body is not None:
            headers["Content-Type"] = (request.getHeader(b"content-type") or b"application/x-www-form-urlencoded").decode("latin-1")
        try:
            response = yield self._ask_api(key, ident, "POST" if body is not None else "GET", url, headers, body,
                                           self._timeout(entry))
            answer = response.body
        except (UpstreamUnavailable, UpstreamTimeout) as e:
            self.note_hub_down(e)
            if entry is not None:
                return (yield from_cache(e.message))
            raise
        if response.code >= 500 or response.code == 429:
            self.note_hub_down(UpstreamStatus(response.code, url, response.errors))
        else:
            self.access.note_answer(repo, "api", ident, response.code, response.errors)
        if response.code == 200:
            answer = self._clean_json(answer)
            meta = {"content_type": response.content_type, "hub_link": response.link,
                    "upstream_url": url.split("?")[0]}
            if kind == "info":
                self._learn_commit(repo, rev, answer)
            kept = self.keep_small(key, answer, meta)
            if kept is None:  # could not keep it: answer it anyway
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
        if response.code == 404 and relayed.get("x-error-code") == "EntryNotFound":
            # A path that does not exist (transformers probes some): remembered like an answer.
            self.keep_small(key, answer, {"content_type": content_type, "status": 404, "error_headers": relayed})
        return self._answer(request, response.code, relayed, content_type, answer)

    @staticmethod
    def _answer(request, status: int, headers: dict, content_type: str, body: bytes):
        return send_small(request, content_type, body, status, headers)

    def _learn_commit(self, repo: Repo, rev: str, answer: bytes) -> None:
        try:
            commit = json.loads(answer).get("sha")
        except (ValueError, AttributeError):
            return
        if isinstance(commit, str):
            self.remember_ref(repo, rev or "_default", commit)

