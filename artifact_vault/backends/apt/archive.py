"""
What the paths of an APT repository are, and what a Release file says.

Kinds of path (below the backend's base URL):

``BY_HASH``    ``.../by-hash/<ALGORITHM>/<hex>``: content named by its hash, immutable
``RELEASE``    ``InRelease``, ``Release``, ``Release.gpg``: what names every index of a suite
``IMMUTABLE``  ``pool/...``, and outside ``dists/``: ``*.deb``, ``*.udeb``, ``*.ddeb``, ``*.dsc``,
               ``*.tar``, ``*.tar.*``, ``*.diff.*``: a pool file never changes
``VOLATILE``   everything else: ``Packages*``, ``Sources*``, ``Translation-*``, ``Contents-*``,
               ``Components-*``, ``icons-*``, any other file under ``dists/`` (also a
               ``.tar.gz`` there: installer images below ``current/`` change) and files
               such as ``README`` or ``ls-lR.gz``

A Release file (the clear-signed text of ``InRelease``, or ``Release``) lists
each index of its suite with size and hashes, relative to the folder it is in.
`Release` holds that listing; nothing here checks signatures (apt does).
"""

import hashlib
import re
from dataclasses import dataclass, field

from ...errors import BadRequest
from ...store import UnsafePath, safe_segments

BY_HASH = "by-hash"
RELEASE = "release"
IMMUTABLE = "immutable"
VOLATILE = "volatile"

RELEASE_FILES = ("InRelease", "Release", "Release.gpg")
#: the files whose listing defines a suite's indexes, best first
ANCHORS = ("InRelease", "Release")
#: hash algorithms of by-hash names: hex length
ALGORITHMS = {"MD5Sum": 32, "SHA1": 40, "SHA256": 64, "SHA512": 128}
IMMUTABLE_SUFFIXES = (".deb", ".udeb", ".ddeb", ".dsc", ".tar")
MAX_DEPTH = 24

#: characters of a path segment in an APT repository (Debian's file names and suite names use fewer)
_SEGMENT = re.compile(r"^[A-Za-z0-9_+~:@=,][A-Za-z0-9._+~:@=,-]*$")
_HEX = re.compile(r"^[0-9a-f]+$")


def segments(subpath: bytes) -> list[str]:
    """
    The decoded segments of a request path below the backend, or BadRequest.
    A ``.`` segment is dropped: apt asks a flat repository (``deb URI ./``)
    for ``URI/./InRelease``.
    """
    parts = [p for p in subpath.split(b"/") if p != b"."]
    if not parts or parts == [b""]:
        raise BadRequest("not a file of an APT repository")
    try:
        names = safe_segments(b"/".join(parts))
    except UnsafePath as e:
        raise BadRequest(f"bad path: {e}") from None
    if len(names) > MAX_DEPTH:
        raise BadRequest("path too deep for an APT repository")
    for name in names:
        if not _SEGMENT.match(name):
            raise BadRequest(f"{name[:80]!r} is not a file or folder name of an APT repository")
    return names


def classify(names: list[str]) -> str:
    name = names[-1]
    if len(names) >= 3 and names[-3] == "by-hash":
        return BY_HASH
    if name in RELEASE_FILES:
        return RELEASE
    if names[0] == "pool":
        return IMMUTABLE
    if "dists" not in names[:-1] and (name.endswith(IMMUTABLE_SUFFIXES) or ".tar." in name or ".diff." in name):
        return IMMUTABLE
    return VOLATILE


def by_hash_name(names: list[str]):
    """(folder segments, algorithm, hex) of a by-hash path, or BadRequest."""
    algorithm, digest = names[-2], names[-1]
    length = ALGORITHMS.get(algorithm)
    if length is None or len(digest) != length or not _HEX.match(digest):
        raise BadRequest(f"{'/'.join(names[-3:])[:200]} is not a by-hash name (ALGORITHM/lower-case hex)")
    return names[:-3], algorithm, digest


@dataclass(frozen=True)
class IndexFile:
    """One file a Release lists: its size and hashes (algorithm -> hex)."""

    size: int
    hashes: dict

    @property
    def sha256(self) -> str | None:
        return self.hashes.get("SHA256")


@dataclass
class Release:
    """
    The listing of one Release file: name (relative to its folder) ->
    `IndexFile`, whether the repository serves ``by-hash`` names, and the
    sha256 of the file it was read from (which identifies it).
    """

    digest: str
    by_hash: bool = False
    files: dict = field(default_factory=dict)
    #: (algorithm, hex) -> name, for by-hash names of any algorithm
    by_digest: dict = field(default_factory=dict)
    #: the Packages/Sources indexes it lists, grouped (filled on first use by the backend)
    groups: list | None = None

    def find(self, algorithm: str, digest: str, folder: str) -> IndexFile | None:
        """The file of `folder` (relative to the Release) listed under that hash, if any."""
        name = self.by_digest.get((algorithm, digest))
        if name is None or name.rpartition("/")[0] != folder:
            return None
        return self.files[name]


def signed_text(data: bytes) -> bytes:
    """The text of a clear-signed message (InRelease); other data as it is."""
    if not data.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----"):
        return data
    head, _, rest = data.partition(b"\n\n")
    text, _, _ = rest.partition(b"\n-----BEGIN PGP SIGNATURE-----")
    return b"\n".join(line[2:] if line.startswith(b"- ") else line for line in text.split(b"\n"))


def parse_release(data: bytes) -> Release:
    """
    Read the hash sections of a Release file.  Names that could not name a
    file below its folder (``..``, absolute, odd characters) are skipped.
    """
    release = Release(hashlib.sha256(data).hexdigest())
    section = None
    sizes: dict = {}
    hashes: dict = {}
    for raw in signed_text(data).decode("utf-8", "replace").split("\n"):
        line = raw.rstrip("\r")
        if not line:
            continue
        if not line[0].isspace():
            key, _, value = line.partition(":")
            section = key if key in ALGORITHMS else None
            if key == "Acquire-By-Hash":
                release.by_hash = value.strip().lower() == "yes"
            continue
        if section is None:
            continue
        fields = line.split()
        if len(fields) != 3 or not fields[1].isdigit() or len(fields[1]) > 15:
            continue
        digest, size, name = fields[0].lower(), int(fields[1]), fields[2]
        if len(digest) != ALGORITHMS[section] or not _HEX.match(digest) or not _listed_name_ok(name):
            continue
        sizes.setdefault(name, size)
        hashes.setdefault(name, {})[section] = digest
        release.by_digest[(section, digest)] = name
    release.files = {name: IndexFile(sizes[name], hashes[name]) for name in sizes}
    return release


def _listed_name_ok(name: str) -> bool:
    parts = name.split("/")
    return len(parts) <= MAX_DEPTH and all(_SEGMENT.match(p) for p in parts)


def archive_root(folder: tuple) -> tuple:
    """Where the ``Filename:`` fields of a suite's Packages start: above ``dists/``, or the flat folder."""
    if "dists" in folder:
        return folder[:folder.index("dists")]
    return folder
