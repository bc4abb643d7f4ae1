"""
The shared machinery without sockets, in seconds: the download state machine
(`downloads`), kept answers and their freshness rules (`freshness`), and the
upstream body checks of `fetch`.

Time is a `task.Clock`, upstream is either a stand-in whose Deferreds the test
fires (for `Downloads`, whose upstream side is one method: ``fetch(spec,
open_writer)``) or an in-memory HTTP server (`treq.testing`'s
RequestTraversalAgent, for `fetch.Upstream`).  Caveats: the in-memory agent
delivers a response only when flushed and has no real connection (no
timeouts, no partial reads), and the cache writer hashes in its helper
thread, which reports back through the running reactor: the tests that need
a digest are asynchronous for that reason.  What crosses a real socket is
tested in test_core.py and the others.
"""

import hashlib
import os

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from artifact_vault import downloads as dl
from artifact_vault.downloads import Download, Downloads, DownloadSpec, State
from artifact_vault.errors import IntegrityError, UpstreamStatus, UpstreamTimeout, UpstreamUnavailable
from artifact_vault.freshness import NOT_MODIFIED, Answer, Coalescer, KeptAnswers, UpstreamHealth
from artifact_vault.store import CacheStore


class StandInUpstream:
    """``fetch(spec, open_writer)``: records each call; the test decides what upstream does."""

    def __init__(self):
        self.calls = []

    def fetch(self, spec, open_writer):
        d = Deferred(lambda d: setattr(d, "cancelled_by_vault", True))
        self.calls.append((spec, open_writer, d))
        return d

    def answer(self, index, body: bytes, meta=None):
        """Upstream answers 200 with `body`: the writer is opened, filled, and the fetch fires."""
        spec, open_writer, d = self.calls[index]
        writer = open_writer(len(body), meta or {"content_type": "application/octet-stream"})
        writer.write(body)
        d.callback(writer)
        return writer


def spec(key="b/file", **kw):
    return DownloadSpec(key=key, url=f"http://upstream/{key}", **kw)


# -- Download: states, waiters, abandonment ---------------------------------------------------


def test_a_download_goes_pending_streaming_failed_and_tells_every_waiter(tmp_path):
    store = CacheStore(str(tmp_path))
    download = Download(spec(), Clock())
    first, second = download.ready(), download.ready()
    assert download.state is State.PENDING and not first.called
    writer = download.open_writer(store, 10, {"content_type": "x/y"})
    assert download.state is State.STREAMING
    assert first.result is download and second.result is download
    seen = []
    download.watch(lambda: seen.append(download.available()))
    writer.write(b"12345")
    assert seen == [5]
    temp = writer.temp_path
    download.failed(Failure(UpstreamUnavailable("cut")))
    assert download.state is State.FAILED and not os.path.exists(temp)
    assert len(seen) == 2 and download.failure is not None  # watchers hear of the end
    late = download.ready()
    assert isinstance(late.result, Failure) and late.result.check(UpstreamUnavailable)
    late.addErrback(lambda f: None)


def test_a_reader_that_opens_between_the_rename_and_the_commit_gets_the_bytes(tmp_path):
    """
    The commit renames the temp file in a thread, so a client that found no
    entry a moment before may open the download when the temp name is gone
    and the commit not yet told (seen under load in tests/test_cluster.py:
    a 503 "cannot open the cached file").
    """
    store = CacheStore(str(tmp_path))
    download = Download(spec(), Clock())
    writer = download.open_writer(store, 5, {})
    writer.write(b"12345")
    os.rename(writer.temp_path, store.path_for(download.key))  # what the publishing thread does
    fd = download.open()
    try:
        assert os.pread(fd, 5, 0) == b"12345"
    finally:
        os.close(fd)
    download.failed(Failure(UpstreamUnavailable("test over")))
    with pytest.raises(FileNotFoundError):
        download.open()  # no file any more: nothing is left open either


def test_a_waiter_that_leaves_drops_only_its_own_wait():
    download = Download(spec(), Clock())
    leaving, staying = download.ready(), download.ready()
    leaving.cancel()
    assert leaving.called and leaving.result.check(CancelledError)
    leaving.addErrback(lambda f: None)
    download.failed(Failure(UpstreamStatus(404, "http://upstream/x")))
    assert staying.result.check(UpstreamStatus)
    staying.addErrback(lambda f: None)


def test_a_download_every_client_left_stops_after_the_grace_unless_nearly_done(tmp_path):
    clock = Clock()
    store = CacheStore(str(tmp_path))
    stopped = []
    early = Download(spec("b/early"), clock)
    early.stop_upstream = lambda: stopped.append("early")
    writer = early.open_writer(store, 100 * dl.FINISH_IF_REMAINING, {})
    writer.write(b"x" * 1000)
    early.attach()
    early.detach()
    clock.advance(dl.ABANDON_GRACE - 1)
    early.attach()  # a client came back in time: the clock starts again when it leaves
    early.detach()
    clock.advance(dl.ABANDON_GRACE - 1)
    assert early.state is State.STREAMING
    clock.advance(2)
    assert early.state is State.FAILED and stopped == ["early"]
    early.ready().addErrback(lambda f: None)

    nearly = Download(spec("b/nearly"), clock)
    nearly.stop_upstream = lambda: stopped.append("nearly")
    writer = nearly.open_writer(store, 2000, {})
    writer.write(b"x" * 1500)
    nearly.attach()
    nearly.detach()
    clock.advance(dl.ABANDON_GRACE + 1)
    assert nearly.state is State.STREAMING and stopped == ["early"]
    nearly.failed(Failure(UpstreamUnavailable("end of test")))


def test_a_download_of_unknown_size_nobody_waits_for_is_stopped(tmp_path):
    clock = Clock()
    download = Download(spec(), clock)
    download.open_writer(CacheStore(str(tmp_path)), None, {}).write(b"x")
    download.attach()
    download.detach()
    clock.advance(dl.ABANDON_GRACE + 1)
    assert download.state is State.FAILED


# -- Downloads: one per key, slots, locks ------------------------------------------------------


def test_one_upstream_fetch_per_key_whoever_joins(tmp_path):
    store = CacheStore(str(tmp_path))
    upstream = StandInUpstream()
    downloads = Downloads(store, upstream, Clock())
    first, how_first = downloads.join(spec("b/a"))
    second, how_second = downloads.join(spec("b/a"))
    assert (how_first, how_second) == ("started", "joined") and first is second
    assert len(upstream.calls) == 1 and len(downloads) == 1
    other, _ = downloads.join(spec("b/other"))
    assert other is not first and len(upstream.calls) == 2
    lock_files = [f for _, _, fs in os.walk(os.path.join(str(tmp_path), ".locks")) for f in fs]
    assert len(lock_files) == 2  # one per download running
    for d in (first, other):
        d.failed(Failure(UpstreamUnavailable("end of test")))
    assert len(downloads) == 0
    assert [f for _, _, fs in os.walk(os.path.join(str(tmp_path), ".locks")) for f in fs] == []


def test_downloads_beyond_the_slots_wait_and_a_stopped_one_gives_its_slot_back(tmp_path):
    upstream = StandInUpstream()
    downloads = Downloads(CacheStore(str(tmp_path)), upstream, Clock())
    slots = DeferredSemaphore(1)
    a, _ = downloads.join(spec("b/a"), slots)
    b, _ = downloads.join(spec("b/b"), slots)
    c, _ = downloads.join(spec("b/c"), slots)
    assert [s.key for s, _, _ in upstream.calls] == ["b/a"]
    b.abort("the client left")  # stopped while waiting: never asks upstream
    a.failed(Failure(UpstreamUnavailable("done")))
    assert [s.key for s, _, _ in upstream.calls] == ["b/a", "b/c"]
    c.failed(Failure(UpstreamUnavailable("done")))
    assert slots.tokens == 1
    for d in (a, b, c):
        d.ready().addErrback(lambda f: None)


def test_an_entry_committed_meanwhile_is_served_without_a_fetch(tmp_path):
    store = CacheStore(str(tmp_path))
    store.write_small("b/a", b"kept", {"content_type": "text/plain"})
    upstream = StandInUpstream()
    download, how = Downloads(store, upstream, Clock()).join(spec("b/a"))
    assert how == "committed" and download.complete and upstream.calls == []
    assert download.ready().result is download


@pytest_twisted.ensureDeferred
async def test_a_fetched_body_is_published_and_observed_once(tmp_path):
    store = CacheStore(str(tmp_path))
    upstream = StandInUpstream()
    downloads = Downloads(store, upstream, reactor)
    observed = []
    downloads.observe(lambda d: observed.append((d.key, d.state)))
    download, _ = downloads.join(spec("b/a"))
    upstream.answer(0, b"hello")
    entry = await download.published()
    assert open(entry.path, "rb").read() == b"hello"
    assert entry.meta["sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert store.lookup("b/a") is not None and observed == [("b/a", State.COMMITTED)]


def test_a_start_that_cannot_write_fails_like_storage(tmp_path):
    store = CacheStore(str(tmp_path))
    store.free_space = lambda key: 5
    download = Download(spec(), Clock())
    with pytest.raises(Exception) as raised:
        download.open_writer(store, 10, {})
    assert raised.value.status == 507 and download.state is State.PENDING


# -- kept answers ---------------------------------------------------------------------------------


class Asker:
    """An ask() whose answers the test scripts: an Answer, NOT_MODIFIED, or an exception."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.asked = []

    def __call__(self, kept):
        self.asked.append(kept)
        outcome = self.outcomes.pop(0)
        return fail(outcome) if isinstance(outcome, Exception) else succeed(outcome)


def kept_answers(tmp_path, clock):
    return KeptAnswers(CacheStore(str(tmp_path)), clock=clock.seconds)


def got(d):
    """The result of a Deferred that has fired (everything here is synchronous)."""
    results = []
    d.addBoth(results.append)
    assert results, "not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def test_an_answer_is_reused_for_its_ttl_then_revalidated(tmp_path):
    clock = Clock()
    clock.advance(1000)
    kept = kept_answers(tmp_path, clock)
    health = UpstreamHealth("t", clock=clock.seconds)
    page = Answer(200, {"etag": '"v1"', "content-type": "text/html"}, b"page")
    ask = Asker(page, NOT_MODIFIED)
    first = got(kept.get("b/page", ask, ttl=60, health=health))
    assert (first.source, first.body) == ("upstream", b"page")
    clock.advance(59)
    assert got(kept.get("b/page", ask, ttl=60, health=health)).source == "kept" and len(ask.asked) == 1
    clock.advance(2)
    again = got(kept.get("b/page", ask, ttl=60, health=health))
    assert again.source == "revalidated" and again.body == b"page"
    assert ask.asked[1].validators == {"If-None-Match": '"v1"'}  # a conditional request
    assert got(kept.get("b/page", ask, ttl=60, health=health)).source == "kept"  # the TTL starts again


def test_a_failing_upstream_gets_the_stale_answer_up_to_max_stale(tmp_path):
    clock = Clock()
    kept = kept_answers(tmp_path, clock)
    health = UpstreamHealth("t", clock=clock.seconds)
    ask = Asker(Answer(200, {}, b"v1"), UpstreamTimeout("silent"), Answer(503, {}, b"busy"),
                UpstreamUnavailable("refused"))
    got(kept.get("b/k", ask, ttl=0, health=health, identity="client-1"))
    clock.advance(10)
    assert got(kept.get("b/k", ask, ttl=0, health=health, identity="client-1")).source == "stale"
    assert got(kept.get("b/k", ask, ttl=0, health=health, identity="client-1")).source == "stale"
    assert not health.is_down()  # one client's failures say nothing of upstream
    clock.advance(100)
    with pytest.raises(UpstreamUnavailable):  # older than max_stale: not served
        got(kept.get("b/k", ask, ttl=0, health=health, identity="client-1", max_stale=50))


def test_while_upstream_is_down_a_kept_answer_is_served_without_asking(tmp_path):
    clock = Clock()
    kept = kept_answers(tmp_path, clock)
    health = UpstreamHealth("t", clock=clock.seconds)
    ask = Asker(Answer(200, {}, b"v1"), UpstreamUnavailable("refused"))
    got(kept.get("b/k", ask, ttl=0, health=health))
    with pytest.raises(UpstreamUnavailable):
        got(kept.get("b/other", ask, ttl=0, health=health, identity="anonymous"))
    assert health.is_down()  # the anonymous identity's failure is upstream's
    assert got(kept.get("b/k", ask, ttl=0, health=health)).source == "stale" and len(ask.asked) == 2


def test_answers_that_keep_says_no_to_are_passed_on_not_kept(tmp_path):
    clock = Clock()
    kept = kept_answers(tmp_path, clock)
    health = UpstreamHealth("t", clock=clock.seconds)
    ask = Asker(Answer(404, {}, b"no"), Answer(404, {}, b"no"))
    assert got(kept.get("b/k", ask, ttl=60, health=health)).status == 404
    assert got(kept.get("b/k", ask, ttl=60, health=health)).status == 404 and len(ask.asked) == 2
    assert kept.peek("b/k") is None


def test_identical_asks_at_once_share_one_upstream_call(tmp_path):
    kept = kept_answers(tmp_path, Clock())
    health = UpstreamHealth("t")
    calls = []

    def ask(k):
        calls.append(Deferred())
        return calls[-1]

    answers = [kept.get("b/k", ask, ttl=0, health=health, identity="vault") for _ in range(5)]
    other = kept.get("b/k", ask, ttl=0, health=health, identity="client-2")  # another identity: its own call
    assert len(calls) == 2
    for call in calls:
        call.callback(Answer(200, {}, b"v"))
    assert [got(a).body for a in answers + [other]] == [b"v"] * 6


@pytest_twisted.ensureDeferred
async def test_kept_answers_survive_a_restart(tmp_path):
    clock = Clock()
    clock.advance(500)
    kept = kept_answers(tmp_path, clock)
    health = UpstreamHealth("t", clock=clock.seconds)
    got(kept.get("b/k", Asker(Answer(200, {"etag": '"e"'}, b"body")), ttl=60, health=health))
    await kept.store.settled()
    again = kept_answers(tmp_path, clock)
    answer = again.peek("b/k")
    assert (answer.body, answer.headers, answer.checked_at) == (b"body", {"etag": '"e"'}, 500)


def test_a_coalesced_start_that_raises_fails_its_waiters_and_frees_the_key():
    coalescer = Coalescer()

    def broken():
        raise RuntimeError("a bug")

    d = coalescer.share("k", broken)
    assert isinstance(d.result, Failure) and d.result.check(RuntimeError)
    d.addErrback(lambda f: None)
    assert len(coalescer) == 0
    assert got(coalescer.share("k", lambda: succeed("ok"))) == "ok"


# -- fetch: upstream bodies checked before they count ----------------------------------------------


class Origin(Resource):
    isLeaf = True

    def __init__(self, body, status=200, length=None):
        super().__init__()
        self.body, self.status, self.length = body, status, length

    def render_GET(self, request):
        request.setResponseCode(self.status)
        request.setHeader(b"content-length", b"%d" % (self.length if self.length is not None else len(self.body)))
        request.write(self.body)
        request.finish()
        return NOT_DONE_YET


async def fetch_from(tmp_path, origin, **spec_fields):
    from treq.testing import RequestTraversalAgent

    from artifact_vault.fetch import Upstream

    agent = RequestTraversalAgent(origin)
    upstream = Upstream(reactor, agent=agent)
    store = CacheStore(str(tmp_path))
    download = Download(DownloadSpec(key="b/f", url="http://origin.test/f", **spec_fields), None)
    d = upstream.fetch(download.spec, lambda total, meta: download.open_writer(store, total, meta))
    for _ in range(200):
        agent.flush()
        if d.called:
            break
        await deferLater(reactor, 0.01, lambda: None)
    return d, download


@pytest_twisted.ensureDeferred
async def test_fetch_gives_the_writer_of_a_verified_body(tmp_path):
    body = b"model weights" * 1000
    d, download = await fetch_from(tmp_path, Origin(body), expected_sha256=hashlib.sha256(body).hexdigest(),
                                   expected_size=len(body))
    writer = await d
    assert writer.size == len(body) and download.state is State.STREAMING
    writer.writer.abort()


@pytest_twisted.ensureDeferred
async def test_fetch_refuses_wrong_bytes_wrong_sizes_and_error_statuses(tmp_path):
    body = b"x" * 5000
    for origin, fields, error in (
            (Origin(body), {"expected_sha256": "0" * 64}, IntegrityError),
            (Origin(body), {"expected_size": 4999}, IntegrityError),
            (Origin(b"gone", status=404), {}, UpstreamStatus)):
        d, _ = await fetch_from(tmp_path, origin, **fields)
        with pytest.raises(error):
            await d
