"""
The other vaults of a cluster (``peers:`` in the configuration), read only.

Several vaults behind a load balancer that hashes each file onto one of them
(docs/cluster.rst) do not talk to each other to serve: there is no routing of
our own.  This module only lets one vault show the whole cluster: it asks
each peer's ``/_vault/status.json`` (at most one request per peer at a time,
reused for `VIEW_TTL` seconds, each bounded by `PEER_TIMEOUT`) and reduces
the answer to numbers: requests, hit ratio, cache use, downloads, errors.
A peer that does not answer in time, answers something other than 200 or
something that is not a vault's status shows as down, with the reason.

What crosses: nothing of this vault's credentials.  The request carries
``peers_token`` (``X-Vault-Token``) only when the configuration sets one for
the peers, and never across a redirect (none is followed).  A peer's answer
is read up to `PEER_BODY_LIMIT` bytes, and only numbers are taken from it,
so no name a peer holds (the file names that status.json shows to holders of
the admin token, which this vault never sends) reaches this vault's pages.

The status page, ``/_vault/cluster.json`` and the admin ``stats`` (so
``artifact-vault stats``) show `view`.  Peers are asked for their
``status.json``, never for their ``cluster.json``, so no question goes round
the cluster.
"""

import json
import secrets
import time

from twisted.internet.defer import Deferred, gatherResults, succeed

from .errors import UpstreamTimeout, VaultError
from .fetch import Discard, read_body
from .freshness import Coalescer
from .logs import VaultLogger

log = VaultLogger()

#: seconds a peer has to answer (connection, headers and body)
PEER_TIMEOUT = 2.0
#: a peer's answer is reused for this long (the status page refreshes every second)
VIEW_TTL = 2.0
#: bytes of a peer's status.json read at most
PEER_BODY_LIMIT = 1024 * 1024
#: outcome names taken from a peer (the rest of its answer is ignored)
MAX_OUTCOMES = 16


def new_instance() -> str:
    """A random name for this process, so that a vault listed among its own peers knows itself."""
    return secrets.token_hex(8)


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else None


def summary(status: dict) -> dict:
    """The numbers of one vault's status.json, and nothing else."""
    cache = status.get("cache") if isinstance(status.get("cache"), dict) else {}
    requests = status.get("requests") if isinstance(status.get("requests"), dict) else {}
    counted = {}
    for name, value in list(requests.items())[:MAX_OUTCOMES]:
        if isinstance(name, str) and len(name) <= 32 and name.isidentifier() and _number(value) is not None:
            counted[name] = value
    downloads = status.get("downloads")
    errors = status.get("recent_errors")
    ratio = _number(status.get("hit_ratio"))
    return {
        "pid": _number(status.get("pid")),
        "uptime_seconds": _number(status.get("uptime_seconds")),
        "requests": counted,
        "hit_ratio": ratio if ratio is None or ratio <= 1 else None,
        "cache": {k: _number(cache.get(k)) for k in ("bytes", "files") if _number(cache.get(k)) is not None},
        "downloads": len(downloads) if isinstance(downloads, list) else None,
        "errors": len(errors) if isinstance(errors, list) else None,
    }


def totals(nodes: list) -> dict:
    """The cluster's sums over the vaults that answered."""
    up = [n for n in nodes if n["up"]]
    requests: dict = {}
    for n in up:
        for name, value in n["requests"].items():
            requests[name] = requests.get(name, 0) + value
    answered = sum(requests.values())
    from_cache = requests.get("hit", 0) + requests.get("stale", 0)
    measured = [n["cache"] for n in up if "bytes" in n["cache"]]
    return {
        "nodes": len(nodes),
        "up": len(up),
        "requests": requests,
        "hit_ratio": round(from_cache / answered, 3) if answered else None,
        "cache": {"bytes": sum(c["bytes"] for c in measured), "files": sum(c.get("files") or 0 for c in measured)}
        if measured else {},
        "downloads": sum(n["downloads"] or 0 for n in up),
        "errors": sum(n["errors"] or 0 for n in up),
    }


class Peers:
    """The peers of one vault process, asked on demand (nothing runs while nobody looks)."""

    def __init__(self, upstream, urls, token=None, instance=None, clock=None):
        self.upstream = upstream
        self.urls = tuple(urls)
        self.token = token
        self.instance = instance
        self.clock = clock or time.monotonic
        self._coalescer = Coalescer()
        #: url -> (monotonic time asked, node dict)
        self._seen: dict = {}
        #: a peer's URL that turned out to be this vault
        self.own_url = None

    def view(self) -> "Deferred[list]":
        """Each peer as a node: {"url", "up", and the summary's numbers, or "error"} (self excluded)."""
        return gatherResults([self._node(url) for url in self.urls], consumeErrors=True).addCallback(
            lambda nodes: [n for n in nodes if not n.get("self")])

    def _node(self, url):
        seen = self._seen.get(url)
        if seen is not None and self.clock() - seen[0] < VIEW_TTL:
            return succeed(seen[1])
        return self._coalescer.share(url, lambda: self._ask(url))

    def _ask(self, url):
        headers = {"Accept": "application/json"}
        if self.token:
            headers["X-Vault-Token"] = self.token
        d = self.upstream.request("GET", url + "/_vault/status.json", headers, timeout=PEER_TIMEOUT,
                                  max_redirects=0, sensitive_headers=("X-Vault-Token",))

        def got(response):
            if response.code != 200:
                response.deliverBody(Discard())
                raise _Down(f"answered HTTP {response.code}"
                            + (" (does peers_token name one of its access_tokens?)" if response.code == 401 else ""))
            return read_body(response, PEER_BODY_LIMIT, timeout=PEER_TIMEOUT, clock=self.upstream.reactor)

        def parsed(body):
            try:
                document = json.loads(body)
            except ValueError:
                raise _Down("its answer is not JSON (is it a vault?)") from None
            if not isinstance(document, dict) or "requests" not in document:
                raise _Down("its answer is not a vault's status.json")
            if self.instance is not None and document.get("instance") == self.instance:
                self.own_url = url
                return {"url": url, "up": True, "self": True}
            return {"url": url, "up": True, **summary(document)}

        def failed(failure):
            if failure.check(_Down):
                why = str(failure.value)
            elif failure.check(UpstreamTimeout):
                why = f"no answer within {PEER_TIMEOUT:g} s"
            elif failure.check(VaultError):
                why = failure.value.message.replace("upstream ", "")
            else:
                log.failure("Asking peer {url} failed", failure, url=url)
                why = "internal error, see the log"
            return {"url": url, "up": False, "error": why}

        d.addCallback(got).addCallback(parsed).addErrback(failed)
        return d.addCallback(self._remember, url)

    def _remember(self, node, url):
        before = self._seen.get(url)
        was_up = before[1]["up"] if before is not None else None
        if not node["up"] and was_up is not False:
            log.warn("Peer {url} is down: {why}", url=url, why=node["error"])
        elif node["up"] and was_up is False:
            log.info("Peer {url} answers again", url=url)
        self._seen[url] = (self.clock(), node)
        return node


class _Down(Exception):
    """A peer answered, but not as a vault does."""


def cluster_view(machinery, own_status: dict) -> "Deferred[dict]":  # noqa: F821
    """This vault (from `own_status`) and its peers, with the cluster's totals."""
    peers = machinery.peers
    me = {"url": None, "self": True, "up": True, **summary(own_status)}

    def assemble(nodes):
        if peers.own_url is not None:
            me["url"] = peers.own_url
        everyone = [me] + nodes
        return {"nodes": everyone, "total": totals(everyone)}

    return peers.view().addCallback(assemble)
