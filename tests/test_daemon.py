"""
The daemon as an operator runs it: the real ``twistd`` in a subprocess.

A bad configuration ends twistd at once with one readable line on stderr; a
good one serves, keeps its cache across a restart (also with upstream gone),
honours ``--cache-dir`` and ``--listen``, and sweeps leftover temp files.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.hfenv import ROOT, daemon_env

READY_TIMEOUT = 15
EXIT_TIMEOUT = 10


def twistd_path() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(candidate):
        return candidate
    found = shutil.which("twistd")
    if not found:
        pytest.skip("twistd is not installed")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra) -> dict:
    env = daemon_env(PYTHONUNBUFFERED="1")
    env.pop("XDG_CACHE_HOME", None)
    env.update(extra)
    return env


def write_config(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def http_config(tmp_path, base_url, port, cache_dir, name="vault.yml") -> str:
    return write_config(tmp_path / name, (
        "http_host: 127.0.0.1\n"
        f"http_port: {port}\n"
        f"cache_dir: {cache_dir}\n"
        "log_level: DEBUG\n"
        "backends:\n"
        "  - type: http\n"
        "    name: files\n"
        "    config:\n"
        "      prefix: /files/\n"
        f"      base_url: {base_url}\n"
        "      timeout: 5\n"
    ))


def stop(proc, sig=signal.SIGTERM) -> int:
    """Stop `proc` (SIGTERM, then SIGKILL) and return its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=EXIT_TIMEOUT)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return proc.returncode


def get(url, timeout=10):
    """(status, body, headers) for a GET; HTTP errors are answers, not exceptions."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read(), e.headers


class Daemon:
    """One twistd process running the vault, with its log file."""

    def __init__(self, tmp_path, args, env=None, log_name="vault.log"):
        self.log = tmp_path / log_name
        self.args = args
        command = [twistd_path(), "-n", "--pidfile=", f"--logfile={self.log}", "artifact-vault", *args]
        self.proc = subprocess.Popen(command, cwd=str(tmp_path), env=env or base_env(),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, url) -> dict:
        deadline = time.monotonic() + READY_TIMEOUT
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")
                pytest.fail(f"twistd exited with {self.proc.returncode} before it was ready:\n{err}\n{self.log_text()}")
            try:
                status, body, headers = get(f"{url}/_vault/health", timeout=2)
                if status == 200:
                    assert headers.get_content_type() == "application/json"
                    return json.loads(body)
                last = status
            except OSError as e:
                last = e
            time.sleep(0.05)
        pytest.fail(f"the vault did not answer /_vault/health within {READY_TIMEOUT}s ({last}):\n{self.log_text()}")

    def stop(self) -> None:
        """SIGTERM, and check that the vault shut down cleanly."""
        status = stop(self.proc)
        # twistd re-raises the signal it stopped on after a clean shutdown.
        assert status in (0, -signal.SIGTERM), (status, self.log_text())
        log = self.log_text()
        assert "Server Shut Down." in log, log
        assert "Traceback" not in log, log


@pytest.fixture
def daemons():
    """Start vault processes; every one is stopped at teardown whatever happened."""
    started = []

    def start(tmp_path, args, env=None, log_name="vault.log") -> Daemon:
        d = Daemon(tmp_path, args, env, log_name)
        started.append(d)
        return d

    yield start
    for d in started:
        stop(d.proc)


class Upstream:
    """tests/upstream.py as a separate process serving a folder."""

    def __init__(self, tmp_path):
        self.files = tmp_path / "upstream-files"
        self.files.mkdir()
        ready = tmp_path / "upstream-ready.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.upstream", "--listen", "127.0.0.1:0", "--ready-file", str(ready),
             "--files", str(self.files)],
            cwd=ROOT, env=base_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                stop(self.proc, signal.SIGKILL)
                pytest.fail("the fake upstream did not start: " + self.proc.stderr.read().decode(errors="replace"))
            time.sleep(0.05)
        self.url = json.loads(ready.read_text())["url"]

    def add(self, relpath, data: bytes):
        path = self.files / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def kill(self):
        stop(self.proc, signal.SIGKILL)


@pytest.fixture
def upstream_process(tmp_path):
    up = Upstream(tmp_path)
    try:
        yield up
    finally:
        up.kill()


def payload(n=200_000, seed=7) -> bytes:
    return bytes((i * seed + i // 251) & 0xFF for i in range(n))


def cached_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, fs in os.walk(root) for f in fs)


# -- a: a bad configuration is one line on stderr and a non-zero exit --------

GOOD_BACKEND = "backends:\n  - type: http\n    config: {prefix: /files/, base_url: 'http://127.0.0.1:9'}\n"

BAD_CONFIGS = {
    # case: (YAML text or None for an unreadable file, words the line must contain)
    "unreadable": (None, ["missing.yml"]),
    "yaml-error": ("http_port: 8080\nbackends: [\n  - type: http\n", ["vault.yml", "YAML", "line"]),
    "unknown-key": ("http_prot: 8080\n", ["http_prot", "unknown"]),
    "unknown-backend-key": ("backends:\n  - type: http\n    config: {prefix: /f/, base_url: 'http://x', tiemout: 3}\n",
                            ["backends[0].config.tiemout", "unknown"]),
    "unknown-type": ("backends:\n  - type: ftp\n    config: {base_url: 'ftp://x'}\n", ["backends[0].type", "ftp"]),
    "missing-base-url": ("backends:\n  - type: http\n    config: {prefix: /files/}\n",
                         ["backends[0].config.base_url", "required"]),
    "non-http-base-url": ("backends:\n  - type: http\n    config: {prefix: /files/, base_url: 'ftp://example.org/'}\n",
                          ["backends[0].config.base_url", "http"]),
    "bad-prefix": ("backends:\n  - type: http\n    config: {prefix: files, base_url: 'http://example.org/'}\n",
                   ["backends[0].config.prefix", "/"]),
    "duplicate-prefix": (GOOD_BACKEND + "  - type: http\n    name: other\n"
                                        "    config: {prefix: /files/, base_url: 'http://example.org'}\n",
                         ["backends[1].config.prefix", "/files/"]),
    "duplicate-name": ("backends:\n"
                       "  - {type: http, name: same, config: {prefix: /a/, base_url: 'http://example.org'}}\n"
                       "  - {type: http, name: same, config: {prefix: /b/, base_url: 'http://example.org'}}\n",
                       ["backends[1].name", "same"]),
    "port-zero": ("http_port: 0\n", ["http_port", "port"]),
    "port-too-big": ("http_port: 70000\n", ["http_port", "70000"]),
    "port-not-a-number": ("http_port: abc\n", ["http_port", "abc"]),
    "bad-log-level": ("log_level: LOUD\n", ["log_level", "LOUD"]),
    "negative-timeout": (GOOD_BACKEND.replace("'http://127.0.0.1:9'", "'http://127.0.0.1:9', timeout: -1"),
                         ["backends[0].config.timeout"]),
    "bad-max-redirects": (GOOD_BACKEND.replace("'http://127.0.0.1:9'", "'http://127.0.0.1:9', max_redirects: x"),
                          ["backends[0].config.max_redirects"]),
}


def run_to_exit(tmp_path, args):
    command = [twistd_path(), "-n", "--pidfile=", f"--logfile={tmp_path / 'vault.log'}", "artifact-vault", *args]
    started = time.monotonic()
    try:
        result = subprocess.run(command, cwd=str(tmp_path), env=base_env(XDG_CACHE_HOME=str(tmp_path / "xdg")),
                                stdin=subprocess.DEVNULL, capture_output=True, timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"twistd {' '.join(args)} did not exit within {EXIT_TIMEOUT}s")
    return result, time.monotonic() - started


def assert_one_line_error(result, words):
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode != 0, stderr
    assert "Traceback" not in stderr + result.stdout.decode(errors="replace"), stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_one_line_and_nonzero_exit(tmp_path, case):
    text, words = BAD_CONFIGS[case]
    path = tmp_path / ("missing.yml" if text is None else "vault.yml")
    if text is not None:
        path.write_text(text)
    result, took = run_to_exit(tmp_path, ["--config", str(path)])
    assert_one_line_error(result, words)
    assert took < 5
    assert not (tmp_path / "xdg").exists()  # nothing was started


def test_config_that_is_a_folder(tmp_path):
    result, _ = run_to_exit(tmp_path, ["--config", str(tmp_path)])
    assert_one_line_error(result, [str(tmp_path)])


@pytest.mark.parametrize("listen", ["bogus:1234", "tcp:notaport", "tcp:8080:nosuchoption=1"])
def test_bad_listen_description(tmp_path, listen):
    result, took = run_to_exit(tmp_path, ["--listen", listen])
    assert_one_line_error(result, ["--listen", listen])
    assert took < 5


# -- b: no --config: the embedded default (huggingface) ----------------------


def test_default_config_serves_health_and_uses_xdg_cache(tmp_path, daemons):
    xdg = tmp_path / "xdg"
    leftover = xdg / "artifact-vault" / "huggingface" / "x.bin.0123abcd.vault-tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    port = free_port()
    d = daemons(tmp_path, ["--listen", f"tcp:{port}:interface=127.0.0.1"], env=base_env(XDG_CACHE_HOME=str(xdg)))
    health = d.wait_ready(f"http://127.0.0.1:{port}")
    assert health["status"] == "ok"
    assert [(b["type"], b["prefix"]) for b in health["backends"]] == [("huggingface", "/huggingface/")]
    # The default cache_dir is $XDG_CACHE_HOME/artifact-vault: its leftovers were swept there.
    assert not leftover.exists()
    d.stop()


# -- c: a restart keeps serving the cache with upstream gone -----------------


def test_restart_serves_cached_files_without_upstream(tmp_path, daemons, upstream_process):
    data = payload()
    upstream_process.add("pub/dist/tool-1.0.tar.gz", data)
    upstream_process.add("pub/never-fetched.bin", b"not cached")
    cache = tmp_path / "cache"
    port = free_port()
    config = http_config(tmp_path, upstream_process.url + "/pub/", port, cache)
    url = f"http://127.0.0.1:{port}"

    first = daemons(tmp_path, ["--config", config], log_name="first.log")
    health = first.wait_ready(url)
    assert [(b["type"], b["prefix"]) for b in health["backends"]] == [("http", "/files/")]
    status, body, _ = get(f"{url}/files/dist/tool-1.0.tar.gz")
    assert status == 200
    assert body == data
    assert (cache / "files" / "dist" / "tool-1.0.tar.gz").read_bytes() == data
    first.stop()

    upstream_process.kill()

    second = daemons(tmp_path, ["--config", config], log_name="second.log")
    second.wait_ready(url)
    status, body, _ = get(f"{url}/files/dist/tool-1.0.tar.gz")
    assert status == 200
    assert body == data
    status, _, _ = get(f"{url}/files/never-fetched.bin")
    assert status == 502
    second.stop()


# -- d: --cache-dir and --listen override the configuration ------------------


def test_cache_dir_and_listen_override_the_config(tmp_path, daemons, upstream_process):
    data = payload(50_000, seed=13)
    upstream_process.add("a/b.bin", data)
    configured_cache = tmp_path / "configured-cache"
    override_cache = tmp_path / "override-cache"
    configured_port, listen_port = free_port(), free_port()
    config = http_config(tmp_path, upstream_process.url, configured_port, configured_cache)

    d = daemons(tmp_path, ["--config", config, "--cache-dir", str(override_cache),
                           "--listen", f"tcp:{listen_port}:interface=127.0.0.1"])
    url = f"http://127.0.0.1:{listen_port}"
    d.wait_ready(url)
    status, body, _ = get(f"{url}/files/a/b.bin")
    assert (status, body) == (200, data)
    assert (override_cache / "files" / "a" / "b.bin").read_bytes() == data
    assert not configured_cache.exists() or cached_files(configured_cache) == []
    # Nothing listens on the configured port.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", configured_port), timeout=2).close()
    d.stop()


# -- e: temp files of an interrupted download are swept at start -------------


def test_leftover_temp_files_are_swept_at_start(tmp_path, daemons):
    cache = tmp_path / "cache"
    committed = cache / "files" / "dir" / "kept.bin"
    committed.parent.mkdir(parents=True)
    committed.write_bytes(b"complete")
    leftovers = [cache / "files" / "dir" / "kept.bin.0a1b2c3d.vault-tmp",
                 cache / "files" / "other.tar.gz.ffff0000.vault-tmp",
                 cache / "top.vault-tmp"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    port = free_port()
    config = http_config(tmp_path, "http://127.0.0.1:9/", port, cache)
    d = daemons(tmp_path, ["--config", config])
    d.wait_ready(f"http://127.0.0.1:{port}")
    assert [p for p in leftovers if p.exists()] == []
    assert committed.read_bytes() == b"complete"
    d.stop()


_HEAP_CHURN = """
import resource, sys
from artifact_vault.service import steady_heap
set_up = steady_heap() if sys.argv[1] == "steady" else None

def churn(n=100):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        read = bytearray(1 << 20)   # a 1 MiB socket read ...
        joined = bytes(read)        # ... and its TLS records joined
        del read, joined
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

churn(5)
print(set_up, churn())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_steady_heap_keeps_read_buffers_without_page_faults():
    """
    Freeing the 1 MiB buffers of a download must not hand the heap's top back
    to the system, to be faulted in again at the next read (2 fresh pages per
    4 KiB received: a quarter of an HTTPS miss's throughput, depending only
    on what the process allocated at start-up, e.g. .pyc files or not).
    """
    def run(mode):
        out = subprocess.run([sys.executable, "-c", _HEAP_CHURN, mode], cwd=ROOT, env=daemon_env(),
                             capture_output=True, text=True, check=True).stdout.split()
        return out[0], int(out[1])

    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    set_up, faults = run("steady")
    assert set_up == "True"
    assert faults < 1000, faults  # 100 reads of 1 MiB: 2 x 256 pages each when the heap is trimmed
