"""
The terminator's log output: ``--log-format text`` (twistd's lines, the
default) or ``json`` (one JSON object a line), and the filter that keeps
Twisted's own chatter out at info.

twistd makes its log observer after parsing the options, from its
``--logger`` option when that names a factory: :func:`install` sets it on
twistd's options (unless the command line gave ``--logger`` or
``--syslog``), so every line of the process, twistd's own startup and
shutdown lines included, goes through :func:`observer_for`.  Where the lines
go is twistd's choice, kept: standard output with ``--nodaemon`` (or
``--logfile -``), else ``--logfile`` (``twistd.log`` by default), rotated on
``SIGUSR1`` as twistd does.

A JSON line has ``timestamp`` (ISO 8601, UTC), ``level``, ``message`` (the
text line's message), ``namespace``, every event field that is a string,
number, boolean or null, and ``traceback`` for a logged failure.  The
connection decisions (:func:`connect_native.server._log_decision`) carry
``service``, ``peer_address`` (``host:port``), ``peer_identity`` (the SPIFFE
ID), ``outcome`` (``allowed`` or ``refused``), ``reason`` and ``duration``
(seconds the decision took).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any, cast

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    LogLevel,
    PredicateResult,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from zope.interface import implementer

__all__ = [
    "JSONLinesObserver",
    "TextLinesObserver",
    "chatter",
    "install",
    "observer_for",
    "twistd_observer",
]

#: Twisted's per-factory lines (``Starting factory <...>``): at info, and
#: about a third of all lines while the agent is down (the HTTP client's
#: factory starts and stops with every attempt).
_CHATTER = ("Starting factory ", "Stopping factory ")

_LEVELS = frozenset(LogLevel.iterconstants())
_SKIPPED = frozenset({"message", "format", "time", "system", "isError", "why"})


@implementer(ILogFilterPredicate)
class _Chatter:
    """Drop Twisted's per-factory start and stop lines, pass the rest."""

    def __call__(self, event: LogEvent) -> PredicateResult:
        text = event.get("log_format")
        legacy = event.get("message")
        if isinstance(legacy, tuple) and legacy and isinstance(legacy[0], str):
            text = text or legacy[0]
        if isinstance(text, str) and text.startswith(_CHATTER):
            return _NO
        return _MAYBE


#: The filter predicate for Twisted's chatter.
chatter = _Chatter()
_NO: PredicateResult = cast(PredicateResult, PredicateResult.no)
_MAYBE: PredicateResult = cast(PredicateResult, PredicateResult.maybe)


def event_text(event: LogEvent) -> str:
    """
    The event's message, as Twisted's ``formatEvent`` gives it, without
    Twisted's pure-Python format-string parser when the event's format is
    one ``str.format_map`` renders the same way (no ``{call()}`` fields, no
    missing key): about 1.5 µs instead of 24 (``benchmarks/RUNS.rst``,
    run 30; one such line is logged per allowed connection).
    """
    text = event.get("log_format")
    if type(text) is str and "()" not in text and "log_flattened" not in event:
        try:
            return text.format_map(event)
        except Exception:  # noqa: S110 (Twisted's own answer, below, says what)
            pass
    return formatEvent(event)


def _time_text(when: float | None) -> str:
    return formatTime(when, timeFormatRFC3339)


@implementer(ILogObserver)
class TextLinesObserver:
    """
    Write each event to ``out`` as Twisted's ``textFileLogObserver`` does
    (``{timestamp} [{system}] {message}``, continuation lines indented by a
    tab), the same text, made with less work per line: the timestamp and
    system prefix kept for the current second, the message by
    :func:`event_text`.  Events with a failure go to Twisted's formatter.
    """

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self._prefixes: dict[tuple[Any, ...], str] = {}

    def line(self, event: LogEvent) -> str | None:
        """The event's line with its newline, or ``None`` for no line."""
        when = event.get("log_time")
        if "log_failure" in event or not isinstance(when, int | float):
            return formatEventAsClassicLogText(event, formatTime=_time_text)
        key = (
            int(when),
            event.get("log_system"),
            event.get("log_namespace"),
            event.get("log_level"),
        )
        try:
            prefix = self._prefixes.get(key)
        except TypeError:  # an unhashable system
            return formatEventAsClassicLogText(event, formatTime=_time_text)
        if prefix is None:
            # Twisted's own prefix for these fields, from a probe event.
            probe = dict(event, log_format="-")
            probe.pop("message", None)
            made = formatEventAsClassicLogText(probe, formatTime=_time_text)
            if made is None or not made.endswith("-\n"):
                return formatEventAsClassicLogText(event, formatTime=_time_text)
            prefix = made[:-2]
            if len(self._prefixes) > 64:
                self._prefixes.clear()
            self._prefixes[key] = prefix
        text = event_text(event)
        if not text:
            return None
        return prefix + text.replace("\n", "\n\t") + "\n"

    def __call__(self, event: LogEvent) -> None:
        text = self.line(event)
        if text:
            self.out.write(text)
            self.out.flush()


def _simple(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


@implementer(ILogObserver)
class JSONLinesObserver:
    """Write each event to ``out`` as one JSON object and a newline."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def line(self, event: LogEvent) -> str:
        """The event's JSON line, without the newline."""
        when = event.get("log_time")
        stamp = (
            datetime.fromtimestamp(when, timezone.utc).isoformat(
                timespec="milliseconds"
            )
            if isinstance(when, int | float)
            else None
        )
        level = event.get("log_level")
        body: dict[str, Any] = {
            "timestamp": stamp,
            "level": getattr(level, "name", "info") if level in _LEVELS else "info",
            "message": event_text(event),
            "namespace": event.get("log_namespace"),
        }
        for key, value in event.items():
            if (
                key.startswith("log_")
                or key in _SKIPPED
                or key in body
                or not _simple(value)
            ):
                continue
            body[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            try:
                body["traceback"] = failure.getTraceback()
            except Exception:  # pragma: no cover (a broken failure)
                body["traceback"] = repr(failure)
        return json.dumps(body, default=repr, ensure_ascii=False)

    def __call__(self, event: LogEvent) -> None:
        self.out.write(self.line(event) + "\n")
        self.out.flush()


def observer_for(out: IO[str], log_format: str, log_level: str) -> ILogObserver:
    """
    The observer for ``--log-format`` writing to ``out``: Twisted's chatter
    filtered out unless ``--log-level debug``.
    """
    inner: ILogObserver = (
        JSONLinesObserver(out) if log_format == "json" else TextLinesObserver(out)
    )
    if log_level == "debug":
        return inner
    return FilteringLogObserver(inner, [chatter])


def _log_file(options: Any) -> IO[str]:
    """Where twistd would write its lines, as it chooses."""
    name = options.get("logfile") or ""
    nodaemon = bool(options.get("nodaemon", False))
    if name == "-":
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")
        return sys.stdout
    if nodaemon and not name:
        return sys.stdout
    from twisted.python import logfile

    from_path: Any = logfile.LogFile.fromFullPath
    out: Any = from_path(name or "twistd.log")
    try:
        import signal
    except ImportError:  # pragma: no cover (every POSIX system has it)
        return out  # type: ignore[no-any-return]
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: object) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(out.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return out  # type: ignore[no-any-return]


#: What :func:`install` chose, for :func:`twistd_observer`.
_chosen: tuple[Any, str, str] | None = None


def twistd_observer() -> ILogObserver:
    """
    The observer factory :func:`install` names to twistd (``--logger``
    takes an importable name): :func:`observer_for` on twistd's file.
    """
    if _chosen is None:  # pragma: no cover (install sets it first)
        return observer_for(sys.stdout, "text", "info")
    options, log_format, log_level = _chosen
    return observer_for(_log_file(options), log_format, log_level)


def install(options: Any, log_format: str, log_level: str) -> None:
    """
    Have twistd log through :func:`observer_for`: name
    :func:`twistd_observer` as the log observer factory in twistd's
    ``options`` (the parent of the plugin's options), unless its command
    line chose one (``--logger``, ``--syslog``) or there is no twistd (the
    options parsed on their own, as in tests).
    """
    global _chosen
    if options is None or not hasattr(options, "get"):
        return
    if options.get("logger") or options.get("syslog"):
        return
    _chosen = (options, log_format, log_level)
    options["logger"] = f"{__name__}.twistd_observer"
