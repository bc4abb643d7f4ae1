"""
The oci backend with the real skopeo against a running vault, over real sockets.

The fake registry (tests/fakeregistry.py: token server, CDN on 127.0.0.2,
faults) and the vault run in-process on the test's reactor; skopeo and the
raw HTTP checks run in threads (deferToThread) so that both keep answering.
The last tests run the real daemon (twistd) in front of Debian's
docker-registry.  containerd, podman and docker are not installed here:
what they send is reproduced with raw requests (containerd's ``?ns=``,
docker's Basic login after a challenge).
"""

import base64
import json
import os
import time

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from artifact_vault.backends.oci import backend as oci_backend
from artifact_vault.backends.oci import shown as oci_shown
from artifact_vault.backends.oci.backend import blob_key
from tests.fakeregistry import (DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, PASSWORD, USER,
                                FakeRegistry, image, index)
from tests.hfenv import fetch, file_sha256, vault_process
from tests.ocienv import DockerRegistry, skopeo_copy, skopeo_inspect

ALL_TYPES = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])
VAULT_TOKEN = "vault-token-for-oci"


def oci(reg_or_url, registry="docker.io", name="hub", **config):
    url = reg_or_url if isinstance(reg_or_url, str) else reg_or_url.url
    return {"type": "oci", "name": name, "config": {"registry": registry, "base_url": url, "timeout": 5,
                                                   "offline_timeout": 1, **config}}


def in_thread(f, *args, **kwargs):
    return deferToThread(f, *args, **kwargs)


def sleep(seconds):
    return deferLater(reactor, seconds, lambda: None)


def host(v) -> str:
    return v.url[len("http://"):]


def assert_dir_copy(out, top):
    """A ``dir:`` copy holds the manifest byte-exact and every blob with its digest."""
    assert (out / "manifest.json").read_bytes() == top.body
    for blob in top.blobs:
        assert file_sha256(out / blob.hex) == blob.hex


def blob_gets(reg, digest=None):
    """GETs that fetched blob bytes: the registry's 200s, and the CDN's when it redirects."""
    return [r for r in reg.requests if r["method"] == "GET" and r["status"] in (200, 206, None)
            and (("/blobs/" in r["path"] and r["server"] == "registry") or r["server"] == "cdn")
            and (digest is None or digest.split(":")[1] in r["path"])]


def files_in(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def error_code(body):
    return json.loads(body)["errors"][0]["code"]


# ---------------------------------------------------------------------------------------------
# pulls


@pytest_twisted.ensureDeferred
async def test_pull_by_tag_and_digest_then_from_the_cache(rig, vault_factory, tmp_path, home):
    reg = rig(auth=True, cdn_redirect=True)
    ghcr = rig()
    v = vault_factory([oci(reg, default=True), oci(ghcr, registry="ghcr.io", name="ghcr")])
    small = reg.manifest("library/small", "1.0")
    started = time.monotonic()
    await in_thread(skopeo_copy, f"docker://{host(v)}/small:1.0", tmp_path / "tag", home=home)
    assert_dir_copy(tmp_path / "tag", small)
    # skopeo tried HTTPS first: the vault's immediate 400 made it fall back at once
    assert time.monotonic() - started < 5
    await in_thread(skopeo_copy, f"docker://{host(v)}/library/small@{small.digest}", tmp_path / "digest", home=home)
    assert_dir_copy(tmp_path / "digest", small)
    # blobs came through the CDN, fetched by the vault without the registry's token
    assert len(blob_gets(reg)) == len(small.blobs) and not reg.cdn_authorization_seen
    assert all(r["headers"]["authorization"].startswith("Bearer fake-")
               for r in reg.requests_to("registry", path_contains="/library/small/"))

    # a second pull asks upstream for no blob; a pull by digest asks nothing at all
    before = len(reg.requests)
    await in_thread(skopeo_copy, f"docker://{host(v)}/library/small@{small.digest}", tmp_path / "again", home=home)
    assert len(reg.requests) == before
    await in_thread(skopeo_copy, f"docker://{host(v)}/small:1.0", tmp_path / "again2", home=home)
    assert len(blob_gets(reg)) == len(small.blobs)
    assert reg.token_requests == 1
    assert [r["status"] for r in reg.requests if r["path"] == "/v2/"] == [401]  # one probe for the realm
    # manifests are asked for with every type the vault can keep
    for r in reg.requests_to("registry", path_contains="/manifests/"):
        assert {t.strip() for t in r["headers"]["accept"].split(",")} == set(ALL_TYPES.split(", ")), r

    # the path-prefixed form names the second registry; the same blobs are not fetched again
    ghcr_small = ghcr.manifest("library/small", "1.0")
    await in_thread(skopeo_copy, f"docker://{host(v)}/ghcr.io/library/small:1.0", tmp_path / "ghcr", home=home)
    assert_dir_copy(tmp_path / "ghcr", ghcr_small)
    assert ghcr.count("/manifests/1.0") == 1 and not blob_gets(ghcr)
    # stored once: one file per digest for both registries
    blobs = [f for f in files_in(v.config.cache_dir) if f.startswith("_oci/blobs/") and not f.endswith(".vault-meta")]
    assert sorted(os.path.basename(f) for f in blobs) == sorted({b.hex for b in small.blobs} | {small.hex})


@pytest_twisted.ensureDeferred
async def test_containerd_ns_query_and_the_prefix_form(rig, vault_factory):
    hub, ghcr = rig(), rig()
    other = ghcr.put("acme/app", image({"app.txt": "ghcr only\n"}), "1.0")
    v = vault_factory([oci(hub, default=True), oci(ghcr, registry="ghcr.io", name="ghcr", prefix="/ghcr/")])

    async def get(path, accept=ALL_TYPES, method="GET"):
        return await in_thread(fetch, method, v.url + path, {"Accept": accept})

    # what containerd sends for ghcr.io/acme/app:1.0 with the vault as mirror
    status, headers, body = await get("/v2/acme/app/manifests/1.0?ns=ghcr.io")
    assert (status, body, headers["docker-content-digest"]) == (200, other.body, other.digest)
    assert headers["docker-distribution-api-version"] == "registry/2.0"
    status, _, body = await get(f"/v2/acme/app/blobs/{other.layers()[0].digest}?ns=ghcr.io")
    assert (status, body) == (200, other.layers()[0].read())
    # docker.io with containerd: ns=docker.io, official images without library/
    status, _, body = await get("/v2/library/small/manifests/1.0?ns=docker.io")
    assert body == hub.manifest("library/small", "1.0").body
    status, _, body = await get("/v2/small/manifests/1.0?ns=quay.io")
    assert status == 404 and error_code(body) == "NAME_UNKNOWN" and b"quay.io" in body
    # the default backend never had acme/app
    status, _, body = await get("/v2/acme/app/manifests/1.0")
    assert status == 404 and error_code(body) == "NAME_UNKNOWN"
    # below a backend's own prefix (containerd's override_path)
    status, headers, body = await get("/ghcr/v2/acme/app/manifests/1.0")
    assert (status, body) == (200, other.body) and headers["docker-distribution-api-version"] == "registry/2.0"
    for path in ("/v2/", "/v2", "/v2/?ns=ghcr.io", "/ghcr/v2/"):
        status, headers, body = await get(path)
        assert (status, body, headers["docker-distribution-api-version"]) == (200, b"{}", "registry/2.0"), path


@pytest_twisted.ensureDeferred
async def test_pull_works_with_the_upstream_stopped(rig, vault_factory, tmp_path, home, logged):
    reg = rig(auth=True, cdn_redirect=True)
    v = vault_factory([oci(reg, default=True, tag_ttl=0)])
    multi = reg.manifest("library/multi", "1.0")
    small = reg.manifest("library/small", "2.0")
    await in_thread(skopeo_copy, f"docker://{host(v)}/multi:1.0", tmp_path / "m1", "--all", home=home)
    await in_thread(skopeo_copy, f"docker://{host(v)}/small:2.0", tmp_path / "s1", home=home)
    await reg.close()

    await in_thread(skopeo_copy, f"docker://{host(v)}/multi:1.0", tmp_path / "m2", "--all", home=home)
    assert (tmp_path / "m2" / "manifest.json").read_bytes() == multi.body
    await in_thread(skopeo_copy, f"docker://{host(v)}/multi:1.0", tmp_path / "arm", arch="arm64", home=home)
    assert_dir_copy(tmp_path / "arm", multi.child("arm64"))
    await in_thread(skopeo_copy, f"docker://{host(v)}/small@{small.digest}", tmp_path / "s2", home=home)
    assert_dir_copy(tmp_path / "s2", small)
    assert "Answering docker.io/library/multi:1.0 from the cache" in logged.text()
    # what was never fetched cannot be served: the registry's JSON error, 502
    status, _, body = await in_thread(fetch, "GET", v.url + "/v2/small/manifests/1.1", {"Accept": ALL_TYPES})
    assert status == 502 and error_code(body) == "UNAVAILABLE"


@pytest_twisted.ensureDeferred
async def test_a_moved_tag_is_seen_after_tag_ttl_and_revalidation_uses_head(rig, vault_factory, home):
    reg = rig(auth=True, pull_limit=3)
    v = vault_factory([oci(reg, default=True, tag_ttl=1)])
    ref = f"docker://{host(v)}/small:1.0"
    first = reg.manifest("library/small", "1.0")
    assert (await in_thread(skopeo_inspect, ref, raw=True, home=home)) == first.body
    moved = reg.put("library/small", image({"hello.txt": "moved\n"}))
    reg.tag("library/small", "1.0", moved)
    assert (await in_thread(skopeo_inspect, ref, raw=True, home=home)) == first.body  # within tag_ttl
    assert reg.count("/manifests/1.0") == 1
    await sleep(1.1)
    assert (await in_thread(skopeo_inspect, ref, raw=True, home=home)) == moved.body
    assert [r["method"] for r in reg.requests_to(path_contains="/manifests/1.0")] == ["GET", "HEAD", "GET"]
    # unchanged after another tag_ttl: a HEAD, which Docker Hub does not count against the pull limit
    await sleep(1.1)
    for _ in range(5):
        assert (await in_thread(skopeo_inspect, ref, raw=True, home=home)) == moved.body
    assert [r["method"] for r in reg.requests_to(path_contains="/manifests/1.0")] == ["GET", "HEAD", "GET", "HEAD"]
    assert reg.manifest_gets == 2


@pytest_twisted.ensureDeferred
async def test_ten_concurrent_pulls_make_one_upstream_get_per_blob(rig, vault_factory, tmp_path, home):
    # ten skopeo runs wait in ten threads: the vault needs threads of its own besides (name lookups, writes)
    reactor.suggestThreadPoolSize(24)
    reg = rig(auth=True, cdn_redirect=True)
    top = reg.put("acme/big", image({"big.bin": os.urandom(3 * 1024 * 1024)}), "1.0")
    reg.fault("throttle", server="cdn", bps=4 * 1024 * 1024)  # slow enough for all ten to overlap
    v = vault_factory([oci(reg, default=True)])
    pulls = [in_thread(skopeo_copy, f"docker://{host(v)}/acme/big:1.0", tmp_path / f"out{i}",
                       home=tmp_path / f"home{i}") for i in range(10)]
    await gatherResults(pulls)
    for i in range(10):
        assert_dir_copy(tmp_path / f"out{i}", top)
    for blob in top.blobs:
        assert len(blob_gets(reg, blob.digest)) == 1, blob
    assert reg.count("/manifests/1.0") == 1 and reg.token_requests == 1


@pytest_twisted.ensureDeferred
async def test_token_flow_login_expiry_and_private_repositories(rig, vault_factory, tmp_path, home, logged):
    reg = rig(auth=True, token_ttl=2, cdn_redirect=True)
    private = reg.manifest("acme/private", "1.0")
    anonymous = vault_factory([oci(reg, default=True)])
    proc = await in_thread(skopeo_copy, f"docker://{host(anonymous)}/acme/private:1.0", tmp_path / "no",
                           home=home, check=False)
    assert proc.returncode != 0 and "unauthorized" in proc.stderr.lower()
    assert not any(r["headers"].get("authorization", "").startswith("Basic") for r in reg.requests)

    reg.reset()
    v = vault_factory([oci(reg, default=True, username=USER, password=PASSWORD, tag_ttl=0)])
    await in_thread(skopeo_copy, f"docker://{host(v)}/acme/private:1.0", tmp_path / "ok", home=home)
    assert_dir_copy(tmp_path / "ok", private)
    tokens = reg.requests_to("token")
    assert len(tokens) == 1 and tokens[0]["headers"]["authorization"].startswith("Basic ")
    assert "scope=repository%3Aacme%2Fprivate%3Apull" in tokens[0]["path"]
    # the login went to the token server only; the token to the registry only
    assert not any("authorization" in r["headers"] for r in reg.requests_to("cdn"))
    assert all(r["headers"].get("authorization", "").startswith("Bearer ") for r in reg.requests_to("registry")[1:])
    # within its lifetime the token is reused; after it, a new one is asked for
    await in_thread(skopeo_inspect, f"docker://{host(v)}/acme/private:1.0", raw=True, home=home)
    assert reg.token_requests == 1
    await sleep(2.2)
    await in_thread(skopeo_inspect, f"docker://{host(v)}/acme/private:1.0", raw=True, home=home)
    assert reg.token_requests == 2
    # the upstream's own challenge never reaches a client, nor the vault's credentials
    status, headers, body = await in_thread(fetch, "GET", v.url + "/v2/acme/nothing/manifests/1.0",
                                            {"Accept": ALL_TYPES})
    assert status == 401 and "www-authenticate" not in headers and error_code(body) == "UNAUTHORIZED"
    assert PASSWORD.encode() not in body and b"fake-" not in body
    # a token server that fails is the registry failing: the kept tag serves (the token above expired)
    reg.fault("down5xx", server="token")
    await sleep(1.2)
    assert (await in_thread(skopeo_inspect, f"docker://{host(v)}/acme/private:1.0", raw=True, home=home)) \
        == private.body
    assert "Answering docker.io/acme/private:1.0 from the cache" in logged.text()
    reg.clear_faults()
    tokens_issued = list(reg.tokens)
    assert tokens_issued and not any(t in logged.text() for t in tokens_issued) and PASSWORD not in logged.text()


@pytest_twisted.ensureDeferred
async def test_a_registry_that_asks_for_basic_auth(rig, vault_factory, tmp_path, home, logged):
    reg = rig(basic_auth=True)
    v = vault_factory([oci(reg, default=True, username=USER, password=PASSWORD)])
    await in_thread(skopeo_copy, f"docker://{host(v)}/acme/private:1.0", tmp_path / "ok", home=home)
    assert_dir_copy(tmp_path / "ok", reg.manifest("acme/private", "1.0"))
    login = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert reg.requests_to("registry")[-1]["headers"]["authorization"] == login
    assert PASSWORD not in logged.text()
    nobody = vault_factory([oci(reg, default=True)])
    status, _, body = await in_thread(fetch, "GET", nobody.url + "/v2/small/manifests/1.0", {"Accept": ALL_TYPES})
    assert status == 401 and error_code(body) == "UNAUTHORIZED"


# ---------------------------------------------------------------------------------------------
# what a client may read


@pytest_twisted.ensureDeferred
async def test_a_stored_blob_is_served_only_to_repositories_whose_upstream_has_it(rig, vault_factory, tmp_path,
                                                                                 home):
    reg = rig(auth=True)
    ghcr = rig()
    v = vault_factory([oci(reg, default=True, username=USER, password=PASSWORD),
                       oci(ghcr, registry="ghcr.io", name="ghcr")])
    private = reg.manifest("acme/private", "1.0")
    secret = private.layers()[0]
    await in_thread(skopeo_copy, f"docker://{host(v)}/acme/private:1.0", tmp_path / "ok", home=home)
    assert v.store.lookup(blob_key(secret.digest)) is not None
    reg.reset()
    for path in (f"/v2/library/small/blobs/{secret.digest}", f"/v2/ghcr.io/library/small/blobs/{secret.digest}",
                 f"/v2/library/small/manifests/{private.digest}", f"/v2/small/blobs/{secret.digest}?ns=ghcr.io"):
        for method in ("GET", "HEAD"):
            status, _, body = await in_thread(fetch, method, v.url + path, {"Accept": ALL_TYPES})
            assert status == 404, (path, method, status)
            if method == "GET":
                assert error_code(body) in ("BLOB_UNKNOWN", "MANIFEST_UNKNOWN"), body
    # each asked the repository's own upstream (a HEAD), which said no
    asked = [(r["method"], r["path"]) for r in reg.requests_to("registry") if "/library/small/" in r["path"]]
    assert asked and all(m == "HEAD" for m, _ in asked) and ghcr.count("/library/small/blobs/") == 2
    # a public repository that does have the blob gets it from the cache after its upstream's HEAD
    shared = reg.put("library/shares", private, "1.0")
    reg.reset()
    status, _, body = await in_thread(fetch, "GET", v.url + f"/v2/shares/blobs/{secret.digest}")
    assert status == 200 and body == secret.read()
    assert [r["method"] for r in reg.requests_to("registry") if "/blobs/" in r["path"]] == ["HEAD"]
    assert shared.digest == private.digest


@pytest_twisted.ensureDeferred
async def test_manifest_negotiation_headers_and_conditional_requests(rig, vault_factory):
    reg = rig()
    only_arm = index([image({"a": "arm\n"}, architecture="arm64")])
    reg.put("acme/armonly", only_arm, "1.0")
    v = vault_factory([oci(reg, default=True)])
    base = v.url + "/v2/"
    multi = reg.manifest("library/multi", "1.0")
    amd64 = multi.child("amd64")

    status, headers, body = await in_thread(fetch, "GET", base + "multi/manifests/1.0", {"Accept": ALL_TYPES})
    assert (status, body, headers["content-type"]) == (200, multi.body, OCI_INDEX)
    assert headers["docker-content-digest"] == multi.digest and headers["content-length"] == str(multi.size)
    # a client that cannot take an index: the linux/amd64 image, with its own digest
    status, headers, body = await in_thread(fetch, "GET", base + "multi/manifests/1.0", {"Accept": OCI_MANIFEST})
    assert (status, body, headers["docker-content-digest"]) == (200, amd64.body, amd64.digest)
    status, _, body = await in_thread(fetch, "GET", base + "acme/armonly/manifests/1.0", {"Accept": OCI_MANIFEST})
    assert status == 404 and error_code(body) == "MANIFEST_UNKNOWN"
    status, _, body = await in_thread(fetch, "GET", base + "small/manifests/1.0", {"Accept": DOCKER_MANIFEST})
    assert status == 404 and error_code(body) == "MANIFEST_UNKNOWN"
    lst = reg.manifest("library/multilist", "1.0")
    status, headers, body = await in_thread(fetch, "GET", base + "multilist/manifests/1.0",
                                            {"Accept": DOCKER_MANIFEST})
    assert body == lst.child("amd64").body and headers["content-type"] == DOCKER_MANIFEST
    # HEAD: the same headers, no body; by digest and by tag
    for ref in ("1.0", multi.digest):
        status, headers, body = await in_thread(fetch, "HEAD", base + f"multi/manifests/{ref}", {"Accept": ALL_TYPES})
        assert (status, body, headers["content-length"]) == (200, b"", str(multi.size))
        assert headers["docker-content-digest"] == multi.digest and headers["content-type"] == OCI_INDEX
    status, headers, body = await in_thread(fetch, "GET", base + "multi/manifests/1.0",
                                            {"Accept": ALL_TYPES, "If-None-Match": f'"{multi.digest}"'})
    assert status == 304 and body == b""
    # a HEAD for a blob not stored: upstream's HEAD answers it, no download starts
    config = amd64.config
    status, headers, body = await in_thread(fetch, "HEAD", base + f"multi/blobs/{config.digest}")
    assert (status, body, headers["content-length"]) == (200, b"", str(config.size))
    assert v.store.lookup(blob_key(config.digest)) is None and not blob_gets(reg, config.digest)
    # blobs: HEAD, a single range, Docker-Content-Digest
    layer = amd64.layers()[0]
    status, headers, body = await in_thread(fetch, "GET", base + f"multi/blobs/{layer.digest}", {"Range": "bytes=5-14"})
    assert (status, body, headers["content-range"]) == (206, layer.read()[5:15], f"bytes 5-14/{layer.size}")
    status, headers, body = await in_thread(fetch, "HEAD", base + f"multi/blobs/{layer.digest}")
    assert (status, headers["content-length"], headers["docker-content-digest"]) == (200, str(layer.size), layer.digest)


@pytest_twisted.ensureDeferred
async def test_tags_list_pages_and_referrers_are_relayed_and_kept(rig, vault_factory, home):
    reg = rig(auth=True, tags_page=2)
    v = vault_factory([oci(reg, default=True, tag_ttl=0), oci(rig(), registry="ghcr.io", name="ghcr")])
    info = await in_thread(skopeo_inspect, f"docker://{host(v)}/small:1.0", home=home)
    assert info["RepoTags"] == ["1.0", "1.1", "2.0", "latest"]
    status, headers, body = await in_thread(fetch, "GET", v.url + "/v2/small/tags/list")
    assert headers["link"] == '</v2/library/small/tags/list?n=2&last=1.1>; rel="next"'
    status, headers, _ = await in_thread(fetch, "GET", v.url + "/v2/small/tags/list?ns=docker.io")
    assert headers["link"] == '</v2/library/small/tags/list?n=2&last=1.1&ns=docker.io>; rel="next"'
    status, headers, _ = await in_thread(fetch, "GET", v.url + "/v2/docker.io/small/tags/list")
    assert headers["link"] == '</v2/docker.io/library/small/tags/list?n=2&last=1.1>; rel="next"'

    small = reg.manifest("library/small", "1.0")
    url = v.url + f"/v2/small/referrers/{small.digest}"
    status, headers, body = await in_thread(fetch, "GET", url)
    assert status == 200 and headers["content-type"] == OCI_INDEX
    assert [m["artifactType"] for m in json.loads(body)["manifests"]] == ["application/vnd.example.sbom.v1+json"]
    status, headers, body = await in_thread(fetch, "GET", url + "?artifactType=application/x-none")
    assert json.loads(body)["manifests"] == [] and headers["oci-filters-applied"] == "artifactType"

    await reg.close()  # offline: the pages and the referrers were kept
    info = await in_thread(skopeo_inspect, f"docker://{host(v)}/small:1.0", home=home)
    assert info["RepoTags"] == ["1.0", "1.1", "2.0", "latest"]
    status, _, body = await in_thread(fetch, "GET", url)
    assert status == 200 and len(json.loads(body)["manifests"]) == 1


# ---------------------------------------------------------------------------------------------
# errors, bad input, bounded state


@pytest_twisted.ensureDeferred
async def test_errors_in_the_registry_form(rig, vault_factory, tmp_path, home, logged):
    reg = rig(auth=True)
    v = vault_factory([oci(reg, default=True, tag_ttl=0)])
    base = v.url + "/v2/"

    async def call(method, path, headers=None):
        status, headers, body = await in_thread(fetch, method, base + path, {"Accept": ALL_TYPES, **(headers or {})},
                                                b"x" if method in ("PUT", "POST", "PATCH") else None)
        return status, headers, (error_code(body) if body and status >= 400 else None), body

    # read-only: push, delete, catalog
    for method, path in (("POST", "small/blobs/uploads/"), ("PUT", "small/manifests/9.9"), ("GET", "_catalog"),
                         ("DELETE", "small/manifests/1.0"), ("PATCH", "small/blobs/uploads/abc"),
                         ("DELETE", f"small/blobs/sha256:{'0' * 64}")):
        status, _, code, body = await call(method, path)
        assert (status, code) == (405, "UNSUPPORTED") and b"read-only" in body, (method, path)
    status, _, code, body = await call("GET", "small/manifests/9.9")
    assert (status, code) == (404, "MANIFEST_UNKNOWN") and b"manifest unknown" in body  # upstream's own words
    status, _, code, _ = await call("GET", f"small/blobs/sha256:{'0' * 64}")
    assert (status, code) == (404, "BLOB_UNKNOWN")
    # 429 with nothing cached: passed on with its Retry-After
    reg.fault("429", match="/manifests/", retry_after=7)
    status, headers, code, _ = await call("GET", "small/manifests/1.1")
    assert (status, code, headers["retry-after"]) == (429, "TOOMANYREQUESTS", "7")
    # once a tag is kept, a 429, a 5xx or a silent upstream serve the last digest (and say so in the log)
    reg.clear_faults()
    kept = reg.manifest("library/small", "1.0")
    assert (await call("GET", "small/manifests/1.0"))[0] == 200
    for mode in ("429", "down5xx", "hang"):
        reg.fault(mode, match="/manifests/", retry_after=7)
        started = time.monotonic()
        status, headers, _, body = await call("GET", "small/manifests/1.0")
        assert (status, body, headers["docker-content-digest"]) == (200, kept.body, kept.digest), mode
        assert time.monotonic() - started < 3  # offline_timeout, not timeout
        reg.clear_faults()
    assert logged.text().count("Answering docker.io/library/small:1.0 from the cache") >= 3
    reg.fault("down5xx", match="/manifests/")
    status, _, code, _ = await call("GET", "small/manifests/2.0")
    assert (status, code) == (502, "UNAVAILABLE")
    reg.clear_faults()
    reg.fault("hang", match="/manifests/")
    status, _, code, _ = await call("GET", "multi/manifests/1.0")
    assert status == 504
    reg.clear_faults()
    # a manifest by digest whose bytes are not the digest's: 502, nothing kept
    lst = reg.manifest("library/multilist", "1.0")
    reg.fault("corrupt", match=f"/manifests/{lst.digest}")
    status, _, code, _ = await call("GET", f"multilist/manifests/{lst.digest}")
    assert (status, code) == (502, "UNAVAILABLE") and v.store.lookup(blob_key(lst.digest)) is None
    reg.clear_faults()
    await reg.close()
    status, _, code, _ = await call("GET", "dockerv2/manifests/1.0")
    assert (status, code) == (502, "UNAVAILABLE")


@pytest_twisted.ensureDeferred
async def test_corrupt_or_cut_blobs_are_never_published(rig, vault_factory, tmp_path, home):
    reg = rig()
    v = vault_factory([oci(reg, default=True)])
    small = reg.manifest("library/small", "1.1")
    layer = small.layers()[0]
    for mode in ("corrupt", "cut"):
        reg.fault(mode, match=layer.hex, after_bytes=20)
        proc = await in_thread(skopeo_copy, f"docker://{host(v)}/small:1.1", tmp_path / mode, "--retry-times=0",
                               home=home, check=False)
        assert proc.returncode != 0
        assert v.store.lookup(blob_key(layer.digest)) is None
        assert not [f for f in files_in(v.config.cache_dir) if f.endswith(".vault-tmp")]
        reg.clear_faults()
    await in_thread(skopeo_copy, f"docker://{host(v)}/small:1.1", tmp_path / "good", home=home)
    assert_dir_copy(tmp_path / "good", small)


BAD_PATHS = [
    ("GET", "/v2/Small/manifests/1.0", "NAME_INVALID"),
    ("GET", "/v2/small/../etc/manifests/1.0", "NAME_INVALID"),
    ("GET", "/v2/small/%2e%2e/manifests/1.0", "NAME_INVALID"),
    ("GET", "/v2/a%2fb/manifests/1.0", "NAME_INVALID"),
    ("GET", "/v2/" + "a" * 300 + "/manifests/1.0", "NAME_INVALID"),
    ("GET", "/v2/small_/manifests/1.0", "NAME_INVALID"),
    ("GET", "/v2/x.vault-meta/y/manifests/1.0", "NAME_INVALID"),
    ("GET", "/v2/small/manifests/-bad", "TAG_INVALID"),
    ("GET", "/v2/small/manifests/" + "t" * 129, "TAG_INVALID"),
    ("GET", "/v2/small/manifests/..", "TAG_INVALID"),
    ("GET", "/v2/small/manifests/sha256:abc", "DIGEST_INVALID"),
    ("GET", "/v2/small/manifests/sha256:" + "A" * 64, "DIGEST_INVALID"),
    ("GET", "/v2/small/manifests/sha512:" + "0" * 128, "DIGEST_INVALID"),
    ("GET", "/v2/small/blobs/sha256:" + "0" * 63, "DIGEST_INVALID"),
    ("GET", "/v2/small/blobs/sha256:" + "0" * 64 + "/..", "NAME_UNKNOWN"),
    ("GET", "/v2/small/blobs/md5:" + "0" * 32, "DIGEST_INVALID"),
    ("GET", "/v2/small/blobs/sha256%3A..%2F..%2F" + "0" * 58, "DIGEST_INVALID"),
    ("GET", "/v2/small/blobs/latest", "DIGEST_INVALID"),
    ("GET", "/v2/small/referrers/1.0", "DIGEST_INVALID"),
    ("GET", "/v2/small/tags/list?n=x", "PAGINATION_NUMBER_INVALID"),
    ("GET", "/v2/small/tags/list?last=../x", "TAG_INVALID"),
    ("GET", "/v2/small/referrers/sha256:" + "0" * 64 + "?artifactType=x", "UNSUPPORTED"),
]


@pytest_twisted.ensureDeferred
async def test_bad_names_references_and_digests_get_4xx_and_create_nothing(rig, vault_factory):
    from tests.test_core import raw_get

    reg = rig()
    v = vault_factory([oci(reg, default=True)])
    for method, path, code in BAD_PATHS:
        status, headers, body = await raw_get(v.url, path, method, {"Accept": ALL_TYPES})
        headers = {k.lower(): v for k, v in headers.items()}
        assert 400 <= status < 500 and error_code(body) == code, (path, status, body)
        assert headers.get("content-type", "").startswith("application/json"), path
    assert reg.requests == []
    assert files_in(v.config.cache_dir) == []


@pytest_twisted.ensureDeferred
async def test_what_clients_make_up_leaves_bounded_state(rig, vault_factory, monkeypatch):
    monkeypatch.setattr(oci_shown, "REPOSITORIES_KEPT", 20)
    monkeypatch.setattr(oci_backend, "PAGES_KEPT", 20)
    reg = rig(auth=True, tags_page=2)
    v = vault_factory([oci(reg, default=True)])
    backend = v.vault.backend("hub")
    backend.auth.tokens.limit = 20
    for i in range(60):
        for path in (f"/v2/made-up-{i}/manifests/1.0", f"/v2/small/manifests/no-such-tag-{i}",
                     f"/v2/small/tags/list?n=2&last=made-up-{i}", f"/v2/made-up-{i}/blobs/sha256:{i:064x}",
                     f"/v2/small/referrers/sha256:{i:064x}"):
            status, _, _ = await in_thread(fetch, "GET", v.url + path, {"Accept": ALL_TYPES})
            assert status in (200, 401, 404), (path, status)
    kept = files_in(v.config.cache_dir)
    # nothing for made-up names, tags, pages or digests: upstream never showed them
    assert not [f for f in kept if "made-up" in f or "no-such-tag" in f or "_referrers" in f], kept
    assert len([f for f in kept if "_tags-list" in f]) == 0
    assert len(backend.auth.tokens) <= 20 and len(backend.shown._memory) <= 20
    assert len(backend._next_pages) <= 20 and len(backend._asking) == 0


# ---------------------------------------------------------------------------------------------
# the vault's own access tokens


@pytest_twisted.ensureDeferred
async def test_access_tokens_with_a_basic_challenge_for_registry_clients(rig, vault_factory, tmp_path, home):
    reg = rig()
    v = vault_factory([oci(reg, default=True)], access_tokens=[VAULT_TOKEN])
    status, headers, body = await in_thread(fetch, "GET", v.url + "/v2/")
    assert status == 401 and headers["www-authenticate"] == 'Basic realm="artifact-vault"'
    assert error_code(body) == "UNAUTHORIZED" and headers["docker-distribution-api-version"] == "registry/2.0"
    # what docker, containerd and podman send after that challenge: any user, the token as password
    basic = "Basic " + base64.b64encode(f"anyone:{VAULT_TOKEN}".encode()).decode()
    for auth in ({"Authorization": basic}, {"X-Vault-Token": VAULT_TOKEN},
                 {"Authorization": f"Bearer {VAULT_TOKEN}"}):
        status, _, body = await in_thread(fetch, "GET", v.url + "/v2/", auth)
        assert (status, body) == (200, b"{}"), auth
    wrong = "Basic " + base64.b64encode(b"anyone:wrong-token").decode()
    assert (await in_thread(fetch, "GET", v.url + "/v2/", {"Authorization": wrong}))[0] == 401
    proc = await in_thread(skopeo_copy, f"docker://{host(v)}/small:1.0", tmp_path / "no", home=home, check=False)
    assert proc.returncode != 0
    await in_thread(skopeo_copy, f"docker://{host(v)}/small:1.0", tmp_path / "yes", home=home,
                    src_creds=("me", VAULT_TOKEN))
    assert_dir_copy(tmp_path / "yes", reg.manifest("library/small", "1.0"))
    # the vault's token never travels upstream
    assert reg.requests and all(VAULT_TOKEN not in json.dumps(r["headers"]) and "authorization" not in r["headers"]
                                for r in reg.requests)
    # other backends keep their Bearer challenge
    status, headers, _ = await in_thread(fetch, "GET", v.url + "/_vault/status.json")
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")


# ---------------------------------------------------------------------------------------------
# the real daemon in front of Debian's docker-registry


def test_daemon_in_front_of_docker_registry(tmp_path, home):
    content = FakeRegistry()  # images only: never listens
    small = content.manifest("library/small", "1.0")
    multi = content.manifest("library/multi", "1.0")
    dockerv2 = content.manifest("library/dockerv2", "1.0")
    with DockerRegistry(tmp_path / "registry") as dr:
        for name, top in (("library/small", small), ("library/multi", multi), ("library/dockerv2", dockerv2)):
            dr.push(name, top, "1.0", home=home)
        with vault_process(tmp_path / "vault", [oci(dr.url, registry="registry.local", name="local",
                                                    default=True, tag_ttl=0)]) as v:
            vhost = v.url[len("http://"):]
            skopeo_copy(f"docker://{vhost}/library/small:1.0", tmp_path / "small", home=home)
            assert_dir_copy(tmp_path / "small", small)
            skopeo_copy(f"docker://{vhost}/registry.local/library/multi:1.0", tmp_path / "multi", "--all",
                        home=home)
            assert (tmp_path / "multi" / "manifest.json").read_bytes() == multi.body
            skopeo_copy(f"docker://{vhost}/library/dockerv2@{dockerv2.digest}", tmp_path / "d2", home=home)
            assert_dir_copy(tmp_path / "d2", dockerv2)
            assert skopeo_inspect(f"docker://{vhost}/library/small:1.0", home=home)["RepoTags"] == ["1.0"]
            dr.__exit__(None, None, None)  # the upstream goes away
            skopeo_copy(f"docker://{vhost}/library/small:1.0", tmp_path / "offline", home=home)
            assert_dir_copy(tmp_path / "offline", small)
            skopeo_copy(f"docker://{vhost}/library/multi:1.0", tmp_path / "offline-arm", arch="arm64", home=home)
            assert_dir_copy(tmp_path / "offline-arm", multi.child("arm64"))
            log = v.log()
            assert "Answering registry.local/library/small:1.0 from the cache" in log
            assert "Traceback" not in log
