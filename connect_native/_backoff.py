"""
The one back-off of the package: how long to wait before the next try after
``failures`` failures in a row.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["backoff_delay"]

# 2**32 times any initial delay is past any maximum: no larger exponent.
_MAX_EXPONENT = 32


def backoff_delay(
    failures: int, initial: float, maximum: float, random: Callable[[], float]
) -> float:
    """
    ``initial`` doubled per failure after the first, at most ``maximum``,
    then spread between half and all of it by ``random()`` (in [0, 1)) so
    that clients failing together do not retry together.
    """
    exponent = min(max(failures - 1, 0), _MAX_EXPONENT)
    base = min(maximum, initial * 2.0**exponent)
    return base * (0.5 + 0.5 * random())
