"""
Attacks on a running vault, each over real sockets, each one an answer to a
hole a review found (issue "Security: close the holes a review found"):

1. gated files read through a yes about the repo's public files;
2. one client's 429 switching everyone to offline rules;
3. active content served inline from the vault's origin, DNS rebinding;
4. the vault's token lent to every /api/ call;
5. state that anonymous requests create and nothing removes;
6. downloads nobody waits for, without a bound;
7. Range numbers too long for int();
8. in-flight names on the status page;
9. the command line carrying its tokens to another origin on a redirect;
10. revisions and paths that could stand for another key.
"""

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from artifact_vault import downloads as inflight
from tests.hfenv import (CLIENT_OUTCOME, PRIVATE_TOKEN, ROOT, UNAPPROVED_TOKEN, fake_hub, fetch, run_client,
                         vault_process)
from tests.test_core import BODY, SMALL, backend, raw_get, sleep, stream, temp_files, until

APPROVED = {"Authorization": f"Bearer {PRIVATE_TOKEN}"}
UNAPPROVED = {"Authorization": f"Bearer {UNAPPROVED_TOKEN}"}
GARBAGE = {"Authorization": "Bearer hf_" + "x" * 30}
GATED = "acme/gated-model"


def hf_backends(hub, **config):
    return [{"type": "huggingface", "config": {"base_url": hub.hub, "offline_timeout": 1, **config}}]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with fake_hub(tmp_path_factory.mktemp("hub")) as h:
        yield h


@pytest.fixture
def normal_hub(hub):
    """The fake hub answering normally before and after the test, whatever the test did to it."""
    normal = {"target": "both", "mode": "normal", "only_token": None, "revoked": [], "throttle_bps": None}
    hub.post_json("/_fake/mode", normal)
    yield hub
    hub.post_json("/_fake/mode", normal)


def files_below(folder):
    return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]


# -- 1. gated content, decided per file -----------------------------------------------


@pytest.mark.parametrize("access", ["shared", "per-client"])
def test_gated_weights_stay_closed_to_clients_that_read_only_the_public_card(normal_hub, tmp_path, access):
    hub = normal_hub
    config = {"access": access, "token": PRIVATE_TOKEN if access == "shared" else ""}
    with vault_process(tmp_path / "v", hf_backends(hub, **config)) as v:
        weights = f"{v.endpoint}/{GATED}/resolve/main/weights.bin"
        readme = f"{v.endpoint}/{GATED}/resolve/main/README.md"
        status, _, secret = fetch("GET", weights, APPROVED)
        assert status == 200 and len(secret) > 100_000  # cached now
        for who in (UNAPPROVED, GARBAGE):
            assert fetch("HEAD", readme, who)[0] == 200  # the card is public, as on the hub
        if access == "per-client":
            assert fetch("HEAD", readme)[0] == 200
        for who, status in ((UNAPPROVED, 403), (GARBAGE, 403)):
            got, headers, body = fetch("GET", weights, who)
            assert (got, headers.get("x-error-code")) == (status, "GatedRepo")
            assert secret not in body
        if access == "per-client":
            got, headers, body = fetch("GET", weights)
            assert (got, headers.get("x-error-code")) == (401, "GatedRepo") and secret not in body

        # Offline: the same clients, the hub failing for everyone.
        hub.post_json("/_fake/mode", {"mode": "down5xx"})
        assert fetch("GET", weights, APPROVED)[2] == secret  # a confirmed yes still reads
        for who in (UNAPPROVED, GARBAGE) + (({},) if access == "per-client" else ()):
            got, headers, body = fetch("GET", weights, who)
            assert got in (401, 403) and headers.get("x-error-code") == "GatedRepo", (who, got)
            assert secret not in body


def test_the_real_client_gets_gated_repo_error_after_reading_the_card(normal_hub, tmp_path):
    hub = normal_hub
    with vault_process(tmp_path / "v", hf_backends(hub, access="per-client")) as v:
        assert fetch("GET", f"{v.endpoint}/{GATED}/resolve/main/weights.bin", APPROVED)[0] == 200
        res = run_client(v.endpoint, tmp_path, CLIENT_OUTCOME + textwrap.dedent(f"""
            from huggingface_hub import hf_hub_download
            card = outcome(lambda: open(hf_hub_download("{GATED}", "README.md")).read())
            weights = outcome(lambda: hf_hub_download("{GATED}", "weights.bin"))
            result = [card[0], weights[0]]
        """), extra_env={"HF_TOKEN": UNAPPROVED_TOKEN})
        assert res == ["ok", "GatedRepoError"]


def test_an_answer_that_is_neither_yes_nor_no_opens_nothing(tmp_path):
    from artifact_vault.backends.huggingface.hub import Repo
    from artifact_vault.config import parse
    from artifact_vault.service import assemble

    config = parse({"cache_dir": str(tmp_path), "backends": [{"type": "huggingface"}]}, environ={})
    policy = assemble(config, reactor).backends[0].access
    repo = Repo("models", "acme/gated-model")
    assert policy.note_answer(repo, "files", "client-x", 404, {}, "weights.bin") is None
    assert policy.note_answer(repo, "files", "client-x", 404, {"x-error-code": "Other"}, "weights.bin") is None
    assert policy.note_answer(repo, "files", "client-x", 400, {}, "weights.bin") is None
    assert policy._answers == {}
    assert policy.note_answer(repo, "files", "client-x", 200, {}, "README.md")["allowed"]
    assert not policy._yes(repo, "files", "weights.bin", ("client-x", "anonymous"), 300)


# -- 2. one client's failure does not switch everyone to offline rules ------------------------


def test_a_429_for_one_token_does_not_let_a_revoked_token_read(normal_hub, tmp_path):
    hub = normal_hub
    with vault_process(tmp_path / "v", hf_backends(hub, access="per-client", access_ttl=1)) as v:
        weights = f"{v.endpoint}/{GATED}/resolve/main/weights.bin"
        assert fetch("GET", weights, APPROVED)[0] == 200
        hub.post_json("/_fake/mode", {"revoked": [PRIVATE_TOKEN]})  # A loses access
        hub.post_json("/_fake/mode", {"mode": "429", "only_token": UNAPPROVED_TOKEN})
        time.sleep(1.2)  # A's yes is older than access_ttl
        assert fetch("GET", f"{v.endpoint}/{GATED}/resolve/main/config.json", UNAPPROVED)[0] == 429
        got, headers, body = fetch("GET", weights, APPROVED)
        assert got == 403 and headers.get("x-error-code") == "GatedRepo"
        assert "upstream looks down" not in v.log()


def test_failures_of_several_identities_or_of_the_vault_mean_down():
    from artifact_vault.errors import UpstreamStatus
    from artifact_vault.freshness import UpstreamHealth

    now = [100.0]
    health = UpstreamHealth("hf", clock=lambda: now[0])
    error = UpstreamStatus(429, "http://hub/x", {"retry-after": "9" * 5000})
    health.failed(error, "client-a")
    health.failed(error, "client-a")
    health.failed(error, "client-b")
    assert not health.is_down()
    health.failed(error, "client-c")
    assert health.is_down()
    now[0] += 1000
    assert not health.is_down()
    health.failed(error, "anonymous")
    assert health.is_down()


# -- 3. served content is data, for the names the vault answers to -----------------------------


def test_repo_files_are_attachments_that_never_run_in_the_vault_origin(normal_hub, tmp_path):
    hub = normal_hub
    with vault_process(tmp_path / "v", hf_backends(hub)) as v:
        url = f"{v.endpoint}/spaces/acme/tiny-space/resolve/main/index.html"
        for method in ("HEAD", "GET", "GET"):  # a miss, then a hit
            status, headers, _ = fetch(method, url)
            assert status == 200
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["content-security-policy"] == "sandbox"
            assert headers["content-disposition"].startswith('attachment; filename="index.html"')
        status, headers, _ = fetch("GET", f"{v.endpoint}/api/models/gpt2")
        assert status == 200 and headers["x-content-type-options"] == "nosniff"


@pytest_twisted.ensureDeferred
async def test_generic_files_get_nosniff_and_a_sandbox(vault_factory, upstream, http):
    upstream.add("/page.html", b"<script>alert(1)</script>", content_type="text/html")
    v = vault_factory(backend(upstream))
    for _ in range(2):
        r = await http.get(v.url + "/files/page.html")
        await r.content()
        assert r.headers.getRawHeaders("x-content-type-options") == ["nosniff"]
        assert r.headers.getRawHeaders("content-security-policy") == ["sandbox"]


@pytest_twisted.ensureDeferred
async def test_a_host_name_the_vault_does_not_answer_to_is_refused(vault_factory, upstream):
    upstream.add("/a.txt", SMALL)
    v = vault_factory(backend(upstream))
    status, _, body = await raw_get(v.url, "/files/a.txt", headers={"Host": "attacker.example:8080"})
    assert status == 421 and b"allowed_hosts" in body
    assert upstream.count("/a.txt") == 0
    for host in ("localhost:1234", "127.0.0.1", "[::1]:80"):
        assert (await raw_get(v.url, "/files/a.txt", headers={"Host": host}))[0] == 200, host
    assert (await raw_get(v.url, "/_vault/health", headers={"Host": "attacker.example"}))[0] == 200
    named = vault_factory(backend(upstream), allowed_hosts=["vault.example.org", "*.corp.example"])
    for host, status in (("vault.example.org", 200), ("a.corp.example:80", 200), ("corp.example", 421),
                         ("localhost", 421), ("127.0.0.1", 200)):
        assert (await raw_get(named.url, "/files/a.txt", headers={"Host": host}))[0] == status, host


# -- 4. the vault's token goes to the routes downloads need only ---------------------------------


def test_the_vault_token_is_lent_to_the_download_routes_only(normal_hub, tmp_path):
    hub = normal_hub
    with vault_process(tmp_path / "v", hf_backends(hub, token=PRIVATE_TOKEN)) as v:
        hub.reset()
        assert fetch("GET", f"{v.endpoint}/api/models/acme/private-model")[0] == 200  # lent: repo info
        for path in ("/api/whoami-v2", "/api/models/acme/private-model/xet-read-token/main",
                     "/api/organizations/acme/members", "/api/models?author=acme"):
            fetch("GET", v.endpoint + path)
        seen = {r["path"].split("?")[0]: r["headers"].get("authorization") for r in hub.requests()}
        assert seen["/api/models/acme/private-model"] == f"Bearer {PRIVATE_TOKEN}"
        for path in ("/api/whoami-v2", "/api/models/acme/private-model/xet-read-token/main",
                     "/api/organizations/acme/members", "/api/models"):
            assert seen[path] is None, path
        # a client's own token still goes with its own calls
        hub.reset()
        fetch("GET", v.endpoint + "/api/whoami-v2", UNAPPROVED)
        assert [r["headers"].get("authorization") for r in hub.requests()] == [f"Bearer {UNAPPROVED_TOKEN}"]


# -- 5. what clients can create is bounded --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_missing_files_leave_no_lock_or_record(vault_factory, upstream, http, tmp_path):
    v = vault_factory(backend(upstream))
    for i in range(50):
        r = await http.get(f"{v.url}/files/nothing/{uuid.uuid4().hex}.bin")
        assert r.code == 404
        await r.content()
    upstream.add("/real.bin", SMALL)
    assert (await (await http.get(v.url + "/files/real.bin")).content()) == SMALL
    cache = v.config.cache_dir
    assert files_below(os.path.join(cache, ".locks")) == []
    assert sorted(os.path.relpath(p, cache) for p in files_below(cache)) == [
        "files/real.bin", "files/real.bin.vault-meta"]


def test_junk_paths_queries_and_tokens_leave_bounded_state(normal_hub, tmp_path):
    hub = normal_hub
    with vault_process(tmp_path / "v", hf_backends(hub)) as v:
        commit = hub.repo("models/gpt2")["refs"]["main"]
        base = f"{v.endpoint}/gpt2/resolve/{commit}/"
        assert fetch("GET", base + "config.json")[0] == 200
        for i in range(30):
            status, headers, _ = fetch("GET", base + f"junk/{uuid.uuid4().hex}")
            assert status == 404 and headers["x-error-code"] == "EntryNotFound"
            assert fetch("GET", f"{v.endpoint}/api/models/gpt2/tree/main?junk={i}")[0] == 200
            fetch("GET", base + "config.json", {"Authorization": f"Bearer hf_random_{uuid.uuid4().hex}"})
        cache = os.path.join(v.folder, "cache", "huggingface")
        by_kind = {}
        for path in files_below(cache):
            if not path.endswith((".vault-meta", ".vault-tmp")):  # records, not a write in progress
                kind = os.path.relpath(path, cache).split(os.sep)[0]
                by_kind[kind] = by_kind.get(kind, 0) + 1
        assert by_kind.get("missing") == 1  # one record for all the paths of that commit
        assert "api" not in by_kind  # junk queries are relayed, not kept
        # no record for any of the 30 tokens: each was only ever refused or not confirmed
        assert by_kind.get("access", 0) <= 2, by_kind
        assert files_below(os.path.join(v.folder, "cache", ".locks")) == []
        status, headers, _ = fetch("GET", base + "config.json/x")  # a file asked for as a folder
        assert status == 404
        hub.post_json("/_fake/mode", {"mode": "down5xx"})
        assert fetch("GET", base + "config.json")[0] == 200  # the real file was not shadowed


@pytest_twisted.ensureDeferred
async def test_records_are_evicted_least_recently_used_with_the_content(vault_factory, upstream, http):
    upstream.add("/new.bin", SMALL * 40)
    hf = {"type": "huggingface", "config": {"base_url": "http://127.0.0.1:9"}}
    v = vault_factory(backend(upstream) + [hf], max_cache_size=len(SMALL) * 40 + 3000)
    store = v.store
    old = time.time() - 3600
    for i in range(60):  # Hugging Face records nobody used for an hour: more than the cap leaves room for
        entry = store.write_small(f"huggingface/refs/models/acme/m{i}/main", b"x" * 100,
                                  {"content_type": "application/json"})
        os.utime(entry.path + ".vault-meta", (old + i, old + i))
    assert (await (await http.get(v.url + "/files/new.bin")).content()) == SMALL * 40
    await v.vault.janitor.scan()
    assert store.lookup("files/new.bin") is not None  # the content just used stays
    left = [i for i in range(60) if store.lookup(f"huggingface/refs/models/acme/m{i}/main") is not None]
    assert left and left == list(range(60 - len(left), 60))  # the oldest records went first
    assert v.vault.janitor.total <= len(SMALL) * 40 + 3000


# -- 6. downloads nobody waits for ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_download_every_client_left_early_is_stopped(vault_factory, upstream, http, monkeypatch):
    monkeypatch.setattr(inflight, "ABANDON_GRACE", 0.3)
    monkeypatch.setattr(inflight, "FINISH_IF_REMAINING", 100_000)
    upstream.add("/big.bin", BODY, hold=True)
    v = vault_factory(backend(upstream))
    response, s = await stream(http, v.url + "/files/big.bin")
    upstream.release("/big.bin", upto=10_000)
    await until(lambda: len(s.data) >= 9_000)
    s.transport.stopProducing()  # the only client goes
    await s.done
    await until(lambda: upstream.in_flight("/big.bin") == 0, timeout=5)
    assert v.vault.downloads.get("files/big.bin") is None
    assert v.store.lookup("files/big.bin") is None and temp_files(v.config.cache_dir) == []


@pytest_twisted.ensureDeferred
async def test_a_download_nearly_done_is_finished_for_the_next_client(vault_factory, upstream, http, monkeypatch):
    monkeypatch.setattr(inflight, "ABANDON_GRACE", 0.2)
    upstream.add("/big.bin", BODY, hold=True)
    v = vault_factory(backend(upstream))
    response, s = await stream(http, v.url + "/files/big.bin")
    upstream.release("/big.bin", upto=len(BODY) // 2)
    await until(lambda: len(s.data) >= 1000)
    s.transport.stopProducing()
    await s.done
    await sleep(0.4)
    upstream.release("/big.bin")
    await until(lambda: v.store.lookup("files/big.bin") is not None)
    assert upstream.count("/big.bin") == 1


@pytest_twisted.ensureDeferred
async def test_downloads_beyond_max_downloads_wait_for_a_slot(vault_factory, upstream, http):
    from twisted.internet.defer import Deferred, gatherResults

    for i in range(5):
        upstream.add(f"/f{i}.bin", BODY, hold=True)
    v = vault_factory(backend(upstream, max_downloads=2))

    async def get(i):
        r = await http.get(f"{v.url}/files/f{i}.bin")
        return await r.content()

    results = gatherResults([Deferred.fromCoroutine(get(i)) for i in range(5)])
    await until(lambda: sum(upstream.in_flight(f"/f{i}.bin") for i in range(5)) == 2)
    await sleep(0.2)
    assert sum(upstream.count(f"/f{i}.bin") for i in range(5)) == 2
    for i in range(5):
        upstream.release(f"/f{i}.bin")
    assert await results == [BODY] * 5
    assert sum(upstream.count(f"/f{i}.bin") for i in range(5)) == 5


def test_space_promised_to_running_downloads_is_not_free(tmp_path):
    from artifact_vault.store import CacheStore

    store = CacheStore(str(tmp_path))
    before = store.free_space("files/a")
    writer = store.writer("files/a", expected=10 * 1024 ** 3)
    assert before - store.free_space("files/b") >= 10 * 1024 ** 3 - 1024 ** 2
    writer.write(b"x" * 1000)
    assert store.promised() == 10 * 1024 ** 3 - 1000
    writer.abort()
    assert store.promised() == 0


# -- 7. Range numbers of any length ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_range_positions_of_thousands_of_digits(vault_factory, upstream, http):
    upstream.add("/a.bin", BODY)
    v = vault_factory(backend(upstream))
    await (await http.get(v.url + "/files/a.bin")).content()
    huge = "9" * 5000
    for header, status, piece in ((f"bytes=0-{huge}", 206, BODY), (f"bytes={huge}-", 416, None),
                                  (f"bytes=-{huge}", 206, BODY), (f"bytes=10-{huge}", 206, BODY[10:])):
        got, headers, body = await raw_get(v.url, "/files/a.bin", headers={"Range": header})
        assert got == status, header
        if piece is not None:
            assert body == piece and headers["Content-Range"] == f"bytes {len(BODY) - len(piece)}-{len(BODY) - 1}/{len(BODY)}"


# -- 8. the status page names nothing without the admin token -----------------------------------------


@pytest_twisted.ensureDeferred
async def test_status_shows_names_only_to_the_admin(vault_factory, upstream, http):
    upstream.add("/private-name.bin", BODY, hold=True)
    upstream.add("/broken-secret-name.bin", b"", status=503)
    token = "a" * 20
    v = vault_factory(backend(upstream), admin_token=token)
    response, s = await stream(http, v.url + "/files/private-name.bin")
    await (await http.get(v.url + "/files/broken-secret-name.bin")).content()
    for page in ("/_vault/status.json", "/_vault/"):
        body = await (await http.get(v.url + page)).content()
        assert b"private-name" not in body and b"broken-secret-name" not in body, page
    document = json.loads(await (await http.get(v.url + "/_vault/status.json")).content())
    assert len(document["downloads"]) == 1 and document["recent_errors"][0]["status"] == 502
    admin = await (await http.get(v.url + "/_vault/status.json", headers={"X-Admin-Token": token})).content()
    assert b"private-name" in admin and b"broken-secret-name" in admin
    upstream.release("/private-name.bin")
    await s.done


# -- 9. the command line keeps its tokens at home -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_command_line_sends_no_token_after_a_redirect_elsewhere(upstream, other_origin):
    upstream.redirect("/_vault/admin/stats", other_origin.url + "/_vault/admin/stats")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARTIFACT_VAULT_", "HF_"))}
    env.update({"PYTHONPATH": ROOT, "ARTIFACT_VAULT_ADMIN_TOKEN": "admin-secret-123456",
                "ARTIFACT_VAULT_ACCESS_TOKEN": "access-secret-1"})
    done = await deferToThread(subprocess.run, [sys.executable, "-m", "artifact_vault.cli", "--url", upstream.url,
                                                "stats"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert other_origin.count("/_vault/admin/stats") == 1  # it did follow the redirect...
    seen = [r for r in other_origin.requests if r.path == "/_vault/admin/stats"][0]
    assert not {"x-admin-token", "x-vault-token", "authorization"} & set(seen.headers)  # ...without the tokens
    first = [r for r in upstream.requests if r.path == "/_vault/admin/stats"][0]
    assert first.headers["x-admin-token"] == "admin-secret-123456"


# -- 10. revisions and paths that could name another key -------------------------------------------------


def test_unencoded_pr_refs_and_a_branch_named_default(normal_hub, tmp_path):
    hub = normal_hub
    with vault_process(tmp_path / "v", hf_backends(hub)) as v:
        minilm = "sentence-transformers/all-MiniLM-L6-v2"
        status, headers, body = fetch("GET", f"{v.endpoint}/{minilm}/resolve/refs/pr/1/PR_NOTES.md")
        assert status == 200 and body.startswith(b"# PR 1")
        assert headers["x-repo-commit"] == hub.repo(f"models/{minilm}")["refs"]["refs/pr/1"]
        assert fetch("GET", f"{v.endpoint}/api/models/gpt2")[0] == 200
        assert fetch("GET", f"{v.endpoint}/api/models/gpt2/revision/_default")[0] == 404
        hub.post_json("/_fake/mode", {"mode": "down5xx"})
        assert fetch("GET", f"{v.endpoint}/api/models/gpt2")[0] == 200  # kept
        # a branch named "_default" is not the default branch, online or off
        assert fetch("GET", f"{v.endpoint}/api/models/gpt2/revision/_default")[0] in (502, 503)
