"""
The checks every module's settings use (so that they all refuse alike and
word the error alike), and seconds as the Go duration strings the agent
parses.
"""

from __future__ import annotations

import math

__all__ = [
    "format_duration",
    "positive_seconds",
    "seconds_or_zero",
    "whole_number",
]


def positive_seconds(what: str, value: object) -> float:
    """
    ``value`` as a float if it is a finite number of seconds > 0 (a timeout,
    an interval, a lifetime); a :class:`ValueError` naming ``what``
    otherwise.  Every module's settings use this one check, so they all
    refuse alike and word the error alike.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(
            f"{what} must be a finite number of seconds > 0, not {value!r}"
        )
    return float(value)


def seconds_or_zero(what: str, value: object) -> float:
    """
    :func:`positive_seconds`, with 0 allowed too (a bound where 0 means
    "never": never reuse, never serve stale); the error says ``>= 0``.
    """
    if not isinstance(value, bool) and isinstance(value, int | float) and value == 0:
        return 0.0
    try:
        return positive_seconds(what, value)
    except ValueError:
        raise ValueError(
            f"{what} must be a finite number of seconds >= 0, not {value!r}"
        ) from None


def whole_number(what: str, value: object, minimum: int, unit: str = "") -> int:
    """
    ``value`` if it is an ``int`` (not a bool) of at least ``minimum``; a
    :class:`ValueError` naming ``what`` (and the ``unit``, e.g. "bytes")
    otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        of = f" of {unit}" if unit else ""
        raise ValueError(
            f"{what} must be a whole number{of} >= {minimum}, not {value!r}"
        )
    return value


def format_duration(seconds: float, what: str = "duration") -> str:
    """
    Seconds as a Go duration string, as the agent parses them: whole seconds
    as ``"15s"``, anything finer in milliseconds (``"1500ms"``, what Consul's
    own Go client sends).
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"{what} must be a number of seconds, got {seconds!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(
            f"{what} must be a finite number of seconds > 0, got {seconds!r}"
        )
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    millis = round(seconds * 1000)
    if millis < 1:
        raise ValueError(f"{what} must be at least 1 millisecond, got {seconds!r}")
    return f"{millis}ms"
