"""
The distribution API's language: repository names, tags and digests as the
vault accepts them, media types and Accept headers, what a manifest refers
to, and the registry's JSON errors.  Pure functions, no I/O.
"""

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote_to_bytes

from ...errors import VaultError
from ...store import UnsafePath, safe_segments

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
#: what the vault asks upstream for: every type it can keep and hand on
UPSTREAM_ACCEPT = ", ".join(MANIFEST_TYPES)

#: bytes of a manifest (distribution refuses larger ones too)
MANIFEST_LIMIT = 4 * 1024 * 1024
#: bytes of a tags/list or referrers answer
LISTING_LIMIT = 4 * 1024 * 1024

API_VERSION = (b"docker-distribution-api-version", b"registry/2.0")

# distribution's reference grammar (reference/regexp.go)
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
NAME_LIMIT = 255
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_ANY_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$")

#: the error code of a status, where nothing more specific is known
STATUS_CODES = {400: "UNSUPPORTED", 401: "UNAUTHORIZED", 403: "DENIED", 404: "NAME_UNKNOWN", 405: "UNSUPPORTED",
                413: "SIZE_INVALID", 416: "UNSUPPORTED", 421: "DENIED", 429: "TOOMANYREQUESTS"}


class RegistryError(VaultError):
    """A failure with the distribution API's error code (and upstream's own JSON body, when it sent one)."""

    def __init__(self, code: str, message: str, status: int, headers=None, body: bytes | None = None, detail=None):
        super().__init__(message, status, headers)
        self.code = code
        self.body = body
        self.detail = detail


def error_page(error: VaultError) -> tuple[bytes, bytes]:
    """``(content type, body)`` of `error` in the registry's JSON form (`site.respond_error` asks)."""
    body = getattr(error, "body", None)
    if body and isinstance(error, RegistryError) and _registry_errors(body):
        return b"application/json; charset=utf-8", body
    code = getattr(error, "code", None)
    if not isinstance(code, str):
        code = STATUS_CODES.get(error.status, "UNAVAILABLE" if error.status >= 500 else "UNSUPPORTED")
    item = {"code": code, "message": error.message}
    detail = getattr(error, "detail", None)
    if detail is not None:
        item["detail"] = detail
    return b"application/json; charset=utf-8", json.dumps({"errors": [item]}).encode() + b"\n"


def _registry_errors(body: bytes) -> bool:
    """Is `body` a registry JSON error document (worth passing on as upstream wrote it)?"""
    try:
        document = json.loads(body)
    except ValueError:
        return False
    errors = document.get("errors") if isinstance(document, dict) else None
    return isinstance(errors, list) and bool(errors) and all(
        isinstance(e, dict) and isinstance(e.get("code"), str) for e in errors)


def bad_request(code: str, message: str) -> RegistryError:
    return RegistryError(code, message, 400)


@dataclass(frozen=True)
class Route:
    """What a ``/v2/`` path below the registry asks for."""

    name: str  # the repository, as upstream names it (library/ added on docker.io)
    kind: str  # "manifests", "blobs", "tags", "referrers"
    reference: str = ""  # a tag or a digest ("" for tags/list)

    @property
    def by_digest(self) -> bool:
        return self.reference.startswith("sha256:")


@lru_cache(maxsize=4096)  # the same few images are asked for again and again (bounded; errors are not kept)
def parse_path(rest: bytes, docker_hub: bool) -> Route:
    """
    ``<name>/manifests/<reference>``, ``<name>/blobs/<digest>``,
    ``<name>/tags/list`` or ``<name>/referrers/<digest>`` (raw, below
    ``/v2/`` and the registry segment).  The name is taken greedily, as
    distribution does: a repository may be called ``x/blobs``.  Fails
    with the registry's 4xx error; push, delete and catalog routes are 405.
    """
    parts = rest.split(b"/")
    if parts[0] == b"_catalog" and len(parts) == 1:
        raise read_only("listing the catalog")
    if b"uploads" in parts[-2:] and len(parts) >= 3 and (parts[-2:-1] == [b"blobs"] or parts[-3:-2] == [b"blobs"]):
        raise read_only("pushing blobs")
    if len(parts) >= 3 and parts[-2:] == [b"tags", b"list"]:
        name_parts, kind, reference = parts[:-2], "tags", ""
    elif len(parts) >= 3 and parts[-2] in (b"manifests", b"blobs", b"referrers"):
        name_parts, kind = parts[:-2], parts[-2].decode()
        reference = _reference(parts[-1], kind)
    else:
        raise RegistryError("NAME_UNKNOWN", "not a route of the distribution API", 404)
    return Route(repository_name(b"/".join(name_parts), docker_hub), kind, reference)


def repository_name(raw: bytes, docker_hub: bool) -> str:
    """A repository name from its raw path, checked; a one-segment name on Docker Hub is ``library/<name>``."""
    try:
        segments = safe_segments(raw)
    except UnsafePath as e:
        raise bad_request("NAME_INVALID", f"invalid repository name: {e}") from None
    name = "/".join(segments)
    if not NAME.match(name) or len(name) > NAME_LIMIT:
        raise bad_request("NAME_INVALID", f"invalid repository name {name[:100]!r}")
    if docker_hub and "/" not in name:
        name = "library/" + name
    return name


def _reference(raw: bytes, kind: str) -> str:
    try:
        text = unquote_to_bytes(raw).decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if kind == "manifests" and TAG.match(text):
        return text
    return check_digest(text, tag_allowed=kind == "manifests")


def check_digest(text: str, tag_allowed: bool = False) -> str:
    """A ``sha256:<64 hex>`` digest, or the registry's 400: other algorithms cannot be verified here."""
    if DIGEST.match(text):
        return text
    if _ANY_DIGEST.match(text) and len(text) < 200 and not text.startswith("sha256:"):
        raise bad_request("DIGEST_INVALID", f"unsupported digest algorithm {text.split(':')[0]!r}: "
                                            "the vault verifies sha256 digests only")
    if tag_allowed and ":" not in text:
        raise bad_request("TAG_INVALID", f"invalid tag {text[:100]!r}")
    raise bad_request("DIGEST_INVALID", f"invalid digest {text[:100]!r}: sha256:<64 lower-case hex digits>")


def read_only(what: str) -> RegistryError:
    return RegistryError("UNSUPPORTED", f"{what} is not supported: the vault is a read-only cache "
                                        "(push, delete and catalog go to the registry itself)", 405,
                         {"Allow": "GET, HEAD"})


@lru_cache(maxsize=256)
def accepted_types(headers: tuple) -> frozenset | None:
    """
    The media types the Accept header lines name (q=0 left out), or None
    when the client takes anything (no header, or ``*/*``).  Clients send
    several lines (skopeo one per type): all of them count.
    """
    if not headers:
        return None
    out = set()
    for item in b",".join(headers).decode("latin-1").split(","):
        parts = [p.strip() for p in item.split(";")]
        if not parts[0]:
            continue
        q = next((p[2:] for p in parts[1:] if p.lower().startswith("q=")), "1")
        try:
            if float(q) <= 0:
                continue
        except ValueError:
            pass
        if parts[0] == "*/*":
            return None
        out.add(parts[0].lower())
    return frozenset(out) or None


def media_type(content_type: str | None, body: bytes) -> str:
    """A manifest's media type: upstream's Content-Type if it names one, else the body's ``mediaType``."""
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared in MANIFEST_TYPES:
        return declared
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    inner = document.get("mediaType") if isinstance(document, dict) else None
    if isinstance(inner, str) and _MEDIA_TYPE.match(inner):
        return inner
    if declared and _MEDIA_TYPE.match(declared) and declared not in ("application/octet-stream", "text/plain"):
        return declared
    if isinstance(document, dict) and isinstance(document.get("manifests"), list):
        return OCI_INDEX
    return OCI_MANIFEST


#: manifest types whose ``config`` and ``layers`` are blobs of the repository (image manifests)
IMAGE_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
#: layers a registry need not have (nor check): fetched from the descriptor's ``urls``, if at all
_FOREIGN_LAYER_MARKS = ("foreign", "nondistributable")


def references(body: bytes, media: str) -> dict:
    """
    What a manifest of media type `media` says its repository serves,
    ``{digest: size or None}``, by the schema of that type: an image
    manifest's config and layers (OCI image manifest, Docker manifest v2),
    an index's manifests (OCI index, Docker manifest list).  Nothing else
    counts: not other fields (``blobs`` of the withdrawn OCI artifact
    manifest, ``subject``, anything a pusher adds -- registries keep it
    byte-exact unchecked), not foreign or non-distributable layers (a
    registry neither has nor checks them), not descriptors carrying
    ``urls``, not the references of other media types.  Digests the vault
    cannot verify are left out.
    """
    try:
        document = json.loads(body)
    except ValueError:
        return {}
    if not isinstance(document, dict):
        return {}
    descriptors = []
    if media in IMAGE_TYPES:
        if isinstance(document.get("config"), dict):
            descriptors.append(document["config"])
        layers = document.get("layers")
        if isinstance(layers, list):
            descriptors += [d for d in layers if isinstance(d, dict) and not _foreign(d)]
    elif media in INDEX_TYPES:
        manifests = document.get("manifests")
        if isinstance(manifests, list):
            descriptors += [d for d in manifests if isinstance(d, dict) and "urls" not in d]
    out = {}
    for d in descriptors:
        if isinstance(d.get("digest"), str) and DIGEST.match(d["digest"]):
            size = d.get("size")
            out[d["digest"]] = size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None
    return out


def _foreign(descriptor: dict) -> bool:
    media = descriptor.get("mediaType")
    return "urls" in descriptor or (isinstance(media, str)
                                    and any(mark in media.lower() for mark in _FOREIGN_LAYER_MARKS))


def platform_manifest(body: bytes, os_name: str = "linux", architecture: str = "amd64") -> tuple | None:
    """The (digest, media type) of an index's manifest for one platform, or None."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    items = document.get("manifests") if isinstance(document, dict) else None
    for d in items if isinstance(items, list) else []:
        platform = d.get("platform") if isinstance(d, dict) else None
        if (isinstance(platform, dict) and platform.get("os") == os_name
                and platform.get("architecture") == architecture and isinstance(d.get("digest"), str)
                and DIGEST.match(d["digest"])):
            return d["digest"], d.get("mediaType") if isinstance(d.get("mediaType"), str) else None
    return None


def artifact_type_filter(body: bytes, artifact_type: str) -> bytes:
    """A referrers index with only the entries of `artifact_type` (the client asked the vault to filter)."""
    try:
        document = json.loads(body)
    except ValueError:
        return body
    if not isinstance(document, dict) or not isinstance(document.get("manifests"), list):
        return body
    document["manifests"] = [m for m in document["manifests"]
                             if isinstance(m, dict) and m.get("artifactType") == artifact_type]
    return json.dumps(document, indent=3).encode()


def check_media_type(text: str) -> str:
    if not _MEDIA_TYPE.match(text):
        raise bad_request("UNSUPPORTED", f"invalid artifactType {text[:100]!r}")
    return text
