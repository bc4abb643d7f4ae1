"""
The APT rows of the benchmark: the real apt-get (tests/aptenv.AptClient,
private state) against the fake signed mirror (``python -m tests.fakeapt``,
a child process), straight and through a vault with one ``apt`` backend.

11. **Warm apt cycle**: a fresh client's ``apt-get update`` plus ``apt-get
   download`` of every package of the repository (the three small ones and
   one of ``apt_medium`` bytes), through a warm vault (mirror rewriting) vs
   straight from the mirror; the figure is mirror time / vault time, the
   median of the per-run ratios, each run timing ``apt_cycles`` cycles of
   each, alternating which goes first.
12. **Peak memory, one big .deb to 8 clients**: a fresh vault serves a .deb
   of ``apt_big`` bytes (listed in Packages, so checked against its sha256)
   to 8 concurrent curl clients, first as a miss (one upstream GET, streamed
   to all 8 while written), then as a hit; VmHWM of the vault process, reset
   before each.

Both need apt-get and root (apt-get download with a private state); without
them the rows say n/a and why.
"""

import json
import os
import shutil
import subprocess
import sys
import time

from . import clients
from .services import (ROOT, BenchError, clear_peak_rss, http_request, memory_status, start_vault)

MiB = 1024 * 1024
PACKAGES = ("vault-extra", "vault-hello", "vault-lib")


def unavailable() -> str | None:
    """Why the APT rows cannot run here, or None."""
    missing = [t for t in ("apt-get", "apt-ftparchive", "gpg", "gpgconf", "dpkg-deb") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed"
    if os.geteuid() != 0:
        return "apt-get download with a private state needs root"
    return None


class AptMirrorProcess:
    """tests/fakeapt.py as a child of the run."""

    def __init__(self, procs, workdir):
        folder = os.path.join(workdir, "aptmirror")
        os.makedirs(folder, exist_ok=True)
        ready = os.path.join(folder, "ready.json")
        log = os.path.join(folder, "mirror.log")
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(log, "wb") as out:
            self.proc = procs.spawn([sys.executable, "-m", "tests.fakeapt", "--listen", "127.0.0.1:0",
                                     "--ready-file", ready, "--dir", os.path.join(folder, "repo")],
                                    session=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=out)
        deadline = time.monotonic() + 60
        while not os.path.exists(ready):
            if self.proc.poll() is not None:
                raise BenchError(f"the fake APT mirror exited with status {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise BenchError("the fake APT mirror did not start within 60 s")
            time.sleep(0.05)
        with open(ready) as f:
            self.info = json.load(f)
        self.url = self.info["url"]
        self.origin = self.url.rsplit("/debian", 1)[0]
        self.keyring = self.info["keyring"]

    def control(self, route, document=None, timeout=900):
        status, body = http_request(self.origin + route, "POST" if document is not None else "GET",
                                    json.dumps(document).encode() if document is not None else None,
                                    {"Content-Type": "application/json"}, timeout=timeout)
        if status != 200:
            raise BenchError(f"the fake APT mirror answered {route} with {status}: {body[:200]!r}")
        return json.loads(body)

    def gets(self, path_end) -> int:
        return sum(1 for r in self.control("/_fake/requests") if r["method"] == "GET" and r["path"].endswith(path_end))


class AptRows:
    """Rows 11 and 12 for a `run.Bench` (its plan, processes, workdir and say)."""

    def __init__(self, bench):
        self.bench = bench
        self.plan = bench.plan
        self.procs = bench.procs
        self.workdir = os.path.join(bench.workdir, "apt")
        os.makedirs(self.workdir, exist_ok=True)
        self.mirror = None
        self._clients = 0

    def _mirror(self):
        if self.mirror is None:
            self.bench.say("  starting the fake APT mirror")
            self.mirror = AptMirrorProcess(self.procs, self.workdir)
        return self.mirror

    def _vault(self, name):
        backends = [{"type": "apt", "name": "debian", "config": {"base_url": self._mirror().url}}]
        return start_vault(self.procs, self.workdir, self._mirror().url, os.path.join(self.workdir, f"{name}-cache"),
                           name=name, backends=backends)

    def _client(self):
        from tests.aptenv import AptClient  # the test helpers: private apt state and configuration

        self._clients += 1
        return AptClient(os.path.join(self.workdir, f"client-{self._clients}"), self._mirror().keyring, timeout=600)

    def _cycle(self, sources_line, packages):
        """A fresh client: apt-get update, then apt-get download of `packages`; seconds taken."""
        client = self._client()
        dest = os.path.join(client.folder, "dl")
        t = time.perf_counter()
        for rc, out in (client.update(sources_line), client.download(packages, dest=dest)):
            if rc != 0 or any(line.startswith(("E:", "W:", "Err")) for line in out.splitlines()):
                raise BenchError(f"apt-get failed: {out[-800:]}")
        took = time.perf_counter() - t
        if len(os.listdir(dest)) != len(packages):
            raise BenchError(f"apt-get download left {os.listdir(dest)}")
        shutil.rmtree(client.folder, ignore_errors=True)
        return took

    def warm_cycle(self, row):
        why = unavailable()
        if why:
            row.vault, row.reference, row.figure, row.result = f"not run: {why}", "", "n/a", "n/a"
            return row
        p = self.plan
        mirror = self._mirror()
        mirror.control("/_fake/big", {"package": "vault-medium", "size": p.apt_medium})
        packages = list(PACKAGES) + ["vault-medium"]
        vault = self._vault("vault-apt")
        try:
            through = f"deb {vault.url}/debian bookworm main"
            straight = f"deb {mirror.url} bookworm main"
            self._cycle(through, packages)  # fills the cache
            self._cycle(straight, packages)  # and the mirror's page cache
            v_times, d_times, ratios = self.bench.paired(
                lambda: sum(self._cycle(through, packages) for _ in range(p.apt_cycles)) / p.apt_cycles,
                lambda: sum(self._cycle(straight, packages) for _ in range(p.apt_cycles)) / p.apt_cycles,
                lambda v, d: f"through the vault {v:.3f} s, straight {d:.3f} s per cycle")
        finally:
            self.procs.stop(vault.proc)
        ratio = sorted(d / v for v, d in zip(v_times, d_times))[len(v_times) // 2]
        v, d = sorted(v_times)[len(v_times) // 2], sorted(d_times)[len(d_times) // 2]
        row.vault = f"{v:.3f} s per cycle (warm vault)"
        row.reference = f"{d:.3f} s per cycle (straight from the mirror)"
        row.figure = f"{ratio:.2f}"
        row.result = "pass" if ratio >= 1.0 else "**FAIL**"
        return row

    def big_deb_memory(self, row):
        why = unavailable()
        if why:
            row.vault, row.reference, row.figure, row.result = f"not run: {why}", "", "n/a", "n/a"
            return row
        p = self.plan
        mirror = self._mirror()
        self.bench.say(f"  publishing vault-big ({p.apt_big / MiB:g} MiB)")
        state = mirror.control("/_fake/big", {"package": "vault-big", "size": p.apt_big})
        info = state["packages"]["vault-big"]
        vault = self._vault("vault-apt-big")
        try:
            client = self._client()
            rc, out = client.update(f"deb {vault.url}/debian bookworm main")  # the vault learns Packages
            if rc != 0:
                raise BenchError(f"apt-get update failed: {out[-800:]}")
            url = f"{vault.url}/debian/{info['filename']}"
            figures = []
            for what in ("miss", "hit"):
                if not clear_peak_rss(vault.pid):
                    raise BenchError("the kernel refused to reset the peak RSS (/proc/PID/clear_refs)")
                before = memory_status(vault.pid)["VmRSS"]
                wall, results = clients.run_clients(self.procs, [url] * p.apt_clients, info["size"])
                peak = memory_status(vault.pid)["VmHWM"]
                self.bench.say(f"  {what}: {p.apt_clients} clients in {wall:.2f} s, peak {peak / MiB:.1f} MiB "
                               f"(from {before / MiB:.1f} MiB)")
                figures.append((what, peak, before))
            gets = mirror.gets(info["filename"])
        finally:
            self.procs.stop(vault.proc)
        row.vault = "; ".join(f"{what} {peak / MiB:.1f} MiB" for what, peak, _ in figures) + f"; upstream GETs: {gets}"
        row.reference = "before: " + " / ".join(f"{before / MiB:.1f}" for _, _, before in figures) + " MiB"
        row.figure = " / ".join(f"{peak / MiB:.0f}" for _, peak, _ in figures) + " MiB"
        row.result = "pass" if all(peak < 100 * MiB for _, peak, _ in figures) and gets == 1 else "**FAIL**"
        return row
