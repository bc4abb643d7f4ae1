"""
Long bodies from a plain-HTTP upstream are moved by splice(2) (socket, pipe,
cache file) instead of through Python.  The guarantees stay those of every
download: the bytes and their sha256 exactly as upstream sent them, clients
streaming while they arrive, the last byte held until the check passes, a
body cut short or stalled never published and its clients cut off, nothing
read beyond the announced length, and no descriptor left behind.
"""

import hashlib
import os

import pytest
import pytest_twisted
from twisted.web.client import ResponseDone

from artifact_vault import fetch, store
from artifact_vault.downloads import DownloadSpec
from artifact_vault.errors import IntegrityError
from tests.test_core import backend, stream, temp_files, until

pytestmark = pytest.mark.skipif(not fetch.SPLICE, reason="no os.splice on this platform")

#: 12 MiB: more than fetch.SPLICE_MIN after the first socket reads
BIG = b"".join(hashlib.sha256(b"splice %d" % i).digest() for i in range(12 * 1024 * 1024 // 32))


@pytest.fixture
def splices(monkeypatch):
    """The `_Splice`s made during the test (to know that the body took that path)."""
    made = []

    class Counted(fetch._Splice):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(fetch, "_Splice", Counted)
    return made


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def fetch_body(http, url):
    response, s = await stream(http, url)
    reason = (await s.done).reason
    return response.code, bytes(s.data), bool(reason.check(ResponseDone))


@pytest_twisted.ensureDeferred
async def test_a_long_body_is_spliced_and_kept_exactly(vault_factory, upstream, http, splices):
    upstream.add("/big.bin", BIG)
    v = vault_factory(backend(upstream))
    fds = open_fds()
    code, data, clean = await fetch_body(http, v.url + "/files/big.bin")
    assert (code, clean, data == BIG) == (200, True, True)
    assert len(splices) == 1 and splices[0].done and splices[0].closed
    entry = v.store.lookup("files/big.bin")
    assert entry.meta["sha256"] == hashlib.sha256(BIG).hexdigest() and entry.size == len(BIG)
    with open(entry.path, "rb") as f:
        assert f.read() == BIG
    await until(lambda: open_fds() <= fds)
    # the next download from the same upstream takes a new connection and works as well
    upstream.add("/big2.bin", BIG[::-1])
    code, data, clean = await fetch_body(http, v.url + "/files/big2.bin")
    assert (code, clean, data == BIG[::-1]) == (200, True, True)
    assert upstream.count("/big.bin") == 1 and upstream.count("/big2.bin") == 1


@pytest_twisted.ensureDeferred
async def test_chunked_bodies_are_not_spliced(vault_factory, upstream, http, splices):
    """Without a Content-Length the framing is Twisted's to parse: no splice."""
    upstream.add("/chunked.bin", BIG, chunked=True)
    v = vault_factory(backend(upstream))
    code, data, clean = await fetch_body(http, v.url + "/files/chunked.bin")
    assert (code, clean, data == BIG) == (200, True, True) and splices == []


@pytest_twisted.ensureDeferred
async def test_clients_stream_while_the_body_is_spliced(vault_factory, upstream, http, splices):
    upstream.add("/held.bin", BIG, hold=True)
    v = vault_factory(backend(upstream))
    _, first = await stream(http, v.url + "/files/held.bin")
    upstream.release("/held.bin", upto=10 * 1024 * 1024)
    await until(lambda: len(first.data) >= 9 * 1024 * 1024, timeout=10)
    assert splices and not first.done.called
    _, late = await stream(http, v.url + "/files/held.bin")  # joins the running download
    await until(lambda: len(late.data) >= 9 * 1024 * 1024, timeout=10)
    assert len(first.data) < len(BIG)  # the rest is still upstream
    upstream.release("/held.bin")
    for s in (first, late):
        assert (await s.done).reason.check(ResponseDone)
        assert bytes(s.data) == BIG
    assert upstream.count("/held.bin") == 1


@pytest_twisted.ensureDeferred
async def test_a_body_cut_during_the_splice_is_never_published(vault_factory, upstream, http, splices):
    upstream.add("/cut.bin", BIG, cut_after=len(BIG) - 1_000_000)
    v = vault_factory(backend(upstream))
    fds = open_fds()
    code, data, clean = await fetch_body(http, v.url + "/files/cut.bin")
    assert not clean and data == BIG[:len(data)] and len(data) < len(BIG)
    assert splices and splices[0].closed and not splices[0].done
    assert v.store.lookup("files/cut.bin") is None
    await until(lambda: not temp_files(v.config.cache_dir))
    await until(lambda: open_fds() <= fds)


@pytest_twisted.ensureDeferred
async def test_a_body_that_stalls_during_the_splice_times_out(vault_factory, upstream, http, splices, logged):
    upstream.add("/stall.bin", BIG, hold=True)
    v = vault_factory(backend(upstream, timeout=1))
    response, s = await stream(http, v.url + "/files/stall.bin")
    upstream.release("/stall.bin", upto=10 * 1024 * 1024)
    reason = (await s.done).reason
    assert not reason.check(ResponseDone) and splices
    assert v.store.lookup("files/stall.bin") is None
    assert "sent nothing for 1 s" in logged.text()
    await until(lambda: not temp_files(v.config.cache_dir))


@pytest_twisted.ensureDeferred
async def test_the_hash_falling_behind_pauses_the_splice(vault_factory, upstream, http, splices, monkeypatch):
    monkeypatch.setattr(store, "HASH_BACKLOG", 16 * 1024)  # less than any pipe the kernel gives
    paused = []
    original = fetch._Splice.pause
    monkeypatch.setattr(fetch._Splice, "pause", lambda self: (paused.append(1), original(self)))
    upstream.add("/big.bin", BIG)
    v = vault_factory(backend(upstream))
    code, data, clean = await fetch_body(http, v.url + "/files/big.bin")
    assert (code, clean, data == BIG) == (200, True, True)
    assert splices and paused  # it paused (and came back) at least once
    assert v.store.lookup("files/big.bin").meta["sha256"] == hashlib.sha256(BIG).hexdigest()


@pytest_twisted.ensureDeferred
async def test_a_wrong_sha256_fails_after_the_splice(vault_factory, upstream, splices):
    upstream.add("/big.bin", BIG)
    v = vault_factory(backend(upstream))
    spec = DownloadSpec("files/big.bin", upstream.url + "/big.bin", expected_sha256="0" * 64)
    download, how, ready = v.vault.downloads.ready(spec)
    await ready
    with pytest.raises(IntegrityError, match="sha256 of files/big.bin is"):
        await download.published()
    assert splices and v.store.lookup("files/big.bin") is None
    await until(lambda: not temp_files(v.config.cache_dir))


@pytest_twisted.ensureDeferred
async def test_stopping_during_the_splice_leaves_nothing(vault_factory, upstream, http, splices):
    upstream.add("/held.bin", BIG, hold=True)
    v = vault_factory(backend(upstream))
    fds = open_fds()
    _, s = await stream(http, v.url + "/files/held.bin")
    upstream.release("/held.bin", upto=10 * 1024 * 1024)
    await until(lambda: splices and len(s.data) >= 9 * 1024 * 1024, timeout=10)
    assert v.vault.downloads.abort_all("the vault is shutting down") == 1
    assert not (await s.done).reason.check(ResponseDone)
    assert splices[0].closed and v.store.lookup("files/held.bin") is None
    await until(lambda: not temp_files(v.config.cache_dir))
    upstream.release("/held.bin")
    await until(lambda: open_fds() <= fds)
