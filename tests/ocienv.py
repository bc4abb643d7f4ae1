"""
The real OCI clients and servers in tests: skopeo, isolated from this machine's
configuration and from the internet, and Debian's docker-registry (distribution
2.8) as a reference registry.

skopeo 1.9 ignores CONTAINERS_REGISTRIES_CONF and reads
``~/.config/containers/registries.conf``, so every run gets a HOME of its own
(``skopeo_home``) holding a registries.conf that blocks the public registries
and a policy.json that accepts anything, an empty auth file and lookaside
directory, and a proxy on a closed port for any name that is not loopback.
What it cannot isolate: as root, skopeo keeps its blob-info cache in
/var/lib/containers/cache (digest -> where it was seen; harmless for pulls).

These helpers block: from a test running the reactor (an in-process
FakeRegistry), call them through ``twisted.internet.threads.deferToThread``.
"""

import contextlib
import json
import os
import subprocess
import tempfile
import time

import pytest
import pytest_twisted

from tests.fakeregistry import OCI_INDEX, OCI_MANIFEST, FakeRegistry, Manifest, write_dir_layout, write_oci_layout
from tests.hfenv import fetch, free_port, stop_process

SKOPEO = "/usr/bin/skopeo"
DOCKER_REGISTRY = "/usr/bin/docker-registry"

REGISTRIES_CONF = """\
# written by tests/ocienv.py: only fully qualified names, no public registry
unqualified-search-registries = []
short-name-mode = "disabled"
"""
_BLOCKED = ("docker.io", "registry-1.docker.io", "quay.io", "ghcr.io", "gcr.io", "registry.k8s.io",
            "*.io", "*.com", "*.org", "*.net", "*.dev")
POLICY = '{"default": [{"type": "insecureAcceptAnything"}]}\n'
CLOSED_PROXY = "http://127.0.0.1:9"  # Go never proxies loopback; anything else fails at once


@pytest.fixture
def rig():
    """Starts FakeRegistry(**options).listen() as often as the test asks; closes them all after it."""
    started = []

    def start(**options) -> FakeRegistry:
        reg = FakeRegistry(**options).listen()
        started.append(reg)
        return reg

    yield start
    for reg in started:
        pytest_twisted.blockon(reg.close())


@pytest.fixture
def home(tmp_path):
    """A HOME for skopeo (see ``skopeo_home``), one a test."""
    return tmp_path / "skopeo-home"


def _need(binary: str, what: str) -> None:
    if not os.access(binary, os.X_OK):
        pytest.skip(f"{what} is not installed ({binary} missing; Debian package {what})")


def skopeo_home(folder) -> str:
    """Make ``folder`` a HOME for skopeo (idempotent); returns it as a string."""
    home = os.fspath(folder)
    conf = os.path.join(home, ".config", "containers")
    os.makedirs(conf, exist_ok=True)
    for sub in ("tmp", "run", "registries.d"):
        os.makedirs(os.path.join(home, sub), exist_ok=True)
    with open(os.path.join(conf, "registries.conf"), "w") as fh:
        fh.write(REGISTRIES_CONF)
        for prefix in _BLOCKED:  # a wildcard prefix may not have a location, a plain one must
            location = "" if prefix.startswith("*.") else f'location = "{prefix}"\n'
            fh.write(f'\n[[registry]]\nprefix = "{prefix}"\n{location}blocked = true\n')
    with open(os.path.join(conf, "policy.json"), "w") as fh:
        fh.write(POLICY)
    with open(os.path.join(home, "auth.json"), "w") as fh:
        fh.write('{"auths": {}}\n')
    return home


def skopeo_env(home: str) -> dict:
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": home,
        "XDG_CONFIG_HOME": os.path.join(home, ".config"),
        "XDG_RUNTIME_DIR": os.path.join(home, "run"),
        "REGISTRY_AUTH_FILE": os.path.join(home, "auth.json"),
        "TMPDIR": os.path.join(home, "tmp"),
        "HTTP_PROXY": CLOSED_PROXY, "HTTPS_PROXY": CLOSED_PROXY, "NO_PROXY": "",
        "LANG": "C.UTF-8",
    }


def skopeo(*args, home=None, timeout: float = 60, check: bool = False,
           debug: bool = False) -> subprocess.CompletedProcess:
    """Run ``skopeo ARGS`` isolated (text output); check=True fails the test on a non-zero exit."""
    _need(SKOPEO, "skopeo")
    with contextlib.ExitStack() as stack:
        if home is None:
            home = stack.enter_context(tempfile.TemporaryDirectory(prefix="skopeo-home-"))
        home = skopeo_home(home)
        isolation = ["--registries.d", os.path.join(home, "registries.d"),
                     "--policy", os.path.join(home, ".config", "containers", "policy.json"),
                     "--tmpdir", os.path.join(home, "tmp")] + (["--debug"] if debug else [])
        args = [os.fspath(a) for a in args]
        proc = subprocess.run([SKOPEO, *isolation, *args], env=skopeo_env(home), capture_output=True, text=True,
                              timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"skopeo failed ({proc.returncode}): skopeo {' '.join(args)}\n{proc.stderr}")
    return proc


def _tls_flags(ref: str, side: str):
    return [f"--{side}-tls-verify=false"] if ref.startswith("docker://") else []


def _creds(flag: str, creds):
    if creds is None:
        return []
    return [flag, creds if isinstance(creds, str) else "%s:%s" % tuple(creds)]


def skopeo_copy(src: str, dest, *args, layout: str = "dir", arch=None, src_creds=None, home=None,
                timeout: float = 60, check: bool = True, debug: bool = False) -> subprocess.CompletedProcess:
    """``skopeo [--override-arch ARCH] copy ARGS SRC DEST``.

    A DEST without a transport is a path written as ``layout`` ("dir" or "oci";
    ``oci:PATH:TAG`` may be given in full).  ``args`` are copy options
    (``--all``, ``--retry-times=0``, ...)."""
    dest = os.fspath(dest)
    if not dest.startswith(("dir:", "oci:", "docker://", "oci-archive:", "docker-archive:")):
        dest = f"{layout}:{dest}"
    argv = ["--override-arch", arch] if arch else []
    argv += ["copy", *_tls_flags(src, "src"), *_tls_flags(dest, "dest"), *_creds("--src-creds", src_creds),
             *args, src, dest]
    return skopeo(*argv, home=home, timeout=timeout, check=check, debug=debug)


def skopeo_inspect(ref: str, *args, raw: bool = False, config: bool = False, creds=None, home=None,
                   timeout: float = 60, check: bool = True):
    """``skopeo inspect``: bytes with raw=True (the exact manifest or config), else the parsed JSON."""
    argv = ["inspect", *(["--tls-verify=false"] if ref.startswith("docker://") else []),
            *_creds("--creds", creds), *(["--raw"] if raw else []), *(["--config"] if config else []), *args, ref]
    proc = skopeo(*argv, home=home, timeout=timeout, check=check)
    if not check and proc.returncode != 0:
        return proc
    return proc.stdout.encode() if raw else json.loads(proc.stdout)


class DockerRegistry:
    """Debian's docker-registry 2.8 on a free 127.0.0.1 port, storage in ``folder``, no auth.

    ``proxy="http://..."`` runs it as a pull-through cache of that registry (its
    proxy mode needs the upstream up before it starts).  Skips the test when the
    binary is missing.
    """

    def __init__(self, folder, proxy=None, proxy_username=None, proxy_password=None, timeout: float = 15):
        self.folder = os.fspath(folder)
        self.proxy = proxy
        self.proxy_auth = (proxy_username, proxy_password)
        self.timeout = timeout
        self.proc = None
        self.port = None
        self.url = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ref(self, name: str, reference: str = "latest") -> str:
        sep = "@" if reference.startswith("sha256:") else ":"
        return f"{self.host}/{name}{sep}{reference}"

    @property
    def log_path(self) -> str:
        return os.path.join(self.folder, "registry.log")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()

    def _config(self) -> dict:
        config = {
            "version": 0.1,
            "log": {"level": "info", "fields": {"service": "registry"}},
            "storage": {"filesystem": {"rootdirectory": os.path.join(self.folder, "storage")},
                        "delete": {"enabled": True}, "cache": {"blobdescriptor": "inmemory"}},
            "http": {"addr": self.host, "secret": "ocienv-test-secret",
                     "headers": {"X-Content-Type-Options": ["nosniff"]}},
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.proxy:
            config["proxy"] = {"remoteurl": self.proxy}
            if self.proxy_auth[0]:
                config["proxy"].update(username=self.proxy_auth[0], password=self.proxy_auth[1])
        return config

    def __enter__(self) -> "DockerRegistry":
        import yaml

        _need(DOCKER_REGISTRY, "docker-registry")
        os.makedirs(self.folder, exist_ok=True)
        self.port = free_port()
        self.url = f"http://{self.host}"
        config_path = os.path.join(self.folder, "config.yml")
        with open(config_path, "w") as fh:
            yaml.safe_dump(self._config(), fh)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([DOCKER_REGISTRY, "serve", config_path], stdout=log, stderr=log,
                                         cwd=self.folder)
        deadline = time.time() + self.timeout
        while True:
            try:
                if fetch("GET", self.url + "/v2/", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"docker-registry exited ({self.proc.returncode}):\n{self.log()}")
            if time.time() > deadline:
                self.__exit__(None, None, None)
                raise AssertionError(f"docker-registry did not answer /v2/:\n{self.log()}")
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def push(self, name: str, manifest: Manifest, tag: str, home=None) -> subprocess.CompletedProcess:
        """Put a rig image (an index: all of it) into this registry with skopeo, from an ``oci:``
        layout, or a ``dir:`` one for Docker media types (skopeo's oci: reader skips those)."""
        folder = os.path.join(self.folder, "layouts", manifest.hex)
        if manifest.media_type in (OCI_MANIFEST, OCI_INDEX):
            if not os.path.exists(os.path.join(folder, "index.json")):
                write_oci_layout(folder, {"image": manifest})
            src = f"oci:{folder}:image"
        else:
            src = "dir:" + write_dir_layout(folder, manifest)
        args = ["--all"] if manifest.is_index else []
        return skopeo_copy(src, f"docker://{self.ref(name, tag)}", *args, home=home)
