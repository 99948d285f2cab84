"""
Tests for connect_native.consul.blocking: the Watch loop's rules, on a Clock
with a scripted fetch function whose Deferreds the tests fire by hand.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

import pytest
from attrs import define, field
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure

from connect_native.consul.blocking import (
    Watch,
    WatchStoppedError,
    WatchTimeoutError,
)
from connect_native.consul.client import ConsulUnavailable
from connect_native.consul.records import Indexed


class AgentDown(Exception):
    pass


@define
class Request:
    """One call of the fake fetch function."""

    index: int
    wait: float
    at: float
    deferred: Deferred[Indexed[Any]] = field(init=False)
    cancelled: bool = False

    def answer(self, value: object, index: int | None) -> None:
        self.deferred.callback(Indexed(value, index))

    def error(self, exc: Exception | None = None) -> None:
        self.deferred.errback(exc or AgentDown("agent down"))


@define
class ScriptedFetch:
    """
    A fetch function that records each call and returns a Deferred the test
    fires by hand (``requests[-1].answer(...)``).
    """

    clock: Clock
    requests: list[Request] = field(factory=list)

    def __call__(self, index: int, wait: float) -> Deferred[Indexed[Any]]:
        request = Request(index, wait, self.clock.seconds())

        def canceller(_: Deferred[Indexed[Any]]) -> None:
            request.cancelled = True

        request.deferred = Deferred(canceller)
        self.requests.append(request)
        return request.deferred

    @property
    def last(self) -> Request:
        return self.requests[-1]


@define
class Harness:
    clock: Clock
    fetch: ScriptedFetch
    changes: list[Any]
    errors: list[Failure]
    watch: Watch[Any]


def make(**kwargs: Any) -> Harness:
    clock = Clock()
    fetch = ScriptedFetch(clock)
    changes: list[Any] = []
    errors: list[Failure] = []
    kwargs.setdefault("name", "test")
    kwargs.setdefault("jitter", random.Random(1))
    watch: Watch[Any] = Watch(
        clock, fetch, changes.append, on_error=errors.append, **kwargs
    )
    return Harness(clock, fetch, changes, errors, watch)


def watch_calls(clock: Clock) -> list[float]:
    """Delays of the calls the clock has scheduled, from now."""
    return [c.getTime() - clock.seconds() for c in clock.getDelayedCalls()]


# -- values and indexes -----------------------------------------------------


def test_first_request_has_index_zero_and_explicit_wait() -> None:
    h = make(wait=120.0)
    h.watch.start()
    assert [(r.index, r.wait) for r in h.fetch.requests] == [(0, 120.0)]


def test_first_value_delivered() -> None:
    h = make()
    first = h.watch.when_first()
    h.watch.start()
    h.fetch.last.answer("roots-1", 7)
    assert h.changes == ["roots-1"]
    assert h.watch.value == "roots-1"
    assert h.watch.index == 7
    assert h.watch.healthy
    assert first.result == "roots-1"
    # Once there is a value, when_first answers at once.
    assert h.watch.when_first().result == "roots-1"


def test_returned_index_is_sent_back() -> None:
    h = make(min_interval=1.0)
    h.watch.start()
    h.fetch.last.answer("a", 42)
    h.clock.advance(1.0)
    assert [r.index for r in h.fetch.requests] == [0, 42]


def test_same_value_not_redelivered_but_index_moves() -> None:
    h = make()
    h.watch.start()
    h.fetch.last.answer(["db-1"], 10)
    h.clock.advance(1.0)
    h.fetch.last.answer(["db-1"], 11)
    h.clock.advance(1.0)
    assert h.changes == [["db-1"]]
    assert h.fetch.last.index == 11
    h.fetch.last.answer(["db-1", "db-2"], 12)
    assert h.changes == [["db-1"], ["db-1", "db-2"]]


def test_equal_decides_what_counts_as_a_change() -> None:
    h = make(equal=lambda a, b: a["serial"] == b["serial"])
    h.watch.start()
    h.fetch.last.answer({"serial": 1, "age": 0}, 10)
    h.clock.advance(1.0)
    h.fetch.last.answer({"serial": 1, "age": 5}, 11)
    assert h.changes == [{"serial": 1, "age": 0}]


def test_index_reset_to_zero_when_it_goes_backwards() -> None:
    h = make()
    h.watch.start()
    h.fetch.last.answer("a", 100)
    h.clock.advance(1.0)
    assert h.fetch.last.index == 100
    # e.g. after a snapshot restore: the agent answers with a lower index.
    h.fetch.last.answer("b", 30)
    assert h.changes == ["a", "b"]
    assert h.watch.index == 0
    h.clock.advance(1.0)
    assert h.fetch.last.index == 0
    h.fetch.last.answer("b", 30)
    h.clock.advance(1.0)
    assert [r.index for r in h.fetch.requests] == [0, 100, 0, 30]
    assert h.changes == ["a", "b"]


@pytest.mark.parametrize("index", [0, -3])
def test_index_below_one_is_clamped_to_one(index: int) -> None:
    h = make()
    h.watch.start()
    h.fetch.last.answer("a", index)
    h.clock.advance(1.0)
    # 0 would ask for an immediate answer again: the loop would spin.
    assert h.fetch.last.index == 1


def test_no_spin_when_agent_answers_index_1_at_once() -> None:
    """ACL-filtered health answers ``[]`` with index 1 at once, forever."""
    clock = Clock()
    calls: list[tuple[float, int]] = []

    def acl_filtered(index: int, wait: float) -> Deferred[Indexed[list[str]]]:
        calls.append((clock.seconds(), index))
        if len(calls) > 100:  # a spinning loop fails the test instead of hanging
            watch.stop()
        return succeed(Indexed([], 1))

    watch: Watch[list[str]] = Watch(
        clock, acl_filtered, lambda v: None, name="health db", wait=2.0
    )
    watch.start()
    clock.pump([0.25] * 40)  # ten seconds
    # one at t=0 then one per min_interval (1 s): 0, 1, ..., 10
    assert [t for t, _ in calls] == [float(i) for i in range(11)]
    assert {i for _, i in calls[1:]} == {1}
    watch.stop()


def test_no_spin_when_index_changes_on_every_answer() -> None:
    """A leaf with a lifetime under 10 minutes is re-signed on every call."""
    clock = Clock()
    calls: list[float] = []

    def resigning(index: int, wait: float) -> Deferred[Indexed[str]]:
        calls.append(clock.seconds())
        if len(calls) > 100:  # a spinning loop fails the test instead of hanging
            watch.stop()
        return succeed(Indexed(f"cert-{len(calls)}", index + 2))

    watch: Watch[str] = Watch(
        clock, resigning, lambda v: None, name="leaf", wait=300.0, min_interval=2.0
    )
    watch.start()
    clock.pump([0.5] * 20)  # ten seconds
    assert calls == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    watch.stop()


def test_wake_on_change_asks_again_at_once_after_a_new_index() -> None:
    """
    Intentions: a write wakes the blocking read, and the next one must go
    out at once, or a deny written within min_interval of the last change
    waits for it (issue 15, item 5).
    """
    h = make(min_interval=1.0, wake_on_change=True)
    h.watch.start()
    h.fetch.last.answer("a", 5)
    h.clock.advance(0)
    assert [(r.index, r.at) for r in h.fetch.requests] == [(0, 0.0), (5, 0.0)]
    h.clock.advance(0.1)
    h.fetch.last.answer("b", 6)
    h.clock.advance(0)
    assert [(r.index, r.at) for r in h.fetch.requests][2:] == [(6, 0.1)]
    assert h.changes == ["a", "b"]


def test_wake_on_change_keeps_the_spin_guard_on_the_same_index() -> None:
    h = make(min_interval=1.0, wake_on_change=True)
    h.watch.start()
    h.fetch.last.answer("a", 5)
    h.clock.advance(0)
    h.clock.advance(0.25)
    h.fetch.last.answer("a", 5)  # back at once, nothing new: no spin
    h.clock.advance(0.5)
    assert len(h.fetch.requests) == 2
    h.clock.advance(0.25)
    assert [(r.index, r.at) for r in h.fetch.requests][2:] == [(5, 1.0)]


def test_wake_on_change_keeps_the_spin_guard_after_errors() -> None:
    h = make(min_interval=1.0, backoff_initial=0.1, wake_on_change=True)
    h.watch.start()
    h.fetch.last.answer("a", 5)
    h.clock.advance(0)
    h.fetch.last.error()
    h.clock.advance(0.5)
    assert len(h.fetch.requests) == 2
    h.clock.advance(0.5)
    assert [(r.index, r.at) for r in h.fetch.requests][2:] == [(0, 1.0)]


def test_endpoint_without_index_is_polled() -> None:
    """``/v1/connect/intentions/match`` never sends X-Consul-Index."""
    h = make(poll_interval=10.0, min_interval=1.0)
    h.watch.start()
    h.fetch.last.answer(["allow web"], None)
    assert watch_calls(h.clock) == [10.0]
    h.clock.advance(9.5)
    assert len(h.fetch.requests) == 1
    h.clock.advance(0.5)
    assert len(h.fetch.requests) == 2
    h.fetch.last.answer(["allow web"], None)
    h.clock.advance(10.0)
    assert [(r.index, r.at) for r in h.fetch.requests] == [
        (0, 0.0),
        (0, 10.0),
        (0, 20.0),
    ]
    assert h.changes == [["allow web"]]


# -- errors and backoff -----------------------------------------------------


def test_backoff_grows_is_capped_and_resets_after_success() -> None:
    h = make(
        backoff_initial=2.0,
        backoff_max=10.0,
        min_interval=0.5,
        jitter=random.Random(7),
    )
    twin = random.Random(7)
    h.watch.start()
    delays = []
    for _ in range(5):
        h.fetch.last.error()
        [delay] = watch_calls(h.clock)
        delays.append(delay)
        h.clock.advance(delay)
    bases = [2.0, 4.0, 8.0, 10.0, 10.0]
    assert delays == pytest.approx([b * (0.5 + 0.5 * twin.random()) for b in bases])
    assert all(b / 2 <= d <= b for b, d in zip(bases, delays, strict=True))
    assert h.watch.failures == 5
    assert not h.watch.healthy
    assert len(h.errors) == 5

    h.fetch.last.answer("ok", 3)
    assert h.watch.failures == 0
    assert h.watch.last_error is None
    assert h.watch.healthy
    h.clock.advance(1.0)
    h.fetch.last.error()
    [delay] = watch_calls(h.clock)
    assert delay == pytest.approx(2.0 * (0.5 + 0.5 * twin.random()))


def test_backoff_accepts_a_callable_for_jitter() -> None:
    h = make(backoff_initial=4.0, backoff_max=60.0, jitter=lambda: 0.0)
    h.watch.start()
    h.fetch.last.error()
    assert watch_calls(h.clock) == [2.0]


def test_error_keeps_value_and_retry_asks_for_an_immediate_answer() -> None:
    h = make(jitter=lambda: 0.0, backoff_initial=2.0)
    h.watch.start()
    h.fetch.last.answer("a", 9)
    h.clock.advance(1.0)
    h.fetch.last.error(AgentDown("connection refused"))
    assert h.watch.value == "a"
    assert h.watch.last_error is not None
    assert h.watch.last_error.check(AgentDown)
    assert h.errors[0].check(AgentDown)
    assert h.watch.index == 0
    h.clock.advance(1.0)
    # blocking at 9 would hide for up to `wait` that the agent is back
    assert [r.index for r in h.fetch.requests] == [0, 9, 0]
    h.fetch.last.answer("a", 9)
    assert h.watch.healthy
    assert h.changes == ["a"]
    h.clock.advance(1.0)
    assert h.fetch.last.index == 9


def test_fetch_raising_synchronously_is_an_error_not_a_crash() -> None:
    clock = Clock()
    errors: list[Failure] = []

    def broken(index: int, wait: float) -> Deferred[Indexed[str]]:
        raise AgentDown("no route")

    watch = Watch(clock, broken, lambda v: None, name="x", on_error=errors.append)
    watch.start()
    assert errors[0].check(AgentDown)
    assert len(clock.getDelayedCalls()) == 1
    watch.stop()


def test_fetch_returning_the_wrong_type_is_an_error_naming_it() -> None:
    clock = Clock()
    errors: list[Failure] = []

    def wrong(index: int, wait: float) -> Deferred[Any]:
        return succeed({"Index": 5})

    watch = Watch(clock, wrong, lambda v: None, name="roots", on_error=errors.append)
    watch.start()
    assert errors[0].check(TypeError)
    assert "roots" in str(errors[0].value)
    assert "dict" in str(errors[0].value)
    assert watch.value is None
    watch.stop()


def test_on_change_raising_is_logged_and_loop_goes_on() -> None:
    clock = Clock()
    fetch = ScriptedFetch(clock)

    def explode(value: str) -> None:
        raise RuntimeError("handler bug")

    watch = Watch(clock, fetch, explode, name="leaf web")
    watch.start()
    with capturedLogs() as events:
        fetch.last.answer("a", 3)
    assert watch.value == "a"
    [event] = [e for e in events if e.get("log_failure") is not None]
    assert event["log_failure"].check(RuntimeError)
    assert event["log_level"] is LogLevel.error
    assert event["watch"] == "leaf web"
    clock.advance(1.0)
    assert [r.index for r in fetch.requests] == [0, 3]


def test_on_change_deferred_failure_is_logged() -> None:
    clock = Clock()
    fetch = ScriptedFetch(clock)
    watch = Watch(clock, fetch, lambda v: fail(RuntimeError("async bug")), name="w")
    watch.start()
    with capturedLogs() as events:
        fetch.last.answer("a", 3)
    assert any(
        e.get("log_failure") is not None and e["log_failure"].check(RuntimeError)
        for e in events
    )
    watch.stop()


def test_failure_log_names_the_watch_and_index() -> None:
    h = make(name="health db")
    h.watch.start()
    with capturedLogs() as events:
        h.fetch.last.error()
    [event] = events
    assert event["log_level"] is LogLevel.warn
    assert (event["watch"], event["index"], event["failures"]) == ("health db", 0, 1)


def test_expected_agent_errors_are_one_line_without_a_traceback() -> None:
    """
    The agent being down is expected trouble: the warning carries the
    error's message, and no Failure that a text observer would print as a
    traceback on every retry.
    """
    h = make(name="roots")
    h.watch.start()
    with capturedLogs() as events:
        h.fetch.last.error(
            ConsulUnavailable("GET", "/v1/x", "refused", agent="http://a:1")
        )
    [event] = events
    assert event["log_level"] is LogLevel.warn
    assert "log_failure" not in event
    assert "could not talk to the Consul agent at http://a:1" in event["error"]
    assert event["error_type"] == "ConsulUnavailable"


def test_unexpected_errors_keep_their_traceback() -> None:
    h = make(name="roots")
    h.watch.start()
    with capturedLogs() as events:
        h.fetch.last.error(KeyError("surprise"))
    [event] = events
    assert event["log_failure"].check(KeyError)


# -- the bound on each fetch ------------------------------------------------


def test_fetch_cancelled_after_its_bound() -> None:
    h = make(wait=160.0, grace=5.0, jitter=lambda: 0.0, backoff_initial=4.0)
    assert h.watch.timeout == 160.0 + 10.0 + 5.0
    h.watch.start()
    h.clock.advance(174.9)
    assert not h.fetch.last.cancelled
    h.clock.advance(0.1)
    assert h.fetch.last.cancelled
    [error] = h.errors
    assert error.check(WatchTimeoutError)
    assert "175.0s" in str(error.value)
    # retried after the backoff
    assert watch_calls(h.clock) == [2.0]
    h.clock.advance(2.0)
    assert len(h.fetch.requests) == 2


def test_timeout_cancelled_when_fetch_answers() -> None:
    h = make(wait=10.0)
    h.watch.start()
    h.fetch.last.answer("a", 2)
    # only the next request is scheduled, no stray timeout
    assert watch_calls(h.clock) == [1.0]


def test_fetch_ignoring_cancellation_is_abandoned_at_its_bound() -> None:
    clock = Clock()
    stubborn: list[Deferred[Indexed[str]]] = []
    errors: list[Failure] = []

    class Stubborn(Deferred[Indexed[str]]):
        def cancel(self) -> None:
            pass

    def fetch(index: int, wait: float) -> Deferred[Indexed[str]]:
        d = Stubborn()
        stubborn.append(d)
        return d

    watch = Watch(
        clock,
        fetch,
        lambda v: None,
        name="w",
        wait=16.0,
        grace=0.0,
        jitter=lambda: 0.0,
        on_error=errors.append,
    )
    watch.start()
    clock.advance(17.0)
    assert errors[0].check(WatchTimeoutError)
    clock.advance(1.0)
    assert len(stubborn) == 2
    # a late answer from the abandoned fetch changes nothing
    stubborn[0].callback(Indexed("late", 99))
    assert watch.value is None
    assert watch.index == 0
    watch.stop()


# -- stop -------------------------------------------------------------------


def test_stop_cancels_in_flight_request_and_no_callbacks_after() -> None:
    h = make()
    h.watch.start()
    h.watch.stop()
    assert h.fetch.last.cancelled
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(1000.0)
    assert len(h.fetch.requests) == 1
    assert h.changes == []
    assert h.errors == []
    assert not h.watch.running


def test_late_answer_after_stop_is_ignored() -> None:
    clock = Clock()
    changes: list[str] = []
    pending: list[Deferred[Indexed[str]]] = []

    def fetch(index: int, wait: float) -> Deferred[Indexed[str]]:
        outer: Deferred[Indexed[str]] = Deferred()
        pending.append(outer)
        return outer

    watch = Watch(clock, fetch, changes.append, name="w")
    watch.start()
    watch.stop()
    # the cancelled request failed with CancelledError; nothing is unhandled
    # and nothing is delivered
    assert pending[0].called
    assert changes == []
    assert clock.getDelayedCalls() == []


def test_stop_cancels_scheduled_retry() -> None:
    h = make()
    h.watch.start()
    h.fetch.last.error()
    assert len(h.clock.getDelayedCalls()) == 1
    h.watch.stop()
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(1000.0)
    assert len(h.fetch.requests) == 1


def test_stop_is_idempotent() -> None:
    h = make()
    h.watch.start()
    h.watch.stop()
    h.watch.stop()
    assert h.clock.getDelayedCalls() == []


def test_stop_from_on_change_stops_the_loop() -> None:
    clock = Clock()
    fetch = ScriptedFetch(clock)
    watch: Watch[str] = Watch(clock, fetch, lambda v: watch.stop(), name="w")
    watch.start()
    fetch.last.answer("a", 5)
    assert not watch.running
    assert clock.getDelayedCalls() == []


def test_when_first_fails_on_stop() -> None:
    h = make()
    first = h.watch.when_first()
    h.watch.start()
    h.watch.stop()
    failures: list[Failure] = []
    first.addErrback(failures.append)
    [failure] = failures
    assert failure.check(WatchStoppedError)
    # a WatchStoppedError is a CancelledError, for callers that only know that
    assert failure.check(CancelledError)
    assert "'test'" in str(failure.value)


def test_cancelling_when_first_drops_only_that_waiter() -> None:
    h = make()
    dropped = h.watch.when_first()
    kept = h.watch.when_first()
    h.watch.start()
    dropped.cancel()
    dropped.addErrback(lambda f: f.trap(CancelledError))
    h.fetch.last.answer("v", 1)
    assert kept.result == "v"


def test_restart_starts_again_from_index_zero_and_keeps_value() -> None:
    h = make()
    h.watch.start()
    h.fetch.last.answer("a", 8)
    h.watch.stop()
    h.watch.start()
    h.clock.advance(1.0)
    assert h.fetch.last.index == 0
    h.fetch.last.answer("a", 8)
    assert h.changes == ["a"]
    assert h.watch.value == "a"


def test_start_twice_sends_one_request() -> None:
    h = make()
    h.watch.start()
    h.watch.start()
    assert len(h.fetch.requests) == 1


# -- configuration ----------------------------------------------------------


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("wait", 0.0),
        ("wait", -1.0),
        ("wait", float("inf")),
        ("min_interval", 0.0),
        ("poll_interval", 0.0),
        ("backoff_initial", 0.0),
        ("backoff_max", float("nan")),
        ("grace", -1.0),
    ],
)
def test_bad_settings_rejected_with_the_field_named(
    field_name: str, value: float
) -> None:
    with pytest.raises(ValueError, match=field_name):
        Watch(Clock(), ScriptedFetch(Clock()), print, name="w", **{field_name: value})


def test_backoff_max_below_initial_rejected() -> None:
    with pytest.raises(ValueError, match="backoff_max"):
        Watch(
            Clock(),
            ScriptedFetch(Clock()),
            print,
            name="w",
            backoff_initial=10.0,
            backoff_max=5.0,
        )


# -- properties -------------------------------------------------------------

# One scripted outcome per request: how long the fetch takes (None: it never
# answers, so the bound cancels it) and what it answers.
outcomes = st.tuples(
    st.one_of(st.none(), st.sampled_from([0.0, 0.0, 0.5, 3.0, 40.0])),
    st.one_of(
        st.just("error"),
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.one_of(st.none(), st.integers(min_value=-1, max_value=6)),
        ),
    ),
)


@given(
    script=st.lists(outcomes, min_size=1, max_size=25),
    min_interval=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_property_one_request_at_a_time_and_never_faster_than_min_interval(
    script: list[tuple[float | None, Any]], min_interval: float
) -> None:
    clock = Clock()
    starts: list[float] = []
    in_flight: list[Deferred[Indexed[str]]] = []
    remaining = list(script)

    def fetch(index: int, wait: float) -> Deferred[Indexed[str]]:
        assert not in_flight, "a second request while one is in flight"
        assert index >= 0
        starts.append(clock.seconds())
        after, outcome = remaining.pop(0) if remaining else (None, "error")
        answer: Callable[[], object]
        if outcome == "error":
            answer = lambda: d.errback(AgentDown("down"))  # noqa: E731
        else:
            value, index_back = outcome
            answer = lambda: d.callback(Indexed(value, index_back))  # noqa: E731

        def settle() -> object:
            in_flight.remove(d)
            return answer()

        call = clock.callLater(after, settle) if after is not None else None

        def canceller(_: Deferred[Indexed[str]]) -> None:
            in_flight.remove(d)
            if call is not None and call.active():
                call.cancel()

        d: Deferred[Indexed[str]] = Deferred(canceller)
        in_flight.append(d)
        return d

    watch = Watch(
        clock,
        fetch,
        lambda v: None,
        name="prop",
        wait=16.0,
        grace=1.0,
        min_interval=min_interval,
        poll_interval=5.0,
        backoff_initial=1.0,
        backoff_max=8.0,
        jitter=random.Random(0),
    )
    watch.start()
    while remaining and clock.seconds() < 10_000:
        clock.advance(0.5)
    watch.stop()

    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap >= min_interval - 1e-9 for gap in gaps)
    # after stop nothing is left: no request, no timeout, no retry
    assert clock.getDelayedCalls() == []
    assert not in_flight
