"""
Running a test module over both TLS server transports: Twisted's
``TLSMemoryBIOProtocol`` and connect_native's ``TLSServerProtocol``.

A module that imports :func:`over_each_tls_transport` runs each of its tests
once per transport; the servers it builds read :func:`current` for their
``ConnectServerEndpoint(tls_transport=...)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from connect_native.tls_transport import TLS_TRANSPORTS

_current = ["twisted"]


def current() -> str:
    """The transport of the test running now (``"twisted"`` outside one)."""
    return _current[0]


@pytest.fixture(autouse=True, params=TLS_TRANSPORTS)
def over_each_tls_transport(request: pytest.FixtureRequest) -> Iterator[str]:
    _current[0] = request.param
    try:
        yield request.param
    finally:
        _current[0] = "twisted"
