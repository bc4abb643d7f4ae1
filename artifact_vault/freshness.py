"""
Freshness: small upstream answers that change, and whether upstream answers at all.

`UpstreamHealth` is the state a backend consults before it waits for its
upstream: while the upstream counts as down, answers that the cache can give
are given at once.  It is judged only on failures that say something about
the upstream itself.  A 429 or a 5xx for one client's token, or a timeout
on one client's request, may be about that client: such failures count only
when they come from the vault's own identity or the anonymous one, or from
several client identities within a short window.
"""

import time
from dataclasses import dataclass, replace

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.python.failure import Failure

from .bounded import LRU, SizedLRU
from .errors import UpstreamStatus, UpstreamTimeout, UpstreamUnavailable, VaultError
from .logs import VaultLogger

log = VaultLogger()

#: seconds the upstream counts as down after a failure (a 429's Retry-After wins, up to 300)
DOWN_PAUSE = 15
#: distinct client identities that must fail within `WINDOW` seconds to mean "down"
IDENTITIES = 3
WINDOW = 60.0
#: identities whose failures are the upstream's alone: nobody else chose them
TRUSTED = ("vault", "anonymous")


def is_offline_error(error: VaultError) -> bool:
    """Upstream could not answer now (as opposed to: it answered no)."""
    if isinstance(error, (UpstreamUnavailable, UpstreamTimeout)):
        return True
    return isinstance(error, UpstreamStatus) and (error.code >= 500 or error.code == 429)


def conditional_headers(etag: str | None, last_modified: str | None) -> dict:
    """The headers that ask upstream whether a kept copy with these validators is still current."""
    out = {}
    if etag:
        out["If-None-Match"] = etag
    if last_modified:
        out["If-Modified-Since"] = last_modified
    return out


class UpstreamHealth:
    def __init__(self, name: str, clock=time.monotonic):
        self.name = name
        self.clock = clock
        self._down_until = 0.0
        #: client identity -> when its last offline-looking failure was seen
        self._failing = LRU(IDENTITIES * 16)

    def is_down(self) -> bool:
        return self.clock() < self._down_until

    def failed(self, error: VaultError, identity: str) -> None:
        """An upstream request made as `identity` failed with `error` (an offline error)."""
        now = self.clock()
        if identity not in TRUSTED:
            self._failing[identity] = now
            recent = [who for who, at in self._failing.items() if now - at < WINDOW]
            if len(recent) < IDENTITIES:
                return
        pause = DOWN_PAUSE
        retry_after = error.headers.get("retry-after", "") if isinstance(error, VaultError) else ""
        if retry_after.isdigit() and len(retry_after) < 7:
            pause = min(max(int(retry_after), 1), 300)
        if not self.is_down():
            log.warn("{name}: upstream looks down ({why}); answering from the cache for {pause} s where it can",
                     name=self.name, why=error.message, pause=pause)
        self._down_until = now + pause


class Coalescer:
    """
    One upstream request for identical requests that arrive together: the
    first caller's ``start()`` runs, the others wait for its result (each
    gets a Deferred of its own, which it may cancel without disturbing the
    rest).  Keys should include the identity a request is made with, so
    that answers are shared only between clients upstream treats alike.
    """

    def __init__(self):
        self._waiting: dict = {}

    def share(self, key, start) -> Deferred:
        d = Deferred(lambda d: self._drop(key, d))
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append(d)
            return d
        self._waiting[key] = [d]

        def fan_out(result):
            for waiter in self._waiting.pop(key, []):
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        # maybeDeferred: a start() that raises at once fails its waiters instead of hanging the key
        maybeDeferred(start).addBoth(fan_out)
        return d

    def _drop(self, key, d) -> None:
        waiting = self._waiting.get(key)
        if waiting is not None and d in waiting:
            waiting.remove(d)

    def __len__(self) -> int:
        return len(self._waiting)


@dataclass
class Answer:
    """
    A small upstream answer: status, the headers worth keeping (lower-case
    names), the body, and when upstream last vouched for it (fetched or
    revalidated).  ``source`` says where this copy came from: "upstream",
    "revalidated" (a 304 renewed a kept copy), "kept" (within its TTL, no
    upstream asked) or "stale" (upstream failed; served anyway).
    """

    status: int
    headers: dict
    body: bytes
    checked_at: float = 0.0
    source: str = "upstream"

    @property
    def validators(self) -> dict:
        """Conditional request headers that revalidate this answer."""
        return conditional_headers(self.headers.get("etag"), self.headers.get("last-modified"))

    def age(self, now: float) -> float:
        return now - self.checked_at


#: what an ask() returns when upstream says a kept answer is still good
NOT_MODIFIED = object()


@dataclass(frozen=True)
class Stored:
    """A kept answer as it is on disk, without its body (`KeptAnswers.stored`)."""

    checked_at: float
    sha256: str
    size: int

    def age(self, now: float) -> float:
        return now - self.checked_at


class KeptAnswers:
    """
    Small mutable upstream answers (an index page, a tag, a branch's commit,
    an API answer), kept with their validators: reused for a TTL, then
    revalidated (``ask(kept)`` may send a conditional request and return
    `NOT_MODIFIED`), served stale, with a log line, when upstream fails (up
    to ``max_stale`` seconds), identical concurrent requests sharing one
    upstream call.  Kept on disk as store entries (so they survive a
    restart) and, the recently used ones, in memory: at most `MEMORY`
    answers and `memory_bytes` bytes of them (a backend whose clients can
    make it keep thousands of large answers holds no more than that).
    """

    MEMORY = 20_000
    #: bytes of answers held in memory, per instance (so per backend), unless the backend says otherwise
    MEMORY_BYTES = 16 * 1024 * 1024
    #: answers larger than this are read from disk each time instead of held in memory
    MEMORY_BODY_LIMIT = 256 * 1024
    #: what an answer held in memory costs beyond its body (headers, the objects)
    OVERHEAD = 512

    def __init__(self, store, clock=time.time, memory_bytes: int | None = None):
        self.store = store
        self.clock = clock
        budget = self.MEMORY_BYTES if memory_bytes is None else memory_bytes
        self._memory = SizedLRU(self.MEMORY, budget, lambda answer: len(answer.body) + self.OVERHEAD)
        #: when upstream last vouched for a large answer (its body stays on disk)
        self._renewed = LRU(self.MEMORY)
        #: answers being written to disk (their bytes are held by the write until it lands anyway)
        self._writing: dict = {}
        self._asking = Coalescer()

    def peek(self, key: str) -> Answer | None:
        """The kept answer for `key`, however old, or None."""
        answer = self._memory.get(key)
        if answer is not None:
            return answer
        writing = self._writing.get(key)
        if writing is not None:
            return replace(writing, checked_at=max(writing.checked_at, self._renewed.get(key, 0.0)))
        entry = self.store.lookup(key)
        if entry is None:
            return None
        kept = entry.meta.get("answer")
        if not isinstance(kept, dict):
            return None
        try:
            with open(entry.path, "rb") as f:
                body = f.read()
        except OSError:
            return None
        checked_at = float(kept.get("checked_at") or entry.meta.get("fetched_at") or 0)
        answer = Answer(int(kept.get("status", 200)), dict(kept.get("headers") or {}), body,
                        max(checked_at, self._renewed.get(key, 0.0)))
        self._remember(key, answer)
        return answer

    def stored(self, key: str) -> Stored | None:
        """
        What is kept on disk for `key` -- when upstream last vouched for it,
        its sha256 and size -- without reading its body; None while nothing
        is (or a newer answer is still being written).  For answers too
        large to hold in memory, which a caller serves from something it
        derived from them and keeps on disk as well.
        """
        if key in self._writing:
            return None
        entry = self.store.lookup(key)
        kept = entry.meta.get("answer") if entry is not None else None
        if not isinstance(kept, dict) or not isinstance(entry.meta.get("sha256"), str):
            return None
        checked_at = float(kept.get("checked_at") or entry.meta.get("fetched_at") or 0)
        held = self._memory.get(key)
        if held is not None:
            checked_at = max(checked_at, held.checked_at)
        return Stored(max(checked_at, self._renewed.get(key, 0.0)), entry.meta["sha256"], entry.size)

    def fresh(self, key: str, ttl: float) -> Answer | None:
        """
        The kept answer for `key` if upstream vouched for it less than `ttl`
        seconds ago (source "kept"), else None: what `get` answers without
        asking, for callers on a hot path that want no Deferred.
        """
        kept = self.peek(key)
        if kept is not None and kept.age(self.clock()) < ttl:
            return replace(kept, source="kept")
        return None

    def _remember(self, key: str, answer: Answer) -> None:
        # when upstream last vouched for it, also for an answer that memory does not hold (or lets go of)
        self._renewed[key] = answer.checked_at
        if len(answer.body) <= self.MEMORY_BODY_LIMIT:
            self._memory[key] = answer  # a SizedLRU: the least recently used give way
        else:
            self._memory.pop(key, None)

    def keep(self, key: str, answer: Answer) -> Deferred:
        """Keep `answer` for `key`: in memory at once, on disk in a thread (a failure there is logged)."""
        answer = replace(answer, source="kept")
        self._remember(key, answer)
        self._writing[key] = answer
        meta = {"content_type": answer.headers.get("content-type") or "application/octet-stream",
                "answer": {"status": answer.status, "headers": answer.headers, "checked_at": answer.checked_at}}

        def written(result):
            if self._writing.get(key) is answer:
                del self._writing[key]
            return result

        return self.store.write_later(key, answer.body, meta).addBoth(written)

    def renew(self, key: str, checked_at: float) -> None:
        """Upstream vouched again for the kept answer (in memory only: disk keeps the first time)."""
        kept = self.peek(key)
        if kept is not None:
            self._remember(key, replace(kept, checked_at=checked_at))

    def forget(self, key: str) -> None:
        self._memory.pop(key, None)
        self._renewed.pop(key, None)
        self._writing.pop(key, None)
        self.store.remove(key)

    @inlineCallbacks
    def get(self, key: str, ask, *, ttl: float, health: UpstreamHealth, identity: str = "anonymous",
            max_stale: float | None = None, keep=lambda answer: answer.status == 200, name: str | None = None):
        """
        The answer for `key`: kept and fresh (younger than `ttl`), or asked
        of upstream through ``ask(kept) -> Deferred[Answer | NOT_MODIFIED]``
        (`identity` is who it asks as, for `health` and for sharing), or kept
        and stale when upstream fails.  A new answer is kept when ``keep``
        says so.  Fails like upstream when there is no kept answer to fall
        back on.
        """
        name = name or key
        fresh = self.fresh(key, ttl)
        if fresh is not None:
            return fresh
        now = self.clock()
        kept = self.peek(key)
        usable = kept is not None and (max_stale is None or kept.age(now) < max_stale)
        if usable and health.is_down():
            log.info("Answering {name} from the cache (upstream is down)", name=name)
            return replace(kept, source="stale")
        try:
            fresh = yield self._asking.share((key, identity), lambda: ask(kept if usable else None))
        except VaultError as e:
            if not is_offline_error(e):
                raise
            health.failed(e, identity)
            if usable:
                log.info("Answering {name} from the cache ({why})", name=name, why=e.message)
                return replace(kept, source="stale")
            raise
        if fresh is NOT_MODIFIED:
            if kept is None:
                raise UpstreamUnavailable(f"upstream said {name} was not modified, but nothing is kept")
            renewed = replace(kept, checked_at=self.clock(), source="revalidated")
            self._remember(key, replace(renewed, source="kept"))
            return renewed
        if fresh.status >= 500 or fresh.status == 429:
            health.failed(UpstreamStatus(fresh.status, name, fresh.headers), identity)
            if usable:
                log.info("Answering {name} from the cache (upstream answered {status})", name=name,
                         status=fresh.status)
                return replace(kept, source="stale")
            return fresh
        if keep(fresh):
            fresh = replace(fresh, checked_at=self.clock())
            self.keep(key, fresh)
        return fresh


class KeptFiles:
    """
    Mutable upstream files of any size (an APT ``Contents`` index of tens of
    MB, a listing that changes), kept as store entries with their validators
    (ETag, Last-Modified) and never held in memory: the kept copy is served
    for a TTL; after it, a conditional GET runs as *the one download of the
    key* (`downloads.Downloads`, so identical requests, also of other
    processes, share it): a 304 renews the kept copy, a 200 streams the new
    version to the waiting clients while it is written and replaces the
    entry once complete and verified, and when upstream fails, times out,
    answers 5xx or 429, or does not answer within `wait` seconds while a
    copy is kept, the kept copy is served (logged as stale).  A 404 or 410
    means the file is gone: the kept copy is removed and the answer passed on.

    When upstream last vouched for a copy is the entry's ``fetched_at``, or
    the time of a later 304 (held in memory: after a restart the first
    request revalidates once more).
    """

    MEMORY = 20_000

    def __init__(self, store, downloads, reactor=None, clock=time.time):
        self.store = store
        self.downloads = downloads
        self.reactor = reactor
        self.clock = clock
        #: key -> when a 304 last renewed its kept copy
        self._renewed = LRU(self.MEMORY)

    def checked_at(self, entry) -> float:
        """When upstream last vouched for the kept `entry`."""
        fetched = entry.meta.get("fetched_at")
        fetched = float(fetched) if isinstance(fetched, (int, float)) else 0.0
        return max(fetched, self._renewed.get(entry.key, 0.0))

    def renew(self, key: str, when: float | None = None) -> None:
        self._renewed[key] = self.clock() if when is None else when

    @staticmethod
    def validators(entry) -> dict:
        return conditional_headers(entry.meta.get("etag"), entry.meta.get("last_modified"))

    def get(self, spec, *, ttl: float, health: UpstreamHealth, identity: str = "vault", slots=None,
            wait: float | None = None) -> Deferred:
        """
        Fires with ``(body, source)``: an `Entry` (source "kept", "revalidated"
        or "stale") or a streaming `Download` of a new version (source
        "upstream"; attached once for the caller, who detaches it when its
        answer is over).  Fails like upstream when nothing is kept.
        Cancelling it (the client left) drops only this caller.
        """
        name = spec.name
        entry = self.store.lookup(spec.key)
        if entry is not None and self.clock() - self.checked_at(entry) < ttl:
            return succeed((entry, "kept"))
        if entry is not None and health.is_down():
            log.info("Answering {name} from the cache (upstream is down)", name=name)
            return succeed((entry, "stale"))
        if entry is not None:
            spec = replace(spec, headers={**spec.headers, **self.validators(entry)}, replaces=True)
        else:
            spec = replace(spec, replaces=True)
        download, _how, ready = self.downloads.ready(spec, slots)
        download.attach()
        state = {"attached": True, "timer": None}

        def let_go():
            if state["attached"]:
                state["attached"] = False
                download.detach()

        result = Deferred(lambda _: (ready.cancel(), let_go()))

        def settle(outcome):
            timer = state["timer"]
            if timer is not None and timer.active():
                timer.cancel()
            if not result.called:
                result.callback(outcome)

        def streaming(running):
            if running.complete and running.entry is not None:
                # committed already: another process's revalidation (its 304 leaves the same copy)
                let_go()
                same = entry is not None and running.entry.meta.get("sha256") == entry.meta.get("sha256") \
                    and running.entry.meta.get("fetched_at") == entry.meta.get("fetched_at")
                if same:
                    self.renew(spec.key)
                settle((running.entry, "revalidated" if same else "upstream"))
            else:
                settle((running, "upstream"))

        def failed(failure):
            let_go()
            if result.called:
                return None
            if failure.check(CancelledError):
                return None
            error = failure.value if failure.check(VaultError) else None
            if isinstance(error, UpstreamStatus) and error.code == 304:
                if entry is None:
                    failure = Failure(UpstreamUnavailable(f"upstream said {name} was not modified, but nothing is kept"))
                else:
                    self.renew(spec.key)
                    return settle((entry, "revalidated"))
            elif error is not None and is_offline_error(error):
                health.failed(error, identity)
                if entry is not None:
                    log.info("Answering {name} from the cache ({why})", name=name, why=error.message)
                    return settle((entry, "stale"))
            elif isinstance(error, UpstreamStatus) and error.code in (404, 410) and entry is not None:
                log.info("{name} is gone upstream ({code}): removing the kept copy", name=name, code=error.code)
                self._renewed.pop(spec.key, None)
                self.store.remove(spec.key)
            timer = state["timer"]
            if timer is not None and timer.active():
                timer.cancel()
            result.errback(failure)
            return None

        ready.addCallbacks(streaming, failed)
        if wait is not None and entry is not None and not result.called and self.reactor is not None:
            def too_slow():
                if result.called:
                    return
                error = UpstreamTimeout(f"upstream did not answer for {name} within {wait:g} s")
                health.failed(error, identity)
                log.info("Answering {name} from the cache ({why})", name=name, why=error.message)
                ready.cancel()
                let_go()
                settle((entry, "stale"))

            state["timer"] = self.reactor.callLater(wait, too_slow)
        return result
