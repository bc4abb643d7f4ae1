"""Running the real apt-get in isolation, and the fake mirror as a process.

``AptClient(folder, keyring)`` keeps every piece of apt state under
``folder``: its own apt.conf (given through APT_CONFIG, with
``Dir::Etc::parts`` pointing at an empty private directory so nothing from
/etc/apt/apt.conf.d leaks in: no proxy, no docker-clean hooks, no
GzipIndexes), sources.list, trusted.gpg.d (the mirror's keyring is copied
there), lists, archives, an empty dpkg status file, logs; no locking; the
download sandbox user is root (pytest's temporary folders are 0700, out of
reach of _apt).  Proxy variables are removed from the environment.  The
machine's /var/lib/apt stays untouched.

    client = AptClient(tmp_path / "apt", mirror.keyring)
    rc, out = client.update(mirror.sources_line())              # rewrite mode
    rc, out = client.update("deb http://deb.example/debian bookworm main",
                            proxy=mirror.origin)                # proxy mode
    rc, out = client.install_download_only(["vault-hello"])     # same proxy as update
    assert rc == 0 and not errors(out)

apt-get update exits 0 even when a fetch failed: check ``errors(out)``.

``mirror_process(folder, by_hash=False)`` runs ``python -m tests.fakeapt`` and
yields a ``MirrorProcess`` (url, origin, keyring, control helpers).
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from http.client import HTTPConnection
from urllib.parse import urlsplit

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("apt-get", "apt-cache", "apt-config", "apt-ftparchive", "gpg", "gpgconf", "dpkg-deb")
PROXY_VARS = ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy")
_ERROR_LINE = re.compile(r"^(E:|W:|Err:\d*)")


def skip_unless_apt() -> None:
    """pytest.skip with a reason when the tools are missing or we are not root."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip("apt tests need %s" % ", ".join(missing))
    if os.geteuid() != 0:
        pytest.skip("apt tests need root (apt-get install --download-only)")


def errors(output: str):
    """The lines of apt output that report a problem: E:, W:, Err: and any
    "Hash Sum mismatch" (apt-get update exits 0 even when a fetch failed)."""
    return [line for line in output.splitlines()
            if _ERROR_LINE.match(line) or "Hash Sum mismatch" in line]


class AptClient:
    def __init__(self, folder, keyring, arch: str = "amd64", timeout: float = 60,
                 config: dict = None):
        self.folder = os.path.abspath(str(folder))
        self.timeout = timeout
        self.proxy = None
        self.etc = os.path.join(self.folder, "etc")
        self.state = os.path.join(self.folder, "state")
        self.cache = os.path.join(self.folder, "cache")
        self.lists = os.path.join(self.state, "lists")
        self.archives = os.path.join(self.cache, "archives")
        self.partial = os.path.join(self.archives, "partial")
        for d in (os.path.join(self.etc, "apt.conf.d"), os.path.join(self.etc, "preferences.d"),
                  os.path.join(self.etc, "sources.list.d"), os.path.join(self.etc, "trusted.gpg.d"),
                  os.path.join(self.lists, "partial"), self.partial, os.path.join(self.folder, "log")):
            os.makedirs(d, exist_ok=True)
        shutil.copyfile(str(keyring), os.path.join(self.etc, "trusted.gpg.d", "fakeapt.gpg"))
        status = os.path.join(self.state, "status")
        open(status, "a").close()
        settings = {
            "Dir::Etc": self.etc,
            "Dir::Etc::main": "/dev/null",
            "Dir::Etc::parts": "apt.conf.d",
            "Dir::Etc::sourcelist": "sources.list",
            "Dir::Etc::sourceparts": "sources.list.d",
            "Dir::Etc::preferences": "preferences",
            "Dir::Etc::preferencesparts": "preferences.d",
            "Dir::Etc::trusted": os.path.join(self.etc, "trusted.gpg"),  # absent: no legacy warning
            "Dir::Etc::trustedparts": "trusted.gpg.d",
            "Dir::State": self.state,
            "Dir::State::lists": "lists/",
            "Dir::State::status": status,
            "Dir::Cache": self.cache,
            "Dir::Cache::archives": "archives/",
            "Dir::Log": os.path.join(self.folder, "log"),
            "Debug::NoLocking": "1",
            "APT::Sandbox::User": "root",
            "APT::Architecture": arch,
            "APT::Architectures": arch,
            "Acquire::Languages": "en",
            "Acquire::Retries": "0",
            "Acquire::http::Timeout": "10",
            "Acquire::Check-Valid-Until": "true",
            "APT::Get::Assume-Yes": "true",
            "APT::Install-Recommends": "false",
            "quiet": "1",
        }
        settings.update(config or {})
        self.conf = os.path.join(self.etc, "apt.conf")
        with open(self.conf, "w") as fh:
            for key, value in settings.items():
                fh.write('%s "%s";\n' % (key, value))
        self.env = {k: v for k, v in os.environ.items()
                    if k.lower() not in PROXY_VARS and not k.startswith("APT_")}
        self.env.update({"APT_CONFIG": self.conf, "LC_ALL": "C", "LANG": "C",
                         "DEBIAN_FRONTEND": "noninteractive"})

    # -- running -------------------------------------------------------------

    def command(self, *args, proxy=None, program="apt-get", options=None):
        """The command line of an apt program with the private configuration."""
        cmd = [program]
        if proxy:
            cmd += ["-o", "Acquire::http::Proxy=%s" % proxy]
        for key, value in (options or {}).items():
            cmd += ["-o", "%s=%s" % (key, value)]
        return cmd + list(args)

    def run(self, *args, proxy=None, cwd=None, program="apt-get", options=None):
        """Run an apt program with the private configuration; (returncode, stdout+stderr)."""
        cmd = self.command(*args, proxy=proxy, program=program, options=options)
        proc = subprocess.run(cmd, env=self.env, cwd=cwd or self.folder, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=self.timeout, check=False)
        return proc.returncode, proc.stdout

    # -- the same, without blocking a reactor (in-process servers keep answering) ----------

    def spawn(self, *args, proxy=None, cwd=None, program="apt-get", options=None):
        """`run` as a child process of the running reactor: a Deferred (returncode, stdout+stderr).
        No thread is taken, so any number can run at once beside in-process servers."""
        from twisted.internet import reactor
        from twisted.internet.utils import getProcessOutputAndValue

        cmd = self.command(*args, proxy=proxy, program=program, options=options)
        path = shutil.which(cmd[0]) or cmd[0]
        d = getProcessOutputAndValue(path, cmd[1:], env=self.env, path=cwd or self.folder, reactor=reactor)
        timer = reactor.callLater(self.timeout, d.cancel)

        def done(result):
            if timer.active():
                timer.cancel()
            out, err, code = result
            return code, (out + err).decode("utf-8", "replace")

        return d.addCallback(done)

    def update_async(self, sources_line: str, proxy: str = None, options=None):
        with open(os.path.join(self.etc, "sources.list"), "w") as fh:
            fh.write(sources_line.rstrip("\n") + "\n")
        self.proxy = proxy
        return self.spawn("update", proxy=proxy, options=options)

    def install_async(self, pkgs, options=None):
        return self.spawn("install", "--download-only", *pkgs, proxy=self.proxy, options=options)

    def download_async(self, pkgs, dest=None, options=None):
        dest = os.path.abspath(str(dest or os.path.join(self.folder, "downloads")))
        os.makedirs(dest, exist_ok=True)
        return self.spawn("download", *pkgs, proxy=self.proxy, cwd=dest, options=options)

    def update(self, sources_line: str, proxy: str = None, options=None):
        """Write sources.list (one line), apt-get update.  ``proxy`` (e.g.
        "http://127.0.0.1:PORT") is kept for the later install/download calls."""
        with open(os.path.join(self.etc, "sources.list"), "w") as fh:
            fh.write(sources_line.rstrip("\n") + "\n")
        self.proxy = proxy
        return self.run("update", proxy=proxy, options=options)

    def install_download_only(self, pkgs, options=None):
        return self.run("install", "--download-only", *pkgs, proxy=self.proxy, options=options)

    def download(self, pkgs, dest=None, options=None):
        """apt-get download into ``dest`` (default: folder/downloads)."""
        dest = os.path.abspath(str(dest or os.path.join(self.folder, "downloads")))
        os.makedirs(dest, exist_ok=True)
        return self.run("download", *pkgs, proxy=self.proxy, cwd=dest, options=options)

    def policy(self, pkg):
        """apt-cache policy output for one package."""
        return self.run("policy", pkg, program="apt-cache")[1]

    def candidate(self, pkg):
        """The candidate version apt sees after update, or None."""
        m = re.search(r"Candidate:\s*(\S+)", self.policy(pkg))
        return None if m is None or m.group(1) == "(none)" else m.group(1)

    def debs(self):
        """.deb files in the private archives directory."""
        return sorted(n for n in os.listdir(self.archives) if n.endswith(".deb"))

    def partials(self):
        """name -> size of the files apt left in archives/partial."""
        return {n: os.path.getsize(os.path.join(self.partial, n)) for n in os.listdir(self.partial)
                if os.path.isfile(os.path.join(self.partial, n))}


# ---------------------------------------------------------------------------
# the fake mirror as a process


def fetch(method, url, headers=None, body=None, timeout=10):
    """One raw HTTP request. Returns (status, {lower name: value}, body)."""
    u = urlsplit(url)
    conn = HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, u.path + ("?" + u.query if u.query else ""), body=body,
                     headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class MirrorProcess:
    def __init__(self, proc, info):
        self.proc = proc
        self.info = info
        self.url = info["url"]  # http://127.0.0.1:N/debian
        self.url2 = info["url2"]
        self.origin = self.url.rsplit("/debian", 1)[0]
        self.keyring = info["keyring"]
        self.suite = info["suite"]

    def sources_line(self, url=None, signed_by=False):
        opts = " [signed-by=%s]" % self.keyring if signed_by else ""
        return "deb%s %s %s main" % (opts, url or self.url, self.suite)

    def get(self, route):
        status, _, body = fetch("GET", self.origin + route)
        assert status == 200, (route, status, body)
        return json.loads(body)

    def post(self, route, doc=None):
        status, _, body = fetch("POST", self.origin + route, {"Content-Type": "application/json"},
                                json.dumps(doc or {}).encode(), timeout=120)
        assert status == 200, (route, status, body)
        return json.loads(body)

    def requests(self):
        return self.get("/_fake/requests")

    def state(self):
        return self.get("/_fake/state")

    def reset(self, modes=False):
        return self.post("/_fake/reset" + ("?modes=1" if modes else ""))

    def mode(self, **doc):
        return self.post("/_fake/mode", doc)

    def publish(self, package, version, **doc):
        return self.post("/_fake/publish", dict(doc, package=package, version=version))

    def finish(self):
        return self.post("/_fake/finish")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def mirror_process(folder, by_hash=False, extra_args=()):
    """Run tests/fakeapt.py as a process, its repository under ``folder``."""
    folder = os.path.abspath(str(folder))
    os.makedirs(folder, exist_ok=True)
    ready = os.path.join(folder, "ready.json")
    cmd = [sys.executable, "-m", "tests.fakeapt", "--listen", "127.0.0.1:0", "--ready-file", ready,
           "--dir", os.path.join(folder, "repo")] + (["--by-hash"] if by_hash else []) + list(extra_args)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=ROOT))
    handle = None
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            if proc.poll() is not None:
                raise AssertionError("fake mirror exited: %s" % proc.stderr.read().decode())
            assert time.monotonic() < deadline, "fake mirror did not become ready"
            time.sleep(0.05)
        with open(ready) as fh:
            handle = MirrorProcess(proc, json.load(fh))
        yield handle
    finally:
        if handle is not None:
            handle.stop()
        else:
            proc.kill()
            proc.wait()
        proc.stderr.close()
