"""
The apt backend with the real apt-get (tests/aptenv.py, private state, as
root) through a real vault on 127.0.0.1, in both client modes: mirror
rewriting (sources.list names the vault) and the vault as apt's HTTP proxy
(Acquire::http::Proxy, absolute-form requests); the fake signed mirror of
tests/fakeapt.py upstream, with and without Acquire-By-Hash.

Most tests run the vault, the mirror and apt-get's processes in this test's
reactor (apt-get as child processes, so any number run at once); one runs the
real twistd daemon and the standalone mirror.
"""

import hashlib
import os
import socket
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.internet.defer import gatherResults

from tests.aptenv import AptClient, errors, fetch, mirror_process, skip_unless_apt
from tests.fakeapt import AptMirror, AptRepo
from tests.hfenv import vault_process

SYNC_ERRORS = ("Hash Sum mismatch", "Mirror sync in progress", "unexpected size")
UNKNOWN_HOST = "deb.vault-test.invalid"


@pytest.fixture(autouse=True)
def apt_tools():
    skip_unless_apt()


@pytest.fixture
def rig(tmp_path):
    """make(by_hash=False) -> (repo, mirror): a signed repository served in this reactor."""
    made = []

    def make(by_hash=False):
        repo = AptRepo(tmp_path / f"repo{len(made)}", by_hash=by_hash).build()
        mirror = AptMirror(repo).listen()
        made.append((repo, mirror))
        return repo, mirror

    yield make
    for repo, mirror in made:
        pytest_twisted.blockon(mirror.close())
        repo.close()


def start_vault(vault_factory, mirror, **options):
    config = {"base_url": mirror.url, "index_ttl": 60, "offline_timeout": 1, **options}
    return vault_factory([{"type": "apt", "name": "debian", "config": config}])


def rewrite_line(vault, suite="bookworm"):
    return f"deb {vault.url}/debian {suite} main"


def proxy_line(mirror, suite="bookworm"):
    return f"deb {mirror.url} {suite} main"


def upstream(mirror, ending=""):
    return [(r["path"].split("/debian/", 1)[-1], r["status"]) for r in mirror.requests if r["path"].endswith(ending)]


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def assert_ok(result):
    rc, out = result
    assert rc == 0 and errors(out) == [], out
    return out


def check_debs(client, repo, names):
    assert client.debs() == sorted(f"{n}_{repo.versions[n]}_all.deb" for n in names)
    packages = repo.packages()
    for n in names:
        assert sha256_of(os.path.join(client.archives, f"{n}_{repo.versions[n]}_all.deb")) == packages[n]["sha256"]


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


def cache_files(vault):
    root = vault.config.cache_dir
    out = []
    for folder, dirs, files in os.walk(root):
        if folder == root and ".locks" in dirs:
            dirs.remove(".locks")
        out += [os.path.relpath(os.path.join(folder, f), root) for f in files]
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# both client modes, one cache


@pytest.mark.parametrize("by_hash", [False, True], ids=["plain", "by-hash"])
@pytest_twisted.inlineCallbacks
def test_update_and_install_in_both_modes_share_one_cache(tmp_path, rig, vault_factory, by_hash):
    repo, mirror = rig(by_hash)
    vault = start_vault(vault_factory, mirror)

    first = AptClient(tmp_path / "first", repo.keyring)
    assert_ok((yield first.update_async(rewrite_line(vault))))
    assert_ok((yield first.install_async(["vault-hello"])))
    check_debs(first, repo, ["vault-hello", "vault-lib"])
    fetched = upstream(mirror)
    assert all(status == 200 for _, status in fetched), fetched
    assert len({path for path, _ in fetched}) == len(fetched)  # each file once
    assert sum(path.endswith(".deb") for path, _ in fetched) == 2
    indexes = [p for p, _ in fetched if "binary-amd64" in p]
    assert indexes and all(("/by-hash/SHA256/" in p) == by_hash for p in indexes), indexes

    # the same packages as a proxy: nothing new upstream, not even a revalidation (within index_ttl)
    proxied = AptClient(tmp_path / "proxied", repo.keyring)
    assert_ok((yield proxied.update_async(proxy_line(mirror), proxy=vault.url)))
    assert_ok((yield proxied.install_async(["vault-hello"])))
    check_debs(proxied, repo, ["vault-hello", "vault-lib"])
    assert upstream(mirror) == fetched

    # apt's own If-Modified-Since on InRelease: the vault answers 304 itself
    out = assert_ok((yield first.update_async(rewrite_line(vault))))
    assert "Hit:1" in out and upstream(mirror) == fetched

    # a package nobody fetched yet: one GET upstream, the .deb alone
    out = assert_ok((yield proxied.download_async(["vault-extra"], dest=tmp_path / "dl")))
    assert os.listdir(tmp_path / "dl") == ["vault-extra_1.0_all.deb"]
    assert upstream(mirror)[len(fetched):] == [("pool/main/v/vault-extra/vault-extra_1.0_all.deb", 200)]


@pytest_twisted.inlineCallbacks
def test_ten_concurrent_clients_cost_one_upstream_get_per_file(tmp_path, rig, vault_factory):
    repo, mirror = rig()
    mirror.set_mode(throttle_bps=400_000)  # the downloads overlap
    vault = start_vault(vault_factory, mirror)
    clients = [AptClient(tmp_path / f"c{i}", repo.keyring) for i in range(10)]
    results = yield gatherResults([c.update_async(rewrite_line(vault) if i % 2 else proxy_line(mirror),
                                                  proxy=None if i % 2 else vault.url)
                                   for i, c in enumerate(clients)])
    for result in results:
        assert_ok(result)
    names = ["vault-extra", "vault-hello", "vault-lib"]
    results = yield gatherResults([c.download_async(names, dest=tmp_path / f"dl{i}") for i, c in enumerate(clients)])
    for result in results:
        assert_ok(result)
    packages = repo.packages()
    for i in range(10):
        for n in names:
            assert sha256_of(tmp_path / f"dl{i}" / f"{n}_1.0_all.deb") == packages[n]["sha256"]
    counts = {}
    for path, status in upstream(mirror):
        counts[path] = counts.get(path, 0) + 1
    assert counts == {"dists/bookworm/InRelease": 1, "dists/bookworm/main/binary-amd64/Packages.xz": 1,
                      "dists/bookworm/main/i18n/Translation-en.xz": 1,
                      **{packages[n]["filename"]: 1 for n in names}}, counts


@pytest_twisted.inlineCallbacks
def test_pipelined_requests_are_answered_in_order(tmp_path, rig, vault_factory):
    repo, mirror = rig()
    vault = start_vault(vault_factory, mirror)
    client = AptClient(tmp_path / "apt", repo.keyring)
    assert_ok((yield client.update_async(rewrite_line(vault))))
    assert_ok((yield client.install_async(["vault-hello", "vault-extra"])))  # warm: hits answer at once
    names = [repo.packages()[n]["filename"] for n in ("vault-extra", "vault-hello", "vault-lib")]
    # three requests in one write, as apt pipelines them; the answers come back whole and in order
    port = int(vault.url.rsplit(":", 1)[1])
    wire = b"".join(b"GET /debian/%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % n.encode() for n in names)
    answer = yield threads.deferToThread(_raw, port, wire, 3)
    bodies = _split_responses(answer)
    assert [status for status, _ in bodies] == [200, 200, 200]
    assert [hashlib.sha256(body).hexdigest() for _, body in bodies] == [
        repo.packages()[n]["sha256"] for n in ("vault-extra", "vault-hello", "vault-lib")]


@pytest_twisted.inlineCallbacks
def test_a_cut_download_is_resumed_with_range_and_if_range(tmp_path, rig, vault_factory, logged):
    repo, mirror = rig()
    vault = start_vault(vault_factory, mirror)
    client = AptClient(tmp_path / "apt", repo.keyring)
    assert_ok((yield client.update_async(rewrite_line(vault))))
    mirror.set_mode(mode="cut", paths="*.deb", cut_after_bytes=5000)
    rc, out = yield client.install_async(["vault-extra"])
    assert rc != 0 and errors(out), out
    partial = client.partials().get("vault-extra_1.0_all.deb")
    assert partial and partial <= 5000, client.partials()
    assert not any(f.endswith(".deb") for f in cache_files(vault))  # a cut download is not kept
    mirror.set_mode(mode="normal")
    assert_ok((yield client.install_async(["vault-extra"])))
    check_debs(client, repo, ["vault-extra"])
    resumed = [m for m in logged.messages() if "vault-extra_1.0_all.deb HTTP/1.1\" 206" in m]
    assert resumed, logged.text()[-3000:]


@pytest_twisted.inlineCallbacks
def test_a_deb_that_does_not_match_packages_is_refused_and_not_kept(tmp_path, rig, vault_factory, logged):
    repo, mirror = rig()
    vault = start_vault(vault_factory, mirror)
    client = AptClient(tmp_path / "apt", repo.keyring)
    assert_ok((yield client.update_async(rewrite_line(vault))))
    mirror.set_mode(mode="corrupt")  # same size, one byte flipped: only the sha256 tells
    rc, out = yield client.install_async(["vault-extra"])
    # streamed as it came, then cut before its last byte when the check failed: never a whole wrong file
    assert rc != 0 and any("vault-extra_1.0_all.deb" in line for line in errors(out)), out
    assert client.debs() == []
    assert "sha256 of debian/pool/main/v/vault-extra/vault-extra_1.0_all.deb" in logged.text()
    assert not any(f.endswith(".deb") for f in cache_files(vault))
    mirror.set_mode(mode="normal")
    # apt resumes the partial file it kept (all but the last byte of the bad download) and finds the
    # mismatch itself, dropping it; the next run fetches the good file
    rc, out = yield client.install_async(["vault-extra"])
    if rc != 0:
        assert "Hash Sum mismatch" in out, out
        assert_ok((yield client.install_async(["vault-extra"])))
    check_debs(client, repo, ["vault-extra"])


# ---------------------------------------------------------------------------------------------
# offline


@pytest.mark.parametrize("failure", ["stopped", "down5xx", "hang"])
@pytest_twisted.inlineCallbacks
def test_update_and_install_work_with_the_mirror_down(tmp_path, rig, vault_factory, logged, failure):
    repo, mirror = rig()
    vault = start_vault(vault_factory, mirror, index_ttl=0.5)
    first = AptClient(tmp_path / "first", repo.keyring)
    assert_ok((yield first.update_async(rewrite_line(vault))))
    assert_ok((yield first.install_async(["vault-hello"])))
    if failure == "stopped":
        yield mirror.close()
    else:
        mirror.set_mode(mode=failure)
    yield sleep(0.6)  # past index_ttl: the vault asks the mirror again, and it fails
    later = AptClient(tmp_path / "later", repo.keyring)
    assert_ok((yield later.update_async(proxy_line(mirror), proxy=vault.url)))
    assert_ok((yield later.install_async(["vault-hello"])))
    check_debs(later, repo, ["vault-hello", "vault-lib"])
    assert_ok((yield first.update_async(rewrite_line(vault))))
    assert "from the cache" in logged.text()


@pytest.mark.parametrize("failure", ["stopped", "down5xx", "hang"])
@pytest_twisted.inlineCallbacks
def test_nothing_cached_and_the_mirror_down_is_a_gateway_error(rig, vault_factory, failure):
    repo, mirror = rig()
    vault = start_vault(vault_factory, mirror, timeout=1)
    if failure == "stopped":
        yield mirror.close()
    else:
        mirror.set_mode(mode=failure)
    for path in ("dists/bookworm/InRelease", "dists/bookworm/main/binary-amd64/Packages.xz",
                 "pool/main/v/vault-lib/vault-lib_1.0_all.deb"):
        status, _, body = yield threads.deferToThread(fetch, "GET", f"{vault.url}/debian/{path}")
        assert status == (504 if failure == "hang" else 502), (path, status, body)
    assert cache_files(vault) == []


# ---------------------------------------------------------------------------------------------
# a new version upstream, and the mirror sync window


@pytest.mark.parametrize("by_hash", [False, True], ids=["plain", "by-hash"])
@pytest_twisted.inlineCallbacks
def test_a_new_version_is_seen_after_index_ttl_without_hash_mismatch(tmp_path, rig, vault_factory, logged, by_hash):
    repo, mirror = rig(by_hash)
    ttl = 0.5
    vault = start_vault(vault_factory, mirror, index_ttl=ttl)
    old = AptClient(tmp_path / "old", repo.keyring)
    assert_ok((yield old.update_async(rewrite_line(vault))))
    assert old.candidate("vault-hello") == "1.0"

    def no_sync_errors(result):
        assert not any(e in result[1] for e in SYNC_ERRORS), result[1]
        return assert_ok(result)

    # a real mirror's order, stopped before Release/InRelease: the new Packages beside the old InRelease
    repo.publish("vault-hello", "1.1", order="mirror", stop_after="indexes")
    yield sleep(ttl + 0.1)
    newcomer = AptClient(tmp_path / "newcomer", repo.keyring)
    no_sync_errors((yield newcomer.update_async(rewrite_line(vault))))
    assert newcomer.candidate("vault-hello") == "1.0"  # the old set, whole
    no_sync_errors((yield old.update_async(proxy_line(mirror), proxy=vault.url)))
    repo.finish()
    yield sleep(ttl + 0.1)
    no_sync_errors((yield newcomer.update_async(rewrite_line(vault))))
    assert newcomer.candidate("vault-hello") == "1.1"
    assert_ok((yield newcomer.install_async(["vault-hello"])))
    check_debs(newcomer, repo, ["vault-hello", "vault-lib"])

    # swapped: the new InRelease first, the Packages it names still the old ones
    repo.publish("vault-hello", "1.2", order="swapped", stop_after="inrelease")
    yield sleep(ttl + 0.1)
    third = AptClient(tmp_path / "third", repo.keyring)
    no_sync_errors((yield third.update_async(rewrite_line(vault))))
    assert third.candidate("vault-hello") == "1.1"  # the vault kept the consistent set
    no_sync_errors((yield newcomer.update_async(proxy_line(mirror), proxy=vault.url)))
    assert "a mirror sync in progress?" in logged.text()
    repo.finish()
    yield sleep(ttl + 0.1)
    for client in (third, newcomer, old):
        no_sync_errors((yield client.update_async(rewrite_line(vault))))
        assert client.candidate("vault-hello") == "1.2"
    assert_ok((yield third.install_async(["vault-hello"])))
    check_debs(third, repo, ["vault-hello", "vault-lib"])
    # one InRelease request upstream per update at most (nine updates above), none within index_ttl
    asked = [p for p, _ in upstream(mirror, "/InRelease")]
    assert len(asked) <= 9, asked


@pytest_twisted.inlineCallbacks
def test_a_repository_without_inrelease_uses_release_and_its_signature(tmp_path, rig, vault_factory):
    repo, mirror = rig()
    os.remove(repo.dists("InRelease"))
    vault = start_vault(vault_factory, mirror, index_ttl=0.5)
    client = AptClient(tmp_path / "apt", repo.keyring)
    out = assert_ok((yield client.update_async(rewrite_line(vault))))
    assert "Release.gpg" in out or "Release" in out
    assert_ok((yield client.install_async(["vault-hello"])))
    check_debs(client, repo, ["vault-hello", "vault-lib"])
    # a new Release comes with its new signature, never beside the old one
    repo.publish("vault-hello", "1.1")
    os.remove(repo.dists("InRelease"))
    yield sleep(0.6)
    other = AptClient(tmp_path / "other", repo.keyring)
    assert_ok((yield other.update_async(proxy_line(mirror), proxy=vault.url)))
    assert other.candidate("vault-hello") == "1.1"
    assert_ok((yield client.update_async(rewrite_line(vault))))
    assert client.candidate("vault-hello") == "1.1"


@pytest_twisted.inlineCallbacks
def test_a_flat_repository(tmp_path, rig, vault_factory):
    repo, mirror = rig()
    flat = repo.add_flat()
    vault = vault_factory([{"type": "apt", "name": "vendor",
                            "config": {"base_url": mirror.origin + flat, "index_ttl": 60}}])
    client = AptClient(tmp_path / "apt", repo.keyring)
    assert_ok((yield client.update_async(f"deb {vault.url}/vendor ./")))  # apt asks for /vendor/./InRelease
    assert_ok((yield client.install_async(["vault-hello"])))
    check_debs(client, repo, ["vault-hello", "vault-lib"])
    proxied = AptClient(tmp_path / "proxied", repo.keyring)
    assert_ok((yield proxied.update_async(f"deb {mirror.origin}{flat} ./", proxy=vault.url)))
    assert_ok((yield proxied.install_async(["vault-hello"])))
    assert sorted(p for p, _ in upstream(mirror)) == sorted(
        f"{flat}/{name}" for name in ("InRelease", "Packages.xz", "vault-hello_1.0_all.deb", "vault-lib_1.0_all.deb"))


@pytest_twisted.inlineCallbacks
def test_inrelease_answers_conditional_and_range_requests(rig, vault_factory):
    repo, mirror = rig()
    vault = start_vault(vault_factory, mirror)
    url = f"{vault.url}/debian/dists/bookworm/InRelease"
    status, headers, body = yield threads.deferToThread(fetch, "GET", url)
    assert status == 200 and body == open(repo.dists("InRelease"), "rb").read()
    lm = headers["last-modified"]
    assert (yield threads.deferToThread(fetch, "GET", url, {"If-Modified-Since": lm}))[0] == 304
    # apt resumes a partial InRelease from lists/partial: 206, or 416 when it has it all
    status, headers, part = yield threads.deferToThread(fetch, "GET", url, {"Range": "bytes=100-", "If-Range": lm})
    assert status == 206 and part == body[100:] and headers["content-range"] == f"bytes 100-{len(body) - 1}/{len(body)}"
    status, _, _ = yield threads.deferToThread(fetch, "GET", url, {"Range": f"bytes={len(body)}-", "If-Range": lm})
    assert status == 416
    status, _, whole = yield threads.deferToThread(fetch, "GET", url, {"Range": "bytes=100-", "If-Range": "x"})
    assert status == 200 and whole == body
    status, headers, empty = yield threads.deferToThread(fetch, "HEAD", url)
    assert status == 200 and empty == b"" and int(headers["content-length"]) == len(body)
    assert [p for p, _ in upstream(mirror)] == ["dists/bookworm/InRelease"]


# ---------------------------------------------------------------------------------------------
# mutable files no Release lists: kept files with a TTL


@pytest_twisted.inlineCallbacks
def test_an_unlisted_file_under_dists_is_kept_revalidated_and_served_stale(rig, vault_factory, logged):
    repo, mirror = rig()
    path = os.path.join(repo.archive, "dists", "bookworm", "ChangeLog")
    with open(path, "wb") as f:
        f.write(b"first\n" * 1000)
    os.utime(path, (1_700_000_000, 1_700_000_000))
    vault = start_vault(vault_factory, mirror, index_ttl=0.5)
    url = f"{vault.url}/debian/dists/bookworm/ChangeLog"

    def get(headers=None):
        return threads.deferToThread(fetch, "GET", url, headers or {"Cache-Control": "max-age=0"})

    status, headers, body = yield get()
    assert status == 200 and body == b"first\n" * 1000
    assert (yield get())[2] == body  # within index_ttl: no request upstream
    assert upstream(mirror, "ChangeLog") == [("dists/bookworm/ChangeLog", 200)]
    assert (yield get({"If-Modified-Since": headers["last-modified"]}))[0] == 304  # the client's own
    yield sleep(0.6)
    assert (yield get())[2] == body  # revalidated: 304 upstream
    assert upstream(mirror, "ChangeLog")[-1] == ("dists/bookworm/ChangeLog", 304)
    with open(path, "wb") as f:
        f.write(b"second\n")
    yield sleep(0.6)
    assert (yield get())[2] == b"second\n"
    os.remove(path)
    yield sleep(0.6)
    assert (yield get())[0] == 404  # gone upstream: gone here
    assert "debian/dists/bookworm/ChangeLog" not in cache_files(vault)
    with open(path, "wb") as f:
        f.write(b"third\n")
    assert (yield get())[2] == b"third\n"
    mirror.set_mode(mode="down5xx")
    yield sleep(0.6)
    assert (yield get())[2] == b"third\n"  # the mirror fails: the kept copy, logged
    assert "Answering dists/bookworm/ChangeLog from the cache" in logged.text()


# ---------------------------------------------------------------------------------------------
# proxy mode: only the configured upstreams


@pytest_twisted.inlineCallbacks
def test_proxy_mode_serves_only_configured_upstreams(tmp_path, rig, vault_factory):
    repo, mirror = rig()
    vault = start_vault(vault_factory, mirror)
    client = AptClient(tmp_path / "apt", repo.keyring)
    rc, out = yield client.update_async(f"deb http://{UNKNOWN_HOST}/debian bookworm main", proxy=vault.url)
    assert any("403" in line for line in errors(out)), out
    assert mirror.requests == [] and cache_files(vault) == []

    port = int(vault.url.rsplit(":", 1)[1])
    host, mport = mirror.origin[len("http://"):].split(":")
    inrelease = "/debian/dists/bookworm/InRelease"

    def ask(target, method="GET", extra=""):
        wire = f"{method} {target} HTTP/1.1\r\nHost: {host}:{mport}\r\n{extra}Connection: close\r\n\r\n"
        return threads.deferToThread(_raw, port, wire.encode(), 1).addCallback(lambda data: _split_responses(data)[0])

    # served: the configured base_url, scheme and host in any case
    for target in (f"http://{host}:{mport}{inrelease}", f"HTTP://{host.upper()}:{mport}{inrelease}"):
        status, body = yield ask(target)
        assert status == 200 and body.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----"), target
    # refused: other hosts, ports, schemes, sibling paths, and tunnels
    for target in (f"http://{UNKNOWN_HOST}{inrelease}", f"http://{host}:{int(mport) + 1}{inrelease}",
                   f"https://{host}:{mport}{inrelease}", f"http://{host}:{mport}/debian-security/dists/x/InRelease",
                   f"http://{host}:{mport}/debian", f"http://{host}:{mport}/"):
        assert (yield ask(target))[0] == 403, target
    assert (yield ask(f"{UNKNOWN_HOST}:443", "CONNECT"))[0] == 403
    assert (yield ask(f"{host}:{mport}", "CONNECT"))[0] == 403
    assert (yield ask(f"http://user:pw@{host}:{mport}{inrelease}"))[0] == 400
    assert (yield ask(f"http://{host}:{mport}/debian/../../etc/passwd"))[0] == 400
    # an absolute URL of the vault itself is an ordinary request
    status, body = yield ask(f"http://127.0.0.1:{port}{inrelease}")
    assert status == 200 and body.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----")
    assert [p for p, _ in upstream(mirror)] == ["dists/bookworm/InRelease"]


@pytest_twisted.inlineCallbacks
def test_access_tokens_in_both_modes(tmp_path, rig, vault_factory):
    repo, mirror = rig()
    token = "apt-token-0123456789"
    vault_factory_config = {"base_url": mirror.url, "index_ttl": 60}
    vault = vault_factory([{"type": "apt", "name": "debian", "config": vault_factory_config}],
                          access_tokens=[token])
    port = vault.url.rsplit(":", 1)[1]
    client = AptClient(tmp_path / "apt", repo.keyring)
    rc, out = yield client.update_async(proxy_line(mirror), proxy=vault.url)
    assert any("407" in line for line in errors(out)), out
    rc, out = yield client.update_async(rewrite_line(vault))
    assert any("401" in line for line in errors(out)), out
    assert mirror.requests == []
    # apt's credentials: in the proxy URL, and in the sources.list URL (auth.conf works the same)
    assert_ok((yield client.update_async(proxy_line(mirror), proxy=f"http://apt:{token}@127.0.0.1:{port}")))
    assert_ok((yield client.install_async(["vault-lib"])))
    other = AptClient(tmp_path / "other", repo.keyring)
    assert_ok((yield other.update_async(f"deb http://apt:{token}@127.0.0.1:{port}/debian bookworm main")))
    assert_ok((yield other.install_async(["vault-lib"])))
    # the token goes nowhere upstream
    for r in mirror.requests:
        assert token not in repr(r["headers"]) and "authorization" not in r["headers"]


# ---------------------------------------------------------------------------------------------
# bad input


@pytest_twisted.inlineCallbacks
def test_bad_paths_get_4xx_and_create_nothing(rig, vault_factory):
    repo, mirror = rig(by_hash=True)
    vault = start_vault(vault_factory, mirror)
    port = int(vault.url.rsplit(":", 1)[1])
    bad = {
        "/debian/../../../etc/passwd": 400,
        "/debian/dists/%2e%2e/%2e%2e/etc/passwd": 400,
        "/debian/dists/bookworm%2fInRelease": 400,
        "/debian/dists/book%25worm/InRelease": 400,
        "/debian/dists/book%20worm/InRelease": 400,
        "/debian/dists/bookworm/InRelease?x=1": 400,
        "/debian/dists/bookworm/InRelease/Packages": 400,
        "/debian/dists/bookworm/main/binary-amd64/by-hash": 400,
        "/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256": 400,
        "/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/xyz": 400,
        "/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/" + "A" * 64: 400,
        "/debian/dists/bookworm/main/binary-amd64/by-hash/SHA999/" + "a" * 64: 400,
        "/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/" + "a" * 64 + "/x": 400,
        "/debian/pool/main/v/" + "x" * 300 + ".deb": 400,
        "/debian/" + "a/" * 30 + "Packages": 400,
        "/debian/pool/main/v/vault-lib/vault-lib_1.0_all.deb.vault-meta": 400,
        "/debian/": 400,
    }
    for path, expected in bad.items():
        status, _, body = yield threads.deferToThread(fetch, "GET", vault.url + path)
        assert status == expected, (path, status, body)
    for method in ("POST", "PUT", "DELETE"):
        status, headers, _ = yield threads.deferToThread(fetch, method, vault.url + "/debian/dists/bookworm/InRelease")
        assert status == 405 and headers["allow"] == "GET, HEAD"
    # a suite or file the mirror does not have: its 404, and nothing kept
    for path in ("dists/nosuch/InRelease", "dists/nosuch/main/binary-amd64/Packages.xz",
                 "pool/main/n/nosuch/nosuch_1.0_all.deb",
                 "dists/bookworm/main/binary-amd64/by-hash/SHA256/" + "b" * 64):
        status, _, _ = yield threads.deferToThread(fetch, "GET", f"{vault.url}/debian/{path}")
        assert status == 404, path
    # a request line that is no URL at all
    answer = yield threads.deferToThread(_raw, port, b"GET ftp://x/debian/ HTTP/1.1\r\nHost: x\r\n\r\n", 1)
    assert _split_responses(answer)[0][0] == 400
    assert cache_files(vault) == []
    assert {p for p, _ in upstream(mirror)} == {
        "dists/nosuch/InRelease", "dists/nosuch/main/binary-amd64/Packages.xz",
        "pool/main/n/nosuch/nosuch_1.0_all.deb", "dists/bookworm/main/binary-amd64/by-hash/SHA256/" + "b" * 64}


@pytest_twisted.inlineCallbacks
def test_a_by_hash_file_is_checked_against_its_name(rig, vault_factory):
    repo, mirror = rig(by_hash=True)
    vault = start_vault(vault_factory, mirror)
    listed = [line.split() for line in open(repo.dists("Release")).read().split("SHA256:")[1].splitlines()[1:]
              if line.startswith(" ")]
    digest, size, name = next(item for item in listed if item[2].endswith("Packages.xz"))
    by_hash = f"dists/bookworm/{os.path.dirname(name)}/by-hash/SHA256/{digest}"
    # upstream serves other content under that name: refused, not kept
    real = os.path.join(repo.archive, by_hash)
    kept = open(real, "rb").read()
    with open(real, "wb") as f:
        f.write(b"x" * len(kept))
    outcome = yield threads.deferToThread(_fetch_or_cut, f"{vault.url}/debian/{by_hash}")
    assert outcome == "cut"  # streamed, and cut before its last byte when the check failed
    assert cache_files(vault) == []
    with open(real, "wb") as f:
        f.write(kept)
    status, _, body = yield threads.deferToThread(fetch, "GET", f"{vault.url}/debian/{by_hash}")
    assert status == 200 and hashlib.sha256(body).hexdigest() == digest and len(body) == int(size)


# ---------------------------------------------------------------------------------------------
# the daemon


def test_the_daemon_in_both_modes_and_offline(tmp_path):
    with mirror_process(tmp_path / "mirror") as mirror:
        backends = [{"type": "apt", "name": "debian", "config": {"base_url": mirror.url, "index_ttl": 1}}]
        with vault_process(tmp_path / "vault", backends) as vault:
            rewrite = AptClient(tmp_path / "rewrite", mirror.keyring)
            assert_ok(rewrite.update(f"deb {vault.url}/debian bookworm main"))
            assert_ok(rewrite.install_download_only(["vault-hello"]))
            proxied = AptClient(tmp_path / "proxied", mirror.keyring)
            assert_ok(proxied.update(mirror.sources_line(), proxy=vault.url))
            assert_ok(proxied.install_download_only(["vault-hello"]))
            debs = [r["path"] for r in mirror.requests() if r["path"].endswith(".deb")]
            assert sorted(debs) == ["/debian/pool/main/v/vault-hello/vault-hello_1.0_all.deb",
                                    "/debian/pool/main/v/vault-lib/vault-lib_1.0_all.deb"]
            mirror.stop()
            time.sleep(1.1)  # past index_ttl: the vault asks the mirror, which is gone
            offline = AptClient(tmp_path / "offline", mirror.keyring)
            assert_ok(offline.update(mirror.sources_line(), proxy=vault.url))
            assert_ok(offline.install_download_only(["vault-hello"]))
            assert offline.debs() == ["vault-hello_1.0_all.deb", "vault-lib_1.0_all.deb"]
            assert_ok(rewrite.update(f"deb {vault.url}/debian bookworm main"))
            assert "from the cache" in vault.log()


# ---------------------------------------------------------------------------------------------


def _fetch_or_cut(url):
    """The status of a GET, or "cut" when the transfer broke off."""
    import http.client

    try:
        return fetch("GET", url)[0]
    except (OSError, http.client.IncompleteRead):
        return "cut"


def _raw(port, data, answers, timeout=10):
    """Send raw bytes to the vault; read until `answers` responses are complete (or the connection closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        received = b""
        while len(_split_responses(received, complete_only=True)) < answers:
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


def _split_responses(data, complete_only=False):
    """[(status, body)] of HTTP/1.1 responses with Content-Length, in order."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if len(rest) < length:
            if complete_only:
                break
            out.append((status, rest))
            break
        out.append((status, rest[:length]))
        data = rest[length:]
    return out
