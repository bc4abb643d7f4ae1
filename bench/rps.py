"""
A lean HTTP/1.1 load generator for small files: requests per second over many
keep-alive connections, each connection alternating HEAD and GET.

Why not wrk: wrk's parser waits for a body after a HEAD answer that carries a
Content-Length, so a HEAD+GET mix stalls every connection.  This client is a
few processes (default 2), each one `selectors` loop over its share of the
connections, with pre-built requests and just enough parsing (status line,
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
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

from .services import BenchError

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
           head_only=False):
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
        c.head = head_only or not c.head
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


def measure(url, connections=32, duration=5.0, warmup=1.0, processes=2, procs=None, headers=(), head_only=False):
    """
    Requests per second (HEAD+GET alternating, or HEAD only) against `url`
    over `connections` connections split across `processes` worker
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
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    u = urlsplit(args.url)
    target = (u.path or "/") + ("?" + u.query if u.query else "")
    if args.worker:
        result = worker(u.hostname, u.port or 80, target, args.connections, args.duration, args.warmup,
                        headers=args.header, head_only=args.head_only)
        if result is None:
            return 1
        print(json.dumps(result))
        return 0
    try:
        result = measure(args.url, args.connections, args.duration, args.warmup, args.processes,
                         headers=args.header, head_only=args.head_only)
    except BenchError as e:
        sys.stderr.write(f"{e}\n")
        return 1
    print(json.dumps(result))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
