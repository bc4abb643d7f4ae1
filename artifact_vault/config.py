"""
Configuration: YAML in, validated and frozen objects out.

Every problem is reported as one `ConfigError` that names the key it is
about (``backends[1].config.base_url: ...``), so that the daemon can exit with a
single readable line instead of a traceback.  Strings may refer to the
environment with ``${VAR}`` or ``${VAR:-default}``; an unset variable without a
default becomes the empty string (so ``token: ${HF_TOKEN}`` simply means "no
token" when the variable is not set).
"""

import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import urlsplit

import yaml

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HOST_PATTERN = re.compile(r"^(\*|(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?\.?)$")


class ConfigError(Exception):
    """A configuration problem, tied to the key it is about."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class Option:
    """One backend option: its kind, its default, and an optional check."""

    kind: type | tuple
    default: Any = None
    check: Any = None  # callable(value) -> problem string or None
    required: bool = False


def _positive(value):
    return None if value > 0 else "must be greater than 0"


def _redirect_limit(value):
    return None if 0 <= value <= 50 else "must be between 0 and 50"


def _prefix(value):
    if not (value.startswith("/") and value.endswith("/")) or len(value) < 3:
        return "must start and end with '/' and name a path, e.g. /huggingface/"
    if "//" in value or any(seg in (".", "..") for seg in value.split("/")):
        return "must not contain empty, '.' or '..' segments"
    if not all(c.isalnum() or c in "/-_." for c in value):
        return "may contain only letters, digits, '-', '_', '.' and '/'"
    return None


def _http_url(value):
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if parts.username or parts.password:
        return "must not carry credentials; use headers or token instead"
    if parts.query or parts.fragment:
        return "must not have a query or fragment"
    return None


def _headers(value):
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            return "must map header names to string values"
        if not re.match(r"^[A-Za-z0-9-]+$", k) or "\n" in v or "\r" in v:
            return f"header {k!r} is not a valid header line"
    return None


def _ca_file(value):
    """A readable PEM file with at least one certificate in it ("" means none: ${CA_FILE} unset)."""
    from cryptography import x509

    if value == "":
        return None
    path = os.path.expanduser(value)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"cannot read {value}: {e.strerror}"
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        return f"{value} holds no PEM certificate that can be read ({e})"
    return None if certificates else f"{value} holds no PEM certificate"


def parse_size(value, key) -> int:
    """'500G', '10 MiB', '1.5T', 1024 -> bytes (K, M, G, T, P are powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ConfigError(key, "must be greater than 0")
        return value
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", str(value), re.I)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(key, f"is not a size like 500G or 10MiB: {value!r}")
    return int(float(m.group(1)) * 1024 ** " KMGTP".index((m.group(2) or " ").upper()))


def _size(value):
    try:
        parse_size(value, "")
    except ConfigError as e:
        return e.problem
    return None


#: Options every backend type understands.
COMMON_OPTIONS = {
    "prefix": Option(str, None, _prefix),
    "base_url": Option(str, None, _http_url, required=True),
    "timeout": Option((int, float), 60, _positive),
    "max_redirects": Option(int, 5, _redirect_limit),
    "headers": Option(dict, {}, _headers),
    # Cap on this backend's share of the cache (e.g. 200G); least recently used entries go first.
    "max_cache_size": Option((str, int), None, _size),
    # Upstream downloads this backend runs at once; further cache misses wait for a free slot.
    "max_downloads": Option(int, 16, lambda v: None if 1 <= v <= 1024 else "must be between 1 and 1024"),
    # PEM file of the CA certificates an https:// upstream of this backend (and every
    # host it redirects to) must chain to, instead of the system's CAs.
    "ca_file": Option(str, None, _ca_file),
}

#: Per type: extra options, and defaults that replace the common ones.
BACKEND_TYPES: dict[str, tuple[dict, dict]] = {
    "http": ({}, {}),
    "huggingface": (
        {
            "token": Option(str, ""),
            # How long a branch/tag -> commit answer is reused without asking
            # the hub again (seconds).  0 asks the hub on every request.
            "revision_ttl": Option((int, float), 60, lambda v: None if v >= 0 else "must be 0 or more"),
            # How long a request waits for the hub before it falls back to
            # what the cache knows (seconds).  Clients give up after 10 s.
            "offline_timeout": Option((int, float), 4, _positive),
            # Who may read cached private/gated content (see backends/hf_access.py):
            # "shared" lends the token to clients without one; "per-client" never does.
            "access": Option(str, "shared", lambda v: None if v in ("shared", "per-client")
                             else "must be 'shared' or 'per-client'"),
            # How long the hub's yes/no on a client's access to a repo is reused (seconds).
            "access_ttl": Option((int, float), 300, lambda v: None if v >= 0 else "must be 0 or more"),
            # While the hub is unreachable, how old a yes may be and still count (seconds).
            "offline_access_grace": Option((int, float), 86400, lambda v: None if v >= 0 else "must be 0 or more"),
        },
        {"prefix": "/huggingface/", "base_url": "https://huggingface.co"},
    ),
    "apt": (
        {
            # Seconds InRelease, Release and the other mutable files of the
            # repository are reused before upstream is asked again (>= 0).
            "index_ttl": Option((int, float), 60, lambda v: None if v >= 0 else "must be 0 or more"),
            # Seconds a request waits for the mirror when a kept copy could answer instead.
            "offline_timeout": Option((int, float), 4, _positive),
        },
        {},
    ),
    "oci": (
        {
            # The name clients use for this upstream (docker.io, ghcr.io, registry.example.org:5000):
            # ?ns=<registry> and /v2/<registry>/<name>/... pick this backend.
            "registry": Option(str, None, lambda v: _registry_name(v), required=True),
            # Serves the /v2/<name>/... requests that name no registry (one backend at most).
            "default": Option(bool, False),
            # The upstream login, for the token flow or Basic auth (default: anonymous).
            "username": Option(str, ""),
            "password": Option(str, ""),
            # How long a tag -> digest answer is reused without asking upstream (seconds).
            "tag_ttl": Option((int, float), 300, lambda v: None if v >= 0 else "must be 0 or more"),
            # How long to wait for upstream when a kept answer could serve instead (seconds).
            "offline_timeout": Option((int, float), 4, _positive),
        },
        {},
    ),
}

BACKEND_TYPES["pypi"] = (
    {
        # How long a simple-index page is reused before upstream is asked
        # again (seconds; a conditional request).  0 asks on every request.
        "index_ttl": Option((int, float), 600, lambda v: None if v >= 0 else "must be 0 or more"),
        # How long a request waits for upstream when a kept page could answer
        # instead (seconds).  pip gives up after 15 s.
        "offline_timeout": Option((int, float), 4, _positive),
    },
    {"prefix": "/pypi/"},
)


_REGISTRY = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:[0-9]{1,5})?$")


def _registry_name(value):
    if not _REGISTRY.match(value) or len(value) > 253:
        return "must be a registry host name in lower case, with an optional :port (e.g. docker.io, ghcr.io)"
    return None


def _check_together(backends) -> None:
    """What no single backend can check: registries and the default of the oci backends."""
    seen, default = {}, None
    for i, b in enumerate(backends):
        if b.type != "oci":
            continue
        registry = b.options["registry"]
        if registry in seen:
            raise ConfigError(f"backends[{i}].config.registry",
                              f"{registry} is already served by backends[{seen[registry]}]")
        seen[registry] = i
        if b.options["default"]:
            if default is not None:
                raise ConfigError(f"backends[{i}].config.default",
                                  f"only one oci backend may be the default (backends[{default}] is)")
            default = i


TOP_LEVEL = {"http_host", "http_port", "cache_dir", "log_level", "workers", "access_tokens", "max_cache_size",
             "admin_token", "allowed_hosts", "peers", "peers_token", "access_log", "backends"}

#: at most this many peers (each is asked for its status when the cluster is shown)
MAX_PEERS = 128


@dataclass(frozen=True)
class BackendConfig:
    type: str
    name: str
    prefix: str
    base_url: str
    timeout: float
    max_redirects: int
    headers: Mapping[str, str]
    max_cache_size: int | None = None
    max_downloads: int = 16
    #: absolute path of the PEM CAs trusted for this backend's https:// upstreams (None: the system's)
    ca_file: str | None = None
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class VaultConfig:
    http_host: str
    http_port: int
    cache_dir: str
    log_level: str
    backends: tuple
    workers: int = 1
    #: when not empty, clients must present one of these (see site.py)
    access_tokens: tuple = ()
    #: bytes the whole cache may hold (None: no cap)
    max_cache_size: int | None = None
    #: guards /_vault/admin/ (None: the admin endpoints are off)
    admin_token: str | None = None
    #: Host header names accepted (empty: the default that http_host implies, see site.HostCheck)
    allowed_hosts: tuple = ()
    #: base URLs of the other vaults of a cluster, shown on the status page (see cluster.py)
    peers: tuple = ()
    #: an access token the peers accept, sent to them only (None: nothing is sent)
    peers_token: str | None = None
    #: where access log lines go: "-" (standard output), an absolute path, or None (off); see accesslog.py
    access_log: str | None = "-"


def default_cache_dir(environ=None) -> str:
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "artifact-vault")


#: The configuration used when no --config is given.
DEFAULT_DOCUMENT = {
    "http_host": "localhost",
    "http_port": 8080,
    "log_level": "INFO",
    "backends": [{"type": "huggingface", "config": {}}],
}


def interpolate(value: str, key: str, environ: Mapping[str, str]) -> str:
    def substitute(match):
        name, default = match.group(1), match.group(2)
        found = environ.get(name)
        if found is None or (found == "" and default is not None):
            return default if default is not None else ""
        return found

    if "${" in value and not _ENV_REF.search(value):
        raise ConfigError(key, "has a '${' that is not a ${VAR} or ${VAR:-default} reference")
    return _ENV_REF.sub(substitute, value)


def _interpolate_tree(node, key, environ):
    if isinstance(node, str):
        return interpolate(node, key, environ)
    if isinstance(node, list):
        return [_interpolate_tree(v, f"{key}[{i}]", environ) for i, v in enumerate(node)]
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, f"{key}.{k}" if key else str(k), environ) for k, v in node.items()}
    return node


def _typed(value, option: Option, key: str):
    kinds = option.kind if isinstance(option.kind, tuple) else (option.kind,)
    if bool in kinds and isinstance(value, str) and value.strip().lower() in _BOOLEANS:
        value = _BOOLEANS[value.strip().lower()]  # from ${ENV}
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(key, f"must be {_kind_name(kinds)}, not a boolean")
    if isinstance(value, str) and str not in kinds and (int in kinds or float in kinds):
        # Values from ${ENV} arrive as strings; accept numbers written that way.
        try:
            value = int(value) if int in kinds and value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            raise ConfigError(key, f"must be {_kind_name(kinds)}, got {value!r}") from None
    if not isinstance(value, kinds):
        raise ConfigError(key, f"must be {_kind_name(kinds)}, got {type(value).__name__}")
    if option.check is not None:
        problem = option.check(value)
        if problem:
            raise ConfigError(key, problem)
    return value


_BOOLEANS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _kind_name(kinds):
    names = {bool: "true or false", str: "a string", int: "an integer", float: "a number", dict: "a mapping", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _backend(raw, index, environ) -> BackendConfig:
    where = f"backends[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(where, "must be a mapping with type, name and config")
    unknown = sorted(str(k) for k in set(raw) - {"type", "name", "config"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", "unknown key (expected type, name, config)")
    btype = raw.get("type")
    if not isinstance(btype, str) or btype not in BACKEND_TYPES:
        raise ConfigError(f"{where}.type", f"unknown backend type {btype!r} (known: {', '.join(BACKEND_TYPES)})")
    extra, defaults = BACKEND_TYPES[btype]
    options = {**COMMON_OPTIONS, **extra}
    conf = raw.get("config") or {}
    if not isinstance(conf, dict):
        raise ConfigError(f"{where}.config", "must be a mapping")
    for k in conf:
        if k not in options:
            raise ConfigError(f"{where}.config.{k}", f"unknown key for a {btype} backend (known: {', '.join(options)})")
    values = {}
    for k, option in options.items():
        key = f"{where}.config.{k}"
        if k in conf and conf[k] is not None:
            values[k] = _typed(conf[k], option, key)
        elif k in defaults:
            values[k] = defaults[k]
        elif option.required:
            raise ConfigError(key, "is required")
        else:
            values[k] = option.default
    values["base_url"] = values["base_url"].rstrip("/")
    name = raw.get("name")
    if name is None:
        name = btype if values["prefix"] is None else values["prefix"].strip("/").replace("/", "-")
    if not isinstance(name, str) or not _NAME.match(name) or name.startswith("_"):
        raise ConfigError(f"{where}.name", "must be 1-64 letters, digits, '.', '_' or '-' (used as a folder name)")
    if values["prefix"] is None:
        values["prefix"] = f"/{name}/"
    if values["max_cache_size"] is not None:
        values["max_cache_size"] = parse_size(values["max_cache_size"], f"{where}.config.max_cache_size")
    common = {k: values.pop(k) for k in COMMON_OPTIONS}
    return BackendConfig(
        type=btype,
        name=name,
        prefix=common["prefix"],
        base_url=common["base_url"],
        timeout=float(common["timeout"]),
        max_redirects=common["max_redirects"],
        headers=MappingProxyType(dict(common["headers"])),
        max_cache_size=common["max_cache_size"],
        max_downloads=common["max_downloads"],
        ca_file=os.path.abspath(os.path.expanduser(common["ca_file"])) if common["ca_file"] else None,
        options=MappingProxyType(values),
    )


def parse(document, environ=None, cache_dir=None) -> VaultConfig:
    """Validate a YAML document (already loaded) into a `VaultConfig`."""
    environ = os.environ if environ is None else environ
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError("", "the configuration must be a YAML mapping of keys to values")
    for k in document:
        if k not in TOP_LEVEL:
            raise ConfigError(str(k), f"unknown key (known: {', '.join(sorted(TOP_LEVEL))})")
    document = _interpolate_tree(document, "", environ)

    host = document.get("http_host", "localhost")
    if not isinstance(host, str) or not host or any(c.isspace() for c in host):
        raise ConfigError("http_host", "must be a host name or address")
    port = document.get("http_port", 8080)
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError("http_port", f"must be a port number from 1 to 65535, got {port!r}")
    level = document.get("log_level", "INFO")
    if not isinstance(level, str) or level.upper() not in LOG_LEVELS:
        raise ConfigError("log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    cdir = cache_dir or document.get("cache_dir") or default_cache_dir(environ)
    if not isinstance(cdir, str):
        raise ConfigError("cache_dir", "must be a path")
    cdir = os.path.abspath(os.path.expanduser(cdir))

    workers = document.get("workers", 1)
    if isinstance(workers, str) and workers.isdigit():
        workers = int(workers)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 64:
        raise ConfigError("workers", f"must be a number of processes from 1 to 64, got {workers!r}")

    tokens = document.get("access_tokens") or []
    if isinstance(tokens, str):
        tokens = [t for t in tokens.replace(",", " ").split() if t]
    if not isinstance(tokens, list) or not all(isinstance(t, str) and len(t) >= 8 and t.isprintable()
                                                and " " not in t for t in tokens):
        raise ConfigError("access_tokens", "must be a list of tokens of 8 or more printable characters, no spaces")
    tokens = [t for t in tokens if t]

    raw_backends = document.get("backends", [])
    if not isinstance(raw_backends, list):
        raise ConfigError("backends", "must be a list of {type, name, config}")
    backends = []
    for i, raw in enumerate(raw_backends):
        b = _backend(raw, i, environ)
        for j, other in enumerate(backends):
            if other.prefix == b.prefix:
                raise ConfigError(f"backends[{i}].config.prefix", f"{b.prefix} is already used by backends[{j}]")
            if other.name == b.name:
                raise ConfigError(f"backends[{i}].name", f"{b.name!r} is already used by backends[{j}]")
        backends.append(b)
    _check_together(backends)
    cap = document.get("max_cache_size")
    cap = parse_size(cap, "max_cache_size") if cap is not None else None
    admin = document.get("admin_token") or None
    if admin is not None and (not isinstance(admin, str) or len(admin) < 16 or not admin.isprintable()
                              or " " in admin):
        raise ConfigError("admin_token", "must be a string of 16 or more printable characters without spaces")
    hosts = document.get("allowed_hosts") or []
    if isinstance(hosts, str):
        hosts = [h for h in hosts.replace(",", " ").split() if h]
    if not isinstance(hosts, list) or not all(isinstance(h, str) and _HOST_PATTERN.match(h) for h in hosts):
        raise ConfigError("allowed_hosts", "must be a list of host names, each may start with '*.' (or be '*')")
    peers = _peers(document.get("peers") or [])
    peers_token = document.get("peers_token") or None
    if peers_token is not None and (not isinstance(peers_token, str) or len(peers_token) < 8
                                    or not peers_token.isprintable() or " " in peers_token):
        raise ConfigError("peers_token", "must be a token of 8 or more printable characters, no spaces")
    access_log = _access_log(document.get("access_log"))
    return VaultConfig(host, port, cdir, level.upper(), tuple(backends), workers, tuple(tokens), cap, admin,
                       tuple(h.lower().rstrip(".") for h in hosts), peers, peers_token, access_log)


def _peers(value) -> tuple:
    """``peers``: base URLs (a list, or one string separated by commas or spaces), without duplicates."""
    if isinstance(value, str):
        value = [u for u in value.replace(",", " ").split() if u]
    if not isinstance(value, list):
        raise ConfigError("peers", "must be a list of the other vaults' base URLs, e.g. [http://10.0.0.12:8080]")
    if len(value) > MAX_PEERS:
        raise ConfigError("peers", f"at most {MAX_PEERS} peers")
    urls = []
    for i, url in enumerate(value):
        problem = _http_url(url) if isinstance(url, str) else "must be a URL"
        if problem and "credentials" in problem:
            problem = "must not carry credentials (peers_token is what the peers are sent)"
        if problem:
            raise ConfigError(f"peers[{i}]", problem)
        url = url.rstrip("/")
        if url not in urls:
            urls.append(url)
    return tuple(urls)


def _access_log(value) -> str | None:
    """``access_log``: off (also YAML's unquoted off, a boolean), "-", or a file the vault can append to."""
    if value is False or value == "off":
        return None
    if value is None or value == "-" or value == "":
        return "-"
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("access_log", "must be a file path, \"-\" (standard output) or off")
    path = os.path.abspath(os.path.expanduser(value))
    if os.path.isdir(path):
        raise ConfigError("access_log", f"{value} is a folder, not a file")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise ConfigError("access_log", f"{value} is not writable")
    elif not os.path.isdir(os.path.dirname(path)):
        raise ConfigError("access_log", f"the folder of {value} does not exist")
    elif not os.access(os.path.dirname(path), os.W_OK | os.X_OK):
        raise ConfigError("access_log", f"cannot create {value}: its folder is not writable")
    return path


def load(path=None, environ=None, cache_dir=None) -> VaultConfig:
    """Read and validate the file at `path`, or the embedded default."""
    if path is None:
        return parse(DEFAULT_DOCUMENT, environ, cache_dir)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("", f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"config file {path} is not UTF-8 text") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError("", f"config file {path} is not valid YAML{where}: {problem}") from None
    return parse(document, environ, cache_dir)
