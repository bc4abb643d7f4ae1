"""
Maps that clients can fill only so far.

Anything keyed by what a client sends (a token, a path, a query) must not
grow without bound: `LRU` forgets the least recently used entry once it
holds `limit` of them.  `SizedLRU` also bounds the bytes its values hold
(an answer's body, a parsed table), so that a few thousand large values
cannot stand where a few thousand small ones were meant to.
"""

from collections import OrderedDict


class LRU(OrderedDict):
    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def get(self, key, default=None):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


class SizedLRU(LRU):
    """
    An `LRU` bounded in entries (`limit`) and in bytes: the values' sizes
    (``size_of(value)``, measured once when set) add up to at most `budget`;
    the least recently used go first.  A value larger than the whole budget
    is not kept at all (and does not push everything else out).
    """

    def __init__(self, limit: int, budget: int, size_of=len):
        super().__init__(limit)
        self.budget = budget
        self.size_of = size_of
        #: bytes the values hold now
        self.total = 0
        self._sizes: dict = {}

    def __setitem__(self, key, value):
        size = self.size_of(value)
        if key in self:
            self.pop(key)
        if size > self.budget:
            return
        super().__setitem__(key, value)
        self._sizes[key] = size
        self.total += size
        while self.total > self.budget and len(self) > 1:
            self.popitem(last=False)

    def __delitem__(self, key):
        super().__delitem__(key)
        self.total -= self._sizes.pop(key, 0)

    _MISSING = object()

    def pop(self, key, default=_MISSING):
        if key in self:
            value = super().pop(key)
            self.total -= self._sizes.pop(key, 0)
            return value
        if default is SizedLRU._MISSING:
            raise KeyError(key)
        return default

    def popitem(self, last=True):
        key, value = super().popitem(last=last)
        self.total -= self._sizes.pop(key, 0)
        return key, value

    def clear(self):
        super().clear()
        self._sizes.clear()
        self.total = 0
