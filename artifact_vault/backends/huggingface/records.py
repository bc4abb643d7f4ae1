"""
What the Hugging Face backend writes down besides file contents: small JSON
records below ``cache_dir/<name>/``, read back when the hub is not asked
(a commit's file metadata, offline answers, restarts).

``meta/<type>/<repo>/<commit>/<path>``   what the hub said of a file at a commit
``missing/<type>/<repo>/<commit>``       the paths the hub said do not exist there (one record)
``api-missing/<type>/<repo>``            "no such path" answers of the API (one record)
``refs/<type>/<repo>/<revision>``        the commit a branch or tag last resolved to (a kept answer)

Records are written in a thread (a failure to keep one costs offline use
later, not the answer now: it is logged); until the write is done, the
record is served from memory.
"""

import json
from urllib.parse import quote

from ...bounded import LRU
from ...freshness import Answer
from .hub import COMMIT, Repo


#: records kept in memory after they were written or read
MEMORY_LIMIT = 10_000
#: entries one not-found record names (the oldest go first)
MISSING_LIMIT = 256
#: and at most about this many bytes (paths may be long)
MISSING_BYTES = 48 * 1024


class Records:
    def __init__(self, backend):
        self.name = backend.name
        self.store = backend.store
        self.kept = backend.kept
        self.revision_ttl = float(backend.config.options.get("revision_ttl", 60))
        self._memory = LRU(MEMORY_LIMIT)

    # -- any record ----------------------------------------------------------------

    def load(self, key: str):
        """The record at `key`, or None; a record in use is marked as used (eviction)."""
        document = self._memory.get(key)
        if document is not None:
            return document
        entry = self.store.lookup(key)
        if entry is None:
            return None
        self.store.touch(entry)
        try:
            with open(entry.path, "rb") as f:
                document = json.load(f)
        except (OSError, ValueError):
            return None
        self._memory[key] = document
        return document

    def keep(self, key: str, document) -> None:
        """Write `document` at `key` (in a thread); it is readable from memory at once."""
        self._memory[key] = document
        body = json.dumps(document, sort_keys=True).encode()
        self.store.write_later(key, body, {"content_type": "application/json"})

    # -- branches and tags ------------------------------------------------------------

    def _ref_key(self, repo: Repo, rev: str) -> str:
        return f"{self.name}/refs/{repo.key}/{quote(rev, safe='')}"

    def fresh_commit(self, repo: Repo, rev: str, now: float) -> str | None:
        """The commit of `rev` if the hub named it less than ``revision_ttl`` seconds ago."""
        kept = self.kept.peek(self._ref_key(repo, rev))
        if kept is not None and kept.age(now) < self.revision_ttl:
            return _commit_of(kept)
        return None

    def last_commit(self, repo: Repo, rev: str) -> str | None:
        """The last commit the hub named for `rev`, however old (offline use)."""
        if COMMIT.match(rev):
            return rev
        kept = self.kept.peek(self._ref_key(repo, rev))
        return _commit_of(kept) if kept is not None else None

    def remember_ref(self, repo: Repo, rev: str, commit: str, now: float) -> None:
        if COMMIT.match(rev) or not COMMIT.match(commit or ""):
            return
        key = self._ref_key(repo, rev)
        previous = self.kept.peek(key)
        answer = Answer(200, {"content-type": "application/json"},
                        json.dumps({"commit": commit, "revision": rev}).encode(), now)
        if previous is not None and _commit_of(previous) == commit:
            self.kept.renew(key, now)  # the same commit: no write
        else:
            self.kept.keep(key, answer)

    # -- file metadata ----------------------------------------------------------------------

    def _meta_key(self, repo: Repo, commit: str, path: str) -> str:
        return f"{self.name}/meta/{repo.key}/{commit}/{path}"

    def load_info(self, repo: Repo, commit: str, path: str) -> dict | None:
        """What the hub said of `path` at `commit`: its metadata, or that it does not exist."""
        info = self.load(self._meta_key(repo, commit, path))
        if isinstance(info, dict):
            return info
        message = self._missing_paths(repo, commit).get(path)
        if message is None:
            return None
        return {"missing": True, "commit": commit, "error_code": "EntryNotFound", "error_message": message}

    def save_info(self, repo: Repo, commit: str, path: str, info: dict) -> None:
        self.keep(self._meta_key(repo, commit, path), info)

    def _missing_key(self, repo: Repo, commit: str) -> str:
        return f"{self.name}/missing/{repo.key}/{commit}"

    def _missing_paths(self, repo: Repo, commit: str) -> dict:
        """
        The paths the hub said do not exist at `commit` (transformers probes a
        few optional files per model): one record per commit, at most
        `MISSING_LIMIT` paths, so that asking for made-up paths neither
        creates a file per path nor lets a made-up folder ("config.json/x")
        stand where a real file belongs.
        """
        found = self.load(self._missing_key(repo, commit))
        return found if isinstance(found, dict) else {}

    def note_missing(self, repo: Repo, commit: str, path: str, message: str) -> None:
        self._note_bounded(self._missing_key(repo, commit), self._missing_paths(repo, commit), path, message)

    # -- API answers that say "no such path" -------------------------------------------------

    def _api_missing_key(self, repo: Repo) -> str:
        return f"{self.name}/api-missing/{repo.key}"

    def api_missing(self, repo: Repo, key: str) -> dict | None:
        """A kept "no such path" API answer: {status, headers, content_type, body}."""
        found = self.load(self._api_missing_key(repo))
        answer = found.get(key) if isinstance(found, dict) else None
        return answer if isinstance(answer, dict) else None

    def note_api_missing(self, repo: Repo, key: str, answer: dict) -> None:
        found = self.load(self._api_missing_key(repo))
        self._note_bounded(self._api_missing_key(repo), found if isinstance(found, dict) else {}, key, answer)

    def _note_bounded(self, record_key: str, record: dict, name: str, value) -> None:
        if record.get(name) == value:
            return
        record = dict(record)
        record.pop(name, None)
        record[name] = value
        size = sum(len(k) + len(json.dumps(v)) for k, v in record.items())
        while len(record) > MISSING_LIMIT or (size > MISSING_BYTES and len(record) > 1):
            oldest = next(iter(record))
            size -= len(oldest) + len(json.dumps(record.pop(oldest)))
        self.keep(record_key, record)


def _commit_of(answer: Answer) -> str | None:
    try:
        commit = json.loads(answer.body).get("commit")
    except (ValueError, AttributeError):
        return None
    return commit if isinstance(commit, str) and COMMIT.match(commit) else None
