"""
OCI registries: the read side of the distribution API (``/v2/``), for
Docker Hub and any other registry, as a pull-through cache.

Requests reach a backend through the ``/v2/`` front of `.router` (the
upstream named by ``?ns=``, by a first path segment equal to a backend's
``registry``, or the ``default: true`` backend) or below the backend's own
prefix (``<prefix>v2/<name>/...``).  What each route does:

Manifests by tag
    A tag is a small mutable answer (`freshness.KeptAnswers`): the manifest's
    exact bytes, media type and digest, reused for ``tag_ttl`` seconds, then
    revalidated with a HEAD (Docker Hub counts GETs, not HEADs, against its
    pull limit) and fetched again only when the digest moved.  When
    upstream fails, times out, answers 5xx or 429, the last answer is served
    (and logged).  A client whose Accept header cannot take an index gets
    the index's linux/amd64 manifest, or 404 MANIFEST_UNKNOWN.
Manifests by digest
    Immutable: fetched once, checked against the digest (sha256 of the
    exact bytes), stored with the blobs, served as stored.
Blobs
    Stored once per digest for every registry (``_oci/blobs/...``), fetched
    by one download however many clients and repositories want them,
    streamed while written, verified before they are published; upstream's
    redirects to a CDN are followed by the vault.  Stored bytes (or a
    download in flight) answer a repository only when they came from it or
    its upstream served or confirmed the digest there; a digest a manifest
    of the repository merely lists is confirmed with a HEAD first (`.shown`).
tags/list and referrers
    Relayed and kept like tags (for offline use), ``Link`` rewritten to the
    vault; of a tag list, only the pages a client walks from the first.

Errors are the registry's JSON errors: upstream's own for its 4xx, 429 with
its Retry-After when nothing is kept, 502/504 when it cannot be reached.
Push, delete and catalog calls answer 405.
"""

import hashlib
import re
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from twisted.internet.defer import inlineCallbacks

from ...bounded import LRU
from ...downloads import RemoteDownload
from ...errors import UpstreamStatus, UpstreamUnavailable, VaultError, safe_url
from ...fetch import Discard, read_body
from ...freshness import NOT_MODIFIED, Answer, Coalescer, is_offline_error
from ...logs import VaultLogger
from ...serve import send_small, set_entity_headers
from ..base import Backend
from .auth import RegistryAuth
from .protocol import (API_VERSION, INDEX_TYPES, LISTING_LIMIT, MANIFEST_LIMIT, TAG, UPSTREAM_ACCEPT,
                       RegistryError, accepted_types, artifact_type_filter, check_media_type, error_page,
                       media_type, parse_path, platform_manifest, read_only, references)
from .shown import ShownDigests

log = VaultLogger()

#: the folder (a key prefix that no backend name can take) of the blobs every oci backend shares
BLOBS = "_oci/blobs/sha256"
ERROR_BODY_LIMIT = 64 * 1024
#: continuation pages of tags/list handed out by kept pages (only those are kept: a client cannot make up pages)
PAGES_KEPT = 4096
#: pages of one repository's tag list kept, the first one included (the rest are relayed only)
PAGES_PER_LIST = 64
#: manifests fetched lately, served by digest while their store entry is being written
RECENT_MANIFESTS = 256
RECENT_BODY_LIMIT = 256 * 1024
REDIRECTS = (301, 302, 303, 307, 308)
_QUERY_VALUE = re.compile(r"^[\x21-\x7e]{0,1024}$")


def blob_key(digest: str) -> str:
    hex_digest = digest.split(":", 1)[1]
    return f"{BLOBS}/{hex_digest[:2]}/{hex_digest}"


def scope(name: str) -> str:
    return f"repository:{name}:pull"


class OciBackend(Backend):
    def __init__(self, config, machinery):
        super().__init__(config, machinery)
        options = config.options
        self.registry = options["registry"]
        self.default = bool(options["default"])
        #: Docker Hub: a one-segment name is an official image (alpine is library/alpine)
        self.docker_hub = self.registry == "docker.io"
        self.tag_ttl = float(options["tag_ttl"])
        self.offline_timeout = float(options["offline_timeout"])
        self.auth = RegistryAuth(self)
        self.shown = ShownDigests(self)
        self._asking = Coalescer()
        self._next_pages = LRU(PAGES_KEPT)
        self._recent = LRU(RECENT_MANIFESTS)

    def render(self, request):
        # every method reaches handle(): push and delete get the registry's 405
        return self._dispatch(request)

    # -- routing -------------------------------------------------------------------

    def handle(self, request, subpath: bytes):
        if getattr(request, "oci_base", None) is None:
            # below the backend's own prefix: <prefix>v2/<name>/...
            request.setHeader(*API_VERSION)
            request.error_page = error_page
            if subpath in (b"v2", b"v2/"):
                return base_endpoint(request)
            if not subpath.startswith(b"v2/"):
                raise RegistryError("NAME_UNKNOWN", f"the registry API is below {self.config.prefix}v2/", 404)
            subpath = subpath[3:]
            request.oci_base = f"{self.config.prefix}v2/"
            request.oci_query = ""
        route = parse_path(subpath, self.docker_hub)
        if request.method not in (b"GET", b"HEAD"):
            raise read_only(f"{request.method.decode('ascii', 'replace')[:20]} on {route.kind}")
        if route.kind == "manifests":
            return self.manifest(request, route)
        if route.kind == "blobs":
            return self.blob(request, route)
        if route.kind == "tags":
            return self.tags_list(request, route)
        return self.referrers(request, route)

    def url(self, name: str, *rest: str) -> str:
        return f"{self.config.base_url}/v2/{name}/" + "/".join(rest)

    def _timeout(self, kept) -> float:
        return self.offline_timeout if kept is not None or self.health.is_down() else self.config.timeout

    def _offline(self, error: VaultError) -> None:
        """An upstream failure the vault met on its own behalf: tell the health state."""
        if is_offline_error(error):
            self.health.failed(error, "vault")

    # -- manifests -----------------------------------------------------------------

    def manifest(self, request, route):
        if not route.by_digest:
            # the common case first, without Deferreds: a tag kept and fresh, of a type the client takes
            kept = self.kept.fresh(self.tag_key(route.name, route.reference), self.tag_ttl)
            if kept is not None and kept.status == 200:
                media = kept.headers["content-type"]
                accepted = accepted_types(tuple(request.requestHeaders.getRawHeaders(b"accept", ())))
                if accepted is None or media in accepted:
                    self.log_hit(f"{self.registry}/{route.name}:{route.reference}")
                    request.set_outcome("hit")
                    send_manifest(request, kept.body, media, kept.headers["docker-content-digest"])
                    return None
        return self._manifest(request, route)

    def tag_key(self, name: str, tag: str) -> str:
        return f"{self.name}/r/{name}/_tags/{tag}.tag"

    @inlineCallbacks
    def _manifest(self, request, route):
        name = route.name
        if route.by_digest:
            digest = route.reference
            body, media = yield self.manifest_by_digest(request, name, digest)
        else:
            answer = yield self.tag_answer(request, name, route.reference)
            body, media = answer.body, answer.headers["content-type"]
            digest = answer.headers["docker-content-digest"]
            accepted = accepted_types(tuple(request.requestHeaders.getRawHeaders(b"accept", ())))
            if accepted is not None and media not in accepted:
                if media in INDEX_TYPES:
                    # as distribution does for clients that cannot take an index: its linux/amd64 image
                    chosen = platform_manifest(body, "linux", "amd64")
                    if chosen is None:
                        raise RegistryError("MANIFEST_UNKNOWN", f"{name}:{route.reference} is an index without a "
                                                                "linux/amd64 manifest, and the client does not "
                                                                "accept indexes", 404)
                    digest = chosen[0]
                    body, media = yield self.manifest_by_digest(request, name, digest)
                if media not in accepted:
                    raise RegistryError("MANIFEST_UNKNOWN", f"{name}:{route.reference} is a {media}, which the "
                                                            "client's Accept header does not name", 404)
        send_manifest(request, body, media, digest)

    @inlineCallbacks
    def tag_answer(self, request, name: str, tag: str):
        """The kept answer for a tag (fresh, revalidated, fetched, or stale when upstream fails)."""
        key = self.tag_key(name, tag)
        label = f"{self.registry}/{name}:{tag}"
        answer = yield self.kept.get(key, lambda kept: self.ask_tag(name, tag, kept), ttl=self.tag_ttl,
                                     health=self.health, identity="vault", name=label)
        if answer.status != 200:
            if answer.status == 404 and self.kept.peek(key) is not None:
                self.kept.forget(key)  # upstream says the tag is gone: no stale copy of it later
            raise _answer_error(answer, "MANIFEST_UNKNOWN", f"manifest {label}")
        if answer.source in ("kept", "revalidated"):
            self.log_hit(label)
        request.set_outcome({"kept": "hit", "revalidated": "hit", "stale": "stale"}.get(answer.source, "miss"))
        return answer

    @inlineCallbacks
    def ask_tag(self, name: str, tag: str, kept):
        """Ask upstream about a tag: a HEAD when a digest is kept (NOT_MODIFIED if it did not move), else a GET."""
        url = self.url(name, "manifests", tag)
        timeout = self._timeout(kept)
        if kept is not None:
            response = yield self.auth.request("HEAD", url, scope(name), {"Accept": UPSTREAM_ACCEPT},
                                               timeout=timeout)
            response.deliverBody(Discard())
            if response.code == 200:
                if _header(response, "docker-content-digest") == kept.headers.get("docker-content-digest"):
                    return NOT_MODIFIED
            elif response.code != 405:  # a registry without HEAD gets the GET below
                return Answer(response.code, _relayed(response), b"")
        response, body = yield self.read_whole(url, name, {"Accept": UPSTREAM_ACCEPT}, timeout, MANIFEST_LIMIT)
        if response.code != 200:
            return Answer(response.code, _relayed(response), body)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        declared = _header(response, "docker-content-digest")
        if declared and declared.startswith("sha256:") and declared != digest:
            raise UpstreamUnavailable(f"upstream sent a manifest for {name}:{tag} whose sha256 is {digest}, "
                                      f"not the {declared} it announced")
        media = media_type(_header(response, "content-type"), body)
        self.remember_manifest(name, digest, media, body)
        return Answer(200, {"content-type": media, "docker-content-digest": digest}, body)

    @inlineCallbacks
    def manifest_by_digest(self, request, name: str, digest: str):
        """
        (bytes, media type) of the manifest `digest` of `name`: from the
        cache when `name`'s upstream serves it (it was fetched there, or that
        upstream confirmed it), else from upstream.
        """
        shown = yield self.shown.known(name)
        recent = self._recent.get(digest)
        entry = self.store.lookup(blob_key(digest)) if recent is None else None
        if entry is not None and not entry.meta.get("manifest"):
            entry = None  # stored as a blob (someone asked /blobs/ for it): not known to be a manifest
        if recent is not None or entry is not None:
            source = recent[2] if recent is not None else entry.meta.get("upstream_url")
            if not shown.is_confirmed(digest) and source != safe_url(self.url(name, "manifests", digest)):
                # fetched for another repository (or registry): only if this one's upstream has it too
                yield self.confirm(name, "manifests", digest)
            request.set_outcome("hit")
            if recent is not None:
                return recent[:2]
            if entry.size > MANIFEST_LIMIT:
                raise RegistryError("MANIFEST_UNKNOWN", f"{digest} is not a manifest", 404)
            with open(entry.path, "rb") as f:
                body = f.read()
            self.store.touch(entry)
            self.log_hit(f"{self.registry}/{name}@{digest}")
            return body, entry.meta.get("media_type") or media_type(entry.meta.get("content_type"), body)
        request.set_outcome("miss")
        result = yield self._asking.share(("manifest", name, digest), lambda: self.fetch_manifest(name, digest))
        return result

    @inlineCallbacks
    def fetch_manifest(self, name: str, digest: str):
        url = self.url(name, "manifests", digest)
        log.info("Fetching manifest {registry}/{name}@{digest}", registry=self.registry, name=name, digest=digest)
        try:
            response, body = yield self.read_whole(url, name, {"Accept": UPSTREAM_ACCEPT}, self._timeout(None),
                                                   MANIFEST_LIMIT)
        except VaultError as e:
            self._offline(e)
            raise
        if response.code != 200:
            error = _answer_error(Answer(response.code, _relayed(response), body), "MANIFEST_UNKNOWN",
                                  f"manifest {self.registry}/{name}@{digest}")
            self._offline(UpstreamStatus(response.code, url, error.headers))
            raise error
        got = "sha256:" + hashlib.sha256(body).hexdigest()
        if got != digest:
            raise RegistryError("UNAVAILABLE", f"upstream sent a manifest whose sha256 is {got} for {digest}",
                                502)
        media = media_type(_header(response, "content-type"), body)
        self.remember_manifest(name, digest, media, body)
        return body, media

    def remember_manifest(self, name: str, digest: str, media: str, body: bytes) -> None:
        """
        Keep a manifest that `name`'s upstream served by digest (once for
        every registry), and note what it shows for `name`: the manifest
        itself (confirmed) and what its schema says the repository serves
        (listed).
        """
        source = safe_url(self.url(name, "manifests", digest))
        if len(body) <= RECENT_BODY_LIMIT:
            self._recent[digest] = (body, media, source)
        entry = self.store.lookup(blob_key(digest))
        if entry is None or not entry.meta.get("manifest"):
            self.store.write_later(blob_key(digest), body,
                                   {"content_type": media, "media_type": media, "manifest": True,
                                    "upstream_url": source})
        self.shown.note(name, digest, listed=references(body, media), confirmed={digest: len(body)})

    # -- blobs ---------------------------------------------------------------------------

    @inlineCallbacks
    def blob(self, request, route):
        name, digest = route.name, route.reference
        key = blob_key(digest)
        url = self.url(name, "blobs", digest)
        label = f"{self.registry}/{name}@{digest}"
        shown = yield self.shown.known(name)
        size, confirmed = shown.size(digest), shown.is_confirmed(digest)
        if not confirmed and (digest not in shown or self.held_elsewhere(key, url)):
            # Nothing this repository's upstream served names the digest, or what the vault holds of it
            # came from elsewhere: the upstream must say it has the digest here before any byte is served.
            size = yield self.confirm(name, "blobs", digest)
            confirmed = True
        meta = {"content_type": "application/octet-stream", "etag": f'"{digest}"', "last_modified": None,
                "content_encoding": None, "headers": {"Docker-Content-Digest": digest}}
        entry = self.store.lookup(key)
        if entry is not None:
            return (yield self.serve_hit(request, entry, label, meta))
        if request.method == b"HEAD" and self.downloads.get(key) is None:
            # what upstream said is enough: no download for a HEAD
            if request.disconnected:
                return None
            request.set_outcome("forwarded")
            set_entity_headers(request, meta)
            if size is not None:
                request.setHeader(b"content-length", b"%d" % size)
            request.finish()
            return None
        headers, _ = yield self.auth.authorization(scope(name), self.config.timeout)
        if not confirmed and self.held_elsewhere(key, url):
            yield self.confirm(name, "blobs", digest)  # another repository's download started meanwhile
        spec = self.download_spec(key, url, headers=headers, expected_size=size,
                                  expected_sha256=digest.split(":", 1)[1], label=label)
        try:
            return (yield self.serve_cached(request, spec, meta))
        except UpstreamStatus as e:
            raise _answer_error(Answer(e.code, e.headers, b""), "BLOB_UNKNOWN", f"blob {label}") from None

    def held_elsewhere(self, key: str, url: str) -> bool:
        """
        Whether bytes of `key` that the vault holds, or is fetching, come from
        another upstream URL than `url` (another repository or registry) --
        or from one it cannot tell (another process's download): then they
        answer `url`'s repository only once its upstream confirmed the digest.
        """
        entry = self.store.lookup(key)
        if entry is not None:
            return entry.meta.get("upstream_url") != safe_url(url)
        running = self.downloads.get(key)
        if running is not None:
            return isinstance(running, RemoteDownload) or running.spec.url != url
        return self.store.lock(key).held_elsewhere()

    def confirm(self, name: str, kind: str, digest: str):
        """
        Ask `name`'s upstream (a HEAD) whether it has `digest`: fires with
        its size (None when upstream redirected without saying), or fails
        with the registry's error.  A yes is noted for the repository.
        """
        return self._asking.share(("confirm", name, kind, digest),
                                  lambda: self._confirm(name, kind, digest))

    @inlineCallbacks
    def _confirm(self, name: str, kind: str, digest: str):
        url = self.url(name, kind, digest)
        headers = {"Accept": UPSTREAM_ACCEPT} if kind == "manifests" else {}
        try:
            response = yield self.auth.request("HEAD", url, scope(name), headers, timeout=self.config.timeout,
                                               same_origin_redirects_only=True)
        except VaultError as e:
            self._offline(e)
            raise
        response.deliverBody(Discard())
        code = "BLOB_UNKNOWN" if kind == "blobs" else "MANIFEST_UNKNOWN"
        declared = _header(response, "docker-content-digest")
        if (response.code == 200 or (response.code in REDIRECTS and response.headers.hasHeader(b"location"))) \
                and (not declared or declared == digest):
            size = None
            if response.code == 200:
                length = _header(response, "content-length") or ""
                size = int(length) if length.isdigit() and len(length) < 19 else None
            self.shown.note(name, digest, confirmed={digest: size})
            return size
        if response.code >= 500 or response.code == 429:
            self._offline(UpstreamStatus(response.code, url, _relayed(response)))
        if response.code < 400:
            response_code = 404  # an answer that shows nothing
        else:
            response_code = response.code
        raise _answer_error(Answer(response_code, _relayed(response), b""), code,
                            f"{kind[:-1]} {self.registry}/{name}@{digest}")

    # -- tags/list and referrers -----------------------------------------------------

    @inlineCallbacks
    def tags_list(self, request, route):
        name = route.name
        params = dict(_query(request, ("n", "last")))
        n, last = params.get("n"), params.get("last")
        if n is not None and (not n.isdigit() or len(n) > 6):
            raise RegistryError("PAGINATION_NUMBER_INVALID", "n must be a number of tags", 400)
        if last is not None and not TAG.match(last):
            raise RegistryError("TAG_INVALID", "last must be a tag", 400)
        query = urlencode([(k, v) for k, v in (("n", n), ("last", last)) if v is not None])
        # kept: the first page, and the pages a client reaches from it by following the links the vault
        # handed out for kept pages -- the walk a client makes, upstream's page size, a bounded number of
        # pages.  A page of a size or start a client chose is relayed, and so is every page it links to.
        page = 0 if n is None and last is None else self._next_pages.get((name, n, last))
        keepable = page is not None
        key = f"{self.name}/r/{name}/_tags-list/{hashlib.sha256(query.encode()).hexdigest()[:32]}"
        url = self.url(name, "tags", "list") + (f"?{query}" if query else "")
        answer = yield self.kept_listing(request, key, name, url, keepable, f"{self.registry}/{name} tags")
        link = self._link(request, name, "tags/list", answer.headers.get("link"), ("n", "last"))
        if link is not None and keepable and page + 1 < PAGES_PER_LIST:
            self._next_pages[(name, link[1].get("n"), link[1].get("last"))] = page + 1
        send_small(request, b"application/json", answer.body, 200,
                   {"Link": link[0]} if link is not None else None)

    @inlineCallbacks
    def referrers(self, request, route):
        name, digest = route.name, route.reference
        params = _query(request, None)
        artifact_type = dict(params).get("artifactType")
        if artifact_type is not None:
            check_media_type(artifact_type)
        others = [(k, v) for k, v in params if k != "artifactType"]
        shown = yield self.shown.has(name, digest)
        # kept for the subjects this repository has shown, unfiltered (the vault filters), first page only
        keepable = shown and not others
        query = urlencode(others)
        key = f"{self.name}/r/{name}/_referrers/{digest.split(':', 1)[1]}"
        if not keepable:
            key += "/" + hashlib.sha256(query.encode()).hexdigest()[:32]
        url = self.url(name, "referrers", digest) + (f"?{query}" if query else "")
        answer = yield self.kept_listing(request, key, name, url, keepable, f"{self.registry}/{name} referrers",
                                         code="MANIFEST_UNKNOWN", keep_linked=False)
        body, headers = answer.body, {}
        if artifact_type is not None:
            body = artifact_type_filter(body, artifact_type)
            headers["OCI-Filters-Applied"] = "artifactType"
        link = self._link(request, name, f"referrers/{digest}", answer.headers.get("link"), None)
        if link is not None:
            headers["Link"] = link[0]
        send_small(request, (answer.headers.get("content-type") or "application/vnd.oci.image.index.v1+json")
                   .encode("latin-1"), body, 200, headers)

    @inlineCallbacks
    def kept_listing(self, request, key, name, url, keepable, label, code="NAME_UNKNOWN", keep_linked=True):
        def ask(kept):
            return self._ask_listing(name, url, kept)

        answer = yield self.kept.get(
            key, ask, ttl=self.tag_ttl, health=self.health, identity="vault", name=label,
            keep=lambda a: a.status == 200 and keepable and (keep_linked or not a.headers.get("link")))
        if answer.status != 200:
            raise _answer_error(answer, code, label)
        request.set_outcome({"kept": "hit", "revalidated": "hit", "stale": "stale"}.get(answer.source, "miss"))
        return answer

    @inlineCallbacks
    def _ask_listing(self, name, url, kept):
        timeout = self._timeout(kept)
        headers = dict(kept.validators) if kept is not None else {}
        response, body = yield self.read_whole(url, name, headers, timeout, LISTING_LIMIT)
        if response.code == 304 and kept is not None:
            return NOT_MODIFIED
        headers = _relayed(response, ("content-type", "link", "etag", "last-modified", "retry-after"))
        return Answer(response.code, headers, body)

    def read_whole(self, url: str, name: str, headers: dict, timeout: float, limit: int):
        """
        GET `url` and read its answer whole: fires with (response, body),
        the body of an error answer being whatever of it fits in 64 KiB (b""
        otherwise).  Counts against the backend's answers read whole at once
        (``buffered_slots``): what clients can make the vault hold is bounded.
        """
        reactor = self.machinery.reactor

        def ask():
            def got(response):
                if response.code == 200:
                    return read_body(response, limit, timeout=timeout, clock=reactor).addCallback(
                        lambda body: (response, body))
                return read_body(response, ERROR_BODY_LIMIT, timeout=timeout, clock=reactor).addCallbacks(
                    lambda body: (response, body), lambda failure: (response, b""))

            return self.auth.request("GET", url, scope(name), headers, timeout=timeout).addCallback(got)

        return self.buffered_slots.run(ask)

    def _link(self, request, name: str, what: str, upstream_link: str | None, allowed):
        """
        Upstream's ``Link: <...>; rel="next"`` as the vault's own link (the
        way this client reached the vault), and its parameters; None if there
        is none.  Only the parameters in `allowed` pass (None: any).
        """
        if not upstream_link:
            return None
        m = re.match(r'\s*<([^>]*)>', upstream_link)
        if m is None or 'rel="next"' not in upstream_link.replace("'", '"').replace(" ", ""):
            return None
        params = [(k, v) for k, v in parse_qsl(urlsplit(m.group(1)).query, keep_blank_values=True)
                  if (allowed is None or k in allowed) and _QUERY_VALUE.match(v) and k != "ns"]
        extra = getattr(request, "oci_query", "")
        query = urlencode(params) + (("&" if params else "") + extra if extra else "")
        target = f"{request.oci_base}{quote(name)}/{what}" + (f"?{query}" if query else "")
        return f'<{target}>; rel="next"', dict(params)


def base_endpoint(request):
    """``GET /v2/``: the API version check every client makes first."""
    if request.method not in (b"GET", b"HEAD"):
        raise read_only(request.method.decode("ascii", "replace")[:20] + " /v2/")
    send_small(request, b"application/json", b"{}")


def send_manifest(request, body: bytes, media: str, digest: str) -> None:
    etag = f'"{digest}"'
    headers = {b"Docker-Content-Digest": digest.encode(), b"ETag": etag.encode()}
    if request.disconnected:
        return
    inm = request.getHeader(b"if-none-match")
    if inm is not None and any(t.strip() in (etag.encode(), b"*") for t in inm.split(b",")):
        request.setResponseCode(304)
        for k, v in headers.items():
            request.setHeader(k, v)
        request.finish()
        return
    send_small(request, media.encode("latin-1"), body, 200, headers)


def _header(response, name: str) -> str | None:
    values = response.headers.getRawHeaders(name.encode("ascii"))
    return values[0].decode("latin-1").strip() if values else None


def _relayed(response, names=("content-type", "retry-after")) -> dict:
    out = {}
    for name in names:
        value = _header(response, name)
        if value is not None:
            out[name] = value
    return out


def _answer_error(answer: Answer, code: str, what: str) -> RegistryError:
    """The client's error for an upstream answer other than 200."""
    status = answer.status
    retry = {"Retry-After": answer.headers["retry-after"]} if answer.headers.get("retry-after") else {}
    if status >= 500:
        return RegistryError("UNAVAILABLE", f"{what}: upstream answered {status}", 502, retry)
    if status == 429:
        return RegistryError("TOOMANYREQUESTS", f"{what}: upstream answered 429 (rate limited) and nothing is "
                                                "cached", 429, retry, answer.body or None)
    if status in (401, 403, 404):
        return RegistryError(code if status == 404 else ("UNAUTHORIZED" if status == 401 else "DENIED"),
                             f"{what}: upstream answered {status}", status, {}, answer.body or None)
    if 400 <= status < 500:
        return RegistryError(code, f"{what}: upstream answered {status}", status, {}, answer.body or None)
    return RegistryError("UNAVAILABLE", f"{what}: upstream answered {status}", 502)


def _query(request, allowed) -> list:
    """The query's parameters (only `allowed` names, if given), each a checked ASCII string."""
    out = []
    for raw_key, values in request.args.items():
        try:
            key = raw_key.decode("ascii")
        except UnicodeDecodeError:
            continue
        if key == "ns" or (allowed is not None and key not in allowed):
            continue
        for raw in values[:1]:
            try:
                value = raw.decode("ascii")
            except UnicodeDecodeError:
                raise RegistryError("UNSUPPORTED", f"the query parameter {key} is not ASCII", 400) from None
            if not _QUERY_VALUE.match(value):
                raise RegistryError("UNSUPPORTED", f"invalid query parameter {key}", 400)
            out.append((key, value))
    return out


__all__ = ["BLOBS", "OciBackend", "base_endpoint", "blob_key"]
