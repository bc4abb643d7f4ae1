"""
Run the whole benchmark suite and print one table.

    python -m bench.run                 # full suite (nginx required), a few minutes
    python -m bench.run --smoke         # tiny sizes, one run, < 60 s, nginx optional
    python -m bench.run --output bench/RESULTS.md

Everything runs on 127.0.0.1 as children of this process: the fake origin
(tests/upstream.py), the vault (``twistd -n artifact-vault``, one ``http``
backend at /bench/, its access log on), nginx with ``sendfile on`` (also as
an HTTPS origin with a certificate made for the run) and Twisted's
``static.File`` without an access log as references.  Files, cache and logs live in one temp
folder (``--workdir``) that is removed at the end, also after Ctrl-C; only
``--data-dir`` (the generated source files, reused by later runs) and
``--keep`` survive.

Progress goes to stderr; stdout gets the header and the table (markdown).
Exit status: 0 when every measurement was taken (a missed target is a
result, not an error; ``--strict`` makes it one), 1 when a measurement
failed, 2 for a usage problem (nginx missing in full mode), 130 on Ctrl-C.
"""

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from urllib.parse import urljoin

from . import clients, rps, services
from .apt import AptRows
from .data import config_json, make_big_file, write_small
from .machine import header_lines
from .oci import OciRows
from .services import (
    BACKEND,
    PYPI_BACKEND,
    BenchError,
    Processes,
    clear_peak_rss,
    http_request,
    find_nginx,
    memory_status,
    nginx_version,
    process_tree,
    start_fake_index,
    start_nginx,
    start_static,
    start_upstream,
    start_vault,
    vault_supports,
)

MiB = 1024 * 1024
GiB = 1024 * MiB

TARGETS = {
    1: "≥ 0.9",
    2: "≥ 0.9",
    3: "≥ 1.0",
    4: "≥ 0.8; first byte ≤ +50 ms",
    5: "1 GET; ≤ 1.2×",
    6: "< 100 MiB",
    7: "≥ 0.85 (as 1.7× on 2 free cores)",
    8: "≥ 1.0",
    9: "≥ 0.8",
    10: "< 100 MiB",
    11: "≥ 1.0",
    12: "< 100 MiB; 1 GET",
    13: "≥ 1.0",
    14: "≥ 0.8",
    15: "< 100 MiB",
    16: "≥ 0.7",
}


@dataclass(frozen=True)
class Plan:
    mode: str
    runs: int
    big: int  # bytes of each big file (tests 1, 2, 4)
    files2: int  # distinct big files the concurrent clients of test 2 share
    clients2: int
    rps_connections: int
    rps_duration: float
    rps_warmup: float
    slow_size: int  # the cold file of test 5
    clients5: int
    origin_rate: float  # bytes/s the origin sends the test-5 file at
    huge: int  # the file of test 6
    wheel: int  # bytes of padding in the big wheel of test 8 (the rest of the fake index is small)
    huge_wheel: int  # bytes of padding in the wheel of test 10
    wheel_clients: int  # clients of test 10
    apt_cycles: int = 5  # apt update+download cycles timed per run (test 11)
    apt_medium: int = 64 * MiB  # the one bigger package of the repository in test 11
    apt_big: int = GiB  # the .deb of test 12
    apt_clients: int = 8
    oci_layer: int = GiB  # the layer of the image that test 13 copies
    oci_big_layer: int = 2 * GiB  # the layer that test 15 streams
    oci_clients: int = 8


# Test 5's origin is throttled so that what 64 clients draw together (64 × ~9 MB/s) stays well
# under what this machine serves to many clients (test 2): the figure then shows what
# coalescing costs, not the serving bandwidth that test 2 already measures.
FULL = Plan("full", 3, GiB, 4, 16, 32, 5.0, 1.0, 64 * MiB, 64, 10e6, 4 * GiB, 64 * MiB, 2 * GiB, 8)
SMOKE = Plan("smoke", 1, 8 * MiB, 2, 4, 32, 1.0, 0.3, 4 * MiB, 8, 10e6, 32 * MiB, MiB, 16 * MiB, 8,
             1, MiB, 32 * MiB, 8, 8 * MiB, 32 * MiB, 8)
#: what test 8 downloads: the fake index's catalog (alpha pulls in beta) and the big wheel
PIP_REQUIREMENTS = ("alpha", "gamma", "delta", "Zeta_Utils", "payload")
PIP_TRIES = 3


@dataclass
class Row:
    num: int
    what: str
    vault: str = ""
    reference: str = ""
    figure: str = ""
    target: str = ""
    result: str = ""


def size_text(n: int) -> str:
    if n >= GiB and n % GiB == 0:
        return f"{n // GiB} GiB"
    if n >= MiB:
        return f"{n / MiB:g} MiB"
    return f"{n} B"


def rate_text(bps: float) -> str:
    return f"{bps / 1e6:,.0f} MB/s"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def verdict(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


def median(values):
    return statistics.median(values)


class Interrupted(Exception):
    pass


def _on_signal(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


class Bench:
    def __init__(self, plan: Plan, workdir: str, data_dir: str, nginx_bin: str | None, rps_processes: int,
                 rows=None):
        self.plan = plan
        self.workdir = workdir
        self.data_dir = data_dir
        self.cache_dir = os.path.join(workdir, "cache")
        self.refroot = os.path.join(workdir, "refroot")
        self.nginx_bin = nginx_bin
        self.rps_processes = rps_processes
        self.procs = Processes()
        self.t0 = time.monotonic()
        self.upstream = self.vault = self.nginx = self.index = None
        self.big_names = [f"{chr(ord('A') + i)}.bin" for i in range(plan.files2)]
        self.rows: dict[int, Row] = {}
        self.failed = False
        self.oci = None
        #: the rows to run (None: all); rows 1-7 share their setup and run together
        self.wanted = set(rows) if rows else set(TARGETS)

    # -- plumbing -----------------------------------------------------------

    def say(self, message: str):
        sys.stderr.write(f"[{time.monotonic() - self.t0:6.1f}s] {message}\n")
        sys.stderr.flush()

    def src(self, name: str) -> str:
        return os.path.join(self.data_dir, name)

    def cached_path(self, rel: str, size: int) -> str | None:
        """The vault's own copy of ``/bench/<rel>``, where the cache keeps it (None if not found)."""
        path = os.path.join(self.cache_dir, BACKEND, *rel.strip("/").split("/"))
        try:
            return path if os.path.getsize(path) == size else None
        except OSError:
            return None

    def vault_get(self, rel: str, size: int, out=os.devnull, server=None) -> clients.Result:
        return clients.fetch_one(self.procs, f"{(server or self.vault).url}/{BACKEND}/{rel}", size, out)

    def link_reference(self, rel: str, size: int) -> str:
        """Make refroot/<rel> point at the file the vault serves, so the references serve the same inode."""
        target = self.cached_path(rel, size)
        if target is None:
            self.say(f"  (the vault's copy of {rel} was not found in the cache; references serve the source file)")
            target = self.src(rel.split("/")[-1])
        link = os.path.join(self.refroot, *rel.split("/"))
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(target, link)
        return link

    # -- setup --------------------------------------------------------------

    def setup(self):
        p = self.plan
        os.makedirs(self.data_dir, exist_ok=True)
        os.makedirs(self.refroot, exist_ok=True)
        wanted = [(n, p.big, i) for i, n in enumerate(self.big_names)]
        wanted += [("slow.bin", p.slow_size, 90), ("huge.bin", p.huge, 91)]
        need = sum(size for name, size, _ in wanted if not _same_size(self.src(name), size))
        # sources + the vault's copies + tests 4 and 16's extra misses and direct downloads
        budget = need + 2 * p.files2 * p.big + (4 * p.runs + 1) * p.big + (2 * p.runs + 1) * p.slow_size + p.huge
        budget += 3 * p.huge_wheel + 4 * p.wheel  # test 10's wheel (source, cache) and test 8's (+ downloads)
        budget += 4 * p.apt_big + 4 * p.apt_medium  # APT rows: built .deb, the mirror's copy, the vault's, temp
        budget += 4 * (p.oci_layer + p.oci_big_layer)  # OCI rows: layers, the registry's, the vault's, a copy
        free = shutil.disk_usage(self.workdir).free
        if free < budget:
            raise BenchError(f"not enough disk space in {self.workdir}: {free / GiB:.1f} GiB free, "
                             f"about {budget / GiB:.1f} GiB needed")
        self.say(f"preparing files in {self.data_dir} ({need / GiB:.2f} GiB to write)")
        for name, size, salt in wanted:
            if make_big_file(self.src(name), size, salt):
                self.say(f"  wrote {name} ({size_text(size)})")
        write_small(self.src("config.json"), config_json(700))

        self.say("starting the upstream")
        self.upstream = start_upstream(self.procs, self.workdir, self.data_dir)
        for name in self.big_names:
            self.upstream.add(f"/big/{name}", self.src(name))
        self.upstream.add("/huge/huge.bin", self.src("huge.bin"))
        self.upstream.add("/small/config.json", self.src("config.json"), content_type="application/json")
        self.say("starting the fake PyPI index")
        self.index = start_fake_index(self.procs, self.workdir)
        self.index.control("release", {"project": "payload", "version": "1.0", "pad_bytes": p.wheel})
        self.say(f"starting the vault (cache {self.cache_dir})")
        self.vault = start_vault(self.procs, self.workdir, self.upstream.url, self.cache_dir, pypi_url=self.index.url)

    def start_nginx(self):
        if self.nginx is None and self.nginx_bin:
            self.nginx = start_nginx(self.procs, self.workdir, self.refroot, self.nginx_bin)
            self.say(f"nginx listens at {self.nginx.url}")

    def prime(self, rel: str, size: int):
        if self.cached_path(rel, size) is None:
            self.say(f"  priming /{BACKEND}/{rel} through the vault")
            self.vault_get(rel, size)

    # -- the tests -----------------------------------------------------------

    def cold_misses(self, tls: bool):
        """
        Rows 4 and 16: one cold file through the vault vs curl downloading it
        straight from the same origin into a file on the cache's filesystem,
        + fsync (the vault fsyncs before its last byte), alternating which goes
        first; every run asks for a fresh URL (``/rN/A.bin``, which the origin
        serves as ``/A.bin``).  The origin is nginx (``sendfile on``), over
        HTTPS with a certificate for localhost from a CA made for the run,
        trusted by the vault through ``ca_file`` and by curl through
        ``--cacert``.  Without nginx (smoke mode only), row 4 uses the fake
        origin.  Returns [(vault Result, direct Result)] and the origin's name.
        """
        from tests.tlsenv import make_certs

        p = self.plan
        certs = make_certs(os.path.join(self.workdir, "certs"), names=("localhost",)) if tls else None
        ca = certs["ca"] if certs else None
        name = "https" if tls else "plain"
        root = os.path.join(self.workdir, f"{name}root")
        os.makedirs(root, exist_ok=True)
        if not os.path.lexists(os.path.join(root, "A.bin")):
            os.symlink(self.src("A.bin"), os.path.join(root, "A.bin"))
        if self.nginx_bin:
            origin = start_nginx(self.procs, self.workdir, root, self.nginx_bin, certs=certs, name=f"nginx-{name}")
            what = "nginx" + (" over HTTPS" if tls else "")
        else:
            origin = self.upstream
            for r in range(p.runs):
                self.upstream.add(f"/r{r}/A.bin", self.src("A.bin"))
            what = "the fake origin"
        cache = os.path.join(self.workdir, f"cache-{name}")
        vault = start_vault(self.procs, self.workdir, origin.url, cache, name=f"vault-{name}",
                            backend_options={"ca_file": ca} if ca else None)
        results = []
        try:
            clients.fetch_one(self.procs, f"{origin.url}/A.bin" if self.nginx_bin else f"{origin.url}/r0/A.bin",
                              p.big, ca=ca)  # the source is read once before
            os.sync()
            for r in range(p.runs):
                def through_vault():
                    res = clients.fetch_one(self.procs, f"{vault.url}/{BACKEND}/r{r}/A.bin", p.big)
                    shutil.rmtree(os.path.join(cache, BACKEND), ignore_errors=True)
                    return res

                def direct():
                    path = os.path.join(cache, f"direct-{r}.bin")
                    os.makedirs(cache, exist_ok=True)
                    res = clients.fetch_one(self.procs, f"{origin.url}/r{r}/A.bin", p.big, path, ca=ca)
                    t = time.perf_counter()
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    synced = time.perf_counter() - t
                    os.unlink(path)
                    return clients.Result(res.code, res.ttfb, res.total + synced, res.size)

                if r % 2 == 0:
                    v = through_vault()
                    d = direct()
                else:
                    d = direct()
                    v = through_vault()
                self.say(f"  run {r + 1}: vault {rate_text(v.rate)} (first byte {ms(v.ttfb)}), "
                         f"curl from {what} {rate_text(d.rate)} (first byte {ms(d.ttfb)})")
                results.append((v, d))
        finally:
            self.procs.stop(vault.proc)
            if origin is not self.upstream:
                self.procs.stop(origin.proc)
            shutil.rmtree(cache, ignore_errors=True)
        return results, what

    def test_cold_miss(self) -> Row:
        """4: one client, a cold 1 GiB file from a plain-HTTP origin: vault vs curl -o file + fsync."""
        p = self.plan
        row = Row(4, f"cold miss from a plain-HTTP origin (nginx), {size_text(p.big)}, 1 client: throughput vs "
                     f"curl to a file (+ fsync), and time to first byte")
        results, what = self.cold_misses(tls=False)
        ratios = [v.rate / d.rate for v, d in results]
        deltas = [v.ttfb - d.ttfb for v, d in results]
        ratio, delta = median(ratios), median(deltas)
        row.vault = (f"{rate_text(median([v.rate for v, _ in results]))}; "
                     f"first byte {ms(median([v.ttfb for v, _ in results]))}")
        row.reference = (f"{rate_text(median([d.rate for _, d in results]))}; "
                         f"first byte {ms(median([d.ttfb for _, d in results]))} (curl from {what})")
        row.figure = f"{ratio:.2f} ({min(ratios):.2f}-{max(ratios):.2f}); {'+' if delta >= 0 else '−'}{ms(abs(delta))}"
        row.result = verdict(ratio >= 0.8 and delta <= 0.050)
        return row

    def test_hit_one(self) -> Row:
        p = self.plan
        row = Row(1, f"hit, one {size_text(p.big)} file, 1 client: throughput vs nginx")
        vault_url = f"{self.vault.url}/{BACKEND}/big/A.bin"
        if self.nginx is None:
            res = [clients.fetch_one(self.procs, vault_url, p.big) for _ in range(p.runs)]
            row.vault = rate_text(median([x.rate for x in res]))
            row.reference, row.figure, row.result = "nginx not installed", "n/a", "n/a"
            return row
        nginx_url = f"{self.nginx.url}/big/A.bin"
        clients.fetch_one(self.procs, vault_url, p.big)  # warm-up, not counted
        clients.fetch_one(self.procs, nginx_url, p.big)
        v_rates, n_rates, ratios = self.paired(
            lambda: clients.fetch_one(self.procs, vault_url, p.big).rate,
            lambda: clients.fetch_one(self.procs, nginx_url, p.big).rate,
            lambda v, n: f"vault {rate_text(v)}, nginx {rate_text(n)}")
        ratio = median(ratios)
        row.vault, row.reference = rate_text(median(v_rates)), rate_text(median(n_rates)) + " (nginx)"
        row.figure, row.result = f"{ratio:.2f}", verdict(ratio >= 0.9)
        return row

    def test_hit_many(self) -> Row:
        p = self.plan
        row = Row(2, f"hit, {p.clients2} concurrent clients on {p.files2} × {size_text(p.big)} files: "
                     f"aggregate throughput vs nginx")
        names = [self.big_names[i % p.files2] for i in range(p.clients2)]
        total = p.clients2 * p.big

        def aggregate(base):
            wall, _ = clients.run_clients(self.procs, [f"{base}/big/{n}" for n in names], p.big)
            return total / wall

        vault_base = f"{self.vault.url}/{BACKEND}"
        if self.nginx is None:
            row.vault = rate_text(median([aggregate(vault_base) for _ in range(p.runs)]))
            row.reference, row.figure, row.result = "nginx not installed", "n/a", "n/a"
            return row
        v_rates, n_rates, ratios = self.paired(
            lambda: aggregate(vault_base), lambda: aggregate(self.nginx.url),
            lambda v, n: f"vault {rate_text(v)}, nginx {rate_text(n)}")
        ratio = median(ratios)
        row.vault, row.reference = rate_text(median(v_rates)), rate_text(median(n_rates)) + " (nginx)"
        row.figure, row.result = f"{ratio:.2f}", verdict(ratio >= 0.9)
        return row

    def rps(self, url: str) -> float:
        """HEAD+GET requests/s of the Python client (the small-file rate rows 9 and 14 compare with)."""
        p = self.plan
        got = rps.measure(url, p.rps_connections, p.rps_duration, p.rps_warmup, self.rps_processes, self.procs)
        if got["errors"] or not got["ok"]:
            raise BenchError(f"{url}: {got['errors']} failed requests, answers {got['statuses']}")
        return got["rps"]

    def rps_get(self, url: str, cpu_of=None) -> dict:
        """GET requests/s with wrk (rows 3 and 7), and the CPU of `cpu_of()`'s processes meanwhile."""
        p = self.plan
        got = rps.measure_get(url, p.rps_connections, p.rps_duration, p.rps_warmup, self.rps_processes, self.procs,
                              cpu_of)
        if got["errors"] or not got["ok"]:
            raise BenchError(f"{url}: {got['errors']} failed requests, answers {got['statuses']}")
        return got

    def test_small(self) -> Row:
        p = self.plan
        row = Row(3, f"hit, 700-byte config.json, GET at {p.rps_connections} connections: requests/s, the vault "
                     f"with its access log on vs Twisted static.File without a log")
        size = 700
        self.prime("small/config.json", size)
        link = self.link_reference("small/config.json", size)
        static = start_static(self.procs, self.workdir, os.path.dirname(link))
        try:
            vault_url = f"{self.vault.url}/{BACKEND}/small/config.json"
            static_url = f"{static.url}/config.json"
            v_rps, s_rps, ratios = self.paired(
                lambda: self.rps_get(vault_url)["rps"], lambda: self.rps_get(static_url)["rps"],
                lambda v, s: f"vault {v:,.0f} req/s, static.File {s:,.0f} req/s")
        finally:
            self.procs.stop(static.proc)
        ratio = median(ratios)
        row.vault, row.reference = f"{median(v_rps):,.0f} req/s", f"{median(s_rps):,.0f} req/s (static.File, no log)"
        row.figure, row.result = f"{ratio:.2f} ({min(ratios):.2f}-{max(ratios):.2f})", verdict(ratio >= 1.0)
        return row

    def paired(self, vault, reference, describe, runs=None):
        """
        Measure vault() and reference() once per run (`runs`, default the
        plan's), alternating which goes first (so drift hits both alike); the
        ratios are vault / reference.
        """
        mine, theirs, ratios = [], [], []
        for r in range(runs or self.plan.runs):
            if r % 2 == 0:
                v = vault()
                ref = reference()
            else:
                ref = reference()
                v = vault()
            self.say(f"  run {r + 1}: {describe(v, ref)}")
            mine.append(v)
            theirs.append(ref)
            ratios.append(v / ref)
        return mine, theirs, ratios

    def test_coalesce(self) -> Row:
        p = self.plan
        row = Row(5, f"cold, {p.clients5} concurrent clients on one {size_text(p.slow_size)} file from a throttled "
                     f"origin: upstream GETs; time until all are done vs 1 client alone")
        chunk = 64 * 1024
        throttle = [chunk, chunk / p.origin_rate]
        gets, ratios, t_one, t_all = [], [], [], []
        for r in range(p.runs):
            one, many = f"/slow/{r}/one.bin", f"/slow/{r}/all.bin"
            self.upstream.add(one, self.src("slow.bin"), throttle=throttle)
            self.upstream.add(many, self.src("slow.bin"), throttle=throttle)
            wall1, _ = clients.run_clients(self.procs, [f"{self.vault.url}/{BACKEND}{one}"], p.slow_size)
            urls = [f"{self.vault.url}/{BACKEND}{many}"] * p.clients5
            wall_n, _ = clients.run_clients(self.procs, urls, p.slow_size)
            n_gets = self.upstream.count(many, "GET")
            self.say(f"  run {r + 1}: 1 client {wall1:.2f} s, {p.clients5} clients {wall_n:.2f} s, "
                     f"{n_gets} upstream GET(s)")
            gets.append(n_gets)
            t_one.append(wall1)
            t_all.append(wall_n)
            ratios.append(wall_n / wall1)
        shutil.rmtree(os.path.join(self.cache_dir, BACKEND, "slow"), ignore_errors=True)
        ratio = median(ratios)
        get_text = ", ".join(str(g) for g in gets)
        row.vault = f"upstream GETs per run: {get_text}; all done in {median(t_all):.2f} s"
        row.reference = f"1 client alone: {median(t_one):.2f} s ({rate_text(p.slow_size / median(t_one))})"
        row.figure = f"{max(gets)} GET; {ratio:.2f}×" if len(set(gets)) == 1 else f"{get_text} GETs; {ratio:.2f}×"
        row.result = verdict(all(g == 1 for g in gets) and ratio <= 1.2)
        return row

    def reset_peak(self) -> tuple[int, str]:
        """Reset the vault's peak RSS; restart the vault where the kernel cannot. Returns (RSS now, how)."""
        if clear_peak_rss(self.vault.pid):
            return memory_status(self.vault.pid)["VmRSS"], "clear_refs"
        port = self.vault.extra["port"]
        self.procs.stop(self.vault.proc)
        self.vault = start_vault(self.procs, self.workdir, self.upstream.url, self.cache_dir, port=port,
                                 pypi_url=self.index.url)
        return memory_status(self.vault.pid)["VmRSS"], "restart"

    def test_memory(self) -> Row:
        p = self.plan
        row = Row(6, f"peak resident memory (VmHWM) of the vault streaming a {size_text(p.huge)} file: "
                     f"miss / hit")
        base_miss, how = self.reset_peak()
        res = self.vault_get("huge/huge.bin", p.huge)
        miss = memory_status(self.vault.pid)["VmHWM"]
        self.say(f"  miss at {rate_text(res.rate)}: peak {miss / MiB:.1f} MiB (from {base_miss / MiB:.1f} MiB, {how})")
        base_hit, how = self.reset_peak()
        res = self.vault_get("huge/huge.bin", p.huge)
        hit = memory_status(self.vault.pid)["VmHWM"]
        self.say(f"  hit at {rate_text(res.rate)}: peak {hit / MiB:.1f} MiB (from {base_hit / MiB:.1f} MiB, {how})")
        row.vault = f"miss {miss / MiB:.1f} MiB; hit {hit / MiB:.1f} MiB"
        row.reference = f"before: {base_miss / MiB:.1f} / {base_hit / MiB:.1f} MiB"
        row.figure = f"{miss / MiB:.0f} / {hit / MiB:.0f} MiB"
        row.result = verdict(miss < 100 * MiB and hit < 100 * MiB)
        return row

    def test_processes(self) -> Row:
        """
        7: the small-file load against a vault with ``workers: 2`` and against
        the single process, as requests/s per core of vault CPU (all its
        processes, from /proc): on 2 cores shared with the load generator, two
        processes cannot show their scaling as requests/s, but their cost per
        request can.
        """
        p = self.plan
        row = Row(7, f"hits, 1 and 2 processes (GET config.json at {p.rps_connections} connections): requests/s "
                     f"per core of vault CPU, 2 processes vs 1")
        if not vault_supports("workers"):
            row.vault, row.figure, row.result = "not available", "n/a", "n/a"
            return row
        self.prime("small/config.json", 700)
        two = start_vault(self.procs, self.workdir, self.upstream.url, self.cache_dir, name="vault-2", workers=2)
        try:
            one_url = f"{self.vault.url}/{BACKEND}/small/config.json"
            two_url = f"{two.url}/{BACKEND}/small/config.json"
            self.wait_for_workers(two, 2)

            def per_core(url, server):
                got = self.rps_get(url, cpu_of=lambda: process_tree(server.pid))
                cores = got["cpu"] / p.rps_duration
                return got["rps"], cores, got["rps"] / max(cores, 1e-9)

            results = {1: [], 2: []}

            def measure(n, url, server):
                r = per_core(url, server)
                results[n].append(r)
                return r[2]

            r2, r1, ratios = self.paired(
                lambda: measure(2, two_url, two), lambda: measure(1, one_url, self.vault),
                lambda b, a: f"1 process {results[1][-1][0]:,.0f} req/s on {results[1][-1][1]:.2f} cores "
                             f"({a:,.0f}/core), 2 processes {results[2][-1][0]:,.0f} req/s on "
                             f"{results[2][-1][1]:.2f} cores ({b:,.0f}/core)")
        finally:
            self.procs.stop(two.proc)
        ratio = median(ratios)
        total2, cores2 = median([x[0] for x in results[2]]), median([x[1] for x in results[2]])
        total1, cores1 = median([x[0] for x in results[1]]), median([x[1] for x in results[1]])
        row.vault = f"2 processes: {median(r2):,.0f} req/s per core ({total2:,.0f} req/s on {cores2:.2f} cores)"
        row.reference = f"1 process: {median(r1):,.0f} req/s per core ({total1:,.0f} req/s on {cores1:.2f} cores)"
        row.figure, row.result = f"{ratio:.2f}", verdict(ratio >= 0.85)
        return row

    def wait_for_workers(self, server, count: int, timeout: float = 30.0):
        """Until `count` different processes answer /_vault/health (a worker starts after the main one)."""
        import json

        pids = set()
        deadline = time.monotonic() + timeout
        while len(pids) < count:
            if time.monotonic() > deadline:
                raise BenchError(f"only {len(pids)} of the {count} vault processes answered within {timeout:g} s")
            for _ in range(20):  # new connections: the kernel spreads them over the processes
                status, body = services.http_request(server.url + "/_vault/health")
                if status == 200:
                    pids.add(json.loads(body)["pid"])
            time.sleep(0.1)

    def test_https_miss(self) -> Row:
        """16: as row 4, from an HTTPS origin (nginx with a certificate the vault trusts through ca_file)."""
        p = self.plan
        row = Row(16, f"cold miss from an HTTPS origin (nginx), {size_text(p.big)}, 1 client: throughput vs curl "
                     f"over HTTPS to a file (+ fsync)")
        if not self.nginx_bin or not vault_supports("ca_file"):
            row.vault = "nginx not installed" if not self.nginx_bin else "no ca_file in this vault"
            row.figure, row.result = "n/a", "n/a"
            return row
        results, what = self.cold_misses(tls=True)
        ratios = [v.rate / d.rate for v, d in results]
        ratio = median(ratios)
        row.vault = rate_text(median([v.rate for v, _ in results]))
        row.reference = rate_text(median([d.rate for _, d in results])) + f" (curl from {what})"
        row.figure = f"{ratio:.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        row.result = verdict(ratio >= 0.7)
        return row

    # -- PyPI ------------------------------------------------------------------

    def pip_download(self, index_url: str) -> float:
        """Seconds for one ``pip download`` of PIP_REQUIREMENTS from `index_url` (isolated, no cache)."""
        from tests.pypienv import pip_download

        dest = tempfile.mkdtemp(prefix="pip-download-", dir=self.workdir)
        try:
            t = time.perf_counter()
            res = pip_download(index_url, *PIP_REQUIREMENTS, dest=dest, timeout=600)
            elapsed = time.perf_counter() - t
            if res.returncode != 0:
                raise BenchError(f"pip download from {index_url} failed: {res.stderr.strip()[-300:]}")
            got = sorted(os.listdir(dest))
            if len(got) != 6:
                raise BenchError(f"pip download from {index_url} gave {got}")
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        return elapsed

    def test_pip_download(self) -> Row:
        p = self.plan
        row = Row(8, f"warm `pip download` of 6 wheels (one of {size_text(p.wheel)}) through the vault vs "
                     f"straight from the fake index: speed (time direct / time through the vault)")
        vault_index = f"{self.vault.url}/{PYPI_BACKEND}/simple/"
        self.pip_download(vault_index)  # warm: pages kept, files cached
        self.pip_download(self.index.url)  # and the reference's files in the page cache

        def best(index_url):
            # pip's own start-up and hashing are most of a run, and other load on the machine
            # lands on one run or another: each figure is the best of PIP_TRIES runs
            return 1 / min(self.pip_download(index_url) for _ in range(PIP_TRIES))

        v_times, d_times, ratios = self.paired(
            lambda: best(vault_index), lambda: best(self.index.url),
            lambda v, d: f"vault {1 / v:.2f} s, direct {1 / d:.2f} s (best of {PIP_TRIES})")
        ratio = median(ratios)
        row.vault = f"{1 / median(v_times):.2f} s"
        row.reference = f"{1 / median(d_times):.2f} s (fake index, tests/fakepypi.py)"
        row.figure, row.result = f"{ratio:.2f}", verdict(ratio >= 1.0)
        return row

    def test_index_pages(self) -> Row:
        p = self.plan
        row = Row(9, f"warm index page (JSON, 2 files) vs the 700-byte hit of row 3, HEAD+GET at "
                     f"{p.rps_connections} connections: requests/s")
        self.prime("small/config.json", 700)
        accept = "Accept: application/vnd.pypi.simple.v1+json"
        page_url = f"{self.vault.url}/{PYPI_BACKEND}/simple/alpha/"
        status, _ = http_request(page_url, headers={"Accept": accept.split(": ")[1]})
        if status != 200:
            raise BenchError(f"{page_url} answered {status}")
        small_url = f"{self.vault.url}/{BACKEND}/small/config.json"

        def page_rps():
            got = rps.measure(page_url, p.rps_connections, p.rps_duration, p.rps_warmup, self.rps_processes,
                              self.procs, headers=[accept])
            if got["errors"] or not got["ok"]:
                raise BenchError(f"{page_url}: {got['errors']} failed requests, answers {got['statuses']}")
            return got["rps"]

        pages, smalls, ratios = self.paired(page_rps, lambda: self.rps(small_url),
                                            lambda a, b: f"page {a:,.0f} req/s, small file {b:,.0f} req/s")
        ratio = median(ratios)
        row.vault, row.reference = f"{median(pages):,.0f} req/s", f"{median(smalls):,.0f} req/s (small-file hit)"
        row.figure, row.result = f"{ratio:.2f}", verdict(ratio >= 0.8)
        return row

    def big_wheel(self) -> tuple[str, str]:
        """The wheel of test 10, built once per data folder: (path, sha256)."""
        from tests.fakepypi import build_wheel

        folder = os.path.join(self.data_dir, f"wheel-{self.plan.huge_wheel}")
        path = os.path.join(folder, "huge-1.0-py3-none-any.whl")
        digest_file = path + ".sha256"
        if not (os.path.exists(path) and os.path.exists(digest_file)):
            os.makedirs(folder, exist_ok=True)
            self.say(f"  building a wheel with {size_text(self.plan.huge_wheel)} of padding")
            build_wheel(folder, "huge", "1.0", pad_bytes=self.plan.huge_wheel, seed=10)
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            with open(digest_file, "w") as f:
                f.write(digest.hexdigest())
        with open(digest_file) as f:
            return path, f.read().strip()

    def test_wheel_memory(self) -> Row:
        p = self.plan
        row = Row(10, f"peak resident memory (VmHWM) of the vault while a {size_text(p.huge_wheel)} wheel "
                      f"streams to {p.wheel_clients} clients (cold: one download, verified)")
        path, sha = self.big_wheel()
        added = self.index.control("dist", {"project": "huge", "path": path, "sha256": sha})
        size = added["size"]
        page_url = f"{self.vault.url}/{PYPI_BACKEND}/simple/huge/"
        status, body = http_request(page_url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        if status != 200:
            raise BenchError(f"the vault's page of huge answered {status}")
        (entry,) = json.loads(body)["files"]
        url = urljoin(page_url, entry["url"])
        base, how = self.reset_peak()
        wall, _ = clients.run_clients(self.procs, [url] * p.wheel_clients, size)
        peak = memory_status(self.vault.pid)["VmHWM"]
        gets = self.index.file_gets(os.path.basename(path))
        self.say(f"  {p.wheel_clients} clients in {wall:.1f} s, {gets} upstream GET(s): peak {peak / MiB:.1f} MiB "
                 f"(from {base / MiB:.1f} MiB, {how})")
        shutil.rmtree(os.path.join(self.cache_dir, PYPI_BACKEND, "files", "huge"), ignore_errors=True)
        row.vault = f"{peak / MiB:.1f} MiB; {gets} upstream GET; {rate_text(p.wheel_clients * size / wall)} in all"
        row.reference = f"before: {base / MiB:.1f} MiB"
        row.figure = f"{peak / MiB:.0f} MiB"
        row.result = verdict(peak < 100 * MiB and gets == 1)
        return row

    # -- the run ---------------------------------------------------------------

    def attempt(self, num: int, what: str, fn):
        if num not in self.wanted:
            return
        self.say(f"test {num}: {what}")
        try:
            self.rows[num] = fn()
        except (Interrupted, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - one broken measurement must not hide the others
            self.failed = True
            detail = e if isinstance(e, BenchError) else traceback.format_exc(limit=3)
            self.say(f"  test {num} failed: {detail}")
            self.rows[num] = Row(num, what, figure=f"error: {str(e).splitlines()[0][:120]}", result="error")

    def run(self):
        p = self.plan
        if self.wanted & (set(range(1, 11)) | {16}):
            self.run_core()
        apt = AptRows(self)
        if 11 in self.wanted:
            self.attempt(11, "APT: warm update + download through the vault vs the mirror", lambda: apt.warm_cycle(Row(
                11, f"APT, warm: a fresh client's apt-get update + download of the repository's packages (3 small, "
                   f"one of {size_text(p.apt_medium)}) through the vault vs straight from the mirror: time ratio")))
        if 12 in self.wanted:
            self.attempt(12, "APT: peak memory, one big .deb to many clients", lambda: apt.big_deb_memory(Row(
                12, f"APT: peak resident memory (VmHWM) of the vault while a {size_text(p.apt_big)} .deb streams "
                   f"to {p.apt_clients} clients: miss / hit; upstream GETs")))
        self.oci = oci = OciRows(self)
        if 13 in self.wanted:
            self.attempt(13, "OCI: warm skopeo copy, vault vs registry", lambda: oci.warm_copy(Row(
                13, f"OCI, warm: `skopeo copy` of an image with a {size_text(p.oci_layer)} layer through the vault "
                    f"vs straight from the registry: speed (time direct / time through the vault)")))
        if 14 in self.wanted:
            self.attempt(14, "OCI: warm manifest HEADs per second", lambda: oci.manifest_heads(Row(
                14, f"OCI: warm manifest HEAD by tag at {p.rps_connections} connections: requests/s vs the "
                    f"small-file hit rate of the same vault (HEAD+GET of a 700-byte file)")))
        if 15 in self.wanted:
            self.attempt(15, "OCI: peak memory while a layer streams to many clients", lambda: oci.layer_memory(Row(
                15, f"OCI: peak resident memory (VmHWM) of the vault while a cold {size_text(p.oci_big_layer)} "
                    f"layer streams to {p.oci_clients} clients")))
        for num, target in TARGETS.items():
            if num in self.rows or num in self.wanted:
                self.rows.setdefault(num, Row(num, "(not run)", result="error")).target = target

    def run_core(self):
        """
        Rows 1-10: the http backend against the fake origin, nginx and static.File;
        the pypi backend (same vault) against the fake index.
        """
        p = self.plan
        self.setup()
        self.attempt(4, "cold miss vs direct download", self.test_cold_miss)
        self.attempt(16, "cold miss from an HTTPS origin vs curl over HTTPS", self.test_https_miss)
        if self.wanted & {1, 2}:
            self.say("priming the other big files")
            for name in self.big_names:
                self.prime(f"big/{name}", p.big)
                self.link_reference(f"big/{name}", p.big)
        if self.nginx_bin:
            self.start_nginx()
        self.attempt(1, "one client, hit, vs nginx", self.test_hit_one)
        self.attempt(2, "concurrent clients, hit, vs nginx", self.test_hit_many)
        self.attempt(3, "small file requests/s vs static.File", self.test_small)
        self.attempt(5, "coalescing concurrent cold requests", self.test_coalesce)
        self.attempt(6, "peak memory while streaming", self.test_memory)
        self.attempt(7, "two processes vs one", self.test_processes)
        self.attempt(8, "pip download through the vault vs straight from the index", self.test_pip_download)
        self.attempt(9, "index page requests/s vs small-file hits", self.test_index_pages)
        self.attempt(10, "peak memory while a big wheel streams to many clients", self.test_wheel_memory)

    def close(self):
        self.procs.stop_all()


def _same_size(path, size):
    try:
        return os.path.getsize(path) == size
    except OSError:
        return False


def table(rows) -> list[str]:
    lines = ["| # | measurement | vault | reference | figure | target | result |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [str(row.num), row.what, row.vault, row.reference, row.figure, row.target, row.result]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return lines


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one run, nginx optional (CI)")
    ap.add_argument("--runs", type=int, help="repetitions per figure (default: 3, smoke: 1)")
    ap.add_argument("--output", help="also write the header and table to this markdown file")
    ap.add_argument("--workdir", help="parent folder of the run's temp folder (default: the system temp dir); "
                                      "it must be on the filesystem you want the cache on")
    ap.add_argument("--data-dir", help="keep the generated source files here and reuse them next time "
                                       "(default: inside the temp folder, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="do not remove the temp folder (logs, cache) at the end")
    ap.add_argument("--rps-processes", type=int, default=1,
                    help="threads of wrk (or processes of the Python client) for the small-file load (default 1: "
                         "on 2 cores a second one takes CPU from the server it measures)")
    ap.add_argument("--vault-code", help="measure the artifact_vault package of this checkout (default: the one "
                                         "this suite belongs to), e.g. a `git worktree` of an older commit")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--rows", help="run only these rows, e.g. 4,16 or 11,12 (the others are left out of the "
                                   "table; rows 1-10 and 16 share their setup)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if args.runs:
        plan = Plan(**{**plan.__dict__, "runs": max(1, args.runs)})
    if args.vault_code:
        services.VAULT_CODE = os.path.abspath(args.vault_code)
        if not os.path.isfile(os.path.join(services.VAULT_CODE, "artifact_vault", "__init__.py")):
            sys.stderr.write(f"bench: no artifact_vault package in {services.VAULT_CODE}\n")
            return 2
    nginx_bin = find_nginx()
    if nginx_bin is None and not (args.rows and all(n.strip() in ("11", "12", "13", "14", "15")
                                                    for n in args.rows.split(","))):
        msg = ("nginx is not installed: it is the reference of tests 1 and 2 "
               "(install it with: apt-get install -y nginx)")
        if not args.smoke:
            sys.stderr.write(f"bench: {msg}\n")
            return 2
        sys.stderr.write(f"bench: {msg}; smoke mode goes on and prints n/a for those ratios\n")

    workdir = tempfile.mkdtemp(prefix="vault-bench-", dir=args.workdir)
    data_dir = os.path.abspath(args.data_dir) if args.data_dir else os.path.join(workdir, "data")
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        rows = [int(n) for n in args.rows.split(",")] if args.rows else None
    except ValueError:
        sys.stderr.write(f"bench: --rows takes row numbers separated by commas, not {args.rows!r}\n")
        return 2
    if rows and not set(rows) <= set(TARGETS):
        sys.stderr.write(f"bench: there are rows {min(TARGETS)}-{max(TARGETS)} only\n")
        return 2
    bench = Bench(plan, workdir, data_dir, nginx_bin, args.rps_processes, rows)
    load_at_start = os.getloadavg()
    if load_at_start[0] > 1.0:
        sys.stderr.write(f"bench: the load average is {load_at_start[0]:.2f} before the suite starts: "
                         f"other work is running and the figures will be noisy\n")
    status = 0
    try:
        bench.run()
        header = header_lines(
            plan.mode, plan.runs, workdir,
            nginx_version(nginx_bin) if nginx_bin else "not installed",
            clients.client_name(),
            rps.client_name(args.rps_processes),
            load_at_start,
        )
        if bench.oci is not None and bench.oci.registry is not None:
            header.append(bench.oci.describe())
        text = "\n".join(header + [""] + table(bench.rows[n] for n in sorted(bench.rows))) + "\n"
        sys.stdout.write("\n" + text)
        sys.stdout.flush()
        if args.output:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        missed = any(r.result not in ("pass", "n/a") for r in bench.rows.values())
        if bench.failed or (args.strict and missed):
            status = 1
    except (KeyboardInterrupt, Interrupted) as e:
        sys.stderr.write(f"\nbench: interrupted ({str(e) or 'SIGINT'}), cleaning up\n")
        status = 130
    except BenchError as e:
        sys.stderr.write(f"bench: {e}\n")
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        bench.close()
        if args.keep:
            sys.stderr.write(f"bench: kept {workdir}\n")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        for s, handler in previous.items():
            signal.signal(s, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return status


if __name__ == "__main__":
    sys.exit(main())
