"""
Faults, and what the vault must do about them: whatever breaks (upstream cut
off at any byte, 5xx answers, silence longer than `timeout`, the hub down and
back, kill -9 and SIGTERM of the daemon, a full disk), no client is handed a
truncated body as a success, nothing partial or corrupt is ever published,
no temp file is left behind, and the next request after the fault succeeds
with the right bytes.

The first part runs the vault in-process (conftest's fixtures); the daemon
faults run the real ``twistd`` (tests/hfenv.py) against the fake upstream or
the fake hub as subprocesses.
"""

import errno
import hashlib
import os
import random
import shutil
import signal
import subprocess
import threading
import time

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import LogLevel, formatEvent
from twisted.web.client import ResponseDone

from tests.hfenv import (
    UpstreamProcess,
    fake_hub,
    fetch,
    file_sha256,
    git_blob_sha1,
    read,
    run_client,
    vault_process,
)
from tests.test_core import backend, sleep, stream, temp_files, until

#: ~2 MB that no encoding would shrink, and that shows where a piece came from
BIG = b"".join(hashlib.sha256(b"fault %d" % i).digest() for i in range(65536))
SMALL = b"small file, cached before the trouble starts\n" * 50


def sha(data):
    return hashlib.sha256(data).hexdigest()


def all_files(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


async def outcome(http, url):
    """(status, bytes received, clean end?) of one streamed GET."""
    response, s = await stream(http, url)
    reason = (await s.done).reason
    return response.code, bytes(s.data), bool(reason.check(ResponseDone))


def assert_failed_honestly(code, data, clean, whole):
    """An error status, or a 200 that broke off: never a clean 200, never wrong bytes."""
    if code == 200:
        assert not clean, "a cut upstream body reached the client as a clean 200"
        assert len(data) <= len(whole)  # all of it only when the size was unknown (chunked)
        assert data == whole[: len(data)], "the bytes a client got differ from upstream's"
    else:
        assert 500 <= code < 600 and clean


# -- a: upstream cut at many offsets --------------------------------------------------

CUT_SEED = 20240611
CUT_OFFSETS = sorted(random.Random(CUT_SEED).sample(range(1, len(BIG) - 1), 22)) + [0, 1, len(BIG) - 1]
CUT_CASES = [("length", off) for off in CUT_OFFSETS] + [("chunked", off) for off in CUT_OFFSETS]
# A chunked body whose every byte arrived but whose last chunk never did is cut too.
CUT_CASES.append(("chunked", len(BIG)))


@pytest.mark.parametrize("framing, offset", CUT_CASES, ids=[f"{f}-{o}" for f, o in CUT_CASES])
@pytest_twisted.ensureDeferred
async def test_cut_at_any_offset_is_an_error_and_nothing_is_kept(vault_factory, upstream, http, framing, offset):
    chunked = framing == "chunked"
    upstream.add("/cut.bin", BIG, cut_after=offset, chunked=chunked, hold=True)
    v = vault_factory(backend(upstream))
    # two clients on the one transfer: the first one's and a joiner's view (upstream holds
    # the body until both are there, however slow the machine)
    both = gatherResults([Deferred.fromCoroutine(outcome(http, v.url + "/files/cut.bin")) for _ in range(2)])
    await until(lambda: getattr(v.vault.downloads.get("files/cut.bin"), "interested", 0) == 2, timeout=20)
    upstream.release("/cut.bin")
    results = await both
    print(f"cut {framing} at {offset}: the clients saw", [(code, len(data), "clean" if clean else "aborted")
                                                          for code, data, clean in results])
    for code, data, clean in results:
        assert_failed_honestly(code, data, clean, BIG)
    assert v.store.lookup("files/cut.bin") is None
    await until(lambda: not temp_files(v.config.cache_dir))
    assert [f for f in all_files(v.config.cache_dir) if "cut.bin" in f and "/.locks/" not in f] == []
    assert upstream.count("/cut.bin") == 1

    upstream.add("/cut.bin", BIG, chunked=chunked)  # upstream is fixed
    code, data, clean = await outcome(http, v.url + "/files/cut.bin")
    assert (code, clean) == (200, True) and data == BIG
    assert v.store.lookup("files/cut.bin").meta["sha256"] == sha(BIG)
    assert upstream.count("/cut.bin") == 2


# -- b: 5xx in a run, silence, the hub down and back --------------------------------------


@pytest_twisted.ensureDeferred
async def test_503s_in_the_middle_of_a_run(vault_factory, upstream, http):
    bodies = {i: hashlib.sha256(b"run %d" % i).digest() * (2000 + 500 * i) for i in range(12)}
    broken = {4, 5, 6, 7}
    for i, body in bodies.items():
        upstream.add(f"/run/{i}.bin", body, status=503 if i in broken else 200)
    v = vault_factory(backend(upstream))
    for i in range(12):
        r = await http.get(f"{v.url}/files/run/{i}.bin")
        body = await r.content()
        if i in broken:
            assert r.code == 502 and b"answered 503" in body and bodies[i] not in body
            assert v.store.lookup(f"files/run/{i}.bin") is None
        else:
            assert r.code == 200 and body == bodies[i]
    assert not temp_files(v.config.cache_dir)
    for i in broken:
        upstream.add(f"/run/{i}.bin", bodies[i])  # upstream recovers
    for i in range(12):
        r = await http.get(f"{v.url}/files/run/{i}.bin")
        assert r.code == 200 and await r.content() == bodies[i]
        assert upstream.count(f"/run/{i}.bin") == (2 if i in broken else 1)


@pytest_twisted.ensureDeferred
async def test_one_path_that_flaps_between_503_and_200(vault_factory, upstream, http):
    v = vault_factory(backend(upstream))
    for status in (503, 500, 503, 200, 503):
        upstream.add("/flap.bin", BIG if status == 200 else b"maintenance", status=status)
        code, data, clean = await outcome(http, v.url + "/files/flap.bin")
        if status != 200 and v.store.lookup("files/flap.bin") is None:
            assert code == 502 and clean
        else:
            # once it is cached, upstream's later trouble is not the client's
            assert (code, clean, data) == (200, True, BIG)
        assert not temp_files(v.config.cache_dir)
    assert upstream.count("/flap.bin") == 4


@pytest_twisted.ensureDeferred
async def test_stall_longer_than_timeout_then_recovery(vault_factory, upstream, http):
    upstream.add("/stall.bin", BIG, stall_after=300_000)
    upstream.add("/silent.bin", BIG, delay_headers=30)
    v = vault_factory(backend(upstream, timeout=0.5))
    started = time.monotonic()
    results = await gatherResults([Deferred.fromCoroutine(outcome(http, v.url + "/files/stall.bin")) for _ in range(3)])
    for code, data, clean in results:
        assert_failed_honestly(code, data, clean, BIG)
        assert code == 200  # the stall came after the headers: an aborted 200
    r = await http.get(v.url + "/files/silent.bin")
    assert r.code == 504
    assert time.monotonic() - started < 5
    for name in ("stall.bin", "silent.bin"):
        assert v.store.lookup(f"files/{name}") is None
    await until(lambda: not temp_files(v.config.cache_dir))
    upstream.add("/stall.bin", BIG)
    upstream.add("/silent.bin", BIG)
    for name in ("stall.bin", "silent.bin"):
        code, data, clean = await outcome(http, f"{v.url}/files/{name}")
        assert (code, clean, data == BIG) == (200, True, True)
    assert upstream.count("/stall.bin") == 2  # one stalled GET for all three clients, one retry


def hf_backend(hub, **config):
    return [{"type": "huggingface", "config": {"base_url": hub.hub, **config}}]


def assert_hf_cache_sound(cache_dir, hub):
    """Every committed file in the cache is exactly what the hub has; no temp file is left."""
    root = os.path.join(cache_dir, "huggingface")
    assert not temp_files(cache_dir)
    known = {}  # (kind/repo, commit) -> files
    for repo_key, repo in hub.info["repos"].items():
        kind, _, name = repo_key.partition("/")
        folder = repo_key if "/" in name else f"{kind}/%/{name}"  # legacy single names live under "%"
        for commit, c in repo["commits"].items():
            known[(folder, commit)] = c["files"]
    checked = 0
    for path in all_files(root):
        rel = os.path.relpath(path, root)
        if rel.endswith(".vault-meta"):
            assert os.path.exists(path[: -len(".vault-meta")]), f"sidecar without data: {rel}"
            continue
        parts = rel.split(os.sep)
        if parts[0] == "blobs":
            assert file_sha256(path) == parts[-1], f"corrupt blob {rel}"
            checked += 1
        elif parts[0] == "files":
            for (repo_key, commit), files in known.items():
                prefix = os.path.join("files", repo_key, commit) + os.sep
                if rel.startswith(prefix):
                    meta = files[rel[len(prefix):]]
                    assert git_blob_sha1(read(path)) == meta["etag"], f"corrupt file {rel}"
                    checked += 1
    return checked


HF_OUTCOME = """
    import time
    import huggingface_hub.utils._http as client_http
    from huggingface_hub import hf_hub_download

    # The client retries a 5xx six times with 1..8 s pauses (23 s a file): same attempts, shorter pauses.
    class QuickTime:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds):
            time.sleep(min(seconds, 0.05))

    client_http.time = QuickTime()

    def outcome(fn):
        try:
            return ["ok", fn()]
        except Exception as e:
            return [type(e).__name__, str(e)[:300]]

    result = {{name: outcome(lambda name=name: hf_hub_download("gpt2", name)) for name in {names!r}}}
"""


def test_hub_down_then_back_with_the_real_client(tmp_path):
    with fake_hub(tmp_path / "hub") as hub, \
            vault_process(tmp_path / "vault", hf_backend(hub, offline_timeout=2)) as v:
        commit = hub.repo("models/gpt2")["refs"]["main"]
        files = hub.repo("models/gpt2")["commits"][commit]["files"]
        regular = ["config.json", "README.md"]
        cache = v.config["cache_dir"]

        hub.post_json("/_fake/mode", {"mode": "down5xx", "target": "both"})
        t0 = time.monotonic()
        res = run_client(v.endpoint, tmp_path, HF_OUTCOME.format(names=regular), hf_home=tmp_path / "c1")
        print("hub down:", round(time.monotonic() - t0, 1), "s", res)
        assert all(r[0] != "ok" for r in res.values()), res
        assert_hf_cache_sound(cache, hub)
        assert [f for f in all_files(cache) if "/files/" in f or "/blobs/" in f] == []

        hub.post_json("/_fake/mode", {"mode": "normal", "target": "both"})
        res = run_client(v.endpoint, tmp_path, HF_OUTCOME.format(names=regular), hf_home=tmp_path / "c2")
        for name in regular:
            assert res[name][0] == "ok", res
            assert git_blob_sha1(read(res[name][1])) == files[name]["etag"]

        # The CDN breaks off every LFS body after 100 kB: the client fails (after its own retries)...
        hub.post_json("/_fake/mode", {"target": "cdn", "cut_after_bytes": 100_000})
        t0 = time.monotonic()
        res = run_client(v.endpoint, tmp_path, HF_OUTCOME.format(names=["weights.bin"]), hf_home=tmp_path / "c3")
        print("cdn cut:", round(time.monotonic() - t0, 1), "s", res)
        assert res["weights.bin"][0] != "ok", res
        assert_hf_cache_sound(cache, hub)
        assert [f for f in all_files(cache) if "/blobs/" in f] == []
        # ... and once the CDN is well again, the same download succeeds.
        hub.post_json("/_fake/mode", {"target": "cdn", "cut_after_bytes": None})
        res = run_client(v.endpoint, tmp_path, HF_OUTCOME.format(names=["weights.bin"]), hf_home=tmp_path / "c4")
        assert res["weights.bin"][0] == "ok", res
        assert file_sha256(res["weights.bin"][1]) == files["weights.bin"]["sha256"]
        assert assert_hf_cache_sound(cache, hub) == 3
        assert "Traceback" not in v.log()


# -- c, d: kill -9 and SIGTERM of the daemon with downloads in flight ---------------------


@pytest.fixture
def upstream_process(tmp_path):
    up = UpstreamProcess(tmp_path)
    yield up
    up.stop()


class Download(threading.Thread):
    """One raw GET in a thread: status, bytes received, and how it ended."""

    def __init__(self, url, timeout=20):
        super().__init__(daemon=True)
        self.url, self.timeout = url, timeout
        self.status, self.data, self.error, self.length = None, b"", None, None
        self.start()

    def run(self):
        from http.client import HTTPConnection, IncompleteRead
        from urllib.parse import urlsplit

        u = urlsplit(self.url)
        conn = HTTPConnection(u.hostname, u.port, timeout=self.timeout)
        try:
            conn.request("GET", u.path)
            response = conn.getresponse()
            self.status = response.status
            self.length = response.getheader("content-length")
            chunks = []
            try:
                while True:
                    chunk = response.read1(1 << 16)
                    if not chunk:
                        break
                    chunks.append(chunk)
            finally:
                self.data = b"".join(chunks)
            if self.length is not None and len(self.data) != int(self.length):
                # http.client's read1 takes an early close for an end: compare with Content-Length
                raise IncompleteRead(self.data, int(self.length) - len(self.data))
        except Exception as e:  # noqa: BLE001 - what the client saw is the result
            self.error = e
        finally:
            conn.close()

    def seen(self):
        how = type(self.error).__name__ if self.error else "clean end"
        return f"{self.status} after {len(self.data)} of {self.length} bytes, then {how}"


def http_files(url, timeout=10):
    return [{"type": "http", "name": "files", "config": {"prefix": "/files/", "base_url": url, "timeout": timeout}}]


def wait_for(predicate, timeout=10, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        time.sleep(0.02)


def temp_sizes(cache):
    return {os.path.basename(p): os.path.getsize(p) for p in temp_files(cache)}


def payload(seed, size):
    block = hashlib.sha256(seed.encode()).digest()
    return b"".join(hashlib.sha256(block + i.to_bytes(4, "big")).digest() for i in range(size // 32))


def test_kill_9_with_downloads_in_flight_then_restart(tmp_path, upstream_process):
    up = upstream_process
    held, slow, small = payload("held", 6 << 20), payload("slow", 6 << 20), payload("small", 64 << 10)
    up.put("held.bin", held, hold=True)
    up.put("slow.bin", slow, throttle=[64 << 10, 0.05])
    up.put("small.bin", small)
    cache = tmp_path / "cache"
    with vault_process(tmp_path / "first", http_files(up.url), cache_dir=str(cache)) as v:
        assert fetch("GET", v.url + "/files/small.bin")[2] == small
        up.release("held.bin", upto=2 << 20)
        clients = [Download(v.url + "/files/held.bin"), Download(v.url + "/files/held.bin"),
                   Download(v.url + "/files/slow.bin")]
        wait_for(lambda: len(temp_files(cache)) == 2 and min(temp_sizes(cache).values()) >= 1 << 20,
                 what="two downloads under way")
        v.proc.send_signal(signal.SIGKILL)
        v.proc.wait(10)
        for c in clients:
            c.join(10)
    leftovers = temp_files(cache)
    assert len(leftovers) == 2  # the crash left its temp files behind...
    for name in ("held.bin", "slow.bin"):  # ... and nothing under the final names
        assert not (cache / "files" / name).exists() and not (cache / "files" / (name + ".vault-meta")).exists()
    for c in clients:
        assert c.status == 200 and len(c.data) < 6 << 20 and c.error is not None, c.seen()
        assert (held if "held" in c.url else slow).startswith(c.data)

    # Restart on the same cache while upstream is down for the two files: nothing partial is served.
    up.fail("held.bin")
    up.fail("slow.bin")
    with vault_process(tmp_path / "second", http_files(up.url), cache_dir=str(cache)) as v:
        assert temp_files(cache) == []
        assert "Removed 2 unfinished temp files" in v.log()
        for name in ("held.bin", "slow.bin"):
            status, _, body = fetch("GET", f"{v.url}/files/{name}")
            assert status == 502 and len(body) < 1000
        assert fetch("GET", v.url + "/files/small.bin")[:3:2] == (200, small)
        # Upstream is back: the same requests complete with the right bytes, and are kept.
        up.put("held.bin", held)
        up.put("slow.bin", slow)
        for name, data in (("held.bin", held), ("slow.bin", slow)):
            for _ in range(2):
                status, _, body = fetch("GET", f"{v.url}/files/{name}", timeout=30)
                assert status == 200 and sha(body) == sha(data)
        assert "Traceback" not in v.log()
    gets = [r["path"] for r in up.requests() if r["method"] == "GET"]
    assert gets.count("/small.bin") == 1 and gets.count("/held.bin") == 3 and gets.count("/slow.bin") == 3
    print("clients during kill -9:", [c.seen() for c in clients])


def test_sigterm_with_a_download_in_flight(tmp_path, upstream_process):
    up = upstream_process
    held = payload("held", 6 << 20)
    up.put("held.bin", held, hold=True)
    cache = tmp_path / "cache"
    with vault_process(tmp_path / "vault", http_files(up.url), cache_dir=str(cache)) as v:
        up.release("held.bin", upto=2 << 20)
        client = Download(v.url + "/files/held.bin")
        wait_for(lambda: sum(temp_sizes(cache).values()) >= 2 << 20, what="download under way")
        assert len(temp_files(cache)) == 1
        started = time.monotonic()
        v.proc.send_signal(signal.SIGTERM)
        v.proc.wait(10)
        took = time.monotonic() - started
        client.join(10)
        log = v.log()
    print(f"SIGTERM: exit status {v.proc.returncode} after {took:.2f} s; the client saw {client.seen()}")
    assert took < 5
    assert v.proc.returncode in (0, -signal.SIGTERM)
    assert "Server Shut Down." in log and "Traceback" not in log
    assert temp_files(cache) == []
    assert not (cache / "files" / "held.bin").exists()
    assert client.status == 200 and client.error is not None and len(client.data) < len(held)
    assert held.startswith(client.data)


# -- e: a full disk -------------------------------------------------------------------------

DISK = 8 << 20


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB tmpfs to use as cache_dir (needs root and mount; skipped otherwise)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK},mode=0755", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def free_bytes(path):
    return shutil.disk_usage(path).free


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest_twisted.ensureDeferred
async def test_disk_full_fails_the_download_keeps_hits_and_gives_the_space_back(
        vault_factory, upstream, http, small_disk, logged, framing):
    huge = payload("huge", 12 << 20)
    after = payload("after", 256 << 10)
    upstream.add("/small.bin", SMALL)
    upstream.add("/huge.bin", huge, throttle=(256 << 10, 0.001), chunked=framing == "chunked")
    upstream.add("/after.bin", after)
    v = vault_factory(backend(upstream), cache_dir=str(small_disk))
    assert await (await http.get(v.url + "/files/small.bin")).content() == SMALL
    free = free_bytes(small_disk)

    clients = await gatherResults([Deferred.fromCoroutine(outcome(http, v.url + "/files/huge.bin")) for _ in range(2)])
    for code, data, clean in clients:
        if code == 507:
            assert clean
        else:
            assert_failed_honestly(code, data, clean, huge)
    assert v.store.lookup("files/huge.bin") is None
    await until(lambda: not temp_files(small_disk))
    stored = [os.path.basename(f) for f in all_files(os.path.join(small_disk, "files"))]
    assert stored == ["small.bin", "small.bin.vault-meta"]
    assert free_bytes(small_disk) == free  # the space is given back
    assert "no space left in the cache" in logged.text()

    # hits keep being served, and the daemon goes on caching what fits
    r = await http.get(v.url + "/files/small.bin")
    assert r.code == 200 and await r.content() == SMALL
    assert upstream.count("/small.bin") == 1
    r = await http.get(v.url + "/files/after.bin")
    assert r.code == 200 and await r.content() == after
    assert v.store.lookup("files/after.bin") is not None
    print(f"disk full ({framing}): the clients saw", [(code, len(data), "clean" if clean else "aborted")
                                                      for code, data, clean in clients])
    if framing == "length":
        assert [code for code, _, _ in clients] == [507, 507]  # refused before a byte is written


def fill(folder, name="filler"):
    """Take every free block of the filesystem of `folder`."""
    with open(os.path.join(folder, name), "ab", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    assert free_bytes(folder) == 0


@pytest_twisted.ensureDeferred
async def test_disk_full_when_only_the_sidecar_does_not_fit(vault_factory, upstream, http, small_disk, logged):
    data = payload("exact", 1 << 20)  # a whole number of blocks: the last byte needs no new block
    upstream.add("/exact.bin", data, hold=True)
    upstream.release("/exact.bin", upto=len(data) - 1)
    v = vault_factory(backend(upstream), cache_dir=str(small_disk))
    response, s = await stream(http, v.url + "/files/exact.bin")
    await until(lambda: sum(temp_sizes(small_disk).values()) == len(data) - 1)
    fill(small_disk)
    upstream.release("/exact.bin")  # the data is complete; its sidecar finds no room
    reason = (await s.done).reason
    print("sidecar did not fit: the client saw", response.code, len(s.data), "of", len(data),
          "clean" if reason.check(ResponseDone) else "aborted")
    assert response.code == 200 and not reason.check(ResponseDone) and data.startswith(bytes(s.data))
    assert v.store.lookup("files/exact.bin") is None
    await until(lambda: not temp_files(small_disk))
    assert os.listdir(os.path.join(small_disk, "files")) == []
    assert "no space left in the cache" in logged.text()
    os.unlink(os.path.join(small_disk, "filler"))
    code, body, clean = await outcome(http, v.url + "/files/exact.bin")
    assert (code, clean, body == data) == (200, True, True)


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest_twisted.ensureDeferred
async def test_disk_already_full_when_a_miss_comes(vault_factory, upstream, http, small_disk, logged, framing):
    upstream.add("/small.bin", SMALL)
    upstream.add("/next.bin", BIG, chunked=framing == "chunked")
    v = vault_factory(backend(upstream), cache_dir=str(small_disk))
    assert await (await http.get(v.url + "/files/small.bin")).content() == SMALL
    fill(small_disk)
    try:
        code, data, clean = await outcome(http, v.url + "/files/next.bin")
        await sleep(0.5)
        leftovers = temp_files(small_disk)
        r = await http.get(v.url + "/files/small.bin")
        hit = (r.code, await r.content())
        os.unlink(os.path.join(small_disk, "filler"))
        again = await outcome(http, v.url + "/files/next.bin")
    finally:
        # judged below, here, rather than by conftest's teardown check (that would be an error, not a failure)
        errors = [formatEvent(e) for e in logged.errors()]
        logged.events[:] = [e for e in logged.events if not (e.get("log_failure") or e.get("log_level") is LogLevel.critical)]
    print(f"disk already full ({framing}): the client saw", code, len(data), "clean" if clean else "aborted")
    assert hit == (200, SMALL)
    assert again[0] == 200 and again[2] and again[1] == BIG
    assert v.store.lookup("files/next.bin") is not None
    assert errors == []  # a full disk is an expected condition, not a bug to log with a traceback
    assert leftovers == []
    assert code == 507 and clean or code == 200 and not clean


@pytest_twisted.ensureDeferred
async def test_two_downloads_that_fit_alone_but_not_together(vault_factory, upstream, http, small_disk, logged):
    one, two = payload("one", 5 << 20), payload("two", 5 << 20)
    upstream.add("/one.bin", one, throttle=(64 << 10, 0.005))
    upstream.add("/two.bin", two, throttle=(64 << 10, 0.005))
    v = vault_factory(backend(upstream), cache_dir=str(small_disk))
    results = await gatherResults([Deferred.fromCoroutine(outcome(http, f"{v.url}/files/{n}.bin"))
                                   for n in ("one", "two")])
    print("two at once: the clients saw", [(code, len(data), "clean" if clean else "aborted")
                                           for code, data, clean in results])
    kept = 0
    for name, whole, (code, data, clean) in zip(("one", "two"), (one, two), results):
        if code == 200 and clean:
            assert data == whole and v.store.lookup(f"files/{name}.bin") is not None
            kept += 1
        else:
            assert_failed_honestly(code, data, clean, whole)
            assert v.store.lookup(f"files/{name}.bin") is None
    assert kept <= 1
    await until(lambda: not temp_files(small_disk))
    for name, whole in (("one", one), ("two", two)):  # one after the other, each fits (the other is a hit)
        if v.store.lookup(f"files/{name}.bin") is None:
            for other in ("one", "two"):
                if other != name:
                    v.store.remove(f"files/{other}.bin")
            code, data, clean = await outcome(http, f"{v.url}/files/{name}.bin")
            assert (code, clean, data == whole) == (200, True, True)
