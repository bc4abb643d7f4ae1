"""
Tokens never leak.  A vault with a configured hub token (and, in one setup,
access tokens for its own clients) serves the real huggingface_hub client and
raw requests: public, private and gated repos, LFS files through the CDN,
errors of every kind, the status pages.  Then everything is collected:

* every byte the vault sent to the real client (a recording TCP relay sits
  between them), and every status line, header and body of the raw requests;
* the vault's log file and its stderr;
* every file in the cache folder (entries, sidecars, lock files, records);
* every request the fake hub and the fake CDN received (/_fake/requests) and
  the CDN's Authorization record (/_fake/state).

Each token may appear only in requests to the hub's origin; a vault access
token nowhere upstream at all.
"""

import json
import os
import socket
import threading

import pytest

from tests.hfenv import (
    PRIVATE_TOKEN,
    UNAPPROVED_TOKEN,
    fake_hub,
    fetch,
    run_client,
    vault_process,
)

INVALID_TOKEN = "hf_invalid_token"  # tests/fakehub.py answers it 401 "Invalid credentials"
VAULT_TOKEN = "vault-access-token-7f3a9c"
HUB_TOKENS = (PRIVATE_TOKEN, UNAPPROVED_TOKEN, INVALID_TOKEN)


class Relay:
    """A TCP relay in front of the vault that keeps every byte each way, per connection."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.to_client, self.to_vault = [], []
        self.threads = []
        self.closed = False
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            vault = socket.create_connection(("127.0.0.1", self.target_port))
            down, up = bytearray(), bytearray()
            self.to_client.append(down)
            self.to_vault.append(up)
            for src, dst, record in ((client, vault, up), (vault, client, down)):
                t = threading.Thread(target=self._pump, args=(src, dst, record), daemon=True)
                t.start()
                self.threads.append(t)

    @staticmethod
    def _pump(src, dst, record):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                record += data
                dst.sendall(data)
        except OSError:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self):
        self.closed = True
        self.listener.close()
        for t in self.threads:
            t.join(5)


def hf_backend(hub, **config):
    return [{"type": "huggingface", "config": {"base_url": hub.hub, "token": PRIVATE_TOKEN, "offline_timeout": 2,
                                               **config}}]


SETUPS = {
    # the integration guide's setup: the vault's token serves clients without one; clients must show a vault token
    "shared-with-access-tokens": ({"access": "shared"}, {"access_tokens": [VAULT_TOKEN]}),
    # the stricter mode: the vault never lends its token
    "per-client": ({"access": "per-client"}, {}),
}

CLIENT = """
    from huggingface_hub import HfApi, hf_hub_download

    V = {vault_headers!r}
    TOKENS = {{"default": None, "private": {private!r}, "unapproved": {unapproved!r}, "invalid": {invalid!r}}}

    def outcome(fn):
        try:
            return ["ok", str(fn())[:300]]
        except Exception as e:
            return [type(e).__name__, str(e)[:3000]]

    result = {{}}
    for label, token in TOKENS.items():
        # Without a token of its own the client shows the vault token as HF_TOKEN (the guide's way); with
        # one, it sends its hub token and the vault token in X-Vault-Token.
        kw = {{"cache_dir": "hf-" + label}}
        if token:
            kw["token"] = token
            if V:
                kw["headers"] = V
        api = HfApi(token=token, headers=V if token and V else None)
        for repo in ("gpt2", "acme/private-model", "acme/gated-model"):
            for name in ("config.json", "weights.bin"):
                result[f"{{label}} {{repo}} {{name}}"] = outcome(lambda: hf_hub_download(repo, name, **kw))
            result[f"{{label}} {{repo}} info"] = outcome(lambda: api.model_info(repo).sha)
            result[f"{{label}} {{repo}} files"] = outcome(lambda: api.list_repo_files(repo))
        result[f"{{label}} missing file"] = outcome(lambda: hf_hub_download("gpt2", "nope.json", **kw))
        result[f"{{label}} unknown repo"] = outcome(lambda: hf_hub_download("acme/nope", "config.json", **kw))
        result[f"{{label}} bad revision"] = outcome(lambda: hf_hub_download("gpt2", "config.json", revision="nope",
                                                                            **kw))
"""


def raw_requests(vault_headers):
    """(method, path, headers, body) of raw requests: every kind of answer, with every token."""
    out = []
    identities = {"none": {}, **{t: {"Authorization": f"Bearer {t}"} for t in HUB_TOKENS}}
    for auth in identities.values():
        h = {**vault_headers, **auth}
        for repo in ("gpt2", "acme/private-model", "acme/gated-model", "acme/nope"):
            for f in ("config.json", "weights.bin", "nope.json"):
                for method in ("HEAD", "GET"):
                    out.append((method, f"/huggingface/{repo}/resolve/main/{f}", h, None))
            out.append(("GET", f"/huggingface/{repo}/resolve/nope/config.json", h, None))
            out.append(("GET", f"/huggingface/{repo}/resolve/main/weights.bin", {**h, "Range": "bytes=10-99"}, None))
            for api in ("", "/revision/main", "/tree/main?recursive=true", "/refs", "/xet-read-token/main"):
                out.append(("GET", f"/huggingface/api/models/{repo}{api}", h, None))
            out.append(("POST", f"/huggingface/api/models/{repo}/paths-info/main",
                        {**h, "Content-Type": "application/x-www-form-urlencoded"}, b"paths=config.json&expand=true"))
            out.append(("POST", f"/huggingface/api/models/{repo}/commit/main", h, b"{}"))
        out.append(("GET", "/huggingface/api/whoami-v2", h, None))
        for page in ("health", "metrics", "status", "nope", ""):
            out.append(("GET", f"/_vault/{page}", h, None))
    # tokens in odd places: a cookie, a wrong vault token (a query string: see the test at the end)
    for t in HUB_TOKENS:
        out.append(("GET", "/huggingface/api/models/gpt2", {**vault_headers, "Cookie": f"token={t}"}, None))
        out.append(("GET", "/huggingface/gpt2/resolve/main/config.json", {**vault_headers, "X-Api-Key": t}, None))
    out.append(("GET", "/huggingface/gpt2/resolve/main/config.json", {"X-Vault-Token": VAULT_TOKEN + "x"}, None))
    out.append(("GET", "/huggingface/gpt2/resolve/main/config.json", {"Authorization": f"Bearer {VAULT_TOKEN}x"}, None))
    out.append(("GET", "/_vault/health", {"Authorization": f"Bearer {VAULT_TOKEN}"}, None))
    return out


def answer_text(status, headers, body):
    return (f"{status}\n" + "\n".join(f"{k}: {v}" for k, v in headers.items()) + "\n\n").encode() + body


def folder_files(root):
    for d, _, fs in os.walk(root):
        for f in fs:
            path = os.path.join(d, f)
            if os.path.isfile(path):
                yield path


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with fake_hub(tmp_path_factory.mktemp("hub")) as h:
        yield h


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_tokens_appear_nowhere_but_in_requests_to_the_hub(hub, tmp_path, setup):
    config, top = SETUPS[setup]
    vault_headers = {"X-Vault-Token": VAULT_TOKEN} if "access_tokens" in top else {}
    secrets = HUB_TOKENS + ((VAULT_TOKEN,) if vault_headers else ())
    hub.reset()
    haystacks = {}  # what -> bytes that must hold no token
    with vault_process(tmp_path / "vault", hf_backend(hub, **config), **top) as v:
        relay = Relay(int(v.url.rsplit(":", 1)[1]))
        try:
            env = {"HF_TOKEN": VAULT_TOKEN} if vault_headers else {}
            res = run_client(f"http://127.0.0.1:{relay.port}/huggingface", tmp_path, CLIENT.format(
                vault_headers=vault_headers, private=PRIVATE_TOKEN, unapproved=UNAPPROVED_TOKEN,
                invalid=INVALID_TOKEN), extra_env=env, timeout=300)
        finally:
            relay.close()
        for i, data in enumerate(relay.to_client):
            haystacks[f"relay: vault -> client, connection {i}"] = bytes(data)
        haystacks["client results"] = json.dumps(res).encode()
        for method, path, headers, body in raw_requests(vault_headers):
            status, h, answer = fetch(method, v.url + path, headers, body)
            haystacks[f"raw {method} {path} {sorted(headers)}"] = answer_text(status, h, answer)
        log = v.log()
    stderr = v.proc.stderr.read()
    haystacks["vault log"] = log.encode()
    haystacks["vault stderr"] = stderr
    for path in folder_files(v.folder / "cache"):
        with open(path, "rb") as f:
            haystacks[f"cache file {os.path.relpath(path, v.folder)}"] = f.read()
        haystacks[f"cache file name {path}"] = path.encode()
    for path in folder_files(tmp_path):  # the clients' own caches, the config aside
        if "hf-" in path and os.path.basename(path) != "token":
            with open(path, "rb") as f:
                haystacks[f"client cache {os.path.relpath(path, tmp_path)}"] = f.read()

    upstream = hub.requests()
    state = hub.get_json("/_fake/state")
    hub_auth = []
    for r in upstream:
        text = json.dumps(r).encode()
        if r["server"] == "cdn":
            haystacks[f"CDN request {r['method']} {r['path'][:80]}"] = text
        else:
            # the hub's origin may get the hub tokens, never the vault's own access token
            assert VAULT_TOKEN.encode() not in text, r
            hub_auth.append(r["headers"].get("authorization"))

    found = [(what, s) for what, data in haystacks.items() for s in secrets if s.encode() in data]
    assert found == [], "\n".join(f"{s} in {what}" for what, s in found[:30])
    assert state["cdn_authorization_seen"] is False

    # The test was live: the tokens went to the hub, the CDN served LFS files, the client saw all kinds of answers.
    assert {f"Bearer {t}" for t in HUB_TOKENS} <= set(hub_auth)
    if config["access"] == "shared":
        assert f"Bearer {PRIVATE_TOKEN}" in hub_auth  # the configured one
    assert [r for r in upstream if r["server"] == "cdn" and r["method"] == "GET"]
    assert res["private acme/private-model config.json"][0] == "ok"
    assert res["private acme/gated-model weights.bin"][0] == "ok"
    assert res["unapproved acme/gated-model config.json"][0] == "GatedRepoError"
    assert res["invalid gpt2 config.json"][0] != "ok" or res["invalid gpt2 info"][0] != "ok"
    assert res["default gpt2 weights.bin"][0] == "ok"
    assert res["default acme/private-model config.json"][0] == ("ok" if config["access"] == "shared"
                                                                 else "RepositoryNotFoundError")
    relayed = [d for what, d in haystacks.items() if what.startswith("relay:")]
    assert sum(map(len, relayed)) > 600_000  # the LFS files went through the relay
    total = sum(len(d) for d in haystacks.values())
    print(f"{setup}: searched {len(haystacks)} places, {total} bytes ({len(relayed)} relayed connections, "
          f"{sum(map(len, relayed))} bytes), {len(upstream)} upstream requests; client outcomes: "
          + json.dumps({k: o[0] for k, o in res.items()}))


def test_a_token_in_a_query_string_is_not_logged(hub, tmp_path):
    with vault_process(tmp_path / "vault", hf_backend(hub)) as v:
        for path in (f"/huggingface/api/models/gpt2?token={PRIVATE_TOKEN}",
                     f"/huggingface/gpt2/resolve/main/config.json?access_token={PRIVATE_TOKEN}",
                     f"/huggingface/api/whoami-v2?token={PRIVATE_TOKEN}"):
            status, headers, body = fetch("GET", v.url + path)
            assert PRIVATE_TOKEN.encode() not in answer_text(status, headers, body)
        log = v.log()
    assert PRIVATE_TOKEN not in log, [line for line in log.splitlines() if PRIVATE_TOKEN in line][:3]


def test_the_vault_token_never_goes_upstream_even_when_sent_both_ways(hub, tmp_path):
    with vault_process(tmp_path / "vault", hf_backend(hub), access_tokens=[VAULT_TOKEN]) as v:
        hub.reset()
        both = {"X-Vault-Token": VAULT_TOKEN, "Authorization": f"Bearer {VAULT_TOKEN}"}
        status, _, _ = fetch("GET", v.url + "/huggingface/gpt2/resolve/main/config.json", both)
        assert status == 200
    leaked = [r for r in hub.requests() if VAULT_TOKEN in json.dumps(r)]
    assert leaked == [], [(r["server"], r["method"], r["path"], r["headers"].get("authorization")) for r in leaked]
