"""
PyPI backend: a PEP 503/691 simple index (PyPI, a company index, the PyTorch
wheel index) through the vault, so that ``pip install --index-url
http://vault/pypi/simple/`` and ``uv pip install --index-url ...`` work
unchanged, each file is fetched from upstream once, and installs keep
working while upstream is down.

URL layout (below the prefix, ``/pypi/`` by default)
    ``simple/``                                 the project list
    ``simple/<project>/``                       a project page (any spelling of the
                                                name; without the slash: 301)
    ``files/<project>/<id>/<filename>``         a distribution file, as a page named it
    ``files/<project>/<id>/<filename>.metadata`` its PEP 658 metadata companion
    ``<id>`` is the file's sha256 as the index gave it, or ``url-`` and 32 hex
    digits of the sha256 of its upstream URL when the index gave none.  Pages
    link to files by relative URL (``../../files/...``), so the vault may sit
    behind any path.

Cache layout (below ``cache_dir/<name>/``)
    ``simple/<project>``   a project page, kept in its normal form (see `pypi_pages`)
    ``simple/_list``       the project list (no project name can hold a ``_``)
    ``files/<project>/<id>/<filename>[.metadata]``   the files, verified
    ``rendered/<project>/<form>[.gz]``   renderings of a big page (its normal form over
                           `BIG_PAGE`), made once per version, served like files

Files
    A file URL names a file only if the last page kept for its project lists
    that file name with that id: the vault fetches no URL that no upstream
    page named, whatever a client asks.  Files are immutable: a hit is
    served without asking upstream; a miss starts (or joins) the one
    download, checked against the size and sha256 the page gave before it is
    published.  A HEAD of a file not cached is answered from the page when it
    gave the size (uv's first step when it reads a wheel's metadata by
    Range), else relayed.  Files never get a ``Content-Encoding``.

Pages
    Asked of upstream in JSON where it offers it (HTML otherwise), kept with
    its validators in the normal form, reused for ``index_ttl``, then
    revalidated; served stale when upstream fails, answers 5xx or 429, or
    says nothing for ``offline_timeout`` (freshness.KeptAnswers).  A project
    upstream does not know is a 404.  While upstream cannot answer, a page
    advertises a ``.metadata`` companion only for files whose companion is
    in the cache (pip fails hard when an advertised one cannot be fetched).
"""

import gzip
import hashlib
import json
from collections import OrderedDict
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.threads import deferToThread

from ..bounded import LRU
from ..errors import BadRequest, NotFound, UpstreamStatus, UpstreamUnavailable, VaultError
from ..fetch import Discard, error_headers, read_body, within
from ..freshness import NOT_MODIFIED, Answer, Coalescer
from ..logs import VaultLogger
from ..serve import StoredBody, send_small, serve
from ..store import Entry, UnsafePath, safe_segments
from . import pypi_pages as pages
from .base import Backend

log = VaultLogger()

#: bytes of an upstream page read into memory (PyPI's whole project list is ~30 MB)
PAGE_LIMIT = 64 * 1024 * 1024
#: pages and renderings larger than this are parsed, rendered and gzipped in a thread
THREAD_ABOVE = 1024 * 1024
#: bytes of page data a backend holds in memory: kept pages (their normal forms, `KEPT_MEMORY` of
#: them) and parsed pages with their renderings (the rest); the least recently used go first
MEMO_BUDGET = 48 * 1024 * 1024
KEPT_MEMORY = 8 * 1024 * 1024
#: a page whose normal form is larger is big: parsed, it would take more than a quarter of the parsed
#: pages' budget.  Its renderings are kept on disk instead (made once per version and form), and only a
#: compact list of its files is held in memory.
BIG_PAGE = (MEMO_BUDGET - KEPT_MEMORY) // 16
#: big pages parsed or rendered at once per backend (each holds its objects, several times its size)
BIG_AT_ONCE = 1
#: big pages whose current version is remembered (key -> sha256 of its normal form)
BIG_PAGES_KNOWN = 1024
#: a rendering's file name per form (below ``rendered/<project>/``)
RENDERING_NAMES = {pages.TEXT_HTML: "html", pages.HTML_V1: "v1-html", pages.JSON_V1: "v1-json"}
GZIP_ABOVE = 1024
LIST_KEY = "_list"
HEAD_HEADERS = ("content-type", "etag", "last-modified", "accept-ranges")
#: what clients may do with a page: ask again every time (cheap: a 304 for an unchanged ETag)
PAGE_CACHE_CONTROL = "max-age=0, must-revalidate"
VARY = "Accept, Accept-Encoding"


class PyPIBackend(Backend):
    kept_memory_bytes = KEPT_MEMORY

    def __init__(self, config, machinery):
        super().__init__(config, machinery)
        self.index_ttl = float(config.options.get("index_ttl", 600))
        self.offline_timeout = float(config.options.get("offline_timeout", 4))
        self.memo = _Memo(MEMO_BUDGET - KEPT_MEMORY)
        #: big pages parsed or rendered now (the CPU and memory they take, whoever asks)
        self.big_slots = DeferredSemaphore(BIG_AT_ONCE)
        #: page key -> sha256 of the normal form of a big page (its renderings are on disk)
        self._big_pages = LRU(BIG_PAGES_KNOWN)
        self._rendering = Coalescer()

    # -- routing -------------------------------------------------------------------

    def handle(self, request, subpath: bytes):
        self.check_method(request)
        parts = subpath.split(b"/")
        query = request.uri.partition(b"?")[2]
        if parts[0] == b"simple":
            form = self.form_for(request, query)
            if len(parts) == 1:
                raise VaultError("the index is at simple/", 301, {"Location": "simple/"})
            if len(parts) == 2 and parts[1] == b"":
                return self.serve_list(request, form)
            project = self.project_of(parts[1])
            if len(parts) == 2:
                raise VaultError(f"the page of {project} is at {project}/", 301, {"Location": f"{project}/"})
            if len(parts) == 3 and parts[2] == b"":
                return self.serve_project(request, project, form)
        elif parts[0] == b"files" and len(parts) == 4:
            if query:
                raise BadRequest("file URLs take no query")
            project = self.project_of(parts[1])
            if parts[1].decode("ascii", "replace") != project:
                raise NotFound("file URLs name the project by its normalised name")
            ident = parts[2].decode("ascii", "replace")
            if not pages.FILE_ID.match(ident):
                raise BadRequest("a file id is a sha256 (64 hex digits) or url- and 32 hex digits")
            try:
                (filename,) = safe_segments(parts[3])
            except (UnsafePath, ValueError) as e:
                raise BadRequest(f"bad file name: {e}") from None
            return self.serve_file(request, project, ident, filename)
        raise NotFound("not a simple index page or file of this backend (see simple/)")

    @staticmethod
    def project_of(raw: bytes) -> str:
        try:
            (text,) = safe_segments(raw)
        except (UnsafePath, ValueError) as e:
            raise BadRequest(f"bad project name: {e}") from None
        name = pages.project_name(text)
        if name is None:
            raise BadRequest(f"{text[:80]!r} is not a valid project name")
        return name

    @staticmethod
    def form_for(request, query: bytes) -> str:
        """The form to answer in: PEP 691's ``?format=`` if given, else the Accept header's choice."""
        accept = request.getHeader(b"accept")
        if query:
            try:
                params = parse_qsl(query.decode("ascii"), keep_blank_values=True, strict_parsing=True,
                                   max_num_fields=2)
            except (UnicodeDecodeError, ValueError):
                raise BadRequest("bad query string: index pages take only format=<media type>") from None
            if len(params) != 1 or params[0][0] != "format":
                raise BadRequest("index pages take only the query format=<media type>")
            # a "+" left unencoded decodes to a space, which no media type holds
            value = params[0][1].replace(" ", "+")
            if not value.isascii() or not value.isprintable():
                raise BadRequest("format= takes a media type (printable ASCII)")
            accept = value.encode("ascii")
        form = pages.choose_form(accept.decode("latin-1") if accept is not None else None)
        if form is None:
            raise VaultError(f"none of the forms offered is acceptable: {', '.join(pages.FORMS)}", 406,
                             {"Vary": "Accept"})
        return form

    # -- pages -----------------------------------------------------------------------

    def page_key(self, project: str) -> str:
        return f"{self.name}/simple/{project}"

    def page_url(self, project: str | None) -> str:
        return f"{self.config.base_url}/" + (f"{project}/" if project else "")

    def serve_project(self, request, project: str, form: str):
        return self._serve_page(request, self.page_key(project), project, form)

    def serve_list(self, request, form: str):
        return self._serve_page(request, self.page_key(LIST_KEY), None, form)

    def _serve_page(self, request, key: str, project: str | None, form: str):
        big = self._big_pages.get(key)
        if big is not None and not self.health.is_down():
            # a big page: its rendering is on disk, the normal form need not even be read
            stored = self.kept.stored(key)
            if stored is not None and stored.sha256 == big and stored.age(self.kept.clock()) < self.index_ttl:
                entry = self.rendering(project, form, self._gzip(request), big)
                if entry is not None:
                    request.set_outcome("hit")
                    return self._send_rendering(request, entry)
        fresh = self.kept.fresh(key, self.index_ttl)
        if fresh is not None and not self.health.is_down():
            parsed = self.memo.get(key, fresh.body)
            rendered = parsed.rendering(form, self._gzip(request)) if parsed is not None else None
            if rendered is not None:  # the hot path: nothing to parse, render or wait for
                request.set_outcome("hit")
                return self._send_page(request, form, *rendered)
        return self._serve_page_slowly(request, key, project, form, fresh)

    @inlineCallbacks
    def _serve_page_slowly(self, request, key, project, form, fresh):
        answer = fresh or (yield self.kept_page(key, project))
        request.set_outcome({"upstream": "miss", "stale": "stale"}.get(answer.source, "hit"))
        gz = self._gzip(request)
        offline = project is not None and (answer.source == "stale" or self.health.is_down())
        big = len(answer.body) > BIG_PAGE
        if big and not offline:
            made = yield self._big_rendering(key, project, answer.body, form, gz)
            if request.disconnected:
                return None
            if isinstance(made, Entry):
                return (yield self._send_rendering(request, made))
            return self._send_page(request, form, *made)
        if big:  # parsed for this answer only: kept, it would push every other parsed page out
            parsed = yield self.big_slots.run(deferToThread, _Parsed, answer.body)
        else:
            parsed = yield self.memo.parsed(key, answer.body)
        if offline:
            # upstream cannot answer: no .metadata companion that the cache cannot serve
            cached = {f["id"] for f in parsed.document["files"]
                      if f["core-metadata"] and self.store.lookup(self.file_key(project, f, True)) is not None}
            body = yield _maybe_thread(len(answer.body), pages.render_project, parsed.document, form,
                                       lambda f: f["id"] in cached)
            rendered = yield _maybe_thread(len(body), _encoded, body, gz)
        else:
            rendered = yield parsed.render(form, gz, self.memo)
        if request.disconnected:
            return None
        return self._send_page(request, form, *rendered)

    @staticmethod
    def _gzip(request) -> bool:
        header = request.getHeader(b"accept-encoding")
        if not header:
            return False
        for item in header.decode("latin-1").split(","):
            coding, _, params = item.strip().partition(";")
            if coding.strip().lower() in ("gzip", "x-gzip"):
                q = params.strip().lower()
                return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
        return False

    # -- big pages: renderings on disk ----------------------------------------------------

    def rendering_key(self, project: str | None, form: str, gz: bool) -> str:
        # "rendered" is neither "simple" nor "files"; no project name holds a "_"
        return f"{self.name}/rendered/{project or LIST_KEY}/{RENDERING_NAMES[form]}{'.gz' if gz else ''}"

    def rendering(self, project: str | None, form: str, gz: bool, source: str) -> Entry | None:
        """The stored rendering of a big page in `form`, if it was made from the normal form `source` (a sha256)."""
        entry = self.store.lookup(self.rendering_key(project, form, gz))
        return entry if entry is not None and entry.meta.get("source") == source else None

    def _send_rendering(self, request, entry: Entry):
        self.store.touch(entry)
        meta = {"content_type": entry.meta.get("content_type"), "etag": entry.meta.get("etag"),
                "content_encoding": entry.meta.get("content_encoding"),
                "headers": {"Vary": VARY, "Cache-Control": PAGE_CACHE_CONTROL}}
        return serve(request, StoredBody(entry), meta)

    @inlineCallbacks
    def _big_rendering(self, key, project, body: bytes, form: str, gz: bool):
        """
        A big page in `form`: its rendering's entry, made (parsed, rendered and
        gzipped in a thread, one big page at a time) once per version of the
        page and form; (body, ETag, gzipped) when it could not be stored.
        """
        source = yield deferToThread(_sha256, body)
        self._big_pages[key] = source
        entry = self.rendering(project, form, gz, source)
        if entry is not None:
            return entry
        made = yield self._rendering.share((key, source, form),
                                           lambda: self._make_renderings(key, project, body, source, form))
        return made[gz]

    @inlineCallbacks
    def _make_renderings(self, key, project, body: bytes, source: str, form: str):
        identity, gzipped, files = yield self.big_slots.run(deferToThread, _render_big, body, form)
        if files is not None:
            self.memo.keep_big(key, _BigPage(source, files))
        writes = []
        for gz, (rendered, etag, encoded) in ((False, identity), (True, gzipped)):
            meta = {"content_type": pages.CONTENT_TYPES[form], "etag": etag,
                    "content_encoding": "gzip" if encoded else None, "source": source}
            writes.append(self.store.write_later(self.rendering_key(project, form, gz), rendered, meta))
        written = yield DeferredList(writes)
        made = {}
        for gz, rendered, (ok, entry) in zip((False, True), (identity, gzipped), written):
            made[gz] = entry if ok and entry is not None else rendered
        return made

    def _forget_renderings(self, key: str, project: str | None) -> None:
        self._big_pages.pop(key, None)
        for form in pages.FORMS:
            for gz in (False, True):
                self.store.remove(self.rendering_key(project, form, gz))

    @staticmethod
    def _send_page(request, form: str, body: bytes, etag: str, gzipped: bool):
        headers = {"Vary": VARY, "ETag": etag, "Cache-Control": PAGE_CACHE_CONTROL}
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        inm = request.getHeader(b"if-none-match")
        if inm is not None and etag in [t.strip() for t in inm.decode("latin-1").split(",")]:
            for name, value in headers.items():
                request.setHeader(name, value)
            request.setResponseCode(304)
            request.finish()
            return None
        return send_small(request, pages.CONTENT_TYPES[form], body, 200, headers)

    @inlineCallbacks
    def kept_page(self, key: str, project: str | None):
        """
        The page for `key` (its normal form, an `Answer`) as `KeptAnswers`
        gives it: kept and fresh, revalidated, fetched, or stale when
        upstream fails.  A project upstream does not know is a `NotFound`.
        """
        url = self.page_url(project)

        def ask(kept):
            fallback = kept is not None or self.health.is_down()
            timeout = self.offline_timeout if fallback else self.config.timeout
            # read whole and parsed: one of the backend's few answers held in memory at once
            d = self.buffered_slots.run(self._ask_page, url, kept, project, timeout)
            # a silent upstream must not hold back the page we could answer with
            return within(d, timeout, self.machinery.reactor, f"upstream page {url}") if fallback else d

        answer = yield self.kept.get(key, ask, ttl=self.index_ttl, health=self.health, identity="vault",
                                     name=f"{self.name} simple/{project + '/' if project else ''}")
        if answer.status in (404, 410):
            if self.kept.peek(key) is not None:
                log.info("Upstream no longer knows {project}; forgetting its page", project=project)
                self.kept.forget(key)
                self._forget_renderings(key, project)
            raise NotFound(f"upstream has no project {project}" if project else "upstream has no project list")
        if answer.status != 200:
            raise UpstreamStatus(answer.status, url, answer.headers)
        return answer

    @inlineCallbacks
    def _ask_page(self, url: str, kept, project: str | None, timeout: float):
        headers = {"Accept": pages.UPSTREAM_ACCEPT}
        if kept is not None:
            headers.update(kept.validators)
        response = yield self.request_upstream("GET", url, headers, timeout=timeout)
        clock = self.machinery.reactor
        if response.code == 304 and kept is not None:
            response.deliverBody(Discard())
            return NOT_MODIFIED
        if response.code != 200:
            response.deliverBody(Discard())  # read and dropped: the connection goes back to the pool
            return Answer(response.code, error_headers(response), b"")
        body = yield read_body(response, PAGE_LIMIT, timeout=timeout, clock=clock)
        content_type = _header(response, b"content-type")
        final_url = response.request.absoluteURI.decode("ascii", "replace")
        try:
            if project is None:
                normal = yield _maybe_thread(len(body), pages.parse_list, body, content_type)
            else:
                normal = yield _maybe_thread(len(body), pages.parse_project, body, content_type, final_url, project)
        except pages.PageError as e:
            raise UpstreamUnavailable(f"upstream page {url} cannot be read: {e}") from None
        kept_headers = {"content-type": "application/json"}
        for name in ("etag", "last-modified"):
            value = _header(response, name.encode())
            if value:
                kept_headers[name] = value
        return Answer(200, kept_headers, json.dumps(normal, separators=(",", ":")).encode())

    # -- files -----------------------------------------------------------------------

    def file_key(self, project: str, record: dict, metadata: bool = False) -> str:
        suffix = pages.METADATA_SUFFIX if metadata else ""
        return f"{self.name}/files/{project}/{record['id']}/{record['filename']}{suffix}"

    @staticmethod
    def file_meta(ident: str, filename: str) -> dict:
        """What a client is told about a file, whatever upstream said (never a Content-Encoding)."""
        meta = {"content_type": "application/octet-stream", "content_encoding": None}
        if not ident.startswith("url-") and not filename.endswith(pages.METADATA_SUFFIX):
            meta["etag"] = f'"{ident}"'
        return meta

    def serve_file(self, request, project: str, ident: str, filename: str):
        key = f"{self.name}/files/{project}/{ident}/{filename}"
        label = f"{project}/{filename}"
        entry = self.store.lookup(key)
        if entry is not None:
            return self.serve_hit(request, entry, label, self.file_meta(ident, filename))
        return self._serve_file_miss(request, project, ident, filename, key, label)

    @inlineCallbacks
    def _serve_file_miss(self, request, project, ident, filename, key, label):
        wants_metadata = filename.endswith(pages.METADATA_SUFFIX)
        dist = filename[: -len(pages.METADATA_SUFFIX)] if wants_metadata else filename
        record = yield self.file_record(project, ident, dist)
        if record is None:
            raise NotFound(f"{dist} ({ident}) is not on the index page of {project}")
        if wants_metadata:
            offered = record["core-metadata"]
            if not offered:
                raise NotFound(f"upstream offers no metadata file for {dist}")
            url = metadata_url(record["url"])
            sha256 = offered.get("sha256") if isinstance(offered, dict) else None
            size = None
        else:
            url, sha256, size = record["url"], record["hashes"].get("sha256"), record["size"]
        meta = self.file_meta(ident, filename)
        if request.disconnected:
            return None  # the client left while the page was fetched: nothing to answer, nothing to start
        if request.method == b"HEAD" and self.downloads.get(key) is None:
            if size is None:
                return (yield self.relay(request, "HEAD", url, relayed=HEAD_HEADERS))
            # what uv asks before it reads a wheel by Range: answered from the page
            request.set_outcome("hit")
            request.setHeader(b"content-type", meta["content_type"])
            request.setHeader(b"accept-ranges", b"bytes")
            if meta.get("etag"):
                request.setHeader(b"etag", meta["etag"])
            request.setHeader(b"content-length", b"%d" % size)
            request.finish()
            return None
        spec = self.download_spec(key, url, expected_size=size, expected_sha256=sha256, label=label)
        return (yield self.serve_cached(request, spec, meta))

    @inlineCallbacks
    def file_record(self, project: str, ident: str, filename: str):
        """The record of a file on the page kept for `project` (fetched if none is), or None."""
        page_key = self.page_key(project)
        source = self._big_pages.get(page_key)
        big = self.memo.big(page_key, source) if source is not None else None
        if big is not None:
            stored = self.kept.stored(page_key)
            if stored is not None and stored.sha256 == source:
                if (ident, filename) not in big.files:
                    return None  # made up: answered without reading the page
                record = big.records.get((ident, filename))
                if record is not None:
                    return record
        answer = self.kept.peek(page_key) or (yield self.kept_page(page_key, project))
        if len(answer.body) <= BIG_PAGE:
            parsed = yield self.memo.parsed(page_key, answer.body)
            return parsed.file(ident, filename)
        source, files, record = yield self.big_slots.run(deferToThread, _big_page_file, answer.body, ident, filename)
        self._big_pages[page_key] = source
        big = self.memo.big(page_key, source) or self.memo.keep_big(page_key, _BigPage(source, files))
        if record is not None:
            big.records[(ident, filename)] = record
        return record


def metadata_url(url: str) -> str:
    """PEP 658: the companion is at the file's URL with ``.metadata`` appended (to its path)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path + pages.METADATA_SUFFIX))


def _header(response, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


def _maybe_thread(size: int, fn, *args) -> Deferred:
    """``fn(*args)`` in a thread when it works on more than `THREAD_ABOVE` bytes, else now (a Deferred)."""
    if size > THREAD_ABOVE:
        return deferToThread(fn, *args)
    return maybeDeferred(fn, *args)


def _sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _render_big(body: bytes, form: str) -> tuple:
    """(identity, gzip) renderings of a big page in `form` and its `_FileKeys` (None for the list); blocking."""
    parsed = _Parsed(body)
    rendered = (pages.render_list if parsed.is_list else pages.render_project)(parsed.document, form)
    files = None if parsed.is_list else _FileKeys(parsed.document["files"])
    return _encoded(rendered, False), _encoded(rendered, True), files


def _big_page_file(body: bytes, ident: str, filename: str) -> tuple:
    """(sha256, `_FileKeys`, the record of one file or None) of a big project page; blocking."""
    parsed = _Parsed(body)
    return _sha256(body), _FileKeys(parsed.document["files"]), parsed.file(ident, filename)


def _encoded(body: bytes, gz: bool) -> tuple:
    """(body, ETag, gzipped) of a rendering, gzipped when asked and worth it."""
    etag = hashlib.sha256(body).hexdigest()[:32]
    if gz and len(body) >= GZIP_ABOVE:
        return gzip.compress(body, 6, mtime=0), f'"{etag}-gz"', True
    return body, f'"{etag}"', False


class _Parsed:
    """A kept page's normal form, parsed once, with its renderings (per form, identity or gzip)."""

    def __init__(self, body: bytes):
        self.body = body
        self.document = json.loads(body)
        self.is_list = "projects" in self.document
        #: (form, gzip) -> (body, ETag, gzipped)
        self.renderings: dict = {}
        self.cost = 4 * len(body)  # parsed objects weigh more than their text
        #: whether a `_Memo` holds it (and counts what its renderings add)
        self.held = False
        self._files = None

    def file(self, ident: str, filename: str) -> dict | None:
        if self._files is None:
            self._files = {(f["id"], f["filename"]): f for f in self.document.get("files", ())}
        return self._files.get((ident, filename))

    def rendering(self, form: str, gz: bool):
        return self.renderings.get((form, gz))

    def render(self, form: str, gz: bool, memo: "_Memo") -> Deferred:
        """A Deferred (body, ETag, gzipped) for `form`, made once (in a thread when large)."""
        done = self.renderings.get((form, gz))
        if done is not None:
            return succeed(done)
        plain = self.renderings.get((form, False))

        def make():
            if plain is not None:
                return plain, _encoded(plain[0], gz)
            body = (pages.render_list if self.is_list else pages.render_project)(self.document, form)
            return _encoded(body, False), _encoded(body, gz)

        def made(result):
            identity, wanted = result
            for key, value in (((form, False), identity), ((form, gz), wanted)):
                if key not in self.renderings:
                    self.renderings[key] = value
                    self.cost += len(value[0])
                    if self.held:
                        memo.grew(len(value[0]))
            return wanted

        return _maybe_thread(len(self.body), make).addCallback(made)


class _FileKeys:
    """
    Which (id, file name) pairs a big page lists, in 8 bytes per file (a
    hash of each pair, sorted, searched by bisection): enough to answer a
    made-up file URL without reading the page.
    """

    def __init__(self, files):
        keys = sorted({self.key(f["id"], f["filename"]) for f in files})
        self._data = b"".join(keys)
        self._count = len(keys)
        self.cost = len(self._data) + 64

    @staticmethod
    def key(ident: str, filename: str) -> bytes:
        return hashlib.blake2b(f"{ident}/{filename}".encode("utf-8", "surrogatepass"), digest_size=8).digest()

    def __contains__(self, pair) -> bool:
        key = self.key(*pair)
        lo, hi = 0, self._count
        while lo < hi:
            mid = (lo + hi) // 2
            if self._data[mid * 8:mid * 8 + 8] < key:
                lo = mid + 1
            else:
                hi = mid
        return lo < self._count and self._data[lo * 8:lo * 8 + 8] == key


class _BigPage:
    """What memory holds of a big project page: its files' keys, and the records of a few files lately asked for."""

    RECORDS = 16
    #: a record's upper bound in memory (its URL is at most 8000 characters)
    RECORD_COST = 10 * 1024

    def __init__(self, source: str, files: _FileKeys):
        self.source = source
        self.files = files
        self.records = LRU(self.RECORDS)
        self.cost = files.cost + self.RECORDS * self.RECORD_COST


class _Memo:
    """
    key -> `_Parsed`, for the kept body it was parsed from (the same bytes:
    a new answer from upstream is a new body), or `_BigPage` for the
    version of a big page (by its sha256), the least recently used
    forgotten beyond a budget of bytes.  A parsed page that would cost more
    than a quarter of the budget is not kept (it would push out every other).
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.total = 0
        self._entries: OrderedDict = OrderedDict()

    def get(self, key: str, body: bytes) -> _Parsed | None:
        parsed = self._entries.get(key)
        if parsed is not None and not isinstance(parsed, _BigPage) and (parsed.body is body or parsed.body == body):
            self._entries.move_to_end(key)
            return parsed
        return None

    def big(self, key: str, source: str) -> _BigPage | None:
        big = self._entries.get(key)
        if isinstance(big, _BigPage) and big.source == source:
            self._entries.move_to_end(key)
            return big
        return None

    def parsed(self, key: str, body: bytes) -> Deferred:
        """A Deferred `_Parsed` for `body` (parsed now, or in a thread when large)."""
        found = self.get(key, body)
        if found is not None:
            return succeed(found)

        def keep(parsed):
            if parsed.cost <= self.budget // 4:
                self._keep(key, parsed)
            return parsed

        return _maybe_thread(len(body), _Parsed, body).addCallback(keep)

    def keep_big(self, key: str, big: _BigPage) -> _BigPage:
        self._keep(key, big)
        return big

    def _keep(self, key: str, value) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.total -= old.cost
            old.held = False
        self._entries[key] = value
        value.held = True
        self.grew(value.cost)

    def grew(self, size: int) -> None:
        self.total += size
        while self.total > self.budget and self._entries:
            _key, oldest = self._entries.popitem(last=False)
            self.total -= oldest.cost
            oldest.held = False

    def __len__(self):
        return len(self._entries)
