"""
Core pieces the pypi backend needed and that any backend may use:
`fetch.within` (a bound on a whole upstream exchange) with a cancellable
`fetch.read_body`, `Backend.configured_headers` (the configured headers go to
the upstream's origin only) and `KeptAnswers.fresh` (the kept answer without
a Deferred).  Over real sockets against tests/upstream.py.
"""

import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from artifact_vault.errors import UpstreamTimeout
from artifact_vault.fetch import read_body, within
from artifact_vault.freshness import Answer, KeptAnswers
from artifact_vault.store import CacheStore


def http_backend(upstream, **config):
    return [{"type": "http", "name": "files", "config": {"base_url": upstream.url, **config}}]


@pytest_twisted.ensureDeferred
async def test_within_bounds_a_body_that_never_ends(vault_factory, upstream, logged):
    upstream.add("/slow.json", b"x" * 100_000, hold=True)  # headers now, the body never
    v = vault_factory(http_backend(upstream))
    backend = v.vault.backend("files")
    started = time.monotonic()
    response = await backend.request_upstream("GET", upstream.url + "/slow.json")
    with pytest.raises(UpstreamTimeout) as caught:
        await within(read_body(response, 1 << 20, timeout=30, clock=reactor), 0.5, reactor, "the slow answer")
    assert "took longer than 0.5 s" in caught.value.message
    assert time.monotonic() - started < 3
    await deferred_sleep(0.2)  # the transfer was stopped: nothing fires twice, nothing is logged
    assert not logged.errors()


@pytest_twisted.ensureDeferred
async def test_within_passes_answers_and_errors_through(vault_factory, upstream):
    upstream.add("/quick", b"hello")
    v = vault_factory(http_backend(upstream))
    backend = v.vault.backend("files")
    response = await backend.request_upstream("GET", upstream.url + "/quick")
    assert await within(read_body(response, 100, clock=reactor), 5, reactor, "quick") == b"hello"
    failing = Deferred()
    reactor.callLater(0.05, failing.errback, ValueError("not a timeout"))
    with pytest.raises(ValueError):
        await within(failing, 5, reactor, "failing")


@pytest_twisted.ensureDeferred
async def test_configured_headers_go_to_the_upstream_origin_only(vault_factory, upstream, other_origin):
    upstream.add("/mine", b"mine")
    other_origin.add("/theirs", b"theirs")
    v = vault_factory(http_backend(upstream, headers={"Authorization": "Bearer s3cret", "X-Key": "k"}))
    backend = v.vault.backend("files")
    assert backend.configured_headers(upstream.url + "/x") == {"Authorization": "Bearer s3cret", "X-Key": "k"}
    assert backend.configured_headers(other_origin.url + "/x") == {}
    assert backend.configured_headers(upstream.url.replace("http:", "https:") + "/x") == {}
    assert backend.configured_headers("http://127.0.0.1:notaport/x") == {}
    for url in (upstream.url + "/mine", other_origin.url + "/theirs"):
        response = await backend.request_upstream("GET", url)
        await read_body(response, 100, clock=reactor)
    spec = backend.download_spec("files/theirs", other_origin.url + "/theirs")
    assert "Authorization" not in spec.headers
    assert upstream.requests[0].headers["authorization"] == "Bearer s3cret"
    assert "authorization" not in other_origin.requests[0].headers
    assert "x-key" not in other_origin.requests[0].headers


def test_kept_answers_fresh(tmp_path):
    now = [1000.0]
    kept = KeptAnswers(CacheStore(str(tmp_path)), clock=lambda: now[0])
    assert kept.fresh("b/k", 60) is None
    kept.keep("b/k", Answer(200, {"etag": '"1"'}, b"body", checked_at=1000.0))
    answer = kept.fresh("b/k", 60)
    assert answer.body == b"body" and answer.source == "kept"
    now[0] += 61
    assert kept.fresh("b/k", 60) is None and kept.peek("b/k") is not None


def deferred_sleep(seconds):
    d = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
