"""The fake registry (tests/fakeregistry.py) is realistic: the real skopeo pulls from it directly.

The registry runs in-process on the test's reactor; skopeo and the raw HTTP
checks run in threads (deferToThread) so the reactor keeps serving.  One test
runs the standalone process, one Debian's docker-registry.
"""

import base64
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from http.client import IncompleteRead

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.fakeregistry import (DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, PASSWORD, USER,
                                FakeRegistry, big_image, image)
from tests.hfenv import ROOT, fetch, file_sha256, stop_process
from tests.ocienv import DockerRegistry, skopeo, skopeo_copy, skopeo_inspect

ALL_TYPES = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])


def in_thread(f, *args, **kwargs):
    return deferToThread(f, *args, **kwargs)


def assert_dir_copy(out, top):
    """A ``dir:`` copy holds the manifest byte-exact and every blob with its digest."""
    assert (out / "manifest.json").read_bytes() == top.body
    for blob in top.blobs:
        assert file_sha256(out / blob.hex) == blob.hex
        assert (out / blob.hex).stat().st_size == blob.size


def seq(reg, server=None):
    return [(r["server"], r["method"], r["path"].split("?")[0], r["status"]) for r in reg.requests
            if server is None or r["server"] == server]


# ---------------------------------------------------------------------------------------------
# skopeo against the rig


@pytest_twisted.ensureDeferred
async def test_pull_with_anonymous_token_flow(rig, tmp_path, home):
    reg = rig(auth=True)
    top = reg.manifest("library/small", "1.0")
    await in_thread(skopeo_copy, "docker://" + reg.ref("library/small", "1.0"), tmp_path / "out", home=home)
    assert_dir_copy(tmp_path / "out", top)

    s = seq(reg)
    assert s[:3] == [("registry", "GET", "/v2/", 401), ("token", "GET", "/token", 200),
                     ("registry", "GET", "/v2/library/small/manifests/1.0", 200)]
    assert sorted(s[3:]) == sorted(("registry", "GET", f"/v2/library/small/blobs/{b.digest}", 200) for b in top.blobs)
    token_req = reg.requests[1]
    assert "scope=repository%3Alibrary%2Fsmall%3Apull" in token_req["path"]
    assert "service=fake-registry" in token_req["path"] and not token_req["authorization"]
    assert reg.token_requests == 1
    assert all(r["headers"]["authorization"].startswith("Bearer fake-") for r in reg.requests[2:])
    # what skopeo 1.9.3 asks for: every manifest type (and schema1), no HEAD before the GET
    accept = reg.requests[2]["headers"]["accept"]
    assert {OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST} <= set(t.strip() for t in accept.split(","))
    assert not reg.requests_to(method="HEAD")
    # it tried https first; the rig's immediate 400 made it fall back at once
    assert reg.tls_attempts["registry"] == 1


@pytest_twisted.ensureDeferred
async def test_pull_by_digest(rig, tmp_path, home):
    reg = rig()
    top = reg.manifest("library/small", "2.0")
    await in_thread(skopeo_copy, "docker://" + reg.ref("library/small", top.digest), tmp_path / "out", home=home)
    assert_dir_copy(tmp_path / "out", top)
    assert reg.count(f"/manifests/{top.digest}") == 1
    assert reg.count("/manifests/2.0") == 0


@pytest_twisted.ensureDeferred
async def test_multi_arch_index_one_platform_and_all(rig, tmp_path, home):
    reg = rig(auth=True)
    idx = reg.manifest("library/multi", "1.0")
    ref = "docker://" + reg.ref("library/multi", "1.0")
    await in_thread(skopeo_copy, ref, tmp_path / "arm", arch="arm64", home=home)
    assert_dir_copy(tmp_path / "arm", idx.child("arm64"))
    amd64 = idx.child("amd64")
    assert not reg.count(amd64.digest)  # neither the amd64 manifest nor its blobs were asked for

    await in_thread(skopeo_copy, ref, tmp_path / "all", "--all", home=home)
    assert (tmp_path / "all" / "manifest.json").read_bytes() == idx.body
    for child in idx.children:
        assert (tmp_path / "all" / f"{child.hex}.manifest.json").read_bytes() == child.body
        for blob in child.blobs:
            assert file_sha256(tmp_path / "all" / blob.hex) == blob.hex


@pytest_twisted.ensureDeferred
async def test_docker_schema2_image_and_manifest_list(rig, tmp_path, home):
    reg = rig(auth=True)
    top = reg.manifest("library/dockerv2", "1.0")
    assert top.media_type == DOCKER_MANIFEST
    await in_thread(skopeo_copy, "docker://" + reg.ref("library/dockerv2", "1.0"), tmp_path / "d", home=home)
    assert_dir_copy(tmp_path / "d", top)
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["mediaType"] == DOCKER_MANIFEST

    lst = reg.manifest("library/multilist", "1.0")
    await in_thread(skopeo_copy, "docker://" + reg.ref("library/multilist", "1.0"), tmp_path / "l", arch="arm64",
                    home=home)
    assert_dir_copy(tmp_path / "l", lst.child("arm64"))


@pytest_twisted.ensureDeferred
async def test_blobs_through_the_cdn_redirect_carry_no_authorization(rig, tmp_path, home):
    reg = rig(auth=True, cdn_redirect=True)
    top = reg.manifest("library/small", "1.0")
    await in_thread(skopeo_copy, "docker://" + reg.ref("library/small", "1.0"), tmp_path / "out", home=home)
    assert_dir_copy(tmp_path / "out", top)
    blob_reqs = reg.requests_to("registry", path_contains="/blobs/")
    assert len(blob_reqs) == 2 and all(r["status"] == 307 and r["authorization"] for r in blob_reqs)
    cdn = reg.requests_to("cdn")
    assert sorted(r["path"].split("?")[0] for r in cdn) == sorted(f"/blobs/sha256/{b.hex}/data" for b in top.blobs)
    assert all(r["status"] == 200 and not r["authorization"] for r in cdn)
    assert not reg.cdn_authorization_seen

    # the CDN itself: Authorization is refused like S3 (and recorded), expired URLs are 403
    location = reg.cdn_location(top.blobs[1].digest)
    status, _, body = await in_thread(fetch, "GET", location, {"Authorization": "Bearer x"})
    assert status == 400 and b"Only one auth mechanism allowed" in body
    assert reg.cdn_authorization_seen
    status, headers, body = await in_thread(fetch, "GET", location, {"Range": "bytes=0-9"})
    assert status == 206 and body == top.blobs[1].read()[:10]
    reg.configure(cdn_ttl=-1)
    status, _, body = await in_thread(fetch, "GET", reg.cdn_location(top.blobs[1].digest))
    assert status == 403 and b"expired" in body
    status, _, _ = await in_thread(fetch, "GET", location.replace("signature=", "signature=0"))
    assert status == 403


@pytest_twisted.ensureDeferred
async def test_a_tag_moved_at_runtime_is_seen(rig, home):
    reg = rig(auth=True)
    ref = "docker://" + reg.ref("library/small", "1.0")
    assert await in_thread(skopeo_inspect, ref, raw=True, home=home) == reg.manifest("library/small", "1.0").body
    new = reg.put("library/small", image({"hello.txt": "moved\n"}))
    reg.tag("library/small", "1.0", new)
    assert await in_thread(skopeo_inspect, ref, raw=True, home=home) == new.body
    reg.tag("library/small", "1.0", reg.digest("library/small", "2.0"))
    info = await in_thread(skopeo_inspect, ref, home=home)
    assert info["Digest"] == reg.digest("library/small", "2.0")


@pytest_twisted.ensureDeferred
async def test_429_makes_skopeo_fail(rig, tmp_path, home):
    reg = rig(auth=True)
    # Retry-After: 0, because skopeo (containers/image) retries a 429 itself, waiting as told
    reg.fault("429", match="/manifests/", retry_after=0)
    proc = await in_thread(skopeo_copy, "docker://" + reg.ref("library/small", "1.0"), tmp_path / "out",
                           home=home, check=False)
    assert proc.returncode != 0
    assert "toomanyrequests" in proc.stderr.lower() or "429" in proc.stderr
    answered = reg.requests_to(path_contains="/manifests/")
    assert [r["status"] for r in answered] == [429] * 5  # the first try and four retries
    assert not reg.requests_to(path_contains="/blobs/")


@pytest_twisted.ensureDeferred
async def test_private_repository_needs_the_users_password(rig, tmp_path, home):
    reg = rig(auth=True)
    ref = "docker://" + reg.ref("acme/private", "1.0")
    proc = await in_thread(skopeo_copy, ref, tmp_path / "anon", home=home, check=False)
    assert proc.returncode != 0 and "unauthorized" in proc.stderr.lower()
    proc = await in_thread(skopeo_copy, ref, tmp_path / "bad", src_creds=(USER, "wrong"), home=home, check=False)
    assert proc.returncode != 0
    reg.reset()
    await in_thread(skopeo_copy, ref, tmp_path / "ok", src_creds=(USER, PASSWORD), home=home)
    assert_dir_copy(tmp_path / "ok", reg.manifest("acme/private", "1.0"))
    tokens = reg.requests_to("token")
    assert tokens and all(r["headers"]["authorization"].startswith("Basic ") for r in tokens)


@pytest_twisted.ensureDeferred
async def test_skopeo_follows_tag_pagination(rig, home):
    reg = rig(auth=True, tags_page=2)
    info = await in_thread(skopeo_inspect, "docker://" + reg.ref("library/small", "1.0"), home=home)
    assert info["RepoTags"] == ["1.0", "1.1", "2.0", "latest"]
    pages = [r["path"] for r in reg.requests_to(path_contains="/tags/list")]
    assert pages == ["/v2/library/small/tags/list", "/v2/library/small/tags/list?n=2&last=1.1"]


@pytest_twisted.ensureDeferred
async def test_corrupt_and_cut_blobs_make_skopeo_fail(rig, tmp_path, home):
    reg = rig()
    top = reg.manifest("library/small", "1.0")
    layer = top.layers()[0]
    reg.fault("corrupt", match=layer.hex)
    proc = await in_thread(skopeo_copy, "docker://" + reg.ref("library/small", "1.0"), tmp_path / "c", home=home,
                           check=False)
    assert proc.returncode != 0 and "digest" in proc.stderr.lower()
    reg.clear_faults()
    reg.fault("cut", match=layer.hex, after_bytes=50)
    proc = await in_thread(skopeo_copy, "docker://" + reg.ref("library/small", "1.0"), tmp_path / "x", home=home,
                           check=False)
    assert proc.returncode != 0
    cut = [r for r in reg.requests_to(path_contains=layer.hex) if r.get("aborted")]
    assert cut, reg.requests_to(path_contains=layer.hex)


def test_skopeo_cannot_reach_public_registries(home):
    started = time.time()
    for ref in ("docker.io/library/alpine:latest", "quay.io/a/b:1", "mirror.example.com/x:1"):
        proc = skopeo("inspect", "docker://" + ref, home=home, timeout=30)
        assert proc.returncode != 0 and "is blocked in" in proc.stderr, proc.stderr
    proc = skopeo("inspect", "docker://registry.internal:5000/x:1", home=home, timeout=30)
    assert proc.returncode != 0 and "proxyconnect tcp: dial tcp 127.0.0.1:9" in proc.stderr, proc.stderr
    assert time.time() - started < 10


# ---------------------------------------------------------------------------------------------
# protocol details, straight HTTP


@pytest_twisted.ensureDeferred
async def test_manifest_negotiation_and_headers(rig):
    reg = rig()
    base = reg.url + "/v2/"
    status, headers, body = await in_thread(fetch, "GET", base)
    assert (status, body, headers["docker-distribution-api-version"]) == (200, b"{}", "registry/2.0")

    small = reg.manifest("library/small", "1.0")
    status, headers, body = await in_thread(fetch, "GET", base + "library/small/manifests/1.0", {"Accept": ALL_TYPES})
    assert (status, body) == (200, small.body)
    assert headers["content-type"] == OCI_MANIFEST and headers["docker-content-digest"] == small.digest
    assert headers["content-length"] == str(small.size) and headers["etag"] == f'"{small.digest}"'
    status, headers2, body = await in_thread(fetch, "HEAD", base + "library/small/manifests/1.0",
                                             {"Accept": OCI_MANIFEST})
    assert status == 200 and body == b"" and headers2["content-length"] == str(small.size)
    assert headers2["docker-content-digest"] == small.digest
    status, _, _ = await in_thread(fetch, "GET", base + "library/small/manifests/1.0",
                                   {"Accept": OCI_MANIFEST, "If-None-Match": f'"{small.digest}"'})
    assert status == 304

    # an OCI manifest or index to a client that does not name its type: 404, like distribution
    for accept in (None, "*/*", DOCKER_MANIFEST):
        status, _, body = await in_thread(fetch, "GET", base + "library/multi/manifests/1.0",
                                          {"Accept": accept} if accept else {})
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    # a Docker list by tag to a client without list support: the linux/amd64 manifest
    lst = reg.manifest("library/multilist", "1.0")
    status, headers, body = await in_thread(fetch, "GET", base + "library/multilist/manifests/1.0",
                                            {"Accept": DOCKER_MANIFEST})
    assert status == 200 and body == lst.child("amd64").body
    assert headers["docker-content-digest"] == lst.child("amd64").digest
    status, headers, body = await in_thread(fetch, "GET", base + "library/multilist/manifests/1.0",
                                            {"Accept": f"{DOCKER_MANIFEST}, {DOCKER_LIST}"})
    assert body == lst.body and headers["content-type"] == DOCKER_LIST
    # by digest a list is served as it is
    status, _, body = await in_thread(fetch, "GET", base + f"library/multilist/manifests/{lst.digest}",
                                      {"Accept": DOCKER_MANIFEST})
    assert body == lst.body


@pytest_twisted.ensureDeferred
async def test_blobs_ranges_tags_referrers_and_errors(rig):
    reg = rig()
    base = reg.url + "/v2/"
    small = reg.manifest("library/small", "1.0")
    layer = small.layers()[0]
    url = base + f"library/small/blobs/{layer.digest}"
    status, headers, body = await in_thread(fetch, "GET", url)
    assert (status, body, headers["docker-content-digest"], headers["accept-ranges"]) == (
        200, layer.read(), layer.digest, "bytes")
    status, headers, body = await in_thread(fetch, "GET", url, {"Range": "bytes=10-19"})
    assert status == 206 and body == layer.read()[10:20]
    assert headers["content-range"] == f"bytes 10-19/{layer.size}"
    status, headers, _ = await in_thread(fetch, "GET", url, {"Range": f"bytes={layer.size}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{layer.size}"
    status, headers, body = await in_thread(fetch, "HEAD", url)
    assert status == 200 and body == b"" and headers["content-length"] == str(layer.size)

    async def error(path, method="GET"):
        status, headers, body = await in_thread(fetch, method, base + path, {"Accept": ALL_TYPES})
        return status, json.loads(body)["errors"][0]["code"] if body else None

    assert await error("library/nothing/manifests/1.0") == (404, "NAME_UNKNOWN")
    assert await error("library/small/manifests/9.9") == (404, "MANIFEST_UNKNOWN")
    assert await error("library/small/blobs/sha256:" + "0" * 64) == (404, "BLOB_UNKNOWN")
    # a blob of another repository is not linked here
    other = reg.manifest("library/dockerv2", "1.0").layers()[0].digest
    assert await error(f"library/small/blobs/{other}") == (404, "BLOB_UNKNOWN")
    assert await error("library/small/blobs/sha256:xyz") == (400, "DIGEST_INVALID")
    assert await error("library/small/manifests/1.0", "DELETE") == (405, "UNSUPPORTED")

    status, headers, body = await in_thread(fetch, "GET", base + "library/small/tags/list?n=2")
    assert json.loads(body) == {"name": "library/small", "tags": ["1.0", "1.1"]}
    assert headers["link"] == '</v2/library/small/tags/list?n=2&last=1.1>; rel="next"'
    status, headers, body = await in_thread(fetch, "GET", base + "library/small/tags/list?n=2&last=1.1")
    assert json.loads(body)["tags"] == ["2.0", "latest"] and "link" not in headers

    status, headers, body = await in_thread(fetch, "GET", base + f"library/small/referrers/{small.digest}")
    idx = json.loads(body)
    assert status == 200 and headers["content-type"] == OCI_INDEX
    assert [m["artifactType"] for m in idx["manifests"]] == ["application/vnd.example.sbom.v1+json"]
    status, headers, body = await in_thread(
        fetch, "GET", base + f"library/small/referrers/{small.digest}?artifactType=application/x-none")
    assert json.loads(body)["manifests"] == [] and headers["oci-filters-applied"] == "artifactType"
    reg.configure(referrers=False)
    status, _, _ = await in_thread(fetch, "GET", base + f"library/small/referrers/{small.digest}")
    assert status == 404


@pytest_twisted.ensureDeferred
async def test_token_scope_expiry_and_counting(rig):
    reg = rig(auth=True, token_ttl=1)

    async def token(scope, auth=None):
        headers = {"Authorization": auth} if auth else {}
        status, _, body = await in_thread(
            fetch, "GET", f"{reg.token_url}/token?service=fake-registry&scope=repository:{scope}:pull", headers)
        return status, json.loads(body)

    status, tok = await token("library/small")
    assert status == 200 and tok["token"] == tok["access_token"] and tok["expires_in"] == 1 and tok["issued_at"]
    bearer = {"Authorization": "Bearer " + tok["token"], "Accept": ALL_TYPES}
    status, _, _ = await in_thread(fetch, "GET", reg.url + "/v2/library/small/manifests/1.0", bearer)
    assert status == 200
    status, headers, body = await in_thread(fetch, "GET", reg.url + "/v2/library/multi/manifests/1.0", bearer)
    assert status == 401 and 'error="insufficient_scope"' in headers["www-authenticate"]
    assert 'scope="repository:library/multi:pull"' in headers["www-authenticate"]
    assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    # private: anonymous tokens open nothing; a wrong password gets no token
    status, tok_anon = await token("acme/private")
    status, _, _ = await in_thread(fetch, "GET", reg.url + "/v2/acme/private/manifests/1.0",
                                   {"Authorization": "Bearer " + tok_anon["token"], "Accept": ALL_TYPES})
    assert status == 401
    status, _ = await token("acme/private", "Basic " + base64.b64encode(b"alice:nope").decode())
    assert status == 401
    assert reg.token_requests == 3

    await deferLater(reactor, 1.1, lambda: None)
    status, headers, _ = await in_thread(fetch, "GET", reg.url + "/v2/library/small/manifests/1.0", bearer)
    assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"]


@pytest_twisted.ensureDeferred
async def test_fault_modes_over_http(rig):
    reg = rig()
    layer = reg.manifest("library/small", "1.0").layers()[0]
    url = reg.url + f"/v2/library/small/blobs/{layer.digest}"

    reg.fault("down5xx", times=1)
    status, _, body = await in_thread(fetch, "GET", url)
    assert status == 503 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    assert (await in_thread(fetch, "GET", url))[0] == 200  # times=1: gone

    reg.fault("429", retry_after=3)
    status, headers, body = await in_thread(fetch, "GET", url)
    assert status == 429 and headers["retry-after"] == "3"
    assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
    reg.clear_faults()

    reg.fault("corrupt", match=layer.hex)
    status, _, body = await in_thread(fetch, "GET", url)
    assert status == 200 and len(body) == layer.size and body != layer.read()
    assert sum(a != b for a, b in zip(body, layer.read())) == 1
    reg.clear_faults()

    reg.fault("cut", match=layer.hex, after_bytes=40)
    with pytest.raises(IncompleteRead) as exc:
        await in_thread(fetch, "GET", url)
    assert len(exc.value.partial) == 40

    reg.clear_faults()
    reg.fault("hang", server="all")
    with pytest.raises(OSError):  # socket.timeout
        await in_thread(fetch, "GET", url, timeout=0.5)
    reg.clear_faults()
    assert (await in_thread(fetch, "GET", url))[0] == 200

    reg.fault("throttle", bps=1000)  # 100-byte chunks every 0.1 s: 204 bytes take 0.2 s
    started = time.time()
    status, _, body = await in_thread(fetch, "GET", url)
    assert body == layer.read()
    assert time.time() - started >= 0.15
    reg.clear_faults()

    reg.configure(pull_limit=2)
    murl = reg.url + "/v2/library/small/manifests/1.0"
    codes = [(await in_thread(fetch, m, murl, {"Accept": ALL_TYPES}))[0] for m in ("GET", "HEAD", "GET", "GET")]
    assert codes == [200, 200, 200, 429]
    status, headers, _ = await in_thread(fetch, "HEAD", murl, {"Accept": ALL_TYPES})
    assert status == 200 and headers["ratelimit-remaining"] == "0;w=21600"


def test_big_image_is_streamed_to_disk_and_reused(tmp_path):
    size = 3 * 1024 * 1024 + 123
    img = big_image(str(tmp_path), size, seed=7)
    layer = img.layers()[0]
    assert layer.data is None and file_sha256(layer.path) == layer.hex
    with gzip.open(layer.path) as gz:
        tar_bytes = gz.read()
    diff_id = json.loads(img.config.read())["rootfs"]["diff_ids"][0]
    assert "sha256:" + hashlib.sha256(tar_bytes).hexdigest() == diff_id
    with tarfile.open(layer.path) as tar:
        member = tar.getmember("big.bin")
        data = tar.extractfile(member).read()
    assert member.size == size and len(data) == size
    assert len(gzip.compress(data[:1 << 20], 1)) > 1 << 20  # incompressible
    mtime = os.stat(layer.path).st_mtime_ns
    again = big_image(str(tmp_path), size, seed=7)
    assert again.digest == img.digest and os.stat(layer.path).st_mtime_ns == mtime


# ---------------------------------------------------------------------------------------------
# the standalone process, and Debian's docker-registry


def test_standalone_process_with_control_endpoints(tmp_path, home):
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakeregistry", "--listen", "127.0.0.1:0",
                             "--cdn", "127.0.0.2:0", "--ready-file", str(ready), "--auth", "--redirect"],
                            cwd=ROOT, stdout=subprocess.PIPE)
    try:
        deadline = time.time() + 15
        while not ready.exists():
            assert proc.poll() is None and time.time() < deadline, "fake registry did not start"
            time.sleep(0.05)
        urls = json.loads(ready.read_text())
        assert json.loads(proc.stdout.readline()) == urls
        url, host = urls["url"], urls["url"][len("http://"):]
        assert urls["cdn"].startswith("http://127.0.0.2:") and urls["token"].startswith("http://127.0.0.1:")

        def post(path, obj=None):
            status, _, body = fetch("POST", url + path, {"Content-Type": "application/json"},
                                    json.dumps(obj or {}).encode())
            assert status == 200, body
            return json.loads(body)

        def get(path):
            return json.loads(fetch("GET", url + path)[2])

        skopeo_copy(f"docker://{host}/library/small:1.0", tmp_path / "out", home=home)
        log = get("/_fake/requests")
        assert {r["server"] for r in log} == {"registry", "token", "cdn"}
        assert not any(r["authorization"] for r in log if r["server"] == "cdn")
        assert get("/_fake/state")["token_requests"] == 1

        made = post("/_fake/image", {"name": "acme/new", "tags": ["v1"], "files": {"x.txt": "new\n"}})
        post("/_fake/tag", {"name": "library/small", "tag": "1.0", "digest": made["digest"]})
        info = skopeo_inspect(f"docker://{host}/library/small:1.0", home=home)
        assert info["Digest"] == made["digest"]

        post("/_fake/fault", {"mode": "429", "match": "/manifests/", "retry_after": 0})
        proc2 = skopeo_copy(f"docker://{host}/acme/new:v1", tmp_path / "fail", home=home, check=False)
        assert proc2.returncode != 0
        post("/_fake/fault", {"mode": "normal"})
        post("/_fake/reset")
        assert get("/_fake/requests") == []
        skopeo_copy(f"docker://{host}/acme/new:v1", tmp_path / "new", home=home)
        assert get("/_fake/state")["repos"]["acme/new"]["tags"] == {"v1": made["digest"]}
        assert fetch("POST", url + "/_fake/fault", {}, b'{"mode": "nonsense"}')[0] == 400
    finally:
        stop_process(proc)


def test_docker_registry_round_trip(tmp_path, home):
    reg = FakeRegistry()  # content only: never listens
    small = reg.manifest("library/small", "1.0")
    multi = reg.manifest("library/multi", "1.0")
    dockerv2 = reg.manifest("library/dockerv2", "1.0")
    with DockerRegistry(tmp_path / "registry") as dr:
        dr.push("library/small", small, "1.0", home=home)
        dr.push("library/multi", multi, "1.0", home=home)
        dr.push("library/dockerv2", dockerv2, "1.0", home=home)
        multilist = reg.manifest("library/multilist", "1.0")
        dr.push("library/multilist", multilist, "1.0", home=home)
        assert skopeo_inspect("docker://" + dr.ref("library/multilist", "1.0"), raw=True, home=home) == multilist.body
        assert skopeo_inspect("docker://" + dr.ref("library/multi", "1.0"), raw=True, home=home) == multi.body
        assert skopeo_inspect("docker://" + dr.ref("library/dockerv2", "1.0"), raw=True, home=home) == dockerv2.body
        skopeo_copy("docker://" + dr.ref("library/small", "1.0"), tmp_path / "back", home=home)
        assert_dir_copy(tmp_path / "back", small)
        status, headers, _ = fetch("HEAD", dr.url + "/v2/library/small/manifests/1.0", {"Accept": OCI_MANIFEST})
        assert status == 200 and headers["docker-content-digest"] == small.digest


@pytest_twisted.ensureDeferred
async def test_basic_auth_registry(rig, tmp_path, home):
    reg = rig(basic_auth=True)
    ref = "docker://" + reg.ref("library/small", "1.0")
    proc = await in_thread(skopeo_copy, ref, tmp_path / "anon", home=home, check=False)
    assert proc.returncode != 0
    status, headers, _ = await in_thread(fetch, "GET", reg.url + "/v2/")
    assert status == 401 and headers["www-authenticate"] == 'Basic realm="fake-registry"'
    await in_thread(skopeo_copy, ref, tmp_path / "ok", src_creds=(USER, PASSWORD), home=home)
    assert_dir_copy(tmp_path / "ok", reg.manifest("library/small", "1.0"))
    assert not reg.requests_to("token")
