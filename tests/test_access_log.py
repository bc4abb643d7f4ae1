"""
The access log (``access_log``): lines written in batches (once a second,
sooner when 64 KiB wait, at shutdown), to a file reopened on SIGHUP/SIGUSR1
(logrotate), to standard output, into the vault's log when twistd logs to a
file, or nowhere; each worker process writing its own lines.  The line keeps
its privacy rules: no query, no field that could forge a line.
"""

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import pytest_twisted
import yaml
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from artifact_vault import accesslog
from artifact_vault.config import ConfigError, parse
from tests.hfenv import daemon_env, fetch, free_port, stop_process, twistd, vault_process
from tests.test_core import backend, raw_get, until

#: an access log line as written: time, client, request line, status, bytes, outcome, duration, user agent
LINE = re.compile(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} 127\.0\.0\.1 "(?P<method>\S+) (?P<target>\S+) '
                  r'HTTP/1\.1" (?P<status>\d{3}) (?P<bytes>\d+) (?P<outcome>\S+) \d+\.\d{3}s "(?P<agent>[^"]*)"$')


def lines_of(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def dummy(path=b"/files/a", agent=b"curl/8"):
    request = DummyRequest([b""])
    request.client = IPv4Address("TCP", "127.0.0.1", 40000)
    request.started, request.outcome = time.monotonic(), "hit"
    request.path = request.uri = path
    request.clientproto = b"HTTP/1.1"
    request.code = 200
    request.sentLength = 700
    request.requestHeaders.setRawHeaders(b"user-agent", [agent])
    return request


# -- batching, with a clock ------------------------------------------------------------------


def test_lines_wait_a_second_then_go_out_together(tmp_path):
    clock = Clock()
    path = tmp_path / "access.log"
    log = accesslog.AccessLog(clock, path=str(path))
    for n in range(3):
        log.add(dummy(b"/files/%d" % n))
        clock.advance(0.25)
    assert path.read_text() == ""  # 0.75 s after the first line: still waiting
    clock.advance(0.25)
    assert [LINE.match(x).group("target") for x in lines_of(path)] == ["/files/0", "/files/1", "/files/2"]
    log.add(dummy(b"/files/3"))
    assert len(lines_of(path)) == 3
    clock.advance(1.0)
    assert len(lines_of(path)) == 4
    assert not clock.getDelayedCalls()  # nothing waits, nothing is scheduled


def test_64_kib_waiting_go_out_at_once(tmp_path):
    clock = Clock()
    path = tmp_path / "access.log"
    log = accesslog.AccessLog(clock, path=str(path))
    agent = b"a" * 1000
    count = 0
    while path.stat().st_size == 0:
        log.add(dummy(agent=agent))
        count += 1
        assert count < 100
    size = path.stat().st_size
    assert size - size / count < accesslog.FLUSH_BYTES <= size  # the line that reached 64 KiB sent them
    assert len(lines_of(path)) == count and not clock.getDelayedCalls()


def test_close_writes_what_waits_and_later_lines_at_once(tmp_path):
    clock = Clock()
    path = tmp_path / "access.log"
    log = accesslog.AccessLog(clock, path=str(path))
    log.add(dummy())
    log.close()
    assert len(lines_of(path)) == 1
    log.add(dummy())  # a request that ended during the shutdown
    assert len(lines_of(path)) == 2


def test_reopen_moves_to_the_new_file_after_writing_the_old_one(tmp_path):
    clock = Clock()
    path = tmp_path / "access.log"
    log = accesslog.AccessLog(clock, path=str(path))
    log.add(dummy(b"/before"))
    os.rename(path, tmp_path / "access.log.1")
    log.reopen()
    log.add(dummy(b"/after"))
    clock.advance(1)
    assert ["/before"] == [LINE.match(x).group("target") for x in lines_of(tmp_path / "access.log.1")]
    assert ["/after"] == [LINE.match(x).group("target") for x in lines_of(path)]


def test_a_pipe_gets_whole_lines_no_longer_than_pipe_buf(tmp_path):
    """Several processes write to one pipe (standard output of the main process): lines must not mix."""
    import select

    r, w = os.pipe()
    try:
        log = accesslog.AccessLog(Clock(), fd=w)
        for n in range(20):
            log.add(dummy(agent=b"b" * 700))
        sizes = []
        original = os.write

        def write(fd, data):
            sizes.append(len(data))
            return original(fd, data)

        accesslog.os.write = write
        try:
            log.flush()
        finally:
            accesslog.os.write = original
        assert len(sizes) > 1 and max(sizes) <= select.PIPE_BUF
        data = os.read(r, 1 << 20)
        assert data.endswith(b"\n") and all(LINE.match(x) for x in data.decode().splitlines())
    finally:
        os.close(r)
        os.close(w)


# -- the line ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_line_has_no_query_and_cannot_be_forged(vault_factory, upstream, http, tmp_path):
    upstream.add("/a.txt", b"hello")
    path = tmp_path / "access.log"
    v = vault_factory(backend(upstream), access_log=str(path))
    forged = 'x" 200 0 hit 0.001s "y \u00e9'
    status, _, _ = await raw_get(v.url, "/files/a.txt?token=secret123", "GET", {"User-Agent": forged.encode("utf-8")})
    assert status == 200
    v.vault.access_log.flush()
    [text] = lines_of(path)
    assert "secret123" not in text and "token" not in text
    match = LINE.match(text)
    assert match is not None, text
    assert match.group("target") == "/files/a.txt?..."
    assert match.group("agent") == r"x\x22 200 0 hit 0.001s \x22y \xc3\xa9"
    assert (match.group("status"), match.group("outcome")) == ("200", "forwarded")  # a query: relayed


@pytest_twisted.ensureDeferred
async def test_lines_are_batched_over_real_sockets(vault_factory, upstream, http, tmp_path):
    upstream.add("/a.txt", b"hello")
    path = tmp_path / "access.log"
    v = vault_factory(backend(upstream), access_log=str(path))
    started = time.monotonic()
    for _ in range(5):
        await (await http.get(v.url + "/files/a.txt")).content()
    if time.monotonic() - started < 0.8:
        assert lines_of(path) == []  # answered, not yet written
    await until(lambda: len(lines_of(path)) == 5, timeout=5)
    assert [LINE.match(x).group("outcome") for x in lines_of(path)] == ["miss", "hit", "hit", "hit", "hit"]


@pytest_twisted.ensureDeferred
async def test_off_writes_nothing(vault_factory, upstream, http, logged):
    upstream.add("/a.txt", b"hello")
    v = vault_factory(backend(upstream), access_log="off")
    await (await http.get(v.url + "/files/a.txt")).content()
    assert v.vault.access_log is None
    assert not any('"GET /files/a.txt' in m for m in logged.messages())


def test_config_values(tmp_path):
    def value(v):
        return parse({"access_log": v}, environ={}).access_log

    assert value("-") == "-" and value("") == "-" and parse({}, environ={}).access_log == "-"
    assert value("off") is None and value(False) is None  # YAML reads a bare off as false
    assert value(str(tmp_path / "a.log")) == str(tmp_path / "a.log")
    with pytest.raises(ConfigError, match=r"^access_log: the folder of .* does not exist"):
        value(str(tmp_path / "missing" / "a.log"))
    with pytest.raises(ConfigError, match=r"^access_log: .* is a folder"):
        value(str(tmp_path))
    with pytest.raises(ConfigError, match=r"^access_log: must be"):
        value(12)


# -- the daemon: rotation, shutdown, workers, standard output ---------------------------------------


def probe(url, tag) -> int:
    """GET /_vault/health with User-Agent `tag`; returns the pid of the process that answered."""
    request = urllib.request.Request(url + "/_vault/health", headers={"User-Agent": tag})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())["pid"]


def probes(url, prefix, n=60) -> dict:
    """n probes over several connections; tag -> pid."""
    tags = [f"{prefix}-{i}" for i in range(n)]
    with ThreadPoolExecutor(8) as pool:
        return dict(zip(tags, pool.map(lambda t: probe(url, t), tags)))


def agents(path) -> list[str]:
    return [LINE.match(x).group("agent") for x in lines_of(path) if LINE.match(x)]


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1])
def test_the_file_is_reopened_on_a_signal_by_every_process(tmp_path, signum):
    path = tmp_path / "access.log"
    with vault_process(tmp_path / "v", [], access_log=str(path), workers=2) as v:
        wait_for(lambda: len(set(probes(v.url, "warm", 20).values())) == 2)  # both processes answer
        before = probes(v.url, "before")
        assert len(set(before.values())) == 2
        wait_for(lambda: set(before) <= set(agents(path)))
        os.rename(path, tmp_path / "access.log.1")
        os.kill(v.proc.pid, signum)
        wait_for(path.exists)
        time.sleep(1.0)  # the main process passes the signal on to its worker
        after = probes(v.url, "after")
        assert len(set(after.values())) == 2
        wait_for(lambda: set(after) <= set(agents(path)))
        assert not any(a.startswith("after") for a in agents(tmp_path / "access.log.1"))
        assert not any(a.startswith("before") for a in agents(path))
        assert "Worker 1 ended" not in v.log()  # the worker took the signal, it was not killed by it
        log = v.log()
    assert not any(tag in log for tag in list(before) + list(after))  # no line went through the log pipe
    if signum == signal.SIGUSR1:
        assert (tmp_path / "v" / "vault.log.1").exists()  # twistd's own rotation on SIGUSR1 still happens


def test_lines_waiting_at_shutdown_are_written(tmp_path):
    path = tmp_path / "access.log"
    with vault_process(tmp_path / "v", [], access_log=str(path)) as v:
        tags = probes(v.url, "last", 10)
        stop_process(v.proc)  # at once: well within the second the lines may wait
    assert set(tags) <= set(agents(path))


def test_into_the_vault_log_when_twistd_logs_to_a_file(tmp_path):
    """The default "-" while twistd has --logfile: the lines go into that log, as before."""
    with vault_process(tmp_path / "v", []) as v:
        probe(v.url, "into-the-log")
        wait_for(lambda: '"GET /_vault/health HTTP/1.1" 200' in v.log() and "into-the-log" in v.log())


def test_standard_output_gets_every_process_s_lines_whole(tmp_path):
    """twistd -n without --logfile: lines on standard output, the workers' written there by the workers."""
    folder = tmp_path / "v"
    folder.mkdir()
    port = free_port()
    (folder / "config.yml").write_text(yaml.safe_dump({
        "http_host": "127.0.0.1", "http_port": port, "cache_dir": str(folder / "cache"), "backends": [],
        "workers": 2}))
    out = folder / "stdout"
    with open(out, "wb") as stdout:
        proc = subprocess.Popen([twistd(), "-n", "--pidfile=", "artifact-vault", "--config", str(folder / "config.yml")],
                                cwd=str(folder), stdout=stdout, stderr=subprocess.STDOUT, env=daemon_env())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url))
        wait_for(lambda: len(set(probes(url, "warm", 20).values())) == 2)
        tags = probes(url, "std", 200)
        assert len(set(tags.values())) == 2
        wait_for(lambda: set(tags) <= set(_stdout_agents(out)))
    finally:
        stop_process(proc)
    text = out.read_text()
    lines = [x for x in text.splitlines() if "std-" in x]
    assert len(lines) == 200 and all(LINE.match(x) for x in lines)  # whole, and none through a worker's log
    assert "Started worker 1" in text


def _answers(url) -> bool:
    try:
        return fetch("GET", url + "/_vault/health", timeout=2)[0] == 200
    except OSError:
        return False


def _stdout_agents(path) -> list[str]:
    return [m.group("agent") for m in map(LINE.match, path.read_text().splitlines()) if m]
