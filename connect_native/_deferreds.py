"""
The package's one way of waiting: :class:`Waiters`, the Deferreds handed
out until something happens, and :func:`bounded`, the bound every network
wait has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

__all__ = ["Subscribers", "Waiters", "bounded"]

T = TypeVar("T")

_failure: Callable[[BaseException], Failure] = Failure


class Waiters(Generic[T]):
    """
    The Deferreds waiting for one outcome.  Each from :meth:`wait` is
    cancellable: cancelling it fails only it with ``CancelledError`` and
    drops it.  :meth:`fire`, :meth:`fail` and :meth:`cancel` settle every
    pending one and clear the list first, so a waiter added meanwhile (by a
    callback) waits for the next outcome.
    """

    def __init__(self) -> None:
        self._pending: list[Deferred[T]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def __bool__(self) -> bool:
        return bool(self._pending)

    def wait(self) -> Deferred[T]:
        """A new pending Deferred."""
        waiter: Deferred[T] = Deferred(self.discard)
        self._pending.append(waiter)
        return waiter

    def discard(self, waiter: Deferred[T]) -> None:
        """Stop tracking ``waiter`` without settling it."""
        if waiter in self._pending:
            self._pending.remove(waiter)

    def _take(self) -> list[Deferred[T]]:
        # Each is checked again as it is settled: one settled meanwhile (a
        # callback of an earlier one cancelled it) is not settled twice.
        pending, self._pending = self._pending, []
        return [waiter for waiter in pending if not waiter.called]

    def fire(self, result: T) -> None:
        """Fire every pending waiter with ``result``."""
        for waiter in self._take():
            if not waiter.called:
                waiter.callback(result)

    def fail(self, error: BaseException | Failure) -> None:
        """Fail every pending waiter with ``error``."""
        for waiter in self._take():
            if not waiter.called:
                waiter.errback(error)

    def cancel(self) -> None:
        """Cancel every pending waiter."""
        for waiter in self._take():
            waiter.cancel()


class Subscribers(Generic[T]):
    """
    The callbacks told of each new value (a new Bundle, a state change):
    :meth:`add` returns the function that removes one (calling it twice
    does nothing); :meth:`tell` calls each with the value, in the order
    they came, and a callback that raises is logged and skipped.

    :param log: where a raising callback is logged.
    :param what: how the log line names them ("certificate manager for
        web: a Bundle subscriber").
    :param level: the level of that line.
    """

    def __init__(
        self, log: Logger, what: str, *, level: LogLevel = LogLevel.critical
    ) -> None:
        self._callbacks: list[Callable[[T], object]] = []
        self._log = log
        self._what = what
        self._level = level

    def __len__(self) -> int:
        return len(self._callbacks)

    def add(self, callback: Callable[[T], object]) -> Callable[[], None]:
        self._callbacks.append(callback)

        def remove() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return remove

    def tell(self, value: T) -> None:
        for callback in list(self._callbacks):
            try:
                callback(value)
            except Exception:
                self._log.failure(
                    "{what} raised; ignoring it", level=self._level, what=self._what
                )


def bounded(
    d: Deferred[T],
    seconds: float,
    clock: IReactorTime,
    on_timeout: Callable[[], BaseException],
    *,
    any_failure: bool = False,
    abandon: bool = False,
) -> Deferred[T]:
    """
    ``d`` itself, cancelled after ``seconds`` on ``clock`` unless it has
    fired by then; the timer is cancelled when it fires.

    Once timed out, the ``CancelledError`` that ``d`` fails with becomes
    ``on_timeout()`` (with ``any_failure``, whatever it fails with does);
    an answer that comes anyway is kept.

    With ``abandon``, a new Deferred instead, for a ``d`` that may ignore
    its cancellation: the same, except that if ``d`` has not fired once
    cancelled at the deadline, it fails with ``on_timeout()`` then and what
    ``d`` says later is dropped.  Cancelling it cancels ``d`` (and the
    timer).
    """
    if abandon:
        return _abandoned_after(d, seconds, clock, on_timeout, any_failure)
    timed_out: list[bool] = []

    def expire() -> None:
        timed_out.append(True)
        d.cancel()

    call = clock.callLater(seconds, expire)

    def settle(outcome: T | Failure) -> T | Failure:
        if call.active():
            call.cancel()
        if (
            timed_out
            and isinstance(outcome, Failure)
            and (any_failure or isinstance(outcome.value, CancelledError))
        ):
            return _failure(on_timeout())
        return outcome

    return d.addBoth(settle)


def _abandoned_after(
    d: Deferred[T],
    seconds: float,
    clock: IReactorTime,
    on_timeout: Callable[[], BaseException],
    any_failure: bool,
) -> Deferred[T]:
    def cancel(_: Deferred[T]) -> None:
        if call.active():
            call.cancel()
        d.cancel()

    result: Deferred[T] = Deferred(cancel)
    timed_out: list[bool] = []

    def expire() -> None:
        timed_out.append(True)
        # What d says on its cancellation reaches settle() now...
        d.cancel()
        if not result.called:
            # ...and if it said nothing, it is abandoned: what it says later
            # is of no interest.
            result.errback(_failure(on_timeout()))

    call = clock.callLater(seconds, expire)

    def settle(outcome: T | Failure) -> None:
        if call.active():
            call.cancel()
        if result.called:
            # Abandoned, or cancelled while it ignored that.
            return
        if isinstance(outcome, Failure):
            if timed_out and (any_failure or isinstance(outcome.value, CancelledError)):
                outcome = _failure(on_timeout())
            result.errback(outcome)
        else:
            result.callback(outcome)

    d.addBoth(settle)
    return result
