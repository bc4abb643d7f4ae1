"""
HTTPS upstreams: a backend's ``ca_file``, what a client and the log see when
the upstream's certificate does not pass, and bodies that arrive whole, cut
or chunked through the vault's TLS path (the records decrypted from one
socket read reach the HTTP parser as one piece).  The certificates are made
by the tests (tests/tlsenv.py); the origin is the fake upstream behind TLS.
"""

import hashlib
import os

import pytest
import pytest_twisted
from twisted.web.client import ResponseDone

from artifact_vault.config import ConfigError, parse
from tests.test_core import backend, stream, temp_files, until
from tests.tlsenv import listen_tls, make_certs
from tests.upstream import FakeUpstream

#: ~3 MB: several socket reads of many TLS records each
BIG = b"".join(hashlib.sha256(b"tls %d" % i).digest() for i in range(100_000))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA and a certificate for localhost; another CA; an expired certificate from the first CA's maker."""
    made = make_certs(str(tmp_path_factory.mktemp("certs")), names=("localhost",))
    made["other_ca"] = make_certs(str(tmp_path_factory.mktemp("other")), ca_name="some other CA")["ca"]
    expired = make_certs(str(tmp_path_factory.mktemp("expired")), names=("localhost",), expired=True)
    made["expired"] = expired
    return made


def tls_origin(certs):
    up = FakeUpstream()
    listen_tls(up, certs)
    return up


@pytest.fixture
def tls_upstream(certs):
    """The fake upstream behind TLS, as https://localhost:PORT."""
    up = tls_origin(certs)
    yield up
    pytest_twisted.blockon(up.close())


async def outcome(http, url):
    response, s = await stream(http, url)
    reason = (await s.done).reason
    return response.code, bytes(s.data), bool(reason.check(ResponseDone))


def files_backend(url, ca_file=None, name="files"):
    config = {"prefix": f"/{name}/", "base_url": url}
    if ca_file:
        config["ca_file"] = ca_file
    return {"type": "http", "name": name, "config": config}


@pytest.mark.parametrize("chunked", [False, True])
@pytest_twisted.ensureDeferred
async def test_trusted_through_ca_file(vault_factory, tls_upstream, certs, http, chunked):
    tls_upstream.add("/big.bin", BIG, chunked=chunked)
    v = vault_factory(backend(tls_upstream, ca_file=certs["ca"]))
    code, data, clean = await outcome(http, v.url + "/files/big.bin")
    assert (code, clean) == (200, True) and data == BIG
    assert v.store.lookup("files/big.bin").meta["sha256"] == hashlib.sha256(BIG).hexdigest()
    # a hit now, from the disk
    code, data, clean = await outcome(http, v.url + "/files/big.bin")
    assert (code, clean, data == BIG) == (200, True, True) and tls_upstream.count("/big.bin") == 1


@pytest_twisted.ensureDeferred
async def test_relayed_answers_use_the_ca_file_too(vault_factory, tls_upstream, certs, http):
    """A URL with a query is relayed, not cached: the same trust applies."""
    tls_upstream.add("/listing", b"a b c")
    v = vault_factory(backend(tls_upstream, ca_file=certs["ca"]))
    response = await http.get(v.url + "/files/listing?page=2")
    assert (response.code, await response.content()) == (200, b"a b c")


@pytest_twisted.ensureDeferred
async def test_body_cut_short_is_an_error(vault_factory, tls_upstream, certs, http):
    tls_upstream.add("/cut.bin", BIG, cut_after=len(BIG) // 2 + 7)
    v = vault_factory(backend(tls_upstream, ca_file=certs["ca"]))
    code, data, clean = await outcome(http, v.url + "/files/cut.bin")
    assert not (code == 200 and clean) and data == BIG[: len(data)]
    assert v.store.lookup("files/cut.bin") is None
    await until(lambda: not temp_files(v.config.cache_dir))


@pytest.mark.parametrize("case, expected", [
    ("other CA", "the certificate is not signed by a trusted CA (issuer CN=vault test CA)"),
    ("system CAs", "the certificate is not signed by a trusted CA (issuer CN=vault test CA)"),
    ("wrong name", "the certificate is for localhost, not 127.0.0.1"),
    ("expired", "the certificate expired on "),
])
@pytest_twisted.ensureDeferred
async def test_rejected_certificate_is_a_502_that_says_why(vault_factory, certs, http, logged, case, expected):
    up = tls_origin(certs["expired"] if case == "expired" else certs)
    try:
        up.add("/x.bin", b"x" * 100)
        url, ca = up.url, certs["ca"]
        if case == "other CA":
            ca = certs["other_ca"]
        elif case == "system CAs":
            ca = None
        elif case == "wrong name":
            url = url.replace("localhost", "127.0.0.1")
        elif case == "expired":
            ca = certs["expired"]["ca"]
        v = vault_factory([files_backend(url, ca)])
        response = await http.get(v.url + "/files/x.bin")
        body = (await response.content()).decode()
        assert response.code == 502
        assert expected in body and "TLS certificate of" in body
        trusted = f"the CAs of {os.path.abspath(ca)}" if ca else "the system's CAs"
        assert f"(trusted: {trusted})" in body
        assert any(expected in m and "failed: 502" in m for m in logged.messages())
        assert up.count("/x.bin") == 0  # nothing was asked of a server that did not pass
        assert v.store.lookup("files/x.bin") is None and not temp_files(v.config.cache_dir)
    finally:
        await up.close()


@pytest_twisted.ensureDeferred
async def test_redirects_are_checked_against_the_same_cas(vault_factory, tls_upstream, certs, http):
    """A hop to a host whose certificate the backend's CAs did not sign is refused, whatever the system trusts."""
    stranger_certs = make_certs(os.path.join(os.path.dirname(certs["ca"]), "stranger"), names=("localhost",))
    stranger = tls_origin(stranger_certs)
    try:
        stranger.add("/real.bin", b"elsewhere")
        tls_upstream.add("/moved.bin", b"here")
        tls_upstream.redirect("/away.bin", stranger.url + "/real.bin")
        tls_upstream.redirect("/near.bin", tls_upstream.url + "/moved.bin")
        v = vault_factory(backend(tls_upstream, ca_file=certs["ca"]))
        response = await http.get(v.url + "/files/near.bin")
        assert (response.code, await response.content()) == (200, b"here")
        response = await http.get(v.url + "/files/away.bin")
        assert response.code == 502
        assert "not signed by a trusted CA" in (await response.content()).decode()
        assert stranger.count("/real.bin") == 0
    finally:
        await stranger.close()


@pytest_twisted.ensureDeferred
async def test_a_connection_trusted_by_one_backend_is_not_lent_to_another(vault_factory, tls_upstream, certs, http):
    """Two backends on one origin with different CAs: each checks the certificate itself (own pool)."""
    tls_upstream.add("/a.bin", b"a" * 1000)
    v = vault_factory([files_backend(tls_upstream.url, certs["ca"], "good"),
                       files_backend(tls_upstream.url, certs["other_ca"], "bad")])
    response = await http.get(v.url + "/good/a.bin")
    assert (response.code, await response.content()) == (200, b"a" * 1000)
    response = await http.get(v.url + "/bad/a.bin")  # the good backend's connection is idle in its pool now
    assert response.code == 502
    assert "not signed by a trusted CA" in (await response.content()).decode()
    assert tls_upstream.count("/a.bin") == 1


def test_ca_file_must_be_a_readable_pem_with_a_certificate(tmp_path, certs):
    def load(path):
        return parse({"backends": [{"type": "http", "config": {"base_url": "https://example.org", "prefix": "/x/",
                                                               "ca_file": str(path)}}]}, environ={})

    assert load(certs["ca"]).backends[0].ca_file == os.path.abspath(certs["ca"])
    assert load("").backends[0].ca_file is None  # ${CA_FILE} unset
    with pytest.raises(ConfigError, match=r"^backends\[0\]\.config\.ca_file: cannot read .*missing\.pem"):
        load(tmp_path / "missing.pem")
    (tmp_path / "empty.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^backends\[0\]\.config\.ca_file: .*holds no PEM certificate"):
        load(tmp_path / "empty.pem")
    with pytest.raises(ConfigError, match=r"^backends\[0\]\.config\.ca_file: .*holds no PEM certificate"):
        load(certs["key"])  # a key is not a certificate
