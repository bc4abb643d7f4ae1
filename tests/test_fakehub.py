"""The fake hub (tests/fakehub.py) is realistic: the real huggingface_hub client works against it.

The fake runs as a subprocess; every client scenario runs in its own Python subprocess because
huggingface_hub reads HF_ENDPOINT at import time.
"""

import gzip
import hashlib
import json
import textwrap
import os
import socket
import time
from http.client import IncompleteRead
from urllib.parse import urlsplit

import pytest

from tests.hfenv import (CLIENT_OUTCOME, MINILM, PRIVATE_TOKEN, UNAPPROVED_TOKEN, fake_hub, fetch, file_sha256 as _file_sha256,
                         git_blob_sha1 as _git_blob_sha1, minilm_dir as _minilm_dir, read as _read, run_client)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with fake_hub(tmp_path_factory.mktemp("fakehub")) as h:
        yield h


def _hub_paths(requests, server="hub"):
    return [(r["method"], r["path"].split("?")[0], r["status"]) for r in requests if r["server"] == server]


# ---------------------------------------------------------------------------------------------
# Real client against the fake


def test_regular_files_and_revisions(hub, tmp_path):
    minilm = hub.repo(f"models/{MINILM}")
    refs = minilm["refs"]
    assert set(refs) == {"main", "v1.0", "refs/pr/1"} and len(set(refs.values())) == 3
    hub.reset()
    res = run_client(hub, tmp_path, f"""
        from huggingface_hub import hf_hub_download
        R = {MINILM!r}
        result = {{
            "main": hf_hub_download(R, "config.json"),
            "pooling": hf_hub_download(R, "1_Pooling/config.json"),
            "vocab": hf_hub_download(R, "vocab.txt"),
            "v1": hf_hub_download(R, "config.json", revision="v1.0"),
            "pr": hf_hub_download(R, "config.json", revision="refs/pr/1"),
            "sha": hf_hub_download(R, "config.json", revision={refs["v1.0"]!r}),
        }}
    """)
    src = _minilm_dir()
    for key, rel in (("main", "config.json"), ("pooling", "1_Pooling/config.json"), ("vocab", "vocab.txt")):
        assert _read(os.path.join(src, rel)) == _read(res[key]), rel
        assert f"/snapshots/{refs['main']}/" in res[key]
    assert json.loads(_read(res["v1"]))["fakehub_revision"] == "v1.0"
    assert f"/snapshots/{refs['v1.0']}/" in res["v1"]
    assert json.loads(_read(res["pr"]))["fakehub_revision"] == "refs/pr/1"
    assert f"/snapshots/{refs['refs/pr/1']}/" in res["pr"]
    assert _read(res["sha"]) == _read(res["v1"])

    reqs = hub.requests()
    seq = _hub_paths(reqs)
    base = f"/{MINILM}/resolve/main/config.json"
    cache = f"/api/resolve-cache/models/{MINILM}/{refs['main']}/config.json"
    i = seq.index(("HEAD", base, 307))
    assert seq[i + 1:i + 3] == [("HEAD", cache, 200), ("GET", cache, 200)]
    assert ("HEAD", f"/{MINILM}/resolve/refs%2Fpr%2F1/config.json", 307) in seq
    # the body GET asked for gzip and got it (the client copes: bytes above are identical)
    get = next(r for r in reqs if r["method"] == "GET" and r["path"].startswith(cache))
    assert "gzip" in get["headers"].get("accept-encoding", "")
    assert not [r for r in reqs if r["server"] == "cdn"]


def test_lfs_files_come_from_the_cdn(hub, tmp_path):
    hub.reset()
    res = run_client(hub, tmp_path, f"""
        from huggingface_hub import hf_hub_download
        result = {{
            "model": hf_hub_download({MINILM!r}, "model.safetensors"),
            "tokenizer": hf_hub_download({MINILM!r}, "tokenizer.json"),
            "gpt2": hf_hub_download("gpt2", "weights.bin", token={PRIVATE_TOKEN!r}),
        }}
    """)
    src = _minilm_dir()
    assert _file_sha256(res["model"]) == _file_sha256(os.path.join(src, "model.safetensors"))
    assert _read(res["tokenizer"]) == _read(os.path.join(src, "tokenizer.json"))
    gpt2 = hub.repo("models/gpt2")
    meta = gpt2["commits"][gpt2["refs"]["main"]]["files"]["weights.bin"]
    assert meta["lfs"] and _file_sha256(res["gpt2"]) == meta["sha256"] == meta["etag"]
    reqs = hub.requests()
    hub_seq = _hub_paths(reqs)
    assert ("HEAD", f"/{MINILM}/resolve/main/model.safetensors", 302) in hub_seq
    assert ("HEAD", "/gpt2/resolve/main/weights.bin", 302) in hub_seq
    cdn = [r for r in reqs if r["server"] == "cdn"]
    assert len(cdn) == 3 and all(r["method"] == "GET" and r["status"] == 200 for r in cdn)
    assert all(r["path"].startswith("/repos/") and "Signature=" in r["path"] for r in cdn)
    # the token went to the hub, never to the CDN
    assert any(r["headers"].get("authorization") == f"Bearer {PRIVATE_TOKEN}" for r in reqs if r["server"] == "hub")
    assert hub.get_json("/_fake/state")["cdn_authorization_seen"] is False


def test_snapshot_download(hub, tmp_path):
    res = run_client(hub, tmp_path, f"""
        import os
        from huggingface_hub import snapshot_download
        result = {{
            "minilm": snapshot_download({MINILM!r}),
            "gpt2": snapshot_download("gpt2"),
            "dataset": snapshot_download("acme/tiny-dataset", repo_type="dataset"),
            "v1": snapshot_download({MINILM!r}, revision="v1.0", allow_patterns=["*.json"]),
        }}
    """)
    src = _minilm_dir()
    for key, repo_key in (("minilm", f"models/{MINILM}"), ("gpt2", "models/gpt2"),
                          ("dataset", "datasets/acme/tiny-dataset")):
        repo = hub.repo(repo_key)
        files = repo["commits"][repo["refs"]["main"]]["files"]
        got = sorted(os.path.relpath(os.path.join(d, f), res[key]).replace(os.sep, "/")
                     for d, _, fs in os.walk(res[key]) for f in fs)
        assert got == sorted(files), key
        for rel, meta in files.items():
            path = os.path.join(res[key], rel)
            if meta["lfs"]:
                assert _file_sha256(path) == meta["etag"], rel
            else:
                assert _git_blob_sha1(_read(path)) == meta["etag"], rel
            if key == "minilm" and not meta["lfs"]:
                assert _read(os.path.join(src, rel)) == _read(path), rel
    assert json.loads(_read(os.path.join(res["v1"], "config.json")))["fakehub_revision"] == "v1.0"
    assert not os.path.exists(os.path.join(res["v1"], "model.safetensors"))


def test_error_mapping_and_private_repos(hub, tmp_path):
    res = run_client(hub, tmp_path, CLIENT_OUTCOME + textwrap.dedent(f"""
        import os
        from huggingface_hub import hf_hub_download, HfApi

        dl = hf_hub_download
        api = HfApi()
        P, U = {PRIVATE_TOKEN!r}, {UNAPPROVED_TOKEN!r}
        result = {{
            "unknown": outcome(lambda: dl("acme/does-not-exist", "config.json")),
            "unknown_tok": outcome(lambda: dl("acme/does-not-exist", "config.json", token=U)),
            "private": outcome(lambda: dl("acme/private-model", "config.json")),
            "private_wrong": outcome(lambda: dl("acme/private-model", "config.json", token=U)),
            "private_ok": outcome(lambda: open(dl("acme/private-model", "config.json", token=P)).read()),
            "private_lfs": outcome(lambda: os.path.getsize(dl("acme/private-model", "weights.bin", token=P))),
            "private_info": outcome(lambda: api.model_info("acme/private-model", token=P).private),
            "private_info_anon": outcome(lambda: api.model_info("acme/private-model")),
            "gated": outcome(lambda: dl("acme/gated-model", "config.json")),
            "gated_unapproved": outcome(lambda: dl("acme/gated-model", "config.json", token=U)),
            "gated_ok": outcome(lambda: open(dl("acme/gated-model", "config.json", token=P)).read()),
            "gated_lfs": outcome(lambda: os.path.getsize(dl("acme/gated-model", "weights.bin", token=P))),
            "gated_info_anon": outcome(lambda: api.model_info("acme/gated-model").gated),
            "bad_rev": outcome(lambda: dl({MINILM!r}, "config.json", revision="no-such-branch")),
            "bad_rev_info": outcome(lambda: api.model_info({MINILM!r}, revision="no-such-branch")),
            "missing": outcome(lambda: dl({MINILM!r}, "no_such_file.json")),
            "missing_info": outcome(lambda: api.model_info("acme/does-not-exist")),
            "invalid_token": outcome(lambda: dl("gpt2", "config.json", token="hf_invalid_token")),
        }}
        import glob
        result["no_exist"] = glob.glob(os.path.join(os.environ["HF_HOME"], "hub", "*MiniLM*", ".no_exist", "*",
                                                    "no_such_file.json"))
    """))
    assert res["unknown"] == ["RepositoryNotFoundError", 401]
    assert res["unknown_tok"] == ["RepositoryNotFoundError", 404]
    assert res["private"] == ["RepositoryNotFoundError", 401]
    assert res["private_wrong"] == ["RepositoryNotFoundError", 404]
    assert res["private_ok"][0] == "ok" and "acme/private-model" in res["private_ok"][1]
    private = hub.repo("models/acme/private-model")
    assert res["private_lfs"] == ["ok", private["commits"][private["refs"]["main"]]["files"]["weights.bin"]["size"]]
    assert res["private_info"] == ["ok", True]
    assert res["private_info_anon"] == ["RepositoryNotFoundError", 401]
    assert res["gated"] == ["GatedRepoError", 401]
    assert res["gated_unapproved"] == ["GatedRepoError", 403]
    assert res["gated_ok"][0] == "ok" and res["gated_lfs"][0] == "ok"
    assert res["gated_info_anon"] == ["ok", "manual"]
    assert res["bad_rev"] == ["RevisionNotFoundError", 404]
    assert res["bad_rev_info"] == ["RevisionNotFoundError", 404]
    assert res["missing"] == ["EntryNotFoundError", 404]
    assert res["missing_info"] == ["RepositoryNotFoundError", 401]
    assert res["invalid_token"] == ["HfHubHTTPError", 401]
    assert len(res["no_exist"]) == 1 and hub.repo(f"models/{MINILM}")["refs"]["main"] in res["no_exist"][0]


def test_list_repo_tree_pagination(hub, tmp_path):
    hub.reset()
    res = run_client(hub, tmp_path, """
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile, RepoFolder
        api = HfApi()
        rec = list(api.list_repo_tree("acme/many-files", recursive=True))
        top = list(api.list_repo_tree("acme/many-files"))
        exp = list(api.list_repo_tree("acme/many-files", path_in_repo="folder_1", expand=True))
        info = api.get_paths_info("acme/many-files", ["README.md", "folder_0", "nope.txt"], expand=True)
        result = {
            "rec_files": sorted(e.path for e in rec if isinstance(e, RepoFile)),
            "rec_dirs": sorted(e.path for e in rec if isinstance(e, RepoFolder)),
            "top": [[type(e).__name__, e.path] for e in top],
            "exp_n": len(exp),
            "exp_commit": sorted({e.last_commit.oid for e in exp}),
            "exp_safe": all(e.security is not None and e.security.safe for e in exp if isinstance(e, RepoFile)),
            "paths_info": [[type(e).__name__, e.path] for e in info],
            "repo_files": len(api.list_repo_files("acme/many-files")),
        }
    """)
    repo = hub.repo("models/acme/many-files")
    files = repo["commits"][repo["refs"]["main"]]["files"]
    assert res["rec_files"] == sorted(files) and len(files) > 2500
    assert res["rec_dirs"] == sorted([f"folder_{i}" for i in range(5)]
                                     + ["folder_0/nested", "folder_0/nested/deep"])
    assert res["top"] == [["RepoFolder", f"folder_{i}"] for i in range(5)] + [["RepoFile", "README.md"]]
    assert res["exp_n"] == 500 and res["exp_commit"] == [repo["refs"]["main"]] and res["exp_safe"]
    assert res["paths_info"] == [["RepoFile", "README.md"], ["RepoFolder", "folder_0"]]
    assert res["repo_files"] == len(files)
    tree_gets = [r["path"] for r in hub.requests() if "/tree/" in r["path"]]
    recursive_pages = [p for p in tree_gets if "recursive=true" in p and "folder_1" not in p]
    assert sum("cursor=" in p for p in recursive_pages) >= 2 * 2  # two listings of 3 pages each
    assert len([p for p in tree_gets if "/tree/main/folder_1" in p]) == 10  # 500 entries / 50
    # the next-page link is an absolute URL on the hub's own base
    status, headers, _ = fetch("GET", hub.hub + "/api/models/acme/many-files/tree/main?recursive=true&expand=false")
    assert status == 200 and headers["link"].startswith(f"<{hub.hub}/api/models/acme/many-files/tree/main?")
    assert headers["link"].endswith('>; rel="next"') and "cursor=" in headers["link"]


def test_renamed_repo(hub, tmp_path):
    hub.reset()
    res = run_client(hub, tmp_path, """
        from huggingface_hub import hf_hub_download, HfApi
        result = {
            "old": open(hf_hub_download("old-org/old-name", "config.json")).read(),
            "new": open(hf_hub_download("new-org/new-name", "config.json")).read(),
            "info": HfApi().model_info("old-org/old-name").id,
        }
    """)
    assert res["old"] == res["new"] and "new-org/new-name" in res["new"]
    assert res["info"] == "new-org/new-name"
    seq = _hub_paths(hub.requests())
    assert ("HEAD", "/old-org/old-name/resolve/main/config.json", 307) in seq
    assert ("GET", "/api/models/old-org/old-name", 307) in seq
    status, headers, _ = fetch("HEAD", hub.hub + "/old-org/old-name/resolve/main/config.json")
    assert status == 307 and headers["location"] == "/new-org/new-name/resolve/main/config.json"
    status, headers, _ = fetch("GET", hub.hub + "/api/models/old-org/old-name/revision/main?blobs=true")
    assert status == 307 and headers["location"] == "/api/models/new-org/new-name/revision/main?blobs=true"


def test_xet_repo(hub, tmp_path):
    repo = hub.repo("models/acme/xet-model")
    sha = repo["refs"]["main"]
    meta = repo["commits"][sha]["files"]["weights.bin"]
    status, headers, _ = fetch("HEAD", hub.hub + "/acme/xet-model/resolve/main/weights.bin",
                              {"Accept-Encoding": "identity"})
    assert status == 302 and headers["x-xet-hash"] == meta["xet_hash"]
    assert headers["x-linked-etag"] == f'"{meta["sha256"]}"' and headers["x-linked-size"] == str(meta["size"])
    assert f'<{hub.hub}/api/models/acme/xet-model/xet-read-token/{sha}>; rel="xet-auth"' in headers["link"]
    assert 'rel="xet-reconstruction-info"' in headers["link"]
    assert headers["location"].startswith(hub.cdn + "/xet-bridge-us/")
    tree = hub.get_json("/api/models/acme/xet-model/tree/main")
    assert [e["xetHash"] for e in tree if e["path"] == "weights.bin"] == [meta["xet_hash"]]
    status, headers, _ = fetch("GET", hub.hub + f"/api/models/acme/xet-model/xet-read-token/{sha}")
    assert status == 200 and "x-xet-access-token" in headers
    hub.reset()
    res = run_client(hub, tmp_path, """
        import hashlib
        from huggingface_hub import hf_hub_download
        result = hashlib.sha256(open(hf_hub_download("acme/xet-model", "weights.bin"), "rb").read()).hexdigest()
    """, extra_env={"HF_HUB_DISABLE_XET": "1"})
    assert res == meta["sha256"]
    reqs = hub.requests()
    assert not [r for r in reqs if "xet-read-token" in r["path"] or r["path"].startswith("/cas")]
    assert [r["path"].split("/")[1] for r in reqs if r["server"] == "cdn"] == ["xet-bridge-us"]


def test_transformers_and_datasets(hub, tmp_path):
    res = run_client(hub, tmp_path, f"""
        from transformers import AutoConfig, AutoTokenizer
        import datasets
        cfg = AutoConfig.from_pretrained({MINILM!r})
        tok = AutoTokenizer.from_pretrained({MINILM!r})
        ds = datasets.load_dataset("acme/tiny-dataset", split="train")
        result = {{"hidden": cfg.hidden_size, "ids": tok("hello world")["input_ids"],
                   "rows": ds.num_rows, "first": ds[0]}}
    """)
    assert res["hidden"] == 384 and res["ids"][0] == 101 and res["ids"][-1] == 102
    assert res["rows"] == 6 and set(res["first"]) == {"text", "label"}


# ---------------------------------------------------------------------------------------------
# Raw protocol details


def test_resolve_headers_gzip_and_ranges(hub):
    repo = hub.repo(f"models/{MINILM}")
    sha = repo["refs"]["main"]
    vocab = _read(os.path.join(_minilm_dir(), "vocab.txt"))
    meta = repo["commits"][sha]["files"]["vocab.txt"]
    assert meta["etag"] == _git_blob_sha1(vocab) and not meta["lfs"]
    status, h, _ = fetch("HEAD", hub.hub + f"/{MINILM}/resolve/main/vocab.txt", {"Accept-Encoding": "identity"})
    assert status == 307 and h["x-repo-commit"] == sha and h["etag"] == f'"{meta["etag"]}"'
    assert h["location"] == (f"/api/resolve-cache/models/{MINILM}/{sha}/vocab.txt?%2F"
                             + MINILM.replace("/", "%2F") + f"%2Fresolve%2Fmain%2Fvocab.txt=&etag=%22{meta['etag']}%22")
    assert h["ratelimit"].startswith('"resolvers";r=') and h["ratelimit-policy"].startswith('"fixed window"')
    url = hub.hub + h["location"]
    status, h, body = fetch("HEAD", url, {"Accept-Encoding": "gzip"})
    assert status == 200 and h["content-length"] == str(len(vocab)) and "content-encoding" not in h and body == b""
    assert h["accept-ranges"] == "bytes" and "vocab.txt" in h["content-disposition"]
    status, h, body = fetch("GET", url, {"Accept-Encoding": "gzip, deflate"})
    assert status == 200 and h["content-encoding"] == "gzip" and "content-length" not in h
    assert h["transfer-encoding"] == "chunked" and gzip.decompress(body) == vocab
    status, h, body = fetch("GET", url, {"Accept-Encoding": "identity"})
    assert status == 200 and body == vocab and h["content-length"] == str(len(vocab))
    status, h, body = fetch("GET", url, {"Range": "bytes=100-199", "Accept-Encoding": "gzip"})
    assert status == 206 and body == vocab[100:200] and h["content-range"] == f"bytes 100-199/{len(vocab)}"
    status, h, body = fetch("GET", url, {"Range": "bytes=-5"})
    assert status == 206 and body == vocab[-5:]
    status, h, _ = fetch("GET", url, {"Range": f"bytes={len(vocab)}-"})
    assert status == 416 and h["content-range"] == f"bytes */{len(vocab)}"
    # private repos: 200 directly on resolve
    status, h, body = fetch("GET", hub.hub + "/acme/private-model/resolve/main/config.json",
                           {"Authorization": f"Bearer {PRIVATE_TOKEN}", "Accept-Encoding": "identity"})
    assert status == 200 and b"acme/private-model" in body and "x-repo-commit" in h
    # errors: headers and a JSON body on GET, X-Repo-Commit on EntryNotFound
    status, h, body = fetch("GET", hub.hub + f"/{MINILM}/resolve/main/nope.txt")
    assert (status, h["x-error-code"], h["x-repo-commit"]) == (404, "EntryNotFound", sha)
    assert json.loads(body) == {"error": "Entry not found"}
    status, h, _ = fetch("HEAD", hub.hub + f"/{MINILM}/resolve/x/config.json")
    assert (status, h["x-error-code"], h["x-error-message"]) == (404, "RevisionNotFound", "Invalid rev id: x")
    status, h, _ = fetch("HEAD", hub.hub + "/acme/nope/resolve/main/config.json")
    assert (status, h["x-error-code"], h["x-error-message"]) == (401, "RepoNotFound", "Invalid username or password.")
    status, h, _ = fetch("HEAD", hub.hub + "/acme/private-model/resolve/main/config.json",
                        {"Authorization": "Bearer hf_wrong"})
    assert (status, h["x-error-code"]) == (404, "RepoNotFound")
    status, h, _ = fetch("HEAD", hub.hub + "/datasets/acme/tiny-dataset/resolve/main/data%2Ftrain.jsonl")
    assert status == 307 and h["location"].startswith("/api/resolve-cache/datasets/acme/tiny-dataset/")


def test_cdn_signature_expiry_and_authorization_record(hub):
    repo = hub.repo("models/gpt2")
    meta = repo["commits"][repo["refs"]["main"]]["files"]["weights.bin"]
    status, h, _ = fetch("HEAD", hub.hub + "/gpt2/resolve/main/weights.bin")
    assert status == 302 and h["x-linked-etag"] == f'"{meta["sha256"]}"' and h["etag"] != h["x-linked-etag"]
    loc = h["location"]
    assert loc.startswith(hub.cdn + "/repos/") and "Key-Pair-Id=K1" in loc
    expires = int(loc.split("Expires=")[1].split("&")[0])
    assert abs(expires - (time.time() + 3600)) < 60  # --cdn-ttl 3600
    status, h, body = fetch("GET", loc)
    assert status == 200 and hashlib.sha256(body).hexdigest() == meta["sha256"]
    assert h["etag"] == f'"{hashlib.md5(body).hexdigest()}"' and "weights.bin" in h["content-disposition"]
    status, h, part = fetch("GET", loc, {"Range": "bytes=1000-"})
    assert status == 206 and part == body[1000:] and h["content-range"] == f"bytes 1000-{len(body) - 1}/{len(body)}"
    assert fetch("GET", loc, {"Range": f"bytes={len(body)}-"})[0] == 416
    tampered = loc.replace(f"Expires={expires}", f"Expires={expires + 1}")
    status, _, body = fetch("GET", tampered)
    assert status == 403 and b"AccessDenied" in body
    assert fetch("GET", loc.split("?")[0])[0] == 403
    assert hub.get_json("/_fake/state")["cdn_authorization_seen"] is False
    fetch("GET", loc, {"Authorization": "Bearer leaked"})
    assert hub.get_json("/_fake/state")["cdn_authorization_values"] == ["Bearer leaked"]
    hub.reset()
    assert hub.get_json("/_fake/state")["cdn_authorization_seen"] is False
    # expiry
    hub.post_json("/_fake/mode", {"cdn_ttl": 1})
    try:
        short = fetch("HEAD", hub.hub + "/gpt2/resolve/main/weights.bin")[1]["location"]
        assert fetch("HEAD", short)[0] == 200
        time.sleep(2.1)
        status, _, body = fetch("GET", short)
        assert status == 403 and b"expired" in body
    finally:
        hub.post_json("/_fake/mode", {"cdn_ttl": 3600})


def test_api_routes(hub):
    repo = hub.repo(f"models/{MINILM}")
    sha = repo["refs"]["main"]
    info = hub.get_json(f"/api/models/{MINILM}")
    assert info["id"] == MINILM and info["sha"] == sha and {"rfilename": "config.json"} in info["siblings"]
    info = hub.get_json(f"/api/models/{MINILM}/revision/v1.0?blobs=true")
    assert info["sha"] == repo["refs"]["v1.0"]
    sib = {s["rfilename"]: s for s in info["siblings"]}
    assert sib["model.safetensors"]["lfs"]["size"] == sib["model.safetensors"]["size"] == 90868376
    assert "lfs" not in sib["config.json"] and sib["config.json"]["blobId"]
    info = hub.get_json(f"/api/models/{MINILM}/revision/refs%2Fpr%2F1")
    assert info["sha"] == repo["refs"]["refs/pr/1"] and "PR_NOTES.md" in [s["rfilename"] for s in info["siblings"]]
    assert set(hub.get_json(f"/api/models/{MINILM}?expand=sha")) == {"_id", "id", "sha"}
    status, h, body = fetch("HEAD", hub.hub + f"/api/models/{MINILM}/revision/{sha}")
    assert status == 200 and body == b"" and int(h["content-length"]) > 0
    refs = hub.get_json(f"/api/models/{MINILM}/refs?include_prs=1")
    assert refs["branches"] == [{"name": "main", "ref": "refs/heads/main", "targetCommit": sha}]
    assert refs["tags"][0]["name"] == "v1.0" and refs["pullRequests"][0]["ref"] == "refs/pr/1"
    tree = hub.get_json(f"/api/models/{MINILM}/tree/main")
    assert tree[0] == {"type": "directory", "oid": tree[0]["oid"], "size": 0, "path": "1_Pooling"}
    st = next(e for e in tree if e["path"] == "model.safetensors")
    assert st["lfs"]["oid"] == repo["commits"][sha]["files"]["model.safetensors"]["sha256"] and st["size"] == 90868376 and st["lfs"]["pointerSize"] > 100
    status, h, body = fetch("GET", hub.hub + f"/api/models/{MINILM}/tree/main/additional_chat_templates")
    assert status == 404 and h["x-error-code"] == "EntryNotFound" and json.loads(body)["error"]
    status, _, body = fetch("POST", hub.hub + f"/api/models/{MINILM}/paths-info/main",
                           {"Content-Type": "application/x-www-form-urlencoded"},
                           b"paths=config.json&paths=1_Pooling&paths=missing&expand=false")
    assert status == 200 and [e["path"] for e in json.loads(body)] == ["config.json", "1_Pooling"]
    ds = hub.get_json("/api/datasets/acme/tiny-dataset/revision/main")
    assert ds["id"] == "acme/tiny-dataset" and {"rfilename": "data/train.jsonl"} in ds["siblings"]
    status, h, _ = fetch("GET", hub.hub + "/api/models/acme/nope", {"Authorization": f"Bearer {UNAPPROVED_TOKEN}"})
    assert (status, h["x-error-code"]) == (404, "RepoNotFound")
    status, h, _ = fetch("GET", hub.hub + "/api/models/acme/private-model")
    assert (status, h["x-error-code"]) == (401, "RepoNotFound")
    assert hub.get_json("/api/spaces/acme/tiny-space")["id"] == "acme/tiny-space"


def test_failure_modes_and_request_log(hub):
    hub.reset()
    url = hub.hub + "/gpt2/resolve/main/config.json"
    try:
        hub.post_json("/_fake/mode", {"mode": "down5xx"})
        assert fetch("HEAD", url)[0] == 503
        hub.post_json("/_fake/mode", {"mode": "429"})
        status, h, _ = fetch("GET", url)
        assert status == 429 and h["retry-after"] == "7" and h["ratelimit"] == '"resolvers";r=0;t=7'
        hub.post_json("/_fake/mode", {"mode": "hang"})
        with pytest.raises((socket.timeout, TimeoutError)):
            fetch("HEAD", url, timeout=0.5)
        assert hub.get_json("/_fake/state")["hub"]["mode"] == "hang"  # control routes still answer
        held = socket.create_connection(("127.0.0.1", urlsplit(hub.hub).port), timeout=5)
        held.sendall(b"HEAD /gpt2/resolve/main/config.json HTTP/1.1\r\nHost: x\r\n\r\n")
        # the CDN is not affected by the hub's mode
        loc_status = fetch("GET", hub.cdn + "/repos/x")[0]
        assert loc_status == 403
        hub.post_json("/_fake/mode", {"mode": "normal", "target": "cdn", "cut_after_bytes": 1000})
    finally:
        hub.post_json("/_fake/mode", {"mode": "normal"})
    assert held.recv(100) == b""  # leaving "hang" closed the held connection without an answer
    held.close()
    status, h, _ = fetch("HEAD", hub.hub + "/gpt2/resolve/main/weights.bin")
    assert status == 302
    with pytest.raises(IncompleteRead):
        fetch("GET", h["location"])
    hub.post_json("/_fake/mode", {"target": "cdn", "cut_after_bytes": None})
    assert fetch("GET", h["location"])[0] == 200
    assert fetch("HEAD", url)[0] == 307
    reqs = hub.requests()
    assert [(r["server"], r["method"], r["status"]) for r in reqs] == [
        ("hub", "HEAD", 503), ("hub", "GET", 429), ("hub", "HEAD", None), ("hub", "HEAD", None), ("cdn", "GET", 403),
        ("hub", "HEAD", 302), ("cdn", "GET", 200), ("cdn", "GET", 200), ("hub", "HEAD", 307)]
    assert reqs[0]["path"] == "/gpt2/resolve/main/config.json" and "host" in reqs[0]["headers"]
    hub.reset()
    assert hub.requests() == []
