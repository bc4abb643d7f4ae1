"""
Small hits, served from memory after their first read: always the bytes of
the entry on disk now (a file replaced by another process, a purged one),
with a bounded memory; the answer's bytes on the wire as before (status
line and headers written as one piece).
"""

import json
import os
import socket

import pytest_twisted

from artifact_vault.store import META_SUFFIX, CacheStore
from tests.test_core import backend, raw_get


def replace_entry(path, data: bytes):
    """What another process committing a new version does: a new file renamed over the old one."""
    with open(path + META_SUFFIX) as f:
        meta = json.load(f)
    meta["size"] = len(data)
    with open(path + ".new", "wb") as f:
        f.write(data)
    with open(path + META_SUFFIX, "w") as f:
        json.dump(meta, f)
    os.replace(path + ".new", path)


@pytest_twisted.ensureDeferred
async def test_a_replaced_entry_is_served_with_its_new_bytes(vault_factory, upstream, http):
    upstream.add("/c.json", b'{"v": 1}')
    v = vault_factory(backend(upstream))
    for _ in range(3):  # a miss, then hits (from memory after the first)
        assert await (await http.get(v.url + "/files/c.json")).content() == b'{"v": 1}'
    replace_entry(v.store.lookup("files/c.json").path, b'{"v": 22}')
    response = await http.get(v.url + "/files/c.json")
    assert (response.code, await response.content()) == (200, b'{"v": 22}')
    assert upstream.count("/c.json") == 1


@pytest_twisted.ensureDeferred
async def test_a_removed_entry_is_not_served_from_memory(vault_factory, upstream, http):
    upstream.add("/c.json", b'{"v": 1}')
    v = vault_factory(backend(upstream))
    for _ in range(2):
        await (await http.get(v.url + "/files/c.json")).content()
    path = v.store.lookup("files/c.json").path
    os.unlink(path)  # purged or evicted
    upstream.add("/c.json", b'{"v": 3}')
    assert await (await http.get(v.url + "/files/c.json")).content() == b'{"v": 3}'
    assert upstream.count("/c.json") == 2


def test_memory_of_small_bodies_is_bounded(tmp_path):
    store = CacheStore(str(tmp_path))
    store.SMALL_BODIES_BYTES = 10_000
    entries = []
    for n in range(30):
        writer = store.writer(f"files/{n}.bin", expected=1000)
        writer.write(bytes([n]) * 1000)
        os.fsync(writer.fd)
        entries.append(writer.commit({}))
    for entry in entries:
        assert store.small_body(store.lookup(entry.key)) == bytes([int(entry.key[6:-4])]) * 1000
    assert store._small_bytes <= 10_000 and len(store._small) == 10
    assert [k for k in store._small] == [f"files/{n}.bin" for n in range(20, 30)]  # the latest served
    big = store.writer("files/big.bin", expected=store.SMALL_BODY + 1)
    big.write(b"x" * (store.SMALL_BODY + 1))
    assert store.small_body(big.commit({})) is None  # not small: read from the file each time


@pytest_twisted.ensureDeferred
async def test_the_status_line_and_headers_are_well_formed_on_the_wire(vault_factory, upstream):
    upstream.add("/c.json", b"{}", content_type="application/json")
    v = vault_factory(backend(upstream))
    status, _, _ = await raw_get(v.url, "/files/c.json")
    assert status == 200
    from twisted.internet.threads import deferToThread

    def raw():
        host, port = v.url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"GET /files/c.json HTTP/1.1\r\nHost: localhost\r\n\r\n")
            data = b""
            while not data.endswith(b"\r\n\r\n{}"):
                chunk = s.recv(65536)
                assert chunk, data
                data += chunk
            return data

    data = await deferToThread(raw)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK" and body == b"{}"
    fields = dict(line.split(b": ", 1) for line in lines[1:])
    assert fields[b"Content-Length"] == b"2" and fields[b"Content-Type"] == b"application/json"
    assert fields[b"X-Content-Type-Options"] == b"nosniff" and fields[b"Content-Security-Policy"] == b"sandbox"
    assert b"Date" in fields and b"ETag" in fields
