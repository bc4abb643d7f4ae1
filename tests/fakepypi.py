"""A fake PyPI: a simple index and a separate file host, for tests.

Two real HTTP servers built on twisted.web, like pypi.org and
files.pythonhosted.org: the index (``/simple/``) on 127.0.0.1 links to the
files by absolute URL on a second host, 127.0.0.2 (``same_host=True``: the
index host serves the files too and the pages link to them by relative URL).
The facts the pages follow are in /work/shared/PROTOCOLS.md (PyPI):

* PEP 503 names: ``/simple/Foo_Bar/`` and ``/simple/foo-bar`` answer 301 to
  ``/simple/foo-bar/`` (a path, as PyPI sends); unknown projects 404.
* PEP 691 negotiation on Accept (q-values, ``*/*``, ``text/*``): JSON
  ``application/vnd.pypi.simple.v1+json``, ``application/vnd.pypi.simple.v1+html``
  or ``text/html``; equal q picks text/html, then v1+html, then JSON (PyPI's
  order); no Accept header means text/html; nothing acceptable is 406
  (``strict_accept=False``: text/html instead, which is what PyPI does).
  ``Vary: Accept``.  ``html_only=True`` ignores Accept and always answers
  text/html without Vary, like a static index (download.pytorch.org).
* JSON API 1.1 (PEP 700): ``meta.api-version``, ``name``, ``versions``,
  ``files[]`` with filename, url, hashes.sha256, requires-python, core-metadata
  (only for files that have a ``.metadata`` companion), yanked (false or the
  reason), size, upload-time.  HTML: ``#sha256=`` fragments and escaped
  ``data-requires-python``, ``data-yanked``, ``data-core-metadata`` and
  ``data-dist-info-metadata`` attributes.
* Pages carry ``Cache-Control: max-age=600``, ``ETag`` (per representation),
  ``Last-Modified``, ``X-PyPI-Last-Serial`` and answer If-None-Match /
  If-Modified-Since with 304.  ``gzip_index=True`` gzips pages for clients
  that ask (as PyPI's CDN does).
* Files (``/packages/<sha256 split>/<filename>``, the PEP 658 companion at
  ``<file>.metadata``): Content-Length, ``Accept-Ranges: bytes``, single
  Range requests (206 / 416; several ranges get the whole file), If-Range,
  ETag, Last-Modified, conditional 304, HEAD, never a Content-Encoding.

The distributions are real, built at start into a temporary directory with
zipfile/tarfile, byte-for-byte deterministic (see ``CATALOG``): ``alpha`` 1.0
and 2.0 (2.0 requires ``beta>=1.0``), ``beta`` 1.0 (its wheel has no
``.metadata``, so uv reads the wheel's METADATA by Range), ``gamma`` 1.0 and
1.1 (yanked with a reason), ``delta`` 1.0 and 2.0 (``Requires-Python:
>=4.0``), ``Zeta_Utils`` 0.5 (a name to normalise).  Each wheel holds an
importable module with ``__version__``; sdists build offline through an
in-tree, standard-library-only build backend.  ``build_wheel(...,
pad_bytes=N)`` makes a wheel of any size (an incompressible file streamed to
disk) for benchmarks.

In-process use (same reactor as the code under test)::

    pypi = FakePyPI()                  # builds the catalog in a temp dir
    pypi.listen(reactor)               # sets pypi.index_url, pypi.files_url
    pypi.add_release("beta", "1.1")    # shows up on the next page load
    pypi.set_fault("down5xx", target="files", count=1)
    ...
    yield pypi.close()                 # stop listening, drop connections, remove the temp dir

Standalone use::

    python -m tests.fakepypi --index 127.0.0.1:0 --files 127.0.0.2:0 --ready-file PATH
        [--html-only] [--same-host] [--gzip-index] [--lenient-accept] [--workdir DIR]

writes ``{"index": "http://127.0.0.1:N/simple/", "files": "http://127.0.0.2:M"}``
to PATH (atomically) and as one line to stdout once both servers listen.

Fault modes (``set_fault`` / ``POST /_fake/fault``), per target listener
(``"index"``, ``"files"`` or ``"both"``), optionally limited to paths
containing ``only`` and to the next ``count`` matching requests:

``normal``   no fault.
``down5xx``  503 for every request.
``429``      429 with ``Retry-After: <retry_after>`` (default 1).
``hang``     accept the request, never answer; leaving hang (another mode,
             reset, close) drops those connections.
``cut``      file bodies stop after ``cut_after`` bytes (default 0): the full
             Content-Length is announced, then the connection closes.
``corrupt``  file bodies keep their length but one byte is flipped (at
             ``corrupt_at``, default the middle of the file), so the sha256 the
             index announces does not match.  In the middle of a wheel the
             byte lies in a member, which uv's streaming unzip reports as a
             bad CRC; ``corrupt_at=10`` flips the first member's modification
             time in its local header, which only the sha256 can tell.

Control endpoints, on both hosts, never logged and never faulted:

* ``GET  /_fake/requests``  both servers' requests since start or the last
  reset: ``{"server": "index"|"files", "host", "method", "path" (with query),
  "headers" (lower-cased names), "status" (None while unanswered), "time"}``,
  plus ``"aborted": true`` when the connection closed before the response ended.
* ``POST /_fake/reset[?catalog=1]``  clear the log and the faults (and with
  catalog=1 drop everything added at runtime: back to the start catalog).
* ``POST /_fake/fault``  JSON ``{"mode", "target", "cut_after", "retry_after",
  "count", "only", "corrupt_at"}``.
* ``POST /_fake/release``  JSON ``{"project", "version", "requires": [...],
  "requires_python", "yanked", "wheel", "sdist", "metadata_file", "pad_bytes"}``;
  answers the new files as in /_fake/info.
* ``POST /_fake/dist``  JSON ``{"project", "path", "version", "sha256", "metadata"}``: publish a
  file already on disk (``add_dist``; e.g. a big wheel built once and kept); answers it as in
  /_fake/info.
* ``POST /_fake/yank``  JSON ``{"project", "version", "reason"}``.
* ``POST /_fake/options``  JSON with any of ``html_only``, ``same_host``,
  ``gzip_index``, ``strict_accept``.
* ``GET  /_fake/state``  options, faults, request count.
* ``GET  /_fake/info``  urls, and per project its files (filename, version,
  kind, url, size, sha256, metadata_sha256, requires_python, yanked, upload_time).
"""

from __future__ import annotations

import argparse
import base64
import email.utils
import gzip
import hashlib
import html
import io
import json
import os
import random
import re
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple, Union
from urllib.parse import parse_qs, unquote

from twisted.internet import defer
from twisted.web import http

# the fake upstream's pieces: Range parsing, connection tracking, the ready file
from tests.fakeserve import (FileBody, Listening, host_port, origin, owner_site, record_request, request_headers,
                             write_ready)
from tests.upstream import _parse_range

__all__ = [
    "FakePyPI", "DistFile", "Project", "CATALOG", "normalize", "negotiate", "build_wheel", "build_sdist",
    "wheel_filename", "read_wheel_metadata", "JSON_V1", "HTML_V1", "TEXT_HTML",
]

JSON_V1 = "application/vnd.pypi.simple.v1+json"
HTML_V1 = "application/vnd.pypi.simple.v1+html"
TEXT_HTML = "text/html"
API_VERSION = "1.1"
INDEX_CACHE_CONTROL = "max-age=600, public"
FILE_CACHE_CONTROL = "max-age=365000000, immutable, public"
EPOCH = 1704067200  # 2024-01-01T00:00:00Z: upload times of the start catalog count from here
ZIP_DATE = (2024, 1, 1, 0, 0, 0)
FAULT_MODES = ("normal", "down5xx", "429", "hang", "cut", "corrupt")
TARGETS = ("index", "files")

# The start catalog: (project, version, options of FakePyPI.add_release).
CATALOG = [
    ("alpha", "1.0", {"sdist": True}),
    ("alpha", "2.0", {"requires": ["beta>=1.0"], "sdist": True}),
    ("beta", "1.0", {"sdist": True, "metadata_file": False, "pad_bytes": 200_000}),
    ("gamma", "1.0", {}),
    ("gamma", "1.1", {"yanked": 'broken <build> & "bad" wheel'}),
    ("delta", "1.0", {}),
    ("delta", "2.0", {"requires_python": ">=4.0", "sdist": True}),
    ("Zeta_Utils", "0.5", {}),
]


def normalize(name: str) -> str:
    """PEP 503 project name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _escaped(name: str) -> str:
    """The name as it appears in wheel and sdist file names."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _module(name: str) -> str:
    return _escaped(name)


def wheel_filename(name: str, version: str) -> str:
    return "%s-%s-py3-none-any.whl" % (_escaped(name), version)


def _version_key(version: str):
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.+-]", version))


def _http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + ".%06dZ" % int((ts % 1) * 1e6)


# ---------------------------------------------------------------------------
# Building distributions


def core_metadata(name, version, requires=(), requires_python=None, summary=None) -> bytes:
    """The METADATA / PKG-INFO text of a distribution."""
    lines = [
        "Metadata-Version: 2.1",
        "Name: %s" % name,
        "Version: %s" % version,
        "Summary: %s" % (summary or "%s, a package served by the fake PyPI index" % name),
    ]
    if requires_python:
        lines.append("Requires-Python: %s" % requires_python)
    lines += ["Requires-Dist: %s" % r for r in requires]
    return ("\n".join(lines) + "\n\n").encode()


def _module_source(name, version) -> bytes:
    return ('"""%s %s, built by tests/fakepypi.py."""\n\n__version__ = %r\nPROJECT = %r\n'
            % (name, version, version, name)).encode()


def _record_hash(digest: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


WHEEL_FILE = b"Wheel-Version: 1.0\nGenerator: fakepypi\nRoot-Is-Purelib: true\nTag: py3-none-any\n"


def _zip_info(arcname: str, compress=zipfile.ZIP_DEFLATED) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(arcname, ZIP_DATE)
    info.compress_type = compress
    info.external_attr = 0o644 << 16
    return info


def _padding_chunks(size: int, seed: int) -> Iterable[bytes]:
    """``size`` incompressible bytes, the same for the same seed."""
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:  # slower, still deterministic
        rng = random.Random(seed)
        while size > 0:
            n = min(1 << 20, size)
            yield rng.randbytes(n)
            size -= n
        return
    key = hashlib.sha256(b"fakepypi padding %d" % seed).digest()
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    zeros = bytes(1 << 22)
    while size > 0:
        n = min(len(zeros), size)
        yield stream.update(zeros[:n])
        size -= n


def build_wheel(dest_dir, name, version, *, requires=(), requires_python=None, pad_bytes=0, seed=0,
                summary=None) -> str:
    """Write a valid, installable wheel into ``dest_dir``; return its path.

    The wheel holds the package ``<normalised name with _>`` (``__version__``),
    and ``*.dist-info/{METADATA,WHEEL,RECORD}`` last, RECORD with the right
    hashes.  ``pad_bytes`` adds ``<module>/_padding.bin``, that many
    incompressible bytes stored as they are, streamed to disk (zip64 when
    large), so a 2 GiB wheel needs no memory (about 14 s here, disk-bound;
    pip and uv both install it).
    """
    module = _module(name)
    dist_info = "%s-%s.dist-info" % (_escaped(name), version)
    path = os.path.join(os.fspath(dest_dir), wheel_filename(name, version))
    records = []
    tmp = path + ".part"
    with zipfile.ZipFile(tmp, "w") as zf:
        def put(arcname, data):
            zf.writestr(_zip_info(arcname), data)
            records.append("%s,%s,%d" % (arcname, _record_hash(hashlib.sha256(data).digest()), len(data)))

        put("%s/__init__.py" % module, _module_source(name, version))
        if pad_bytes:
            arcname = "%s/_padding.bin" % module
            info = _zip_info(arcname, zipfile.ZIP_STORED)
            info.file_size = pad_bytes
            digest = hashlib.sha256()
            with zf.open(info, "w", force_zip64=pad_bytes >= (1 << 31)) as out:
                for chunk in _padding_chunks(pad_bytes, seed):
                    out.write(chunk)
                    digest.update(chunk)
            records.append("%s,%s,%d" % (arcname, _record_hash(digest.digest()), pad_bytes))
        put("%s/METADATA" % dist_info, core_metadata(name, version, requires, requires_python, summary))
        put("%s/WHEEL" % dist_info, WHEEL_FILE)
        records.append("%s/RECORD,," % dist_info)
        zf.writestr(_zip_info("%s/RECORD" % dist_info), ("\n".join(records) + "\n").encode())
    os.replace(tmp, path)
    return path


def read_wheel_metadata(path) -> bytes:
    """The ``*.dist-info/METADATA`` member of a wheel."""
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if len(names) != 1:
            raise ValueError("%s: expected one .dist-info/METADATA, found %r" % (path, names))
        return zf.read(names[0])


# The build backend shipped inside every sdist: standard library only, so
# `pip install --no-binary` and `uv pip install --no-binary` work offline.
_BACKEND = '''\
"""In-tree PEP 517 backend of a fake PyPI sdist: packs %(module)s/ into a wheel."""
import base64
import hashlib
import os
import zipfile

MODULE = %(module)r
DIST = %(dist)r
WHEEL = %(wheel)r


def get_requires_for_build_wheel(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with open("PKG-INFO", "rb") as fh:
        metadata = fh.read()
    members = []
    for folder, dirs, files in os.walk(MODULE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        members += [os.path.join(folder, f).replace(os.sep, "/") for f in sorted(files)]
    members = [(m, open(m, "rb").read()) for m in members]
    members += [(DIST + ".dist-info/METADATA", metadata), (DIST + ".dist-info/WHEEL", WHEEL.encode())]
    record = []
    filename = DIST + "-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, filename), "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append("%%s,sha256=%%s,%%d" %% (name, digest, len(data)))
        record.append(DIST + ".dist-info/RECORD,,")
        zf.writestr(DIST + ".dist-info/RECORD", "\\n".join(record) + "\\n")
    return filename
'''

_PYPROJECT = b"""\
[build-system]
requires = []
build-backend = "_fakepypi_backend"
backend-path = ["."]
"""


def build_sdist(dest_dir, name, version, *, requires=(), requires_python=None, summary=None) -> str:
    """Write a deterministic ``.tar.gz`` sdist (PKG-INFO, pyproject.toml, the
    module and a standard-library build backend); return its path."""
    module = _module(name)
    dist = "%s-%s" % (_escaped(name), version)
    members = [
        ("PKG-INFO", core_metadata(name, version, requires, requires_python, summary)),
        ("pyproject.toml", _PYPROJECT),
        ("_fakepypi_backend.py",
         (_BACKEND % {"module": module, "dist": dist, "wheel": WHEEL_FILE.decode()}).encode()),
        ("%s/__init__.py" % module, _module_source(name, version)),
    ]
    path = os.path.join(os.fspath(dest_dir), dist + ".tar.gz")
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for member, data in members:
                info = tarfile.TarInfo("%s/%s" % (dist, member))
                info.size = len(data)
                info.mtime = EPOCH
                info.mode = 0o644
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    with open(path + ".part", "wb") as fh:
        fh.write(raw.getvalue())
    os.replace(path + ".part", path)
    return path


def _file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# The catalog


@dataclass
class DistFile:
    """One file of a release, on disk, with what the index says about it."""

    project: str  # normalised
    version: str
    filename: str
    kind: str  # "wheel" | "sdist"
    path: str
    size: int
    sha256: str
    requires_python: Optional[str] = None
    yanked: Union[bool, str] = False  # False, or the reason ("" = no reason given)
    metadata_path: Optional[str] = None  # the PEP 658 companion, if any
    metadata_sha256: Optional[str] = None
    upload_time: float = EPOCH

    @property
    def url_path(self) -> str:
        h = self.sha256
        return "/packages/%s/%s/%s/%s" % (h[:2], h[2:4], h[4:], self.filename)

    def describe(self, files_base: str) -> dict:
        return {
            "filename": self.filename, "version": self.version, "kind": self.kind,
            "url": files_base + self.url_path, "size": self.size, "sha256": self.sha256,
            "metadata_sha256": self.metadata_sha256, "requires_python": self.requires_python,
            "yanked": self.yanked, "upload_time": _iso(self.upload_time),
        }


@dataclass
class Project:
    name: str  # as first added
    normalized: str
    files: List[DistFile] = field(default_factory=list)
    serial: int = 0
    last_modified: int = 0  # POSIX seconds

    def versions(self) -> List[str]:
        return sorted({f.version for f in self.files}, key=_version_key)


# ---------------------------------------------------------------------------
# HTTP helpers


def _parse_qualities(value: str) -> List[Tuple[str, float]]:
    out = []
    for item in value.split(","):
        bits = [b.strip() for b in item.split(";")]
        if not bits[0]:
            continue
        q = 1.0
        for b in bits[1:]:
            key, _, val = b.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(val)
                except ValueError:
                    q = 0.0
        out.append((bits[0].lower(), q))
    return out


_OFFERS = (TEXT_HTML, HTML_V1, JSON_V1)  # on equal q the earlier wins (PyPI's order)
_ALIASES = {
    "application/vnd.pypi.simple.latest+json": JSON_V1,
    "application/vnd.pypi.simple.latest+html": HTML_V1,
}


def negotiate(accept: Optional[str], strict: bool = True) -> Optional[str]:
    """The representation for an Accept header: one of TEXT_HTML, HTML_V1,
    JSON_V1, or None (406) when nothing is acceptable and ``strict``."""
    if accept is None or not accept.strip():
        return TEXT_HTML
    ranges = [(_ALIASES.get(t, t), q) for t, q in _parse_qualities(accept)]
    best, best_q = None, 0.0
    for offer in _OFFERS:
        major = offer.split("/")[0] + "/*"
        q, specificity = 0.0, -1
        for media, quality in ranges:
            rank = 2 if media == offer else 1 if media == major else 0 if media == "*/*" else -1
            if rank > specificity:
                q, specificity = quality, rank
        if q > best_q:
            best, best_q = offer, q
    if best is None and not strict:
        return TEXT_HTML
    return best


def _accepts_gzip(value: Optional[str]) -> bool:
    return any(c in ("gzip", "*") and q > 0 for c, q in _parse_qualities(value or ""))


def _etag_matches(header_value: str, etag: str) -> bool:
    tags = [t.strip() for t in header_value.split(",")]
    return "*" in tags or any((t[2:] if t.startswith("W/") else t) == etag for t in tags)


def _not_modified(request, etag: str, last_modified: int) -> bool:
    inm = _header(request, "if-none-match")
    if inm is not None:
        return _etag_matches(inm, etag)
    ims = _header(request, "if-modified-since")
    if ims:
        try:
            since = email.utils.parsedate_to_datetime(ims).timestamp()
        except (TypeError, ValueError):
            return False
        return last_modified <= since
    return False


def _header(request, name: str) -> Optional[str]:
    value = request.getHeader(name)
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _send(request, status: int, body: bytes = b"", content_type: Optional[str] = "text/plain; charset=utf-8",
          headers: Iterable[Tuple[str, str]] = ()) -> None:
    request.setResponseCode(status)
    if content_type:
        request.setHeader("Content-Type", content_type)
    for name, value in headers:
        request.setHeader(name, str(value))
    if status == 304:
        request.finish()
        return
    request.setHeader("Content-Length", str(len(body)))
    if request.method != b"HEAD" and body:
        request.write(body)
    request.finish()


def _send_status(request, status: int, headers=()) -> None:
    text = http.RESPONSES.get(status, b"Error").decode()
    _send(request, status, ("%d %s\n" % (status, text)).encode(), headers=headers)


def _send_json(request, status: int, obj) -> None:
    _send(request, status, json.dumps(obj, indent=1).encode(), "application/json")


@dataclass
class _Fault:
    mode: str = "normal"
    cut_after: int = 0
    retry_after: int = 1
    count: Optional[int] = None  # None: until changed
    only: Optional[str] = None  # substring of the path
    corrupt_at: Optional[int] = None  # None: the middle of the file

    def public(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------


class FakePyPI(Listening):
    """A fake PyPI index plus file host (see the module docstring)."""

    def __init__(self, workdir=None, *, html_only=False, same_host=False, gzip_index=False, strict_accept=True,
                 catalog=True, reactor=None):
        self._own_workdir = workdir is None
        self.workdir = tempfile.mkdtemp(prefix="fakepypi-") if workdir is None else os.fspath(workdir)
        os.makedirs(os.path.join(self.workdir, "files"), exist_ok=True)
        self.html_only = html_only
        self.same_host = same_host
        self.gzip_index = gzip_index
        self.strict_accept = strict_accept
        self._init_listening(reactor)
        self.projects: Dict[str, Project] = {}
        self._paths: Dict[str, Tuple[DistFile, bool]] = {}  # url path -> (file, is the .metadata)
        self._serial = 0
        self.requests: List[dict] = []
        self.faults = {t: _Fault() for t in TARGETS}
        self._hung: List = []
        self.index_base: Optional[str] = None  # http://127.0.0.1:N
        self.files_url: Optional[str] = None  # http://127.0.0.2:M
        if catalog:
            for i, (project, version, options) in enumerate(CATALOG):
                self.add_release(project, version, upload_time=EPOCH + i * 86400, **options)
        self._start_state = self._snapshot()

    # -- listening ---------------------------------------------------------

    @property
    def index_url(self) -> Optional[str]:
        """The URL clients take as --index-url: ``http://127.0.0.1:N/simple/``."""
        return None if self.index_base is None else self.index_base + "/simple/"

    def listen(self, reactor=None, index=("127.0.0.1", 0), files=("127.0.0.2", 0)) -> None:
        """Listen with both servers; (host, port) pairs, port 0 picks a free one."""
        if reactor is not None:
            self._reactor = reactor
        ip = self._listen(owner_site(self, "index"), index[0], index[1])
        fp = self._listen(owner_site(self, "files"), files[0], files[1])
        self.index_base = origin(index[0], ip)
        self.files_url = origin(files[0], fp)

    def close(self) -> defer.Deferred:
        """Stop listening, drop every connection, remove the temp dir we made."""
        self._release_hung()

        def cleanup(_):
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

        return self._shut().addCallback(cleanup)

    # -- the catalog -------------------------------------------------------

    def add_release(self, project: str, version: str, *, requires=(), requires_python=None,
                    yanked: Union[bool, str] = False, wheel=True, sdist=False, metadata_file=True,
                    pad_bytes=0, upload_time: Optional[float] = None) -> List[DistFile]:
        """Build and publish a release; it is on the next page load.

        ``yanked``: False, True (no reason) or the reason.  ``metadata_file``:
        publish the wheel's PEP 658 ``.metadata``.  ``pad_bytes``: make the
        wheel that much bigger (see build_wheel; blocks while writing).
        """
        # a folder of its own: re-adding a file name must not overwrite a file the start catalog serves
        folder = os.path.join(self.workdir, "files", "%d-%s-%s" % (self._serial + 1, normalize(project), version))
        os.makedirs(folder, exist_ok=True)
        out = []
        if wheel:
            path = build_wheel(folder, project, version, requires=requires, requires_python=requires_python,
                               pad_bytes=pad_bytes)
            out.append(self.add_dist(project, path, version=version, requires_python=requires_python,
                                     yanked=yanked, metadata=metadata_file, upload_time=upload_time))
        if sdist:
            path = build_sdist(folder, project, version, requires=requires, requires_python=requires_python)
            out.append(self.add_dist(project, path, version=version, requires_python=requires_python,
                                     yanked=yanked, upload_time=upload_time))
        return out

    def add_dist(self, project: str, path, *, version=None, requires_python=None, yanked=False,
                 metadata: Union[bool, bytes] = False, upload_time: Optional[float] = None,
                 sha256: Optional[str] = None) -> DistFile:
        """Publish a file already on disk (e.g. a big wheel built once and kept).

        ``metadata``: True to publish the wheel's own METADATA as the PEP 658
        companion, or the bytes to publish (a lie on purpose), or False.
        ``sha256``: the file's hash if known (hashing 2 GiB takes seconds here).
        """
        path = os.path.abspath(os.fspath(path))
        filename = os.path.basename(path)
        if version is None:  # <name>-<version>-<tags>.whl or <name>-<version>.tar.gz
            rest = filename[len(_escaped(project)) + 1:]
            version = rest[:-len(".tar.gz")] if rest.endswith(".tar.gz") else rest.split("-")[0]
        kind = "wheel" if filename.endswith(".whl") else "sdist"
        meta_path = meta_sha = None
        if metadata is True and kind == "wheel":
            metadata = read_wheel_metadata(path)
        if isinstance(metadata, (bytes, bytearray)):
            meta_path = path + ".metadata"
            with open(meta_path, "wb") as fh:
                fh.write(metadata)
            meta_sha = hashlib.sha256(metadata).hexdigest()
        if yanked is True:
            yanked = ""
        dist = DistFile(
            project=normalize(project), version=version, filename=filename, kind=kind, path=path,
            size=os.path.getsize(path), sha256=sha256 or _file_sha256(path), requires_python=requires_python,
            yanked=yanked, metadata_path=meta_path, metadata_sha256=meta_sha,
            upload_time=time.time() if upload_time is None else upload_time,
        )
        proj = self.projects.get(dist.project)
        if proj is None:
            proj = self.projects[dist.project] = Project(project, dist.project)
        proj.files = [f for f in proj.files if f.filename != filename] + [dist]
        self._paths[dist.url_path] = (dist, False)
        if meta_path:
            self._paths[dist.url_path + ".metadata"] = (dist, True)
        self._touch(proj, dist.upload_time)
        return dist

    def yank(self, project: str, version: str, reason: Union[bool, str] = True) -> None:
        """Yank (reason: True or a string) or un-yank (reason=False) a release."""
        proj = self.projects[normalize(project)]
        files = [f for f in proj.files if f.version == version]
        if not files:
            raise KeyError("%s has no version %s" % (project, version))
        for f in files:
            f.yanked = "" if reason is True else reason
        self._touch(proj, time.time())

    def dist(self, filename: str) -> DistFile:
        for proj in self.projects.values():
            for f in proj.files:
                if f.filename == filename:
                    return f
        raise KeyError(filename)

    def file_url(self, filename: str) -> str:
        return self._files_base() + self.dist(filename).url_path

    def _touch(self, proj: Project, when: float) -> None:
        self._serial += 1
        proj.serial = self._serial
        # strictly later than before, so If-Modified-Since never hides a change
        proj.last_modified = max(int(when), proj.last_modified + 1)

    def _snapshot(self) -> Dict[str, Tuple[str, List[DistFile], List[Union[bool, str]]]]:
        return {k: (p.name, list(p.files), [f.yanked for f in p.files]) for k, p in self.projects.items()}

    def _restore(self) -> None:
        """Back to the start catalog; projects that changed look changed again (new serial, later
        Last-Modified), the others keep their validators."""
        current = self._snapshot()
        projects = {}
        for key, (name, files, yanks) in self._start_state.items():
            proj = self.projects.get(key)
            for f, yanked in zip(files, yanks):
                f.yanked = yanked
            if proj is None:
                proj = Project(name, key)
            changed = current.get(key) != (name, files, yanks)
            proj.files = list(files)
            if changed:
                self._touch(proj, time.time())
            projects[key] = proj
        self.projects = projects
        self._paths = {}
        for proj in projects.values():
            for f in proj.files:
                self._paths[f.url_path] = (f, False)
                if f.metadata_path:
                    self._paths[f.url_path + ".metadata"] = (f, True)

    # -- faults and the log ------------------------------------------------

    def set_fault(self, mode: str = "normal", target: str = "both", *, cut_after: int = 0, retry_after: int = 1,
                  count: Optional[int] = None, only: Optional[str] = None, corrupt_at: Optional[int] = None) -> None:
        """Make ``target`` ("index", "files", "both") misbehave; see the module docstring."""
        if mode not in FAULT_MODES:
            raise ValueError("unknown fault mode %r" % (mode,))
        targets = TARGETS if target == "both" else (target,)
        if any(t not in TARGETS for t in targets):
            raise ValueError("unknown target %r" % (target,))
        for t in targets:
            self.faults[t] = _Fault(mode, int(cut_after), int(retry_after), None if count is None else int(count),
                                    only, None if corrupt_at is None else int(corrupt_at))
        if mode != "hang":
            self._release_hung(targets)

    def reset(self, catalog: bool = False) -> None:
        """Forget the log, clear the faults; ``catalog``: back to the start catalog."""
        del self.requests[:]
        self.set_fault("normal")
        if catalog:
            self._restore()

    def count(self, path: str, method: Optional[str] = "GET", server_name: Optional[str] = None) -> int:
        """Logged requests for ``path`` (query ignored); method=None: any."""
        return sum(1 for r in self.requests
                   if r["path"].split("?", 1)[0] == path and method in (None, r["method"])
                   and server_name in (None, r["server"]))

    def state(self) -> dict:
        return {
            "html_only": self.html_only, "same_host": self.same_host, "gzip_index": self.gzip_index,
            "strict_accept": self.strict_accept,
            "faults": {t: f.public() for t, f in self.faults.items()},
            "request_count": len(self.requests),
        }

    def info(self) -> dict:
        base = self._files_base()
        return {
            "index": self.index_url, "files": self.files_url,
            "projects": {
                key: {"name": p.name, "serial": p.serial, "versions": p.versions(),
                      "files": [f.describe(base) for f in p.files]}
                for key, p in sorted(self.projects.items())
            },
        }

    def _release_hung(self, targets=TARGETS) -> None:
        keep = []
        for server_name, request in self._hung:
            if server_name not in targets:
                keep.append((server_name, request))
            elif not request.finished and not request._disconnected and request.channel is not None:
                request.channel.transport.loseConnection()
        self._hung = keep

    def _log(self, request, server_name: str) -> dict:
        headers = request_headers(request)
        entry = {
            "server": server_name, "host": headers.get("host"), "method": request.method.decode("latin-1"),
            "path": request.uri.decode("latin-1"), "headers": headers, "status": None, "time": time.time(),
        }
        return record_request(self.requests, request, entry)

    def _fault_for(self, server_name: str, path: str, is_file: bool) -> Optional[_Fault]:
        fault = self.faults[server_name]
        if fault.mode == "normal" or (fault.only is not None and fault.only not in path):
            return None
        if fault.mode in ("cut", "corrupt") and not is_file:
            return None
        if fault.count is not None:
            fault.count -= 1
            if fault.count <= 0:
                self.faults[server_name] = _Fault()
        return fault

    # -- requests ----------------------------------------------------------

    def _files_base(self) -> str:
        return (self.index_base if self.same_host else self.files_url) or ""

    def _handle(self, server_name: str, request) -> None:
        path = request.path.decode("latin-1")
        if path.startswith("/_fake/"):
            self._control(request, path)
            return
        self._log(request, server_name)
        serves_files = server_name == "files" or self.same_host
        is_file = serves_files and path.startswith("/packages/")
        fault = self._fault_for(server_name, path, is_file)
        if fault is not None:
            if fault.mode == "hang":
                self._hung.append((server_name, request))
                return
            if fault.mode == "down5xx":
                _send_status(request, 503)
                return
            if fault.mode == "429":
                _send_status(request, 429, [("Retry-After", str(fault.retry_after))])
                return
        if request.method not in (b"GET", b"HEAD"):
            _send_status(request, 405, [("Allow", "GET, HEAD")])
        elif is_file:
            self._serve_file(request, path, fault)
        elif server_name == "index" and (path == "/simple" or path.startswith("/simple/")):
            self._serve_index(request, path)
        else:
            _send_status(request, 404)

    def _redirect(self, request, location: str) -> None:
        _send(request, 301, ("Moved to %s\n" % location).encode(), headers=[("Location", location)])

    def _serve_index(self, request, path: str) -> None:
        if path == "/simple":
            self._redirect(request, "/simple/")
            return
        if path == "/simple/":
            proj = None
        else:
            m = re.fullmatch(r"/simple/([^/]+)(/?)", path)
            raw = unquote(m.group(1)) if m else None
            proj = self.projects.get(normalize(raw)) if raw else None
            if proj is None:
                _send_status(request, 404)
                return
            if raw != proj.normalized or not m.group(2):
                self._redirect(request, "/simple/%s/" % proj.normalized)
                return
        if self.html_only:
            ctype = TEXT_HTML
        else:
            ctype = negotiate(_header(request, "accept"), self.strict_accept)
        vary = [] if self.html_only else ["Accept"]
        if ctype is None:
            _send(request, 406, b"406 Not Acceptable: ask for %s\n" % ", ".join(_OFFERS).encode(),
                  headers=[("Vary", "Accept")])
            return
        if proj is None:
            body = self._render_list(ctype)
            serial = self._serial
            last_modified = max([p.last_modified for p in self.projects.values()] or [EPOCH])
        else:
            body = self._render_project(proj, ctype, path)
            serial, last_modified = proj.serial, proj.last_modified
        etag_seed = body
        headers = []
        if self.gzip_index:
            vary.append("Accept-Encoding")
            if _accepts_gzip(_header(request, "accept-encoding")):
                body = gzip.compress(body, mtime=0)
                headers.append(("Content-Encoding", "gzip"))
                etag_seed = body
        etag = '"%s"' % hashlib.sha256(etag_seed).hexdigest()[:32]
        headers += [("ETag", etag), ("Last-Modified", _http_date(last_modified)),
                    ("Cache-Control", INDEX_CACHE_CONTROL), ("X-PyPI-Last-Serial", str(serial))]
        if vary:
            headers.append(("Vary", ", ".join(vary)))
        if _not_modified(request, etag, last_modified):
            _send(request, 304, content_type=None, headers=headers)
            return
        full_type = ctype + ("; charset=utf-8" if ctype == TEXT_HTML else "")
        _send(request, 200, body, full_type, headers)

    def _render_list(self, ctype: str) -> bytes:
        projects = sorted(self.projects.values(), key=lambda p: p.normalized)
        if ctype == JSON_V1:
            return json.dumps({
                "meta": {"api-version": API_VERSION, "_last-serial": self._serial},
                "projects": [{"name": p.name, "_last-serial": p.serial} for p in projects],
            }).encode()
        links = "".join('    <a href="/simple/%s/">%s</a>\n' % (p.normalized, html.escape(p.name))
                        for p in projects)
        return _html_page("Simple index", links)

    def _render_project(self, proj: Project, ctype: str, page_path: str) -> bytes:
        if self.same_host:
            # relative to /simple/<name>/, as static mirrors write them
            url_of = lambda f: "../.." + f.url_path  # noqa: E731
        else:
            url_of = lambda f: self.files_url + f.url_path  # noqa: E731
        if ctype == JSON_V1:
            files = []
            for f in proj.files:
                entry = {"filename": f.filename, "url": url_of(f), "hashes": {"sha256": f.sha256}}
                if f.requires_python:
                    entry["requires-python"] = f.requires_python
                if f.metadata_sha256:
                    entry["core-metadata"] = {"sha256": f.metadata_sha256}
                entry["yanked"] = (f.yanked or True) if f.yanked is not False else False
                entry["size"] = f.size
                entry["upload-time"] = _iso(f.upload_time)
                files.append(entry)
            return json.dumps({
                "meta": {"api-version": API_VERSION, "_last-serial": proj.serial},
                "name": proj.normalized, "files": files, "versions": proj.versions(),
            }).encode()
        links = []
        for f in proj.files:
            attrs = ['href="%s"' % html.escape("%s#sha256=%s" % (url_of(f), f.sha256))]
            if f.requires_python:
                attrs.append('data-requires-python="%s"' % html.escape(f.requires_python))
            if f.yanked is not False:
                attrs.append('data-yanked="%s"' % html.escape(f.yanked))
            if f.metadata_sha256:
                attrs.append('data-core-metadata="sha256=%s"' % f.metadata_sha256)
                attrs.append('data-dist-info-metadata="sha256=%s"' % f.metadata_sha256)
            links.append("    <a %s>%s</a><br />\n" % (" ".join(attrs), html.escape(f.filename)))
        return _html_page("Links for %s" % proj.normalized, "".join(links))

    def _serve_file(self, request, path: str, fault: Optional[_Fault]) -> None:
        found = self._paths.get(unquote(path))
        if found is None:
            _send_status(request, 404)
            return
        dist, is_metadata = found
        disk = dist.metadata_path if is_metadata else dist.path
        size = os.path.getsize(disk)
        digest = dist.metadata_sha256 if is_metadata else dist.sha256
        etag = '"%s"' % digest[:32]
        headers = [("Accept-Ranges", "bytes"), ("ETag", etag), ("Last-Modified", _http_date(dist.upload_time)),
                   ("Cache-Control", FILE_CACHE_CONTROL)]
        if _not_modified(request, etag, int(dist.upload_time)):
            _send(request, 304, content_type=None, headers=headers)
            return
        start, length, status = 0, size, 200
        wanted = _header(request, "range")
        if_range = _header(request, "if-range")
        if wanted and if_range is not None and if_range.strip() not in (etag, _http_date(dist.upload_time)):
            wanted = None  # the client's copy is another file: send this one whole
        rng = _parse_range(wanted, size) if wanted else None  # None: no (usable) range
        if rng == "unsatisfiable":
            _send(request, 416, b"", None, headers + [("Content-Range", "bytes */%d" % size)])
            return
        if rng is not None:
            start, length = rng
            status = 206
            headers.append(("Content-Range", "bytes %d-%d/%d" % (start, start + length - 1, size)))
        request.setResponseCode(status)
        request.setHeader("Content-Type", "application/octet-stream")
        for name, value in headers:
            request.setHeader(name, value)
        request.setHeader("Content-Length", str(length))
        if request.method == b"HEAD" or length == 0:
            request.finish()
            return
        cut = fault.cut_after if fault is not None and fault.mode == "cut" else None
        corrupt = None
        if fault is not None and fault.mode == "corrupt":
            corrupt = size // 2 if fault.corrupt_at is None else min(fault.corrupt_at, size - 1)
        FileBody(request, lambda: open(disk, "rb"), start, length, cut=cut, corrupt_at=corrupt).start()  # pumps at once

    # -- control -----------------------------------------------------------

    def _control(self, request, path: str) -> None:
        sub = path[len("/_fake/"):].strip("/")
        method = request.method
        query = parse_qs(request.uri.decode("latin-1").partition("?")[2])
        try:
            body = json.loads(request.content.read() or b"{}") if method == b"POST" else {}
            if sub == "requests" and method == b"GET":
                _send_json(request, 200, self.requests)
            elif sub == "reset" and method == b"POST":
                self.reset(catalog=query.get("catalog", ["0"])[0] not in ("0", "", "false"))
                _send_json(request, 200, {"ok": True})
            elif sub == "fault" and method == b"POST":
                self.set_fault(**body)
                _send_json(request, 200, self.state())
            elif sub == "release" and method == b"POST":
                project, version = body.pop("project"), body.pop("version")
                files = self.add_release(project, version, **body)
                _send_json(request, 200, [f.describe(self._files_base()) for f in files])
            elif sub == "dist" and method == b"POST":
                project, path = body.pop("project"), body.pop("path")
                dist = self.add_dist(project, path, **body)
                _send_json(request, 200, dist.describe(self._files_base()))
            elif sub == "yank" and method == b"POST":
                self.yank(body["project"], body["version"], body.get("reason", True))
                _send_json(request, 200, {"ok": True})
            elif sub == "options" and method == b"POST":
                for key in ("html_only", "same_host", "gzip_index", "strict_accept"):
                    if key in body:
                        setattr(self, key, bool(body.pop(key)))
                if body:
                    raise TypeError("unknown options: %s" % ", ".join(sorted(body)))
                _send_json(request, 200, self.state())
            elif sub == "state" and method == b"GET":
                _send_json(request, 200, self.state())
            elif sub == "info" and method == b"GET":
                _send_json(request, 200, self.info())
            else:
                _send_json(request, 404, {"error": "unknown control route %s %s" % (method.decode(), path)})
        except (KeyError, TypeError, ValueError) as exc:
            _send_json(request, 400, {"error": "%s: %s" % (type(exc).__name__, exc)})


def _html_page(title: str, links: str) -> bytes:
    return (
        "<!DOCTYPE html>\n<html>\n  <head>\n"
        '    <meta name="pypi:repository-version" content="%s">\n'
        "    <title>%s</title>\n  </head>\n  <body>\n    <h1>%s</h1>\n%s  </body>\n</html>\n"
        % (API_VERSION, html.escape(title), html.escape(title), links)
    ).encode()


# ---------------------------------------------------------------------------
# standalone process


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fakepypi", description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=host_port, default=("127.0.0.1", 0), help="HOST:PORT of the index")
    ap.add_argument("--files", type=host_port, default=("127.0.0.2", 0), help="HOST:PORT of the file host")
    ap.add_argument("--ready-file", help="write the JSON urls here once both servers listen")
    ap.add_argument("--workdir", help="build the distributions here (default: a temp dir, removed at exit)")
    ap.add_argument("--html-only", action="store_true", help="always answer text/html")
    ap.add_argument("--same-host", action="store_true", help="serve files from the index host, relative URLs")
    ap.add_argument("--gzip-index", action="store_true", help="gzip index pages when the client accepts it")
    ap.add_argument("--lenient-accept", action="store_true", help="text/html instead of 406 (as PyPI)")
    args = ap.parse_args(argv)

    from twisted.internet import reactor

    pypi = FakePyPI(args.workdir, html_only=args.html_only, same_host=args.same_host,
                    gzip_index=args.gzip_index, strict_accept=not args.lenient_accept, reactor=reactor)
    try:
        pypi.listen(reactor, index=args.index, files=args.files)
        line = json.dumps({"index": pypi.index_url, "files": pypi.files_url})
        if args.ready_file:
            write_ready(args.ready_file, line + "\n")
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        reactor.run()
    finally:
        if pypi._own_workdir:
            shutil.rmtree(pypi.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
