"""
The servers a benchmark run needs, each a child process of the run:

* the fake origin (``python -m tests.upstream``), driven over its control
  endpoints (``/_fake/add``, ``/_fake/requests``, ``/_fake/reset``);
* the vault itself (``twistd -n artifact-vault``) with one ``http`` backend
  mounted at ``/bench/`` in front of that origin (or the backends a row asks for);
* nginx in the foreground with a generated config (``sendfile on``), over
  plain HTTP or over HTTPS with a certificate made for the run;
* Twisted's own ``static.File``, without an access log (``bench/static_nolog.py``).

The vault runs the code of one checkout (``VAULT_CODE``, by default this
one): its folder is the vault's ``PYTHONPATH``, so that neither the copy of
the package installed in site-packages nor the working folder decides what
is measured.

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
#: the checkout whose artifact_vault the vault processes run (``--vault-code``)
VAULT_CODE = ROOT


def vault_supports(option: str) -> bool:
    """Does the vault code being measured know this configuration key? (Older commits lack some.)"""
    try:
        with open(os.path.join(VAULT_CODE, "artifact_vault", "config.py"), encoding="utf-8") as f:
            return f'"{option}"' in f.read()
    except OSError:
        return False


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


def wait_http(url, proc, what, timeout=30.0, log=None, ready=None):
    """Wait until `url` answers (any status below 500), or `ready()` says so, while `proc` runs."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before answering{_tail(log)}")
        try:
            if ready is not None:
                if ready():
                    return
            else:
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
                 backend_options=None, **top) -> dict:
    """
    A vault's configuration: `backends` as given, or the http backend (with
    `backend_options` added to its config; and a pypi one at `pypi_url`).
    """
    if backends is None:
        backends = [{"type": "http", "name": BACKEND,
                     "config": {"base_url": upstream_url, "prefix": f"/{BACKEND}/", **(backend_options or {})}}]
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
                port=None, pypi_url=None, backend_options=None, **top) -> Server:
    """
    The vault in front of `upstream_url` (see `vault_config`), its access log
    on (a file of its own: ``NAME.access.log``, where the code knows
    ``access_log``; before that, its lines went into the vault's log).
    """
    port = port or free_port()
    if vault_supports("access_log"):
        top.setdefault("access_log", os.path.join(workdir, f"{name}.access.log"))
    config = os.path.join(workdir, f"{name}.yml")
    with open(config, "w") as f:
        json.dump(vault_config(upstream_url, cache_dir, port, pypi_url, backend_options=backend_options, **top), f,
                  indent=1)  # JSON is YAML
    log = os.path.join(workdir, f"{name}.log")
    err = os.path.join(workdir, f"{name}.stderr")
    # the measured checkout's code first (the header names its git revision), as the tests run the daemon
    env = dict(os.environ, PYTHONPATH=VAULT_CODE + (os.pathsep + os.environ["PYTHONPATH"]
                                                    if os.environ.get("PYTHONPATH") else ""))
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
        listen 127.0.0.1:{port}{ssl};
        {tls}
        root {root};
        location / {{ {rewrite} }}
    }}
}}
"""

NGINX_TLS = "ssl_certificate {cert}; ssl_certificate_key {key}; ssl_protocols TLSv1.2 TLSv1.3;"


def start_nginx(procs: Processes, workdir: str, root: str, binary: str, workers="1", certs=None,
                name="nginx") -> Server:
    """
    nginx serving `root`; with `certs` (tests/tlsenv.make_certs) over HTTPS as
    https://localhost:PORT.  ``/rN/PATH`` is served as ``/PATH``, so that
    every run can ask for a fresh URL of the same file.
    """
    folder = os.path.join(workdir, name)
    os.makedirs(folder, exist_ok=True)
    port = free_port()
    # As root, nginx's workers would drop to 'nobody', who cannot read a private temp dir.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = os.path.join(folder, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(user=user, workers=workers, dir=folder, port=port, root=root,
                                  ssl=" ssl" if certs else "", tls=NGINX_TLS.format(**certs) if certs else "",
                                  rewrite="rewrite ^/r[0-9]+/(.*)$ /$1 break;"))
    err = os.path.join(folder, "error.log")
    with open(os.path.join(folder, "stderr.log"), "wb") as out:
        proc = procs.spawn([binary, "-p", folder, "-c", conf, "-e", err],
                           session=True, stdout=subprocess.DEVNULL, stderr=out)
    url = f"https://localhost:{port}" if certs else f"http://127.0.0.1:{port}"
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc, "nginx", log=os.path.join(folder, "stderr.log"),
                  ready=(lambda: _tls_port_open(port)) if certs else None)
    except BenchError:
        procs.stop(proc)
        raise
    return Server(name, url, proc, err)


def _tls_port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def start_static(procs: Processes, workdir: str, path: str) -> Server:
    """Twisted's `static.File` in its own process, without an access log (``bench/static_nolog.py``)."""
    port = free_port()
    log = os.path.join(workdir, "static.log")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "wb") as out:
        proc = procs.spawn(
            [sys.executable, "-m", "bench.static_nolog", path, str(port)],
            session=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=out,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/", proc, "twistd web", log=log)
    except BenchError:
        procs.stop(proc)
        raise
    return Server("twisted static.File", url, proc, log)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a vault and its workers)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, ()))
    return found


def cpu_seconds(pids) -> float:
    """User + system CPU seconds of these processes (all their threads), from /proc."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


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
