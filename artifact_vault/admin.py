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
    last scan), and with ``peers:`` configured ``cluster``: this vault and
    each peer, as ``/_vault/cluster.json`` has them.
``POST purge`` ``{"backend": NAME, "prefix": P}``
    Removes the matching entries, except those a client of this process is
    reading (listed in ``skipped``).  Entries of a download still in flight
    are not committed yet, so they are not matched: they appear when done.
    Empty folders are left in place (a download may be creating a file in
    one at the same moment).
``POST prefetch`` ``{"backend", ...}``
    Warms the cache as the backend's own prefetch does; a Hugging Face
    backend takes ``repo``, ``revision``, ``repo_type`` and ``include`` (see
    `backends.huggingface.prefetch`).
"""

import itertools
import json

from twisted.internet.task import cooperate
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource

from .errors import BadRequest, NotFound, VaultError
from .logs import VaultLogger
from .cluster import cluster_view
from .site import ErrorPage, VaultPage, check_token, send_json
from .status_page import status
from .store import open_readers

log = VaultLogger()

LIST_LIMIT = 10000
REQUEST_BODY_LIMIT = 64 * 1024


class AdminPages(Resource):
    def __init__(self, machinery):
        super().__init__()
        self.machinery = machinery
        for name, page in ((b"ls", ListPage), (b"stats", StatsPage), (b"purge", PurgePage),
                           (b"prefetch", PrefetchPage)):
            self.putChild(name, page(machinery))

    def getChild(self, name, request):
        try:
            check_token(self.machinery, request)
        except VaultError as e:
            return ErrorPage(e)
        return ErrorPage(NotFound("unknown admin endpoint (ls, stats, purge, prefetch)"))

    def render(self, request):
        return self.getChild(b"", request).render(request)


def admin_pages(machinery) -> Resource:
    return AdminPages(machinery)


class AdminPage(VaultPage):
    """An admin endpoint: the token is checked before anything else."""

    methods = (b"GET",)

    def __init__(self, machinery):
        super().__init__()
        self.machinery = machinery

    def render(self, request):
        try:
            check_token(self.machinery, request)
        except VaultError as e:
            return ErrorPage(e, request.path.decode("ascii", "replace")).render(request)
        return super().render(request)

    # -- helpers for the endpoints -------------------------------------------------------

    def backend_named(self, name) -> object:
        backend = self.machinery.backend(name) if isinstance(name, str) else None
        if backend is None:
            raise NotFound(f"no backend is named {name!r}")
        return backend

    def checked_prefix(self, backend: str, prefix) -> str:
        """`prefix` as a string below the backend's folder, refused if it could leave it."""
        if prefix is None:
            return ""
        if not isinstance(prefix, str):
            raise BadRequest("prefix must be a string")
        prefix = prefix.lstrip("/")
        if any(part in (".", "..") for part in prefix.split("/")) or "\\" in prefix or "\0" in prefix:
            raise BadRequest("prefix must not contain '.' or '..' segments, backslashes or NUL")
        try:
            self.machinery.store.path_for(f"{backend}/{prefix}" if prefix else backend)
        except ValueError:
            raise BadRequest("prefix leaves the cache") from None
        return prefix

    def walk(self, backend=None, prefix="", limit=None, details=False):
        """The store's entries, walked in a thread: fires with (entries, truncated)."""

        def collect():
            found = list(itertools.islice(self.machinery.store.walk(backend, prefix, details),
                                          None if limit is None else limit + 1))
            if limit is not None and len(found) > limit:
                return found[:limit], True
            return found, False

        return deferToThread(collect)


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


def usage_of(entries) -> dict:
    per_backend: dict[str, dict] = {}
    for e in entries:
        u = per_backend.setdefault(e["backend"], {"bytes": 0, "files": 0})
        u["bytes"] += e["size"]
        u["files"] += 1
    return {"bytes": sum(u["bytes"] for u in per_backend.values()),
            "files": sum(u["files"] for u in per_backend.values()),
            "backends": per_backend}


class ListPage(AdminPage):
    def answer(self, request):
        backend = _query(request, "backend") or None
        if backend is not None:
            self.backend_named(backend)
        prefix = self.checked_prefix(backend, _query(request, "prefix")) if backend else ""
        if not backend and _query(request, "prefix"):
            raise BadRequest("a prefix needs a backend")
        d = self.walk(backend, prefix, LIST_LIMIT, details=True)
        return d.addCallback(lambda found: send_json(request, {
            "backend": backend, "prefix": prefix,
            "entries": [{k: v for k, v in e.items() if k != "backend"} for e in found[0]],
            "truncated": found[1]}))


class StatsPage(AdminPage):
    def answer(self, request):
        document = status(self.machinery, names=True)
        cluster = None
        if self.machinery.peers is not None:
            # asked meanwhile the cache is walked; from the numbers of status.json alone, without names
            cluster = cluster_view(self.machinery, status(self.machinery))

        def done(found):
            usage = usage_of(found[0])
            janitor = self.machinery.janitor
            usage["max_bytes"] = janitor.cap if janitor is not None else None
            for b in self.machinery.backends:
                u = usage["backends"].setdefault(b.name, {"bytes": 0, "files": 0})
                u["max_bytes"] = b.config.max_cache_size
            document["usage"] = usage
            if cluster is None:
                return send_json(request, document)
            return cluster.addCallback(lambda view: send_json(request, {**document, "cluster": view}))

        return self.walk().addCallback(done)


class PurgePage(AdminPage):
    methods = (b"POST",)

    def answer(self, request):
        body = _json_body(request)
        backend = body.get("backend")
        if not isinstance(backend, str) or not backend:
            raise BadRequest("purge needs a backend (purging everything at once is not offered)")
        self.backend_named(backend)
        prefix = self.checked_prefix(backend, body.get("prefix"))
        store = self.machinery.store
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
            if self.machinery.janitor is not None and result["removed"]:
                self.machinery.janitor.scan()  # the status page's numbers follow soon
            send_json(request, result)

        return self.walk(backend, prefix).addCallback(remove_all).addCallback(done)


class PrefetchPage(AdminPage):
    methods = (b"POST",)

    def answer(self, request):
        body = _json_body(request)
        backend = self.backend_named(body.get("backend") or "huggingface")
        return backend.prefetch(request, body).addCallback(lambda result: send_json(request, result))
