"""Run the real pip and uv against a (fake or proxied) index, isolated from this machine.

This machine's pip configuration adds find-links, extra indexes and
constraints (/etc/pip.conf, /etc/xdg/pip, PIP_* variables); a test must see
only the index it names.  ``client_env()`` is the environment every client
here runs with: ``PIP_CONFIG_FILE=/dev/null`` (pip then reads no
configuration file at all), every inherited ``PIP_*``, ``UV_*`` and proxy
variable removed, no caches (``--no-cache-dir``, ``UV_NO_CACHE=1``), no uv
configuration files (``UV_NO_CONFIG=1``), no Python downloads, no version
check.  The clients run in a scratch working directory so no pyproject.toml /
uv.toml nearby is read.

Fresh environments:

* ``new_env(path)``: ``python -m venv --without-pip`` (about 0.1 s), plus a
  ``.pth`` file that puts the running pip (nothing else: a folder holding a
  symlink to the pip package) on the environment's path.  pip then runs as
  ``ENV/bin/python -m pip``: the environment's own interpreter, a real
  install into its own site-packages, one interpreter start.  Measured for
  ``pip install alpha`` (2 wheels, against tests/fakepypi.py): this 0.07 +
  0.45..0.9 s; ``pip --python ENV`` (pip re-executes itself) 0.08 + 1.5 s;
  ``pip --target DIR`` 2.3..3.4 s; a venv with pip made once (6 s) and copied
  per test 0.11 + 0.85 s; ``uv pip install`` 0.2 s.
* ``new_uv_env(path)``: ``uv venv`` (0.15 s; needs uv), pip made runnable the
  same way.

Clients (each returns the CompletedProcess, text, stdout and stderr captured;
``check=True`` raises with both in the message):

* ``pip_install(index_url, *requirements, target_env=ENV, extra_args=(), timeout=120)``
* ``pip_download(index_url, *requirements, dest=DIR, extra_args=(), timeout=120)``
* ``uv_pip_install(index_url, *requirements, target_env=ENV, extra_args=(), timeout=60)``

The fake index as a subprocess: ``fake_pypi(folder, *options)`` (a context
manager yielding a ``FakePyPIProcess``).  A fake or vault running in-process
on the test's reactor must keep serving while a client runs: in an async
test, ``await in_thread(pip_install, ...)`` (deferToThread).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

from tests.hfenv import fetch, stop_process  # fetch: one raw request, no redirects followed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy"}


def uv_command() -> list:
    """``uv`` from the PATH, else ``python -m uv`` (the PyPI package)."""
    found = shutil.which("uv")
    return [found] if found else [sys.executable, "-m", "uv"]


def client_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """os.environ without PIP_*, UV_* and proxy variables, plus isolation settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "UV_")) and k.lower() not in _PROXY_VARS}
    env.update({
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
        "PIP_NO_COLOR": "1",
        "UV_NO_CACHE": "1",
        "UV_NO_CONFIG": "1",
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_NO_PROGRESS": "1",
        "NO_COLOR": "1",
        "PYTHONNOUSERSITE": "1",
    })
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    if extra:
        env.update(extra)
    return env


def run(cmd: Sequence[str], *, timeout: float = 120, env=None, cwd=None, check=False) -> subprocess.CompletedProcess:
    """Run a command in a scratch directory with client_env(); capture text output."""
    with tempfile.TemporaryDirectory(prefix="pypienv-cwd-") as scratch:
        proc = subprocess.run(list(cmd), cwd=cwd or scratch, env=env or client_env(), capture_output=True,
                              text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError("%s exited %d\n--- stdout\n%s\n--- stderr\n%s"
                             % (" ".join(cmd), proc.returncode, proc.stdout, proc.stderr))
    return proc


@dataclass
class PyEnv:
    """A virtual environment: where it is and how to ask it things."""

    path: str

    @property
    def python(self) -> str:
        return os.path.join(self.path, "bin", "python")

    def run_python(self, code: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return run([self.python, "-c", code], timeout=timeout)

    def version_of(self, module: str) -> Optional[str]:
        """``module.__version__`` as imported in this environment, or None if it does not import."""
        proc = self.run_python("import %s as m; print(m.__version__)" % module)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def installed(self) -> Dict[str, str]:
        """Distribution name (normalised) -> version, from the environment's metadata."""
        proc = self.run_python(
            "import importlib.metadata as md, json, re\n"
            "print(json.dumps({re.sub(r'[-_.]+', '-', d.metadata['Name']).lower(): d.version"
            " for d in md.distributions()}))"
        )
        if proc.returncode != 0:
            raise AssertionError(proc.stderr)
        return json.loads(proc.stdout)


_PIP_ONLY: Optional[str] = None


def _pip_only_folder() -> str:
    """A folder holding only a symlink to the running pip package (made once per process)."""
    global _PIP_ONLY
    if _PIP_ONLY is None:
        import atexit

        import pip

        folder = tempfile.mkdtemp(prefix="pypienv-pip-")
        os.symlink(os.path.dirname(os.path.abspath(pip.__file__)), os.path.join(folder, "pip"))
        atexit.register(shutil.rmtree, folder, True)
        _PIP_ONLY = folder
    return _PIP_ONLY


def _add_pip(env: PyEnv) -> PyEnv:
    proc = env.run_python("import sysconfig; print(sysconfig.get_paths()['purelib'])")
    if proc.returncode != 0:
        raise AssertionError(proc.stderr)
    with open(os.path.join(proc.stdout.strip(), "_pypienv_pip.pth"), "w") as fh:
        fh.write(_pip_only_folder() + "\n")
    return env


def new_env(path) -> PyEnv:
    """A fresh venv (``python -m venv --without-pip``) where ``python -m pip`` runs the running pip."""
    path = os.fspath(path)
    run([sys.executable, "-m", "venv", "--without-pip", path], timeout=60, check=True)
    return _add_pip(PyEnv(path))


def new_uv_env(path) -> PyEnv:
    """A fresh venv made by ``uv venv`` with the running interpreter (pip runnable as in new_env)."""
    path = os.fspath(path)
    run(uv_command() + ["venv", "--quiet", "--python", sys.executable, path], timeout=60, check=True)
    return _add_pip(PyEnv(path))


def _pip(*args: str, python: str = sys.executable) -> list:
    return [python, "-m", "pip", *args]


_PIP_COMMON = ("--no-cache-dir", "--disable-pip-version-check", "--no-input", "--progress-bar", "off")


def pip_install(index_url: str, *requirements: str, target_env: PyEnv, extra_args: Sequence[str] = (),
                timeout: float = 120, check: bool = False, env=None) -> subprocess.CompletedProcess:
    """``pip install --index-url URL REQ...`` run by ``target_env``'s interpreter."""
    cmd = _pip("install", *_PIP_COMMON, "--index-url", index_url, *extra_args, *requirements,
               python=target_env.python)
    return run(cmd, timeout=timeout, check=check, env=env)


def pip_download(index_url: str, *requirements: str, dest, extra_args: Sequence[str] = (), timeout: float = 120,
                 check: bool = False, env=None) -> subprocess.CompletedProcess:
    """``pip download --index-url URL -d DEST REQ...`` with the running interpreter."""
    cmd = _pip("download", *_PIP_COMMON, "--index-url", index_url, "--dest", os.fspath(dest), *extra_args,
               *requirements)
    return run(cmd, timeout=timeout, check=check, env=env)


def uv_pip_install(index_url: str, *requirements: str, target_env: PyEnv, extra_args: Sequence[str] = (),
                   timeout: float = 60, check: bool = False, env=None) -> subprocess.CompletedProcess:
    """``uv pip install --index-url URL REQ...`` into ``target_env``, no cache, no config."""
    cmd = uv_command() + ["pip", "install", "--python", target_env.python, "--index-url", index_url,
                          "--no-cache", "--no-config", "--link-mode", "copy", *extra_args, *requirements]
    return run(cmd, timeout=timeout, check=check, env=env)


def in_thread(func, *args, **kwargs):
    """A Deferred for a blocking client call run in a thread, so that the test's reactor keeps
    serving an in-process fake or vault meanwhile: ``res = await in_thread(uv_pip_install, ...)``
    in a ``@pytest_twisted.ensureDeferred`` test.  (pytest-twisted runs plain tests in the
    reactor's greenlet too, where blockon is refused: a blocking call there freezes the reactor.)"""
    from twisted.internet.threads import deferToThread

    return deferToThread(func, *args, **kwargs)


# ---------------------------------------------------------------------------
# tests/fakepypi.py as a subprocess


class FakePyPIProcess:
    """Handle on ``python -m tests.fakepypi``: urls and the /_fake/ control routes."""

    def __init__(self, proc: subprocess.Popen, index: str, files: str):
        self.proc = proc
        self.index = index  # http://127.0.0.1:N/simple/
        self.files = files  # http://127.0.0.2:M
        self.base = index[: -len("/simple/")]

    def _get(self, route: str):
        status, _, body = fetch("GET", self.base + "/_fake/" + route)
        assert status == 200, (route, status, body)
        return json.loads(body)

    def _post(self, route: str, obj=None):
        status, _, body = fetch("POST", self.base + "/_fake/" + route, {"Content-Type": "application/json"},
                                       json.dumps(obj or {}).encode())
        assert status == 200, (route, status, body)
        return json.loads(body)

    def requests(self) -> list:
        return self._get("requests")

    def info(self) -> dict:
        return self._get("info")

    def state(self) -> dict:
        return self._get("state")

    def reset(self, catalog: bool = False) -> None:
        self._post("reset?catalog=1" if catalog else "reset")

    def fault(self, mode: str, target: str = "both", **options) -> dict:
        return self._post("fault", {"mode": mode, "target": target, **options})

    def options(self, **options) -> dict:
        return self._post("options", options)

    def add_release(self, project: str, version: str, **options) -> list:
        return self._post("release", {"project": project, "version": version, **options})

    def add_dist(self, project: str, path, **options) -> dict:
        return self._post("dist", {"project": project, "path": os.fspath(path), **options})

    def yank(self, project: str, version: str, reason=True) -> None:
        self._post("yank", {"project": project, "version": version, "reason": reason})


@contextlib.contextmanager
def fake_pypi(folder, *options: str, timeout: float = 20):
    """Run tests/fakepypi.py (index 127.0.0.1, files 127.0.0.2, free ports) until the block ends.

    ``options``: extra command-line flags such as ``--html-only``.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    ready = os.path.join(folder, "fakepypi-ready.json")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakepypi", "--index", "127.0.0.1:0", "--files", "127.0.0.2:0",
         "--ready-file", ready, *options],
        cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": ROOT},
    )
    try:
        deadline = time.monotonic() + timeout
        while not os.path.exists(ready):
            if proc.poll() is not None:
                raise AssertionError("tests.fakepypi exited early with %s" % proc.returncode)
            if time.monotonic() > deadline:
                raise AssertionError("tests.fakepypi not ready within %ss" % timeout)
            time.sleep(0.02)
        with open(ready) as fh:
            urls = json.load(fh)
        readable, _, _ = select.select([proc.stdout], [], [], 5)
        assert readable, "no ready line on stdout"
        assert json.loads(proc.stdout.readline()) == urls
        yield FakePyPIProcess(proc, urls["index"], urls["files"])
    finally:
        if proc.poll() is None:
            stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()
