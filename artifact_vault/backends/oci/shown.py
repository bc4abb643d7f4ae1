"""
Which digests each repository's upstream has shown the vault.

Blobs (and manifests) are stored once per digest for every registry, but a
stored digest answers a request for a repository only once that
repository's upstream has shown it: listed in a manifest the vault fetched
for that repository (an image's config and layers, an index's manifests),
or confirmed by a HEAD of it there.  Otherwise anyone who knows the digest
of a private layer could read it through a public repository's name.

A record per showing, ``<backend>/r/<repository>/_shown/<hex>``, holds
``{digest: size}`` of what a manifest (or a blob's HEAD) showed; a
bounded map keeps each recently used repository's digests in memory, read
back from its records the first time a process needs them.  Records are
cache entries like any other: evicting one only means upstream is asked
again.
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
        """Fires with ``{digest: size}`` of everything `repository`'s upstream has shown (read once per process)."""
        digests = self._memory.get(repository)
        if digests is not None:
            return succeed(digests)
        return self._loading.share(repository, lambda: deferToThread(self._read, repository).addCallback(
            self._loaded, repository))

    def _loaded(self, read: tuple, repository: str) -> dict:
        found, paths = read
        for key, path in paths:  # records in use stay, like the blobs they open
            self.store.touch(Entry(key, path, {}))
        current = self._memory.get(repository)
        if current is not None:  # shown meanwhile
            found.update({d: s for d, s in current.items() if found.get(d) is None})
        self._memory[repository] = found
        return found

    @inlineCallbacks
    def has(self, repository: str, digest: str):
        """Fires with True when `repository`'s upstream has shown `digest`."""
        known = yield self.known(repository)
        return digest in known

    @inlineCallbacks
    def size(self, repository: str, digest: str):
        known = yield self.known(repository)
        return known.get(digest)

    def note(self, repository: str, shown_by: str, digests: dict) -> None:
        """`repository`'s upstream showed `digests` ({digest: size}) through `shown_by` (a manifest, or a blob)."""
        memory = self._memory.get(repository)
        if memory is not None:
            new = {d: s for d, s in digests.items() if memory.get(d) is None}
            memory.update(new)
            if not new and self.store.lookup(self._record_key(repository, shown_by)) is not None:
                return  # nothing new: no write
        else:
            # read what earlier records say, then add this (the write below may land before or after)
            self.known(repository).addCallbacks(
                lambda memory: memory.update({d: s for d, s in digests.items() if memory.get(d) is None}),
                lambda failure: log.failure("Reading what {repo} has shown failed", failure, repo=repository))
        body = json.dumps(digests, sort_keys=True).encode()
        self.store.write_later(self._record_key(repository, shown_by), body,
                               {"content_type": "application/json"})

    def _record_key(self, repository: str, shown_by: str) -> str:
        return f"{self.folder_key(repository)}/{shown_by.split(':', 1)[1]}"

    def _read(self, repository: str) -> tuple:  # in a thread: no store state touched here
        folder_key = self.folder_key(repository)
        folder = self.store.path_for(folder_key)
        found: dict = {}
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
            if isinstance(document, dict):
                for digest, size in document.items():
                    if isinstance(digest, str) and (size is None or isinstance(size, int)):
                        if found.get(digest) is None:
                            found[digest] = size
            paths.append((f"{folder_key}/{name}", path))
        return found, paths
