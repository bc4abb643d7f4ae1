"""
What the vault counts, exposed at ``/_vault/metrics`` in the Prometheus text
format by prometheus_client (one registry per vault, so several vaults in
one process, as in the tests, do not mix their numbers).  Each worker
process counts for itself; scrape each, or sum.
"""

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

OUTCOMES = ("hit", "miss", "joined", "stale", "forwarded", "error")


class VaultMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("artifact_vault_requests", "Requests by backend and cache outcome",
                                ["backend", "outcome"], registry=r)
        self.served_bytes = Counter("artifact_vault_served_bytes", "Body bytes sent to clients, by cache outcome",
                                    ["backend", "outcome"], registry=r)
        self.fetched_bytes = Counter("artifact_vault_upstream_fetched_bytes", "Body bytes received from upstreams",
                                     ["backend"], registry=r)
        self.upstream_errors = Counter("artifact_vault_upstream_errors", "Failed upstream answers, by status",
                                       ["backend", "status"], registry=r)
        self.evictions = Counter("artifact_vault_evictions", "Cache entries evicted to respect max_cache_size",
                                 ["backend"], registry=r)
        self.evicted_bytes = Counter("artifact_vault_evicted_bytes", "Bytes evicted", ["backend"], registry=r)
        self.cache_bytes = Gauge("artifact_vault_cache_bytes", "Bytes in the cache (last scan)", ["backend"],
                                 registry=r)
        self.cache_files = Gauge("artifact_vault_cache_files", "Entries in the cache (last scan)", ["backend"],
                                 registry=r)
        self.in_flight = Gauge("artifact_vault_downloads_in_flight", "Upstream downloads running now", registry=r)
        self.waiting = Gauge("artifact_vault_download_waiters", "Clients streaming downloads that are still running",
                             registry=r)
        self.waiters_per_download = Histogram(
            "artifact_vault_waiters_per_download", "Clients that shared one upstream download",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        #: recent failures for the status page: (time, what, status, message)
        self.recent_errors: deque = deque(maxlen=20)
        self._children: dict[tuple, tuple] = {}

    def watch_downloads(self, downloads) -> None:
        """Gauges read from `downloads` when scraped; each finished download counts its clients."""
        self.in_flight.set_function(lambda: len(downloads))
        self.waiting.set_function(lambda: sum(d.watcher_count for d in downloads.running()))
        downloads.observe(lambda d: self.waiters_per_download.observe(d.clients))

    def count_answer(self, request) -> None:
        """A request of a backend is over: count it with its outcome (an error status is an error)."""
        outcome = "error" if request.code >= 400 else (request.outcome or "forwarded")
        self.count_request(request.backend, outcome, request.sentLength)

    def count_request(self, backend: str, outcome: str, sent: int) -> None:
        """One answered request (children looked up once per label pair: this runs per request)."""
        children = self._children.get((backend, outcome))
        if children is None:
            children = self._children[(backend, outcome)] = (
                self.requests.labels(backend, outcome), self.served_bytes.labels(backend, outcome))
        children[0].inc()
        if sent:
            children[1].inc(sent)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def error(self, what: str, status: int, message: str) -> None:
        self.recent_errors.appendleft({"time": time.time(), "what": what, "status": status, "message": message})

    def totals(self) -> dict:
        """Sums over labels, for the status page."""
        out = {o: 0.0 for o in OUTCOMES}
        for metric in self.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["outcome"]] += sample.value
        return out
