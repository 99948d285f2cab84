"""
Running a test module over both TLS server transports: Twisted's
``TLSMemoryBIOProtocol`` (the endpoint's default) and the terminator's own
``TLSServerProtocol``, injected as ``tls_protocol=``.

A module that imports :func:`over_each_tls_transport` runs each of its tests
once per transport; the servers it builds pass :func:`current` as their
``ConnectServerEndpoint(tls_protocol=...)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from connect_native.server import TLSProtocolFactory
from connect_native.terminator._tls import TLSServerProtocol

_current: list[TLSProtocolFactory | None] = [None]


def current() -> TLSProtocolFactory | None:
    """
    The ``tls_protocol=`` of the test running now: ``None`` (Twisted's
    transport, also outside one) or the terminator's ``TLSServerProtocol``.
    """
    return _current[0]


@pytest.fixture(
    autouse=True, params=[None, TLSServerProtocol], ids=["twisted", "connect_native"]
)
def over_each_tls_transport(
    request: pytest.FixtureRequest,
) -> Iterator[TLSProtocolFactory | None]:
    _current[0] = request.param
    try:
        yield request.param
    finally:
        _current[0] = None
