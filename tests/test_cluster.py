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
from tests.hfenv import (MINILM, ROOT, fake_hub, fetch, file_sha256, free_port, git_blob_sha1, read, run_client,
                         stop_process, vault_process)
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


def test_the_samples_agree_with_the_manual_and_the_vault():
    """docs/cluster.rst's vault configuration is valid, names the samples' vaults; the checks use GET."""
    from tests.test_examples import literal_blocks

    with open(os.path.join(ROOT, "docs", "cluster.rst"), encoding="utf-8") as f:
        block = next(b for _, b in literal_blocks(f.read()) if b.startswith("http_host:"))
    config = parse(yaml.safe_load(block), environ={"HF_TOKEN": "hf_example", "VAULT_ADMIN_TOKEN": ADMIN})
    assert config.http_host == "0.0.0.0" and config.allowed_hosts == ("vault.example.org",)
    assert {u.split("//")[1] for u in config.peers} == set(SAMPLE_ADDRESSES.values())
    with open(os.path.join(ROOT, "etc", "haproxy.cfg"), encoding="utf-8") as f:
        haproxy = f.read()
    # the short form (option httpchk /_vault/health) would send OPTIONS, which the vault refuses
    assert re.search(r"^ +option httpchk$", haproxy, re.MULTILINE)
    assert "http-check send meth GET uri /_vault/health" in haproxy
    with open(os.path.join(ROOT, "etc", "nginx-cluster.conf"), encoding="utf-8") as f:
        nginx = f.read()
    for address in SAMPLE_ADDRESSES.values():
        assert haproxy.count(address) == 3 and nginx.count(address) == 3, address
    assert "proxy_set_header Host $http_host;" in nginx and "hash $vault_key consistent;" in nginx


@pytest_twisted.ensureDeferred
async def test_the_health_page_answers_get_and_head_but_not_options(vault_factory, upstream, http):
    v = vault_factory(backend(upstream), allowed_hosts=["vault.example.org"])
    assert (await http.get(v.url + "/_vault/health", headers={"Host": "elsewhere.example"})).code == 200
    assert (await http.head(v.url + "/_vault/health")).code == 200
    assert (await http.request("OPTIONS", v.url + "/_vault/health")).code == 405


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


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason=f"no headless browser: {CHROMIUM} is not installed (apt-get install chromium)")
@pytest_twisted.ensureDeferred
async def test_a_real_browser_redraws_the_cluster_table(vault_factory, upstream, http, tmp_path):
    b = vault_factory(backend(upstream))
    dead = closed_port_url()
    a = vault_factory(backend(upstream), peers=[b.url, dead])
    profile = tmp_path / "chromium-profile"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-proxy-server", f"--user-data-dir={profile}", "--virtual-time-budget=3000",
               "--dump-dom", a.url + "/_vault/"]
    env = {"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    done = await deferToThread(subprocess.run, command, capture_output=True, text=True, timeout=90, env=env)
    dom = done.stdout
    assert done.returncode == 0 and "<body" in dom, done.stderr[-2000:]
    # a redraw counts only once cluster.json is drawn too
    assert int(re.search(r'<body[^>]*data-updates="(\d+)"', dom).group(1)) >= 1
    assert re.search(r'<span id="live"( class="")?>live', dom), re.search(r'<span id="live".*?</span>', dom).group(0)
    table = re.search(r'<tbody id="cluster">(.*?)</tbody>', dom, re.DOTALL).group(1)
    assert "<td>this vault</td><td>up</td>" in table and f"<td>{b.url}</td><td>up</td>" in table
    assert f'<tr class="down"><td>{dead}</td><td>down: cannot connect' in table
    assert "cluster: 2 of 3 up" in re.search(r'<tfoot id="cluster-total">(.*?)</tfoot>', dom, re.DOTALL).group(1)
    shutil.rmtree(profile, ignore_errors=True)


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


# -- the cluster: three daemons behind HAProxy -------------------------------------------------

NODES = ("vault1", "vault2", "vault3")
#: the vaults' addresses in etc/haproxy.cfg, which the test replaces with its own
SAMPLE_ADDRESSES = {"vault1": "10.0.0.11:8080", "vault2": "10.0.0.12:8080", "vault3": "10.0.0.13:8080"}
#: the repos the clients download: (repo type, repo id)
REPOS = (("model", MINILM), ("model", "gpt2"), ("dataset", "acme/tiny-dataset"))
BIG = "model.safetensors"  # 90 MB: only some clients take it
HOST = "vault.test"  # the name clients use; the vaults allow it (allowed_hosts)
ACCESS_LINE = re.compile(r'"(GET|HEAD) (\S+) HTTP/1\.[01]" (\d{3}) (\d+) (\S+) ')
HUB_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?(.+?)/resolve/([0-9a-f]{40})/([^?]+)$")


def haproxy_binary():
    found = shutil.which("haproxy")
    return found or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)


def haproxy_config(front: int, stats: int, ports: dict) -> str:
    """
    etc/haproxy.cfg as it is, with local addresses: every vault's, the
    endpoint's and the stats page's.  Only its global section (syslog, the
    user to run as) is replaced by one for a process in a test.
    """
    with open(os.path.join(ROOT, "etc", "haproxy.cfg"), encoding="utf-8") as f:
        text = f.read()
    body = text[text.index("\ndefaults\n"):]
    for old, new in [("bind :8080", f"bind 127.0.0.1:{front}"), ("bind 127.0.0.1:8404", f"bind 127.0.0.1:{stats}"),
                     *((SAMPLE_ADDRESSES[n], f"127.0.0.1:{ports[n]}") for n in NODES)]:
        assert old in body, f"etc/haproxy.cfg no longer has {old!r}: update this test"
        body = body.replace(old, new)
    assert "10.0.0." not in body
    return "global\n    log stdout format raw local0\n    maxconn 4000\n" + body


@contextlib.contextmanager
def haproxy_process(folder, text: str, front: int):
    binary = haproxy_binary()
    path = folder / "haproxy.cfg"
    path.write_text(text)
    check = subprocess.run([binary, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    with open(folder / "haproxy.log", "wb") as log:
        proc = subprocess.Popen([binary, "-db", "-f", str(path)], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_up(proc, f"http://127.0.0.1:{front}/_vault/health", "HAProxy")
            yield proc
        finally:
            stop_process(proc)


def haproxy_servers(stats: int) -> dict:
    """HAProxy's CSV stats of the vaults backend: server name -> row (status, wretr, wredis, ...)."""
    status, _, body = fetch("GET", f"http://127.0.0.1:{stats}/;csv")
    assert status == 200
    lines = body.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
    return {r["svname"]: r for r in rows if r["pxname"] == "vaults"}


def wait_for_state(stats: int, name: str, state: str, timeout=20) -> float:
    started = time.monotonic()
    while haproxy_servers(stats)[name]["status"] != state:
        assert time.monotonic() - started < timeout, f"{name} did not become {state} in HAProxy"
        time.sleep(0.1)
    return time.monotonic() - started


class RepoFiles:
    """The files of the repos at main, as the fake hub describes them."""

    def __init__(self, hub):
        self.files = []  # (repo type, repo id, commit, path, meta)
        for kind, repo in REPOS:
            info = hub.repo(f"{kind}s/{repo}")
            commit = info["refs"]["main"]
            for path, meta in info["commits"][commit]["files"].items():
                self.files.append((kind, repo, commit, path, meta))

    @staticmethod
    def url_path(kind, repo, revision, path):
        return f"/huggingface/{'datasets/' if kind == 'dataset' else ''}{repo}/resolve/{revision}/{path}"

    @staticmethod
    def good(meta, path) -> bool:
        return (file_sha256(path) if meta["lfs"] else git_blob_sha1(read(path))) == meta["etag"]

    def key(self, kind, repo, path):
        return (kind, repo, path)

    def keys(self):
        return {(kind, repo, path) for kind, repo, _, path, _ in self.files}


def curl_client(folder, front, files: RepoFiles, n: int, big: bool):
    """One curl process, every file in turn: by branch (even n) or by commit (odd n). Returns the bad files."""
    folder.mkdir(parents=True)
    args, outputs = [shutil.which("curl"), "-fsS", "--fail-early", "--resolve", f"{HOST}:{front}:127.0.0.1"], []
    for i, (kind, repo, commit, path, meta) in enumerate(files.files):
        if path == BIG and not big:
            continue
        revision = "main" if n % 2 == 0 else commit
        args += ["-o", str(folder / str(i)), f"http://{HOST}:{front}" + files.url_path(kind, repo, revision, path)]
        outputs.append((folder / str(i), meta, path))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return [path for out, meta, path in outputs if not files.good(meta, out)]


def snapshot_client(folder, endpoint, files: RepoFiles):
    """A real huggingface_hub client: snapshot_download of every repo. Returns the bad files."""
    folder.mkdir(parents=True)
    found = run_client(endpoint, folder, f"""
        from huggingface_hub import snapshot_download
        result = [snapshot_download(repo, repo_type=kind) for kind, repo in {list(REPOS)!r}]
    """, timeout=180)
    where = {repo: folder_ for (_, repo), folder_ in zip(REPOS, found)}
    return [path for _, repo, _, path, meta in files.files if not files.good(meta, os.path.join(where[repo], path))]


def run_clients(jobs):
    """Start every client at once; returns the bad files each reported (all empty when all went well)."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        return [f.result() for f in [pool.submit(job) for job in jobs]]


def upstream_fetches(hub) -> dict:
    """(type, repo, path) -> the GETs of its content the vaults sent to the hub."""
    got = {}
    for r in hub.requests():
        m = HUB_RESOLVE.match(r["path"]) if r["server"] == "hub" and r["method"] == "GET" else None
        if m:
            key = ("dataset" if m.group(1) == "datasets" else "model", m.group(2), m.group(4))
            got[key] = got.get(key, 0) + 1
    return got


def file_gets(vault, since: int, files: RepoFiles) -> list:
    """(key, outcome) of each GET of a file in `vault`'s access log after byte `since`."""
    found = []
    keys = files.keys()
    with open(vault.log_path, "rb") as f:
        f.seek(since)
        text = f.read().decode("utf-8", "replace")
    for method, target, status, _, outcome in ACCESS_LINE.findall(text):
        m = re.match(r"^/huggingface/(?:(datasets)/)?(.+?)/resolve/[^/]+/(.+)$", target)
        if method == "GET" and m:
            key = ("dataset" if m.group(1) else "model", m.group(2), m.group(3))
            if key in keys:
                assert status == "200", (target, status)
                found.append((key, outcome))
    return found


def log_size(vault) -> int:
    return os.path.getsize(vault.log_path)


def nginx_binary():
    found = shutil.which("nginx")
    return found or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def nginx_config(folder, front: int, ports: dict) -> str:
    """etc/nginx-cluster.conf as it is (local addresses), in the smallest nginx.conf that runs it."""
    with open(os.path.join(ROOT, "etc", "nginx-cluster.conf"), encoding="utf-8") as f:
        body = f.read()
    for old, new in [("listen 8080;", f"listen 127.0.0.1:{front};"),
                     *((SAMPLE_ADDRESSES[n], f"127.0.0.1:{ports[n]}") for n in NODES)]:
        assert old in body, f"etc/nginx-cluster.conf no longer has {old!r}: update this test"
        body = body.replace(old, new)
    assert "10.0.0." not in body
    temp = " ".join(f"{kind}_temp_path {folder}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"daemon off;\npid {folder}/nginx.pid;\nerror_log {folder}/nginx-error.log;\nevents {{}}\n"
            f"http {{\n{temp}\naccess_log {folder}/nginx-access.log;\n{body}\n}}\n")


@contextlib.contextmanager
def nginx_process(folder, text: str, front: int):
    binary = nginx_binary()
    path = folder / "nginx.conf"
    path.write_text(text)
    args = [binary, "-p", str(folder), "-c", str(path)]
    check = subprocess.run(args + ["-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(proc, f"http://127.0.0.1:{front}/_vault/health", "nginx")
        yield proc
    finally:
        stop_process(proc)


def wait_until_up(proc, url, what):
    deadline = time.monotonic() + 15
    while True:
        try:
            if fetch("GET", url, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        assert proc.poll() is None, f"{what} exited"
        assert time.monotonic() < deadline, f"{what} did not start"
        time.sleep(0.05)


class Cluster:
    """The fake hub, three vaults (each its own cache; every vault lists all three as peers) and a balancer."""

    def __init__(self, hub, vaults, front, stats, start):
        self.hub, self.vaults, self.front, self.stats, self.start = hub, vaults, front, stats, start
        self.endpoint = f"http://127.0.0.1:{front}/huggingface"


@contextlib.contextmanager
def running_cluster(tmp_path, backends, balancer="haproxy"):
    """A `Cluster` behind HAProxy (etc/haproxy.cfg) or nginx (etc/nginx-cluster.conf)."""
    if balancer == "haproxy" and haproxy_binary() is None:
        pytest.skip("HAProxy is not installed (.ci/run installs the Debian package haproxy where it can)")
    if balancer == "nginx" and nginx_binary() is None:
        pytest.skip("nginx is not installed (.ci/run installs the Debian package nginx where it can)")
    ports = {name: free_port() for name in NODES}
    front, stats = free_port(), free_port()
    peers = [f"http://127.0.0.1:{ports[name]}" for name in NODES]
    with contextlib.ExitStack() as stack:
        hub = stack.enter_context(fake_hub(tmp_path / "hub"))
        top = {"log_level": "INFO", "allowed_hosts": [HOST], "admin_token": ADMIN, "peers": peers}

        def start(name):
            return stack.enter_context(vault_process(tmp_path / name, backends(hub), port=ports[name], **top))

        vaults = {name: start(name) for name in NODES}
        if balancer == "haproxy":
            stack.enter_context(haproxy_process(tmp_path, haproxy_config(front, stats, ports), front))
        else:
            stack.enter_context(nginx_process(tmp_path, nginx_config(tmp_path, front, ports), front))
            stats = None
        yield Cluster(hub, vaults, front, stats, start)


def hf_backends(hub):
    return [{"type": "huggingface", "config": {"base_url": hub.hub}}]


def placement(cluster, marks, files) -> dict:
    """(type, repo, path) -> the one vault that served it since `marks` (each file is on one vault only)."""
    owner = {}
    for name, v in cluster.vaults.items():
        for key, _ in file_gets(v, marks[name], files):
            assert owner.setdefault(key, name) == name, f"{key} served by {owner[key]} and {name}"
    return owner


def check_operator_routes(cluster):
    """/_node/NAME/_vault/ of the endpoint is that vault's; other paths below /_node/ are refused."""
    for name, v in cluster.vaults.items():
        status, _, body = fetch("GET", f"http://127.0.0.1:{cluster.front}/_node/{name}/_vault/health")
        assert status == 200 and json.loads(body)["pid"] == v.proc.pid
    status, _, _ = fetch("GET", f"http://127.0.0.1:{cluster.front}/_node/vault1/huggingface/gpt2/resolve/main/x")
    assert status == 404
    # the vaults check the Host header the balancer passes on: the name clients use passes, another does not
    url = f"http://127.0.0.1:{cluster.front}/huggingface/api/models/gpt2"
    assert fetch("GET", url, {"Host": HOST})[0] == 200
    assert fetch("GET", url, {"Host": "rebound.example"})[0] == 421


def after_loss(cluster, survivors, marks, files, moved):
    """Upstream fetches and the survivors' outcomes since `marks`: only `moved` fetched, the rest hits."""
    refetched = upstream_fetches(cluster.hub)
    # only the lost vault's files are fetched again; one asked while the balancer retried requests already
    # sent to the dead vault may be fetched by both survivors (see etc/haproxy.cfg), never more
    assert set(refetched) == moved and set(refetched.values()) <= {1, 2}, refetched
    gets = [(key, o) for name in survivors for key, o in file_gets(cluster.vaults[name], marks[name], files)]
    kept = [o for key, o in gets if key not in moved]
    assert kept and set(kept) == {"hit"}, "the other vaults' files stay hits"
    outcomes = [o for _, o in gets]
    return sorted(key[2] for key, n in refetched.items() if n == 2), outcomes.count("hit") / len(outcomes), len(gets)


def test_three_vaults_behind_haproxy(tmp_path):
    """
    Three real vaults (own cache folders) behind HAProxy configured as
    etc/haproxy.cfg, the fake hub behind them, real clients in front:

    1. 30 clients at once (huggingface_hub's snapshot_download by commit, curl
       by branch or by commit): every file is fetched from the hub once in
       the whole cluster, and each file is served by one vault only, which
       keeps it on its disk.
    2. One vault stopped, clients at once (before HAProxy has marked it down,
       then after): all downloads work; only that vault's files are fetched
       from the hub again; the other vaults answer theirs from their caches.
       A survivor's cluster view shows it down.
    3. The vault started again: its files go back to it and come from its
       disk; nothing is fetched from the hub.
    """
    with running_cluster(tmp_path, hf_backends) as cluster:
        hub, vaults, front, stats, endpoint = cluster.hub, cluster.vaults, cluster.front, cluster.stats, cluster.endpoint
        files = RepoFiles(hub)
        keys = files.keys()
        clients = tmp_path / "clients"
        check_operator_routes(cluster)
        marks = {name: log_size(v) for name, v in vaults.items()}
        hub.reset()

        # -- 1. cold, 30 clients at once --------------------------------------------------------
        started = time.monotonic()
        jobs = [lambda n=n: snapshot_client(clients / f"1-hf{n}", endpoint, files) for n in range(6)]
        jobs += [lambda n=n: curl_client(clients / f"1-curl{n}", front, files, n, big=n < 4) for n in range(24)]
        assert run_clients(jobs) == [[]] * 30
        cold_seconds = time.monotonic() - started
        assert upstream_fetches(hub) == {key: 1 for key in keys}, "each file once from the hub, across the cluster"
        assert len([r for r in hub.requests() if r["server"] == "cdn" and r["method"] == "GET"]) == \
            len([f for f in files.files if f[4]["lfs"]])
        owner = placement(cluster, marks, files)
        assert set(owner) == keys
        # the files are on the disk of the vault that served them (an operator's view, through HAProxy)
        for name in NODES:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert cli.main(["--url", f"http://127.0.0.1:{front}/_node/{name}", "--token", ADMIN,
                                 "ls", "huggingface", "blobs/", "--json"]) == 0
            blobs = {e["key"].rsplit("/", 1)[1] for e in json.loads(out.getvalue())["entries"]}
            assert blobs == {meta["sha256"] for kind, repo, _, path, meta in files.files
                             if meta["lfs"] and owner[(kind, repo, path)] == name}

        # -- 2. one vault stops ------------------------------------------------------------------
        share = {name: sum(1 for o in owner.values() if o == name) for name in NODES}
        lost = max(NODES, key=lambda name: (share[name], name))
        assert 0 < share[lost] < len(keys)
        survivors = [name for name in NODES if name != lost]
        moved = {key for key, name in owner.items() if name == lost}
        marks = {name: log_size(vaults[name]) for name in survivors}
        hub.reset()
        stop_process(vaults[lost].proc)
        with ThreadPoolExecutor(1) as watch:
            down_after = watch.submit(wait_for_state, stats, lost, "DOWN")  # seconds from now
            jobs = [lambda n=n: snapshot_client(clients / f"2-hf{n}", endpoint, files) for n in range(2)]
            jobs += [lambda n=n: curl_client(clients / f"2-curl{n}", front, files, n, big=n < 2) for n in range(8)]
            assert run_clients(jobs) == [[]] * 10  # those that reached HAProxy before it marked the vault down too
            down_after = down_after.result()
        assert run_clients([lambda: curl_client(clients / "2-after", front, files, 1, big=False)]) == [[]]
        twice, hit_ratio, gets = after_loss(cluster, survivors, marks, files, moved)
        # the cluster view of a survivor shows the lost vault down
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(["--url", f"http://127.0.0.1:{front}/_node/{survivors[0]}", "--token", ADMIN,
                             "stats"]) == 0
        assert re.search(rf"^{re.escape(vaults[lost].url)} +DOWN", out.getvalue(), re.MULTILINE), out.getvalue()
        assert "cluster (2 of 3 up)" in out.getvalue()

        # -- 3. it comes back ----------------------------------------------------------------
        vaults[lost] = cluster.start(lost)
        back_after = wait_for_state(stats, lost, "UP")
        marks = {name: log_size(v) for name, v in vaults.items()}
        hub.reset()
        jobs = [lambda: snapshot_client(clients / "3-hf", endpoint, files)]
        jobs += [lambda n=n: curl_client(clients / f"3-curl{n}", front, files, n, big=n == 0) for n in range(3)]
        assert run_clients(jobs) == [[]] * 4
        assert upstream_fetches(hub) == {}
        assert not [r for r in hub.requests() if r["server"] == "cdn"]
        back = file_gets(vaults[lost], marks[lost], files)
        assert {key for key, _ in back} == moved and {o for _, o in back} == {"hit"}
        for name in survivors:
            assert not {key for key, _ in file_gets(vaults[name], marks[name], files)} & moved
        totals = haproxy_servers(stats)["BACKEND"]
        print(f"\nHAProxy cluster: {len(keys)} files, shares {share}; cold phase {cold_seconds:.1f} s; "
              f"{lost} stopped: DOWN in HAProxy after {down_after:.1f} s; "
              f"file GETs after the loss: {gets}, hit ratio {hit_ratio:.3f} "
              f"(files not on {lost}: {1 - share[lost] / len(keys):.3f}); fetched twice: {twice}; "
              f"back UP after {back_after:.1f} s; HAProxy retries {totals['wretr']}, redispatches {totals['wredis']}")


def test_the_nginx_sample_places_each_file_on_one_vault(tmp_path):
    """
    etc/nginx-cluster.conf in front of three vaults: clients at once, each file
    fetched once and served by one vault; one vault stopped, the downloads go on
    (nginx notices on the failed requests themselves: no active checks) and only
    its files are fetched again.
    """
    with running_cluster(tmp_path, hf_backends, balancer="nginx") as cluster:
        files = RepoFiles(cluster.hub)
        clients = tmp_path / "clients"
        check_operator_routes(cluster)
        marks = {name: log_size(v) for name, v in cluster.vaults.items()}
        cluster.hub.reset()
        jobs = [lambda n=n: curl_client(clients / f"1-{n}", cluster.front, files, n, big=n < 2) for n in range(10)]
        jobs.append(lambda: snapshot_client(clients / "1-hf", cluster.endpoint, files))
        assert run_clients(jobs) == [[]] * 11
        assert upstream_fetches(cluster.hub) == {key: 1 for key in files.keys()}
        owner = placement(cluster, marks, files)
        assert set(owner) == files.keys()
        share = {name: sum(1 for o in owner.values() if o == name) for name in NODES}
        lost = max(NODES, key=lambda name: (share[name], name))
        survivors = [name for name in NODES if name != lost]
        marks = {name: log_size(cluster.vaults[name]) for name in survivors}
        cluster.hub.reset()
        stop_process(cluster.vaults[lost].proc)
        jobs = [lambda n=n: curl_client(clients / f"2-{n}", cluster.front, files, n, big=False) for n in range(4)]
        assert run_clients(jobs) == [[]] * 4
        twice, hit_ratio, gets = after_loss(cluster, survivors, marks, files,
                                            {key for key, name in owner.items() if name == lost and key[2] != BIG})
        print(f"\nnginx cluster: shares {share}; after losing {lost}: {gets} file GETs, hit ratio {hit_ratio:.3f}, "
              f"fetched twice: {twice}")


class NameServer:
    """A stand-in vault that answers every request with its name (HAProxy's checks included)."""

    def __init__(self, name):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        import threading

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                # one write: headers and body apart would wait on Nagle and the delayed ACK
                body = name.encode()
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # HAProxy's checks hang up without reading: nothing to report

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def placed(front, paths) -> list:
    """Which server HAProxy sends each path to (one keep-alive connection)."""
    from http.client import HTTPConnection

    conn = HTTPConnection("127.0.0.1", front, timeout=10)
    try:
        names = []
        for path in paths:
            conn.request("GET", path)
            names.append(conn.getresponse().read().decode())
        return names
    finally:
        conn.close()


def test_adding_a_vault_moves_only_its_share_of_the_keys(tmp_path):
    """
    The ring of etc/haproxy.cfg: 3000 file paths over three servers, then
    with a fourth added as docs/cluster.rst says (a server line with a new
    id): about a quarter of the paths move, all of them to the new server,
    and the shares stay even.  The revision of a Hugging Face resolve URL
    does not change where it goes.
    """
    if haproxy_binary() is None:
        pytest.skip("HAProxy is not installed (.ci/run installs the Debian package haproxy where it can)")
    servers = {name: NameServer(name) for name in NODES + ("vault4",)}
    try:
        ports = {name: s.port for name, s in servers.items()}
        paths = [f"/huggingface/org{i % 7}/model-{i % 50}/resolve/main/shard-{i:05d}.safetensors" for i in range(3000)]
        front, stats = free_port(), free_port()
        three = haproxy_config(front, stats, ports)
        with haproxy_process(tmp_path, three, front):
            before = placed(front, paths)
            commits = placed(front, [p.replace("/main/", "/" + "ab" * 20 + "/") for p in paths])
        assert commits == before
        line = re.search(r"^( +server vault3 127\.0\.0\.1:\d+ id 3)$", three, re.MULTILINE).group(1)
        four = three.replace(line, line + "\n" + line.replace("vault3", "vault4").replace(
            str(ports["vault3"]), str(ports["vault4"])).replace("id 3", "id 4"), 1)
        with haproxy_process(tmp_path, four, front):
            after = placed(front, paths)
    finally:
        for s in servers.values():
            s.close()
    shares = {name: before.count(name) / len(paths) for name in NODES}
    assert all(0.25 < share < 0.42 for share in shares.values()), shares
    moved = [(a, b) for a, b in zip(before, after) if a != b]
    assert {b for _, b in moved} == {"vault4"}
    assert 0.18 < len(moved) / len(paths) < 0.32
    print(f"\nring: shares of 3000 paths over three vaults {shares}; a fourth took {len(moved) / len(paths):.3f}")


def pypi_file_misses(vault, since: int = 0) -> set:
    """The /pypi/files/... paths that `vault` fetched from upstream (outcome miss) after byte `since` of its log."""
    with open(vault.log_path, "rb") as f:
        f.seek(since)
        text = f.read().decode("utf-8", "replace")
    return {target for method, target, status, _, outcome in ACCESS_LINE.findall(text)
            if method == "GET" and target.startswith("/pypi/files/") and outcome == "miss"}


def test_pip_install_through_the_cluster(tmp_path):
    """
    pip through HAProxy and three vaults with a pypi backend: six installs at
    once fetch each file from the index once across the cluster, each file
    lives on one vault; with one vault stopped, installs still work and only
    that vault's files are fetched again.
    """
    from tests.pypienv import fake_pypi, new_env, pip_install

    with fake_pypi(tmp_path / "pypi") as index:
        def backends(hub):
            return [{"type": "pypi", "config": {"base_url": index.index.rstrip("/"), "offline_timeout": 2}}]

        with running_cluster(tmp_path, backends) as cluster:
            url = f"http://127.0.0.1:{cluster.front}/pypi/simple/"
            envs = [new_env(tmp_path / f"env{n}") for n in range(6)]
            with ThreadPoolExecutor(6) as pool:
                done = list(pool.map(lambda env: pip_install(url, "alpha", "Zeta_Utils", target_env=env), envs))
            assert all(r.returncode == 0 for r in done), [r.stderr[-2000:] for r in done if r.returncode]
            assert all(env.version_of("alpha") == "2.0" and env.version_of("beta") for env in envs)
            fetched = [r["path"] for r in index.requests() if r["server"] == "files" and r["method"] == "GET"]
            assert fetched and len(fetched) == len(set(fetched)), fetched  # each file once across the cluster
            owner = {}
            for name, v in cluster.vaults.items():
                for path in pypi_file_misses(v):
                    assert owner.setdefault(path, name) == name, f"{path} fetched by {owner[path]} and {name}"
            lost = max(NODES, key=lambda name: (sum(1 for o in owner.values() if o == name), name))
            survivors = [name for name in NODES if name != lost]
            marks = {name: log_size(cluster.vaults[name]) for name in survivors}
            index.reset()
            stop_process(cluster.vaults[lost].proc)
            time.sleep(0.5)  # HAProxy marks it down at its first refused connection anyway
            again = [pip_install(url, "alpha", "Zeta_Utils", target_env=new_env(tmp_path / f"after{n}"))
                     for n in range(2)]
            assert all(r.returncode == 0 for r in again), [r.stderr[-2000:] for r in again if r.returncode]
            refetched = {r["path"] for r in index.requests() if r["server"] == "files" and r["method"] == "GET"}
            moved = {path for path, name in owner.items() if name == lost}
            assert {p.rsplit("/", 1)[1] for p in refetched} <= {p.rsplit("/", 1)[1] for p in moved}, (refetched, moved)
            for name in survivors:  # the survivors' own files stayed hits
                assert not pypi_file_misses(cluster.vaults[name], marks[name]) & set(owner) - moved
