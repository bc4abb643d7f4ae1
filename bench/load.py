"""
Load test: many concurrent clients on loopback against the real daemon, with
a mix of cache hits, joins (many clients on one download in flight) and
misses, for a bounded time.  Not part of the test run; one command::

    python bench/load.py                 # 500 clients, 60 s
    python bench/load.py --seconds 30 --clients 200

It starts the fake origin (``python -m tests.upstream``, serving a folder the
script fills as it goes) and the vault (``twistd -n artifact-vault``, one
``http`` backend at ``/files/``), warms the hit set, then runs every client as
an asyncio task on one keep-alive connection of its own:

* hit  (70 %): one of the warm files (1 kB to 1 MB);
* join (20 %): the file of the current generation: a new 4 MB file appears
  upstream every second, sent slowly (64 kB every 20 ms), so the clients that
  ask for it while it downloads all join the one upstream GET;
* miss (10 %): a file nobody asked for yet (8 to 128 kB), written into the
  origin's folder just before the request.

Every body is checked against the sha256 of what the origin has.  At the end
it prints requests done, errors (anything but a 200 with the right bytes;
must be 0), bytes, p50/p99 latency (per kind too), the upstream GETs per
kind, and the vault's peak RSS (VmHWM from /proc/PID/status) and its RSS
over the run.  Exit status 1 when there were errors.
"""

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.hfenv import fetch, vault_process

JOIN_SIZE = 4 << 20
JOIN_THROTTLE = [64 << 10, 0.02]
MIX = (("hit", 70), ("join", 20), ("miss", 10))


def content(seed: str, size: int) -> bytes:
    """Deterministic bytes that no compression would shrink."""
    block = hashlib.sha256(seed.encode()).digest() * 32  # 1 kB
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(block + counter.to_bytes(8, "big")).digest() * 32
        counter += 1
    return bytes(out[:size])


class Origin:
    """tests/upstream.py in its own process, serving `files`."""

    def __init__(self, folder: Path):
        self.files = folder / "origin"
        self.files.mkdir(parents=True)
        ready = folder / "origin-ready.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.upstream", "--listen", "127.0.0.1:0", "--ready-file", str(ready),
             "--files", str(self.files)],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the fake origin did not start")
            time.sleep(0.05)
        self.url = json.loads(ready.read_text())["url"]
        self.digests = {}

    def put(self, rel: str, data: bytes, **behaviour) -> None:
        path = self.files / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.digests[rel] = (hashlib.sha256(data).hexdigest(), len(data))
        if behaviour:
            status, _, body = fetch("POST", self.url + "/_fake/add", {"Content-Type": "application/json"},
                                    json.dumps({"path": "/" + rel, "file": str(path), **behaviour}).encode())
            if status != 200:
                raise RuntimeError(f"origin refused {rel}: {body!r}")

    def get_counts(self) -> Counter:
        _, _, body = fetch("GET", self.url + "/_fake/requests", timeout=60)
        counts = Counter()
        for r in json.loads(body):
            if r["method"] == "GET":
                counts[r["path"].split("/")[1]] += 1
        return counts

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Connection:
    """One keep-alive HTTP/1.1 connection; bodies are hashed as they arrive, never kept."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def get(self, path: str):
        """(status, sha256 hex, length) of one GET; raises on a broken connection."""
        if self.writer is None:
            await self.open()
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode())
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        h = hashlib.sha256()
        size = 0
        if "content-length" in headers:
            left = int(headers["content-length"])
            while left:
                chunk = await self.reader.read(min(left, 1 << 16))
                if not chunk:
                    raise ConnectionError(f"body cut after {size} of {size + left} bytes")
                h.update(chunk)
                size += len(chunk)
                left -= len(chunk)
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                n = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if n == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                chunk = await self.reader.readexactly(n + 2)
                h.update(chunk[:-2])
                size += n
        else:
            while chunk := await self.reader.read(1 << 16):
                h.update(chunk)
                size += len(chunk)
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, h.hexdigest(), size


class Load:
    def __init__(self, args, origin: Origin, base: str, hits: list):
        self.args = args
        self.origin = origin
        u = urlsplit(base)
        self.host, self.port = u.hostname, u.port
        self.hits = hits
        self.latency = defaultdict(list)
        self.done = Counter()
        self.errors = Counter()
        self.error_samples = []
        self.bytes = 0
        self.connect_times = []
        self.join_current = None
        self.misses = 0
        self.stop_at = None

    async def joins(self):
        generation = 0
        while time.monotonic() < self.stop_at:
            rel = f"join/{generation}.bin"
            await asyncio.to_thread(self.origin.put, rel, content(f"join {generation}", JOIN_SIZE),
                                    throttle=JOIN_THROTTLE)
            self.join_current = rel
            generation += 1
            await asyncio.sleep(1.0)

    def next_miss(self, rng) -> str:
        self.misses += 1
        rel = f"miss/{self.misses}.bin"
        self.origin.put(rel, content(f"miss {self.misses}", rng.randint(8 << 10, 128 << 10)))
        return rel

    async def client(self, number: int):
        rng = random.Random(number)
        await asyncio.sleep(rng.random() * 0.5)  # do not hit the listen backlog all at once
        conn = Connection(self.host, self.port)
        started = time.monotonic()
        try:
            await conn.open()
        except OSError as e:
            self.errors["connect"] += 1
            self.error_samples.append(f"connect: {e!r}")
            return
        self.connect_times.append(time.monotonic() - started)
        kinds = [k for k, _ in MIX]
        weights = [w for _, w in MIX]
        while time.monotonic() < self.stop_at:
            kind = rng.choices(kinds, weights)[0]
            if kind == "hit":
                rel = rng.choice(self.hits)
            elif kind == "join":
                rel = self.join_current or rng.choice(self.hits)
            else:
                rel = self.next_miss(rng)
            want_sha, want_size = self.origin.digests[rel]
            t0 = time.monotonic()
            try:
                status, got_sha, size = await asyncio.wait_for(conn.get("/files/" + rel), self.args.timeout)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                    ConnectionError, ValueError) as e:
                conn.close()
                self.errors[kind] += 1
                if len(self.error_samples) < 10:
                    self.error_samples.append(f"{kind} {rel}: {e!r}")
                continue
            elapsed = time.monotonic() - t0
            if status != 200 or got_sha != want_sha or size != want_size:
                self.errors[kind] += 1
                if len(self.error_samples) < 10:
                    self.error_samples.append(f"{kind} {rel}: status {status}, {size} bytes, sha256 ok: "
                                              f"{got_sha == want_sha}")
                continue
            self.done[kind] += 1
            self.bytes += size
            self.latency[kind].append(elapsed)
        conn.close()

    async def run(self, watch):
        self.stop_at = time.monotonic() + self.args.seconds
        join_task = asyncio.create_task(self.joins())
        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(self.client(i) for i in range(self.args.clients)))
        await join_task
        watcher.cancel()


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def proc_status(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmHWM", "VmRSS", "Threads"):
                    out[name] = int(value.split()[0])
    except OSError:
        pass
    try:
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="how long the clients run (default 60)")
    parser.add_argument("--clients", type=int, default=500, help="concurrent clients (default 500)")
    parser.add_argument("--hit-files", type=int, default=40, help="size of the warm set (default 40)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds one request may take (default 60)")
    parser.add_argument("--log-level", default="INFO", help="the vault's log_level (default INFO)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (cache, logs)")
    parser.add_argument("--fd-limit", type=int, default=None,
                        help="soft RLIMIT_NOFILE for this run and its servers (e.g. 1024, systemd's default)")
    args = parser.parse_args(argv)
    if args.fd_limit:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.fd_limit, hard))

    work = Path(tempfile.mkdtemp(prefix="vault-load-"))
    origin = Origin(work)
    try:
        rng = random.Random(1)
        hits = []
        for i in range(args.hit_files):
            rel = f"hit/{i}.bin"
            origin.put(rel, content(f"hit {i}", int(1024 * 1024.0 ** rng.random())))  # 1 kB .. 1 MB, log-uniform
            hits.append(rel)
        backends = [{"type": "http", "name": "files", "config": {"prefix": "/files/", "base_url": origin.url,
                                                                 "timeout": 30}}]
        with vault_process(work / "vault", backends, log_level=args.log_level) as vault:
            pid = vault.proc.pid
            for rel in hits:
                status, _, body = fetch("GET", f"{vault.url}/files/{rel}", timeout=30)
                assert status == 200 and hashlib.sha256(body).hexdigest() == origin.digests[rel][0], rel
            before = proc_status(pid)
            samples = []

            async def watch():
                while True:
                    samples.append(proc_status(pid))
                    await asyncio.sleep(1)

            load = Load(args, origin, vault.url, hits)
            print(f"{args.clients} clients for {args.seconds:g} s against {vault.url} (pid {pid}); "
                  f"warm set {len(hits)} files, {sum(origin.digests[h][1] for h in hits) / 1e6:.1f} MB", flush=True)
            started = time.monotonic()
            asyncio.run(load.run(watch))
            wall = time.monotonic() - started
            after = proc_status(pid)
            alive = vault.proc.poll() is None
            log = "".join(p.read_text(errors="replace") for p in sorted(vault.folder.glob("vault.log*")))
        upstream = origin.get_counts()
    finally:
        origin.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    total = sum(load.done.values())
    errors = sum(load.errors.values())
    every = [x for v in load.latency.values() for x in v]
    rss = [s.get("VmRSS", 0) for s in samples if s]
    print(f"wall time            {wall:.1f} s (clients stop starting requests after {args.seconds:g} s)")
    print(f"requests done        {total}  ({total / wall:.0f}/s)  " +
          ", ".join(f"{k} {load.done[k]}" for k, _ in MIX))
    print(f"errors               {errors}" + (f"  {dict(load.errors)}" if errors else ""))
    for sample in load.error_samples:
        print(f"    {sample}")
    print(f"bytes                {load.bytes / 1e6:.1f} MB  ({load.bytes / wall / 1e6:.1f} MB/s)")
    print(f"latency p50 / p99    {percentile(every, 50) * 1000:.1f} ms / {percentile(every, 99) * 1000:.1f} ms")
    for kind, _ in MIX:
        values = load.latency[kind]
        print(f"    {kind:5}            {percentile(values, 50) * 1000:.1f} ms / "
              f"{percentile(values, 99) * 1000:.1f} ms  (max {max(values, default=0) * 1000:.0f} ms)")
    print(f"connect p99          {percentile(load.connect_times, 99) * 1000:.1f} ms")
    print(f"upstream GETs        hit {upstream['hit']} (warm-up only), join {upstream['join']} "
          f"for {load.done['join'] + load.errors['join']} join requests, miss {upstream['miss']}")
    print(f"vault peak RSS       VmHWM {after.get('VmHWM', 0) / 1024:.1f} MB  "
          f"(RSS before {before.get('VmRSS', 0) / 1024:.1f} MB, max during {max(rss, default=0) / 1024:.1f} MB, "
          f"after {after.get('VmRSS', 0) / 1024:.1f} MB; open fds max {max((s.get('fds', 0) for s in samples), default=0)})")
    print(f"vault alive          {alive}; in its log: {log.count('Traceback')} tracebacks, "
          f"{log.count('Unexpected error')} unexpected errors")
    if args.keep:
        print(f"work folder          {work}")
    return 1 if errors or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
