"""
The real Hugging Face clients through a real running vault (twistd
subprocess) in front of the fake hub and CDN (tests/fakehub.py), online and
with the hub gone.  Each client scenario runs in a fresh Python process with
a fresh client cache unless it says otherwise.
"""

import json
import textwrap
import os
import subprocess
import sys
import time

import pytest

from tests.hfenv import (
    CLIENT_OUTCOME,
    MINILM,
    PRIVATE_TOKEN,
    UNAPPROVED_TOKEN,
    fake_hub,
    fetch,
    file_sha256,
    free_port,
    git_blob_sha1,
    minilm_dir,
    read,
    run_client,
    vault_process,
)


def hf_backend(hub, **config):
    return [{"type": "huggingface", "config": {"base_url": hub.hub, **config}}]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with fake_hub(tmp_path_factory.mktemp("hub")) as h:
        yield h


@pytest.fixture(scope="module")
def vault(hub, tmp_path_factory):
    with vault_process(tmp_path_factory.mktemp("vault"), hf_backend(hub)) as v:
        yield v


def cdn_requests(hub):
    return [r for r in hub.requests() if r["server"] == "cdn"]


def files_of(hub, repo_key, rev="main"):
    repo = hub.repo(repo_key)
    commit = repo["refs"].get(rev, rev)
    return commit, repo["commits"][commit]["files"]


# -- online -------------------------------------------------------------------------


def test_hf_hub_download_by_branch_tag_commit_subfolder_and_dataset(hub, vault, tmp_path):
    commit, files = files_of(hub, f"models/{MINILM}")
    v1 = hub.repo(f"models/{MINILM}")["refs"]["v1.0"]
    hub.reset()
    res = run_client(vault.endpoint, tmp_path, f"""
        from huggingface_hub import hf_hub_download as dl
        R = {MINILM!r}
        result = {{
            "config": dl(R, "config.json"),
            "pooling": dl(R, "1_Pooling/config.json"),
            "subfolder": dl(R, "config.json", subfolder="1_Pooling"),
            "model": dl(R, "model.safetensors"),
            "tag": dl(R, "config.json", revision="v1.0"),
            "commit": dl(R, "config.json", revision={v1!r}),
            "pr": dl(R, "config.json", revision="refs/pr/1"),
            "legacy": dl("gpt2", "config.json"),
            "dataset": dl("acme/tiny-dataset", "data/train.jsonl", repo_type="dataset"),
            "space": dl("acme/tiny-space", "index.html", repo_type="space"),
        }}
    """)
    src = minilm_dir()
    assert read(res["config"]) == read(os.path.join(src, "config.json"))
    assert f"/snapshots/{commit}/" in res["config"]
    assert read(res["pooling"]) == read(res["subfolder"]) == read(os.path.join(src, "1_Pooling/config.json"))
    assert file_sha256(res["model"]) == file_sha256(os.path.join(src, "model.safetensors"))
    assert json.loads(read(res["tag"]))["fakehub_revision"] == "v1.0"
    assert f"/snapshots/{v1}/" in res["tag"] and read(res["commit"]) == read(res["tag"])
    assert json.loads(read(res["pr"]))["fakehub_revision"] == "refs/pr/1"
    _, gpt2 = files_of(hub, "models/gpt2")
    assert git_blob_sha1(read(res["legacy"])) == gpt2["config.json"]["etag"]
    _, ds = files_of(hub, "datasets/acme/tiny-dataset")
    assert git_blob_sha1(read(res["dataset"])) == ds["data/train.jsonl"]["etag"]
    _, space = files_of(hub, "spaces/acme/tiny-space")
    assert git_blob_sha1(read(res["space"])) == space["index.html"]["etag"]
    # The vault fetched the LFS file from the CDN once, without the client's or any token.
    cdn = cdn_requests(hub)
    assert len([r for r in cdn if r["method"] == "GET"]) == 1
    assert hub.get_json("/_fake/state")["cdn_authorization_seen"] is False
    log = vault.log()
    assert "Following redirect from" in log and "Caching 90868376 bytes for " in log


def test_second_download_is_served_from_the_vault(hub, vault, tmp_path):
    code = f"""
        from huggingface_hub import hf_hub_download as dl
        result = [dl({MINILM!r}, f) for f in ("config.json", "vocab.txt", "model.safetensors")]
    """
    run_client(vault.endpoint, tmp_path, code, hf_home=tmp_path / "first")
    hub.reset()
    res = run_client(vault.endpoint, tmp_path, code, hf_home=tmp_path / "second")
    src = minilm_dir()
    assert [file_sha256(p) for p in res] == [file_sha256(os.path.join(src, f))
                                              for f in ("config.json", "vocab.txt", "model.safetensors")]
    requests = hub.requests()
    assert [r for r in requests if r["server"] == "cdn"] == []
    assert [r for r in requests if r["method"] == "GET"] == []  # at most the branch was re-checked (HEAD)
    assert "Cache hit for sentence-transformers/all-MiniLM-L6-v2/resolve/" in vault.log()


def test_head_answers_metadata_without_cdn_location_or_xet(hub, vault):
    commit, files = files_of(hub, "models/acme/xet-model")
    lfs_name = next(n for n, f in files.items() if f["lfs"])
    status, h, body = fetch("HEAD", f"{vault.endpoint}/acme/xet-model/resolve/main/{lfs_name}")
    assert status == 200 and body == b""
    assert h["x-repo-commit"] == commit
    assert h["etag"] == f'"{files[lfs_name]["sha256"]}"'
    assert h["x-linked-etag"].strip('"') == files[lfs_name]["sha256"]
    assert h["x-linked-size"] == h["content-length"] == str(files[lfs_name]["size"])
    assert "location" not in h and "x-xet-hash" not in h and "xet" not in h.get("link", "")
    status, h, body = fetch("GET", f"{vault.endpoint}/api/models/acme/xet-model/tree/main?recursive=true")
    assert status == 200 and b"xetHash" not in body and json.loads(body)
    status, h, body = fetch("POST", f"{vault.endpoint}/api/models/acme/xet-model/paths-info/main",
                            {"Content-Type": "application/x-www-form-urlencoded"},
                            f"paths={lfs_name}&expand=true".encode())
    assert status == 200 and b"xetHash" not in body and json.loads(body)[0]["path"] == lfs_name


def test_xet_repo_downloads_over_plain_http_with_hf_xet_installed(hub, vault, tmp_path):
    commit, files = files_of(hub, "models/acme/xet-model")
    hub.reset()
    res = run_client(vault.endpoint, tmp_path, """
        import huggingface_hub.utils._runtime as rt
        from huggingface_hub import snapshot_download
        result = {"xet_available": rt.is_xet_available(), "path": snapshot_download("acme/xet-model")}
    """)
    assert res["xet_available"] is True
    for name, meta in files.items():
        path = os.path.join(res["path"], name)
        assert (file_sha256(path) if meta["lfs"] else git_blob_sha1(read(path))) == meta["etag"]
    assert not [r for r in hub.requests() if "xet-read-token" in r["path"] or r["path"].startswith("/cas")]


def test_snapshot_download_and_the_hf_cli(hub, vault, tmp_path):
    commit, files = files_of(hub, "models/gpt2")
    res = run_client(vault.endpoint, tmp_path, """
        from huggingface_hub import snapshot_download
        result = snapshot_download("gpt2")
    """)
    for name, meta in files.items():
        path = os.path.join(res, name)
        assert (file_sha256(path) if meta["lfs"] else git_blob_sha1(read(path))) == meta["etag"]
    hf = os.path.join(os.path.dirname(sys.executable), "hf")
    out = tmp_path / "cli"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HF_")},
           "HF_ENDPOINT": vault.endpoint, "HF_HOME": str(tmp_path / "cli_home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run([hf, "download", MINILM, "config.json", "tokenizer.json", "--local-dir", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    src = minilm_dir()
    for name in ("config.json", "tokenizer.json"):
        assert read(out / name) == read(os.path.join(src, name))


def test_client_sees_the_hubs_errors(hub, vault, tmp_path):
    res = run_client(vault.endpoint, tmp_path, CLIENT_OUTCOME + textwrap.dedent(f"""
        from huggingface_hub import hf_hub_download, HfApi

        def outcome_only(fn):
            return outcome(fn, lambda value: None)

        dl = hf_hub_download
        P, U = {PRIVATE_TOKEN!r}, {UNAPPROVED_TOKEN!r}
        result = {{
            "unknown": outcome_only(lambda: dl("acme/does-not-exist", "config.json")),
            "private": outcome_only(lambda: dl("acme/private-model", "config.json")),
            "private_ok": outcome_only(lambda: dl("acme/private-model", "config.json", token=P)),
            "private_lfs": outcome_only(lambda: dl("acme/private-model", "weights.bin", token=P)),
            "gated": outcome_only(lambda: dl("acme/gated-model", "config.json")),
            "gated_unapproved": outcome_only(lambda: dl("acme/gated-model", "config.json", token=U)),
            "gated_ok": outcome_only(lambda: dl("acme/gated-model", "config.json", token=P)),
            "bad_rev": outcome_only(lambda: dl({MINILM!r}, "config.json", revision="no-such-branch")),
            "bad_rev_info": outcome_only(lambda: HfApi().model_info({MINILM!r}, revision="no-such-branch")),
            "missing": outcome_only(lambda: dl({MINILM!r}, "no_such_file.json")),
            "missing_info": outcome_only(lambda: HfApi().model_info("acme/does-not-exist")),
        }}
    """))
    assert res == {
        "unknown": ["RepositoryNotFoundError", 401],
        "private": ["RepositoryNotFoundError", 401],
        "private_ok": ["ok", None],
        "private_lfs": ["ok", None],
        "gated": ["GatedRepoError", 401],
        "gated_unapproved": ["GatedRepoError", 403],
        "gated_ok": ["ok", None],
        "bad_rev": ["RevisionNotFoundError", 404],
        "bad_rev_info": ["RevisionNotFoundError", 404],
        "missing": ["EntryNotFoundError", 404],
        "missing_info": ["RepositoryNotFoundError", 401],
    }
    assert hub.get_json("/_fake/state")["cdn_authorization_seen"] is False
    assert PRIVATE_TOKEN not in vault.log() and UNAPPROVED_TOKEN not in vault.log()


def test_renamed_repo_and_tree_pagination(hub, vault, tmp_path):
    res = run_client(vault.endpoint, tmp_path, """
        from huggingface_hub import HfApi, hf_hub_download
        api = HfApi()
        result = {
            "renamed": open(hf_hub_download("old-org/old-name", "config.json")).read(),
            "tree": len(list(api.list_repo_tree("acme/many-files", recursive=True))),
            "files": len(api.list_repo_files("acme/many-files")),
        }
    """)
    _, new_files = files_of(hub, "models/new-org/new-name")
    assert git_blob_sha1(res["renamed"].encode()) == new_files["config.json"]["etag"]
    _, many = files_of(hub, "models/acme/many-files")
    assert res["files"] == len(many)
    assert res["tree"] > len(many)  # files and folders
    status, h, _ = fetch("GET", f"{vault.endpoint}/api/models/acme/many-files/tree/main?recursive=true")
    assert status == 200 and h["link"].startswith(f"<{vault.endpoint}/api/models/acme/many-files/tree/main?")


def test_range_on_uncached_and_cached_resolve(hub, vault, tmp_path):
    commit, files = files_of(hub, "models/gpt2")
    name = next(n for n, f in files.items() if f["lfs"])
    size = files[name]["size"]
    url = f"{vault.endpoint}/gpt2/resolve/{commit}/{name}"
    whole = None
    for attempt in ("uncached", "cached"):
        status, h, part = fetch("GET", url, {"Range": "bytes=1000-1999"})
        assert status == 206, attempt
        assert h["content-range"] == f"bytes 1000-1999/{size}"
        assert len(part) == 1000
        status, h, tail = fetch("GET", url, {"Range": f"bytes={size - 10}-"})
        assert status == 206 and len(tail) == 10
        status, h, _ = fetch("GET", url, {"Range": f"bytes={size}-"})
        assert status == 416
        if whole is None:
            status, _, whole = fetch("GET", url)
        assert part == whole[1000:2000] and tail == whole[-10:]
    assert file_sha256_bytes(whole) == files[name]["sha256"]
    res = run_client(vault.endpoint, tmp_path, f"""
        from huggingface_hub import HfFileSystem
        fs = HfFileSystem()
        names = sorted(p.split("/")[-1] for p in fs.ls({MINILM!r}, detail=False))
        with fs.open({MINILM!r} + "/model.safetensors", "rb", block_size=4096) as f:
            f.seek(1_000_000)
            piece = f.read(5000).hex()
        result = {{"names": names, "piece": piece}}
    """)
    assert "config.json" in res["names"] and "model.safetensors" in res["names"]
    with open(os.path.join(minilm_dir(), "model.safetensors"), "rb") as f:
        f.seek(1_000_000)
        assert bytes.fromhex(res["piece"]) == f.read(5000)


def file_sha256_bytes(data):
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_writes_are_refused_with_405(vault):
    for method, path in (("POST", "/api/models/acme/x/commit/main"), ("PUT", "/acme/x/resolve/main/a.bin"),
                         ("DELETE", "/api/repos/delete"), ("POST", "/api/repos/create"),
                         ("POST", f"/api/models/{MINILM}/preupload/main")):
        status, h, body = fetch(method, vault.endpoint + path, body=b"{}")
        assert status == 405, (method, path)
        assert "read-only" in body.decode()


@pytest.mark.parametrize("path", ["/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", f"/{MINILM}/resolve/main/..%2f..%2fx",
                                  f"/{MINILM}/resolve/..%2f..%2f/config.json", f"/{MINILM}/resolve/main/a%00b",
                                  f"/{MINILM}/resolve/%252e%252e/config.json", "/a/b/resolve/main/" + "x" * 300])
def test_bad_paths_are_4xx(vault, path):
    status, _, _ = fetch("GET", vault.endpoint + path)
    assert 400 <= status < 500


def test_transformers_and_datasets(hub, vault, tmp_path):
    res = run_client(vault.endpoint, tmp_path, TRANSFORMERS_AND_DATASETS)
    assert res["model_type"] == "bert" and res["ids"][0] == 101 and res["ids"][-1] == 102
    assert res["rows"] >= 3 and res["columns"] == ["text", "label"] or set(res["columns"]) == {"text", "label"}


TRANSFORMERS_AND_DATASETS = f"""
    from transformers import AutoConfig, AutoTokenizer
    import datasets
    cfg = AutoConfig.from_pretrained({MINILM!r})
    tok = AutoTokenizer.from_pretrained({MINILM!r})
    ds = datasets.load_dataset("acme/tiny-dataset", split="train")
    result = {{"model_type": cfg.model_type, "ids": tok("hello world")["input_ids"],
               "rows": len(ds), "columns": ds.column_names}}
"""


def test_configured_token_opens_private_repos_and_never_leaks(hub, tmp_path):
    with vault_process(tmp_path / "v", hf_backend(hub, token=PRIVATE_TOKEN)) as v:
        hub.reset()
        res = run_client(v.endpoint, tmp_path, """
            from huggingface_hub import hf_hub_download
            result = [open(hf_hub_download("acme/private-model", "config.json")).read(),
                      hf_hub_download("acme/private-model", "weights.bin")]
        """)
        assert "acme/private-model" in res[0]
        assert hub.get_json("/_fake/state")["cdn_authorization_seen"] is False
        assert any(r["headers"].get("authorization") == f"Bearer {PRIVATE_TOKEN}"
                   for r in hub.requests() if r["server"] == "hub")
        status, _, body = fetch("GET", v.url + "/_vault/health")
        assert PRIVATE_TOKEN.encode() not in body
        assert PRIVATE_TOKEN not in v.log()


def test_unreachable_hub_with_nothing_cached_is_502_or_504(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    with vault_process(tmp_path / "v", [{"type": "huggingface", "config": {"base_url": dead}}]) as v:
        for method, path in (("HEAD", f"/{MINILM}/resolve/main/config.json"), ("GET", f"/api/models/{MINILM}")):
            status, _, _ = fetch(method, v.endpoint + path)
            assert status in (502, 504)


# -- offline ---------------------------------------------------------------------------


WARM = f"""
    import os
    from huggingface_hub import hf_hub_download, snapshot_download, HfApi, HfFileSystem
    R = {MINILM!r}
    result = {{
        "config": hf_hub_download(R, "config.json"),
        "tag": hf_hub_download(R, "config.json", revision="v1.0"),
        "snapshot": sorted(os.listdir(snapshot_download("gpt2"))),
        "dataset": hf_hub_download("acme/tiny-dataset", "data/train.jsonl", repo_type="dataset"),
        "ls": sorted(p.split("/")[-1] for p in HfFileSystem().ls(R, detail=False)),
        "sha": HfApi().model_info(R).sha,
    }}
"""


def test_everything_works_again_with_the_hub_down_hanging_limited_and_gone(tmp_path):
    cache = str(tmp_path / "cache")
    with fake_hub(tmp_path / "hub") as hub:
        backends = hf_backend(hub, offline_timeout=2)
        with vault_process(tmp_path / "warm", backends, cache_dir=cache) as v:
            online = run_client(v.endpoint, tmp_path, WARM, hf_home=tmp_path / "c0")
            tf_online = run_client(v.endpoint, tmp_path, TRANSFORMERS_AND_DATASETS, hf_home=tmp_path / "c1")
        # Each failure mode meets a freshly started vault (nothing in memory, all from disk)
        # and a fresh client cache.
        for mode in ("down5xx", "429", "hang", "gone"):
            if mode == "gone":
                hub.proc.terminate()
                hub.proc.wait(10)
            else:
                hub.post_json("/_fake/mode", {"mode": mode})
            with vault_process(tmp_path / mode, backends, cache_dir=cache) as v:
                started = time.monotonic()
                res = run_client(v.endpoint, tmp_path, WARM, hf_home=tmp_path / f"{mode}-client")
                elapsed = time.monotonic() - started
                assert res["ls"] == online["ls"] and res["sha"] == online["sha"], mode
                for name in ("config", "tag", "dataset"):
                    assert read(res[name]) == read(online[name]), (mode, name)
                assert res["snapshot"] == online["snapshot"], mode
                # one wait of offline_timeout at most, then the cache answers at once
                assert elapsed < 10, (mode, elapsed)
                if mode in ("hang", "gone"):
                    tf = run_client(v.endpoint, tmp_path, TRANSFORMERS_AND_DATASETS, hf_home=tmp_path / f"{mode}-tf")
                    assert tf == tf_online, mode
                assert "upstream looks down" in v.log(), mode
                metrics = fetch("GET", v.url + "/_vault/metrics")[2].decode()
                stale = [line for line in metrics.splitlines()
                         if line.startswith("artifact_vault_requests_total") and 'outcome="stale"' in line]
                assert stale and float(stale[0].rsplit(" ", 1)[1]) > 0, mode
