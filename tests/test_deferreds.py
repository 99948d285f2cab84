"""
connect_native._deferreds: the one Waiters and the one bounded wait.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from connect_native._deferreds import Waiters, bounded


def outcome(d: Deferred[Any]) -> list[object]:
    seen: list[object] = []
    d.addBoth(seen.append)
    return seen


class Late(Exception):
    pass


# -- Waiters -------------------------------------------------------------------


def test_fire_settles_every_waiter_and_clears() -> None:
    waiters: Waiters[int] = Waiters()
    first, second = outcome(waiters.wait()), outcome(waiters.wait())
    assert len(waiters) == 2
    assert waiters
    waiters.fire(7)
    assert first == [7]
    assert second == [7]
    assert len(waiters) == 0
    assert not waiters


def test_fail_settles_every_waiter_with_the_error() -> None:
    waiters: Waiters[int] = Waiters()
    error = Late("no")
    seen = [outcome(waiters.wait()) for _ in range(3)]
    waiters.fail(error)
    for each in seen:
        assert isinstance(each[0], Failure)
        assert each[0].value is error
    assert len(waiters) == 0


def test_fail_takes_a_failure() -> None:
    waiters: Waiters[int] = Waiters()
    seen = outcome(waiters.wait())
    waiters.fail(Failure(Late("no")))
    assert isinstance(seen[0], Failure)
    assert seen[0].check(Late)


def test_cancelling_one_waiter_drops_only_it() -> None:
    waiters: Waiters[str] = Waiters()
    cancelled = waiters.wait()
    kept = outcome(waiters.wait())
    dropped = outcome(cancelled)
    cancelled.cancel()
    assert isinstance(dropped[0], Failure)
    assert dropped[0].check(CancelledError)
    assert len(waiters) == 1
    waiters.fire("x")
    assert kept == ["x"]
    assert len(dropped) == 1


def test_cancel_cancels_every_waiter() -> None:
    waiters: Waiters[str] = Waiters()
    seen = [outcome(waiters.wait()) for _ in range(2)]
    waiters.cancel()
    for each in seen:
        assert isinstance(each[0], Failure)
        assert each[0].check(CancelledError)
    assert len(waiters) == 0


def test_discard_stops_tracking_without_settling() -> None:
    waiters: Waiters[str] = Waiters()
    d = waiters.wait()
    waiters.discard(d)
    waiters.discard(d)
    waiters.fire("x")
    assert not d.called


def test_a_waiter_added_while_firing_waits_for_the_next_outcome() -> None:
    waiters: Waiters[int] = Waiters()
    later: list[Deferred[int]] = []
    waiters.wait().addCallback(lambda _: later.append(waiters.wait()))
    waiters.fire(1)
    assert len(later) == 1
    assert not later[0].called
    assert len(waiters) == 1
    waiters.fire(2)
    assert outcome(later[0]) == [2]


def test_a_waiter_cancelled_while_firing_is_not_settled_twice() -> None:
    waiters: Waiters[int] = Waiters()
    first = waiters.wait()
    second = waiters.wait()
    first.addCallback(lambda _: second.cancel())
    seen = outcome(second)
    waiters.fire(1)
    assert len(seen) == 1
    assert isinstance(seen[0], Failure)


# -- bounded ---------------------------------------------------------------------


def test_an_answer_in_time_passes_and_stops_the_timer() -> None:
    clock = Clock()
    d: Deferred[int] = Deferred()
    result = bounded(d, 5.0, clock, lambda: Late("late"))
    assert result is d
    seen = outcome(result)
    d.callback(3)
    assert seen == [3]
    assert clock.getDelayedCalls() == []


def test_a_failure_in_time_passes() -> None:
    clock = Clock()
    d: Deferred[int] = Deferred()
    seen = outcome(bounded(d, 5.0, clock, lambda: Late("late")))
    d.errback(ValueError("bad"))
    assert isinstance(seen[0], Failure)
    assert seen[0].check(ValueError)
    assert clock.getDelayedCalls() == []


def test_timing_out_cancels_and_gives_the_timeout_error() -> None:
    clock = Clock()
    cancelled: list[object] = []
    d: Deferred[int] = Deferred(cancelled.append)
    seen = outcome(bounded(d, 5.0, clock, lambda: Late("late")))
    clock.advance(4.9)
    assert seen == []
    clock.advance(0.1)
    assert cancelled == [d]
    assert isinstance(seen[0], Failure)
    assert seen[0].check(Late)


def test_after_the_timeout_only_cancelled_error_becomes_the_timeout() -> None:
    clock = Clock()
    d: Deferred[int] = Deferred(lambda d: d.errback(ValueError("refused")))
    seen = outcome(bounded(d, 1.0, clock, lambda: Late("late")))
    clock.advance(1.0)
    assert isinstance(seen[0], Failure)
    assert seen[0].check(ValueError)


def test_any_failure_after_the_timeout_becomes_the_timeout() -> None:
    clock = Clock()
    d: Deferred[int] = Deferred(lambda d: d.errback(ValueError("refused")))
    seen = outcome(bounded(d, 1.0, clock, lambda: Late("late"), any_failure=True))
    clock.advance(1.0)
    assert isinstance(seen[0], Failure)
    assert seen[0].check(Late)


def test_an_answer_despite_the_cancellation_is_kept() -> None:
    clock = Clock()
    d: Deferred[int] = Deferred(lambda d: d.callback(9))
    seen = outcome(bounded(d, 1.0, clock, lambda: Late("late"), any_failure=True))
    clock.advance(1.0)
    assert seen == [9]


def test_it_gives_what_add_timeout_gives() -> None:
    clock = Clock()
    d: Deferred[int] = Deferred()
    seen = outcome(bounded(d, 2.0, clock, lambda: TimeoutError(2.0, "Deferred")))
    theirs: Deferred[int] = Deferred()
    their_seen = outcome(theirs.addTimeout(2.0, clock))
    clock.advance(2.0)
    ours, twisted = seen[0], their_seen[0]
    assert isinstance(ours, Failure)
    assert isinstance(twisted, Failure)
    assert type(ours.value) is type(twisted.value)
    assert ours.value.args == twisted.value.args


def test_cancelling_before_the_timeout_is_a_plain_cancellation() -> None:
    clock = Clock()
    d: Deferred[int] = Deferred()
    seen = outcome(bounded(d, 1.0, clock, lambda: Late("late")))
    d.cancel()
    assert isinstance(seen[0], Failure)
    assert seen[0].check(CancelledError)
    assert clock.getDelayedCalls() == []


# -- bounded(abandon=True) ------------------------------------------------------


def test_abandon_fails_at_the_deadline_even_if_the_wait_ignores_it() -> None:
    clock = Clock()
    # Called but paused: cancelling it does nothing, its answer comes later.
    d: Deferred[int] = Deferred()
    d.pause()
    d.callback(1)
    result = bounded(d, 1.0, clock, lambda: Late("late"), abandon=True)
    assert result is not d
    seen = outcome(result)
    clock.advance(1.0)
    assert isinstance(seen[0], Failure)
    assert seen[0].check(Late)
    # The abandoned wait's late answer is dropped.
    d.unpause()
    assert len(seen) == 1


def test_abandon_fails_with_the_timeout_when_the_wait_honours_it() -> None:
    clock = Clock()
    d: Deferred[int] = Deferred()
    seen = outcome(bounded(d, 1.0, clock, lambda: Late("late"), abandon=True))
    clock.advance(1.0)
    assert d.called
    assert isinstance(seen[0], Failure)
    assert seen[0].check(Late)


def test_abandon_passes_an_answer_in_time() -> None:
    clock = Clock()
    d: Deferred[int] = Deferred()
    seen = outcome(bounded(d, 1.0, clock, lambda: Late("late"), abandon=True))
    d.callback(4)
    assert seen == [4]
    assert clock.getDelayedCalls() == []


def test_abandon_passes_a_failure_in_time() -> None:
    clock = Clock()
    d: Deferred[int] = Deferred()
    seen = outcome(bounded(d, 1.0, clock, lambda: Late("late"), abandon=True))
    d.errback(ValueError("bad"))
    assert isinstance(seen[0], Failure)
    assert seen[0].check(ValueError)


def test_cancelling_an_abandoning_wait_cancels_the_inner_one() -> None:
    clock = Clock()
    cancelled: list[object] = []
    d: Deferred[int] = Deferred(cancelled.append)
    result = bounded(d, 1.0, clock, lambda: Late("late"), abandon=True)
    seen = outcome(result)
    result.cancel()
    assert cancelled == [d]
    assert isinstance(seen[0], Failure)
    assert seen[0].check(CancelledError)
    assert clock.getDelayedCalls() == []


def test_abandon_keeps_an_answer_given_on_cancellation() -> None:
    clock = Clock()
    d: Deferred[int] = Deferred(lambda d: d.callback(5))
    seen = outcome(bounded(d, 1.0, clock, lambda: Late("late"), abandon=True))
    clock.advance(1.0)
    assert seen == [5]


def test_abandon_translates_as_bounded_does() -> None:
    clock = Clock()
    refused: Deferred[int] = Deferred(lambda d: d.errback(ValueError("refused")))
    plain = outcome(bounded(refused, 1.0, clock, lambda: Late("late"), abandon=True))
    other: Deferred[int] = Deferred(lambda d: d.errback(ValueError("refused")))
    anything = outcome(
        bounded(other, 1.0, clock, lambda: Late("late"), any_failure=True, abandon=True)
    )
    clock.advance(1.0)
    assert isinstance(plain[0], Failure)
    assert plain[0].check(ValueError)
    assert isinstance(anything[0], Failure)
    assert anything[0].check(Late)


def test_subscribers_are_told_in_order_and_one_that_raises_is_skipped() -> None:
    from twisted.logger import LogEvent, Logger, LogLevel, globalLogPublisher

    from connect_native._deferreds import Subscribers

    told: list[tuple[str, int]] = []
    subscribers: Subscribers[int] = Subscribers(
        Logger(), "a test subscriber", level=LogLevel.error
    )

    def broken(value: int) -> None:
        raise RuntimeError("no")

    subscribers.add(lambda v: told.append(("first", v)))
    subscribers.add(broken)
    remove = subscribers.add(lambda v: told.append(("last", v)))
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        subscribers.tell(1)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert told == [("first", 1), ("last", 1)]
    (failed,) = [e for e in events if "log_failure" in e]
    assert failed["what"] == "a test subscriber"
    assert failed["log_level"] is LogLevel.error
    remove()
    remove()  # twice does nothing
    subscribers.tell(2)
    assert told[-1] == ("first", 2)
    assert len(subscribers) == 2
