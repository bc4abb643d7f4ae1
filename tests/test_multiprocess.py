"""
Several vaults on one cache_dir: one upstream download per key across
processes (flock on .locks/), the others stream the growing file.

In-process tests run two vault instances in one reactor: flock(2) locks
belong to open file descriptions, so two instances conflict exactly as two
processes do.  The last test runs two real daemons.
"""

import hashlib
import json
import time
import os
import threading
import urllib.request

import pytest_twisted
from twisted.internet.defer import gatherResults
from twisted.web.client import ResponseDone

from tests.hfenv import UpstreamProcess, vault_process
from tests.test_core import BODY, backend, stream, temp_files, until


@pytest_twisted.ensureDeferred
async def test_second_process_follows_the_first_ones_download(vault_factory, upstream, http, logged):
    upstream.add("/held.bin", BODY, hold=True)
    a = vault_factory(backend(upstream))
    b = vault_factory(backend(upstream))
    assert a.config.cache_dir == b.config.cache_dir
    _, from_a = await stream(http, a.url + "/files/held.bin")
    upstream.release("/held.bin", upto=400_000)
    await until(lambda: len(from_a.data) >= 400_000)
    response, from_b = await stream(http, b.url + "/files/held.bin")
    assert response.code == 200
    await until(lambda: len(from_b.data) >= 400_000)  # b streams what a has written so far
    upstream.release("/held.bin")
    for s in (from_a, from_b):
        assert (await s.done).reason.check(ResponseDone)
        assert bytes(s.data) == BODY
    assert upstream.count("/held.bin") == 1
    assert "Following the download of files/held.bin by another vault process" in logged.text()


@pytest_twisted.ensureDeferred
async def test_follower_clients_are_aborted_when_the_download_fails(vault_factory, upstream, http):
    upstream.add("/cut.bin", BODY, hold=True, cut_after=700_000)
    a = vault_factory(backend(upstream))
    b = vault_factory(backend(upstream))
    _, from_a = await stream(http, a.url + "/files/cut.bin")
    upstream.release("/cut.bin", upto=100_000)
    await until(lambda: len(from_a.data) >= 100_000)
    _, from_b = await stream(http, b.url + "/files/cut.bin")
    upstream.release("/cut.bin")
    for s in (from_a, from_b):
        assert not (await s.done).reason.check(ResponseDone)
    assert a.store.lookup("files/cut.bin") is None
    await until(lambda: not temp_files(a.config.cache_dir))


@pytest_twisted.ensureDeferred
async def test_a_starting_process_does_not_sweep_a_running_download(vault_factory, upstream, http):
    upstream.add("/held.bin", BODY, hold=True)
    a = vault_factory(backend(upstream))
    _, s = await stream(http, a.url + "/files/held.bin")
    upstream.release("/held.bin", upto=200_000)
    await until(lambda: len(s.data) >= 200_000)
    assert temp_files(a.config.cache_dir)
    vault_factory(backend(upstream))  # sweeps at start
    assert temp_files(a.config.cache_dir)
    upstream.release("/held.bin")
    assert (await s.done).reason.check(ResponseDone) and bytes(s.data) == BODY


@pytest_twisted.ensureDeferred
async def test_a_follower_that_arrives_after_the_commit_serves_the_entry(vault_factory, upstream, http):
    upstream.add("/a.bin", BODY)
    a = vault_factory(backend(upstream))
    b = vault_factory(backend(upstream))
    bodies = await gatherResults([(await http.get(v.url + "/files/a.bin")).content() for v in (a, b, a, b)])
    assert all(body == BODY for body in bodies)
    assert upstream.count("/a.bin") == 1


def test_two_daemons_share_one_cache_under_concurrent_load(tmp_path):
    """Two real twistd processes, 8 files, 40 concurrent clients spread over both."""
    expected = {f"f{i}.bin": hashlib.sha256(str(i).encode()).digest() * (20000 + 5000 * i) for i in range(8)}
    up = UpstreamProcess(tmp_path)
    for name, data in expected.items():
        up.put(name, data)
    try:
        backends = [{"type": "http", "name": "files", "config": {"prefix": "/files/", "base_url": up.url}}]
        cache = str(tmp_path / "cache")
        with vault_process(tmp_path / "a", backends, cache_dir=cache) as a, \
                vault_process(tmp_path / "b", backends, cache_dir=cache) as b:
            results, errors = [], []

            def client(n):
                name = f"f{n % 8}.bin"
                url = (a if n % 2 else b).url + "/files/" + name
                try:
                    with urllib.request.urlopen(url, timeout=60) as r:
                        results.append((name, r.read()))
                except Exception as e:  # noqa: BLE001 - every failure is a test failure
                    errors.append(repr(e))

            threads = [threading.Thread(target=client, args=(n,)) for n in range(40)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert errors == []
            assert len(results) == 40 and all(body == expected[name] for name, body in results)
            gets = [x["path"] for x in up.requests() if x["method"] == "GET"]
            assert sorted(gets) == sorted(f"/f{i}.bin" for i in range(8))  # one GET per file, both daemons
            assert not temp_files(cache)
            assert os.path.isdir(os.path.join(cache, ".locks"))
    finally:
        up.stop()


def test_workers_option_runs_several_processes_on_one_port(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with vault_process(tmp_path / "v", [], workers=2) as v:
        def pid(_):
            with urllib.request.urlopen(v.url + "/_vault/health", timeout=10) as r:
                return json.loads(r.read())["pid"]

        deadline = time.monotonic() + 30
        pids = set()
        while len(pids) < 2 and time.monotonic() < deadline:  # the worker may need a moment to start
            with ThreadPoolExecutor(8) as pool:
                pids |= set(pool.map(pid, range(100)))
        assert len(pids) == 2
        assert v.proc.pid in pids
        assert "Started worker 1" in v.log()
    assert "worker1" in v.log() and "Main loop terminated" in v.log()
