"""
The simple repository API's language (PEP 503, 592, 629, 658, 691, 700, 714):
project names, content negotiation, and index pages.

An upstream page, JSON or HTML, is parsed once into a *normal form* (a small
JSON document, the one that is kept), and every answer is rendered from it:
JSON or HTML alike, whichever the upstream spoke.  The normal form of a
project page::

    {"form": 1, "name": "<normalised name>", "versions": [...],
     "files": [{"filename", "id", "url" (upstream, absolute, no fragment),
                "hashes": {name: hex}, "requires-python": str | None,
                "yanked": False | True | "reason", "core-metadata": False | True | {name: hex},
                "size": int | None, "upload-time": str | None}]}

and of the project list ``{"form": 1, "projects": [names as upstream spells them]}``.

Everything taken from upstream is checked on the way in: a file whose URL is
not http(s), whose name could not be a path segment of the vault, or which
would shadow a ``.metadata`` companion is left out; hashes that are not hex
of the right length, odd ``requires-python`` or yank reasons, sizes and
upload times that are not what the PEPs say are dropped.  ``id`` names the
file in the vault's URL: its sha256 when the index gives one (the file is
then verified against it), else ``url-`` and 32 hex digits of the sha256 of
its upstream URL.
"""

import hashlib
import html
import json
import re
from html.parser import HTMLParser
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

JSON_V1 = "application/vnd.pypi.simple.v1+json"
HTML_V1 = "application/vnd.pypi.simple.v1+html"
TEXT_HTML = "text/html"
#: the forms the vault answers in; on equal quality the earlier wins (as PyPI does)
FORMS = (TEXT_HTML, HTML_V1, JSON_V1)
CONTENT_TYPES = {JSON_V1: JSON_V1, HTML_V1: HTML_V1, TEXT_HTML: "text/html; charset=utf-8"}
_ALIASES = {"application/vnd.pypi.simple.latest+json": JSON_V1,
            "application/vnd.pypi.simple.latest+html": HTML_V1}
_JSON_TYPES = (JSON_V1, "application/vnd.pypi.simple.latest+json", "application/json")
#: what the vault asks upstream for: JSON where it is offered, HTML otherwise
UPSTREAM_ACCEPT = f"{JSON_V1}, {HTML_V1};q=0.2, {TEXT_HTML};q=0.01"
API_VERSION = "1.1"

FORM = 1  # version of the normal form
_NAME = re.compile(r"^([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9])$")
MAX_NAME = 150
#: bytes of a file name: with ".metadata" it still fits a path segment of the cache (200)
MAX_FILENAME = 190
HASH_LENGTHS = {"md5": 32, "sha1": 40, "sha224": 56, "sha256": 64, "sha384": 96, "sha512": 128,
                "blake2b": 128, "blake2s": 64}
_HEX = re.compile(r"^[0-9a-f]+$")
_UPLOAD_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")
FILE_ID = re.compile(r"^([0-9a-f]{64}|url-[0-9a-f]{32})$")
SDIST_SUFFIXES = (".tar.gz", ".zip", ".tar.bz2", ".tar.xz", ".tgz", ".tar")
METADATA_SUFFIX = ".metadata"
_ATTRIBUTE_LIMIT = 1000


class PageError(ValueError):
    """An upstream page the vault cannot read."""


def normalize(name: str) -> str:
    """PEP 503: runs of ``-``, ``_`` and ``.`` become one ``-``, all lower case."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_name(text: str) -> str | None:
    """The normalised name of a valid project name (PEP 508), or None."""
    if len(text) > MAX_NAME or not _NAME.match(text):
        return None
    return normalize(text)


# -- negotiation ---------------------------------------------------------------------


def choose_form(accept: str | None) -> str | None:
    """
    The form to answer in for an ``Accept`` header (PEP 691): the offered
    type of highest quality, the most specific range deciding each type's
    quality (``*/*``, ``text/*``, the type itself); None when nothing
    offered is acceptable (406).  No header, or an empty one, accepts
    anything: text/html then, as for any client that predates PEP 691.
    """
    if accept is None or not accept.strip():
        return TEXT_HTML
    ranges = []
    for item in accept[:4000].split(",")[:64]:
        media, *params = [part.strip() for part in item.split(";")]
        if not media:
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    quality = 0.0
        media = media.lower()
        ranges.append((_ALIASES.get(media, media), quality))
    best, best_quality = None, 0.0
    for form in FORMS:
        family = form.split("/")[0] + "/*"
        quality, rank = 0.0, 0
        for media, q in ranges:
            r = 3 if media == form else 2 if media == family else 1 if media == "*/*" else 0
            if r > rank:
                quality, rank = q, r
        if quality > best_quality:  # NaN never wins
            best, best_quality = form, quality
    return best


def is_json(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() in _JSON_TYPES


# -- parsing upstream pages ------------------------------------------------------------


class _Anchors(HTMLParser):
    """The ``<a>`` tags of an HTML page (attribute values already unescaped) and its ``<base href>``."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.anchors: list[tuple[dict, str]] = []
        self.base: str | None = None
        self._open: dict | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "base" and self.base is None:
            self.base = dict(attrs).get("href") or None
        elif tag == "a":
            self._close()
            self._open, self._text = dict(attrs), []

    def handle_endtag(self, tag):
        if tag == "a":
            self._close()

    def handle_data(self, data):
        if self._open is not None:
            self._text.append(data)

    def _close(self):
        if self._open is not None:
            self.anchors.append((self._open, "".join(self._text).strip()))
            self._open = None

    def close(self):
        super().close()
        self._close()


def _html(body: bytes, content_type: str | None) -> _Anchors:
    charset = "utf-8"
    m = re.search(r"charset=([\w-]+)", content_type or "", re.I)
    if m:
        charset = m.group(1)
    try:
        text = body.decode(charset, "replace")
    except LookupError:
        text = body.decode("utf-8", "replace")
    parser = _Anchors()
    parser.feed(text)
    parser.close()
    return parser


def _json(body: bytes) -> dict:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise PageError(f"not JSON: {e}") from None
    if not isinstance(document, dict):
        raise PageError("not a JSON object")
    meta = document.get("meta")
    version = meta.get("api-version") if isinstance(meta, dict) else None
    if not isinstance(version, str) or version.split(".")[0] != "1":
        raise PageError(f"api-version {version!r} is not 1.x")
    return document


def _text(value, limit=_ATTRIBUTE_LIMIT) -> str | None:
    """A string worth relaying (printable, not too long), else None."""
    if isinstance(value, str) and len(value) <= limit and value.isprintable():
        return value
    return None


def _hashes(value) -> dict:
    out = {}
    if isinstance(value, dict):
        for name, digest in value.items():
            if not isinstance(name, str) or not isinstance(digest, str):
                continue
            name, digest = name.lower(), digest.lower()
            if HASH_LENGTHS.get(name) == len(digest) and _HEX.match(digest):
                out[name] = digest
    return out


def _fragment_hashes(fragment: str) -> dict:
    name, _, digest = fragment.partition("=")
    return _hashes({name: digest}) if digest else {}


def _metadata_attribute(value) -> bool | dict:
    """``data-core-metadata``: absent, "true", or "<hash name>=<hex>" (anything else: not offered)."""
    if value is None:
        return False
    if value.strip().lower() == "true":
        return True
    return _fragment_hashes(value.strip()) or False


def _core_metadata(value) -> bool | dict:
    if value is True:
        return True
    if isinstance(value, dict):
        return _hashes(value) or False
    return False


def _yanked(value) -> bool | str:
    """PEP 592: true, or the reason (HTML's empty attribute: no reason); anything else is not a yank."""
    if value is True:
        return True
    if isinstance(value, str):
        return _text(value) or True
    return False


def _filename_ok(name: str) -> bool:
    if not name or name in (".", "..") or len(name.encode("utf-8", "surrogatepass")) > MAX_FILENAME:
        return False
    if any(c in name for c in "/\\%") or not name.isprintable():
        return False
    return not name.endswith((METADATA_SUFFIX, ".vault-meta", ".vault-tmp"))


def _clean_file(raw: dict, page_url: str) -> dict | None:
    href = raw.get("url")
    if not isinstance(href, str) or not href or len(href) > 8000:
        return None
    try:
        parts = urlsplit(urljoin(page_url, href.strip()))
        parts.port  # noqa: B018 - a malformed port raises here
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    filename = raw.get("filename")
    if not isinstance(filename, str):
        filename = unquote(parts.path.rsplit("/", 1)[-1])
    if not _filename_ok(filename):
        return None
    hashes = _hashes(raw.get("hashes")) or _fragment_hashes(parts.fragment)
    url = urlunsplit(parts._replace(fragment=""))
    size = raw.get("size")
    upload_time = raw.get("upload-time")
    sha256 = hashes.get("sha256")
    return {
        "filename": filename,
        "id": sha256 or "url-" + hashlib.sha256(url.encode()).hexdigest()[:32],
        "url": url,
        "hashes": hashes,
        "requires-python": _text(raw.get("requires-python")),
        "yanked": _yanked(raw.get("yanked")),
        "core-metadata": raw.get("core-metadata", False),
        "size": size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None,
        "upload-time": upload_time if isinstance(upload_time, str) and _UPLOAD_TIME.match(upload_time) else None,
    }


def version_of(filename: str, project: str) -> str | None:
    """The version a distribution's file name carries (wheels, sdists), or None."""
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        return parts[1] if len(parts) in (5, 6) else None
    for suffix in SDIST_SUFFIXES:
        if filename.lower().endswith(suffix):
            stem = filename[: -len(suffix)]
            for i, c in enumerate(stem):
                if c == "-" and normalize(stem[:i]) == project:
                    return stem[i + 1:] or None
    return None


def parse_project(body: bytes, content_type: str | None, page_url: str, project: str) -> dict:
    """The normal form of an upstream project page (JSON when it says so, else HTML)."""
    raws, versions = [], None
    if is_json(content_type):
        document = _json(body)
        files = document.get("files")
        if not isinstance(files, list):
            raise PageError("no files list")
        for item in files:
            if not isinstance(item, dict):
                continue
            metadata = item["core-metadata"] if "core-metadata" in item else item.get("dist-info-metadata")
            raws.append(dict(item, **{"core-metadata": _core_metadata(metadata)}))
        if isinstance(document.get("versions"), list):
            versions = [v for v in document["versions"] if _text(v, 200)]
    else:
        page = _html(body, content_type)
        base = urljoin(page_url, page.base) if page.base else page_url
        for attrs, _text_ in page.anchors:
            href = attrs.get("href")
            if not href:
                continue
            metadata = attrs.get("data-core-metadata", attrs.get("data-dist-info-metadata"))
            raws.append({
                "url": urljoin(base, href), "requires-python": attrs.get("data-requires-python"),
                "yanked": ("" if attrs["data-yanked"] is None else attrs["data-yanked"]) if "data-yanked" in attrs
                else False,
                "core-metadata": _metadata_attribute(metadata),
            })
    files, seen = [], set()
    for raw in raws:
        clean = _clean_file(raw, page_url)
        if clean is None or clean["filename"] in seen:
            continue
        seen.add(clean["filename"])
        files.append(clean)
    if versions is None:
        versions = list(dict.fromkeys(v for v in (version_of(f["filename"], project) for f in files) if v))
    return {"form": FORM, "name": project, "versions": versions, "files": files}


def parse_list(body: bytes, content_type: str | None) -> dict:
    """The normal form of an upstream project list."""
    names = []
    if is_json(content_type):
        projects = _json(body).get("projects")
        if not isinstance(projects, list):
            raise PageError("no projects list")
        names = [p.get("name") for p in projects if isinstance(p, dict)]
    else:
        names = [text for _attrs, text in _html(body, content_type).anchors]
    return {"form": FORM, "projects": [n for n in names if isinstance(n, str) and project_name(n)]}


# -- rendering --------------------------------------------------------------------------


def file_path(project: str, record: dict) -> str:
    """A file's path below the backend's prefix: ``files/<project>/<id>/<filename>``."""
    return f"files/{project}/{record['id']}/{quote(record['filename'], safe='')}"


def _link(project: str, record: dict) -> str:
    # relative to the project page, <prefix>simple/<project>/: works behind any mount point
    return "../../" + file_path(project, record)


def _hash_attribute(hashes: dict) -> str | None:
    if "sha256" in hashes:
        return f"sha256={hashes['sha256']}"
    for name, digest in hashes.items():
        return f"{name}={digest}"
    return None


def render_project(page: dict, form: str, metadata_offered=None) -> bytes:
    """
    The project page in `form`, file links into the vault.  When
    ``metadata_offered(record)`` is given, a ``.metadata`` companion is
    advertised only for the files it says yes to.
    """
    project = page["name"]
    files = page["files"]

    def metadata(record):
        offered = record["core-metadata"]
        if offered and metadata_offered is not None and not metadata_offered(record):
            return False
        return offered

    if form == JSON_V1:
        out = []
        for f in files:
            entry = {"filename": f["filename"], "url": _link(project, f), "hashes": f["hashes"]}
            if f["requires-python"] is not None:
                entry["requires-python"] = f["requires-python"]
            offered = metadata(f)
            if offered:
                entry["core-metadata"] = offered  # PEP 714: JSON has only the new name
            entry["yanked"] = f["yanked"]
            if f["size"] is not None:
                entry["size"] = f["size"]
            if f["upload-time"] is not None:
                entry["upload-time"] = f["upload-time"]
            out.append(entry)
        # API 1.1 (PEP 700) promises a size for every file; an HTML upstream may not give them
        version = API_VERSION if all(f["size"] is not None for f in files) else "1.0"
        return json.dumps({"meta": {"api-version": version}, "name": project, "files": out,
                           "versions": page["versions"]}, separators=(",", ":")).encode()
    lines = []
    for f in files:
        href = _link(project, f)
        fragment = _hash_attribute(f["hashes"])
        attrs = ['href="%s"' % html.escape(href + ("#" + fragment if fragment else ""))]
        if f["requires-python"] is not None:
            attrs.append('data-requires-python="%s"' % html.escape(f["requires-python"]))
        if f["yanked"] is not False:
            attrs.append('data-yanked="%s"' % html.escape(f["yanked"] if isinstance(f["yanked"], str) else ""))
        offered = metadata(f)
        if offered:
            value = "true" if offered is True else _hash_attribute(offered)
            # PEP 714: both names in HTML, for clients that know only the old one
            attrs.append('data-core-metadata="%s" data-dist-info-metadata="%s"' % (value, value))
        lines.append("    <a %s>%s</a><br />\n" % (" ".join(attrs), html.escape(f["filename"])))
    return _html_page(f"Links for {project}", "".join(lines))


def render_list(document: dict, form: str) -> bytes:
    projects = document["projects"]
    if form == JSON_V1:
        return json.dumps({"meta": {"api-version": API_VERSION}, "projects": [{"name": n} for n in projects]},
                          separators=(",", ":")).encode()
    links = "".join('    <a href="%s/">%s</a>\n' % (normalize(n), html.escape(n)) for n in projects)
    return _html_page("Simple index", links)


def _html_page(title: str, body: str) -> bytes:
    title = html.escape(title)
    return (
        "<!DOCTYPE html>\n<html>\n  <head>\n"
        f'    <meta name="pypi:repository-version" content="{API_VERSION}">\n'
        f"    <title>{title}</title>\n  </head>\n  <body>\n    <h1>{title}</h1>\n{body}  </body>\n</html>\n"
    ).encode("utf-8")
