"""
The admin endpoints (`artifact_vault.admin`) and the ``artifact-vault``
command (`artifact_vault.cli`): in-process over real sockets against a
FakeUpstream for the token rules, ls, stats and purge; a real daemon in front
of the fake hub for prefetch and for the command run as a subprocess.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import pytest_twisted

from tests.hfenv import ROOT, fake_hub, fetch, run_client, vault_process
from tests.test_core import BODY, SMALL, backend, sleep

TOKEN = "admin-token-0123456789"


def admin_headers(token=TOKEN, **extra):
    return {"X-Admin-Token": [token], **{k: [v] for k, v in extra.items()}}


async def admin_get(http, v, what, token=TOKEN):
    response = await http.get(v.url + "/_vault/admin/" + what, headers=admin_headers(token))
    return response.code, await response.content()


async def admin_post(http, v, what, document, token=TOKEN):
    response = await http.post(v.url + "/_vault/admin/" + what, data=json.dumps(document).encode(),
                               headers=admin_headers(token, **{"Content-Type": "application/json"}))
    return response.code, await response.content()


# -- in-process: tokens, ls, stats, purge ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_admin_endpoints_are_off_without_a_token_in_the_config(vault_factory, upstream, http):
    v = vault_factory(backend(upstream))
    code, body = await admin_get(http, v, "stats")
    assert code == 403 and b"admin endpoints are off: set admin_token" in body


@pytest_twisted.ensureDeferred
async def test_admin_token_is_required_and_checked(vault_factory, upstream, http):
    v = vault_factory(backend(upstream), admin_token=TOKEN)
    url = v.url + "/_vault/admin/stats"
    response = await http.get(url)
    assert response.code == 401 and response.headers.getRawHeaders("www-authenticate")
    await response.content()
    for headers in ({"X-Admin-Token": ["wrong-token-0123456789"]}, {"Authorization": ["Bearer " + TOKEN + "x"]},
                    {"Authorization": ["Basic " + TOKEN]}):
        response = await http.get(url, headers=headers)
        assert response.code == 401, headers
        await response.content()
    for headers in ({"X-Admin-Token": [TOKEN]}, {"Authorization": ["Bearer " + TOKEN]}):
        response = await http.get(url, headers=headers)
        assert response.code == 200, headers
        assert response.headers.getRawHeaders("content-type") == ["application/json"]
        assert "requests" in json.loads(await response.content())
    # methods and unknown endpoints, once authenticated
    response = await http.post(url, headers=admin_headers())
    assert response.code == 405 and response.headers.getRawHeaders("allow") == ["GET"]
    await response.content()
    response = await http.get(v.url + "/_vault/admin/purge", headers=admin_headers())
    assert response.code == 405 and response.headers.getRawHeaders("allow") == ["POST"]
    await response.content()
    code, _ = await admin_get(http, v, "nothing-here")
    assert code == 404
    # an unknown endpoint tells nothing to a caller without the token
    code, _ = await admin_get(http, v, "nothing-here", token="wrong-token-0123456789")
    assert code == 401


@pytest_twisted.ensureDeferred
async def test_ls_and_stats_show_what_was_downloaded(vault_factory, upstream, http, monkeypatch):
    upstream.add("/a.bin", BODY)
    upstream.add("/sub/b.json", SMALL)
    v = vault_factory(backend(upstream), admin_token=TOKEN)
    for path in ("/files/a.bin", "/files/sub/b.json", "/files/a.bin"):
        assert (await (await http.get(v.url + path)).content()) in (BODY, SMALL)

    code, body = await admin_get(http, v, "ls?backend=files")
    assert code == 200
    listing = json.loads(body)
    assert listing["truncated"] is False
    assert [(e["key"], e["size"]) for e in listing["entries"]] == [("files/a.bin", len(BODY)),
                                                                   ("files/sub/b.json", len(SMALL))]
    a = listing["entries"][0]
    assert a["upstream_url"] == upstream.url + "/a.bin"
    assert a["fetched_at"] <= a["last_used"]  # the hit touched it after the fetch

    code, body = await admin_get(http, v, "ls?backend=files&prefix=sub/")
    assert [e["key"] for e in json.loads(body)["entries"]] == ["files/sub/b.json"]
    code, body = await admin_get(http, v, "ls")
    assert len(json.loads(body)["entries"]) == 2
    code, _ = await admin_get(http, v, "ls?backend=nope")
    assert code == 404
    code, _ = await admin_get(http, v, "ls?backend=files&prefix=../../etc")
    assert code == 400

    from artifact_vault import admin

    monkeypatch.setattr(admin, "LIST_LIMIT", 1)
    code, body = await admin_get(http, v, "ls?backend=files")
    listing = json.loads(body)
    assert listing["truncated"] is True and [e["key"] for e in listing["entries"]] == ["files/a.bin"]

    code, body = await admin_get(http, v, "stats")
    stats = json.loads(body)
    assert stats["usage"]["backends"]["files"] == {"bytes": len(BODY) + len(SMALL), "files": 2, "max_bytes": None}
    assert stats["usage"]["bytes"] == len(BODY) + len(SMALL) and stats["usage"]["files"] == 2
    assert stats["requests"]["miss"] == 2 and stats["requests"]["hit"] == 1
    assert stats["hit_ratio"] == pytest.approx(1 / 3, abs=0.001)
    assert stats["downloads"] == []


@pytest_twisted.ensureDeferred
async def test_purge_removes_entries_and_they_are_fetched_again(vault_factory, upstream, http):
    upstream.add("/a.bin", BODY)
    upstream.add("/keep/b.json", SMALL)
    v = vault_factory(backend(upstream), admin_token=TOKEN)
    for path in ("/files/a.bin", "/files/keep/b.json"):
        await (await http.get(v.url + path)).content()

    for document, status in (({}, 400), ({"backend": ""}, 400), ({"backend": "nope"}, 404),
                             ({"backend": "files", "prefix": "../x"}, 400)):
        code, _ = await admin_post(http, v, "purge", document)
        assert code == status, document
    response = await http.post(v.url + "/_vault/admin/purge", data=b"not json", headers=admin_headers())
    assert response.code == 400
    await response.content()

    code, body = await admin_post(http, v, "purge", {"backend": "files", "prefix": "a"})
    assert code == 200
    assert json.loads(body) == {"backend": "files", "prefix": "a", "removed": 1, "bytes": len(BODY), "skipped": []}
    assert v.store.lookup("files/a.bin") is None
    assert v.store.lookup("files/keep/b.json") is not None
    assert upstream.count("/a.bin") == 1
    assert await (await http.get(v.url + "/files/a.bin")).content() == BODY
    assert upstream.count("/a.bin") == 2

    code, body = await admin_post(http, v, "purge", {"backend": "files"})
    assert json.loads(body)["removed"] == 2
    assert v.store.lookup("files/keep/b.json") is None


@pytest_twisted.ensureDeferred
async def test_purge_skips_an_entry_a_client_is_reading(vault_factory, upstream, http):
    big = BODY * 16  # 20 MB: more than loopback buffers hold, so the reader stays busy
    upstream.add("/big.bin", big)
    upstream.add("/small.json", SMALL)
    v = vault_factory(backend(upstream), admin_token=TOKEN)
    for path in ("/files/big.bin", "/files/small.json"):
        await (await http.get(v.url + path)).content()
    host, port = v.url.split("//")[1].split(":")
    slow = socket.create_connection((host, int(port)))  # asks for the big one and never reads
    slow.sendall(b"GET /files/big.bin HTTP/1.1\r\nHost: localhost\r\n\r\n")
    try:
        await sleep(0.2)
        code, body = await admin_post(http, v, "purge", {"backend": "files"})
        answer = json.loads(body)
        assert code == 200 and answer["removed"] == 1 and answer["bytes"] == len(SMALL)
        assert answer["skipped"] == [{"key": "files/big.bin", "reason": "a client is reading it"}]
        assert v.store.lookup("files/big.bin") is not None
    finally:
        slow.close()


# -- a real daemon in front of the fake hub: prefetch and the command ---------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with fake_hub(tmp_path_factory.mktemp("hub")) as h:
        yield h


@pytest.fixture(scope="module")
def daemon(hub, tmp_path_factory):
    backends = [{"type": "huggingface", "config": {"base_url": hub.hub}},
                {"type": "http", "name": "files", "config": {"prefix": "/files/", "base_url": hub.hub}}]
    with vault_process(tmp_path_factory.mktemp("vault"), backends, admin_token=TOKEN) as v:
        yield v


def prefetch(daemon, **document):
    status, _, body = fetch("POST", daemon.url + "/_vault/admin/prefetch",
                            {"X-Admin-Token": TOKEN, "Content-Type": "application/json"},
                            json.dumps(document).encode(), timeout=120)
    return status, json.loads(body) if status == 200 else body


def test_prefetch_warms_a_snapshot_so_a_client_needs_no_cdn(hub, daemon, tmp_path):
    repo = hub.repo("models/gpt2")
    commit = repo["refs"]["main"]
    files = repo["commits"][commit]["files"]
    status, answer = prefetch(daemon, backend="huggingface", repo="gpt2", revision="main", repo_type="model")
    assert status == 200, answer
    assert answer["commit"] == commit and answer["failed"] == []
    assert answer["files"] == len(files) and answer["bytes"] == sum(f["size"] for f in files.values())
    assert "Prefetched gpt2@" in daemon.log()

    hub.reset()
    result = run_client(daemon.endpoint, tmp_path, """
        import os
        from huggingface_hub import snapshot_download
        path = snapshot_download("gpt2")
        result = sorted(os.listdir(path))
    """)
    assert result == sorted(files)
    assert [r for r in hub.requests() if r["server"] == "cdn"] == []
    assert [r for r in hub.requests() if r["method"] == "GET" and "/resolve/" in r["path"]] == []


def test_prefetch_follows_tree_pages_and_filters_with_include(hub, daemon):
    status, answer = prefetch(daemon, repo="acme/many-files", include=["folder_0/nested/*", "README.md"])
    assert status == 200, answer
    assert answer["files"] == 2 and answer["failed"] == []
    trees = [r for r in hub.requests() if "/api/models/acme/many-files/tree/" in r["path"]]
    assert len(trees) >= 3 and any("cursor=" in r["path"] for r in trees)  # 2500 files: three pages
    status, body = prefetch(daemon, repo="acme/no-such-repo")
    assert status in (403, 404), body  # the hub's 401 is not the admin call's own
    assert b"no such repo, or it needs a hub token" in body
    status, body = prefetch(daemon, repo="gpt2", repo_type="notebook")
    assert status == 400, body
    status, body = prefetch(daemon, backend="files", repo="gpt2")
    assert status == 400, body


def cli(daemon, *args, token=TOKEN, env=None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("ARTIFACT_VAULT_", "HF_"))}
    environ.update({"ARTIFACT_VAULT_URL": daemon.url, "PYTHONPATH": ROOT, **(env or {})})
    if token:
        environ["ARTIFACT_VAULT_ADMIN_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "artifact_vault.cli", *args], env=environ, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_command_line_runs_each_command(hub, daemon):
    dataset = hub.repo("datasets/acme/tiny-dataset")
    commit = dataset["refs"]["main"]

    done = cli(daemon, "prefetch", "huggingface", f"acme/tiny-dataset@{commit}", "--repo-type", "dataset",
               "--include", "data/*", "--include", "README.md")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"acme/tiny-dataset@{commit}: 2 files, ")

    done = cli(daemon, "ls", "huggingface", "files/datasets/acme/tiny-dataset/")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["SIZE", "LAST", "USED", "KEY"]
    assert any(line.endswith(f"files/datasets/acme/tiny-dataset/{commit}/data/train.jsonl") for line in lines)
    assert lines[-1].startswith("2 entries, ")

    done = cli(daemon, "ls", "huggingface", "--json")
    listing = json.loads(done.stdout)
    assert done.returncode == 0 and listing["truncated"] is False
    keys = {e["key"] for e in listing["entries"]}
    assert f"huggingface/files/datasets/acme/tiny-dataset/{commit}/README.md" in keys

    done = cli(daemon, "stats")
    assert done.returncode == 0, done.stderr
    assert "hit ratio:" in done.stdout and "huggingface" in done.stdout and "downloads in flight: 0" in done.stdout
    done = cli(daemon, "stats", "--json")
    stats = json.loads(done.stdout)
    assert stats["usage"]["backends"]["huggingface"]["files"] >= 2

    done = cli(daemon, "purge", "huggingface", "files/datasets/acme/tiny-dataset/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("removed 2 entries")
    done = cli(daemon, "ls", "huggingface", "files/datasets/acme/tiny-dataset/", "--json")
    assert json.loads(done.stdout)["entries"] == []

    # failures: one clear line each, exit 1 for a failed call, 2 for usage
    done = cli(daemon, "stats", token="wrong-token-0123456789")
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "HTTP 401: admin token missing or wrong" in done.stderr
    done = cli(daemon, "prefetch", "huggingface", "acme/no-such-repo")
    assert done.returncode == 1 and ("HTTP 404" in done.stderr or "HTTP 403" in done.stderr), done.stderr
    done = cli(daemon, "purge", "nope")
    assert done.returncode == 1 and "HTTP 404: no backend is named 'nope'" in done.stderr
    done = cli(daemon, "prefetch", "huggingface", "a/b/c")
    assert done.returncode == 2 and "expected ORG/REPO[@REV]" in done.stderr
    done = cli(daemon, "frobnicate")
    assert done.returncode == 2 and "usage:" in done.stderr
    done = cli(daemon, "stats", env={"ARTIFACT_VAULT_URL": "http://127.0.0.1:1"})
    assert done.returncode == 1 and "cannot reach the vault at http://127.0.0.1:1" in done.stderr
