"""
The OCI rows of the benchmark: skopeo and curl against a vault with one
``oci`` backend in front of a registry (`bench.registry`: Debian's
docker-registry, or the test suite's fake registry), and an ``http`` backend
beside it for the small-file reference of row 14.

13. **Warm skopeo copy**: ``skopeo copy docker://... dir:...`` of an image
    whose one layer is ``oci_layer`` bytes, through the (primed) vault vs
    straight from the registry; the figure is registry time / vault time,
    median of at least 5 runs in full mode (skopeo's own work sets the pace
    on both sides, so the figure sits near 1.0 and noise moves it).
14. **Manifest HEADs**: ``HEAD /v2/bench/copy/manifests/1.0`` (a warm tag,
    with docker's Accept header) on ``rps_connections`` keep-alive
    connections, requests per second, vs the small-file hit rate (HEAD+GET of
    a 700-byte file, as row 3) of the same vault, alternately in one run.
15. **Peak memory**: VmHWM of the vault (reset first) while ``oci_clients``
    curl clients fetch one cold layer of ``oci_big_layer`` bytes at once (one
    download, streamed to all while written).
"""

import os

from . import clients, rps
from .data import config_json, write_small
from .registry import Skopeo, have_skopeo, skopeo_version, start_registry
from .services import (BACKEND, BenchError, clear_peak_rss, http_request, memory_status, start_upstream,
                       start_vault)

MiB = 1024 * 1024
COPY_IMAGE = "bench/copy"  # row 13
HUGE_IMAGE = "bench/huge"  # row 15
ACCEPT = ("Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
          "application/vnd.docker.distribution.manifest.list.v2+json, "
          "application/vnd.docker.distribution.manifest.v2+json")


def median(values):
    from .run import median as run_median  # run imports this module: the helpers come at call time

    return run_median(values)


def rate_text(bps: float) -> str:
    from .run import rate_text as run_rate_text

    return run_rate_text(bps)


def verdict(ok: bool) -> str:
    from .run import verdict as run_verdict

    return run_verdict(ok)


class OciRows:
    """Rows 13-15 for a `run.Bench` (its plan, processes, workdir, data folder, say and paired)."""

    def __init__(self, bench):
        self.bench = bench
        self.plan = bench.plan
        self.procs = bench.procs
        self.workdir = os.path.join(bench.workdir, "oci")
        os.makedirs(self.workdir, exist_ok=True)
        self.skopeo = Skopeo(self.procs, os.path.join(self.workdir, "skopeo-home")) if have_skopeo() else None
        self.registry = None
        self.images: dict = {}
        self.vault = None

    def describe(self) -> str:
        kind = self.registry.kind if self.registry is not None else "no registry started"
        return f"- OCI rows: {kind} as the registry, skopeo {skopeo_version()}"

    def _setup(self):
        if self.vault is not None:
            return
        p = self.plan
        self.bench.say("  starting the registry of the OCI rows (pushing its images)")
        self.registry, self.images = start_registry(
            self.procs, self.workdir, {COPY_IMAGE: (p.oci_layer, 80), HUGE_IMAGE: (p.oci_big_layer, 81)},
            self.bench.data_dir, self.skopeo)
        self.bench.say(f"  {self.registry.kind} at {self.registry.url}")
        files = os.path.join(self.workdir, "files")
        os.makedirs(files, exist_ok=True)
        write_small(os.path.join(files, "config.json"), config_json(700))
        origin = start_upstream(self.procs, self.workdir, files)
        origin.add("/small/config.json", os.path.join(files, "config.json"), content_type="application/json")
        backends = [{"type": "http", "name": BACKEND, "config": {"base_url": origin.url, "prefix": f"/{BACKEND}/"}},
                    {"type": "oci", "name": "registry",
                     "config": {"registry": "registry.bench", "base_url": self.registry.url, "default": True}}]
        self.vault = start_vault(self.procs, self.workdir, origin.url, os.path.join(self.workdir, "cache"),
                                 name="vault-oci", backends=backends)

    def _ref(self, name: str) -> str:
        return f"{self.vault.url[len('http://'):]}/{name}:1.0"

    def warm_copy(self, row):
        """13: a warm skopeo copy through the vault vs straight from the registry (throughput ratio)."""
        if self.skopeo is None:
            row.figure, row.result = "skopeo not installed", "n/a"
            return row
        self._setup()
        b, p = self.bench, self.plan
        size = self.images[COPY_IMAGE]["size"]
        row.what += f" ({self.registry.kind})"
        out = os.path.join(self.workdir, "skopeo-out")
        b.say(f"  priming {COPY_IMAGE} through the vault")
        self.skopeo.copy(self._ref(COPY_IMAGE), out)
        direct = f"{self.registry.host}/{COPY_IMAGE}:1.0"
        self.skopeo.copy(direct, out)  # the registry's files into the page cache too
        v_times, d_times, _ = b.paired(
            lambda: self.skopeo.copy(self._ref(COPY_IMAGE), out), lambda: self.skopeo.copy(direct, out),
            lambda v, d: f"vault {v:.2f} s ({rate_text(size / v)}), registry {d:.2f} s ({rate_text(size / d)})",
            runs=p.runs if p.mode == "smoke" else max(p.runs, 5))
        ratio = median([d / v for v, d in zip(v_times, d_times)])
        row.vault = f"{median(v_times):.2f} s ({rate_text(size / median(v_times))})"
        row.reference = f"{median(d_times):.2f} s ({rate_text(size / median(d_times))})"
        row.figure, row.result = f"{ratio:.2f}", verdict(ratio >= 1.0)
        return row

    def manifest_heads(self, row):
        """14: warm manifest HEADs by tag per second vs the small-file hit rate of the same vault."""
        self._setup()
        b, p = self.bench, self.plan
        manifest_url = f"{self.vault.url}/v2/{COPY_IMAGE}/manifests/1.0"
        small_url = f"{self.vault.url}/{BACKEND}/small/config.json"
        for url, method in ((manifest_url, "HEAD"), (small_url, "GET")):
            status, _ = http_request(url, method, headers={"Accept": ACCEPT.split(": ", 1)[1]})
            if status != 200:
                raise BenchError(f"{method} {url} answered {status}")

        def measure(url, **kw):
            got = rps.measure(url, p.rps_connections, p.rps_duration, p.rps_warmup, b.rps_processes, self.procs, **kw)
            if got["errors"] or not got["ok"]:
                raise BenchError(f"{url}: {got['errors']} failed requests, answers {got['statuses']}")
            return got["rps"]

        m_rps, s_rps, ratios = b.paired(
            lambda: measure(manifest_url, head_only=True, headers=[ACCEPT]), lambda: measure(small_url),
            lambda m, s: f"manifest HEAD {m:,.0f} req/s, small file {s:,.0f} req/s")
        ratio = median(ratios)
        row.vault, row.reference = f"{median(m_rps):,.0f} req/s", f"{median(s_rps):,.0f} req/s (small-file hits)"
        row.figure, row.result = f"{ratio:.2f}", verdict(ratio >= 0.8)
        return row

    def layer_memory(self, row):
        """15: peak RSS of the vault while a cold layer streams to many clients at once."""
        self._setup()
        b, p = self.bench, self.plan
        info = self.images[HUGE_IMAGE]
        status, _ = http_request(f"{self.vault.url}/v2/{HUGE_IMAGE}/manifests/1.0", "GET", headers={"Accept": "*/*"})
        if status != 200:
            raise BenchError(f"the manifest of {HUGE_IMAGE} answered {status}")
        how = "clear_refs" if clear_peak_rss(self.vault.pid) else "since start (clear_refs refused)"
        base = memory_status(self.vault.pid)["VmRSS"]
        url = f"{self.vault.url}/v2/{HUGE_IMAGE}/blobs/{info['layer']}"
        wall, _ = clients.run_clients(self.procs, [url] * p.oci_clients, info["size"])
        peak = memory_status(self.vault.pid)["VmHWM"]
        b.say(f"  {p.oci_clients} clients in {wall:.1f} s: peak {peak / MiB:.1f} MiB (from {base / MiB:.1f} MiB, {how})")
        row.vault = f"{peak / MiB:.1f} MiB; all done in {wall:.1f} s"
        row.reference = f"before: {base / MiB:.1f} MiB"
        row.figure = f"{peak / MiB:.0f} MiB"
        row.result = verdict(peak < 100 * MiB)
        return row
