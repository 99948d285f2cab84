"""
connect_native._checks: the one set of setting checks, and the one-line
messages the options, the ``connect:`` parsers and the keyword arguments
all word alike.
"""

from __future__ import annotations

import math

import pytest

from connect_native import _checks


@pytest.mark.parametrize("value", [0, -1, math.inf, math.nan, True, "1", None])
def test_positive_seconds_refuses(value: object) -> None:
    with pytest.raises(
        ValueError, match=r"^timeout must be a finite number of seconds > 0, not "
    ):
        _checks.positive_seconds("timeout", value)


def test_positive_seconds_gives_a_float() -> None:
    assert _checks.positive_seconds("timeout", 2) == 2.0
    assert isinstance(_checks.positive_seconds("timeout", 2), float)


def test_seconds_or_zero() -> None:
    assert _checks.seconds_or_zero("ttl", 0) == 0.0
    assert _checks.seconds_or_zero("ttl", 1.5) == 1.5
    with pytest.raises(
        ValueError, match=r"^ttl must be a finite number of seconds >= 0, not -1$"
    ):
        _checks.seconds_or_zero("ttl", -1)


def test_whole_number() -> None:
    assert _checks.whole_number("size", 4096, 4096, "bytes") == 4096
    with pytest.raises(
        ValueError, match=r"^size must be a whole number of bytes >= 4096, not 1$"
    ):
        _checks.whole_number("size", 1, 4096, "bytes")
    with pytest.raises(ValueError, match=r"^n must be a whole number >= 1, not True$"):
        _checks.whole_number("n", True, 1)


def test_port_number_and_service_name() -> None:
    assert _checks.port_number("port", 8443) == 8443
    with pytest.raises(ValueError, match=r"^port must be from 1 to 65535, not 0$"):
        _checks.port_number("port", 0)
    assert _checks.service_name("service", "web") == "web"
    with pytest.raises(
        ValueError, match=r"^service must be a non-empty service name, not ''$"
    ):
        _checks.service_name("service", "")


def test_seconds_text() -> None:
    assert _checks.seconds_text("--idle-timeout", "2.5") == 2.5
    with pytest.raises(
        ValueError,
        match=r"^timeout= must be a number of seconds > 0 \(e\.g\. 10\), not 'x'$",
    ):
        _checks.seconds_text("timeout=", "x", " (e.g. 10)")
    assert _checks.seconds_text("--cache", "0", zero_ok=True) == 0.0
    with pytest.raises(ValueError, match=r"^--cache must be a number of seconds >= 0"):
        _checks.seconds_text("--cache", "-1", zero_ok=True)


def test_whole_text() -> None:
    assert _checks.whole_text("--workers", "3", 1, 64) == 3
    with pytest.raises(
        ValueError, match=r"^--workers must be a whole number from 1 to 64, not '65'$"
    ):
        _checks.whole_text("--workers", "65", 1, 64)
    with pytest.raises(
        ValueError,
        match=r"^--buffer-size must be a whole number of bytes >= 4096, not 'x'$",
    ):
        _checks.whole_text("--buffer-size", "x", 4096, unit="bytes")


def test_one_of() -> None:
    assert _checks.one_of("--authorize", "agent", ("agent", "intentions")) == "agent"
    with pytest.raises(
        ValueError, match=r"^--authorize must be agent or intentions, not 'acl'$"
    ):
        _checks.one_of("--authorize", "acl", ("agent", "intentions"))
    with pytest.raises(
        ValueError,
        match=r"^--log-level must be one of debug, info, warn, error or critical, "
        r"not 'loud'$",
    ):
        _checks.one_of(
            "--log-level", "loud", ("debug", "info", "warn", "error", "critical")
        )
