"""The fake APT mirror (tests/fakeapt.py) is realistic: the real apt-get, run in
isolation by tests/aptenv.py, updates from it and downloads from it, in
rewrite mode (sources.list names the mirror) and in proxy mode
(Acquire::http::Proxy, absolute-form request lines).  No vault here.
"""

import gzip
import hashlib
import lzma
import os
import socket
import subprocess
import time

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.aptenv import AptClient, errors, fetch, mirror_process, skip_unless_apt
from tests.fakeapt import AptMirror, AptRepo, make_big_deb

ORIGIN_HOST = "deb.vault-test.invalid"  # never resolved: in proxy mode apt only talks to the proxy
SYNC_ERRORS = ("Hash Sum mismatch", "Mirror sync in progress")
SYSTEM_APT = ("/var/lib/apt/lists", "/var/cache/apt/archives")


def _snapshot():
    out = {}
    for top in SYSTEM_APT:
        for dirpath, _, names in os.walk(top):
            for n in names:
                p = os.path.join(dirpath, n)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                out[p] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module", autouse=True)
def system_apt_state():
    skip_unless_apt()
    return _snapshot()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    with mirror_process(tmp_path_factory.mktemp("plain")) as m:
        yield m


@pytest.fixture(scope="module")
def byhash(tmp_path_factory):
    with mirror_process(tmp_path_factory.mktemp("byhash"), by_hash=True) as m:
        yield m


@pytest.fixture
def fresh(tmp_path):
    """A mirror of its own, for tests that publish."""
    with mirror_process(tmp_path / "mirror") as m:
        yield m


@pytest.fixture
def faulty(plain):
    """The shared plain mirror, for tests that set fault modes (never publish)."""
    plain.reset(modes=True)
    yield plain
    plain.reset(modes=True)


def _sha256(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _files(requests):
    return [(r["method"], r["path"], r["status"]) for r in requests]


# ---------------------------------------------------------------------------------------------
# the repository itself


@pytest.mark.parametrize("by_hash", [False, True], ids=["plain", "by-hash"])
def test_repository_is_signed_and_consistent(tmp_path, by_hash):
    repo = AptRepo(tmp_path / "repo", by_hash=by_hash).build()
    try:
        release = open(repo.dists("Release")).read()
        assert ("Acquire-By-Hash: yes" in release) == by_hash
        assert "MD5Sum:" in release and "SHA256:" in release
        assert "SHA1:" not in release and "SHA512:" not in release
        for sig, args in (("InRelease", []), ("Release.gpg", [repo.dists("Release")])):
            proc = subprocess.run(["gpgv", "--keyring", repo.keyring, repo.dists(sig)] + args,
                                  capture_output=True, check=False)
            assert proc.returncode == 0, proc.stderr
        packages = open(repo.dists("main", "binary-amd64", "Packages"), "rb").read()
        assert gzip.decompress(open(repo.dists("main", "binary-amd64", "Packages.gz"), "rb").read()) == packages
        assert lzma.decompress(open(repo.dists("main", "binary-amd64", "Packages.xz"), "rb").read()) == packages
        listed = {}
        section = None
        for line in release.splitlines():
            if not line.startswith(" "):
                section = line.rstrip(":")
            elif section == "SHA256":
                digest, size, name = line.split()
                listed[name] = (digest, int(size))
        assert set(listed) == {"main/binary-amd64/Packages", "main/binary-amd64/Packages.gz",
                               "main/binary-amd64/Packages.xz", "main/i18n/Translation-en",
                               "main/i18n/Translation-en.xz"}
        for name, (digest, size) in listed.items():
            assert _sha256(repo.dists(name)) == digest and os.path.getsize(repo.dists(name)) == size
            by_hash_copy = repo.dists(os.path.dirname(name), "by-hash", "SHA256", digest)
            assert os.path.exists(by_hash_copy) == by_hash
        pkgs = repo.packages()
        assert pkgs["vault-hello"]["depends"] == "vault-lib (>= 1.0)"
        assert pkgs["vault-hello"]["filename"] == "pool/main/v/vault-hello/vault-hello_1.0_all.deb"
        for name, p in pkgs.items():
            assert _sha256(os.path.join(repo.archive, p["filename"])) == p["sha256"]

        old_release = release
        assert repo.publish("vault-hello", "1.1", stop_after="indexes") == (
            ["pool", "by-hash", "indexes"] if by_hash else ["pool", "indexes"])
        assert open(repo.dists("Release")).read() == old_release  # not yet
        assert repo.finish() == ["release", "inrelease"]
        assert os.path.getmtime(repo.dists("InRelease")) > os.path.getmtime(repo.dists("Release")) - 1
        assert repo.packages()["vault-hello"]["version"] == "1.1"
        assert os.path.exists(repo.deb_path("vault-hello", "1.0"))  # old pool file stays
        if by_hash:  # old by-hash objects stay too
            assert os.path.exists(repo.dists("main/binary-amd64/by-hash/SHA256",
                                             listed["main/binary-amd64/Packages.xz"][0]))
        assert repo.publish("vault-hello", "1.2", order="swapped", stop_after="inrelease") == ["inrelease"]
        assert repo.pending[0] == "release" and repo.pending[-1] == "pool"
    finally:
        repo.close()


def test_big_deb_is_streamed_and_valid(tmp_path):
    path = str(tmp_path / "big.deb")
    size = make_big_deb(path, 3 * 1024 * 1024, name="vault-big")
    assert abs(size - 3 * 1024 * 1024) < 16 * 1024
    info = subprocess.run(["dpkg-deb", "--field", path, "Package", "Version"], capture_output=True,
                          text=True, check=True).stdout
    assert "vault-big" in info
    contents = subprocess.run(["dpkg-deb", "--contents", path], capture_output=True, text=True,
                              check=True).stdout
    assert "./usr/share/vault-big/blob" in contents
    members = []
    with open(path, "rb") as fh:  # an ar archive; data stored, not compressed
        assert fh.read(8) == b"!<arch>\n"
        while True:
            head = fh.read(60)
            if not head:
                break
            members.append(head[:16].strip().decode())
            length = int(head[48:58])
            fh.seek(length + (length & 1), 1)
    assert members == ["debian-binary", "control.tar", "data.tar"]


# ---------------------------------------------------------------------------------------------
# the client runs in isolation


def test_client_configuration_is_private(tmp_path, plain):
    client = AptClient(tmp_path / "apt", plain.keyring)
    rc, dump = client.run("dump", program="apt-config")
    assert rc == 0
    assert 'Dir::State "%s' % client.state in dump
    assert 'Dir::Cache "%s' % client.cache in dump
    assert 'Dir::Etc::parts "apt.conf.d' in dump
    for leak in ("docker-clean", "GzipIndexes", "Acquire::http::Proxy", "Post-Invoke", "/var/lib/apt"):
        assert leak not in dump, leak


# ---------------------------------------------------------------------------------------------
# rewrite mode: sources.list names the mirror


@pytest.mark.parametrize("which", ["plain", "byhash"])
def test_update_and_install_download_only(request, tmp_path, which):
    mirror = request.getfixturevalue(which)
    mirror.reset(modes=True)
    client = AptClient(tmp_path / "apt", mirror.keyring)
    rc, out = client.update(mirror.sources_line())
    assert rc == 0 and errors(out) == [], out
    log = mirror.requests()
    index = [r for r in log if "/dists/" in r["path"]]
    assert index[0]["path"] == "/debian/dists/bookworm/InRelease"
    assert all(r["headers"].get("cache-control") == "max-age=0" for r in index)
    assert all(not r["absolute"] and r["status"] == 200 for r in index)
    paths = [r["path"] for r in index]
    if which == "byhash":
        assert any("/main/binary-amd64/by-hash/SHA256/" in p for p in paths)
        assert any("/main/i18n/by-hash/SHA256/" in p for p in paths)
    else:
        assert "/debian/dists/bookworm/main/binary-amd64/Packages.xz" in paths
        assert "/debian/dists/bookworm/main/i18n/Translation-en.xz" in paths
    assert client.candidate("vault-hello") == "1.0"

    mirror.reset()
    rc, out = client.install_download_only(["vault-hello"])
    assert rc == 0 and errors(out) == [], out
    assert client.debs() == ["vault-hello_1.0_all.deb", "vault-lib_1.0_all.deb"]
    state = mirror.state()
    for name in ("vault-hello", "vault-lib"):
        assert _sha256(os.path.join(client.archives, "%s_1.0_all.deb" % name)) == \
            state["packages"][name]["sha256"]
    assert sorted(_files(mirror.requests())) == [
        ("GET", "/debian/pool/main/v/vault-hello/vault-hello_1.0_all.deb", 200),
        ("GET", "/debian/pool/main/v/vault-lib/vault-lib_1.0_all.deb", 200),
    ]
    assert all("cache-control" not in r["headers"] for r in mirror.requests())

    rc, out = client.download(["vault-extra"], dest=tmp_path / "dl")
    assert rc == 0 and errors(out) == [], out
    assert os.listdir(tmp_path / "dl") == ["vault-extra_1.0_all.deb"]

    # a second update revalidates InRelease only, with If-Modified-Since
    mirror.reset()
    rc, out = client.update(mirror.sources_line())
    assert rc == 0 and errors(out) == [] and "Hit:1" in out, out
    (again,) = mirror.requests()
    assert again["path"].endswith("/InRelease") and again["status"] == 304
    assert again["headers"]["if-modified-since"].endswith(" GMT")
    assert again["headers"]["cache-control"] == "max-age=0"


def test_signed_by_in_sources_line(tmp_path, plain):
    client = AptClient(tmp_path / "apt", plain.keyring)
    os.remove(os.path.join(client.etc, "trusted.gpg.d", "fakeapt.gpg"))
    rc, out = client.update(plain.sources_line())
    assert any("NO_PUBKEY" in line or "not signed" in line for line in errors(out)), out
    rc, out = client.update(plain.sources_line(signed_by=True))
    assert rc == 0 and errors(out) == [], out


def test_new_version_is_seen_after_update(tmp_path, fresh):
    client = AptClient(tmp_path / "apt", fresh.keyring)
    assert errors(client.update(fresh.sources_line())[1]) == []
    assert client.candidate("vault-hello") == "1.0"
    state = fresh.publish("vault-hello", "1.1")
    assert state["applied"] == ["pool", "indexes", "release", "inrelease"]
    assert state["packages"]["vault-hello"]["version"] == "1.1"
    fresh.reset()
    rc, out = client.update(fresh.sources_line())
    assert rc == 0 and errors(out) == [], out
    first = fresh.requests()[0]
    assert first["path"].endswith("/InRelease") and first["status"] == 200  # not a 304
    assert "if-modified-since" in first["headers"]
    assert client.candidate("vault-hello") == "1.1"
    rc, out = client.install_download_only(["vault-hello"])
    assert rc == 0 and errors(out) == [], out
    assert client.debs() == ["vault-hello_1.1_all.deb", "vault-lib_1.0_all.deb"]
    status, _, _ = fetch("HEAD", fresh.url + "/pool/main/v/vault-hello/vault-hello_1.0_all.deb")
    assert status == 200  # the old version stays in the pool


@pytest.mark.parametrize("by_hash", [False, True], ids=["plain", "by-hash"])
def test_mirror_sync_window(tmp_path, by_hash):
    with mirror_process(tmp_path / "mirror", by_hash=by_hash) as m:
        old = AptClient(tmp_path / "old", m.keyring)
        assert errors(old.update(m.sources_line())[1]) == []

        # real mirror order, stopped before Release/InRelease: a client meeting
        # the old InRelease and the new Packages fails -- unless by-hash
        m.publish("vault-hello", "1.1", order="mirror", stop_after="indexes")
        newcomer = AptClient(tmp_path / "newcomer", m.keyring)
        out = newcomer.update(m.sources_line())[1]
        if by_hash:
            assert errors(out) == [], out
            assert newcomer.candidate("vault-hello") == "1.0"
        else:
            assert any(e in out for e in SYNC_ERRORS), out
        assert errors(old.update(m.sources_line())[1]) == []  # 304 on InRelease, nothing else
        m.finish()
        out = newcomer.update(m.sources_line())[1]
        assert errors(out) == [], out
        assert newcomer.candidate("vault-hello") == "1.1"

        # swapped: InRelease first; the Packages it names are not there yet
        m.reset()
        m.publish("vault-hello", "1.2", order="swapped", stop_after="inrelease")
        out = old.update(m.sources_line())[1]
        assert any(e in out for e in SYNC_ERRORS), out
        if by_hash:  # apt falls back from a by-hash 404 to the plain name
            statuses = [(r["path"].rsplit("/", 2)[-2], r["status"]) for r in m.requests()]
            assert ("SHA256", 404) in statuses and ("binary-amd64", 200) in statuses, statuses
        m.finish()
        m.reset()
        out = old.update(m.sources_line())[1]
        assert errors(out) == [], out
        assert old.candidate("vault-hello") == "1.2"
        # the failed update left InRelease in lists/partial: apt resumes it
        first = m.requests()[0]
        assert first["path"].endswith("/InRelease") and first["headers"]["range"].startswith("bytes=")
        assert "if-range" in first["headers"] and first["status"] in (200, 206, 416)


# ---------------------------------------------------------------------------------------------
# fault modes


def test_corrupt_deb_is_a_hash_sum_mismatch(tmp_path, faulty):
    client = AptClient(tmp_path / "apt", faulty.keyring)
    assert errors(client.update(faulty.sources_line())[1]) == []
    faulty.mode(mode="corrupt")
    rc, out = client.install_download_only(["vault-extra"])
    assert rc != 0 and any("Hash Sum mismatch" in line for line in errors(out)), out
    (req,) = faulty.requests()[-1:]
    assert req["status"] == 200 and req["sent"] == faulty.state()["packages"]["vault-extra"]["size"]
    assert client.debs() == []


def test_cut_deb_is_resumed_with_range_and_if_range(tmp_path, faulty):
    client = AptClient(tmp_path / "apt", faulty.keyring)
    assert errors(client.update(faulty.sources_line())[1]) == []
    faulty.mode(mode="cut", paths="*.deb", cut_after_bytes=5000)
    rc, out = client.install_download_only(["vault-extra"])
    assert rc != 0 and errors(out), out
    assert client.partials() == {"vault-extra_1.0_all.deb": 5000}
    faulty.mode(mode="normal")
    faulty.reset()
    rc, out = client.install_download_only(["vault-extra"])
    assert rc == 0 and errors(out) == [], out
    (req,) = faulty.requests()
    assert req["headers"]["range"] == "bytes=5000-"
    assert req["headers"]["if-range"] == fetch("HEAD", faulty.origin + req["path"])[1]["last-modified"]
    assert req["status"] == 206 and req["sent"] == faulty.state()["packages"]["vault-extra"]["size"] - 5000
    assert client.debs() == ["vault-extra_1.0_all.deb"]


@pytest.mark.parametrize("proxy", [False, True], ids=["rewrite", "proxy"])
def test_redirect_to_the_second_listener(tmp_path, faulty, proxy):
    client = AptClient(tmp_path / "apt", faulty.keyring)
    line = "deb http://%s/debian bookworm main" % ORIGIN_HOST if proxy else faulty.sources_line()
    assert errors(client.update(line, proxy=faulty.origin if proxy else None)[1]) == []
    faulty.mode(mode="redirect")
    faulty.reset()
    rc, out = client.install_download_only(["vault-hello"])
    assert rc == 0 and errors(out) == [], out
    log = faulty.requests()
    second = faulty.url2.split("/")[2]  # 127.0.0.2:PORT
    if proxy:  # apt follows the redirect through its proxy: absolute-form for the second host
        assert {(r["server"], r["status"], r["headers"]["host"]) for r in log} == {
            ("primary", 302, ORIGIN_HOST), ("primary", 200, second)}
        assert all(r["absolute"] for r in log)
    else:
        assert {(r["server"], r["status"], r["headers"]["host"].split(":")[0]) for r in log} == {
            ("primary", 302, "127.0.0.1"), ("secondary", 200, "127.0.0.2")}
    assert client.debs() == ["vault-hello_1.0_all.deb", "vault-lib_1.0_all.deb"]


@pytest.mark.parametrize("mode", ["down5xx", "reset", "hang"])
def test_failures_are_reported_by_errors(tmp_path, faulty, mode):
    client = AptClient(tmp_path / "apt", faulty.keyring)
    faulty.mode(mode=mode)
    started = time.monotonic()
    rc, out = client.update(faulty.sources_line(), options={"Acquire::http::Timeout": "1"})
    assert rc == 0, out  # apt-get update exits 0 regardless
    assert any(line.startswith("W: Failed to fetch") for line in errors(out)), out
    assert time.monotonic() - started < 8
    faulty.mode(mode="normal")
    out = client.update(faulty.sources_line())[1]
    assert errors(out) == [], out
    log = faulty.requests()
    failed = [r for r in log if r["status"] != 200]
    assert len(failed) in (1, 2)  # apt retries once on a fresh connection after a dead keep-alive
    if mode == "down5xx":
        assert failed[0]["status"] == 503
    else:
        assert all(r.get("aborted") for r in failed)


# ---------------------------------------------------------------------------------------------
# proxy mode and what apt sends


def test_proxy_mode_sends_absolute_form(tmp_path, byhash):
    byhash.reset(modes=True)
    client = AptClient(tmp_path / "apt", byhash.keyring)
    rc, out = client.update("deb http://%s/debian bookworm main" % ORIGIN_HOST, proxy=byhash.origin)
    assert rc == 0 and errors(out) == [], out
    rc, out = client.install_download_only(["vault-hello"])
    assert rc == 0 and errors(out) == [], out
    assert client.debs() == ["vault-hello_1.0_all.deb", "vault-lib_1.0_all.deb"]
    log = byhash.requests()
    assert log and all(r["absolute"] for r in log)
    assert all(r["target"].startswith("http://%s/debian/" % ORIGIN_HOST) for r in log)
    assert all(r["headers"]["host"] == ORIGIN_HOST for r in log)
    assert log[0]["target"] == "http://%s/debian/dists/bookworm/InRelease" % ORIGIN_HOST
    for r in log:
        assert (r["headers"].get("cache-control") == "max-age=0") == ("/dists/" in r["path"])
        assert "proxy-authorization" not in r["headers"] and "via" not in r["headers"]


@pytest.mark.parametrize("proxy", [False, True], ids=["rewrite", "proxy"])
def test_apt_pipelines_after_the_first_answer(tmp_path, faulty, proxy):
    client = AptClient(tmp_path / "apt", faulty.keyring)
    line = "deb http://%s/debian bookworm main" % ORIGIN_HOST if proxy else faulty.sources_line()
    assert errors(client.update(line, proxy=faulty.origin if proxy else None)[1]) == []
    faulty.reset()
    faulty.mode(mode="normal", throttle_bps=300000)  # keep answers slow enough to queue behind
    rc, out = client.download(["vault-extra", "vault-hello", "vault-lib"])
    assert rc == 0 and errors(out) == [], out
    log = faulty.requests()
    assert len({r["conn"] for r in log}) == 1  # one keep-alive connection
    assert [r["pipelined"] for r in log][0] == 1  # the first request goes alone
    assert max(r["pipelined"] for r in log) == 2  # then the other two at once


# ---------------------------------------------------------------------------------------------
# the server without apt


def _raw(origin, data, read_for=0.3):
    host, port = origin[len("http://"):].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(data)
        s.settimeout(read_for)
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            pass
    return b"".join(chunks)


def test_mirror_http_semantics(plain):
    plain.reset(modes=True)
    url = plain.url + "/dists/bookworm/InRelease"
    status, headers, body = fetch("GET", url)
    size = len(body)
    assert status == 200 and int(headers["content-length"]) == size
    etag, lm = headers["etag"], headers["last-modified"]
    assert headers["accept-ranges"] == "bytes"
    status, headers, body = fetch("HEAD", url)
    assert status == 200 and body == b"" and int(headers["content-length"]) == size
    assert fetch("GET", url, {"If-None-Match": etag})[0] == 304
    assert fetch("GET", url, {"If-Modified-Since": lm})[0] == 304
    assert fetch("GET", url, {"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"})[0] == 200
    status, headers, part = fetch("GET", url, {"Range": "bytes=10-19"})
    assert status == 206 and len(part) == 10 and headers["content-range"] == "bytes 10-19/%d" % size
    assert fetch("GET", url, {"Range": "bytes=10-", "If-Range": lm})[0] == 206
    assert fetch("GET", url, {"Range": "bytes=10-", "If-Range": etag})[0] == 206
    assert fetch("GET", url, {"Range": "bytes=10-", "If-Range": '"other"'})[0] == 200
    status, headers, _ = fetch("GET", url, {"Range": "bytes=%d-" % size})
    assert status == 416 and headers["content-range"] == "bytes */%d" % size
    assert fetch("GET", plain.url + "/dists/bookworm/nope")[0] == 404
    assert fetch("GET", plain.origin + "/../../etc/passwd")[0] == 404
    assert fetch("POST", url)[0] == 405
    assert fetch("POST", plain.origin + "/_fake/mode", {}, b'{"mode": "bogus"}')[0] == 400
    plain.mode(mode="down5xx", times=1)
    assert [fetch("GET", url)[0] for _ in range(2)] == [503, 200]
    plain.mode(mode="normal", times=None)
    # keep-alive, pipelining and absolute form on one connection
    pipelined = b"".join(
        b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % t for t in
        (b"/debian/dists/bookworm/Release", b"http://deb.example/debian/dists/bookworm/Release"))
    answer = _raw(plain.origin, pipelined)
    assert answer.count(b"HTTP/1.1 200 OK") == 2, answer[:300]
    log = [r for r in plain.requests() if r["path"] == "/debian/dists/bookworm/Release"]
    assert [r["absolute"] for r in log] == [False, True]
    assert log[0]["conn"] == log[1]["conn"] and log[0]["pipelined"] == 2
    state = plain.state()
    assert state["suite"] == "bookworm" and state["keyring"] == plain.keyring
    assert plain.info["url"] == plain.url and plain.url.startswith("http://127.0.0.1:")
    assert plain.url.endswith("/debian") and plain.url2.startswith("http://127.0.0.2:")


def test_big_package_through_the_control_route(tmp_path, fresh):
    state = fresh.post("/_fake/big", {"size": 1024 * 1024})
    assert state["packages"]["vault-big"]["size"] > 1000 * 1024
    client = AptClient(tmp_path / "apt", fresh.keyring)
    assert errors(client.update(fresh.sources_line())[1]) == []
    rc, out = client.download(["vault-big"], dest=tmp_path / "dl")
    assert rc == 0 and errors(out) == [], out
    assert _sha256(tmp_path / "dl" / "vault-big_1.0_all.deb") == state["packages"]["vault-big"]["sha256"]


@pytest_twisted.inlineCallbacks
def test_in_process_mirror(tmp_path):
    repo = AptRepo(tmp_path / "repo", by_hash=True).build()
    mirror = AptMirror(repo).listen()
    try:
        client = AptClient(tmp_path / "apt", repo.keyring)
        sources = "deb %s %s main" % (mirror.url, repo.suite)
        rc, out = yield threads.deferToThread(client.update, sources)
        assert rc == 0 and errors(out) == [], out
        repo.publish("vault-extra", "2.0")
        rc, out = yield threads.deferToThread(client.update, sources)
        assert errors(out) == [], out
        rc, out = yield threads.deferToThread(client.install_download_only, ["vault-extra"])
        assert rc == 0 and errors(out) == [], out
        assert client.debs() == ["vault-extra_2.0_all.deb"]
        assert [r["status"] for r in mirror.requests if r["path"].endswith("InRelease")] == [200, 200]
    finally:
        yield mirror.close()
        repo.close()


# ---------------------------------------------------------------------------------------------


def test_system_apt_state_untouched(system_apt_state):
    assert _snapshot() == system_apt_state
