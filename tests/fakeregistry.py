"""A fake OCI / Docker registry with a Docker-Hub-like token server and a blob CDN, for tests.

Three twisted.web servers: the registry (the read side of ``/v2/``), the token
server (``GET /token``, a separate port on the registry's interface, like
auth.docker.io next to registry-1.docker.io) and a CDN on 127.0.0.2 that
serves blobs by signed, expiring URLs when blob redirects are on.

In-process use (same reactor as the code under test)::

    reg = FakeRegistry(auth=True)          # default images, see default_images()
    reg.listen()                           # sets reg.url, reg.token_url, reg.cdn_url
    reg.ref("library/small", "1.0")        # "127.0.0.1:PORT/library/small:1.0"
    reg.put("acme/app", image({"a.txt": "v2"}), "2.0")
    reg.tag("library/small", "latest", reg.digest("library/small", "2.0"))
    reg.fault("429", match="/manifests/", retry_after=7)
    yield reg.close()

Standalone::

    python -m tests.fakeregistry --listen 127.0.0.1:0 --cdn 127.0.0.2:0 --ready-file PATH [--auth]
        [--token PORT] [--redirect] [--token-ttl S] [--pull-limit N]

writes ``{"url": ..., "cdn": ..., "token": ...}`` to PATH (atomically) and as one
line on stdout once all three listen.

Images are built here, deterministically: gzip'd tar layers, OCI / Docker
configs and manifests, OCI indexes and Docker manifest lists, referrer
artifacts, and big file-backed layers (``big_image``).  Digests are sha256 of
the exact bytes, and manifests are served byte-exact.  ``write_oci_layout`` /
``write_dir_layout`` put images on disk for skopeo (``oci:`` / ``dir:``).

All three ports answer a TLS ClientHello with an immediate 400, as Go servers
do: skopeo with --tls-verify=false tries https first and would otherwise wait
out its 10 s handshake timeout.  ``tls_attempts`` counts these per server.

Manifest negotiation follows distribution 2.8 (what registry:2 and Docker Hub
do): an OCI manifest or index is answered 404 MANIFEST_UNKNOWN when the Accept
header does not name its type (by tag and by digest); a Docker manifest list
fetched by tag by a client that does not accept lists is answered with its
linux/amd64 manifest (``Docker-Content-Digest`` is then that manifest's
digest); a Docker schema2 manifest fetched by tag by a client that does not
accept schema2 would be converted to schema1 by distribution — this fake does
not make schema1 and answers 404 MANIFEST_UNKNOWN instead.  ``*/*`` and a
missing Accept name no manifest type (as in distribution).

Basic auth (``basic_auth=True``): every ``/v2/`` request needs ``Authorization:
Basic`` of one of ``users``, else 401 with ``WWW-Authenticate: Basic
realm="fake-registry"`` (a private registry:2 with an htpasswd file).

Auth (``auth=True``): every ``/v2/`` request needs ``Authorization: Bearer
<token>`` from the token server, else 401 with ``WWW-Authenticate: Bearer
realm="<token_url>/token",service="fake-registry",scope="repository:<name>:pull"``
(plus ``error="invalid_token"`` for unknown or expired tokens,
``error="insufficient_scope"`` when the token does not grant the repository).
The token server grants ``pull`` on public repositories to anyone, on private
ones to the users listed for them (Basic auth against ``users``); it grants
nothing for unknown repositories (so they answer 401, as on Docker Hub).
Tokens expire after ``token_ttl`` seconds.  ``POST /token`` (OAuth2) answers
404 as GCR does; clients fall back to ``GET``.

Blob redirects (``cdn_redirect=True``): ``GET``/``HEAD`` of a blob answers
``307`` to ``<cdn_url>/blobs/sha256/<hex>/data?expires=..&signature=..``; the
CDN answers 403 once the URL expired (``cdn_ttl``) or the signature is wrong,
and (``cdn_reject_auth``, default on) 400 to any request carrying an
Authorization header, like S3.  Every CDN request is logged with
``"authorization": true|false``.

Fault modes (``fault(mode, server="registry"|"token"|"cdn"|"all", match=
substring of the path, times=N)``; first matching rule wins; ``times`` counts
the responses it changes, then the rule goes):

``down5xx``   answer ``status`` (503) with an UNAVAILABLE error.
``429``       answer 429 TOOMANYREQUESTS with ``Retry-After: retry_after``.
``hang``      accept the request and never answer; clearing the fault (or
              reset/close) aborts the held connections.
``cut``       send the headers (full length) and ``after_bytes`` body bytes,
              then close the connection.
``corrupt``   same length, one wrong byte: the byte at absolute offset ``at``
              (default: the middle of the object) is inverted.
``throttle``  send the body at ``bps`` bytes per second.

The first three replace the answer; the last three change a body (a HEAD or
an error answer does not use them up).  ``pull_limit=N`` is Docker Hub's
rate limit: the N+1st manifest ``GET`` (HEADs are free) gets 429, manifest
answers carry ``ratelimit-limit`` / ``ratelimit-remaining``.

Control endpoints on the registry port (never logged, never faulted):

``GET  /_fake/requests[?server=S]``  the log: ``{"server", "method", "host", "path"
       (raw, with query), "headers" (lower-cased), "authorization" (bool),
       "status" (None while unanswered), "time"}`` and ``"aborted": true`` when
       the connection closed before the answer ended.
``GET  /_fake/state``   urls, options, faults, counters (token_requests,
       manifest_gets, tokens_issued, tls_attempts, cdn_authorization_seen),
       every repository with its tags, manifests and blobs.
``POST /_fake/reset[?content=1]``  clear the log, faults and counters (content=1:
       also the default images and options, and forget issued tokens).
``POST /_fake/fault``   JSON ``{"mode", "server", "match", "times", "status",
       "retry_after", "after_bytes", "at", "bps"}``; mode "normal" clears the
       faults (of ``server`` if given).
``POST /_fake/options`` JSON with any of the constructor's options.
``POST /_fake/image``   JSON ``{"name", "tags": [...], "files": {path: text},
       "kind": "oci"|"docker"|"index"|"list", "private": bool, "users": [...]}``
       builds and puts an image; answers its digest and manifests.
``POST /_fake/big``     JSON ``{"name", "tags", "size", "dir", "seed", "kind"}``: a
       ``big_image`` written into dir.
``POST /_fake/tag``     JSON ``{"name", "tag", "digest"}`` (move or create a tag).
``POST /_fake/untag``   JSON ``{"name", "tag"}``.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import hmac
import io
import json
import os
import random
import re
import secrets
import sys
import tarfile
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union
from urllib.parse import parse_qs, quote, urlsplit

from twisted.internet import defer
from twisted.web import server

from tests.fakeserve import (FileBody, Listening, TrackedChannel, host_port, origin, owner_site, record_request,
                             request_headers, write_ready)
from tests.upstream import _parse_range  # (start, length), "unsatisfiable", or None: send it all

__all__ = [
    "Blob", "Manifest", "FakeRegistry", "Fault",
    "layer", "image", "index", "artifact", "big_image", "write_oci_layout", "write_dir_layout",
    "default_images",
    "OCI_MANIFEST", "OCI_INDEX", "OCI_CONFIG", "OCI_LAYER", "OCI_EMPTY",
    "DOCKER_MANIFEST", "DOCKER_LIST", "DOCKER_CONFIG", "DOCKER_LAYER",
    "SERVICE", "USER", "PASSWORD",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MANIFEST_TYPES = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)

SERVICE = "fake-registry"
USER, PASSWORD = "alice", "wonderland"  # the default user; may pull acme/private
EPOCH = 1704067200  # 2024-01-01T00:00:00Z, the mtime of every file in every layer
CREATED = "2024-01-01T00:00:00Z"
FAULT_MODES = ("down5xx", "429", "hang", "cut", "corrupt", "throttle")
_ANSWER_MODES = ("down5xx", "429", "hang")
SERVERS = ("registry", "token", "cdn")

DEFAULT_OPTIONS = {
    "auth": False,  # token auth on /v2/
    "basic_auth": False,  # Basic auth on /v2/ instead (the users below), as a private registry:2 with htpasswd
    "token_ttl": 300,  # seconds a token is valid (expires_in)
    "users": {USER: PASSWORD},  # Basic auth accounts of the token server
    "cdn_redirect": False,  # blobs answered by 307 to the CDN
    "cdn_ttl": 1200,  # seconds a signed CDN URL is valid
    "cdn_reject_auth": True,  # CDN answers 400 to requests with Authorization (S3)
    "referrers": True,  # serve the referrers API (False: 404 like registry 2.8)
    "pull_limit": None,  # manifest GETs allowed before 429 (Docker Hub's rate limit)
    "tags_page": None,  # tags/list page size when the client gives no n
}


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical(obj) -> bytes:
    return json.dumps(obj, indent=3).encode()


# ---------------------------------------------------------------------------
# content


class Blob:
    """Bytes addressed by their sha256 digest, in memory or in a file (big layers)."""

    def __init__(self, data: Optional[bytes] = None, media_type: str = "application/octet-stream", *,
                 path: Optional[str] = None, digest: Optional[str] = None, size: Optional[int] = None):
        if (data is None) == (path is None):
            raise TypeError("give data or path")
        self.data = data
        self.path = path
        self.media_type = media_type
        if data is not None:
            self.size = len(data)
            self.digest = sha256_digest(data)
        else:
            self.size = os.path.getsize(path) if size is None else size
            self.digest = digest or _file_digest(path)

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    def open(self):
        return io.BytesIO(self.data) if self.data is not None else open(self.path, "rb")

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as fh:
            return fh.read()

    def descriptor(self, **extra) -> Dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}

    def __repr__(self):
        return "<%s %s %s %d bytes>" % (type(self).__name__, self.media_type, self.digest[:19], self.size)


class Manifest(Blob):
    """A manifest or index: its exact bytes, and what it refers to.

    ``blobs`` are the config and layers of an image manifest; ``children`` the
    manifests of an index; ``platform`` is what an index says about this one.
    """

    def __init__(self, body: bytes, media_type: str, blobs: Sequence[Blob] = (),
                 children: Sequence["Manifest"] = (), platform: Optional[dict] = None,
                 subject: Optional[str] = None, artifact_type: Optional[str] = None,
                 annotations: Optional[dict] = None):
        super().__init__(body, media_type)
        self.blobs = list(blobs)
        self.children = list(children)
        self.platform = platform
        self.subject = subject
        self.artifact_type = artifact_type
        self.annotations = annotations

    @property
    def body(self) -> bytes:
        return self.data

    @property
    def is_index(self) -> bool:
        return self.media_type in (OCI_INDEX, DOCKER_LIST)

    def walk(self) -> Iterator["Manifest"]:
        """This manifest and every manifest below it."""
        yield self
        for child in self.children:
            yield from child.walk()

    def all_blobs(self) -> List[Blob]:
        seen, out = set(), []
        for m in self.walk():
            for b in m.blobs:
                if b.digest not in seen:
                    seen.add(b.digest)
                    out.append(b)
        return out

    def child(self, architecture: str, os_name: str = "linux") -> "Manifest":
        for c in self.children:
            if c.platform and c.platform.get("architecture") == architecture and c.platform.get("os") == os_name:
                return c
        raise KeyError("%s/%s" % (os_name, architecture))

    def layers(self) -> List[Blob]:
        return self.blobs[1:]

    @property
    def config(self) -> Blob:
        return self.blobs[0]


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _tarinfo(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if directory:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.mode = 0o644
    return info


def layer(files: Dict[str, Union[str, bytes]], media_type: str = OCI_LAYER) -> Tuple[Blob, str]:
    """A gzip'd tar of ``files`` (path -> content) and its diff_id (digest of the tar)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        dirs = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
        for d in dirs:
            tar.addfile(_tarinfo(d + "/", directory=True))
        for path in sorted(files):
            content = files[path]
            data = content.encode() if isinstance(content, str) else bytes(content)
            tar.addfile(_tarinfo(path, len(data)), io.BytesIO(data))
    tar_bytes = raw.getvalue()
    return Blob(gzip.compress(tar_bytes, compresslevel=6, mtime=0), media_type), sha256_digest(tar_bytes)


def _image_from_layers(layers: Sequence[Tuple[Blob, str]], docker: bool, architecture: str, os_name: str,
                       variant: Optional[str], labels: Optional[dict], annotations: Optional[dict]) -> Manifest:
    cfg = {
        "architecture": architecture,
        "os": os_name,
        "created": CREATED,
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/sh"], "Labels": labels or {}},
        "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]},
        "history": [{"created": CREATED, "created_by": "fakeregistry: layer %d" % i} for i in range(len(layers))],
    }
    if variant:
        cfg["variant"] = variant
    config = Blob(_canonical(cfg), DOCKER_CONFIG if docker else OCI_CONFIG)
    media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    doc = {"schemaVersion": 2, "mediaType": media_type, "config": config.descriptor(),
           "layers": [blob.descriptor() for blob, _ in layers]}
    if annotations and not docker:
        doc["annotations"] = annotations
    platform = {"architecture": architecture, "os": os_name}
    if variant:
        platform["variant"] = variant
    return Manifest(_canonical(doc), media_type, [config] + [blob for blob, _ in layers], platform=platform,
                    annotations=annotations)


def image(files: Dict[str, Union[str, bytes]], *, docker: bool = False, architecture: str = "amd64",
          os_name: str = "linux", variant: Optional[str] = None, labels: Optional[dict] = None,
          annotations: Optional[dict] = None) -> Manifest:
    """A one-layer image: OCI manifest, or Docker schema2 with docker=True."""
    lay = layer(files, DOCKER_LAYER if docker else OCI_LAYER)
    return _image_from_layers([lay], docker, architecture, os_name, variant, labels, annotations)


def index(manifests: Sequence[Manifest], *, docker: bool = False, annotations: Optional[dict] = None) -> Manifest:
    """An OCI index, or a Docker manifest list with docker=True, of platform manifests."""
    media_type = DOCKER_LIST if docker else OCI_INDEX
    entries = []
    for m in manifests:
        extra = {"platform": m.platform} if m.platform else {}
        if m.artifact_type:
            extra["artifactType"] = m.artifact_type
        entries.append(m.descriptor(**extra))
    doc = {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}
    if annotations and not docker:
        doc["annotations"] = annotations
    return Manifest(_canonical(doc), media_type, children=manifests, annotations=annotations)


EMPTY_CONFIG = Blob(b"{}", OCI_EMPTY)


def artifact(subject: Manifest, artifact_type: str, payload: Union[str, bytes],
             payload_type: str = "application/json", annotations: Optional[dict] = None) -> Manifest:
    """An OCI artifact manifest (an SBOM, a signature) whose ``subject`` is ``subject``."""
    data = payload.encode() if isinstance(payload, str) else payload
    blob = Blob(data, payload_type)
    ann = {"org.opencontainers.image.created": CREATED, **(annotations or {})}
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
           "config": EMPTY_CONFIG.descriptor(), "layers": [blob.descriptor()],
           "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
           "annotations": ann}
    return Manifest(_canonical(doc), OCI_MANIFEST, [EMPTY_CONFIG, blob], subject=subject.digest,
                    artifact_type=artifact_type, annotations=ann)


def big_image(directory: str, size: int, *, seed: int = 0, docker: bool = False) -> Manifest:
    """An image whose one layer holds a file of ``size`` random (incompressible) bytes.

    The layer is written streaming into ``directory`` (never held in memory):
    a tar with one file ``big.bin``, in a gzip of stored (level 0) blocks, so
    writing 1 GiB takes seconds.  A layer already written for the same size
    and seed is reused (its digests are kept in a ``.json`` beside it).
    """
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, "big-%d-%d.tar.gz" % (size, seed))
    meta_path = base + ".json"
    meta = None
    if os.path.exists(meta_path) and os.path.exists(base):
        with open(meta_path) as fh:
            meta = json.load(fh)
        if os.path.getsize(base) != meta["size"]:
            meta = None
    if meta is None:
        meta = _write_big_layer(base, size, seed)
        tmp = meta_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(meta, fh)
        os.replace(tmp, meta_path)
    blob = Blob(path=base, digest=meta["digest"], size=meta["size"],
                media_type=DOCKER_LAYER if docker else OCI_LAYER)
    return _image_from_layers([(blob, meta["diff_id"])], docker, "amd64", "linux", None,
                              {"fakeregistry.big": str(size)}, None)


def _write_big_layer(path: str, size: int, seed: int) -> dict:
    rng = random.Random(seed)
    tar_hash, gz_hash = hashlib.sha256(), hashlib.sha256()
    z = zlib.compressobj(0, zlib.DEFLATED, 31)  # gzip container, stored blocks
    tmp = path + ".tmp.%d" % os.getpid()
    written = 0
    with open(tmp, "wb") as out:
        def put(raw: bytes):
            nonlocal written
            tar_hash.update(raw)
            packed = z.compress(raw)
            if packed:
                gz_hash.update(packed)
                out.write(packed)
                written += len(packed)

        put(_tarinfo("big.bin", size).tobuf(tarfile.GNU_FORMAT))
        left = size
        while left:
            n = min(left, 1 << 20)
            put(rng.randbytes(n))
            left -= n
        put(b"\0" * ((-size) % 512) + b"\0" * 1024)  # pad the member, then two zero blocks
        tail = z.flush()
        gz_hash.update(tail)
        out.write(tail)
        written += len(tail)
    os.replace(tmp, path)
    return {"digest": "sha256:" + gz_hash.hexdigest(), "diff_id": "sha256:" + tar_hash.hexdigest(), "size": written}


def _copy_out(item: Blob, target: str) -> None:
    if os.path.exists(target):
        return
    with item.open() as src, open(target + ".tmp", "wb") as dst:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            dst.write(chunk)
    os.replace(target + ".tmp", target)


def write_oci_layout(directory: str, refs: Dict[str, Manifest]) -> str:
    """Write an OCI image layout holding ``refs`` (tag -> manifest); skopeo reads ``oci:DIR:TAG``.

    skopeo 1.9 skips index.json entries of Docker media types: use
    ``write_dir_layout`` for Docker schema2 images and manifest lists.
    """
    blobs_dir = os.path.join(directory, "blobs", "sha256")
    os.makedirs(blobs_dir, exist_ok=True)
    entries = []
    for ref, top in refs.items():
        for item in list(top.walk()) + top.all_blobs():
            _copy_out(item, os.path.join(blobs_dir, item.hex))
        entries.append(top.descriptor(annotations={"org.opencontainers.image.ref.name": ref}))
    with open(os.path.join(directory, "oci-layout"), "w") as fh:
        json.dump({"imageLayoutVersion": "1.0.0"}, fh)
    with open(os.path.join(directory, "index.json"), "w") as fh:
        json.dump({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, fh)
    return directory


def write_dir_layout(directory: str, top: Manifest) -> str:
    """Write ``top`` as skopeo's ``dir:`` transport does (version 1.1): ``manifest.json``, blobs
    named by their hex digest, and for an index each instance as ``<hex>.manifest.json``."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "version"), "w") as fh:
        fh.write("Directory Transport Version: 1.1\n")
    with open(os.path.join(directory, "manifest.json"), "wb") as fh:
        fh.write(top.body)
    for child in list(top.walk())[1:]:
        _copy_out(child, os.path.join(directory, child.hex + ".manifest.json"))
    for blob in top.all_blobs():
        _copy_out(blob, os.path.join(directory, blob.hex))
    return directory


def default_images() -> Dict[str, Dict[str, Manifest]]:
    """What a new FakeRegistry holds: repository -> tag -> manifest (``""``: untagged)."""
    small1 = image({"hello.txt": "hello from the fake registry\n", "etc/small-release": "small 1.0\n"})
    small11 = image({"hello.txt": "hello from the fake registry\n", "etc/small-release": "small 1.1\n"})
    small2 = image({"hello.txt": "hello again\n", "etc/small-release": "small 2.0\n", "bin/tool": "#!/bin/sh\n"})
    sbom = artifact(small1, "application/vnd.example.sbom.v1+json", '{"packages": []}\n')
    amd64 = image({"arch.txt": "amd64\n"}, architecture="amd64")
    arm64 = image({"arch.txt": "arm64\n"}, architecture="arm64", variant="v8")
    d_amd64 = image({"arch.txt": "amd64 (docker)\n"}, docker=True, architecture="amd64")
    d_arm64 = image({"arch.txt": "arm64 (docker)\n"}, docker=True, architecture="arm64", variant="v8")
    return {
        "library/small": {"1.0": small1, "1.1": small11, "2.0": small2, "latest": small2, "": sbom},
        "library/dockerv2": {"1.0": image({"docker.txt": "a docker schema2 image\n"}, docker=True)},
        "library/multi": {"1.0": index([amd64, arm64])},
        "library/multilist": {"1.0": index([d_amd64, d_arm64], docker=True)},
        "acme/private": {"1.0": image({"secret.txt": "only for alice\n"})},
    }


PRIVATE_REPOS = {"acme/private": [USER]}


# ---------------------------------------------------------------------------
# the registry's state


class _Repo:
    def __init__(self, name: str):
        self.name = name
        self.tags: Dict[str, str] = {}
        self.manifests: Dict[str, Manifest] = {}
        self.blobs: Dict[str, Blob] = {}
        self.private = False
        self.users: Optional[List[str]] = None  # None: any known user may pull a private repo

    def add(self, manifest: Manifest) -> None:
        for m in manifest.walk():
            self.manifests[m.digest] = m
        for b in manifest.all_blobs():
            self.blobs[b.digest] = b

    def lookup(self, reference: str) -> Optional[Manifest]:
        if reference.startswith("sha256:"):
            return self.manifests.get(reference)
        digest = self.tags.get(reference)
        return self.manifests.get(digest) if digest else None

    def state(self) -> dict:
        return {
            "private": self.private, "users": self.users, "tags": dict(sorted(self.tags.items())),
            "manifests": {d: {"media_type": m.media_type, "size": m.size, "subject": m.subject,
                              "blobs": [b.digest for b in m.blobs], "children": [c.digest for c in m.children]}
                          for d, m in self.manifests.items()},
            "blobs": {d: {"size": b.size, "media_type": b.media_type} for d, b in self.blobs.items()},
        }


@dataclass
class Fault:
    """A fault rule; see the module docstring."""

    mode: str
    server: str = "registry"
    match: Optional[str] = None
    times: Optional[int] = None
    status: int = 503
    retry_after: int = 10
    after_bytes: Optional[int] = None
    at: Optional[int] = None
    bps: int = 64 * 1024

    def applies(self, server_name: str, path: str, answer: bool) -> bool:
        return ((self.mode in _ANSWER_MODES) == answer
                and self.server in (server_name, "all")
                and (self.match is None or self.match in path))


_NAME = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
_ROUTE = re.compile(r"^/v2/(?P<name>%s)/(?:(?P<kind>manifests|blobs|referrers)/(?P<ref>[^/]+)|(?P<tags>tags/list))$"
                    % _NAME)
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_CDN_PATH = re.compile(r"^/blobs/sha256/(?P<hex>[0-9a-f]{64})/data$")


def _accepted(request) -> set:
    """Media types the Accept header names (q=0 excluded; */* names nothing, as in distribution)."""
    out = set()
    for value in request.requestHeaders.getRawHeaders("accept", []):
        for item in value.split(","):
            parts = [p.strip() for p in item.split(";")]
            if not parts[0]:
                continue
            q = next((p[2:] for p in parts[1:] if p.lower().startswith("q=")), "1")
            try:
                if float(q) <= 0:
                    continue
            except ValueError:
                pass
            out.add(parts[0].lower())
    return out


# ---------------------------------------------------------------------------
# twisted.web plumbing (bodies stream through tests/fakeserve.py's FileBody)


class _Channel(TrackedChannel):
    """An HTTP channel that answers a TLS ClientHello the way Go's net/http does.

    Clients told a registry is insecure (skopeo --tls-verify=false, docker's
    insecure-registries) try https first and fall back to http on an error.
    A Go server answers a handshake on a plain port at once with a 400, so the
    fallback is immediate; a silent server costs the client its TLS handshake
    timeout (10 s in skopeo).
    """

    _first = True

    def dataReceived(self, data):
        if self._first:
            self._first = False
            if data[:2] == b"\x16\x03":
                self.site.owner.tls_attempts[self.site.server_name] += 1
                self.transport.write(b"HTTP/1.0 400 Bad Request\r\n\r\n"
                                     b"Client sent an HTTP request to an HTTPS server.\n")
                self.transport.loseConnection()
                return
        super().dataReceived(data)


def _send(request, status: int, body: bytes = b"", content_type: Optional[str] = None, headers=()):
    request.setResponseCode(status)
    for name, value in headers:
        request.setHeader(name, str(value))
    if content_type:
        request.setHeader("Content-Type", content_type)
    if status not in (204, 304):
        request.setHeader("Content-Length", str(len(body)))
        if request.method != b"HEAD" and body:
            request.write(body)
    request.finish()


def _send_json(request, status: int, obj, headers=()):
    _send(request, status, json.dumps(obj).encode(), "application/json; charset=utf-8", headers)


def _registry_error(request, status: int, code: str, message: str, detail=None, headers=()):
    err = {"code": code, "message": message}
    if detail is not None:
        err["detail"] = detail
    _send_json(request, status, {"errors": [err]}, headers)


def _s3_error(request, status: int, code: str, message: str):
    body = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code><Message>%s</Message></Error>'
            % (code, message)).encode()
    _send(request, status, body, "application/xml")


def _etag_matches(request, etag: str) -> bool:
    value = request.getHeader("if-none-match")
    return value is not None and any(t.strip() in (etag, "*") for t in value.split(","))


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# ---------------------------------------------------------------------------


class FakeRegistry(Listening):
    """Registry + token server + CDN (see the module docstring)."""

    def __init__(self, *, images: bool = True, reactor=None, **options):
        unknown = set(options) - set(DEFAULT_OPTIONS)
        if unknown:
            raise TypeError("unknown option(s): %s" % ", ".join(sorted(unknown)))
        self._init_listening(reactor)
        self._with_images = images
        self._initial_options = options
        self.url: Optional[str] = None
        self.token_url: Optional[str] = None
        self.cdn_url: Optional[str] = None
        self.requests: List[dict] = []
        self.faults: List[Fault] = []
        self._senders = set()
        self._hung = []
        self._cdn_secret = secrets.token_bytes(16)
        self._load_defaults()

    def _load_defaults(self):
        self.options = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULT_OPTIONS.items()}
        self.configure(**self._initial_options)
        self.repos: Dict[str, _Repo] = {}
        self.tokens: Dict[str, dict] = {}
        self.manifest_gets = 0
        self.tls_attempts = dict.fromkeys(SERVERS, 0)
        if self._with_images:
            for name, tags in default_images().items():
                for tag, manifest in tags.items():
                    self.put(name, manifest, *([tag] if tag else []))
            for name, users in PRIVATE_REPOS.items():
                self.set_private(name, True, users)

    # -- lifecycle -----------------------------------------------------------

    def listen(self, interface: str = "127.0.0.1", port: int = 0, *, token_port: int = 0,
               cdn_interface: Optional[str] = "127.0.0.2", cdn_port: int = 0) -> "FakeRegistry":
        """Start the registry, the token server (same interface) and the CDN (cdn_interface=None: no CDN)."""
        def start(iface, p, name):
            return origin(iface, self._listen(owner_site(self, name, _Channel), iface, p))

        self.url = start(interface, port, "registry")
        self.token_url = start(interface, token_port, "token")
        if cdn_interface:
            self.cdn_url = start(cdn_interface, cdn_port, "cdn")
        return self

    def close(self) -> defer.Deferred:
        """Stop listening and abort every connection; fires when all are gone."""
        for sender in list(self._senders):
            sender.close()
        self._hung = []
        return self._shut().addCallback(lambda _: None)

    @property
    def host(self) -> str:
        """host:port of the registry, as in image references."""
        return urlsplit(self.url).netloc

    def ref(self, name: str, reference: str = "latest") -> str:
        """An image reference: ``host:port/name:tag`` or ``host:port/name@sha256:..``."""
        sep = "@" if reference.startswith("sha256:") else ":"
        return "%s/%s%s%s" % (self.host, name, sep, reference)

    # -- content -------------------------------------------------------------

    def put(self, name: str, manifest: Manifest, *tags: str, private: Optional[bool] = None,
            users: Optional[List[str]] = None) -> Manifest:
        """Store a manifest (with everything it refers to) in a repository, and tag it."""
        if not re.match("^%s$" % _NAME, name):
            raise ValueError("invalid repository name %r" % name)
        repo = self.repos.setdefault(name, _Repo(name))
        repo.add(manifest)
        for tag in tags:
            self.tag(name, tag, manifest)
        if private is not None:
            self.set_private(name, private, users)
        return manifest

    def tag(self, name: str, tag: str, target: Union[Manifest, str]) -> None:
        """Point a tag at a manifest (a Manifest, or the digest of one the registry has)."""
        if not _TAG.match(tag):
            raise ValueError("invalid tag %r" % tag)
        repo = self.repos.setdefault(name, _Repo(name))
        if isinstance(target, Manifest):
            repo.add(target)
            digest = target.digest
        else:
            digest = target
            if digest not in repo.manifests:
                found = self._manifest_anywhere(digest)
                if found is None:
                    raise KeyError("no manifest %s" % digest)
                repo.add(found)
        repo.tags[tag] = digest

    def untag(self, name: str, tag: str) -> None:
        self.repos[name].tags.pop(tag, None)

    def set_private(self, name: str, private: bool = True, users: Optional[List[str]] = None) -> None:
        repo = self.repos[name]
        repo.private = private
        repo.users = users

    def digest(self, name: str, tag: str) -> str:
        return self.repos[name].tags[tag]

    def manifest(self, name: str, reference: str) -> Manifest:
        m = self.repos[name].lookup(reference)
        if m is None:
            raise KeyError("%s:%s" % (name, reference))
        return m

    def _manifest_anywhere(self, digest: str) -> Optional[Manifest]:
        for repo in self.repos.values():
            if digest in repo.manifests:
                return repo.manifests[digest]
        return None

    def _blob_anywhere(self, digest: str) -> Optional[Blob]:
        for repo in self.repos.values():
            found = repo.blobs.get(digest) or repo.manifests.get(digest)
            if found is not None:
                return found
        return None

    # -- options and faults --------------------------------------------------

    def configure(self, **options) -> None:
        unknown = set(options) - set(DEFAULT_OPTIONS)
        if unknown:
            raise TypeError("unknown option(s): %s" % ", ".join(sorted(unknown)))
        self.options.update(options)

    def fault(self, mode: str, server: str = "registry", match: Optional[str] = None,
              times: Optional[int] = None, **params) -> Fault:
        """Add a fault rule (see the module docstring); returns it."""
        if mode not in FAULT_MODES:
            raise ValueError("mode must be one of %s" % ", ".join(FAULT_MODES))
        if server not in SERVERS + ("all",):
            raise ValueError("server must be one of %s or all" % ", ".join(SERVERS))
        rule = Fault(mode, server, match, times, **params)
        self.faults.append(rule)
        return rule

    def clear_faults(self, server: Optional[str] = None) -> None:
        """Remove the fault rules (of one server), aborting connections a hang holds."""
        self.faults = [f for f in self.faults if server is not None and f.server not in (server, "all")]
        held, self._hung = self._hung, []
        for server_name, request in held:
            if server is None or server == server_name:
                transport = request.channel.transport if request.channel else None
                if transport is not None:
                    transport.abortConnection()
            else:
                self._hung.append((server_name, request))

    def _take_fault(self, server_name: str, path: str, answer: bool) -> Optional[Fault]:
        for rule in self.faults:
            if rule.applies(server_name, path, answer):
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times <= 0:
                        self.faults.remove(rule)
                return rule
        return None

    # -- the log -------------------------------------------------------------

    def requests_to(self, server: Optional[str] = "registry", method: Optional[str] = None,
                    path_contains: Optional[str] = None) -> List[dict]:
        return [r for r in self.requests
                if (server is None or r["server"] == server) and (method is None or r["method"] == method)
                and (path_contains is None or path_contains in r["path"])]

    def count(self, path_contains: Optional[str] = None, method: Optional[str] = None,
              server: Optional[str] = "registry") -> int:
        return len(self.requests_to(server, method, path_contains))

    @property
    def token_requests(self) -> int:
        return self.count("/token", server="token")

    @property
    def cdn_authorization_seen(self) -> bool:
        return any(r["authorization"] for r in self.requests_to("cdn"))

    def reset(self, content: bool = False) -> None:
        """Forget the log, faults and counters; content=True: also images, options and tokens."""
        del self.requests[:]
        self.clear_faults()
        self.manifest_gets = 0
        self.tls_attempts = dict.fromkeys(SERVERS, 0)
        if content:
            self._load_defaults()

    def state(self) -> dict:
        return {
            "url": self.url, "token": self.token_url, "cdn": self.cdn_url,
            "options": self.options, "faults": [asdict(f) for f in self.faults],
            "token_requests": self.token_requests, "cdn_authorization_seen": self.cdn_authorization_seen,
            "manifest_gets": self.manifest_gets, "tokens_issued": len(self.tokens),
            "tls_attempts": self.tls_attempts,
            "repos": {name: repo.state() for name, repo in sorted(self.repos.items())},
        }

    def _log(self, server_name: str, request) -> dict:
        headers = request_headers(request)
        entry = {"server": server_name, "method": request.method.decode("latin-1"),
                 "host": headers.get("host"), "path": request.uri.decode("latin-1"), "headers": headers,
                 "authorization": "authorization" in headers, "status": None, "time": time.time()}
        return record_request(self.requests, request, entry)

    # -- request handling ----------------------------------------------------

    def _handle(self, server_name: str, request):
        path_raw = request.uri.decode("latin-1")
        path, _, query = path_raw.partition("?")
        params = parse_qs(query, keep_blank_values=True)
        if server_name == "registry" and path.startswith("/_fake/"):
            try:
                self._control(request, path, params)
            except (KeyError, TypeError, ValueError, OSError) as exc:
                _send_json(request, 400, {"error": "%s: %s" % (type(exc).__name__, exc)})
            return server.NOT_DONE_YET
        self._log(server_name, request)
        rule = self._take_fault(server_name, path, answer=True)
        if rule is not None:
            self._answer_fault(server_name, request, rule)
        elif server_name == "registry":
            request.setHeader("Docker-Distribution-Api-Version", "registry/2.0")
            self._registry(request, path, params)
        elif server_name == "token":
            self._token(request, path, params)
        else:
            self._cdn(request, path, params)
        return server.NOT_DONE_YET

    def _answer_fault(self, server_name: str, request, rule: Fault):
        if rule.mode == "hang":
            self._hung.append((server_name, request))
            return
        if rule.mode == "429":
            headers = [("Retry-After", rule.retry_after)]
            message = "You have reached your pull rate limit. (fake registry)"
            if server_name == "cdn":
                request.setHeader("Retry-After", str(rule.retry_after))
                _s3_error(request, 429, "SlowDown", "Please reduce your request rate.")
            else:
                _registry_error(request, 429, "TOOMANYREQUESTS", message, headers=headers)
            return
        if server_name == "cdn":
            _s3_error(request, rule.status, "ServiceUnavailable", "Service Unavailable")
        else:
            _registry_error(request, rule.status, "UNAVAILABLE", "service unavailable")

    # registry

    def _challenge(self, name: Optional[str], error: Optional[str]) -> str:
        value = 'Bearer realm="%s/token",service="%s"' % (self.token_url, SERVICE)
        if name:
            value += ',scope="repository:%s:pull"' % name
        if error:
            value += ',error="%s"' % error
        return value

    def _authorized(self, request, name: Optional[str]) -> bool:
        """True, or answers 401 with the Bearer (or Basic) challenge and returns False."""
        if self.options["basic_auth"]:
            return self._basic_authorized(request, name)
        if not self.options["auth"]:
            return True
        header = request.getHeader("authorization") or ""
        token = header[7:].strip() if header[:7].lower() == "bearer " else None
        error = None
        if token is not None:
            info = self.tokens.get(token)
            if info is None or info["expires"] <= time.time():
                error = "invalid_token"
            elif name is None or "pull" in info["access"].get(name, ()):
                return True
            else:
                error = "insufficient_scope"
        detail = [{"Type": "repository", "Class": "", "Name": name, "Action": "pull"}] if name else None
        _registry_error(request, 401, "UNAUTHORIZED", "authentication required", detail,
                        headers=[("WWW-Authenticate", self._challenge(name, error))])
        return False

    def _basic_authorized(self, request, name: Optional[str]) -> bool:
        header = request.getHeader("authorization") or ""
        user = None
        if header[:6].lower() == "basic ":
            try:
                who, _, password = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                who, password = "", None
            if self.options["users"].get(who) == password:
                user = who
        if user is not None and (name is None or self._may_pull(name, user) or name not in self.repos):
            return True
        _registry_error(request, 401, "UNAUTHORIZED", "authentication required",
                        headers=[("WWW-Authenticate", 'Basic realm="fake-registry"')])
        return False

    def _registry(self, request, path: str, params: dict):
        method = request.method.decode("latin-1")
        if path in ("/v2", "/v2/"):
            if self._authorized(request, None):
                _send_json(request, 200, {})
            return
        m = _ROUTE.match(path)
        if m is None:
            _send(request, 404, b"404 page not found\n", "text/plain; charset=utf-8")
            return
        name = m.group("name")
        if m.group("kind") == "referrers" and not self.options["referrers"]:
            _send(request, 404, b"404 page not found\n", "text/plain; charset=utf-8")
            return
        if method not in ("GET", "HEAD"):
            _registry_error(request, 405, "UNSUPPORTED", "The operation is unsupported.")
            return
        if not self._authorized(request, name):
            return
        repo = self.repos.get(name)
        if repo is None:
            _registry_error(request, 404, "NAME_UNKNOWN", "repository name not known to registry", {"name": name})
            return
        kind = m.group("kind")
        if m.group("tags"):
            self._tags(request, repo, params)
        elif kind == "manifests":
            self._manifest(request, path, repo, m.group("ref"))
        elif kind == "blobs":
            self._blob(request, path, repo, m.group("ref"))
        else:
            self._referrers(request, repo, m.group("ref"), params)

    def _manifest(self, request, path: str, repo: _Repo, reference: str):
        limit = self.options["pull_limit"]
        headers = []
        if limit is not None:
            if request.method == b"GET":
                self.manifest_gets += 1
            left = max(0, limit - self.manifest_gets)
            headers = [("ratelimit-limit", "%d;w=21600" % limit), ("ratelimit-remaining", "%d;w=21600" % left),
                       ("docker-ratelimit-source", "127.0.0.1")]
            if request.method == b"GET" and self.manifest_gets > limit:
                _registry_error(request, 429, "TOOMANYREQUESTS",
                                "You have reached your pull rate limit. (fake registry)",
                                headers=headers + [("Retry-After", 60)])
                return
        by_digest = _DIGEST.match(reference) is not None
        if not by_digest and not _TAG.match(reference):
            _registry_error(request, 400, "TAG_INVALID", "manifest tag did not match URI", {"Tag": reference})
            return
        m = repo.lookup(reference)
        if m is None:
            _registry_error(request, 404, "MANIFEST_UNKNOWN", "manifest unknown",
                            {"Digest" if by_digest else "Tag": reference})
            return
        accepted = _accepted(request)
        if m.media_type in (OCI_INDEX, OCI_MANIFEST) and m.media_type not in accepted:
            what = "index" if m.media_type == OCI_INDEX else "manifest"
            _registry_error(request, 404, "MANIFEST_UNKNOWN",
                            "OCI %s found, but accept header does not support OCI %ss" % (what, what))
            return
        if not by_digest and m.media_type == DOCKER_LIST and DOCKER_LIST not in accepted:
            try:
                m = m.child("amd64")
            except KeyError:
                _registry_error(request, 404, "MANIFEST_UNKNOWN", "linux/amd64 not found in manifest list")
                return
        if not by_digest and m.media_type == DOCKER_MANIFEST and DOCKER_MANIFEST not in accepted:
            _registry_error(request, 404, "MANIFEST_UNKNOWN",
                            "the client does not accept schema2 and the fake registry makes no schema1")
            return
        etag = '"%s"' % m.digest
        headers += [("Docker-Content-Digest", m.digest), ("ETag", etag)]
        if _etag_matches(request, etag):
            _send(request, 304, headers=headers)
            return
        self._send_content(request, "registry", path, m, m.media_type, headers, ranges=False)

    def _blob(self, request, path: str, repo: _Repo, digest: str):
        if not _DIGEST.match(digest):
            _registry_error(request, 400, "DIGEST_INVALID", "provided digest did not match uploaded content")
            return
        blob = repo.blobs.get(digest) or repo.manifests.get(digest)
        if blob is None:
            _registry_error(request, 404, "BLOB_UNKNOWN", "blob unknown to registry", digest)
            return
        if self.options["cdn_redirect"] and self.cdn_url:
            location = self.cdn_location(digest)
            _send(request, 307, b'<a href="%s">Temporary Redirect</a>.\n' % location.encode(),
                  "text/html; charset=utf-8", headers=[("Location", location), ("Docker-Content-Digest", digest)])
            return
        etag = '"%s"' % digest
        headers = [("Docker-Content-Digest", digest), ("ETag", etag), ("Cache-Control", "max-age=31536000")]
        if _etag_matches(request, etag):
            _send(request, 304, headers=headers)
            return
        self._send_content(request, "registry", path, blob, "application/octet-stream", headers)

    def _tags(self, request, repo: _Repo, params: dict):
        tags = sorted(repo.tags)
        last = params.get("last", [None])[0]
        if last:
            tags = [t for t in tags if t > last]
        n = params.get("n", [""])[0]
        if n and not n.isdigit():
            _registry_error(request, 400, "PAGINATION_NUMBER_INVALID", "invalid number of results requested")
            return
        n = int(n) if n else self.options["tags_page"]
        headers = []
        if n is not None:
            page = tags[:n]
            if len(tags) > n and page:
                link = "/v2/%s/tags/list?n=%d&last=%s" % (repo.name, n, quote(page[-1]))
                headers.append(("Link", '<%s>; rel="next"' % link))
            tags = page
        _send_json(request, 200, {"name": repo.name, "tags": tags}, headers)

    def _referrers(self, request, repo: _Repo, digest: str, params: dict):
        if not _DIGEST.match(digest):
            _registry_error(request, 400, "DIGEST_INVALID", "invalid digest")
            return
        wanted = params.get("artifactType", [None])[0]
        entries = []
        for m in repo.manifests.values():
            if m.subject == digest and (wanted is None or m.artifact_type == wanted):
                extra = {"artifactType": m.artifact_type} if m.artifact_type else {}
                if m.annotations:
                    extra["annotations"] = m.annotations
                entries.append(m.descriptor(**extra))
        headers = [("OCI-Filters-Applied", "artifactType")] if wanted else []
        body = _canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
        _send(request, 200, body, OCI_INDEX, headers)

    def _send_content(self, request, server_name: str, path: str, blob: Blob, content_type: str,
                      headers, ranges: bool = True):
        """200/206/416 and the body (streamed, with any body fault)."""
        status, start, length = 200, 0, blob.size
        for name, value in headers:
            request.setHeader(name, str(value))
        if ranges:
            request.setHeader("Accept-Ranges", "bytes")
            value = request.getHeader("range")
            parsed = _parse_range(value, blob.size) if value else None
            if parsed == "unsatisfiable":
                _send(request, 416, headers=[("Content-Range", "bytes */%d" % blob.size)])
                return
            if parsed is not None:
                start, length = parsed
                status = 206
                request.setHeader("Content-Range", "bytes %d-%d/%d" % (start, start + length - 1, blob.size))
        request.setResponseCode(status)
        request.setHeader("Content-Type", content_type)
        request.setHeader("Content-Length", str(length))
        if request.method == b"HEAD" or length == 0:
            request.finish()
            return
        rule = self._take_fault(server_name, path, answer=False)
        cut = corrupt_at = bps = None
        if rule is not None:
            if rule.mode == "cut":  # (at the end of the body still a cut: the connection closes)
                cut = length // 2 if rule.after_bytes is None else min(rule.after_bytes, length)
            elif rule.mode == "corrupt":
                corrupt_at = blob.size // 2 if rule.at is None else rule.at
            elif rule.mode == "throttle":
                bps = max(1, int(rule.bps))
        FileBody(request, blob.open, start, length, cut=cut, corrupt_at=corrupt_at, throttle_bps=bps,
                 slice_min=1, pause_after_last=True, reactor=self.reactor, live=self._senders).start()

    # token server

    def _token(self, request, path: str, params: dict):
        if path != "/token" or request.method == b"POST":
            _send(request, 404, b"404 page not found\n", "text/plain; charset=utf-8")
            return
        if request.method != b"GET":
            _send_json(request, 405, {"details": "method not allowed"})
            return
        if params.get("service", [None])[0] != SERVICE:
            _send_json(request, 400, {"details": "invalid service; expected %s" % SERVICE})
            return
        user = None
        header = request.getHeader("authorization") or ""
        if header[:6].lower() == "basic ":
            try:
                user, _, password = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", None
            if self.options["users"].get(user) != password:
                _send_json(request, 401, {"details": "incorrect username or password"})
                return
        access: Dict[str, List[str]] = {}
        for value in params.get("scope", []):
            for scope in value.split():
                parts = scope.split(":")
                if len(parts) < 3 or parts[0] != "repository":
                    continue
                name, actions = ":".join(parts[1:-1]), parts[-1].split(",")
                if "pull" in actions and self._may_pull(name, user):
                    access[name] = ["pull"]
        now = time.time()
        token = "fake-%s" % secrets.token_urlsafe(24)
        ttl = int(self.options["token_ttl"])
        self.tokens[token] = {"access": access, "expires": now + ttl, "user": user}
        _send_json(request, 200, {"token": token, "access_token": token, "expires_in": ttl,
                                  "issued_at": _iso(now)})

    def _may_pull(self, name: str, user: Optional[str]) -> bool:
        repo = self.repos.get(name)
        if repo is None:
            return False
        if not repo.private:
            return True
        return user is not None and (repo.users is None or user in repo.users)

    # CDN

    def _signature(self, path: str, expires: int) -> str:
        return hmac.new(self._cdn_secret, ("%s\n%d" % (path, expires)).encode(), hashlib.sha256).hexdigest()

    def cdn_location(self, digest: str) -> str:
        """A signed CDN URL for a blob, valid for ``cdn_ttl`` seconds from now."""
        path = "/blobs/sha256/%s/data" % digest.split(":", 1)[1]
        expires = int(time.time()) + int(self.options["cdn_ttl"])
        return "%s%s?expires=%d&signature=%s" % (self.cdn_url, path, expires, self._signature(path, expires))

    def _cdn(self, request, path: str, params: dict):
        if request.getHeader("authorization") is not None and self.options["cdn_reject_auth"]:
            _s3_error(request, 400, "InvalidArgument",
                      "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                      "Signature query string parameter or the Authorization header should be specified")
            return
        if request.method not in (b"GET", b"HEAD"):
            _s3_error(request, 405, "MethodNotAllowed", "The specified method is not allowed.")
            return
        m = _CDN_PATH.match(path)
        if m is None:
            _s3_error(request, 404, "NoSuchKey", "The specified key does not exist.")
            return
        try:
            expires = int(params.get("expires", ["0"])[0])
        except ValueError:
            expires = 0
        signature = params.get("signature", [""])[0]
        if not hmac.compare_digest(signature, self._signature(path, expires)):
            _s3_error(request, 403, "AccessDenied", "Access denied")
            return
        if expires < time.time():
            _s3_error(request, 403, "AccessDenied", "Request has expired")
            return
        digest = "sha256:" + m.group("hex")
        blob = self._blob_anywhere(digest)
        if blob is None:
            _s3_error(request, 404, "NoSuchKey", "The specified key does not exist.")
            return
        etag = '"%s"' % blob.hex[:32]
        headers = [("ETag", etag), ("Cache-Control", "public, max-age=14400"),
                   ("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")]
        if _etag_matches(request, etag):
            _send(request, 304, headers=headers)
            return
        self._send_content(request, "cdn", path, blob, "application/octet-stream", headers)

    # control

    def _control(self, request, path: str, params: dict):
        method = request.method
        body = json.loads(request.content.read() or b"{}") if method == b"POST" else {}
        if path == "/_fake/requests" and method == b"GET":
            server_name = params.get("server", [None])[0]
            _send_json(request, 200, self.requests_to(server_name))
        elif path == "/_fake/state" and method == b"GET":
            _send_json(request, 200, self.state())
        elif path == "/_fake/reset" and method == b"POST":
            self.reset(content=params.get("content", ["0"])[0] not in ("0", "", "false"))
            _send_json(request, 200, {"ok": True})
        elif path == "/_fake/fault" and method == b"POST":
            mode = body.pop("mode")
            if mode == "normal":
                self.clear_faults(body.get("server"))
            else:
                self.fault(mode, **body)
            _send_json(request, 200, {"faults": [asdict(f) for f in self.faults]})
        elif path == "/_fake/options" and method == b"POST":
            self.configure(**body)
            _send_json(request, 200, {"options": self.options})
        elif path == "/_fake/image" and method == b"POST":
            kind = body.get("kind", "oci")
            files = body.get("files") or {"hello.txt": "hello\n"}
            if kind in ("oci", "docker"):
                top = image(files, docker=kind == "docker")
            elif kind in ("index", "list"):
                docker = kind == "list"
                top = index([image({**files, "arch.txt": arch + "\n"}, docker=docker, architecture=arch,
                                   variant=variant) for arch, variant in (("amd64", None), ("arm64", "v8"))],
                            docker=docker)
            else:
                raise ValueError("kind must be oci, docker, index or list")
            self._put_from_control(body, top)
            _send_json(request, 200, {"digest": top.digest, "media_type": top.media_type,
                                      "manifests": [m.digest for m in top.walk()],
                                      "blobs": [b.digest for b in top.all_blobs()]})
        elif path == "/_fake/big" and method == b"POST":
            top = big_image(body["dir"], int(body["size"]), seed=int(body.get("seed", 0)),
                            docker=body.get("kind") == "docker")
            self._put_from_control(body, top)
            _send_json(request, 200, {"digest": top.digest, "layer": top.layers()[0].digest,
                                      "layer_size": top.layers()[0].size})
        elif path == "/_fake/tag" and method == b"POST":
            self.tag(body["name"], body["tag"], body["digest"])
            _send_json(request, 200, {"ok": True})
        elif path == "/_fake/untag" and method == b"POST":
            self.untag(body["name"], body["tag"])
            _send_json(request, 200, {"ok": True})
        else:
            _send(request, 404, b"404 page not found\n", "text/plain; charset=utf-8")

    def _put_from_control(self, body: dict, top: Manifest):
        self.put(body["name"], top, *body.get("tags", []), private=body.get("private"), users=body.get("users"))


# ---------------------------------------------------------------------------
# standalone process


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fakeregistry", description=__doc__.split("\n")[0])
    ap.add_argument("--listen", type=host_port, default=("127.0.0.1", 0), help="HOST:PORT of the registry")
    ap.add_argument("--token", type=int, default=0, metavar="PORT",
                    help="port of the token server (on the registry's host; default: any free one)")
    ap.add_argument("--cdn", type=host_port, default=("127.0.0.2", 0), help="HOST:PORT of the blob CDN")
    ap.add_argument("--ready-file", help="write the JSON urls here once all servers listen")
    ap.add_argument("--auth", action="store_true", help="require bearer tokens (Docker Hub style)")
    ap.add_argument("--redirect", action="store_true", help="answer blob requests with 307 to the CDN")
    ap.add_argument("--token-ttl", type=int, default=DEFAULT_OPTIONS["token_ttl"], help="token lifetime (s)")
    ap.add_argument("--pull-limit", type=int, default=None, help="manifest GETs before 429")
    args = ap.parse_args(argv)

    from twisted.internet import reactor

    reg = FakeRegistry(reactor=reactor, auth=args.auth, cdn_redirect=args.redirect, token_ttl=args.token_ttl,
                       pull_limit=args.pull_limit)
    reg.listen(args.listen[0], args.listen[1], token_port=args.token, cdn_interface=args.cdn[0],
               cdn_port=args.cdn[1])
    line = json.dumps({"url": reg.url, "cdn": reg.cdn_url, "token": reg.token_url})
    if args.ready_file:
        write_ready(args.ready_file, line + "\n")
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
