"""
What a pool file must be: its size and sha256 as the ``Packages`` and
``Sources`` indexes in the cache say.

An index of Debian's main archive lists ~70,000 files; a dict of them would
cost tens of MB per index.  `FileTable` keeps one 48-byte record per file
(8 bytes of a hash of the path, the size, the sha256) in one sorted bytes
object, searched by bisection: about 3.4 MB for such an index.  `PoolFiles`
holds the tables of every index of the Releases the vault serves, each built
once (in a thread, decompressing and reading the index as a stream) and kept
while a served Release lists it, within a budget of bytes: a path that no
index lists -- a made-up one -- is answered by a few bisections, never by
reading an index again.
"""

import bz2
import gzip
import hashlib
import lzma
import struct

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from ...freshness import Coalescer
from ...logs import VaultLogger

log = VaultLogger()

RECORD = struct.Struct(">8sQ32s")
#: compressed forms of an index the table can read, best first
READABLE = ("", ".xz", ".gz", ".bz2", ".lzma")
#: bytes of tables held per backend: 48 per file, ~1.4 million files (Debian's main archive: ~70,000 per
#: Packages index); indexes beyond it are not checked against (apt checks every file's hash itself)
TABLES_BUDGET = 64 * 1024 * 1024
#: what reading an index can fail with (damaged, truncated, not what its name says)
READ_ERRORS = (OSError, EOFError, ValueError, lzma.LZMAError)


def path_key(path: str) -> bytes:
    return hashlib.blake2b(path.encode("utf-8"), digest_size=8).digest()


class FileTable:
    """path -> (size, sha256) of the files one index lists."""

    def __init__(self, records: list):
        records.sort()
        self._data = b"".join(RECORD.pack(*r) for r in records)
        self._count = len(records)

    def __len__(self) -> int:
        return self._count

    @property
    def cost(self) -> int:
        """Bytes it holds."""
        return len(self._data) + 64

    def get(self, path: str):
        key = path_key(path)
        data, width = self._data, RECORD.size
        lo, hi = 0, self._count
        while lo < hi:
            mid = (lo + hi) // 2
            if data[mid * width:mid * width + 8] < key:
                lo = mid + 1
            else:
                hi = mid
        if lo < self._count and data[lo * width:lo * width + 8] == key:
            _, size, sha = RECORD.unpack_from(data, lo * width)
            return size, sha.hex()
        return None


def _open(path: str, name: str):
    if name.endswith(".xz") or name.endswith(".lzma"):
        return lzma.open(path, "rb")
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def read_table(path: str, name: str, root: tuple) -> FileTable:
    """
    Build the table of one Packages or Sources index (blocking: run it in a
    thread).  Paths are relative to the backend: `root` (the segments above
    ``dists/``) joined with ``Filename``, or with ``Directory`` and each file
    of ``Checksums-Sha256``.
    """
    prefix = "/".join(root)
    records = []
    stanza: dict = {}
    checksums: list = []
    in_checksums = False

    def full(rel: str) -> str:
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        return "/".join(([prefix] if prefix else []) + parts)

    def flush():
        if "filename" in stanza and "size" in stanza and "sha256" in stanza:
            records.append((path_key(full(stanza["filename"])), stanza["size"], bytes.fromhex(stanza["sha256"])))
        directory = stanza.get("directory")
        if directory is not None:
            for sha, size, file_name in checksums:
                records.append((path_key(full(directory + "/" + file_name)), size, bytes.fromhex(sha)))

    with _open(path, name) as f:
        for raw in f:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line:
                flush()
                stanza, checksums, in_checksums = {}, [], False
                continue
            if line[0] in " \t":
                if in_checksums:
                    fields = line.split()
                    if len(fields) == 3 and fields[1].isdigit() and _is_sha256(fields[0]):
                        checksums.append((fields[0].lower(), int(fields[1]), fields[2]))
                continue
            key, _, value = line.partition(":")
            key, value = key.lower(), value.strip()
            in_checksums = key == "checksums-sha256"
            if key == "filename":
                stanza["filename"] = value
            elif key == "size" and value.isdigit() and len(value) < 19:
                stanza["size"] = int(value)
            elif key == "sha256" and _is_sha256(value):
                stanza["sha256"] = value.lower()
            elif key == "directory":
                stanza["directory"] = value
    flush()
    return FileTable(records)


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)


class PoolFiles:
    """
    path -> (size, sha256) of the pool files that a set of indexes lists:
    each index's `FileTable` built once (in a thread; identical concurrent
    builds shared) and held while the set names it (`retain`), within
    `budget` bytes.  An index that cannot be read, or whose table would
    exceed the budget, is noted and not read again while it is in the set.
    """

    def __init__(self, budget: int = TABLES_BUDGET):
        self.budget = budget
        #: bytes the tables hold
        self.total = 0
        #: (index sha256, root) -> FileTable
        self._tables: dict = {}
        #: (index sha256, root) not to read again
        self._skipped: set = set()
        self._building = Coalescer()

    def retain(self, keys: set) -> None:
        """The set is now `keys` ((index sha256, root) pairs): let go of the tables of other indexes."""
        for key in [k for k in self._tables if k not in keys]:
            self.total -= self._tables.pop(key).cost
        self._skipped &= keys

    @staticmethod
    def key(entry, root: tuple) -> tuple:
        return entry.meta.get("sha256") or entry.path, root

    @inlineCallbacks
    def lookup(self, path: str, indexes: list):
        """
        (size, sha256) of `path` as the first of `indexes` that lists it
        says, or None.  `indexes` are ``(entry, name, root)``: an index's
        store entry, its name (which tells its compression), and the
        segments above ``dists/`` that its paths are relative to.
        """
        for entry, name, root in indexes:
            key = self.key(entry, root)
            table = self._tables.get(key)
            if table is None:
                if key in self._skipped:
                    continue
                table = yield self._building.share(key, lambda: self._build(key, entry, name, root))
                if table is None:
                    continue
            found = table.get(path)
            if found is not None:
                return found
        return None

    @inlineCallbacks
    def _build(self, key: tuple, entry, name: str, root: tuple):
        try:
            table = yield deferToThread(read_table, entry.path, name, root)
        except FileNotFoundError:
            return None  # evicted meanwhile: the next set will not name it
        except READ_ERRORS as e:
            log.warn("Cannot read {name} to check pool files against it: {why}", name=name, why=e)
            self._skipped.add(key)
            return None
        if key in self._tables:
            return self._tables[key]
        if self.total + table.cost > self.budget:
            log.warn("Not checking pool files against {name}: the {mb} MiB of pool-file tables are in use",
                     name=name, mb=self.budget // (1024 * 1024))
            self._skipped.add(key)
            return None
        self._tables[key] = table
        self.total += table.cost
        return table

    def __len__(self) -> int:
        return len(self._tables)
