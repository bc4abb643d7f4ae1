"""
The admin endpoints under ``/_vault/admin/``: what the ``artifact-vault``
command talks to.

Every call needs the ``admin_token`` of the config, as ``Authorization:
Bearer T`` or ``X-Admin-Token: T``; without one configured the endpoints are
off (403).  When the vault also has ``access_tokens``, a caller passes the
access token as ``X-Vault-Token`` and the admin token as ``X-Admin-Token``
(the Authorization header is then the access check's).

``GET ls?backend=NAME&prefix=P``
    Cache entries (committed files with their sidecar), sorted by key, at most
    `LIST_LIMIT` with a ``truncated`` flag.  A prefix is matched as a string
    against the key below the backend's name (``ls?backend=files&prefix=a/``
    lists ``files/a/...``).
``GET stats``
    ``/_vault/status.json`` plus ``usage``: bytes and files per backend,
    measured now by walking the cache (the status page shows the janitor's
    last scan).
``POST purge`` ``{"backend": NAME, "prefix": P}``
    Removes the matching entries, except those a client of this process is
    reading (listed in ``skipped``).  Entries of a download still in flight
    are not committed yet, so they are not matched: they appear when done.
    Empty folders are left in place (a download may be creating a file in
    one at the same moment).
``POST prefetch`` ``{"backend", "repo", "revision", "repo_type", "include"}``
    Warms a whole Hugging Face snapshot by acting as a client of the vault
    itself over loopback: the commit of the revision, the recursive tree at
    that commit (following ``Link: rel="next"``), then a GET of every file
    that matches one of the ``include`` globs (all when none), at most
    `PREFETCH_PARALLEL` at a time, bodies counted and dropped.  Going through
    the vault's own URLs means the files are cached exactly as a client's
    download would cache them (same keys, same checks, same coalescing).
    ``X-Hub-Authorization`` on the admin call, if any, is sent as the
    Authorization of those requests (the hub token).  The answer comes when
    every file is done; a caller that goes away does not stop the prefetch.
    The loopback requests use plain HTTP to the address the admin call came
    in on.
"""

import fnmatch
import hmac
import json
import os
import re
from urllib.parse import quote

import treq
from treq.client import HTTPClient
from twisted.internet.defer import DeferredSemaphore, gatherResults, inlineCallbacks
from twisted.internet.task import cooperate
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, HTTPConnectionPool

from .errors import BadRequest, MethodNotAllowed, NotFound, VaultError
from .logs import VaultLogger
from .store import META_SUFFIX, RESERVED_SUFFIXES, open_readers

log = VaultLogger()

LIST_LIMIT = 10000
PREFETCH_PARALLEL = 4
REQUEST_BODY_LIMIT = 64 * 1024
#: seconds to wait for the headers of one loopback answer (a file's body may take as long as it takes)
LOOPBACK_TIMEOUT = 300
REPO_TYPES = {"model": "models", "dataset": "datasets", "space": "spaces"}
COMMIT = re.compile(r"^[0-9a-f]{40}$")
NEXT_LINK = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')


def handle(root, request, what: bytes):
    """Check the admin token, then route `what` (the path below ``/_vault/admin/``)."""
    check_token(root, request)
    routes = {
        b"ls": (b"GET", list_cache),
        b"stats": (b"GET", stats),
        b"purge": (b"POST", purge),
        b"prefetch": (b"POST", prefetch),
    }
    if what not in routes:
        raise NotFound("unknown admin endpoint (ls, stats, purge, prefetch)")
    method, endpoint = routes[what]
    if request.method != method:
        raise MethodNotAllowed(f"{what.decode()} takes {method.decode()}", (method.decode(),))
    return endpoint(root, request)


def check_token(root, request) -> None:
    if not root.admin_token:
        raise VaultError("admin endpoints are off: set admin_token", 403)
    expected = root.admin_token.encode()
    presented = request.getHeader(b"x-admin-token")
    if presented is None:
        scheme, _, token = (request.getHeader(b"authorization") or b"").partition(b" ")
        presented = token.strip() if scheme.lower() == b"bearer" else b""
    if not hmac.compare_digest(presented, expected):
        raise VaultError("admin token missing or wrong (Authorization: Bearer, or X-Admin-Token)", 401,
                         {"WWW-Authenticate": 'Bearer realm="artifact-vault admin"'})


# -- answers ---------------------------------------------------------------------


def answer_json(request, document, status=200) -> None:
    if getattr(request, "_disconnected", False) or request.finished:
        return
    body = json.dumps(document, indent=1).encode() + b"\n"
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    request.setHeader(b"cache-control", b"no-store")
    request.write(body)
    request.finish()


def _query(request, name: str) -> str:
    values = request.args.get(name.encode(), [b""])
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{name} is not UTF-8") from None


def _json_body(request) -> dict:
    raw = request.content.read(REQUEST_BODY_LIMIT + 1) if request.content is not None else b""
    if len(raw) > REQUEST_BODY_LIMIT:
        raise VaultError("request body too large", 413)
    try:
        document = json.loads(raw or b"{}")
    except ValueError:
        raise BadRequest("the body must be a JSON object") from None
    if not isinstance(document, dict):
        raise BadRequest("the body must be a JSON object")
    return document


def _backend_names(root) -> set:
    return {b.name for b in root.backends}


def _checked_prefix(root, backend: str, prefix) -> str:
    """`prefix` as a string below the backend's folder, refused if it could leave it."""
    if prefix is None:
        return ""
    if not isinstance(prefix, str):
        raise BadRequest("prefix must be a string")
    prefix = prefix.lstrip("/")
    if any(part in (".", "..") for part in prefix.split("/")) or "\\" in prefix or "\0" in prefix:
        raise BadRequest("prefix must not contain '.' or '..' segments, backslashes or NUL")
    try:
        root.vault.store.path_for(f"{backend}/{prefix}" if prefix else backend)
    except ValueError:
        raise BadRequest("prefix leaves the cache") from None
    return prefix


# -- listing the cache ---------------------------------------------------------------


def collect_entries(cache_root: str, backend: str | None = None, prefix: str = "",
                    limit: int | None = None, details: bool = False):
    """
    Committed entries below `backend` (all backends when None) whose key
    below the backend starts with `prefix`, in key order: (entries, truncated).
    Runs in a thread: it walks the disk.  An entry is a file with its sidecar,
    as the janitor counts them.
    """
    wanted = f"{backend}/{prefix}" if backend else ""
    start = os.path.join(cache_root, os.path.dirname(wanted)) if wanted else cache_root
    entries = []
    for folder, dirs, files in os.walk(start):
        if folder == cache_root and ".locks" in dirs:
            dirs.remove(".locks")
        dirs.sort()
        names = set(files)
        for name in sorted(files):
            if name.endswith(RESERVED_SUFFIXES) or name + META_SUFFIX not in names:
                continue
            path = os.path.join(folder, name)
            key = os.path.relpath(path, cache_root).replace(os.sep, "/")
            if not key.startswith(wanted):
                continue
            try:
                size = os.stat(path).st_size
                used = os.stat(path + META_SUFFIX).st_mtime
            except OSError:
                continue  # removed meanwhile
            entry = {"key": key, "size": size, "last_used": used}
            if details:
                try:
                    with open(path + META_SUFFIX, "rb") as f:
                        meta = json.load(f)
                except (OSError, ValueError):
                    meta = {}
                meta = meta if isinstance(meta, dict) else {}
                entry["fetched_at"] = meta.get("fetched_at")
                entry["upstream_url"] = meta.get("upstream_url")
            entries.append(entry)
            if limit is not None and len(entries) > limit:
                return entries[:limit], True
    return entries, False


def usage_of(entries) -> dict:
    per_backend: dict[str, dict] = {}
    for e in entries:
        u = per_backend.setdefault(e["key"].split("/", 1)[0], {"bytes": 0, "files": 0})
        u["bytes"] += e["size"]
        u["files"] += 1
    return {"bytes": sum(u["bytes"] for u in per_backend.values()),
            "files": sum(u["files"] for u in per_backend.values()),
            "backends": per_backend}


def list_cache(root, request):
    backend = _query(request, "backend") or None
    if backend is not None and backend not in _backend_names(root):
        raise NotFound(f"no backend is named {backend!r}")
    prefix = _checked_prefix(root, backend, _query(request, "prefix")) if backend else ""
    if not backend and _query(request, "prefix"):
        raise BadRequest("a prefix needs a backend")
    d = deferToThread(collect_entries, root.vault.store.root, backend, prefix, LIST_LIMIT, True)
    return d.addCallback(lambda found: answer_json(request, {
        "backend": backend, "prefix": prefix, "entries": found[0], "truncated": found[1]}))


def stats(root, request):
    d = deferToThread(collect_entries, root.vault.store.root)

    def done(found):
        document = root.status(names=True)
        usage = usage_of(found[0])
        usage["max_bytes"] = root.vault.janitor.cap if root.vault.janitor is not None else None
        for b in root.backends:
            u = usage["backends"].setdefault(b.name, {"bytes": 0, "files": 0})
            u["max_bytes"] = b.config.max_cache_size
        document["usage"] = usage
        answer_json(request, document)

    return d.addCallback(done)


# -- purge ---------------------------------------------------------------------------


def purge(root, request):
    body = _json_body(request)
    backend = body.get("backend")
    if not isinstance(backend, str) or not backend:
        raise BadRequest("purge needs a backend (purging everything at once is not offered)")
    if backend not in _backend_names(root):
        raise NotFound(f"no backend is named {backend!r}")
    prefix = _checked_prefix(root, backend, body.get("prefix"))
    store = root.vault.store
    result = {"backend": backend, "prefix": prefix, "removed": 0, "bytes": 0, "skipped": []}

    def remove_all(found):
        entries, _ = found

        def steps():
            # Removal happens in the reactor thread, where open_readers() is
            # kept, in small batches so that other requests go on meanwhile.
            reading = open_readers()
            for n, e in enumerate(entries):
                path = store.path_for(e["key"])
                if reading.get(path):
                    result["skipped"].append({"key": e["key"], "reason": "a client is reading it"})
                else:
                    store.remove(e["key"])
                    result["removed"] += 1
                    result["bytes"] += e["size"]
                if n % 200 == 199:
                    yield None

        return cooperate(steps()).whenDone()

    def done(_):
        log.info("Purged {removed} entries ({bytes} bytes) of {backend}/{prefix}, skipped {skipped} being read",
                 removed=result["removed"], bytes=result["bytes"], backend=backend, prefix=prefix,
                 skipped=len(result["skipped"]))
        if root.vault.janitor is not None and result["removed"]:
            root.vault.janitor.scan()  # the status page's numbers follow soon
        answer_json(request, result)

    d = deferToThread(collect_entries, store.root, backend, prefix)
    return d.addCallback(remove_all).addCallback(done)


# -- prefetch --------------------------------------------------------------------------


def _parse_prefetch(root, body: dict):
    name = body.get("backend") or "huggingface"
    backend = next((b for b in root.backends if b.name == name), None)
    if backend is None:
        raise NotFound(f"no backend is named {name!r}")
    if backend.config.type != "huggingface":
        raise BadRequest(f"prefetch works with huggingface backends; {name!r} is {backend.config.type!r}")
    repo = body.get("repo")
    parts = repo.split("/") if isinstance(repo, str) else []
    if not 1 <= len(parts) <= 2 or any(p in ("", ".", "..") or not p.isprintable() or "\\" in p for p in parts):
        raise BadRequest("repo must be 'org/name' (or a legacy 'name')")
    revision = body.get("revision") or "main"
    if not isinstance(revision, str) or not revision.isprintable() or len(revision) > 255:
        raise BadRequest("revision must be a branch, tag or commit")
    repo_type = body.get("repo_type") or "model"
    if repo_type not in REPO_TYPES:
        raise BadRequest("repo_type must be model, dataset or space")
    include = body.get("include") or []
    if isinstance(include, str):
        include = [include]
    if not isinstance(include, list) or not all(isinstance(g, str) and g for g in include):
        raise BadRequest("include must be a list of glob patterns")
    return backend, repo, revision, repo_type, include


def _loopback_base(request, backend) -> str:
    host = request.getHost()
    address = f"[{host.host}]" if ":" in host.host else host.host
    return f"http://{address}:{host.port}{backend.config.prefix}"


class _Counter:
    """Counts the bytes of a body that nobody keeps."""

    def __init__(self, keep: int = 0):
        self.count = 0
        self.keep = keep
        self.head = b""

    def __call__(self, data: bytes) -> None:
        self.count += len(data)
        if len(self.head) < self.keep:
            self.head += data[: self.keep - len(self.head)]


class Prefetch:
    """One snapshot being warmed through the vault's own Hugging Face URLs."""

    def __init__(self, root, request, backend, repo, revision, repo_type, include):
        self.reactor = root.reactor
        self.base = _loopback_base(request, backend)
        self.repo, self.revision, self.include = repo, revision, include
        self.kind = REPO_TYPES[repo_type]
        self.headers = {"User-Agent": "artifact-vault-prefetch", "Accept-Encoding": "identity"}
        hub_auth = request.getHeader(b"x-hub-authorization")
        if hub_auth:
            self.headers["Authorization"] = hub_auth.decode("latin-1")
        if root.access_tokens:
            self.headers["X-Vault-Token"] = root.access_tokens[0].decode()
        self.pool = HTTPConnectionPool(self.reactor, persistent=True)
        self.pool.maxPersistentPerHost = PREFETCH_PARALLEL
        self.client = HTTPClient(Agent(self.reactor, pool=self.pool))

    def get(self, url: str):
        return self.client.get(url, headers=self.headers, unbuffered=True, allow_redirects=False,
                               timeout=LOOPBACK_TIMEOUT, reactor=self.reactor)

    @inlineCallbacks
    def api_json(self, url: str, what: str):
        response = yield self.get(url)
        body = yield treq.content(response)
        if response.code != 200:
            message = body.decode("utf-8", "replace").strip().splitlines()[0:1]
            hint = ": no such repo, or it needs a hub token" if response.code in (401, 403) else ""
            # A 401 of the admin call itself would say "your admin token is wrong": the hub's is a 403 here.
            status = 403 if response.code == 401 else response.code if 400 <= response.code < 500 else 502
            raise VaultError(f"{what} failed: the vault answered {response.code}{hint}"
                             + (f" ({message[0][:200]})" if message else ""), status)
        try:
            return json.loads(body), response
        except ValueError:
            raise VaultError(f"{what} failed: the answer is not JSON", 502) from None

    @inlineCallbacks
    def run(self):
        try:
            return (yield self._run())
        finally:
            yield self.pool.closeCachedConnections()

    @inlineCallbacks
    def _run(self):
        repo_path = "/".join(quote(p, safe="") for p in self.repo.split("/"))
        api = f"{self.base}api/{self.kind}/{repo_path}"
        info, _ = yield self.api_json(f"{api}/revision/{quote(self.revision, safe='')}",
                                      f"resolving {self.repo}@{self.revision}")
        commit = info.get("sha") if isinstance(info, dict) else None
        if not isinstance(commit, str) or not COMMIT.match(commit):
            raise VaultError(f"the hub named no commit for {self.repo}@{self.revision}", 502)
        paths = yield self.list_files(f"{api}/tree/{commit}?recursive=true")
        if self.include:
            paths = [p for p in paths if any(fnmatch.fnmatchcase(p, g) for g in self.include)]
        result = {"repo": self.repo, "revision": self.revision, "commit": commit,
                  "files": 0, "bytes": 0, "failed": []}
        kind_prefix = "" if self.kind == "models" else f"{self.kind}/"
        resolve = f"{self.base}{kind_prefix}{repo_path}/resolve/{commit}/"
        gate = DeferredSemaphore(PREFETCH_PARALLEL)
        yield gatherResults([gate.run(self.fetch, resolve + quote(p), p, result) for p in paths],
                            consumeErrors=True)
        return result

    @inlineCallbacks
    def list_files(self, url: str):
        paths = []
        origin = self.base.split("/", 3)[:3]
        while url:
            listing, response = yield self.api_json(url, f"listing {self.repo}")
            if not isinstance(listing, list):
                raise VaultError(f"listing {self.repo} failed: the answer is not a list", 502)
            paths += [e["path"] for e in listing
                      if isinstance(e, dict) and e.get("type") == "file" and isinstance(e.get("path"), str)]
            url = None
            for link in response.headers.getRawHeaders(b"link", []):
                found = NEXT_LINK.search(link.decode("latin-1"))
                if found:
                    url = found.group(1)
            if url is not None and url.split("/", 3)[:3] != origin:
                # The vault rewrites the hub's links to itself; anything else would get our headers.
                raise VaultError(f"listing {self.repo} failed: the next page is elsewhere", 502)
        return paths

    @inlineCallbacks
    def fetch(self, url: str, path: str, result: dict):
        try:
            response = yield self.get(url)
            counter = _Counter(keep=0 if response.code == 200 else 300)
            yield treq.collect(response, counter)
        except Exception as e:  # noqa: BLE001 - every failure of one file is reported, not raised
            result["failed"].append({"path": path, "error": f"{type(e).__name__}: {e}"[:300]})
            return
        if response.code != 200:
            message = counter.head.decode("utf-8", "replace").strip()
            result["failed"].append({"path": path, "status": response.code, "error": message[:300]})
            return
        result["files"] += 1
        result["bytes"] += counter.count


def prefetch(root, request):
    job = Prefetch(root, request, *_parse_prefetch(root, _json_body(request)))
    log.info("Prefetching {repo}@{rev} ({kind}) through {base}", repo=job.repo, rev=job.revision,
             kind=job.kind, base=job.base)

    def done(result):
        log.info("Prefetched {repo}@{commit}: {files} files, {bytes} bytes, {failed} failed",
                 repo=job.repo, commit=result["commit"], files=result["files"], bytes=result["bytes"],
                 failed=len(result["failed"]))
        answer_json(request, result)

    return job.run().addCallback(done)
