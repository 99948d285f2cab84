"""
The checks every module's settings use (so that they all refuse alike and
word the error alike), and seconds as the Go duration strings the agent
parses.
"""

from __future__ import annotations

import math

# The checks live in one place for the whole package; the records re-export
# them for the modules that have always found them here.
from connect_native._checks import positive_seconds, seconds_or_zero, whole_number

__all__ = [
    "format_duration",
    "positive_seconds",
    "seconds_or_zero",
    "whole_number",
]


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
