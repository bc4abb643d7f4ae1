"""
Maps that clients can fill only so far.

Anything keyed by what a client sends (a token, a path, a query) must not
grow without bound: `LRU` forgets the least recently used entry once it
holds `limit` of them.
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
