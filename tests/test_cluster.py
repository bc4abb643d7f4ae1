"""
Several vaults as one cluster.

``peers:`` (in-process, real sockets): a vault shows its peers' numbers on
its status page, in ``/_vault/cluster.json``, in the admin ``stats`` and so
in ``artifact-vault stats``; a peer that is down, hangs or is no vault shows
as down; nothing of a peer's names and nothing of this vault's credentials
crosses.

The cluster (real daemons): three vaults behind HAProxy from the Debian
package, configured as etc/haproxy.cfg with the addresses replaced, in front
of the fake hub, with real clients (see `test_three_vaults_behind_haproxy`).
"""

import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import pytest_twisted
import yaml
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread

from artifact_vault import cli
from artifact_vault.cluster import PEER_BODY_LIMIT, VIEW_TTL
from artifact_vault.config import ConfigError, MAX_PEERS, parse
from tests.test_core import SMALL, backend, sleep

ADMIN = "admin-token-0123456789"
ACCESS = "cluster-access-token"


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@contextlib.contextmanager
def silent_server():
    """A peer that accepts connections and never answers."""
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{port.getHost().port}"
    finally:
        port.stopListening()


async def get_json(http, url, headers=None):
    response = await http.get(url, headers=headers)
    assert response.code == 200, (url, response.code, await response.text())
    return json.loads(await response.content())


def counted(requests):
    return {k: v for k, v in requests.items() if v}


def node(view, url):
    return next(n for n in view["nodes"] if n.get("url") == url)


# -- peers: configuration --------------------------------------------------------------


def test_peers_configuration():
    config = parse({"peers": ["http://10.0.0.12:8080/", "http://10.0.0.13:8080", "http://10.0.0.12:8080"],
                    "peers_token": "${PEERS_TOKEN}"}, environ={"PEERS_TOKEN": ACCESS})
    assert config.peers == ("http://10.0.0.12:8080", "http://10.0.0.13:8080")
    assert config.peers_token == ACCESS
    assert parse({"peers": "http://a:1, http://b:2"}, environ={}).peers == ("http://a:1", "http://b:2")
    assert parse({}, environ={}).peers == () and parse({}, environ={}).peers_token is None
    for bad, key in [("ftp://a", "peers[0]"), (["http://user:pw@a"], "peers[0]"), (["http://a?x=1"], "peers[0]"),
                     ([{"url": "http://a"}], "peers[0]"), ({"a": 1}, "peers"),
                     ([f"http://h{i}" for i in range(MAX_PEERS + 1)], "peers")]:
        with pytest.raises(ConfigError) as e:
            parse({"peers": bad}, environ={})
        assert e.value.key == key, bad
    with pytest.raises(ConfigError) as e:
        parse({"peers_token": "short"}, environ={})
    assert e.value.key == "peers_token"


# -- peers: the cluster view -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cluster_view_shows_each_peer_up_or_down(vault_factory, upstream, http, logged):
    upstream.add("/a.json", SMALL)
    b = vault_factory(backend(upstream))
    for _ in range(3):
        await (await http.get(b.url + "/files/a.json")).content()
    dead = closed_port_url()
    with silent_server() as silent:
        a = vault_factory(backend(upstream), admin_token=ADMIN,
                          peers=[b.url, dead, silent, upstream.url + "/not-a-vault"])
        await (await http.get(a.url + "/files/a.json")).content()
        started = time.monotonic()
        view = await get_json(http, a.url + "/_vault/cluster.json")
        assert time.monotonic() - started < 4  # the silent peer costs its timeout, once

    me = view["nodes"][0]
    assert me["self"] is True and me["up"] is True and me["url"] is None
    assert counted(me["requests"]) == {"hit": 1}
    up = node(view, b.url)
    assert up["up"] is True and counted(up["requests"]) == {"miss": 1, "hit": 2} and up["hit_ratio"] == 0.667
    assert set(up) >= {"pid", "uptime_seconds", "cache", "downloads", "errors"}
    assert node(view, dead) == {"url": dead, "up": False, "error": f"cannot connect to {dead}/_vault/status.json"}
    assert node(view, silent)["up"] is False and "no answer within 2 s" == node(view, silent)["error"]
    assert node(view, upstream.url + "/not-a-vault")["error"] == "answered HTTP 404"
    assert view["total"]["nodes"] == 5 and view["total"]["up"] == 2
    assert counted(view["total"]["requests"]) == {"hit": 3, "miss": 1} and view["total"]["hit_ratio"] == 0.75
    assert sorted(m for m in logged.messages() if m.startswith("Peer ")) == sorted([
        f"Peer {dead} is down: cannot connect to {dead}/_vault/status.json",
        f"Peer {silent} is down: no answer within 2 s",
        f"Peer {upstream.url}/not-a-vault is down: answered HTTP 404"])

    # the status page has the same rows, server-rendered
    page = (await (await http.get(a.url + "/_vault/")).content()).decode()
    cluster = page[page.index("<h2>Cluster</h2>"):page.index("<h2>Downloads in flight</h2>")]
    assert "<td>this vault</td><td>up</td>" in cluster
    assert f"<td>{b.url}</td><td>up</td>" in cluster and "<td>66.7 %</td>" in cluster
    assert f'<tr class="down"><td>{dead}</td><td>down: cannot connect' in cluster
    assert "cluster: 2 of 5 up" in cluster and "<td>75.0 %</td>" in cluster
    assert 'fetch("cluster.json"' in page
    # and without peers: no such section, no cluster.json
    assert "<h2>Cluster</h2>" not in (await (await http.get(b.url + "/_vault/")).content()).decode()
    assert (await http.get(b.url + "/_vault/cluster.json")).code == 404

    # the admin stats carry it, and so artifact-vault stats
    stats = await get_json(http, a.url + "/_vault/admin/stats", {"X-Admin-Token": ADMIN})
    assert [n["up"] for n in stats["cluster"]["nodes"]] == [True, True, False, False, False]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = await deferToThread(cli.main, ["--url", a.url, "--token", ADMIN, "stats"])
    assert status == 0
    text = out.getvalue()
    lines = text[text.index("cluster:"):].splitlines()
    assert re.match(r"^this vault +up +1 +100\.0%", lines[2])
    assert re.match(rf"^{re.escape(b.url)} +up +3 +66\.7%", lines[3])
    assert re.match(rf"^{re.escape(dead)} +DOWN", lines[4])
    assert re.match(r"^cluster \(2 of 5 up\) +4 +75\.0%", lines[7])
    assert f"  {dead}: cannot connect to {dead}/_vault/status.json" in lines


@pytest_twisted.ensureDeferred
async def test_peers_are_asked_once_per_moment_and_know_their_own_vault(vault_factory, upstream, other_origin,
                                                                        http):
    other_origin.add("/_vault/status.json", json.dumps({"requests": {"hit": 1}}).encode(), delay_headers=0.2)
    b = vault_factory(backend(upstream))
    a = vault_factory(backend(upstream), peers=[b.url, other_origin.url])
    a.vault.peers.urls += (a.url,)  # the same list on every vault: this one included
    views = await gatherResults([Deferred.fromCoroutine(get_json(http, a.url + "/_vault/cluster.json"))
                                 for _ in range(3)])
    views.append(await get_json(http, a.url + "/_vault/cluster.json"))
    assert views[0]["nodes"][0] == {**views[0]["nodes"][0], "self": True, "url": a.url, "up": True}
    assert [n["url"] for n in views[0]["nodes"]] == [a.url, b.url, other_origin.url]
    assert views[0]["total"]["nodes"] == 3 and views[0]["total"]["up"] == 3
    assert other_origin.count("/_vault/status.json") == 1  # four views at once and soon after: one question
    await sleep(VIEW_TTL + 0.1)
    await get_json(http, a.url + "/_vault/cluster.json")
    assert other_origin.count("/_vault/status.json") == 2


@pytest_twisted.ensureDeferred
async def test_what_crosses_to_a_peer_and_back(vault_factory, upstream, other_origin, http):
    """Numbers only come back; no credential goes out but peers_token, and that to the peers only."""
    liar = {"pid": 7, "uptime_seconds": 1e9, "hit_ratio": 9, "instance": "x",
            "requests": {"hit": 2, "<script>alert(1)</script>": 5, "miss": "many", "stale": True},
            "cache": {"bytes": -1, "files": 3, "secret/file.bin": 1},
            "downloads": [{"name": "acme/private/weights.bin"}], "recent_errors": [{"what": "acme/private/x"}]}
    other_origin.add("/_vault/status.json", json.dumps(liar).encode())
    other_origin.add("/big/_vault/status.json", b"{" + b" " * PEER_BODY_LIMIT + b"}")
    other_origin.add("/moved/_vault/status.json", redirect=(302, upstream.url + "/elsewhere"))
    upstream.add("/elsewhere", json.dumps(liar).encode())
    b = vault_factory(backend(upstream), access_tokens=[ACCESS])
    a = vault_factory(backend(upstream), admin_token=ADMIN, access_tokens=["a-own-client-token"],
                      peers=[b.url, other_origin.url, other_origin.url + "/big", other_origin.url + "/moved"],
                      peers_token=ACCESS)
    view = await get_json(http, a.url + "/_vault/cluster.json",
                          {"X-Vault-Token": "a-own-client-token", "X-Admin-Token": ADMIN})
    assert node(view, b.url)["up"] is True  # b wants an access token: peers_token is one of its own
    assert node(view, other_origin.url) == {
        "url": other_origin.url, "up": True, "pid": 7, "uptime_seconds": 1e9, "hit_ratio": None,
        "requests": {"hit": 2}, "cache": {"files": 3}, "downloads": 1, "errors": 1}
    assert node(view, other_origin.url + "/big") == {
        "url": other_origin.url + "/big", "up": False,
        "error": f"answer is larger than {PEER_BODY_LIMIT} bytes"}
    assert node(view, other_origin.url + "/moved")["error"].startswith("too many redirects")
    page = (await (await http.get(a.url + "/_vault/", headers={"X-Vault-Token": "a-own-client-token",
                                                              "X-Admin-Token": ADMIN})).content()).decode()
    assert "<script>alert" not in page and "acme/private" not in page
    sent = [r.headers for r in other_origin.requests]
    assert len(sent) == 3 and all(h.get("x-vault-token") == ACCESS for h in sent)
    assert not [h for h in sent if ADMIN in json.dumps(h) or "a-own-client-token" in json.dumps(h)
                or "authorization" in h]
    # the redirect was not followed, so the token went nowhere else
    assert upstream.count("/elsewhere") == 0

    # without peers_token, a peer that wants an access token says so
    c = vault_factory(backend(upstream), peers=[b.url])
    view = await get_json(http, c.url + "/_vault/cluster.json")
    assert node(view, b.url)["error"] == "answered HTTP 401 (does peers_token name one of its access_tokens?)"
