"""
The fixes of the review's findings (tests/test_backend_attacks.py), pushed
further than the review's own tests: the same attacks in other spellings,
and what the fixes must not cost (kept pages that still walk, shared layers
still served, big pages still answered in every form, offline too).
"""

import hashlib
import json
import os
import time

import pytest_twisted
from artifact_vault.backends import pypi as pypi_backend
from artifact_vault.backends.apt import packages as apt_packages
from artifact_vault.backends.base import BUFFERED_AT_ONCE
from artifact_vault.backends.oci import backend as oci_backend
from artifact_vault.backends.oci.backend import blob_key
from artifact_vault.backends.oci.protocol import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, references
from artifact_vault.bounded import SizedLRU
from artifact_vault.freshness import Answer, KeptAnswers
from artifact_vault.store import CacheStore
from tests.fakeregistry import PASSWORD, USER, Manifest, _canonical, image
from tests.test_backend_attacks import (ALL_MANIFESTS, PYPI_JSON, _files, _packages, bulky_files, json_page, oci,
                                        pypi, sleep)
from tests.test_core import raw_get

FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"


# -- memory bounded in bytes ------------------------------------------------------------


def test_sized_lru_bounds_entries_and_bytes():
    m = SizedLRU(3, 10)
    m["a"], m["b"] = b"xxxx", b"yyyy"
    m.get("a")
    m["c"] = b"zzzz"  # 12 bytes: the least recently used ("b") goes
    assert list(m) == ["a", "c"] and m.total == 8
    m["d"], m["e"] = b"1", b"2"  # 4 entries: over the count
    assert list(m) == ["c", "d", "e"] and m.total == 6
    m["huge"] = b"x" * 11  # larger than the whole budget: not kept, nothing pushed out
    assert "huge" not in m and list(m) == ["c", "d", "e"]
    m["c"] = b"zz"
    assert m.total == 4
    del m["d"]
    assert m.pop("e") == b"2" and m.pop("nope", None) is None and m.total == 2
    m.clear()
    assert m.total == 0 and not m


@pytest_twisted.ensureDeferred
async def test_kept_answers_hold_a_budget_of_bytes_and_stay_fresh_when_let_go(tmp_path):
    now = [1000.0]
    kept = KeptAnswers(CacheStore(str(tmp_path)), clock=lambda: now[0], memory_bytes=1024 * 1024)
    for i in range(40):  # 40 x 200 kB: 8 MB
        await kept.keep(f"b/k{i}", Answer(200, {"etag": f'"{i}"'}, bytes([i]) * 200_000, checked_at=now[0]))
    assert kept._memory.total <= 1024 * 1024
    assert sum(len(a.body) for a in kept._memory.values()) <= 1024 * 1024
    # let go of in memory, still kept: from disk, and still fresh (when upstream vouched is remembered)
    now[0] += 30
    fresh = kept.fresh("b/k0", ttl=60)
    assert fresh is not None and fresh.body == bytes([0]) * 200_000
    stored = kept.stored("b/k1")
    assert (stored.sha256, stored.size) == (hashlib.sha256(bytes([1]) * 200_000).hexdigest(), 200_000)
    assert stored.age(now[0]) == 30


@pytest_twisted.ensureDeferred
async def test_every_backend_holds_its_kept_answers_within_a_budget(vault_factory, upstream, rig):
    v = vault_factory(pypi(upstream) + [oci("hub", "docker.io", rig(images=False).url, default=True),
                                        {"type": "apt", "name": "debian",
                                         "config": {"base_url": upstream.url + "/debian"}}])
    budgets = {b.config.type: b.kept._memory.budget for b in v.vault.backends}
    assert budgets == {"pypi": pypi_backend.KEPT_MEMORY, "oci": KeptAnswers.MEMORY_BYTES,
                       "apt": KeptAnswers.MEMORY_BYTES}
    backend = v.vault.backend("pypi")
    assert backend.kept._memory.budget + backend.memo.budget == pypi_backend.MEMO_BUDGET


# -- APT: Release files read whole within the backend's slots ------------------------------------


@pytest_twisted.ensureDeferred
async def test_apt_release_files_read_whole_at_once_are_bounded(vault_factory, upstream, http):
    count = 10
    for i in range(count):
        upstream.add(f"/debian/dists/s{i}/InRelease", b"Origin: T\nSuite: s%d\n" % i + b"#" * 100_000, hold=True)
    v = vault_factory([{"type": "apt", "name": "debian", "config": {"base_url": upstream.url + "/debian"}}])
    answers = [http.get(v.url + f"/debian/dists/s{i}/InRelease") for i in range(count)]
    await sleep(1.0)
    reading = upstream.in_flight()
    for i in range(count):
        upstream.release(f"/debian/dists/s{i}/InRelease")
    codes = []
    for d in answers:
        response = await d
        await response.content()
        codes.append(response.code)
    assert codes == [200] * count
    assert 0 < reading <= BUFFERED_AT_ONCE


# -- APT: pool files against tables built once per index ------------------------------------------


def _apt_suite(upstream, components, changed=()):
    listing = []
    for component in components:
        body = _packages(component, 50) + (b"\n\nPackage: new\nVersion: 2\n" if component in changed else b"")
        upstream.add(f"/debian/dists/stable/{component}/binary-amd64/Packages", body)
        listing.append(f" {hashlib.sha256(body).hexdigest()} {len(body)} {component}/binary-amd64/Packages")
    release = "Origin: Test\nSuite: stable\nCodename: stable\nSHA256:\n" + "\n".join(listing) + "\n"
    upstream.add("/debian/dists/stable/InRelease", release.encode())


def _counting_reads(monkeypatch):
    reads = []
    read_table = apt_packages.read_table
    monkeypatch.setattr(apt_packages, "read_table", lambda *a: reads.append(a[1]) or read_table(*a))
    return reads


@pytest_twisted.ensureDeferred
async def test_apt_a_new_release_rereads_only_its_changed_indexes_and_pool_files_are_still_checked(
        vault_factory, upstream, monkeypatch, logged):
    components = ["c0", "c1", "c2", "c3"]
    _apt_suite(upstream, components)
    v = vault_factory([{"type": "apt", "name": "debian",
                        "config": {"base_url": upstream.url + "/debian", "index_ttl": 0}}])
    reads = _counting_reads(monkeypatch)
    assert (await raw_get(v.url, "/debian/dists/stable/InRelease"))[0] == 200
    for component in components:
        assert (await raw_get(v.url, f"/debian/dists/stable/{component}/binary-amd64/Packages"))[0] == 200
    for k in range(5):
        assert (await raw_get(v.url, f"/debian/pool/zz/j/junk{k}_1.0_all.deb"))[0] == 404
    assert sorted(reads) == ["c0/binary-amd64/Packages", "c1/binary-amd64/Packages", "c2/binary-amd64/Packages",
                             "c3/binary-amd64/Packages"]
    # the mirror publishes a new c1: the vault brings it in before it serves the new InRelease
    _apt_suite(upstream, components, changed=("c1",))
    assert (await raw_get(v.url, "/debian/dists/stable/InRelease"))[0] == 200
    for k in range(5):
        assert (await raw_get(v.url, f"/debian/pool/zz/j/again{k}_1.0_all.deb"))[0] == 404
    assert len(reads) == 5 and reads[-1] == "c1/binary-amd64/Packages"
    # a pool file is still checked against what the new index says: wrong bytes are never a clean answer
    upstream.add("/debian/pool/c1/p/p3_1.0_all.deb", b"not what c1 lists")
    upstream.add("/debian/pool/c2/p/p3_1.0_all.deb", b"c2-3")
    try:
        status, _, body = await raw_get(v.url, "/debian/pool/c1/p/p3_1.0_all.deb")
        assert status == 502 and body != b"not what c1 lists"
    except ConnectionError:
        pass
    assert v.store.lookup("debian/pool/c1/p/p3_1.0_all.deb") is None
    status, _, body = await raw_get(v.url, "/debian/pool/c2/p/p3_1.0_all.deb")
    assert (status, body) == (200, b"c2-3")
    assert v.store.lookup("debian/pool/c2/p/p3_1.0_all.deb") is not None
    assert len(reads) == 5


@pytest_twisted.ensureDeferred
async def test_apt_tables_beyond_the_budget_are_not_read_again(vault_factory, upstream, monkeypatch, logged):
    components = ["c0", "c1", "c2", "c3"]
    _apt_suite(upstream, components)
    v = vault_factory([{"type": "apt", "name": "debian", "config": {"base_url": upstream.url + "/debian"}}])
    pool_files = v.vault.backend("debian").pool_files
    one = apt_packages.FileTable([(apt_packages.path_key(f"x{i}"), 1, b"\0" * 32) for i in range(50)]).cost
    pool_files.budget = 2 * one + 10  # two of the four tables
    reads = _counting_reads(monkeypatch)
    assert (await raw_get(v.url, "/debian/dists/stable/InRelease"))[0] == 200
    for component in components:
        assert (await raw_get(v.url, f"/debian/dists/stable/{component}/binary-amd64/Packages"))[0] == 200
    for k in range(4):
        assert (await raw_get(v.url, f"/debian/pool/zz/j/junk{k}_1.0_all.deb"))[0] == 404
    assert len(reads) == 4 and len(pool_files) == 2 and pool_files.total <= pool_files.budget
    assert "pool-file tables are in use" in logged.text()


# -- PyPI: big pages ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pypi_a_big_page_is_served_in_every_form_from_disk_and_its_files_without_reading_it(
        vault_factory, upstream, monkeypatch):
    files = bulky_files("huge", 400)
    files[7] = dict(files[7], hashes={"sha256": "a" * 64}, size=10)
    upstream.add("/simple/huge/", json_page("huge", files), content_type=PYPI_JSON)
    monkeypatch.setattr(pypi_backend, "BIG_PAGE", 1024 * 1024)  # a 3 MB page is big
    v = vault_factory(pypi(upstream))
    parses = []
    parsed = pypi_backend._Parsed
    monkeypatch.setattr(pypi_backend, "_Parsed", lambda body: parses.append(len(body)) or parsed(body))
    bodies = {}
    for _ in range(2):
        for accept, gz in ((PYPI_JSON, None), ("text/html", None), (PYPI_JSON, "gzip"), ("text/html", "gzip")):
            headers = {"Accept": accept, **({"Accept-Encoding": gz} if gz else {})}
            status, h, body = await raw_get(v.url, "/pypi/simple/huge/", headers=headers)
            assert status == 200 and h["Vary"] == "Accept, Accept-Encoding", (accept, gz, status)
            assert (h.get("Content-Encoding") == "gzip") == bool(gz)
            bodies.setdefault((accept, gz), set()).add(body)
            status, _, _ = await raw_get(v.url, "/pypi/simple/huge/", headers={**headers, "If-None-Match": h["ETag"]})
            assert status == 304
    assert all(len(b) == 1 for b in bodies.values())
    assert len(json.loads(next(iter(bodies[(PYPI_JSON, None)])))["files"]) == 400
    assert next(iter(bodies[("text/html", None)])).startswith(b"<!DOCTYPE html>")
    assert len(parses) == 2  # once per form (JSON, HTML), not per request or encoding
    # files: a made-up one answered without reading the page; a real one's HEAD from one reading
    for made_up in (f"/pypi/files/huge/{'b' * 64}/huge-7.tar.gz", f"/pypi/files/huge/{'a' * 64}/huge-8.tar.gz"):
        assert (await raw_get(v.url, made_up))[0] == 404
    assert len(parses) == 2
    for _ in range(3):
        status, h, _ = await raw_get(v.url, f"/pypi/files/huge/{'a' * 64}/huge-7.tar.gz", "HEAD")
        assert status == 200 and h["Content-Length"] == "10"
    assert len(parses) == 3
    assert upstream.count("/simple/huge/") == 1
    backend = v.vault.backend("pypi")
    assert backend.memo.total <= backend.memo.budget


@pytest_twisted.ensureDeferred
async def test_pypi_a_big_page_changes_with_upstream_and_is_served_offline(vault_factory, upstream, monkeypatch):
    upstream.add("/simple/huge/", json_page("huge", bulky_files("huge", 300)), content_type=PYPI_JSON)
    monkeypatch.setattr(pypi_backend, "BIG_PAGE", 1024 * 1024)
    v = vault_factory(pypi(upstream, index_ttl=0))
    status, _, body = await raw_get(v.url, "/pypi/simple/huge/", headers={"Accept": PYPI_JSON})
    assert status == 200 and len(json.loads(body)["files"]) == 300
    upstream.add("/simple/huge/", json_page("huge", bulky_files("huge", 310)), content_type=PYPI_JSON)
    status, _, body = await raw_get(v.url, "/pypi/simple/huge/", headers={"Accept": PYPI_JSON})
    assert status == 200 and len(json.loads(body)["files"]) == 310
    upstream.add("/simple/huge/", b"", status=503)
    for accept in (PYPI_JSON, "text/html"):
        status, _, body = await raw_get(v.url, "/pypi/simple/huge/", headers={"Accept": accept})
        assert status == 200 and body.count(b"huge-309.tar.gz") >= 1
    # a project upstream no longer knows: its page and renderings are forgotten
    upstream.add("/simple/huge/", b"", status=404)
    await sleep(0.1)
    for _ in range(20):  # the 503 marked upstream down for a while: wait until it is asked again
        if (await raw_get(v.url, "/pypi/simple/huge/"))[0] == 404:
            break
        v.vault.backend("pypi").health._down_until = 0
    else:
        raise AssertionError("the 404 never reached the client")
    await v.store.settled()
    assert not [f for f in _files(v) if "/rendered/" in f or f.endswith("simple/huge")]


# -- OCI: what a manifest names is not what a repository serves --------------------------------------


def test_oci_references_follow_the_schema_of_the_media_type():
    cfg, layer, other = ("sha256:" + c * 64 for c in "abc")
    manifest = {"schemaVersion": 2, "config": {"digest": cfg, "size": 1},
                "layers": [{"digest": layer, "size": 2},
                           {"digest": other, "size": 3, "mediaType": FOREIGN, "urls": ["https://x/"]},
                           {"digest": "sha256:" + "d" * 64, "mediaType": "application/vnd.oci.image.layer."
                                                                          "nondistributable.v1.tar+gzip"}],
                "blobs": [{"digest": "sha256:" + "e" * 64}], "subject": {"digest": "sha256:" + "f" * 64},
                "manifests": [{"digest": "sha256:" + "9" * 64}]}
    body = json.dumps(manifest).encode()
    for media in (OCI_MANIFEST, DOCKER_MANIFEST):
        assert references(body, media) == {cfg: 1, layer: 2}
    for media in (OCI_INDEX, DOCKER_LIST):
        assert references(body, media) == {"sha256:" + "9" * 64: None}
    assert references(body, "application/vnd.oci.artifact.manifest.v1+json") == {}
    assert references(b"[1]", OCI_MANIFEST) == {} and references(b"{", OCI_INDEX) == {}


@pytest_twisted.ensureDeferred
async def test_oci_layers_and_index_entries_an_attacker_lists_open_nothing(vault_factory, rig):
    """
    A lenient registry (it checks no layer of a pushed manifest, like this
    fake): an image whose ordinary layers name a private layer and config, a
    foreign layer naming another, an index naming the private manifest.
    Through those repositories the vault serves none of it: it asks their
    upstream (a HEAD), which says no.
    """
    corp = rig(auth=True)
    hub = rig(images=False)
    private = corp.manifest("acme/private", "1.0")
    secret, config = private.layers()[0], private.config
    own = image({"readme.txt": "nothing to see\n"})
    document = json.loads(own.body)
    document["layers"] += [secret.descriptor(), dict(config.descriptor(), mediaType=FOREIGN,
                                                     urls=["https://example.invalid/x"])]
    hub.put("evil/layers", Manifest(_canonical(document), OCI_MANIFEST, own.blobs), "1")
    listing = {"schemaVersion": 2, "mediaType": OCI_INDEX,
               "manifests": [private.descriptor(platform={"os": "linux", "architecture": "amd64"})]}
    hub.put("evil/index", Manifest(_canonical(listing), OCI_INDEX), "1")
    v = vault_factory([oci("corp", "corp.example", corp.url, username=USER, password=PASSWORD),
                       oci("hub", "docker.io", hub.url, default=True)])
    assert (await raw_get(v.url, "/v2/corp.example/acme/private/manifests/1.0",
                          headers={"Accept": ALL_MANIFESTS}))[0] == 200
    for blob in private.blobs:
        assert (await raw_get(v.url, f"/v2/corp.example/acme/private/blobs/{blob.digest}"))[0] == 200
    hub.reset()
    for repo in ("evil/layers", "evil/index"):
        assert (await raw_get(v.url, f"/v2/{repo}/manifests/1", headers={"Accept": ALL_MANIFESTS}))[0] == 200
    for path in (f"/v2/evil/layers/blobs/{secret.digest}", f"/v2/evil/layers/blobs/{config.digest}",
                 f"/v2/evil/index/manifests/{private.digest}", f"/v2/evil/index/blobs/{secret.digest}"):
        for method in ("GET", "HEAD"):
            status, _, body = await raw_get(v.url, path, method, {"Accept": ALL_MANIFESTS})
            assert status == 404 and body not in (secret.read(), config.read(), private.body), (path, method)
    asked = [(r["method"], r["path"]) for r in hub.requests_to("registry") if "/evil/" in r["path"]
             and ("/blobs/" in r["path"] or "/manifests/sha256:" in r["path"])]
    assert asked and all(method == "HEAD" for method, _ in asked), asked
    # the attacker's own layer is served as ever, fetched from their upstream without a HEAD first
    status, _, body = await raw_get(v.url, f"/v2/evil/layers/blobs/{own.layers()[0].digest}")
    assert status == 200 and body == own.layers()[0].read()


@pytest_twisted.ensureDeferred
async def test_oci_a_download_in_flight_for_one_repository_is_not_joined_through_another(vault_factory, rig):
    corp = rig(auth=True)
    hub = rig(images=False)
    big = image({"data.bin": os.urandom(300_000)})
    corp.put("acme/big", big, "1.0", private=True)
    layer = big.layers()[0]
    corp.fault("throttle", match=layer.hex, bps=200_000)
    own = image({"readme.txt": "x\n"})
    document = json.loads(own.body)
    document["layers"].append(layer.descriptor())
    hub.put("evil/pub", Manifest(_canonical(document), OCI_MANIFEST, own.blobs), "1")
    v = vault_factory([oci("corp", "corp.example", corp.url, username=USER, password=PASSWORD),
                       oci("hub", "docker.io", hub.url, default=True)])
    assert (await raw_get(v.url, "/v2/evil/pub/manifests/1", headers={"Accept": ALL_MANIFESTS}))[0] == 200
    assert (await raw_get(v.url, "/v2/corp.example/acme/big/manifests/1.0",
                          headers={"Accept": ALL_MANIFESTS}))[0] == 200
    legit = raw_get(v.url, f"/v2/corp.example/acme/big/blobs/{layer.digest}")
    await sleep(0.4)
    assert v.vault.backend("corp").downloads.get(blob_key(layer.digest)) is not None
    started = time.monotonic()
    status, _, body = await raw_get(v.url, f"/v2/evil/pub/blobs/{layer.digest}")
    assert status == 404 and body != layer.read() and time.monotonic() - started < 1
    status, _, body = await legit
    assert status == 200 and body == layer.read()


# -- OCI: tag lists a client walks ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_oci_the_pages_a_client_walks_are_kept_up_to_a_bound(vault_factory, rig, monkeypatch):
    monkeypatch.setattr(oci_backend, "PAGES_PER_LIST", 3)
    hub = rig(images=False, tags_page=2)
    hub.put("acme/many", image({"a": "a\n"}), *[f"t{i:02d}" for i in range(9)])
    v = vault_factory([oci("hub", "docker.io", hub.url, default=True)])

    async def walk(target):
        tags = []
        while target:
            status, headers, body = await raw_get(v.url, target)
            assert status == 200
            tags += json.loads(body)["tags"]
            link = headers.get("Link")
            target = link[1:link.index(">")] if link else None
        return tags

    every = [f"t{i:02d}" for i in range(9)]
    assert await walk("/v2/acme/many/tags/list") == every
    assert await walk("/v2/acme/many/tags/list?n=4") == every  # made up: relayed, nothing kept
    await v.store.settled()
    kept = [f for f in _files(v) if "/_tags-list/" in f and not f.endswith(".vault-meta")]
    assert len(kept) == 3
    # the kept pages answer the same walk while upstream is down
    hub.fault("down5xx", match="/tags/list")
    status, headers, body = await raw_get(v.url, "/v2/acme/many/tags/list")
    assert status == 200 and json.loads(body)["tags"] == every[:2]


@pytest_twisted.ensureDeferred
async def test_oci_shared_layers_still_pull_everywhere_with_one_head_each(vault_factory, rig):
    hub = rig(images=False)
    base = image({"base.txt": "shared\n"})
    hub.put("team/one", base, "1")
    hub.put("team/two", base, "1")
    v = vault_factory([oci("hub", "docker.io", hub.url, default=True)])
    for repo in ("team/one", "team/two"):
        assert (await raw_get(v.url, f"/v2/{repo}/manifests/1", headers={"Accept": ALL_MANIFESTS}))[0] == 200
        for blob in base.blobs:
            status, _, body = await raw_get(v.url, f"/v2/{repo}/blobs/{blob.digest}")
            assert status == 200 and body == blob.read()
    gets = [r for r in hub.requests_to("registry") if "/blobs/" in r["path"] and r["method"] == "GET"]
    heads = [r for r in hub.requests_to("registry") if "/blobs/" in r["path"] and r["method"] == "HEAD"]
    assert len(gets) == len(base.blobs) and all("/team/one/" in r["path"] for r in gets)
    assert len(heads) == len(base.blobs) and all("/team/two/" in r["path"] for r in heads)
    hub.reset()
    for repo in ("team/one", "team/two"):
        for blob in base.blobs:
            assert (await raw_get(v.url, f"/v2/{repo}/blobs/{blob.digest}"))[0] == 200
    assert not [r for r in hub.requests_to("registry") if "/blobs/" in r["path"]]
