"""
Is an upstream answering at all?

`UpstreamHealth` is the state a backend consults before it waits for its
upstream: while the upstream counts as down, answers that the cache can give
are given at once.  It is judged only on failures that say something about
the upstream itself.  A 429 or a 5xx for one client's token, or a timeout
on one client's request, may be about that client: such failures count only
when they come from the vault's own identity or the anonymous one, or from
several client identities within a short window.
"""

import time

from .bounded import LRU
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
