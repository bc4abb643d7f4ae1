"""
Hugging Face backend against a scripted hub (tests/upstream.py), in-process:
the cases the fake hub does not produce by itself (wrong sha256 or size, a
gzipping hub, 429), and many clients on one cold file.
"""

import hashlib
import os

import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.client import ResponseDone

from tests.test_core import raw_get, stream, temp_files

COMMIT = "a" * 40
DATA = hashlib.sha256(b"weights").digest() * 30000  # 960 kB
SHA = hashlib.sha256(DATA).hexdigest()


def hub_backend(upstream, **config):
    return [{"type": "huggingface", "config": {"base_url": upstream.url, **config}}]


def add_file(upstream, name, data, **behaviour):
    """The scripted hub answers for `name` by branch (main) and by commit."""
    for rev in ("main", COMMIT):
        upstream.add(f"/org/m/resolve/{rev}/{name}", data, **behaviour)


def lfs_headers(sha=SHA, size=len(DATA)):
    return {"X-Repo-Commit": COMMIT, "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(size), "ETag": '"s3-md5"'}


@pytest_twisted.ensureDeferred
async def test_sha256_mismatch_is_never_published(vault_factory, upstream, http, logged):
    corrupt = DATA[:-1] + b"!"  # the right size, the wrong bytes (a bad CDN node, say)
    add_file(upstream, "w.bin", corrupt, headers=lfs_headers())
    v = vault_factory(hub_backend(upstream))
    response, s = await stream(http, v.url + "/huggingface/org/m/resolve/main/w.bin")
    assert response.code == 200  # streaming had begun when the hash could be checked
    reason = (await s.done).reason
    assert not reason.check(ResponseDone)  # the client sees a broken transfer, not a clean body
    assert [f for _, _, fs in os.walk(os.path.join(v.config.cache_dir, "huggingface", "blobs")) for f in fs] == []
    await v.store.settled()  # the records written beside it land
    assert not temp_files(v.config.cache_dir)
    assert "sha256 of huggingface/blobs" in logged.text()
    # the next request tries again, and now gets good bytes
    add_file(upstream, "w.bin", DATA, headers=lfs_headers())
    r = await http.get(v.url + "/huggingface/org/m/resolve/main/w.bin")
    assert await r.content() == DATA


@pytest_twisted.ensureDeferred
async def test_size_mismatch_is_502_before_any_byte(vault_factory, upstream, http, logged):
    add_file(upstream, "w.bin", DATA, headers=lfs_headers(size=len(DATA) + 1))
    v = vault_factory(hub_backend(upstream))
    r = await http.get(v.url + "/huggingface/org/m/resolve/main/w.bin")
    assert r.code == 502
    assert "announced" in (await r.content()).decode()
    assert v.store.lookup(f"huggingface/blobs/{SHA[:2]}/{SHA}") is None


@pytest_twisted.ensureDeferred
async def test_gzipping_hub_still_gives_the_identity_body(vault_factory, upstream, http):
    text = b'{"vocab": "' + b"abc " * 20000 + b'"}'
    etag = '"' + hashlib.sha1(b"blob %d\0" % len(text) + text).hexdigest() + '"'
    add_file(upstream, "tokenizer_config.json", text, gzip_if_asked=True,
                 headers={"X-Repo-Commit": COMMIT, "ETag": etag})
    v = vault_factory(hub_backend(upstream))
    status, headers, body = await raw_get(v.url, "/huggingface/org/m/resolve/main/tokenizer_config.json",
                                          headers={"Accept-Encoding": "gzip"})
    assert status == 200 and body == text
    assert headers["Content-Length"] == str(len(text)) and "Content-Encoding" not in headers
    status, headers, _ = await raw_get(v.url, "/huggingface/org/m/resolve/main/tokenizer_config.json",
                                       method="HEAD")
    assert headers["Content-Length"] == str(len(text)) and headers["ETag"] == etag
    assert headers["X-Repo-Commit"] == COMMIT
    assert all(r.headers.get("accept-encoding") == "identity" for r in upstream.requests)


@pytest_twisted.ensureDeferred
async def test_many_clients_on_one_cold_file_make_one_download(vault_factory, upstream, http):
    add_file(upstream, "w.bin", DATA, headers=lfs_headers(), throttle=(64 * 1024, 0.01))
    v = vault_factory(hub_backend(upstream))

    async def one():
        r = await http.get(v.url + "/huggingface/org/m/resolve/main/w.bin")
        return await r.content()

    bodies = await gatherResults([Deferred.fromCoroutine(one()) for _ in range(16)])
    assert all(b == DATA for b in bodies)
    assert upstream.count(f"/org/m/resolve/{COMMIT}/w.bin", method="GET") == 1
    assert upstream.count("/org/m/resolve/main/w.bin", method="HEAD") == 1  # metadata HEADs coalesced too


@pytest_twisted.ensureDeferred
async def test_rate_limited_hub_with_nothing_cached_passes_429_and_retry_after(vault_factory, upstream, http):
    add_file(upstream, "w.bin", b"", status=429,
                 headers={"Retry-After": "7", "RateLimit": '"resolvers";r=0;t=7'})
    v = vault_factory(hub_backend(upstream))
    status, headers, _ = await raw_get(v.url, "/huggingface/org/m/resolve/main/w.bin", method="HEAD")
    assert status == 429 and headers["Retry-After"] == "7"


@pytest_twisted.ensureDeferred
async def test_range_request_while_the_blob_downloads(vault_factory, upstream, http):
    add_file(upstream, "w.bin", DATA, headers=lfs_headers(), hold=True)
    v = vault_factory(hub_backend(upstream))
    response, part = await stream(http, v.url + "/huggingface/org/m/resolve/main/w.bin",
                                  headers={"Range": "bytes=900000-900099"})
    assert response.code == 206
    assert response.headers.getRawHeaders("x-repo-commit") == [COMMIT]
    upstream.release(f"/org/m/resolve/{COMMIT}/w.bin")
    await part.done
    assert bytes(part.data) == DATA[900000:900100]




@pytest_twisted.ensureDeferred
async def test_identical_api_calls_arriving_together_make_one_hub_request(vault_factory, upstream, http):
    import json

    answer = json.dumps({"id": "org/m", "sha": COMMIT, "siblings": [{"rfilename": "w.bin"}]}).encode()
    upstream.add("/api/models/org/m/revision/main", answer, content_type="application/json", delay_headers=0.3)
    v = vault_factory(hub_backend(upstream))

    async def one():
        r = await http.get(v.url + "/huggingface/api/models/org/m/revision/main")
        return r.code, await r.content()

    results = await gatherResults([Deferred.fromCoroutine(one()) for _ in range(8)])
    assert all(code == 200 and json.loads(body)["sha"] == COMMIT for code, body in results)
    assert upstream.count("/api/models/org/m/revision/main") == 1
