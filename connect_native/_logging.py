"""
Where connect_native's log events go: Twisted's global log publisher, behind
a level filter.

Every logger in the package emits to :data:`observer`.  A library does not
decide what is shown, so by default everything passes (debug included), as
with any :class:`twisted.logger.Logger`; a program that owns its logging can
raise the level for the package's events with :func:`set_log_level`.  The
terminator does (``twistd connect-native --log-level``, info by default),
because twistd itself shows every event whatever its level.
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

__all__ = ["observer", "set_log_level"]

_NAMESPACE = "connect_native"

_levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.debug)

#: The observer all of connect_native's loggers emit to.
observer = FilteringLogObserver(globalLogPublisher, [_levels])


def set_log_level(level: LogLevel) -> LogLevel:
    """
    Drop connect_native's events below ``level`` (other namespaces are left
    as they are).

    :returns: the level before, to put back with this function.
    """
    before: LogLevel = _levels.logLevelForNamespace(_NAMESPACE)
    _levels.setLogLevelForNamespace(_NAMESPACE, level)
    return before
