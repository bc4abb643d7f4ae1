"""
Big-file clients: one ``curl`` process per transfer, body to /dev/null (or to
a file).  curl spends little CPU per byte, which matters on a 2-core machine
where the client shares the CPU with the server it measures.  Without curl, a
small Python downloader (``python -m bench.clients URL OUT``) prints the same
figures, and the table says so.

Each transfer reports ``http_code time_starttransfer time_total size_download``;
a transfer that does not end with a 200 and the expected size is an error,
never a figure.
"""

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from .services import BenchError, Processes

WRITE_OUT = "%{http_code} %{time_starttransfer} %{time_total} %{size_download}\n"


@dataclass
class Result:
    code: int
    ttfb: float  # seconds from start to the first body byte
    total: float  # seconds from start to the last byte
    size: int

    @property
    def rate(self) -> float:
        return self.size / self.total if self.total > 0 else 0.0


def client_name() -> str:
    curl = shutil.which("curl")
    if curl:
        out = subprocess.run([curl, "--version"], capture_output=True, text=True, check=False).stdout.split()
        return f"curl {out[1]}" if len(out) > 1 else "curl"
    return "python http.client (curl not found)"


def _argv(url: str, out: str, ca: str | None = None) -> list[str]:
    curl = shutil.which("curl")
    if curl:
        return [curl, "-s", "-S", "-o", out, "-w", WRITE_OUT] + (["--cacert", ca] if ca else []) + [url]
    return [sys.executable, "-m", "bench.clients", url, out] + ([ca] if ca else [])


def run_clients(procs: Processes, urls: list[str], expected_size: int, outs=None, timeout=900.0, ca=None):
    """
    Start one client per URL at once and wait for all of them.  Returns
    (wall seconds from the first start to the last exit, [Result]).  `ca`:
    the PEM CA an https:// server's certificate must chain to.
    """
    outs = outs or [os.devnull] * len(urls)
    started = []
    t0 = time.perf_counter()
    try:
        for url, out in zip(urls, outs):
            started.append(procs.spawn(_argv(url, out, ca), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        results, errors = [], []
        deadline = time.monotonic() + timeout
        for proc in started:
            try:
                stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise BenchError(f"a client did not finish within {timeout:g} s") from None
            fields = stdout.decode(errors="replace").split()
            if proc.returncode != 0 or len(fields) != 4:
                errors.append(f"client exit {proc.returncode}: {stderr.decode(errors='replace').strip()[:200]}")
                continue
            result = Result(int(fields[0]), float(fields[1]), float(fields[2]), int(float(fields[3])))
            if result.code != 200 or result.size != expected_size:
                errors.append(f"HTTP {result.code}, {result.size} bytes of {expected_size}")
                continue
            results.append(result)
        wall = time.perf_counter() - t0
    finally:
        for proc in started:
            procs.stop(proc, timeout=2)
    if errors:
        raise BenchError(f"{len(errors)} of {len(urls)} transfers failed: {errors[0]}")
    return wall, results


def fetch_one(procs: Processes, url: str, expected_size: int, out=os.devnull, ca=None) -> Result:
    return run_clients(procs, [url], expected_size, [out], ca=ca)[1][0]


def _python_download(url: str, out: str, ca: str | None = None) -> int:
    """The fallback client: GET `url` into `out`, print curl's -w figures."""
    import http.client
    import ssl
    from urllib.parse import urlsplit

    u = urlsplit(url)
    t0 = time.perf_counter()
    if u.scheme == "https":
        conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=120,
                                           context=ssl.create_default_context(cafile=ca))
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.request("GET", u.path + ("?" + u.query if u.query else ""))
    resp = conn.getresponse()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    size, ttfb = 0, None
    with open(out, "wb", buffering=0) as sink:
        while True:
            n = resp.readinto(view)
            if not n:
                break
            if ttfb is None:
                ttfb = time.perf_counter() - t0
            sink.write(view[:n])
            size += n
    total = time.perf_counter() - t0
    print(f"{resp.status} {ttfb or total:.6f} {total:.6f} {size}")
    return 0


if __name__ == "__main__":
    sys.exit(_python_download(*sys.argv[1:4]))
