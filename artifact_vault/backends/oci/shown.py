"""
Which digests each repository's upstream has shown the vault.

Blobs (and manifests) are stored once per digest for every registry, but
stored bytes answer a request for a repository only when that repository's
upstream would serve them there.  Otherwise anyone who knows the digest of
a private layer could read it through a public repository's name -- or
through a repository of their own whose manifest merely *names* that
digest: registries keep fields they do not know byte-exact, do not check
that a foreign (non-distributable) layer exists, and not all of them check
the layers of a pushed manifest at all.  So two kinds of showing are told
apart, per repository:

``listed``
    Named by a manifest that repository's upstream served, where the
    manifest's schema says the registry serves it (an image's config and
    distributable layers, an index's manifests: `protocol.references`), with
    the size the manifest gives.  Enough to fetch the digest *from that
    repository's upstream* without asking first (the upstream answers or
    refuses the GET itself), and to keep referrers for it; not enough to
    hand out bytes the vault got elsewhere.
``confirmed``
    Served by that repository's upstream (a manifest fetched there), or
    confirmed by a HEAD of it there.  Bytes the vault holds for the digest
    answer the repository only then (or when they were fetched from that
    very repository: the entry's ``upstream_url`` says so).

A record per showing, ``<backend>/r/<repository>/_shown/<hex>``, holds
``{"listed": {digest: size}, "confirmed": {digest: size}}`` (an older
record, a flat ``{digest: size}``, counts as listed only); a bounded map
keeps each recently used repository's digests in memory, read back from its
records the first time a process needs them.  Records are cache entries like
any other: evicting one only means upstream is asked again.
"""

import json
import os

from twisted.internet.defer import inlineCallbacks, succeed
from twisted.internet.threads import deferToThread

from ...bounded import LRU
from ...freshness import Coalescer
from ...logs import VaultLogger
from ...store import META_SUFFIX, Entry

log = VaultLogger()

#: repositories whose digests are held in memory
REPOSITORIES_KEPT = 4096
#: records read back per repository
RECORDS_READ = 10_000


class Shown:
    """What one repository's upstream has shown: sizes of every digest listed or confirmed, and which are confirmed."""

    __slots__ = ("sizes", "confirmed")

    def __init__(self):
        #: digest -> size (None when nobody said)
        self.sizes: dict = {}
        self.confirmed: set = set()

    def __contains__(self, digest: str) -> bool:
        return digest in self.sizes

    def size(self, digest: str):
        return self.sizes.get(digest)

    def is_confirmed(self, digest: str) -> bool:
        return digest in self.confirmed

    def add(self, listed: dict, confirmed: dict) -> bool:
        """Note more of what was shown; True if anything is new."""
        new = False
        for digests, sure in ((listed, False), (confirmed, True)):
            for digest, size in digests.items():
                if self.sizes.get(digest) is None and (size is not None or digest not in self.sizes):
                    self.sizes[digest] = size
                    new = True
                if sure and digest not in self.confirmed:
                    self.confirmed.add(digest)
                    new = True
        return new


class ShownDigests:
    def __init__(self, backend):
        self.backend = backend
        self.store = backend.store
        self._memory = LRU(REPOSITORIES_KEPT)
        self._loading = Coalescer()

    def folder_key(self, repository: str) -> str:
        # "_shown" cannot be a name component (they start with a letter or digit)
        return f"{self.backend.name}/r/{repository}/_shown"

    def known(self, repository: str):
        """Fires with the `Shown` of `repository` (its records read once per process)."""
        shown = self._memory.get(repository)
        if shown is not None:
            return succeed(shown)
        return self._loading.share(repository, lambda: deferToThread(self._read, repository).addCallback(
            self._loaded, repository))

    def _loaded(self, read: tuple, repository: str) -> Shown:
        found, paths = read
        for key, path in paths:  # records in use stay, like the blobs they open
            self.store.touch(Entry(key, path, {}))
        current = self._memory.get(repository)
        if current is not None:  # shown meanwhile
            found.add(current.sizes, {d: current.sizes.get(d) for d in current.confirmed})
        self._memory[repository] = found
        return found

    @inlineCallbacks
    def has(self, repository: str, digest: str):
        """Fires with True when `repository`'s upstream has listed or confirmed `digest`."""
        known = yield self.known(repository)
        return digest in known

    def note(self, repository: str, shown_by: str, listed: dict | None = None, confirmed: dict | None = None) -> None:
        """
        `repository`'s upstream showed, through `shown_by` (a manifest's or a
        blob's digest), the `listed` digests ({digest: size}: named by a
        manifest it served) and the `confirmed` ones (served or confirmed there).
        """
        listed, confirmed = listed or {}, confirmed or {}
        memory = self._memory.get(repository)
        if memory is not None:
            new = memory.add(listed, confirmed)
            if not new and self.store.lookup(self._record_key(repository, shown_by)) is not None:
                return  # nothing new: no write
        else:
            # read what earlier records say, then add this (the write below may land before or after)
            self.known(repository).addCallbacks(
                lambda memory: memory.add(listed, confirmed),
                lambda failure: log.failure("Reading what {repo} has shown failed", failure, repo=repository))
        body = json.dumps({"listed": listed, "confirmed": confirmed}, sort_keys=True).encode()
        self.store.write_later(self._record_key(repository, shown_by), body,
                               {"content_type": "application/json"})

    def _record_key(self, repository: str, shown_by: str) -> str:
        return f"{self.folder_key(repository)}/{shown_by.split(':', 1)[1]}"

    def _read(self, repository: str) -> tuple:  # in a thread: no store state touched here
        folder_key = self.folder_key(repository)
        folder = self.store.path_for(folder_key)
        found = Shown()
        paths = []
        try:
            names = os.listdir(folder)
        except OSError:
            return found, paths
        present = set(names)
        names = sorted(n for n in present if len(n) == 64 and n + META_SUFFIX in present)
        for name in names[:RECORDS_READ]:
            path = os.path.join(folder, name)
            try:
                with open(path, "rb") as f:
                    document = json.load(f)
            except (OSError, ValueError):
                continue
            if not isinstance(document, dict):
                continue
            if "listed" in document or "confirmed" in document:
                listed, confirmed = _digests(document.get("listed")), _digests(document.get("confirmed"))
            else:  # a record of an older version: what it says was only ever listed
                listed, confirmed = _digests(document), {}
            found.add(listed, confirmed)
            paths.append((f"{folder_key}/{name}", path))
        return found, paths


def _digests(document) -> dict:
    if not isinstance(document, dict):
        return {}
    return {digest: size for digest, size in document.items()
            if isinstance(digest, str) and digest.startswith("sha256:")
            and (size is None or (isinstance(size, int) and not isinstance(size, bool)))}
