"""
Small-file load: requests per second over many keep-alive connections.

`measure_get` (rows 3 and 7: GET only) runs ``wrk`` where it is installed (one
thread by default: on 2 cores more take CPU from the server they measure),
else the Python client below; a warm-up run comes first and is not counted,
any answer other than 200 (or a socket error) fails the measurement, and
with `cpu_of` the CPU the server's processes used during the counted run is
measured too (from /proc).

`measure` is the Python client itself: each connection alternating HEAD and
GET (or HEAD only, or GET only), which wrk cannot do (its parser waits for a
body after a HEAD answer that carries a Content-Length).  A few processes
(default 2), each one `selectors` loop over its share of the connections,
with pre-built requests and just enough parsing (status line,
Content-Length) to know where an answer ends.  It costs a small fraction of
what a Python server spends per request, so it does not become the limit.

Each worker connects, says ``ready``, waits for ``go`` on stdin, runs a
warm-up (not counted) and then counts answers for `duration` seconds.  Any
answer other than 200, or a connection the server closes, is counted as an
error; the caller treats errors as a failed measurement.

Standalone: ``python -m bench.rps http://127.0.0.1:8080/bench/config.json -c 32 -d 5``.
"""

import argparse
import json
import re
import selectors
import shutil
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

from .services import BenchError, cpu_seconds

_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


class _Conn:
    __slots__ = ("buf", "head", "need", "sock", "status")

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.head = False
        self.need = -1
        self.status = 0


def _connect(host, port):
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return _Conn(sock)


def worker(host, port, target, connections, duration, warmup, stdin=sys.stdin, stdout=sys.stdout, headers=(),
           head_only=False, get_only=False):
    host_header = f"{host}:{port}".encode()
    extra = b"".join(h.encode("latin-1") + b"\r\n" for h in headers)
    requests = {
        True: b"HEAD %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: bench-rps\r\n%s\r\n" % (target.encode(), host_header, extra),
        False: b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: bench-rps\r\n%s\r\n" % (target.encode(), host_header, extra),
    }
    sel = selectors.DefaultSelector()
    try:
        conns = [_connect(host, port) for _ in range(connections)]
    except OSError as e:
        stdout.write(f"cannot connect to {host}:{port}: {e.strerror or e}\n")
        stdout.flush()
        return None
    stdout.write("ready\n")
    stdout.flush()
    if stdin.readline().strip() != "go":
        return {"ok": 0, "errors": 0, "statuses": {}}
    now = time.monotonic()
    count_from, stop_at = now + warmup, now + warmup + duration
    ok = errors = 0
    statuses: dict[int, int] = {}

    def send(c):
        c.head = head_only or (not get_only and not c.head)
        c.sock.send(requests[c.head])  # a few dozen bytes: fits in an empty send buffer

    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
        send(c)

    while True:
        now = time.monotonic()
        if now >= stop_at:
            break
        for key, _ in sel.select(min(0.2, stop_at - now)):
            c = key.data
            try:
                data = c.sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:  # the server closed a keep-alive connection: count it, reconnect
                errors += 1
                sel.unregister(c.sock)
                c.sock.close()
                fresh = _connect(host, port)
                conns[conns.index(c)] = fresh
                sel.register(fresh.sock, selectors.EVENT_READ, fresh)
                send(fresh)
                continue
            c.buf += data
            while True:
                if c.need < 0:
                    end = c.buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    c.status = int(c.buf[9:12])
                    m = _LENGTH.search(c.buf, 0, end + 2)
                    body = 0 if c.head or c.status in (204, 304) else (int(m.group(1)) if m else 0)
                    c.need = end + 4 + body
                if len(c.buf) < c.need:
                    break
                del c.buf[: c.need]
                c.need = -1
                t = time.monotonic()
                if count_from <= t < stop_at:
                    statuses[c.status] = statuses.get(c.status, 0) + 1
                    if c.status == 200:
                        ok += 1
                    else:
                        errors += 1
                send(c)
    for c in conns:
        c.sock.close()
    return {"ok": ok, "errors": errors, "statuses": statuses}


def client_name(processes: int = 1) -> str:
    """What `measure_get` uses, for the table's header."""
    wrk = shutil.which("wrk")
    if wrk:
        out = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
        version = (out.stdout + out.stderr).split()
        name = f"wrk {version[1]}" if len(version) > 1 and version[0] == "wrk" else "wrk"
        return f"{name} ({processes} thread{'s' if processes > 1 else ''}, keep-alive, GET)"
    return f"bench/rps.py (Python, {processes} process{'es' if processes > 1 else ''}, keep-alive, GET; wrk not found)"


def measure_get(url, connections=32, duration=5.0, warmup=1.0, processes=1, procs=None, cpu_of=None):
    """
    GET requests per second against `url` over `connections` connections,
    after a warm-up of `warmup` seconds that is not counted, with wrk (or the
    Python client).  Returns {"rps", "ok", "errors", "statuses", "cpu"}:
    "cpu" is the CPU seconds of the processes `cpu_of()` names during the
    counted run (None without it).
    """
    wrk = shutil.which("wrk")

    def run(seconds):
        if wrk:
            return _wrk(wrk, url, connections, seconds, processes, procs)
        return measure(url, connections, seconds, 0.0, processes, procs, get_only=True)

    if warmup > 0:
        run(warmup)
    pids = cpu_of() if cpu_of is not None else []
    before = cpu_seconds(pids)
    total = run(duration)
    total["cpu"] = cpu_seconds(pids) - before if cpu_of is not None else None
    return total


def _wrk(wrk, url, connections, duration, threads, procs):
    argv = [wrk, f"-t{max(1, min(threads, connections))}", f"-c{connections}",
            f"-d{max(1, round(duration))}s", url]  # wrk counts whole seconds
    spawn = procs.spawn if procs is not None else subprocess.Popen
    proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=duration + 60)
    finally:
        if procs is not None:
            procs.forget(proc)
    done = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    if proc.returncode != 0 or done is None:
        raise BenchError(f"wrk failed on {url}: {(err or out).strip()[:200]}")
    ok = int(done.group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(int(x) for x in sockets.groups()) if sockets else 0)
    seconds = float(done.group(2)) / (1000 if done.group(3) == "ms" else 1)
    return {"ok": ok - (int(bad.group(1)) if bad else 0), "errors": errors,
            "statuses": {"non-2xx": int(bad.group(1))} if bad else {"2xx": ok}, "rps": ok / seconds}


def measure(url, connections=32, duration=5.0, warmup=1.0, processes=2, procs=None, headers=(), head_only=False,
            get_only=False):
    """
    Requests per second (HEAD+GET alternating, HEAD only or GET only) against
    `url` over `connections` connections split across `processes` worker
    processes, each request with the extra `headers` ("Name: value" lines).
    Returns {"rps", "ok", "errors", "statuses"}.
    """
    processes = max(1, min(processes, connections))
    shares = [connections // processes + (1 if i < connections % processes else 0) for i in range(processes)]
    argv = [sys.executable, "-m", "bench.rps", url, "--worker", "-d", str(duration), "-w", str(warmup)]
    for header in headers:
        argv += ["-H", header]
    if head_only:
        argv.append("--head-only")
    if get_only:
        argv.append("--get-only")
    spawn = procs.spawn if procs is not None else subprocess.Popen
    workers = [spawn(argv + ["-c", str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for n in shares]
    try:
        for w in workers:
            line = w.stdout.readline().strip()
            if line != "ready":
                raise BenchError(f"load worker: {line or 'exited'} ({url})")
        for w in workers:
            w.stdin.write("go\n")
            w.stdin.flush()
        total = {"ok": 0, "errors": 0, "statuses": {}}
        for w in workers:
            out, _ = w.communicate(timeout=duration + warmup + 60)
            part = json.loads(out.strip().splitlines()[-1])
            total["ok"] += part["ok"]
            total["errors"] += part["errors"]
            for code, n in part["statuses"].items():
                total["statuses"][code] = total["statuses"].get(code, 0) + n
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
            if procs is not None:
                procs.forget(w)
    total["rps"] = total["ok"] / duration
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url")
    ap.add_argument("-c", "--connections", type=int, default=32)
    ap.add_argument("-d", "--duration", type=float, default=5.0)
    ap.add_argument("-w", "--warmup", type=float, default=1.0)
    ap.add_argument("-p", "--processes", type=int, default=2)
    ap.add_argument("-H", "--header", action="append", default=[], help="an extra request header, 'Name: value'")
    ap.add_argument("--head-only", action="store_true", help="HEAD requests only (default: HEAD and GET alternating)")
    ap.add_argument("--get-only", action="store_true", help="GET requests only")
    ap.add_argument("--wrk", action="store_true", help="GET with wrk (the Python client where wrk is missing)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    u = urlsplit(args.url)
    target = (u.path or "/") + ("?" + u.query if u.query else "")
    if args.worker:
        result = worker(u.hostname, u.port or 80, target, args.connections, args.duration, args.warmup,
                        headers=args.header, head_only=args.head_only, get_only=args.get_only)
        if result is None:
            return 1
        print(json.dumps(result))
        return 0
    try:
        if args.wrk:
            result = measure_get(args.url, args.connections, args.duration, args.warmup, args.processes)
        else:
            result = measure(args.url, args.connections, args.duration, args.warmup, args.processes,
                             headers=args.header, head_only=args.head_only, get_only=args.get_only)
    except BenchError as e:
        sys.stderr.write(f"{e}\n")
        return 1
    print(json.dumps(result))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
