"""
Cached private and gated content reaches only clients the hub would let read
it (artifact_vault/backends/hf_access.py), online, offline, and in both
access modes.  Real daemon, fake hub, raw requests and the real client.
"""

import pytest

from tests.hfenv import PRIVATE_TOKEN, UNAPPROVED_TOKEN, fake_hub, fetch, run_client, vault_process

P = {"Authorization": f"Bearer {PRIVATE_TOKEN}"}
U = {"Authorization": f"Bearer {UNAPPROVED_TOKEN}"}


def backends(hub, **config):
    return [{"type": "huggingface", "config": {"base_url": hub.hub, "offline_timeout": 1, **config}}]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with fake_hub(tmp_path_factory.mktemp("hub")) as h:
        yield h


def commit_of(hub, repo):
    return hub.repo(f"models/{repo}")["refs"]["main"]


def test_cached_private_and_gated_files_are_not_served_to_others(hub, tmp_path):
    with vault_process(tmp_path / "v", backends(hub)) as v:
        for repo in ("acme/private-model", "acme/gated-model"):
            url = f"{v.endpoint}/{repo}/resolve/{commit_of(hub, repo)}/config.json"
            status, _, body = fetch("GET", url, P)
            assert status == 200 and repo.encode() in body  # now cached
            anonymous = fetch("GET", url)
            unapproved = fetch("GET", url, U)
            if repo == "acme/private-model":
                assert anonymous[0] == 401 and anonymous[1]["x-error-code"] == "RepoNotFound"
                assert unapproved[0] == 404 and unapproved[1]["x-error-code"] == "RepoNotFound"
            else:
                assert anonymous[0] == 401 and anonymous[1]["x-error-code"] == "GatedRepo"
                assert unapproved[0] == 403 and unapproved[1]["x-error-code"] == "GatedRepo"
            assert body not in anonymous[2] and body not in unapproved[2]
            assert fetch("HEAD", url)[0] == 401
        # The real client raises what it would raise against the hub.
        res = run_client(v.endpoint, tmp_path, """
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
            out = []
            for repo, cls in (("acme/private-model", RepositoryNotFoundError), ("acme/gated-model", GatedRepoError)):
                try:
                    hf_hub_download(repo, "config.json")
                    out.append("served")
                except cls:
                    out.append(cls.__name__)
            result = out
        """)
        assert res == ["RepositoryNotFoundError", "GatedRepoError"]


def test_answers_are_remembered_for_access_ttl(hub, tmp_path):
    with vault_process(tmp_path / "v", backends(hub, access_ttl=300)) as v:
        url = f"{v.endpoint}/acme/private-model/resolve/{commit_of(hub, 'acme/private-model')}/config.json"
        assert fetch("GET", url, P)[0] == 200
        hub.reset()
        for _ in range(5):
            assert fetch("GET", url, P)[0] == 200
            assert fetch("GET", url)[0] == 401
        checks = [r for r in hub.requests() if r["server"] == "hub"]
        assert len(checks) == 1  # the anonymous client's one check; then both answers are remembered


def test_offline_honours_only_earlier_yes_answers(hub, tmp_path):
    with vault_process(tmp_path / "v", backends(hub, offline_access_grace=3600)) as v:
        private = f"{v.endpoint}/acme/private-model/resolve/{commit_of(hub, 'acme/private-model')}/config.json"
        public = f"{v.endpoint}/gpt2/resolve/{commit_of(hub, 'gpt2')}/config.json"
        assert fetch("GET", private, P)[0] == 200
        assert fetch("GET", public)[0] == 200
        hub.post_json("/_fake/mode", {"mode": "down5xx"})
        try:
            # access_ttl has not run out: remembered answers, no hub needed
            assert fetch("GET", private, P)[0] == 200
            assert fetch("GET", public)[0] == 200
            # nobody ever checked this token: offline never means public; the repo is
            # known to be private, so the answer is the hub's to an outsider
            status, headers, body = fetch("GET", private, U)
            assert status == 404 and headers["x-error-code"] == "RepoNotFound"
            assert b"cannot confirm access" in body
            status, headers, _ = fetch("GET", private)
            assert status == 401 and headers["x-error-code"] == "RepoNotFound"
        finally:
            hub.post_json("/_fake/mode", {"mode": "normal"})


def test_per_client_mode_never_lends_the_vault_token(hub, tmp_path):
    for mode, expected in (("shared", 200), ("per-client", 401)):
        with vault_process(tmp_path / mode, backends(hub, token=PRIVATE_TOKEN, access=mode)) as v:
            url = f"{v.endpoint}/acme/private-model/resolve/main/config.json"
            assert fetch("GET", url, P)[0] == 200
            assert fetch("GET", url)[0] == expected, mode
            assert fetch("GET", f"{v.endpoint}/api/models/acme/private-model")[0] == expected, mode
