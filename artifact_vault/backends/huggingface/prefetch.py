"""
Prefetch: warm a whole Hugging Face snapshot (``POST /_vault/admin/prefetch``).

The vault acts as a client of itself over loopback: the commit of the
revision, the recursive tree at that commit (following ``Link: rel="next"``),
then a GET of every file that matches one of the ``include`` globs (all when
none), at most `PREFETCH_PARALLEL` at a time, bodies counted and dropped.
Going through the vault's own URLs means the files are cached exactly as a
client's download would cache them (same keys, same checks, same sharing).
``X-Hub-Authorization`` on the admin call, if any, is sent as the
Authorization of those requests (the hub token).  The answer comes when every
file is done; a caller that goes away does not stop the prefetch.  The
loopback requests use plain HTTP to the address the admin call came in on.
"""

import fnmatch
import json
import re
from urllib.parse import quote

import treq
from treq.client import HTTPClient
from twisted.internet.defer import DeferredSemaphore, gatherResults, inlineCallbacks
from twisted.web.client import Agent, HTTPConnectionPool

from ...errors import BadRequest, VaultError
from ...logs import VaultLogger

log = VaultLogger()

PREFETCH_PARALLEL = 4
#: seconds to wait for the headers of one loopback answer (a file's body may take as long as it takes)
LOOPBACK_TIMEOUT = 300
REPO_TYPES = {"model": "models", "dataset": "datasets", "space": "spaces"}
COMMIT = re.compile(r"^[0-9a-f]{40}$")
NEXT_LINK = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')


def _parse(body: dict):
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
    return repo, revision, repo_type, include


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

    def __init__(self, backend, request, repo, revision, repo_type, include):
        self.reactor = backend.machinery.reactor
        self.base = _loopback_base(request, backend)
        self.repo, self.revision, self.include = repo, revision, include
        self.kind = REPO_TYPES[repo_type]
        self.headers = {"User-Agent": "artifact-vault-prefetch", "Accept-Encoding": "identity"}
        hub_auth = request.getHeader(b"x-hub-authorization")
        if hub_auth:
            self.headers["Authorization"] = hub_auth.decode("latin-1")
        access_tokens = backend.machinery.config.access_tokens
        if access_tokens:
            self.headers["X-Vault-Token"] = access_tokens[0]
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


def prefetch(backend, request, body: dict):
    """Run one prefetch for the admin endpoint; fires with its result document."""
    job = Prefetch(backend, request, *_parse(body))
    log.info("Prefetching {repo}@{rev} ({kind}) through {base}", repo=job.repo, rev=job.revision,
             kind=job.kind, base=job.base)

    def done(result):
        log.info("Prefetched {repo}@{commit}: {files} files, {bytes} bytes, {failed} failed",
                 repo=job.repo, commit=result["commit"], files=result["files"], bytes=result["bytes"],
                 failed=len(result["failed"]))
        return result

    return job.run().addCallback(done)
