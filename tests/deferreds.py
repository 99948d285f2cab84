"""
What a Deferred has already done, for tests that drive it synchronously
(a ``Clock``, a ``MemoryReactor``, ``StubTreq``): its result, its failure,
or that it has not fired yet.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


def fired(d: Deferred[Any]) -> Any:
    """
    The result ``d`` has already fired with; its failure is raised.
    """
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def failed(d: Deferred[Any]) -> BaseException:
    """
    The exception ``d`` has already failed with.
    """
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    assert isinstance(out[0], Failure), f"expected a failure, got {out[0]!r}"
    error = out[0].value
    assert error is not None
    return error


def not_fired(d: Deferred[Any]) -> bool:
    """
    Whether ``d`` has no result for its callbacks yet; its result, if it
    has one, is passed on untouched.
    """
    results: list[Any] = []

    def record(result: Any) -> Any:
        results.append(result)
        return result

    d.addBoth(record)
    return not results
