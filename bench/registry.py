"""
What the OCI rows need: a registry holding images with big layers, and
skopeo, isolated from this machine's container configuration.

The registry is Debian's ``docker-registry`` (distribution 2.8, Go: what
registry:2 runs) when it is installed, with the images pushed by skopeo from
OCI layouts; otherwise the test suite's fake registry
(``python -m tests.fakeregistry``), which builds them itself.  The images are
``tests.fakeregistry.big_image``: one layer of random bytes in a gzip of
stored blocks, written once into the data folder and reused.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from .services import ROOT, BenchError, Processes, free_port, http_request, wait_http

SKOPEO = shutil.which("skopeo") or "/usr/bin/skopeo"
DOCKER_REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
REGISTRIES_CONF = 'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'
POLICY = '{"default": [{"type": "insecureAcceptAnything"}]}\n'


def have_skopeo() -> bool:
    return os.access(SKOPEO, os.X_OK)


def skopeo_version() -> str:
    if not have_skopeo():
        return "not installed"
    out = subprocess.run([SKOPEO, "--version"], capture_output=True, text=True, check=False).stdout.split()
    return out[-1] if out else "?"


class Skopeo:
    """skopeo with a HOME of its own: no registries.conf, auth or policy of this machine."""

    def __init__(self, procs: Processes, home: str):
        self.procs = procs
        self.home = home
        conf = os.path.join(home, ".config", "containers")
        os.makedirs(conf, exist_ok=True)
        os.makedirs(os.path.join(home, "tmp"), exist_ok=True)
        with open(os.path.join(conf, "registries.conf"), "w") as f:
            f.write(REGISTRIES_CONF)
        with open(os.path.join(conf, "policy.json"), "w") as f:
            f.write(POLICY)
        with open(os.path.join(home, "auth.json"), "w") as f:
            f.write('{"auths": {}}\n')

    def run(self, *args, timeout: float = 900) -> float:
        """Run ``skopeo ARGS``; returns the seconds it took, or raises BenchError."""
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": self.home,
               "XDG_CONFIG_HOME": os.path.join(self.home, ".config"),
               "REGISTRY_AUTH_FILE": os.path.join(self.home, "auth.json"),
               "TMPDIR": os.path.join(self.home, "tmp"), "NO_PROXY": "*", "LANG": "C.UTF-8"}
        argv = [SKOPEO, "--policy", os.path.join(self.home, ".config", "containers", "policy.json"),
                "--tmpdir", os.path.join(self.home, "tmp"), *args]
        t0 = time.perf_counter()
        proc = self.procs.spawn(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=timeout)
        finally:
            self.procs.forget(proc)
        took = time.perf_counter() - t0
        if proc.returncode != 0:
            raise BenchError(f"skopeo {' '.join(args[:3])}... failed: {err.decode(errors='replace')[-400:]}")
        return took

    def copy(self, ref: str, out: str) -> float:
        """``skopeo copy docker://REF dir:OUT`` (OUT is removed first and after); the seconds it took."""
        shutil.rmtree(out, ignore_errors=True)
        try:
            return self.run("copy", "--src-tls-verify=false", f"docker://{ref}", f"dir:{out}")
        finally:
            shutil.rmtree(out, ignore_errors=True)


@dataclass
class Registry:
    kind: str  # "docker-registry 2.8" or "fake registry"
    url: str
    proc: object

    @property
    def host(self) -> str:
        return self.url[len("http://"):]


def start_registry(procs: Processes, workdir: str, images: dict, data_dir: str, skopeo: Skopeo | None) -> tuple:
    """
    A registry holding ``images`` ({name: (layer size, seed)}, tag ``1.0``).
    Returns (Registry, {name: {"manifest": digest, "layer": digest, "size": bytes}}).
    """
    sys.path.insert(0, ROOT)
    from tests.fakeregistry import big_image, write_oci_layout

    built = {name: big_image(os.path.join(data_dir, "layers"), size, seed=seed)
             for name, (size, seed) in images.items()}
    info = {name: {"manifest": top.digest, "layer": top.layers()[0].digest, "size": top.layers()[0].size}
            for name, top in built.items()}
    if skopeo is not None and os.access(DOCKER_REGISTRY, os.X_OK):
        folder = os.path.join(workdir, "docker-registry")
        os.makedirs(folder, exist_ok=True)
        port = free_port()
        config = {"version": 0.1, "log": {"level": "warn"},
                  "storage": {"filesystem": {"rootdirectory": os.path.join(folder, "storage")}},
                  "http": {"addr": f"127.0.0.1:{port}", "secret": "bench"}}
        config_path = os.path.join(folder, "config.yml")
        with open(config_path, "w") as f:
            json.dump(config, f)
        log = os.path.join(folder, "registry.log")
        with open(log, "wb") as out:
            proc = procs.spawn([DOCKER_REGISTRY, "serve", config_path], session=True, cwd=folder,
                               stdout=out, stderr=out)
        registry = Registry("docker-registry (distribution 2.8)", f"http://127.0.0.1:{port}", proc)
        wait_http(registry.url + "/v2/", proc, "docker-registry", log=log)
        for name, top in built.items():
            layout = os.path.join(workdir, "layouts", name.replace("/", "_"))
            write_oci_layout(layout, {"image": top})
            skopeo.run("copy", "--dest-tls-verify=false", f"oci:{layout}:image", f"docker://{registry.host}/{name}:1.0")
            shutil.rmtree(layout, ignore_errors=True)
        return registry, info
    ready = os.path.join(workdir, "fakeregistry.ready")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(os.path.join(workdir, "fakeregistry.log"), "wb") as out:
        proc = procs.spawn([sys.executable, "-m", "tests.fakeregistry", "--listen", "127.0.0.1:0",
                            "--cdn", "127.0.0.2:0", "--ready-file", ready], session=True, cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=out)
    deadline = time.monotonic() + 30
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError("the fake registry did not start")
        time.sleep(0.05)
    with open(ready) as f:
        url = json.load(f)["url"]
    for name, (size, seed) in images.items():
        status, body = http_request(url + "/_fake/big", "POST", json.dumps(
            {"name": name, "tags": ["1.0"], "size": size, "seed": seed,
             "dir": os.path.join(data_dir, "layers")}).encode(), timeout=600)
        if status != 200:
            raise BenchError(f"the fake registry refused image {name}: {body[:200]!r}")
    return Registry("fake registry (tests/fakeregistry.py)", url, proc), info
