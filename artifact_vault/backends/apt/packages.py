"""
What a pool file must be: its size and sha256 as the ``Packages`` and
``Sources`` indexes in the cache say.

An index of Debian's main archive lists ~70,000 files; a dict of them would
cost tens of MB per index.  `FileTable` keeps one 48-byte record per file
(8 bytes of a hash of the path, the size, the sha256) in one sorted bytes
object, searched by bisection: about 3.4 MB for such an index.  Tables are
built in a thread (decompressing and reading the index as a stream) and a
few are kept, per index sha256.
"""

import bz2
import gzip
import hashlib
import lzma
import struct

from twisted.internet.defer import succeed
from twisted.internet.threads import deferToThread

from ...bounded import LRU
from ...freshness import Coalescer

RECORD = struct.Struct(">8sQ32s")
#: compressed forms of an index the table can read, best first
READABLE = ("", ".xz", ".gz", ".bz2", ".lzma")
TABLES = 8


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


class FileTables:
    """The tables of the indexes in the cache, built once per index content, a few kept."""

    def __init__(self):
        self._tables = LRU(TABLES)
        self._building = Coalescer()

    def table(self, entry, name: str, root: tuple):
        """Deferred `FileTable` of the index stored as `entry` (`name` tells its compression)."""
        sha = entry.meta.get("sha256") or entry.path
        key = (sha, root)
        table = self._tables.get(key)
        if table is not None:
            return succeed(table)

        def build():
            return deferToThread(read_table, entry.path, name, root).addCallback(remember)

        def remember(table):
            self._tables[key] = table
            return table

        return self._building.share(key, build)
