"""A fake, signed Debian mirror for the apt backend tests.

Two parts:

``AptRepo``   builds a real repository with the Debian tools: tiny ``.deb``
              files made by ``dpkg-deb``, ``Packages`` (+ .gz, .xz) and
              ``Release`` made by ``apt-ftparchive``, ``Translation-en``,
              ``InRelease`` and ``Release.gpg`` signed by ``gpg`` with a
              throwaway key (private GNUPGHOME), whose public half is
              exported as a keyring file for apt.
``AptMirror`` serves that tree over HTTP (twisted.web) on 127.0.0.1, plus a
              second listener on 127.0.0.2 used by the ``redirect`` fault.

In-process use (same reactor as the code under test)::

    repo = AptRepo(tmp_path / "repo", by_hash=True).build()
    mirror = AptMirror(repo)
    mirror.listen()                 # ephemeral ports; sets mirror.url, .url2
    ...                             # mirror.url == "http://127.0.0.1:N/debian"
    yield mirror.close()
    repo.close()                    # stops the gpg-agent of the private GNUPGHOME

apt-get is a subprocess: from a pytest-twisted test run it with
``threads.deferToThread`` so the reactor keeps serving.  Publishing runs
dpkg-deb / apt-ftparchive / gpg synchronously (a fraction of a second; seconds
for a big .deb), blocking the reactor meanwhile.

Standalone use::

    python -m tests.fakeapt --listen 127.0.0.1:0 --ready-file PATH [--by-hash]
        [--second 127.0.0.2:0] [--dir DIR] [--suite bookworm] [--big-size N]

writes ``{"url": "http://127.0.0.1:N/debian", "keyring": PATH, "suite":
"bookworm", ...}`` to PATH (atomically) and as one line on stdout.

The repository (``<dir>/www/debian``, served as ``/debian``)::

    pool/main/v/vault-hello/vault-hello_1.0_all.deb   Depends: vault-lib (>= 1.0)
    pool/main/v/vault-lib/vault-lib_1.0_all.deb
    pool/main/v/vault-extra/vault-extra_1.0_all.deb   independent
    dists/bookworm/{InRelease,Release,Release.gpg}    MD5Sum + SHA256 only
    dists/bookworm/main/binary-amd64/Packages{,.gz,.xz}
    dists/bookworm/main/i18n/Translation-en{,.xz}
    .../by-hash/{MD5Sum,SHA256}/<hex>                 with by_hash=True (and
                                                       Acquire-By-Hash: yes)

Publishing a new version (``AptRepo.publish``) copies files into the served
tree step by step, each file replaced atomically.  order="mirror" is the
order of a real mirror sync (ftpsync stage 1 then stage 2): ``pool`` (new
.debs), ``by-hash`` (new by-hash objects; old ones stay), ``indexes``
(Packages*, Translation-*), ``release`` (Release, Release.gpg), ``inrelease``.
order="swapped" is the reverse.  ``stop_after=STEP`` leaves the remaining
steps pending until ``finish()``: a client that updates in between meets the
classic "Hash Sum mismatch" window (InRelease and Packages out of step; apt
2.6 says "Hash Sum mismatch" when the sizes agree and "File has unexpected
size (N != M). Mirror sync in progress?" when they do not).  With by-hash, the
mirror order is safe; swapped, apt gets a 404 on the new by-hash name, falls
back to the plain name and fails the same way.
Every publication gets a Last-Modified one second or more after the previous
one, so If-Modified-Since never hides a change.

The mirror: GET and HEAD, Last-Modified (file mtime) and ETag, 304 on
If-None-Match / If-Modified-Since, one byte range (206, 416) with If-Range
(ETag or date), keep-alive and pipelining (twisted.web answers in order), and
absolute-form request targets (``GET http://any.host/debian/...``: it answers
them from the same tree whatever the host, so apt's proxy setting can point at
it; one naming the 127.0.0.2 listener's host:port is treated as a request to
that listener, so a redirect followed through the proxy does not loop).

Control routes (primary listener only; never logged, never affected by the
fault modes):

* ``GET  /_fake/requests``  every request both listeners got since start or the
  last reset: ``{"server": "primary"|"secondary", "method", "target" (the raw
  request target), "path" (without scheme and host), "absolute" (bool),
  "headers" (lower-cased names), "status" (None while unanswered or when
  aborted), "conn" (connection number), "pipelined" (requests received on that
  connection and not yet answered when this one started, itself included),
  "sent" (body bytes written), "time"}`` plus ``"aborted": true`` when the
  connection closed before the response ended.
* ``POST /_fake/reset[?modes=1]``  clears the log (and sets both listeners
  back to mode normal, no throttle).
* ``POST /_fake/mode``  JSON ``{"mode": MODE, "target": "primary"|"secondary"|
  "both" (default primary), "paths": glob or null, "times": int or null,
  "cut_after_bytes": int or null, "throttle_bps": int or null}``; only the
  given keys change.  MODE is one of
    ``normal``
    ``down5xx``   503 for every matching request
    ``hang``      accept and never answer (leaving "hang" closes them)
    ``cut``       full Content-Length, then close after ``cut_after_bytes``
                  body bytes (default: half the body)
    ``corrupt``   same size, one byte in the middle flipped (default paths
                  ``*.deb``; consistent across ranges)
    ``redirect``  302 to the same path on the 127.0.0.2 listener (default
                  paths ``*/pool/*``)
    ``reset``     TCP reset instead of an answer
  ``paths`` is an fnmatch pattern on the path (default ``*`` except as noted);
  ``times`` limits how many requests the fault hits (then normal again).
* ``GET  /_fake/state``    modes, urls, keyring, suite, by_hash, pending
  publish steps and the current packages (version, filename, size, sha256).
* ``POST /_fake/publish``  JSON ``{"package", "version", "order": "mirror"|
  "swapped", "stop_after": STEP|null, "depends": str|null}``; answers the state
  with ``"applied"``.
* ``POST /_fake/finish``   applies the pending steps.
* ``POST /_fake/big``      JSON ``{"package": "vault-big", "size": N,
  "version": "1.0"}``: a big incompressible .deb (see ``make_big_deb``),
  published at once.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import itertools
import json
import lzma
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from email.utils import formatdate
from typing import Any, Dict, List, Optional
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.internet import defer
from twisted.web import http, server

from tests.fakeserve import (FileBody, Listening, TrackedChannel, host_port, origin, owner_site, record_request, reply,
                             request_headers, write_ready)

__all__ = ["AptRepo", "AptMirror", "make_big_deb", "missing_tools", "STEPS", "DEFAULT_PACKAGES"]

TOOLS = ("dpkg-deb", "apt-ftparchive", "gpg", "gpgconf")
STEPS = ("pool", "by-hash", "indexes", "release", "inrelease")
MODES = ("normal", "down5xx", "hang", "cut", "corrupt", "redirect", "reset")
DEFAULT_PATHS = {"corrupt": "*.deb", "redirect": "*/pool/*"}
CHUNK = 64 * 1024
PAYLOAD_BYTES = 16 * 1024  # incompressible bytes in each small .deb

#: name -> (Depends, short description, long description lines)
DEFAULT_PACKAGES = {
    "vault-lib": (None, "library for the vault tests",
                  ["A tiny package that vault-hello depends on."]),
    "vault-hello": ("vault-lib (>= 1.0)", "greeting for the vault tests",
                    ["A tiny package that says hello.", ".", "It depends on vault-lib."]),
    "vault-extra": (None, "an independent package for the vault tests",
                    ["Nothing depends on it, it depends on nothing."]),
}
BIG_DESCRIPTION = ("a big incompressible package for benchmarks", ["Random bytes, stored uncompressed."])


def missing_tools() -> List[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def _run(cmd, cwd=None, env=None, stdout=None) -> bytes:
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=stdout or subprocess.PIPE,
                          stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise RuntimeError("%s failed (%d): %s" % (" ".join(map(str, cmd)), proc.returncode,
                                                    proc.stderr.decode(errors="replace")))
    return proc.stdout or b""


def _file_hashes(path: str) -> Dict[str, str]:
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            md5.update(block)
            sha.update(block)
    return {"MD5Sum": md5.hexdigest(), "SHA256": sha.hexdigest()}


def _control(name: str, version: str, depends: Optional[str], short: str, long_lines: List[str],
             installed_kib: int) -> str:
    lines = ["Package: %s" % name, "Version: %s" % version, "Architecture: all",
             "Maintainer: Artifact Vault tests <apt@vault.invalid>"]
    if depends:
        lines.append("Depends: %s" % depends)
    lines += ["Section: misc", "Priority: optional", "Installed-Size: %d" % installed_kib,
              "Description: %s" % short]
    lines += [" " + line for line in long_lines]
    return "\n".join(lines) + "\n"


def _pool_path(name: str, version: str, component: str = "main") -> str:
    prefix = name[:4] if name.startswith("lib") else name[0]
    return "pool/%s/%s/%s/%s_%s_all.deb" % (component, prefix, name, name, version)


def make_big_deb(path: str, size: int, name: str = "vault-big", version: str = "1.0",
                 seed: int = 0) -> int:
    """Write a .deb of about ``size`` bytes (random, incompressible, stored with
    ``dpkg-deb -Znone``) to ``path``, streaming to disk; returns its real size
    (``size`` plus or minus a few KiB of ar/tar framing).
    """
    staging = tempfile.mkdtemp(prefix="fakeapt-big-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        payload = max(0, size - 12 * 1024)  # the framing of an uncompressed data.tar
        os.makedirs(os.path.join(staging, "DEBIAN"))
        blob_dir = os.path.join(staging, "usr", "share", name)
        os.makedirs(blob_dir)
        rng = random.Random("%s/%s/%d" % (name, version, seed))
        with open(os.path.join(blob_dir, "blob"), "wb") as fh:
            left = payload
            while left > 0:
                n = min(left, 4 << 20)
                fh.write(rng.randbytes(n))
                left -= n
        short, long_lines = BIG_DESCRIPTION
        with open(os.path.join(staging, "DEBIAN", "control"), "w") as fh:
            fh.write(_control(name, version, None, short, long_lines, (payload + 1023) // 1024))
        _run(["dpkg-deb", "--root-owner-group", "-Znone", "--build", staging, path])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return os.path.getsize(path)


def _split_stanzas(text: str) -> List[str]:
    return [s.strip("\n") for s in text.split("\n\n") if s.strip()]


def _field(stanza: str, name: str) -> Optional[str]:
    prefix = name + ":"
    for line in stanza.splitlines():
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    return None


# ---------------------------------------------------------------------------
# the repository


class AptRepo:
    """A signed repository under ``folder``: ``folder/www/debian`` is served,
    ``folder/work`` holds the pool of every .deb ever built and the staged
    next ``dists`` tree, ``folder/archive-keyring.gpg`` the public key."""

    def __init__(self, folder, suite: str = "bookworm", component: str = "main",
                 arch: str = "amd64", by_hash: bool = False, origin: str = "Vault Test"):
        missing = missing_tools()
        if missing:
            raise RuntimeError("missing tools: %s" % ", ".join(missing))
        self.folder = os.path.abspath(str(folder))
        self.suite, self.component, self.arch = suite, component, arch
        self.by_hash = by_hash
        self.origin = origin
        self.www = os.path.join(self.folder, "www")
        self.archive = os.path.join(self.www, "debian")
        self.work = os.path.join(self.folder, "work")
        self.keyring = os.path.join(self.folder, "archive-keyring.gpg")
        self.gnupghome: Optional[str] = None
        self.specs: Dict[str, tuple] = dict(DEFAULT_PACKAGES)
        self.versions: Dict[str, str] = {}
        self.pending: List[str] = []
        self.publications = 0
        self._new_debs: List[str] = []
        self._stamp = 0

    # -- setup ---------------------------------------------------------------

    def build(self) -> "AptRepo":
        """Make the key and the packages, and publish everything."""
        for d in (self.archive, self.work, os.path.join(self.work, "parts")):
            os.makedirs(d, exist_ok=True)
        with open(os.path.join(self.work, "apt.conf"), "w") as fh:
            # apt-ftparchive reads the apt configuration: keep /etc/apt out
            fh.write('Dir::Etc::parts "%s";\nDir::Etc::main "/dev/null";\n'
                     % os.path.join(self.work, "parts"))
        self.gnupghome = tempfile.mkdtemp(prefix="fakeapt-gpg-")  # short: the agent socket lives here
        self._gpg("--quick-gen-key", "Artifact Vault test archive <apt@vault.invalid>",
                  "ed25519", "sign", "never")
        with open(self.keyring, "wb") as fh:
            fh.write(self._gpg("--export"))
        for name in sorted(self.specs):
            self._build_deb(name, "1.0")
            self.versions[name] = "1.0"
        self._stage()
        self._begin()
        self._apply(list(self._order("mirror")))
        return self

    def close(self) -> None:
        """Stop the gpg-agent of the private GNUPGHOME and remove that home."""
        if self.gnupghome and os.path.isdir(self.gnupghome):
            subprocess.run(["gpgconf", "--homedir", self.gnupghome, "--kill", "gpg-agent"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            shutil.rmtree(self.gnupghome, ignore_errors=True)
        self.gnupghome = None

    # -- publishing ----------------------------------------------------------

    def publish(self, package: str, version: str, order: str = "mirror",
                stop_after: Optional[str] = None, depends: Optional[str] = None) -> List[str]:
        """Build ``package`` at ``version`` (new names allowed), regenerate and
        re-sign the indexes and copy them into the served tree in ``order``
        ("mirror" or "swapped"), up to and including ``stop_after``; returns the
        steps applied.  A pending publication is finished first."""
        if order not in ("mirror", "swapped"):
            raise ValueError("order must be 'mirror' or 'swapped'")
        steps = list(self._order(order))
        if stop_after is not None and stop_after not in steps:
            raise ValueError("stop_after must be one of %s" % steps)
        self.finish()
        if package not in self.specs:
            self.specs[package] = (depends, "%s for the vault tests" % package, ["Added by a test."])
        elif depends is not None:
            self.specs[package] = (depends,) + tuple(self.specs[package][1:])
        self._build_deb(package, version)
        self.versions[package] = version
        self._stage()
        self._begin()
        upto = len(steps) if stop_after is None else steps.index(stop_after) + 1
        self.pending = steps[upto:]
        return self._apply(steps[:upto])

    def finish(self) -> List[str]:
        """Apply the steps a partial publish left pending."""
        steps, self.pending = self.pending, []
        return self._apply(steps)

    def add_big(self, size: int, package: str = "vault-big", version: str = "1.0") -> str:
        """Add a big .deb (``make_big_deb``) and publish it fully; returns its pool path."""
        self.finish()
        rel = _pool_path(package, version, self.component)
        out = os.path.join(self.work, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        make_big_deb(out, size, package, version)
        self.specs.setdefault(package, (None,) + BIG_DESCRIPTION)
        self._new_debs.append(rel)
        self.versions[package] = version
        self._stage()
        self._begin()
        self._apply(list(self._order("mirror")))
        return os.path.join(self.archive, rel)

    def add_flat(self, name: str = "flat") -> str:
        """A signed flat repository (``deb URI ./``) of the current packages at ``www/<name>``:
        the .debs, Packages (+ .xz), Release and InRelease side by side.  Returns ``/<name>``,
        its path on the mirror."""
        top = os.path.join(self.www, name)
        os.makedirs(top, exist_ok=True)
        for package, info in self.packages().items():
            shutil.copyfile(os.path.join(self.archive, info["filename"]),
                            os.path.join(top, os.path.basename(info["filename"])))
        packages = _run(["apt-ftparchive", "-q", "packages", "."], cwd=top,
                        env=dict(os.environ, APT_CONFIG=os.path.join(self.work, "apt.conf")))
        self._write_index(os.path.join(top, "Packages"), packages.decode(), gz=False)
        release = _run(["apt-ftparchive", "-q", "-o", "APT::FTPArchive::Release::SHA1=false",
                        "-o", "APT::FTPArchive::Release::SHA512=false", "release", "."], cwd=top,
                       env=dict(os.environ, APT_CONFIG=os.path.join(self.work, "apt.conf")))
        with open(os.path.join(top, "Release"), "wb") as fh:
            fh.write(release)
        self._gpg("--digest-algo", "SHA512", "--clearsign", "-o", os.path.join(top, "InRelease"),
                  os.path.join(top, "Release"))
        return "/" + name

    # -- inspection ----------------------------------------------------------

    def packages(self) -> Dict[str, Dict[str, Any]]:
        """Current packages: name -> version, filename (under the archive), size, sha256."""
        out = {}
        for stanza in _split_stanzas(self._read_stage("Packages")):
            out[_field(stanza, "Package")] = {
                "version": _field(stanza, "Version"),
                "filename": _field(stanza, "Filename"),
                "size": int(_field(stanza, "Size")),
                "sha256": _field(stanza, "SHA256"),
                "depends": _field(stanza, "Depends"),
            }
        return out

    def deb_path(self, package: str, version: Optional[str] = None) -> str:
        """The file in the served pool (it exists once the 'pool' step ran)."""
        return os.path.join(self.archive, _pool_path(package, version or self.versions[package],
                                                      self.component))

    def info(self) -> Dict[str, Any]:
        return {"suite": self.suite, "component": self.component, "arch": self.arch,
                "by_hash": self.by_hash, "keyring": self.keyring, "root": self.www,
                "pending": list(self.pending), "publications": self.publications,
                "packages": self.packages()}

    def dists(self, *parts: str) -> str:
        return os.path.join(self.archive, "dists", self.suite, *parts)

    # -- internals -----------------------------------------------------------

    def _gpg(self, *args: str) -> bytes:
        return _run(["gpg", "--homedir", self.gnupghome, "--batch", "--quiet", "--yes",
                     "--pinentry-mode", "loopback", "--passphrase", ""] + list(args))

    def _ftparchive(self, *args: str) -> bytes:
        env = dict(os.environ, APT_CONFIG=os.path.join(self.work, "apt.conf"))
        return _run(["apt-ftparchive", "-q"] + list(args), cwd=self.work, env=env)

    def _order(self, order: str):
        steps = [s for s in STEPS if self.by_hash or s != "by-hash"]
        return steps if order == "mirror" else steps[::-1]

    def _build_deb(self, name: str, version: str) -> None:
        rel = _pool_path(name, version, self.component)
        out = os.path.join(self.work, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        staging = tempfile.mkdtemp(prefix="deb-", dir=self.work)
        try:
            doc = os.path.join(staging, "usr", "share", "doc", name)
            os.makedirs(doc)
            os.makedirs(os.path.join(staging, "DEBIAN"))
            with open(os.path.join(doc, "README"), "w") as fh:
                fh.write("%s %s, built for the Artifact Vault apt tests.\n" % (name, version))
            with open(os.path.join(doc, "payload.bin"), "wb") as fh:
                fh.write(random.Random("%s/%s" % (name, version)).randbytes(PAYLOAD_BYTES))
            depends, short, long_lines = self.specs[name]
            with open(os.path.join(staging, "DEBIAN", "control"), "w") as fh:
                fh.write(_control(name, version, depends, short, long_lines, PAYLOAD_BYTES // 1024 + 1))
            _run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", staging, out])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._new_debs.append(rel)

    def _stage_dir(self, *parts: str) -> str:
        return os.path.join(self.work, "dists", self.suite, *parts)

    def _read_stage(self, kind: str) -> str:
        rel = {"Packages": (self.component, "binary-" + self.arch, "Packages")}[kind]
        with open(self._stage_dir(*rel)) as fh:
            return fh.read()

    def _stage(self) -> None:
        """Regenerate and sign the next dists tree in work/dists."""
        shutil.rmtree(self._stage_dir(), ignore_errors=True)
        binary = self._stage_dir(self.component, "binary-" + self.arch)
        i18n = self._stage_dir(self.component, "i18n")
        os.makedirs(binary)
        os.makedirs(i18n)
        raw = self._ftparchive(
            "--db", "cache.db",
            "-o", "APT::FTPArchive::LongDescription=false",
            "-o", "APT::FTPArchive::Packages::SHA1=false",
            "-o", "APT::FTPArchive::Packages::SHA512=false",
            "packages", "pool/%s" % self.component).decode()
        current = {(name, version) for name, version in self.versions.items()}
        stanzas = sorted((s for s in _split_stanzas(raw)
                          if (_field(s, "Package"), _field(s, "Version")) in current),
                         key=lambda s: _field(s, "Package"))
        self._write_index(os.path.join(binary, "Packages"), "\n\n".join(stanzas) + "\n")
        translations = []
        for s in stanzas:
            name = _field(s, "Package")
            _, short, long_lines = self.specs[name]
            translations.append("Package: %s\nDescription-md5: %s\nDescription-en: %s\n%s" % (
                name, _field(s, "Description-md5"), short, "\n".join(" " + x for x in long_lines)))
        self._write_index(os.path.join(i18n, "Translation-en"), "\n\n".join(translations) + "\n",
                          gz=False)
        release = self._ftparchive(
            "-o", "APT::FTPArchive::Release::Origin=%s" % self.origin,
            "-o", "APT::FTPArchive::Release::Label=%s" % self.origin,
            "-o", "APT::FTPArchive::Release::Suite=%s" % self.suite,
            "-o", "APT::FTPArchive::Release::Codename=%s" % self.suite,
            "-o", "APT::FTPArchive::Release::Architectures=%s" % self.arch,
            "-o", "APT::FTPArchive::Release::Components=%s" % self.component,
            "-o", "APT::FTPArchive::Release::Description=Artifact Vault test archive",
            "-o", "APT::FTPArchive::Release::Acquire-By-Hash=%s" % ("yes" if self.by_hash else ""),
            "-o", "APT::FTPArchive::Release::Patterns::=Translation-*",
            "-o", "APT::FTPArchive::Release::SHA1=false",
            "-o", "APT::FTPArchive::Release::SHA512=false",
            "release", "dists/%s" % self.suite)
        top = self._stage_dir()
        with open(os.path.join(top, "Release"), "wb") as fh:
            fh.write(release)
        self._gpg("--digest-algo", "SHA512", "--clearsign", "-o", os.path.join(top, "InRelease"),
                  os.path.join(top, "Release"))
        self._gpg("--digest-algo", "SHA512", "--armor", "--detach-sign",
                  "-o", os.path.join(top, "Release.gpg"), os.path.join(top, "Release"))

    @staticmethod
    def _write_index(path: str, text: str, gz: bool = True) -> None:
        data = text.encode()
        with open(path, "wb") as fh:
            fh.write(data)
        if gz:
            with open(path + ".gz", "wb") as fh:
                fh.write(gzip.compress(data, 9, mtime=0))
        with open(path + ".xz", "wb") as fh:
            fh.write(lzma.compress(data, preset=6))

    def _index_files(self) -> List[str]:
        """Staged index files (Packages*, Translation-*), relative to the suite dir."""
        top = self._stage_dir()
        out = []
        for dirpath, _, names in os.walk(top):
            for n in names:
                if n.startswith(("Packages", "Translation-")):
                    out.append(os.path.relpath(os.path.join(dirpath, n), top))
        return sorted(out)

    def _begin(self) -> None:
        # one Last-Modified per publication, strictly after the previous one,
        # so If-Modified-Since (one-second resolution) never hides a change
        self._stamp = max(int(time.time()), self._stamp + 1)
        self.publications += 1

    def _put(self, src: str, dst: str) -> None:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = dst + ".tmp-publish"
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.utime(tmp, (self._stamp, self._stamp))
        os.replace(tmp, dst)

    def _apply(self, steps: List[str]) -> List[str]:
        if not steps:
            return []
        top = self._stage_dir()
        for step in steps:
            if step == "pool":
                for rel in self._new_debs:
                    src = os.path.join(self.work, rel)
                    # a pool file never changes: hard link, keep its build mtime
                    dst = os.path.join(self.archive, rel)
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    if not os.path.exists(dst):
                        try:
                            os.link(src, dst)
                        except OSError:
                            shutil.copy2(src, dst)
                self._new_debs = []
            elif step == "by-hash":
                for rel in self._index_files():
                    src = os.path.join(top, rel)
                    hashes = _file_hashes(src)
                    for kind in ("MD5Sum", "SHA256"):
                        dst = self.dists(os.path.dirname(rel), "by-hash", kind, hashes[kind])
                        if not os.path.exists(dst):
                            self._put(src, dst)
            elif step == "indexes":
                for rel in self._index_files():
                    self._put(os.path.join(top, rel), self.dists(rel))
            elif step == "release":
                for name in ("Release", "Release.gpg"):
                    self._put(os.path.join(top, name), self.dists(name))
            elif step == "inrelease":
                self._put(os.path.join(top, "InRelease"), self.dists("InRelease"))
        return steps


# ---------------------------------------------------------------------------
# the mirror server


class _Body(FileBody):
    """A body that keeps the bytes sent in its request log entry (``sent``)."""

    def __init__(self, mirror, request, entry, filename, start, length, **faults):
        super().__init__(request, lambda: open(filename, "rb"), start, length, slice_min=1024, slice_div=20,
                         chunk=CHUNK, reactor=mirror.reactor, live=mirror._bodies, **faults)
        self.entry = entry

    def _progress(self):
        self.entry["sent"] = self.sent


class _Channel(TrackedChannel):
    """Counts request heads as they arrive on the wire, to see pipelining."""

    def connectionMade(self):
        self.conn_id = next(self.site.owner._conn_ids)
        self.heads_seen = 0  # request heads received on the wire
        self.started = 0  # requests handed to the resource
        self._tail = b""
        self._replaying = False
        super().connectionMade()

    def dataReceived(self, data):
        if not self._replaying:  # fresh bytes from the socket
            buf = self._tail + data
            self.heads_seen += buf.count(b"\r\n\r\n")
            self._tail = buf[-3:]
        super().dataReceived(data)

    def setLineMode(self, extra=b""):
        # twisted.web feeds bytes it buffered during a request back through
        # dataReceived from here: they were counted when they arrived
        self._replaying = True
        try:
            return super().setLineMode(extra)
        finally:
            self._replaying = False


def _http_date(ts: float) -> str:
    return formatdate(ts, usegmt=True)


def _parse_range(value: Optional[str], size: int):
    """None (no usable single range: whole body), "unsatisfiable", or (start, length)."""
    if not value or "," in value:
        return None
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "-" not in spec:
        return None
    first, _, last = (p.strip() for p in spec.partition("-"))
    if not (first.isdigit() or first == "") or not (last.isdigit() or last == "") or first == last == "":
        return None
    if first == "":
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return (max(0, size - n), min(n, size))
    start = int(first)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    end = size - 1 if last == "" else min(int(last), size - 1)
    return (start, end - start + 1)


class AptMirror(Listening):
    """Serves an ``AptRepo``'s tree (see the module docstring)."""

    def __init__(self, repo: AptRepo, interface: str = "127.0.0.1", interface2: str = "127.0.0.2",
                 reactor=None):
        self.repo = repo
        self.interface, self.interface2 = interface, interface2
        self._init_listening(reactor)
        self.url: Optional[str] = None  # http://127.0.0.1:N/debian
        self.url2: Optional[str] = None  # the same tree on the second listener
        self.origin: Optional[str] = None
        self.origin2: Optional[str] = None
        self.requests: List[Dict[str, Any]] = []
        self.modes = {s: self._normal() for s in ("primary", "secondary")}
        self._hung: Dict[str, list] = {"primary": [], "secondary": []}
        self._bodies = set()
        self._conn_ids = itertools.count(1)

    @staticmethod
    def _normal():
        return {"mode": "normal", "paths": None, "times": None, "cut_after_bytes": None,
                "throttle_bps": None}

    def listen(self, port: int = 0, port2: int = 0) -> "AptMirror":
        p1 = self._listen(owner_site(self, "primary", _Channel), self.interface, port)
        p2 = self._listen(owner_site(self, "secondary", _Channel), self.interface2, port2)
        self.origin = origin(self.interface, p1)
        self.origin2 = origin(self.interface2, p2)
        self.url, self.url2 = self.origin + "/debian", self.origin2 + "/debian"
        return self

    def state(self) -> Dict[str, Any]:
        info = self.repo.info()
        info.update({"url": self.url, "url2": self.url2, "modes": json.loads(json.dumps(self.modes)),
                     "request_count": len(self.requests)})
        return info

    def set_mode(self, target: str = "primary", **opts) -> None:
        targets = ("primary", "secondary") if target == "both" else (target,)
        for t in targets:
            if t not in self.modes:
                raise ValueError("bad target %r" % target)
        if "mode" in opts and opts["mode"] not in MODES:
            raise ValueError("bad mode %r" % opts["mode"])
        unknown = set(opts) - set(self._normal())
        if unknown:
            raise ValueError("unknown keys %s" % sorted(unknown))
        for t in targets:
            self.modes[t].update(opts)
            if self.modes[t]["mode"] != "hang":
                for req in self._hung[t]:
                    if not req.finished and not req._disconnected:
                        req.channel.transport.loseConnection()
                self._hung[t] = []

    def reset(self, modes: bool = False) -> None:
        del self.requests[:]
        if modes:
            self.set_mode("both", **self._normal())

    def close(self) -> defer.Deferred:
        for body in list(self._bodies):
            body.close()
        return self._shut().addCallback(lambda _: None)

    # -- request handling ----------------------------------------------------

    def _log(self, name, request, target, path, absolute):
        headers = request_headers(request)
        channel = request.channel
        channel.started += 1  # twisted.web answers one request at a time, in order
        entry = {"server": name, "method": request.method.decode("latin-1"), "target": target,
                 "path": path, "absolute": absolute, "headers": headers, "status": None,
                 "conn": channel.conn_id, "pipelined": channel.heads_seen - channel.started + 1,
                 "sent": 0, "time": time.time()}
        return record_request(self.requests, request, entry, status_when_lost=False)

    def _handle(self, name, request):
        target = request.uri.decode("latin-1")
        absolute = target.lower().startswith(("http://", "https://"))
        netloc = None
        if absolute:
            parts = urlsplit(target)
            path, netloc = parts.path or "/", parts.netloc
        else:
            path = target.split("?", 1)[0]
        if name == "primary" and path.startswith("/_fake/"):
            try:
                return self._control(request, path, target)
            except Exception as exc:  # noqa: BLE001 - a control bug must answer, not hang
                request.setResponseCode(500)
                return _json(request, {"error": repr(exc)})
        entry = self._log(name, request, target, path, absolute)
        # a proxied request for the second listener (apt following the
        # redirect fault through its proxy) is served, not redirected again
        for_second = netloc is not None and netloc == self.origin2[len("http://"):]
        opts = self._fault("secondary" if for_second else name, path)
        mode = opts["mode"] if opts else "normal"
        if mode == "hang":
            self._hung[name].append(request)
            return server.NOT_DONE_YET
        if mode == "reset":
            transport = request.channel.transport
            try:
                transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                 struct.pack("ii", 1, 0))
            except (OSError, AttributeError):
                pass
            transport.abortConnection()
            return server.NOT_DONE_YET
        if mode == "down5xx":
            return _text(request, 503, "503 Service Unavailable (fake mirror down)\n")
        if mode == "redirect":
            request.setHeader("Location", self.origin2 + path)
            return _text(request, 302, "moved\n")
        return self._serve(request, path, entry, mode, self.modes[name])

    def _fault(self, name, path):
        opts = self.modes[name]
        mode = opts["mode"]
        if mode == "normal":
            return None
        pattern = opts["paths"] or DEFAULT_PATHS.get(mode, "*")
        if not fnmatch.fnmatchcase(path, pattern):
            return None
        if mode == "redirect" and name != "primary":
            return None
        if opts["times"] is not None:
            if opts["times"] <= 0:
                return None
            opts["times"] -= 1
        return opts

    def _serve(self, request, path, entry, mode, opts):
        method = request.method
        rel = os.path.normpath(unquote(path).lstrip("/"))
        if rel.startswith("..") or os.path.isabs(rel) or "\x00" in rel:
            return _text(request, 404, "not found\n")
        full = os.path.join(self.repo.www, rel)
        try:
            st = os.stat(full)
        except OSError:
            return _text(request, 404, "not found\n")
        if not os.path.isfile(full):
            return _text(request, 404, "not found\n")
        if method not in (b"GET", b"HEAD"):
            request.setHeader("Allow", "GET, HEAD")
            return _text(request, 405, "method not allowed\n")
        size = st.st_size
        mtime = int(st.st_mtime)
        etag = '"%x-%x-%x"' % (st.st_ino, size, st.st_mtime_ns)
        last_modified = _http_date(mtime)
        request.setHeader("Last-Modified", last_modified)
        request.setHeader("ETag", etag)
        request.setHeader("Accept-Ranges", "bytes")
        inm = request.getHeader("if-none-match")
        ims = request.getHeader("if-modified-since")
        not_modified = False
        if inm is not None:
            not_modified = "*" in inm or etag in [t.strip() for t in inm.split(",")]
        elif ims is not None:
            try:
                not_modified = mtime <= http.stringToDatetime(ims.encode("latin-1"))
            except Exception:  # noqa: BLE001 - an unparsable date is ignored
                not_modified = False
        if not_modified:
            request.setResponseCode(304)
            request.finish()
            return server.NOT_DONE_YET
        request.setHeader("Content-Type", _content_type(rel))
        start, length = 0, size
        rng = request.getHeader("range")
        if_range = request.getHeader("if-range")
        if rng and (if_range is None or if_range.strip() in (etag, last_modified)):
            parsed = _parse_range(rng, size)
            if parsed == "unsatisfiable":
                request.setHeader("Content-Range", "bytes */%d" % size)
                return _text(request, 416, "range not satisfiable\n")
            if parsed is not None:
                start, length = parsed
                request.setResponseCode(206)
                request.setHeader("Content-Range", "bytes %d-%d/%d" % (start, start + length - 1, size))
        request.setHeader("Content-Length", str(length))
        if method == b"HEAD" or length == 0:
            request.finish()
            return server.NOT_DONE_YET
        faults = {"throttle_bps": opts.get("throttle_bps"), "corrupt_at": size // 2 if mode == "corrupt" else None}
        if mode == "cut":
            cut = opts.get("cut_after_bytes")
            cut = length // 2 if cut is None else int(cut)
            if cut < length:
                faults["cut"] = cut
        _Body(self, request, entry, full, start, length, **faults).start()
        return server.NOT_DONE_YET

    # -- control -------------------------------------------------------------

    def _control(self, request, path, target):
        method = request.method
        query = parse_qs(target.split("?", 1)[1]) if "?" in target else {}
        body = request.content.read() if request.content is not None else b""
        try:
            doc = json.loads(body or b"{}")
        except ValueError:
            request.setResponseCode(400)
            return _json(request, {"error": "body must be JSON"})
        if path == "/_fake/requests" and method in (b"GET", b"HEAD"):
            return _json(request, self.requests)
        if path == "/_fake/state" and method in (b"GET", b"HEAD"):
            return _json(request, self.state())
        if path == "/_fake/reset" and method == b"POST":
            self.reset(modes=query.get("modes", ["0"])[0] not in ("0", "", "false"))
            return _json(request, {"ok": True})
        try:
            if path == "/_fake/mode" and method == b"POST":
                self.set_mode(**doc)
                return _json(request, self.state())
            if path == "/_fake/publish" and method == b"POST":
                applied = self.repo.publish(doc["package"], doc["version"], doc.get("order", "mirror"),
                                            doc.get("stop_after"), doc.get("depends"))
                return _json(request, dict(self.state(), applied=applied))
            if path == "/_fake/finish" and method == b"POST":
                return _json(request, dict(self.state(), applied=self.repo.finish()))
            if path == "/_fake/big" and method == b"POST":
                deb = self.repo.add_big(int(doc["size"]), doc.get("package", "vault-big"),
                                        doc.get("version", "1.0"))
                return _json(request, dict(self.state(), deb=deb))
        except (KeyError, TypeError, ValueError) as exc:
            request.setResponseCode(400)
            return _json(request, {"error": str(exc)})
        request.setResponseCode(404)
        return _json(request, {"error": "unknown control route"})


def _content_type(rel: str) -> str:
    name = os.path.basename(rel)
    if name.endswith(".deb"):
        return "application/vnd.debian.binary-package"
    if name.endswith(".gz"):
        return "application/gzip"
    if name.endswith(".xz"):
        return "application/x-xz"
    if name.endswith(".gpg"):
        return "application/pgp-signature"
    return "text/plain; charset=utf-8"


def _text(request, code: int, text: str):
    request.setResponseCode(code)
    return reply(request, text.encode(), "text/plain; charset=utf-8")


def _json(request, obj):
    return reply(request, json.dumps(obj).encode(), "application/json")


# ---------------------------------------------------------------------------
# standalone process


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fakeapt", description=__doc__.split("\n")[0])
    ap.add_argument("--listen", type=host_port, default=("127.0.0.1", 0), help="HOST:PORT")
    ap.add_argument("--second", type=host_port, default=("127.0.0.2", 0),
                    help="HOST:PORT of the listener the redirect fault points at")
    ap.add_argument("--ready-file", help="write the JSON description here once listening")
    ap.add_argument("--by-hash", action="store_true", help="Acquire-By-Hash: yes, with by-hash/ files")
    ap.add_argument("--suite", default="bookworm")
    ap.add_argument("--dir", help="build the repository here (default: a temporary directory)")
    ap.add_argument("--big-size", type=int, help="also publish vault-big, a .deb of about this many bytes")
    args = ap.parse_args(argv)

    from twisted.internet import reactor

    folder = args.dir or tempfile.mkdtemp(prefix="fakeapt-")
    repo = AptRepo(folder, suite=args.suite, by_hash=args.by_hash)
    try:
        repo.build()
        if args.big_size:
            repo.add_big(args.big_size)
        mirror = AptMirror(repo, interface=args.listen[0], interface2=args.second[0], reactor=reactor)
        mirror.listen(args.listen[1], args.second[1])
        payload = json.dumps({"url": mirror.url, "keyring": repo.keyring, "suite": repo.suite,
                              "component": repo.component, "arch": repo.arch, "url2": mirror.url2,
                              "by_hash": repo.by_hash, "root": repo.www})
        if args.ready_file:
            write_ready(args.ready_file, payload + "\n")
        sys.stdout.write(payload + "\n")
        sys.stdout.flush()
        signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))
        reactor.run(installSignalHandlers=False)
    finally:
        repo.close()
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
