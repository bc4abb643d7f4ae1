"""
The servers a benchmark run needs, each a child process of the run:

* the fake origin (``python -m tests.upstream``), driven over its control
  endpoints (``/_fake/add``, ``/_fake/requests``, ``/_fake/reset``);
* the vault itself (``twistd -n artifact-vault``) with one ``http`` backend
  mounted at ``/bench/`` in front of that origin (or the backends a row asks for);
* nginx in the foreground with a generated config (``sendfile on``);
* ``twistd web --path DIR``: Twisted's own ``static.File``.

`Processes` remembers every child (servers and clients) so that all of them
are ended by their process id, also after Ctrl-C.  Servers get their own
session, so a terminal's Ctrl-C does not kill them before the run has
collected what it needs, and so that nginx's workers go with their master.
"""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = "bench"  # the vault backend's name and prefix (/bench/)
PYPI_BACKEND = "pypi"  # the pypi backend's name and prefix (/pypi/), in front of the fake index


class BenchError(Exception):
    """A measurement could not be taken (a server did not start, a transfer failed)."""


class Processes:
    """Every child process of the run; `stop_all` ends them, newest first."""

    def __init__(self):
        self._procs: list[subprocess.Popen] = []

    def spawn(self, argv, *, session=False, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(argv, start_new_session=session, **kw)
        proc._bench_session = session
        self._procs.append(proc)
        return proc

    def forget(self, proc):
        if proc in self._procs:
            self._procs.remove(proc)

    def stop(self, proc, timeout=10.0, sig=signal.SIGTERM):
        """End one child (and, for a server, its own process group) by id."""
        try:
            if proc.poll() is None:
                self._signal(proc, sig)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal(proc, signal.SIGKILL)
                    proc.wait(5)
            elif getattr(proc, "_bench_session", False):
                # The leader is gone; make sure nothing it started outlives it.
                self._signal(proc, signal.SIGKILL)
        finally:
            self.forget(proc)

    @staticmethod
    def _signal(proc, sig):
        try:
            if getattr(proc, "_bench_session", False):
                os.killpg(proc.pid, sig)  # the group we created for this child
            else:
                proc.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self):
        for proc in reversed(list(self._procs)):
            try:
                self.stop(proc, timeout=5)
            except Exception:  # noqa: BLE001, S110 - best effort at teardown
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_request(url, method="GET", body=None, headers=None, timeout=10):
    """One small request; returns (status, body bytes)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        target = u.path + ("?" + u.query if u.query else "")
        conn.request(method, target or "/", body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_http(url, proc, what, timeout=30.0, log=None):
    """Wait until `url` answers (any status below 500) while `proc` runs."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before answering{_tail(log)}")
        try:
            status, _ = http_request(url, timeout=2)
            if status < 500:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not answer {url} within {timeout:g} s{_tail(log)}")
        time.sleep(0.05)


def _tail(path, lines=15):
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        text = f.read().splitlines()[-lines:]
    return "\n  " + "\n  ".join(text) if text else ""


def twistd_argv() -> list[str]:
    beside = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(beside):
        return [beside]
    found = shutil.which("twistd")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


@dataclass
class Server:
    what: str
    url: str
    proc: subprocess.Popen
    log: str
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid


# -- the origin -------------------------------------------------------------


class Upstream(Server):
    """The fake origin; files are registered with explicit ETags (no md5 pass over 1 GiB)."""

    def add(self, path, filename, **behaviour):
        spec = dict(behaviour, path=path, file=os.path.abspath(filename))
        spec.setdefault("etag", f'"{os.path.getsize(filename):x}-{zlib.crc32(path.encode()):08x}"')
        status, body = http_request(self.url + "/_fake/add", "POST", json.dumps(spec).encode(),
                                    {"Content-Type": "application/json"})
        if status != 200:
            raise BenchError(f"the upstream refused to add {path}: {status} {body[:200]!r}")

    def requests(self) -> list[dict]:
        status, body = http_request(self.url + "/_fake/requests", timeout=30)
        if status != 200:
            raise BenchError(f"cannot read the upstream's request log: {status}")
        return json.loads(body)

    def reset(self):
        http_request(self.url + "/_fake/reset", "POST")

    def count(self, path, method="GET") -> int:
        return sum(1 for r in self.requests() if r["method"] == method and r["path"].split("?")[0] == path)


def start_upstream(procs: Processes, workdir: str, files_dir: str) -> Upstream:
    ready = os.path.join(workdir, "upstream.ready")
    log = os.path.join(workdir, "upstream.log")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "wb") as out:
        proc = procs.spawn(
            [sys.executable, "-m", "tests.upstream", "--listen", "127.0.0.1:0", "--ready-file", ready,
             "--files", files_dir, "--name", "bench"],
            session=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=out,
        )
    deadline = time.monotonic() + 30
    while not os.path.exists(ready):
        if proc.poll() is not None:
            raise BenchError(f"the upstream exited with status {proc.returncode}{_tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError("the upstream did not start within 30 s")
        time.sleep(0.05)
    with open(ready) as f:
        url = json.load(f)["url"]
    return Upstream("upstream", url, proc, log)


# -- the fake PyPI index --------------------------------------------------------


class FakeIndex(Server):
    """tests/fakepypi.py: the index (``url``, ending in /simple/) and its file host on 127.0.0.2."""

    def control(self, route: str, document=None) -> object:
        base = self.url[: -len("/simple/")]
        if document is None:
            status, body = http_request(f"{base}/_fake/{route}", timeout=600)
        else:
            status, body = http_request(f"{base}/_fake/{route}", "POST", json.dumps(document).encode(),
                                        {"Content-Type": "application/json"}, timeout=600)
        if status != 200:
            raise BenchError(f"the fake index refused {route}: {status} {body[:200]!r}")
        return json.loads(body)

    def file_gets(self, filename: str) -> int:
        return sum(1 for r in self.control("requests")
                   if r["method"] == "GET" and r["path"].split("?")[0].endswith("/" + filename))


def start_fake_index(procs: Processes, workdir: str) -> FakeIndex:
    folder = os.path.join(workdir, "fakepypi")
    os.makedirs(folder, exist_ok=True)
    ready = os.path.join(folder, "ready.json")
    log = os.path.join(folder, "stderr.log")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "wb") as out:
        proc = procs.spawn(
            [sys.executable, "-m", "tests.fakepypi", "--index", "127.0.0.1:0", "--files", "127.0.0.2:0",
             "--ready-file", ready, "--workdir", os.path.join(folder, "work")],
            session=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=out,
        )
    deadline = time.monotonic() + 60
    while not os.path.exists(ready):
        if proc.poll() is not None:
            raise BenchError(f"the fake index exited with status {proc.returncode}{_tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError("the fake index did not start within 60 s")
        time.sleep(0.05)
    with open(ready) as f:
        urls = json.load(f)
    return FakeIndex("fake PyPI index", urls["index"], proc, log, {"files": urls["files"]})


# -- the vault --------------------------------------------------------------


def vault_config(upstream_url: str, cache_dir: str, port: int, pypi_url: str | None = None, backends=None,
                 **top) -> dict:
    """A vault's configuration: `backends` as given, or the http backend (and a pypi one at `pypi_url`)."""
    if backends is None:
        backends = [{"type": "http", "name": BACKEND, "config": {"base_url": upstream_url, "prefix": f"/{BACKEND}/"}}]
        if pypi_url:
            backends.append({"type": "pypi", "name": PYPI_BACKEND, "config": {"base_url": pypi_url.rstrip("/")}})
    return {
        "http_host": "127.0.0.1",
        "http_port": port,
        "cache_dir": cache_dir,
        "log_level": "INFO",  # the default: what a deployment runs with
        "backends": backends,
        **top,
    }


def start_vault(procs: Processes, workdir: str, upstream_url: str, cache_dir: str, name="vault",
                port=None, pypi_url=None, **top) -> Server:
    port = port or free_port()
    config = os.path.join(workdir, f"{name}.yml")
    with open(config, "w") as f:
        json.dump(vault_config(upstream_url, cache_dir, port, pypi_url, **top), f, indent=1)  # JSON is YAML
    log = os.path.join(workdir, f"{name}.log")
    err = os.path.join(workdir, f"{name}.stderr")
    # this checkout's code first (the header names its git revision), as the tests run the daemon
    env = dict(os.environ, PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH")
                                              else ""))
    with open(err, "wb") as out:
        proc = procs.spawn(
            twistd_argv() + ["-n", "--pidfile=", "--logfile", log, "artifact-vault", "--config", config],
            session=True, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=out,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/_vault/health", proc, "the vault", log=err if os.path.getsize(err) else log)
    except BenchError:
        procs.stop(proc)
        raise
    return Server(name, url, proc, log, {"config": config, "port": port})


def find_nginx() -> str | None:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def nginx_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False).stderr.strip()
    return out.split("/", 1)[-1] if "/" in out else out


NGINX_CONF = """\
# generated by bench/services.py
daemon off;
master_process on;
{user}worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    default_type application/octet-stream;
    access_log {dir}/access.log;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


def start_nginx(procs: Processes, workdir: str, root: str, binary: str, workers="1") -> Server:
    folder = os.path.join(workdir, "nginx")
    os.makedirs(folder, exist_ok=True)
    port = free_port()
    # As root, nginx's workers would drop to 'nobody', who cannot read a private temp dir.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = os.path.join(folder, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(user=user, workers=workers, dir=folder, port=port, root=root))
    err = os.path.join(folder, "error.log")
    with open(os.path.join(folder, "stderr.log"), "wb") as out:
        proc = procs.spawn([binary, "-p", folder, "-c", conf, "-e", err],
                           session=True, stdout=subprocess.DEVNULL, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/", proc, "nginx", log=os.path.join(folder, "stderr.log"))
    except BenchError:
        procs.stop(proc)
        raise
    return Server("nginx", url, proc, err)


def start_static(procs: Processes, workdir: str, path: str) -> Server:
    """``twistd web --path``: Twisted's `static.File` in its own process."""
    port = free_port()
    log = os.path.join(workdir, "static.log")
    with open(os.path.join(workdir, "static.stderr"), "wb") as out:
        proc = procs.spawn(
            twistd_argv() + ["-n", "--pidfile=", "--logfile", log, "web", "--path", path,
                             "--listen", f"tcp:{port}:interface=127.0.0.1"],
            session=True, cwd=workdir, stdout=subprocess.DEVNULL, stderr=out,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/", proc, "twistd web", log=log)
    except BenchError:
        procs.stop(proc)
        raise
    return Server("twisted static.File", url, proc, log)


def clear_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_status(pid: int) -> dict:
    """VmHWM and VmRSS of `pid`, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                out[name] = int(value.split()[0]) * 1024
    return out
