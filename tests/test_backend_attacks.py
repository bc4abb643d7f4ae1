"""
The security review of the pypi, oci and apt backends and of the core they
brought (absolute-form proxy requests and routers, `freshness.KeptFiles`,
Basic / Proxy-Authorization access tokens, the TLS ClientHello answer,
`Backend.configured_headers`).

Each test plays an attacker -- a client without rights, or with someone
else's, or the owner of a repository on a public registry -- over real
sockets against a vault running in this test's reactor, with the fake
upstreams of tests/ (upstream.py, fakeregistry.py), and asserts the safe
behaviour: a failing test is a finding.  The ``test_held_*`` tests record
attacks that did not get through.
"""

import base64
import hashlib
import http.client
import json
import re
import socket
import time

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredSemaphore, ensureDeferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from artifact_vault.backends import pypi as pypi_backend
from artifact_vault.backends.apt import packages as apt_packages
from artifact_vault.backends.base import BUFFERED_AT_ONCE
from artifact_vault.backends.oci.backend import blob_key
from tests.fakeregistry import OCI_MANIFEST, PASSWORD, USER, Manifest, _canonical, image, index
from tests.test_core import raw_get

ALL_MANIFESTS = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"])
PYPI_JSON = "application/vnd.pypi.simple.v1+json"
SECRET = "s3cr3t-configured-header-value"


def sleep(seconds):
    return deferLater(reactor, seconds, lambda: None)


def wire(url, data: bytes, timeout=5.0, hang_up_after=None):
    """Send raw bytes to the vault; the bytes it answers until it closes (or `hang_up_after` seconds: b"")."""
    host, port = url.split("//")[1].split(":")

    def run():
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.sendall(data)
            if hang_up_after is not None:
                time.sleep(hang_up_after)
                return b""
            out = b""
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        return out
                    out += chunk
            except socket.timeout:
                return out

    return deferToThread(run)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def pypi(upstream, **config):
    return [{"type": "pypi", "config": {"base_url": upstream.url + "/simple", "offline_timeout": 1, **config}}]


def json_page(project, files):
    return json.dumps({"meta": {"api-version": "1.1"}, "name": project, "files": files}).encode()


def bulky_files(project, count, url_bytes=7900):
    """Files whose upstream URLs are long: a page of `count` * ~8 KB normal form that costs little to parse."""
    return [{"filename": f"{project}-{k}.tar.gz", "hashes": {}, "size": 1,
             "url": f"https://files.example/{'x' * url_bytes}/{project}-{k}.tar.gz"} for k in range(count)]


def oci(name, registry, url, **config):
    return {"type": "oci", "name": name, "config": {"registry": registry, "base_url": url, "timeout": 5,
                                                   "offline_timeout": 1, **config}}


# =============================================================================================
# Findings (these tests fail on the code under review)
# =============================================================================================


@pytest_twisted.ensureDeferred
async def test_oci_a_digest_listed_in_a_foreign_manifest_does_not_open_a_cached_private_blob(
        vault_factory, rig):
    """
    docs/oci.rst: "the layer of a private image never answers through a public
    repository's name, nor through another registry".  The vault learns what a
    repository "has shown" from every digest a manifest of it lists, in any
    field (`protocol.references`: layers, config, manifests, blobs), without
    the registry ever confirming the repository has those blobs.  An attacker
    who knows the digests of a private image (a former colleague, a leaked
    build log) pushes to their own public repository on any registry the
    vault serves an image manifest that also carries a ``blobs`` list (a field
    of the withdrawn OCI artifact manifest: registries keep unknown fields
    byte-exact and check nothing in them) naming the private layer and the
    private manifest.  Once anyone has pulled the private image through the
    vault, the attacker reads both through the public name.
    """
    corp = rig(auth=True)  # acme/private: only alice, the vault's login
    hub = rig(images=False)
    private = corp.manifest("acme/private", "1.0")
    secret = private.layers()[0]
    own = image({"readme.txt": "nothing to see\n"})
    document = json.loads(own.body)
    document["blobs"] = [secret.descriptor(), private.descriptor()]
    hub.put("evil/pub", Manifest(_canonical(document), OCI_MANIFEST, own.blobs), "1")
    v = vault_factory([oci("corp", "corp.example", corp.url, username=USER, password=PASSWORD),
                       oci("hub", "docker.io", hub.url, default=True)])

    # a legitimate pull of the private image through the vault
    for path in ("/v2/corp.example/acme/private/manifests/1.0", f"/v2/corp.example/acme/private/blobs/{secret.digest}"):
        assert (await raw_get(v.url, path, headers={"Accept": ALL_MANIFESTS}))[0] == 200, path
    assert v.store.lookup(blob_key(secret.digest)) is not None

    # the registry of the public repository has neither
    assert (await raw_get(hub.url, f"/v2/evil/pub/blobs/{secret.digest}"))[0] == 404
    assert (await raw_get(hub.url, f"/v2/evil/pub/manifests/{private.digest}",
                          headers={"Accept": ALL_MANIFESTS}))[0] == 404
    # the attacker, anonymous, through the public name
    assert (await raw_get(v.url, "/v2/evil/pub/manifests/1", headers={"Accept": ALL_MANIFESTS}))[0] == 200
    leaked = []
    status, _, body = await raw_get(v.url, f"/v2/evil/pub/blobs/{secret.digest}")
    if status != 404 or body == secret.read():
        leaked.append(f"the private layer ({status}, {'its bytes' if body == secret.read() else 'no bytes'})")
    status, _, body = await raw_get(v.url, f"/v2/evil/pub/manifests/{private.digest}",
                                    headers={"Accept": ALL_MANIFESTS})
    if status != 404 or body == private.body:
        leaked.append(f"the private manifest ({status}, {'its bytes' if body == private.body else 'no bytes'})")
    assert not leaked, "answered through evil/pub: " + "; ".join(leaked)


def _packages(component: str, count: int) -> bytes:
    stanzas = []
    for j in range(count):
        data = f"{component}-{j}".encode()
        stanzas.append(f"Package: p{j}\nVersion: 1.0\nArchitecture: all\n"
                       f"Filename: pool/{component}/p/p{j}_1.0_all.deb\nSize: {len(data)}\n"
                       f"SHA256: {hashlib.sha256(data).hexdigest()}\nDescription: x\n")
    return "\n".join(stanzas).encode()


@pytest_twisted.ensureDeferred
async def test_apt_made_up_pool_paths_do_not_make_the_vault_reread_every_index(vault_factory, upstream,
                                                                              monkeypatch):
    """
    A pool file that is not cached is checked against the Packages/Sources
    indexes in the cache (`AptBackend.expected`).  For a path no index lists,
    every cached index of every served suite is looked at; their tables are
    kept in an LRU of 8 (`packages.TABLES`), walked in the same order each
    time: with more than 8 indexes in the cache (3 suites x main/contrib/
    non-free x amd64/arm64/source is 27) every such request decompresses and
    parses *all* of them again in the reactor's thread pool.  A Debian-sized
    Packages.xz takes ~1.7 s of CPU to read (measured: 60,000 stanzas, 33 MB),
    so one anonymous request for ``pool/x/junk.deb`` costs ~20 s of CPU with
    12 indexes, and a few per second starve the thread pool (which also runs
    store writes and the upstream connections' name lookups).
    """
    components = [f"c{i}" for i in range(12)]
    listing = []
    for component in components:
        body = _packages(component, 300)
        upstream.add(f"/debian/dists/stable/{component}/binary-amd64/Packages", body)
        listing.append(f" {hashlib.sha256(body).hexdigest()} {len(body)} {component}/binary-amd64/Packages")
    release = "Origin: Test\nSuite: stable\nCodename: stable\nSHA256:\n" + "\n".join(listing) + "\n"
    upstream.add("/debian/dists/stable/InRelease", release.encode())
    v = vault_factory([{"type": "apt", "name": "debian", "config": {"base_url": upstream.url + "/debian"}}])
    reads = []
    read_table = apt_packages.read_table
    monkeypatch.setattr(apt_packages, "read_table", lambda *a: reads.append(a[1]) or read_table(*a))

    # what apt-get update does: the suite's InRelease, then its indexes
    assert (await raw_get(v.url, "/debian/dists/stable/InRelease"))[0] == 200
    for component in components:
        assert (await raw_get(v.url, f"/debian/dists/stable/{component}/binary-amd64/Packages"))[0] == 200
    # the attacker: pool paths that no index lists (upstream has none of them)
    assert (await raw_get(v.url, "/debian/pool/zz/j/junk0_1.0_all.deb"))[0] == 404
    after_first = len(reads)
    for k in range(1, 4):
        assert (await raw_get(v.url, f"/debian/pool/zz/j/junk{k}_1.0_all.deb"))[0] == 404
    assert after_first <= len(components)
    assert len(reads) == after_first, (
        f"3 more made-up pool paths made the vault read {len(reads) - after_first} indexes again "
        f"({len(components)} per request)")


@pytest_twisted.ensureDeferred
async def test_pypi_kept_pages_held_in_memory_are_bounded_in_bytes(vault_factory, upstream, http):
    """
    `freshness.KeptAnswers` keeps up to 20,000 answers in memory, each up to
    256 KiB: a bound in count only, ~5 GiB per backend (pypi pages, OCI tags,
    APT Release files alike), next to pypi's 48 MiB of parsed pages
    (`_Memo`).  On pypi.org thousands of projects have pages of that size;
    an anonymous client that walks them fills the vault's memory.  Here 220
    made-up projects of ~240 KiB each: the kept bodies alone exceed 48 MiB,
    and they grow linearly up to the 20,000th.
    """
    count = 220
    for i in range(count):
        upstream.add(f"/simple/p{i}/", json_page(f"p{i}", bulky_files(f"p{i}", 30)), content_type=PYPI_JSON)
    v = vault_factory(pypi(upstream))
    backend = v.vault.backends[0]
    slots = DeferredSemaphore(8)

    async def page(i):
        response = await http.get(v.url + f"/pypi/simple/p{i}/", headers={"Accept": PYPI_JSON})
        await response.content()
        return response.code

    codes = await gatherResults([slots.run(lambda i=i: ensureDeferred(page(i))) for i in range(count)])
    assert set(codes) == {200}
    held = sum(len(a.body) for a in backend.kept._memory.values())
    budget = pypi_backend.MEMO_BUDGET
    assert held + backend.memo.total <= budget, (
        f"{count} pages: {held / 2**20:.0f} MiB of kept bodies + {backend.memo.total / 2**20:.0f} MiB of parsed "
        f"pages in memory (pypi's budget for page data is {budget / 2**20:.0f} MiB; the kept bodies are bounded "
        f"only by 20,000 x 256 KiB)")


@pytest_twisted.ensureDeferred
async def test_pypi_upstream_pages_read_whole_at_once_are_bounded(vault_factory, upstream, http):
    """
    docs/security.rst: "Upstream answers that are read whole ... at most 4 are
    read at once per backend".  The pypi backend reads each project page whole
    (up to 64 MiB, PAGE_LIMIT, then parses it) outside that bound
    (`PyPIBackend._ask_page` does not use `buffered_slots`): N clients asking
    for N different large projects at once make the vault hold N pages and
    their parses.  (The apt backend reads Release files of up to 16 MiB the
    same way, `ask_release`.)
    """
    count = 10
    for i in range(count):
        upstream.add(f"/simple/p{i}/", b"<a href='p-1.0.tar.gz'>p</a>" + b" " * 100_000, content_type="text/html",
                     hold=True)
    v = vault_factory(pypi(upstream))
    answers = [http.get(v.url + f"/pypi/simple/p{i}/") for i in range(count)]
    await sleep(1.0)
    reading = upstream.in_flight()
    for i in range(count):
        upstream.release(f"/simple/p{i}/")
    for d in answers:
        await (await d).content()
    assert reading <= BUFFERED_AT_ONCE, f"{reading} upstream pages were being read whole at once"


@pytest_twisted.ensureDeferred
async def test_pypi_a_page_larger_than_the_parse_budget_is_not_parsed_and_rendered_per_request(
        vault_factory, upstream, monkeypatch):
    """
    A parsed page is kept in `_Memo` (48 MiB) at 4x its normal form's size.
    A page whose normal form is over 12 MiB (with its renderings, pypi.org's
    own project list ``simple/``, which anyone may ask for) costs more than
    the whole budget: it is evicted as soon as it is made, with every other
    parsed page, and each request parses it and renders it again (a thread's
    worth of CPU for seconds, and every other page's parse lost too).
    """
    upstream.add("/simple/huge/", json_page("huge", bulky_files("huge", 1700)), content_type=PYPI_JSON)
    v = vault_factory(pypi(upstream))
    parses = []
    parsed = pypi_backend._Parsed

    def counting(body):
        parses.append(len(body))
        return parsed(body)

    monkeypatch.setattr(pypi_backend, "_Parsed", counting)
    for _ in range(3):
        status, _, body = await raw_get(v.url, "/pypi/simple/huge/", headers={"Accept": PYPI_JSON})
        assert status == 200 and len(json.loads(body)["files"]) == 1700
    assert parses and parses[0] > 12 * 2**20
    assert len(parses) == 1, f"a page of {parses[0] / 2**20:.1f} MiB was parsed {len(parses)} times for 3 requests"


@pytest_twisted.ensureDeferred
async def test_pypi_a_format_query_outside_latin1_is_a_4xx(vault_factory, upstream):
    """
    ``?format=`` (PEP 691) is decoded as UTF-8 and then encoded as Latin-1
    (`PyPIBackend.form_for`): ``?format=%E2%82%AC`` raises UnicodeEncodeError,
    a 500 and a logged traceback for one anonymous request (the ``logged``
    fixture fails the test on it).
    """
    upstream.add("/simple/foo/", json_page("foo", []), content_type=PYPI_JSON)
    v = vault_factory(pypi(upstream))
    for query in ("format=%E2%82%AC", "format=text/html%E2%80%8B", "format=%F0%9F%90%8D"):
        status, _, _ = await raw_get(v.url, f"/pypi/simple/foo/?{query}")
        assert 400 <= status < 500, (query, status)
    assert upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_pypi_a_head_whose_client_left_leaves_no_failure_in_the_log(vault_factory, upstream):
    """
    A HEAD of a file not cached is answered from the project page
    (`_serve_file_miss`) without checking that the client is still there:
    a client that hangs up while the page is being fetched makes
    ``request.finish()`` raise RuntimeError, logged as an unexpected failure
    (the ``logged`` fixture fails the test on it).  Any anonymous client can
    fill the log with tracebacks (and page whoever watches for them).
    """
    sha = "a" * 64
    files = [{"filename": "foo-1.0.tar.gz", "url": "foo-1.0.tar.gz", "hashes": {"sha256": sha}, "size": 10}]
    upstream.add("/simple/foo/", json_page("foo", files), content_type=PYPI_JSON, delay_headers=0.8)
    v = vault_factory(pypi(upstream))
    request = f"HEAD /pypi/files/foo/{sha}/foo-1.0.tar.gz HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    await wire(v.url, request, hang_up_after=0.2)
    await sleep(1.2)  # the page arrives after the client left
    assert upstream.count("/simple/foo/") == 1


# =============================================================================================
# What held
# =============================================================================================


@pytest_twisted.ensureDeferred
async def test_held_apt_proxy_mode_reaches_only_the_configured_base(vault_factory, upstream, other_origin,
                                                                    logged):
    """
    The vault as an HTTP proxy (absolute-form request lines): hosts, ports,
    schemes, userinfo, IPv6 and numeric spellings of addresses, dot segments
    (plain and encoded), encoded slashes and backslashes, odd schemes,
    CONNECT, and URLs of the vault itself.  Only paths below base_url reach
    the configured mirror, nothing reaches any other host, no answer is 5xx.
    """
    upstream.add("/debian/dists/stable/InRelease", b"Origin: T\nSuite: stable\n")
    other_origin.add("/debian/dists/stable/InRelease", b"other")
    other_origin.add("/etc/passwd", b"root")
    v = vault_factory([{"type": "apt", "name": "debian", "config": {"base_url": upstream.url + "/debian"}}])
    up = upstream.url.split("//")[1]
    host, port = up.split(":")
    other = other_origin.url.split("//")[1]
    vault_port = v.url.rsplit(":", 1)[1]

    async def ask(target, method="GET", host_header=up):
        answer = await wire(v.url, f"{method} {target} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n"
                            .encode("latin-1"))
        return status_of(answer)

    assert await ask(f"http://{up}/debian/dists/stable/InRelease") == 200
    refused = [
        f"http://{other}/debian/dists/stable/InRelease", f"http://{other}/etc/passwd",
        f"http://{host}:{int(port) + 1}/debian/dists/stable/InRelease",
        f"https://{up}/debian/dists/stable/InRelease", f"ftp://{up}/debian/dists/stable/InRelease",
        "file:///etc/passwd", f"gopher://{up}/debian/x", f"http://{up}@{other}/debian/dists/stable/InRelease",
        f"http://{other}#@{up}/debian/dists/stable/InRelease", f"http://{other}\\@{up}/debian/dists/stable/InRelease",
        f"http://[::ffff:{host}]:{port}/debian/dists/stable/InRelease", f"http://[::1]:{port}/debian/x/InRelease",
        f"http://2130706433:{port}/debian/dists/stable/InRelease", f"http://127.1:{port}/debian/dists/stable/InRelease",
        f"http://0x7f000001:{port}/debian/dists/stable/InRelease", f"http://%31%32%37.0.0.1:{port}/debian/x",
        f"http://{up}/debian/%2e%2e/etc/passwd", f"http://{up}/debian/..%2f..%2fetc/passwd",
        f"http://{up}/debian/dists/..%5c..%5cx", f"http://{up}/debian/./../etc/passwd",
        f"http://{up}/debian/dists/stable/InRelease/../../../../etc/passwd", f"http://{up}/DEBIAN/dists/x",
        f"http://{up}/debian%2fdists/stable/InRelease", f"http://{up}/debian//dists/stable/InRelease",
        f"http://{up}:80/debian/dists/stable/InRelease", f"http://{host}:0{port}x/debian/dists/stable/InRelease",
        f"http://{up}/debian/dists/stable/InRelease?x=http://{other}/",
        f"http://{up}/debian/dists/stable/%00InRelease", f"HTTP://{up}/debian/dists/stable/InRelease%23",
        f"http://vault.invalid:{vault_port}/debian/dists/stable/InRelease",
    ]
    for target in refused:
        status = await ask(target)
        assert 400 <= status < 500, (target, status)
    for target in (up, other, f"{host}:{vault_port}"):
        assert await ask(target, "CONNECT") == 403, target
    # the vault itself in absolute form is an ordinary request (its /debian/ prefix: the same mirror)
    assert await ask(f"http://127.0.0.1:{vault_port}/debian/dists/stable/InRelease", host_header="evil") == 200
    assert other_origin.requests == []
    assert {r.path for r in upstream.requests} == {"/debian/dists/stable/InRelease"}
    assert "Unexpected error" not in logged.text()


@pytest_twisted.ensureDeferred
async def test_held_configured_headers_and_registry_credentials_stay_on_their_origin(
        vault_factory, upstream, other_origin, rig, logged):
    """
    apt: the mirror redirects a pool file and an index to another host; oci:
    the registry (token flow, the vault's login) redirects blobs to its CDN.
    The configured header, the login and the bearer token reach only the
    mirror's / registry's origin (and the login only the token realm), never
    the redirect target, and appear in no answer and no log line.
    """
    upstream.redirect("/debian/pool/main/a/a_1.0_all.deb", other_origin.url + "/a_1.0_all.deb", 302)
    upstream.redirect("/debian/dists/stable/main/i18n/Translation-en", other_origin.url + "/Translation-en", 307)
    other_origin.add("/a_1.0_all.deb", b"deb bytes")
    other_origin.add("/Translation-en", b"Package: a\n")
    reg = rig(auth=True, cdn_redirect=True)
    v = vault_factory([
        {"type": "apt", "name": "debian", "config": {"base_url": upstream.url + "/debian",
                                                     "headers": {"X-Mirror-Key": SECRET}}},
        oci("hub", "docker.io", reg.url, default=True, username=USER, password=PASSWORD,
            headers={"X-Registry-Key": SECRET})])
    answers = [await raw_get(v.url, "/debian/pool/main/a/a_1.0_all.deb"),
               await raw_get(v.url, "/debian/dists/stable/main/i18n/Translation-en")]
    assert [a[0] for a in answers] == [200, 200]
    private = reg.manifest("acme/private", "1.0")
    answers.append(await raw_get(v.url, "/v2/acme/private/manifests/1.0", headers={"Accept": ALL_MANIFESTS}))
    for blob in private.blobs:
        answers.append(await raw_get(v.url, f"/v2/acme/private/blobs/{blob.digest}"))
    assert [a[0] for a in answers[2:]] == [200] * (1 + len(private.blobs))
    assert all(r.headers.get("x-mirror-key") == SECRET for r in upstream.requests)
    assert other_origin.requests and all("x-mirror-key" not in r.headers for r in other_origin.requests)
    cdn = reg.requests_to("cdn")
    assert cdn and not reg.cdn_authorization_seen
    assert all("x-registry-key" not in r["headers"] for r in cdn + reg.requests_to("token"))
    login = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    tokens = [r["headers"]["authorization"].split()[1] for r in reg.requests_to("registry")
              if r["headers"].get("authorization", "").startswith("Bearer ")]
    assert tokens
    everything = repr(answers) + logged.text()
    for secret in [SECRET, login, PASSWORD] + tokens:
        assert secret not in everything


@pytest_twisted.ensureDeferred
async def test_held_pypi_fetches_only_what_a_page_names_and_keeps_only_verified_files(vault_factory, upstream,
                                                                                     other_origin, logged):
    """
    File URLs no page named (another id, another project's file, another
    spelling of the project, a page of another origin), and a file whose
    bytes do not match the page's sha256: no request upstream for the first,
    nothing kept for the second, and its next request tries again.
    """
    good = b"good bytes"
    sha = hashlib.sha256(good).hexdigest()
    upstream.add("/simple/foo/", json_page("foo", [
        {"filename": "foo-1.0.tar.gz", "url": "/packages/foo-1.0.tar.gz", "hashes": {"sha256": sha}},
        {"filename": "foo-2.0.tar.gz", "url": other_origin.url + "/foo-2.0.tar.gz",
         "hashes": {"sha256": hashlib.sha256(b"2").hexdigest()}}]), content_type=PYPI_JSON)
    upstream.add("/simple/bar/", json_page("bar", []), content_type=PYPI_JSON)
    upstream.add("/packages/foo-1.0.tar.gz", b"evil bytes")  # not what the page says
    other_origin.add("/foo-2.0.tar.gz", b"not 2 either")
    v = vault_factory(pypi(upstream, headers={"X-Index-Key": SECRET}))
    assert (await raw_get(v.url, "/pypi/simple/foo/"))[0] == 200
    made_up = [f"/pypi/files/foo/{'b' * 64}/foo-1.0.tar.gz", f"/pypi/files/bar/{sha}/foo-1.0.tar.gz",
               f"/pypi/files/Foo/{sha}/foo-1.0.tar.gz", f"/pypi/files/foo/{sha}/foo-3.0.tar.gz",
               f"/pypi/files/foo/url-{'0' * 32}/foo-1.0.tar.gz", f"/pypi/files/foo/{sha}/..%2f..%2fsimple%2ffoo",
               f"/pypi/files/foo/{sha}/foo-1.0.tar.gz?u=http://{other_origin.url.split('//')[1]}/",
               f"/pypi/simple/foo/?format=http://{other_origin.url.split('//')[1]}/"]
    for path in made_up:
        status = (await raw_get(v.url, path))[0]
        assert 400 <= status < 500, (path, status)
    assert {r.path for r in upstream.requests} == {"/simple/foo/", "/simple/bar/"}
    assert other_origin.requests == []
    for _ in range(2):  # a 502, or a cut connection once streaming started: never a clean wrong body
        try:
            status, _, body = await raw_get(v.url, f"/pypi/files/foo/{sha}/foo-1.0.tar.gz")
        except (ConnectionError, http.client.IncompleteRead):
            continue
        assert status == 502 and b"evil" not in body
    assert upstream.count("/packages/foo-1.0.tar.gz") == 2
    assert v.store.lookup(f"pypi/files/foo/{sha}/foo-1.0.tar.gz") is None
    try:
        status = (await raw_get(v.url, f"/pypi/files/foo/{hashlib.sha256(b'2').hexdigest()}/foo-2.0.tar.gz"))[0]
        assert status == 502
    except (ConnectionError, http.client.IncompleteRead):
        pass
    assert other_origin.requests and all("x-index-key" not in r.headers for r in other_origin.requests)


@pytest_twisted.ensureDeferred
async def test_held_pypi_an_answer_for_one_accept_or_encoding_is_not_given_to_another(vault_factory, upstream):
    """
    pip (JSON), a browser (HTML), a gzip client and an If-None-Match carrying
    another form's ETag, in turns on one kept page: each gets its own form,
    gzip only when it asked, never a 304 for another form.
    """
    upstream.add("/simple/foo/", json_page("foo", bulky_files("foo", 12, 500)), content_type=PYPI_JSON)
    v = vault_factory(pypi(upstream))
    seen = {}
    for _ in range(2):
        for accept, gz in ((PYPI_JSON, "gzip"), ("text/html", None), (PYPI_JSON, None), ("text/html", "gzip"),
                           ("application/vnd.pypi.simple.v1+html", None)):
            headers = {"Accept": accept, **({"Accept-Encoding": gz} if gz else {})}
            status, h, body = await raw_get(v.url, "/pypi/simple/foo/", headers=headers)
            assert status == 200 and h.get("Vary") == "Accept, Accept-Encoding"
            assert (h.get("Content-Encoding") == "gzip") == (gz is not None)
            if gz:
                import gzip
                body = gzip.decompress(body)
            assert body.startswith(b"{") == (accept == PYPI_JSON), (accept, body[:40])
            seen.setdefault((accept, gz), set()).add(h["ETag"])
    assert all(len(tags) == 1 for tags in seen.values())
    assert len({next(iter(seen[(PYPI_JSON, gz)])) for gz in ("gzip", None)}
               | {next(iter(seen[("text/html", gz)])) for gz in ("gzip", None)}) == 4
    json_etag = next(iter(seen[(PYPI_JSON, None)]))
    status, _, body = await raw_get(v.url, "/pypi/simple/foo/", headers={"Accept": "text/html",
                                                                         "If-None-Match": json_etag})
    assert status == 200 and body.startswith(b"<!DOCTYPE html>")
    assert upstream.count("/simple/foo/") == 1


@pytest_twisted.ensureDeferred
async def test_held_oci_tags_registries_and_accept(vault_factory, rig):
    """
    A tag of one registry asked through another registry's name, ``?ns=`` and
    prefix; a private repository's tag without the vault's login; an index
    given to a client that takes only Docker schema2; made-up tags, digests
    and Accept values leave no kept answer.
    """
    corp = rig(auth=True)
    hub = rig(images=False)
    multi = hub.put("library/multi", index([image({"a": "amd64\n"}), image({"a": "arm64\n"}, architecture="arm64")]),
                    "1.0")
    hub.put("library/small", image({"a": "small\n"}), "1.0")
    v = vault_factory([oci("corp", "corp.example", corp.url, username=USER, password=PASSWORD),
                       oci("hub", "docker.io", hub.url, default=True)])
    private = corp.manifest("acme/private", "1.0")
    status, headers, body = await raw_get(v.url, "/v2/corp.example/acme/private/manifests/1.0",
                                          headers={"Accept": ALL_MANIFESTS})
    assert status == 200 and body == private.body
    for path in ("/v2/acme/private/manifests/1.0", "/v2/acme/private/manifests/1.0?ns=docker.io",
                 "/hub/v2/acme/private/manifests/1.0", f"/v2/acme/private/manifests/{private.digest}",
                 f"/v2/acme/private/blobs/{private.layers()[0].digest}"):
        status, _, body = await raw_get(v.url, path, headers={"Accept": ALL_MANIFESTS})
        assert status in (401, 404) and private.body not in body, (path, status)
    status, headers, body = await raw_get(v.url, "/v2/library/multi/manifests/1.0",
                                          headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    assert status == 404 and body != multi.body
    status, headers, body = await raw_get(v.url, "/v2/library/multi/manifests/1.0",
                                          headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert status == 200 and headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"
    assert body == multi.child("amd64").body
    await v.store.settled()
    before = set(_files(v))
    for i in range(20):
        await raw_get(v.url, f"/v2/library/small/manifests/junk-{i}", headers={"Accept": f"x/y{i}"})
        await raw_get(v.url, f"/v2/library/small/blobs/sha256:{i:064x}")
        await raw_get(v.url, f"/v2/nosuch{i}/tags/list?n=5&last=t{i}")
    await v.store.settled()
    assert set(_files(v)) == before


def _files(v):
    import os

    root = v.config.cache_dir
    return [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
            if not f.endswith(".vault-tmp")]


@pytest_twisted.ensureDeferred
async def test_held_tls_hellos_huge_headers_and_pipelines_do_not_wedge_the_vault(vault_factory, upstream):
    """
    A TLS ClientHello (whole, cut after its first byte, after an HTTP
    request), 400 headers of 100 bytes, an Accept of 16 KB, a Basic header
    that is no base64, and a pipeline of ten requests with a bad one in the
    middle: each gets an answer or a close, and the vault answers the next
    client at once.
    """
    upstream.add("/simple/foo/", json_page("foo", []), content_type=PYPI_JSON)
    v = vault_factory(pypi(upstream), access_tokens=["vault-token-1"])
    hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 160
    answer = await wire(v.url, hello)
    assert answer.startswith(b"HTTP/1.0 400")
    assert (await wire(v.url, b"\x16", timeout=2)).startswith(b"HTTP/1.0 400")
    auth = "Basic " + base64.b64encode(b"u:vault-token-1").decode()
    get = f"GET /pypi/simple/foo/ HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\n"
    answer = await wire(v.url, (get + "\r\n").encode() + hello, timeout=2)
    assert answer.startswith(b"HTTP/1.1 200")
    many = "".join(f"X-H{i}: {'a' * 90}\r\n" for i in range(400))
    assert status_of(await wire(v.url, (get + many + "Connection: close\r\n\r\n").encode(), timeout=3)) in (0, 400,
                                                                                                             431)
    accept = "Accept: " + ",".join(f"a/b{i};q=0.{i % 10}" for i in range(1500)) + "\r\n"
    status = status_of(await wire(v.url, (get + accept + "Connection: close\r\n\r\n").encode(), timeout=3))
    assert status in (0, 200, 400, 406, 431)
    bad_auth = "GET /pypi/simple/foo/ HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic \xff\xfe==\r\n\r\n"
    pipeline = (get + "\r\n") * 4 + bad_auth + (get + "\r\n") * 4 + get + "Connection: close\r\n\r\n"
    answer = await wire(v.url, pipeline.encode("latin-1"), timeout=5)
    codes = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]
    assert codes == [200] * 4 + [401] + [200] * 5, codes
    assert (await raw_get(v.url, "/pypi/simple/foo/", headers={"X-Vault-Token": "vault-token-1"}))[0] == 200


@pytest_twisted.ensureDeferred
async def test_oci_page_sizes_a_client_makes_up_do_not_each_leave_kept_tag_lists(vault_factory, rig):
    """
    docs/oci.rst: "The first page and the pages whose links the vault handed
    out are kept; made-up pages are relayed only."  But the vault hands out
    the link upstream gives for *any* page a client asks for: ``?n=<any of
    999,999 values>`` is relayed, and the next page it links to -- ``n`` and
    ``last`` as the client chose them, in effect -- is then kept on disk, as
    is each page after it.  For a repository of T tags a client leaves about
    T*ln(T) records (here 12 tags: 11 page sizes), for every public
    repository of the registry, each evicting real content under
    ``max_cache_size``.
    """
    hub = rig(images=False)
    one = image({"a": "a\n"})
    hub.put("acme/many", one, *[f"t{i:02d}" for i in range(12)])
    v = vault_factory([oci("hub", "docker.io", hub.url, default=True)])
    assert (await raw_get(v.url, "/v2/acme/many/tags/list"))[0] == 200  # what a client does: one page
    for n in range(1, 12):
        target = f"/v2/acme/many/tags/list?n={n}"
        for _ in range(3):  # follow the link given, a few pages
            status, headers, _ = await raw_get(v.url, target)
            assert status == 200
            link = headers.get("Link")
            if not link:
                break
            target = link[1:link.index(">")]
    await v.store.settled()
    kept = [f for f in _files(v) if "/_tags-list/" in f and not f.endswith(".vault-meta")]
    assert len(kept) <= 2, f"{len(kept)} tag-list pages of one repository kept for made-up page sizes"
