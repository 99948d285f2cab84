"""
The checks of settings, in one place, so that every module refuses alike and
words the refusal alike: a one-line :class:`ValueError` naming the setting
as its caller spells it (``timeout``, ``--idle-timeout``, ``timeout=``), what
it must be, and the value given.

Two kinds:

- values given in Python (keyword arguments): :func:`positive_seconds`,
  :func:`seconds_or_zero`, :func:`whole_number`, :func:`port_number`,
  :func:`service_name`;
- values given as text (an option of ``twistd connect-native``, an option of
  a ``connect:`` description): :func:`seconds_text`, :func:`whole_text` and
  :func:`one_of`.  A caller that must raise its own error (twistd's
  ``UsageError``, the endpoint parsers' ``EndpointStringError``) raises it
  with the same message.

Nothing here imports the rest of the package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "one_of",
    "port_number",
    "positive_seconds",
    "seconds_or_zero",
    "seconds_text",
    "service_name",
    "whole_number",
    "whole_text",
]


# --- values given in Python -------------------------------------------------


def positive_seconds(what: str, value: object) -> float:
    """
    ``value`` as a float if it is a finite number of seconds > 0 (a timeout,
    an interval, a lifetime); a :class:`ValueError` naming ``what``
    otherwise.
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
    "never": never remember, never wait); the error says ``>= 0``.
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


def port_number(what: str, value: object) -> int:
    """``value`` if it is an ``int`` (not a bool) from 1 to 65535."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"{what} must be from 1 to 65535, not {value!r}")
    return value


def service_name(what: str, value: object) -> str:
    """``value`` if it is a non-empty string (a service's name)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty service name, not {value!r}")
    return value


# --- values given as text ---------------------------------------------------


def seconds_text(
    what: str, value: str, example: str = "", *, zero_ok: bool = False
) -> float:
    """
    The text of a finite number of seconds > 0 (>= 0 when ``zero_ok``) as a
    float.

    :param example: said after the bound in the error, e.g. ``" (e.g. 10)"``.
    """
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and (seconds > 0 or (zero_ok and seconds == 0))):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(
            f"{what} must be a number of seconds {bound}{example}, not {value!r}"
        )
    return seconds


def whole_text(
    what: str,
    value: str,
    minimum: int,
    maximum: int | None = None,
    unit: str = "",
) -> int:
    """
    The text of a whole number (decimal) of at least ``minimum`` (and at
    most ``maximum``, when given) as an int.
    """
    try:
        number = int(value, 10)
    except ValueError:
        number = minimum - 1
    if number < minimum or (maximum is not None and number > maximum):
        of = f" of {unit}" if unit else ""
        bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise ValueError(f"{what} must be a whole number{of} {bounds}, not {value!r}")
    return number


def one_of(what: str, value: str, choices: Sequence[str]) -> str:
    """
    ``value`` if it is one of ``choices``; the error lists them ("agent or
    intentions", "one of debug, info, warn, error or critical").
    """
    if value not in choices:
        listed = (
            f"{', '.join(choices[:-1])} or {choices[-1]}"
            if len(choices) > 1
            else choices[0]
        )
        one = "one of " if len(choices) > 2 else ""
        raise ValueError(f"{what} must be {one}{listed}, not {value!r}")
    return value
