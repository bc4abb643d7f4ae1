"""
The hub's language: repos, revisions, the API's query strings, and `Hub`,
the vault's client of the hub (the metadata HEAD of a file, API calls read
whole).  What the hub answers is described in shared/HF-PROTOCOL.md.
"""

import mimetypes
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote_to_bytes, urlencode

from twisted.internet.defer import Deferred

from ...errors import BadRequest, UpstreamStatus, UpstreamUnavailable
from ...fetch import error_headers, read_body
from ...store import UnsafePath, safe_segments

COMMIT = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
REPO_TYPES = (b"models", b"datasets", b"spaces")
REF_KINDS = (b"pr", b"heads", b"tags", b"convert")


@dataclass(frozen=True)
class HubAnswer:
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


def segments(raw: bytes) -> list[str]:
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


def check_forwarded_path(raw: bytes) -> None:
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


_FLAG = re.compile(r"^(true|false|True|False|1|0)$")
_WORD = re.compile(r"^[A-Za-z][A-Za-z0-9_.]{0,63}$")
_CURSOR = re.compile(r"^[A-Za-z0-9_=+/.:-]{1,512}$")
#: query parameters of the API calls whose answers are kept, per kind, with the values each may take
#: (anything else: relayed, not kept)
KEPT_PARAMETERS = {
    "info": {"blobs": _FLAG, "expand": _WORD, "securityStatus": _FLAG, "files_metadata": _FLAG},
    "tree": {"recursive": _FLAG, "expand": _FLAG, "cursor": _CURSOR},
    "refs": {"include_prs": _FLAG},
    "paths-info": {},
}
PATHS_INFO_FIELDS = {"paths", "expand"}
#: expand= values one kept info answer may name
EXPAND_LIMIT = 16


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
    pairs = sorted(set(pairs))  # a repeated parameter names nothing new
    if any(k not in allowed or not allowed[k].match(v) for k, v in pairs):
        return None
    if sum(1 for k, _ in pairs if k == "expand") > EXPAND_LIMIT or \
            sum(1 for k, _ in pairs if k != "expand") > len({k for k, _ in pairs if k != "expand"}):
        return None  # one value per parameter, expand aside
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


class Hub:
    """The vault's client of the hub: what `backend` sends, through its upstream settings."""

    def __init__(self, backend):
        self.backend = backend
        self.base_url = backend.config.base_url

    def resolve_url(self, repo: Repo, rev: str, path: str) -> str:
        return f"{self.base_url}/{repo.url_prefix}{repo.name}/resolve/{quote(rev, safe='')}/{quote(path)}"

    def api_url(self, repo: Repo, kind: str, rev: str = "", path: str = "", query: str = "") -> str:
        base = f"{self.base_url}/api/{repo.kind}/{repo.name}"
        if kind == "info":
            url = base + (f"/revision/{quote(rev, safe='')}" if rev else "")
        elif kind == "tree":
            url = f"{base}/tree/{quote(rev, safe='')}" + (f"/{quote(path, safe='')}" if path else "")
        elif kind == "paths-info":
            url = f"{base}/paths-info/{quote(rev, safe='')}"
        else:
            url = f"{base}/{kind}"
        return url + ("?" + query if query else "")

    def file_info(self, repo: Repo, rev: str, path: str, auth: dict, timeout: float) -> Deferred:
        """
        HEAD ``resolve/{rev}/{path}`` with `auth`, following the hub's own
        redirects and stopping at the one to the CDN: the file's metadata
        (commit, etag, sha256 of LFS files, size, content type), or an
        `UpstreamStatus` with the hub's error headers.
        """
        url = self.resolve_url(repo, rev, path)
        d = self.backend.request_upstream("HEAD", url, auth, timeout=timeout, same_origin_redirects_only=True)

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
                size = int(size) if size is not None and len(size) < 20 else None
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

    def ask(self, method: str, url: str, headers: dict, body: bytes | None, timeout: float) -> Deferred:
        """One API call, its answer read whole (a bounded number at once): a `HubAnswer`."""
        from ..base import FORWARD_LIMIT

        def read(response):
            return read_body(response, FORWARD_LIMIT, timeout=timeout,
                             clock=self.backend.machinery.reactor).addCallback(
                lambda answer: HubAnswer(
                    response.code, _header(response, "content-type") or "application/json",
                    _header(response, "link"), error_headers(response), answer))

        return self.backend.buffered_slots.run(
            lambda: self.backend.request_upstream(method, url, headers, data=body, timeout=timeout).addCallback(read))
