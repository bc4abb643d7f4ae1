"""
APT backend: any Debian or Ubuntu repository, for an unchanged apt-get.

Clients
    Mirror rewriting (``deb http://vault:8080/debian bookworm main``: paths
    below the prefix), or the vault as apt's HTTP proxy
    (``Acquire::http::Proxy``: absolute-form requests below ``base_url``,
    handed over by `site.ProxyRouter` through `proxy_bases`).  Both read
    and fill one cache.

Immutable files (``archive.IMMUTABLE``, ``archive.BY_HASH``)
    One download each, streamed while written, kept.  A by-hash name is
    checked against its content; a pool file against the size and sha256
    that the ``Packages``/``Sources`` indexes in the cache give for it
    (`packages`), when the vault has served the Release that lists them.

Release files (``InRelease``, ``Release``, ``Release.gpg``)
    Kept answers (`freshness.KeptAnswers`): reused for ``index_ttl``
    whatever the client's ``Cache-Control``, then revalidated with
    If-None-Match/If-Modified-Since, served stale when the mirror fails.
    ``Release.gpg`` is fetched with the ``Release`` it signs and served only
    beside it.

Indexes named in a Release (``Packages.xz``, ``Translation-en``, ``Contents-*``...)
    Not revalidated on their own: the Release a client was given says which
    content each name has (size, sha256), so the vault serves that content,
    kept as the local ``by-hash/SHA256/<hex>`` entry it shares with by-hash
    requests, downloaded and checked against the Release when missing.
    "The Release a client was given" is the one last served on the same
    connection (apt fetches a suite's InRelease and then its indexes over one
    connection), else the current one.  When the mirror publishes a new
    Release, the vault first brings every index it holds for the old one up
    to the new one, checked; if the mirror does not serve matching indexes
    yet (a sync in progress: InRelease written before the Packages it names),
    the new Release is not served, the old set stays, and the vault tries
    again after ``index_ttl``.  So a client never meets an InRelease newer
    than the Packages beside it: no "Hash Sum mismatch".

Other mutable files (not listed in a known Release, or under no known Release)
    Kept files (`freshness.KeptFiles`): the same TTL and revalidation as the
    Release files, on disk, at any size.
"""

import hashlib
from dataclasses import replace
from urllib.parse import quote
from weakref import WeakKeyDictionary

from twisted.internet.defer import DeferredList, inlineCallbacks

from ...bounded import LRU
from ...errors import BadRequest, IntegrityError, UpstreamStatus, VaultError
from ...fetch import Discard, read_body
from ...freshness import NOT_MODIFIED, Answer
from ...logs import VaultLogger
from ...serve import BytesBody, serve
from ..base import Backend, relay_headers
from . import archive
from .packages import READABLE, PoolFiles

log = VaultLogger()

#: bytes of a Release file we read (Debian's InRelease is ~150 KB, Ubuntu's ~250 KB)
RELEASE_LIMIT = 16 * 1024 * 1024
#: suites whose Release the vault remembers having served (what pool files are checked against)
RELEASES = 64
#: a Release body up to this size is remembered with its parsed listing (larger ones by their sha256)
MEMO_BODY = 256 * 1024
#: per client connection: the suites whose Release it was given
GIVEN_PER_CONNECTION = 32
#: seconds after which the indexes a pool file is checked against are looked for again in the cache, when
#: some that a served Release lists were not there (fetched since, or by another process)
INDEXES_RECHECK = 5.0
#: headers of a Release answer kept with it and relayed
KEPT_HEADERS = ("content-type", "etag", "last-modified")
#: the kept Release.gpg names the sha256 of the Release it was fetched with
SIGNS = "x-vault-signs"
HEAD_HEADERS = ("content-type", "etag", "last-modified", "accept-ranges")
OUTCOMES = {"upstream": "miss", "revalidated": "hit", "kept": "hit", "stale": "stale"}


class AptBackend(Backend):
    def __init__(self, config, machinery):
        super().__init__(config, machinery)
        self.index_ttl = float(config.options.get("index_ttl", 60))
        self.offline_timeout = float(config.options.get("offline_timeout", 4))
        #: suite folder -> the Release last served for it
        self._served = LRU(RELEASES)
        #: key of a kept Release file -> (its body or None when large, its parsed listing)
        self._parsed = LRU(RELEASES * 2)
        #: client connection -> LRU(folder -> the Release that connection was given)
        self._given = WeakKeyDictionary()
        #: what pool files must be, as the Packages/Sources indexes of the served Releases say
        self.pool_files = PoolFiles()
        #: (signature of the served Releases, when computed, whether some index was missing, the indexes)
        self._pool_indexes = None

    def proxy_bases(self) -> tuple:
        return (self.config.base_url,)

    # -- names ------------------------------------------------------------------

    def key(self, names) -> str:
        return f"{self.name}/" + "/".join(names)

    def url(self, names) -> str:
        return self.config.base_url + "/" + "/".join(quote(n, safe="~") for n in names)

    def index_key(self, folder: tuple, name: str, sha256: str) -> str:
        """The entry of an index's content: its local by-hash name, shared with by-hash requests."""
        return self.key(list(folder) + name.split("/")[:-1] + ["by-hash", "SHA256", sha256])

    # -- routing -----------------------------------------------------------------

    def handle(self, request, subpath: bytes):
        self.check_method(request)
        if b"?" in request.uri:
            raise BadRequest("files of an APT repository have no query")
        names = archive.segments(subpath)
        for inner in names[:-1]:
            if inner in archive.RELEASE_FILES:
                raise BadRequest(f"{inner} is a file, not a folder")
        if "by-hash" in names[:-3] or "by-hash" in names[-2:]:
            raise BadRequest("by-hash names are .../by-hash/ALGORITHM/HEX")
        kind = archive.classify(names)
        if kind == archive.RELEASE:
            return self.serve_release(request, names)
        if kind == archive.BY_HASH:
            return self.serve_by_hash(request, names)
        if kind == archive.IMMUTABLE:
            return self.serve_pool_file(request, names)
        return self.serve_index(request, names)

    # -- Release files ------------------------------------------------------------

    @inlineCallbacks
    def serve_release(self, request, names):
        folder, file_name = tuple(names[:-1]), names[-1]
        if file_name == "Release.gpg":
            answer = yield self.signature(folder)
        else:
            answer = yield self.release_answer(folder, file_name)
        if request.disconnected:
            return None
        request.set_outcome(OUTCOMES.get(answer.source, "miss"))
        if answer.status != 200:
            raise UpstreamStatus(answer.status, self.url(names),
                                 {k: v for k, v in answer.headers.items() if k == "retry-after"})
        if answer.source in ("kept", "revalidated"):
            self.log_hit("/".join(names))
        if file_name in archive.ANCHORS:
            self.remember_given(request, folder, self.parsed(self.key(names), answer.body))
        meta = {"content_type": answer.headers.get("content-type") or "text/plain",
                "etag": answer.headers.get("etag"), "last_modified": answer.headers.get("last-modified")}
        return (yield serve(request, BytesBody(answer.body), meta))

    def release_answer(self, folder: tuple, file_name: str):
        names = list(folder) + [file_name]
        return self.kept.get(self.key(names), lambda kept: self.ask_release(folder, file_name, kept),
                             ttl=self.index_ttl, health=self.health, identity="vault", name="/".join(names))

    @inlineCallbacks
    def ask_release(self, folder: tuple, file_name: str, kept):
        names = list(folder) + [file_name]
        usable = kept if kept is not None and kept.status == 200 else None
        timeout = self.offline_timeout if usable is not None else self.config.timeout
        response, body = yield self.read_whole(self.url(names), usable.validators if usable else {}, timeout)
        if response.code == 304 and usable is not None:
            return NOT_MODIFIED
        answer = Answer(response.code, relay_headers(response, KEPT_HEADERS + ("retry-after",)), body)
        if response.code != 200 or (usable is not None and usable.body == body):
            return answer
        label = "/".join(names)
        if usable is not None and self.is_anchor(folder, file_name):
            moved = yield self.follow(folder, self.parsed(self.key(names), usable.body), archive.parse_release(body),
                                      label)
            if not moved:
                return NOT_MODIFIED  # the previous set stays, and is asked about again after index_ttl
        if file_name == "Release":
            yield self.fetch_signature(folder, body)
        return answer

    def read_whole(self, url: str, headers: dict, timeout: float):
        """
        GET `url` and read its answer whole (a Release file: at most
        `RELEASE_LIMIT` bytes): fires with (response, body), b"" for a 304.
        One of the backend's ``buffered_slots`` is held while it is read, so
        what clients can make the vault hold at once is bounded.
        """
        def ask():
            def got(response):
                if response.code == 304:
                    response.deliverBody(Discard())
                    return response, b""
                return read_body(response, RELEASE_LIMIT, timeout=timeout, clock=self.machinery.reactor).addCallback(
                    lambda body: (response, body))

            return self.request_upstream("GET", url, headers, timeout=timeout).addCallback(got)

        return self.buffered_slots.run(ask)

    def is_anchor(self, folder: tuple, file_name: str) -> bool:
        """Does this Release file define the suite's indexes (InRelease, or Release where there is none)?"""
        if file_name == "InRelease":
            return True
        kept = self.kept.peek(self.key(list(folder) + ["InRelease"]))
        return kept is None or kept.status != 200

    @inlineCallbacks
    def follow(self, folder: tuple, old: archive.Release, new: archive.Release, label: str):
        """
        A new Release for `folder`: fetch, checked against it, the new content
        of every index the cache holds for the old one.  True when they are
        all in (the new Release may be served); False when the mirror does not
        serve them yet (a sync in progress).  Fails when the mirror cannot be
        reached (the old Release is then served stale).
        """
        wanted = []
        for name, info in old.files.items():
            target = new.files.get(name)
            if info.sha256 is None or target is None or target.sha256 is None or target.sha256 == info.sha256:
                continue
            if self.store.lookup(self.index_key(folder, name, info.sha256)) is None:
                continue  # nobody used it
            if self.store.lookup(self.index_key(folder, name, target.sha256)) is None:
                wanted.append((name, target))
        if not wanted:
            return True
        log.info("{label} changed upstream: fetching the new version of the {n} indexes the cache holds"
                 " before serving it", label=label, n=len(wanted))
        results = yield DeferredList([self.fetch_index(folder, name, target, new.by_hash) for name, target in wanted],
                                     consumeErrors=True)
        for (ok, result), (name, _) in zip(results, wanted):
            if not ok and (result.check(IntegrityError) or (result.check(UpstreamStatus)
                                                            and 400 <= result.value.code < 500)):
                log.warn("{label} changed upstream, but the mirror does not serve the {name} it names yet ({why}):"
                         " a mirror sync in progress? Serving the previous {file}, which matches the indexes in"
                         " the cache, and asking again in {ttl:g} s", label=label, name=name,
                         why=result.value.message, file=label.rsplit("/", 1)[-1], ttl=self.index_ttl)
                return False
        for ok, result in results:
            if not ok:
                result.raiseException()
        return True

    def fetch_index(self, folder: tuple, name: str, info: archive.IndexFile, by_hash: bool):
        """The entry of one index's content, fetched by hash where the repository offers it, else by name."""
        parts = list(folder) + name.split("/")
        by_name = self.url(parts)
        spec = self.download_spec(self.index_key(folder, name, info.sha256),
                                  self.url(parts[:-1] + ["by-hash", "SHA256", info.sha256]) if by_hash else by_name,
                                  expected_size=info.size, expected_sha256=info.sha256, label="/".join(parts))
        d = self.fetch_entry(spec)
        if by_hash:
            def by_name_instead(failure):
                failure.trap(UpstreamStatus)
                if failure.value.code not in (404, 410):
                    return failure
                return self.fetch_entry(replace(spec, url=by_name))

            d.addErrback(by_name_instead)
        return d

    @inlineCallbacks
    def fetch_signature(self, folder: tuple, release_body: bytes):
        """Keep the Release.gpg that goes with a new Release (a failure here is left to the client's request)."""
        names = list(folder) + ["Release.gpg"]
        try:
            answer = yield self.ask_signature(folder, hashlib.sha256(release_body).hexdigest(), self.config.timeout)
        except VaultError as e:
            log.info("Could not fetch {name} with its Release yet: {why}", name="/".join(names), why=e.message)
            return
        if answer.status == 200:
            self.kept.keep(self.key(names), answer)

    @inlineCallbacks
    def signature(self, folder: tuple):
        """Release.gpg, served only with the Release it was fetched with."""
        release = yield self.release_answer(folder, "Release")
        signs = hashlib.sha256(release.body).hexdigest() if release.status == 200 else None
        key = self.key(list(folder) + ["Release.gpg"])
        kept = self.kept.peek(key)
        paired = kept is not None and signs is not None and kept.headers.get(SIGNS) == signs
        timeout = self.offline_timeout if kept is not None else self.config.timeout
        answer = yield self.kept.get(key, lambda _: self.ask_signature(folder, signs, timeout),
                                     ttl=float("inf") if paired else 0, health=self.health, identity="vault",
                                     name="/".join(list(folder) + ["Release.gpg"]))
        return answer

    @inlineCallbacks
    def ask_signature(self, folder: tuple, signs: str | None, timeout: float):
        response, body = yield self.read_whole(self.url(list(folder) + ["Release.gpg"]), {}, timeout)
        headers = relay_headers(response, KEPT_HEADERS + ("retry-after",))
        if signs is not None:
            headers[SIGNS] = signs
        return Answer(response.code, headers, body)

    # -- which Release a request goes with ---------------------------------------------

    def parsed(self, key: str, body: bytes) -> archive.Release:
        """The listing of a Release file's `body`, parsed once per content."""
        memo = self._parsed.get(key)
        if memo is not None:
            kept, release = memo
            if kept is body or (kept is not None and kept == body) or (
                    kept is None and hashlib.sha256(body).hexdigest() == release.digest):
                return release
        release = archive.parse_release(body)
        self._parsed[key] = (body if len(body) <= MEMO_BODY else None, release)
        return release

    def current_release(self, folder: tuple) -> archive.Release | None:
        """The Release the vault serves now for `folder` (InRelease, else Release), or None."""
        for anchor in archive.ANCHORS:
            key = self.key(list(folder) + [anchor])
            kept = self.kept.peek(key)
            if kept is not None and kept.status == 200:
                return self.parsed(key, kept.body)
        return None

    def remember_given(self, request, folder: tuple, release: archive.Release) -> None:
        self._served[folder] = release
        channel = getattr(request, "channel", None)
        if channel is None:
            return
        given = self._given.get(channel)
        if given is None:
            given = self._given[channel] = LRU(GIVEN_PER_CONNECTION)
        given[folder] = release

    def release_for(self, request, folder: tuple) -> archive.Release | None:
        """The Release this client was given for `folder` (on this connection), else the current one."""
        given = self._given.get(getattr(request, "channel", None)) if getattr(request, "channel", None) else None
        release = given.get(folder) if given is not None else None
        return release if release is not None else self.current_release(folder)

    def listing_for(self, request, names: list):
        """(folder, name, IndexFile, Release) of the nearest Release that lists this path, or None."""
        for i in range(len(names) - 1, -1, -1):
            folder = tuple(names[:i])
            release = self.release_for(request, folder)
            if release is None:
                continue
            name = "/".join(names[i:])
            info = release.files.get(name)
            if info is None or info.sha256 is None:
                return None
            return folder, name, info, release
        return None

    # -- indexes ------------------------------------------------------------------------

    def serve_index(self, request, names: list):
        label = "/".join(names)
        found = self.listing_for(request, names)
        if found is None:
            spec = self.download_spec(self.key(names), self.url(names), label=label)
            return self.serve_kept_file(request, spec, ttl=self.index_ttl, wait=self.offline_timeout)
        folder, name, info, release = found
        key = self.index_key(folder, name, info.sha256)
        by_name = self.download_spec(key, self.url(names), expected_size=info.size, expected_sha256=info.sha256,
                                     label=label)
        if not release.by_hash or self.store.lookup(key) is not None:
            return self.serve_cached(request, by_name)
        # By hash first: during a mirror sync the by-hash copy of what this client's Release names is still
        # there when the file under its name has moved on.
        by_hash = replace(by_name, url=self.url(names[:-1] + ["by-hash", "SHA256", info.sha256]))

        def by_name_instead(failure):
            failure.trap(UpstreamStatus)
            if failure.value.code not in (404, 410) or request.startedWriting:
                return failure
            return self.serve_cached(request, by_name)

        return self.serve_cached(request, by_hash).addErrback(by_name_instead)

    def serve_by_hash(self, request, names: list):
        folder_names, algorithm, digest = archive.by_hash_name(names)
        info = self.listed_by_hash(request, folder_names, algorithm, digest)
        if algorithm == "SHA256":
            sha256, size = digest, (info.size if info is not None else None)
        elif info is not None and info.sha256 is not None:
            sha256, size = info.sha256, info.size
        else:
            # No Release the vault knows maps this hash to a sha256: it cannot be checked, so it is not kept.
            return self.relay(request, request.method.decode("ascii"), self.url(names))
        spec = self.download_spec(self.key(folder_names + ["by-hash", "SHA256", sha256]), self.url(names),
                                  expected_size=size, expected_sha256=sha256, label="/".join(names))
        return self.serve_cached(request, spec)

    def listed_by_hash(self, request, folder_names: list, algorithm: str, digest: str):
        for i in range(len(folder_names), -1, -1):
            release = self.release_for(request, tuple(folder_names[:i]))
            if release is not None:
                return release.find(algorithm, digest, "/".join(folder_names[i:]))
        return None

    # -- pool files -----------------------------------------------------------------------

    @inlineCallbacks
    def serve_pool_file(self, request, names: list):
        key, url, label = self.key(names), self.url(names), "/".join(names)
        entry = self.store.lookup(key)
        if entry is not None:
            return (yield self.serve_hit(request, entry, label))
        expected = None
        if self.downloads.get(key) is None:
            if request.method == b"HEAD":
                return (yield self.relay(request, "HEAD", url, relayed=HEAD_HEADERS))
            expected = yield self.expected(label)
            if request.disconnected:
                return None
        spec = self.download_spec(key, url, expected_size=expected[0] if expected else None,
                                  expected_sha256=expected[1] if expected else None, label=label)
        return (yield self.serve_cached(request, spec))

    def expected(self, path: str):
        """
        Fires with (size, sha256) of a pool file as the Packages/Sources
        indexes of the Releases served list it, or None.  Each index is read
        once for as long as a served Release names it (`PoolFiles`): a path
        that none lists costs a few bisections, whoever asks and how often.
        """
        indexes = [(entry, name, root) for entry, name, root, prefix in self.pool_indexes()
                   if path.startswith(prefix)]
        return self.pool_files.lookup(path, indexes)

    def pool_indexes(self) -> list:
        """
        ``(entry, name, root, prefix)`` of one readable form, in the cache, of
        every Packages and Sources index of the Releases served: found again
        when a served Release changed, or after `INDEXES_RECHECK` seconds when
        some were not in the cache.
        """
        signature = frozenset((folder, release.digest) for folder, release in self._served.items())
        now = self.machinery.reactor.seconds()
        memo = self._pool_indexes
        if memo is not None and memo[0] == signature and (not memo[2] or now - memo[1] < INDEXES_RECHECK):
            return memo[3]
        indexes, missing = [], False
        for folder, release in sorted(self._served.items()):
            root = archive.archive_root(folder)
            prefix = "/".join(root) + "/" if root else ""
            for group in _index_groups(release):
                for name in group:
                    entry = self.store.lookup(self.index_key(folder, name, release.files[name].sha256))
                    if entry is not None:
                        indexes.append((entry, name, root, prefix))
                        break  # one readable form of each index is enough
                else:
                    missing = True
        self._pool_indexes = (signature, now, missing, indexes)
        self.pool_files.retain({PoolFiles.key(entry, root) for entry, _, root, _ in indexes})
        return indexes


def _index_groups(release: archive.Release) -> list:
    """The Packages and Sources indexes a Release lists: one list of names per index, readable forms first."""
    if release.groups is not None:
        return release.groups
    found: dict = {}
    for name, info in release.files.items():
        if info.sha256 is None:
            continue
        folder, _, base = name.rpartition("/")
        for stem in ("Packages", "Sources"):
            suffix = base[len(stem):]
            if base.startswith(stem) and suffix in READABLE:
                found.setdefault((folder, stem), []).append((READABLE.index(suffix), name))
    release.groups = [[name for _, name in sorted(names)] for names in found.values()]
    return release.groups
