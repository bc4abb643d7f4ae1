"""
Logging through twisted.logger, filtered at the configured ``log_level``.

twistd owns the log observers and starts them after the service is built, so
the level is applied where our events are emitted: `VaultLogger.emit` drops
what is below the threshold.  Twisted's own messages are not filtered.
"""

from twisted.logger import Logger, LogLevel

_ORDER = [LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical]
_BY_NAME = dict(zip(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], _ORDER))
_threshold = _ORDER.index(LogLevel.info)


def set_level(name: str) -> None:
    global _threshold
    _threshold = _ORDER.index(_BY_NAME[name.upper()])


class VaultLogger(Logger):
    def emit(self, level, format=None, **kwargs):
        if _ORDER.index(level) >= _threshold:
            super().emit(level, format, **kwargs)
