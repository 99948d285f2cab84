"""
The blocking-query loop: one :class:`Watch` keeps a value read from the
Consul agent up to date and calls back when it changes.

The rules follow what the real agent does (Consul 1.8.7, measured):

* Every request carries an explicit ``wait``: the agent-cache endpoints
  (CA roots, leaf certificates) block forever when it is missing or zero.
* The first request sends ``index=0`` (answer at once); each next one sends
  the ``X-Consul-Index`` of the previous answer, clamped to at least 1 (an
  index of 0 would ask for an immediate answer and the loop would spin).
* An index lower than the one held (a snapshot restore, or an index we sent
  that was higher than the agent's) resets the loop to 0.
* Requests start at least ``min_interval`` apart, whatever the agent answers:
  an ACL-filtered health read answers ``index=1`` at once forever, and a leaf
  with a lifetime under ten minutes is re-signed on every call.  A watch
  made with ``wake_on_change`` (intentions: a deny must reach the next
  connection at once) asks again at once after an answer whose index moved
  on, and keeps the guard for an answer with the same index.
* An answer without an index (``/v1/connect/intentions/match``) cannot be
  blocked on; such endpoints are polled every ``poll_interval``.
* Errors are retried after an exponential backoff with jitter, capped, reset
  by the next success. The retry sends ``index=0``, so a recovered agent
  answers at once instead of holding the request for ``wait``.
* Every fetch is bounded by ``wait + wait / 16 + grace`` seconds and cancelled
  after that, whatever the fetch function does.
* Values equal to the last one delivered are not delivered again; a new index
  with an equal value only moves the index.
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Callable
from typing import Generic, TypeVar, cast

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from connect_native import _logging
from connect_native._backoff import backoff_delay
from connect_native._deferreds import Waiters, bounded
from connect_native.consul.errors import WatchStoppedError, WatchTimeoutError
from connect_native.consul.records import ConsulError, Indexed

__all__ = [
    "Fetch",
    "Watch",
    "WatchStoppedError",
    "WatchTimeoutError",
]

T = TypeVar("T")

Fetch = Callable[[int, float], "Deferred[Indexed[T]]"]
"""
``fetch(index, wait_seconds)``: one read from the agent. ``index`` 0 means
"answer at once"; otherwise block until the data's index passes ``index`` or
``wait_seconds`` elapse. For example
``lambda index, wait: client.leaf("web", index=index, wait=wait)``.
"""

# Failure's constructor is untyped; this gives it a type once.
_failure: Callable[[BaseException], Failure] = Failure

# The agent's RPC endpoints add up to wait/16 of jitter to the wait.
_JITTER_FRACTION = 16


def _positive(field: str, value: float, *, allow_zero: bool = False) -> float:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        wanted = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ValueError(f"Watch {field} must be {wanted} (seconds), got {value!r}")
    return float(value)


class Watch(Generic[T]):
    """
    Keep one blocking read fresh and call ``on_change`` with each new value.

    :param clock: schedules requests, retries and timeouts.
    :param fetch: performs one read, see :data:`Fetch`.
    :param on_change: called with each value that differs (by ``equal``) from
        the previous one, the first value included. An exception it raises is
        logged and the watch goes on.
    :param name: names the watch in logs and errors (e.g. ``"leaf web"``).
    :param wait: seconds the agent may hold each request (always sent).
    :param min_interval: least number of seconds between two request starts.
    :param poll_interval: seconds between reads of an endpoint that sends no
        index.
    :param backoff_initial: base delay in seconds after the first error; it
        doubles with each further error up to ``backoff_max``; the delay is
        drawn between half the base and the base.
    :param backoff_max: cap on the base delay after errors.
    :param grace: seconds allowed beyond ``wait + wait / 16`` before a fetch
        is cancelled.
    :param on_error: called with the :class:`Failure` of each failed fetch.
    :param jitter: source of randomness for the backoff: a
        :class:`random.Random` or a callable returning floats in ``[0, 1)``.
    :param equal: decides whether a new value is the same as the last one.
    :param wake_on_change: after an answer whose index is higher than the one
        sent, send the next request at once rather than ``min_interval``
        after the last one started.  The guard still spaces requests after
        an answer with the same index (an agent answering at once without
        change), after errors, and for polls.  Only for an endpoint whose
        index moves with real writes: a leaf shorter-lived than ten minutes
        gets a new index on every call.
    """

    _log = Logger(observer=_logging.observer)

    def __init__(
        self,
        clock: IReactorTime,
        fetch: Fetch[T],
        on_change: Callable[[T], object],
        *,
        name: str,
        wait: float = 300.0,
        min_interval: float = 1.0,
        poll_interval: float = 10.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        grace: float = 5.0,
        on_error: Callable[[Failure], object] | None = None,
        jitter: random.Random | Callable[[], float] | None = None,
        equal: Callable[[T, T], bool] = operator.eq,
        wake_on_change: bool = False,
    ) -> None:
        self._clock = clock
        self._fetch = fetch
        self._on_change = on_change
        self.name = name
        self.wait = _positive("wait", wait)
        self.min_interval = _positive("min_interval", min_interval)
        self.poll_interval = _positive("poll_interval", poll_interval)
        self.backoff_initial = _positive("backoff_initial", backoff_initial)
        self.backoff_max = _positive("backoff_max", backoff_max)
        if self.backoff_max < self.backoff_initial:
            raise ValueError(
                f"Watch backoff_max ({backoff_max!r}) must be >= backoff_initial "
                f"({backoff_initial!r})"
            )
        self.grace = _positive("grace", grace, allow_zero=True)
        self._on_error = on_error
        if jitter is None:
            jitter = random.Random()  # noqa: S311 (spreads retries, not a secret)
        self._random: Callable[[], float] = (
            jitter.random if isinstance(jitter, random.Random) else jitter
        )
        self._equal = equal
        self.wake_on_change = bool(wake_on_change)
        # The last answer's index moved on: the next request may go at once.
        self._moved = False

        self._running = False
        self._has_value = False
        self._value: T | None = None
        self._index = 0
        self._failures = 0
        self._last_error: Failure | None = None
        self._last_start: float | None = None
        self._scheduled: IDelayedCall | None = None
        self._in_flight: Deferred[Indexed[T]] | None = None
        self._waiters: Waiters[T] = Waiters()

    # -- public state -------------------------------------------------------

    @property
    def value(self) -> T | None:
        """The last value delivered, or ``None`` before the first."""
        return self._value

    @property
    def index(self) -> int:
        """The index the next request will send (0: answer at once)."""
        return self._index

    @property
    def running(self) -> bool:
        return self._running

    @property
    def healthy(self) -> bool:
        """``True`` once a fetch succeeded and no fetch has failed since."""
        return self._has_value and self._failures == 0

    @property
    def failures(self) -> int:
        """Consecutive failed fetches since the last success."""
        return self._failures

    @property
    def last_error(self) -> Failure | None:
        """The failure of the latest fetch, ``None`` if it succeeded."""
        return self._last_error

    @property
    def timeout(self) -> float:
        """Seconds after which a fetch is cancelled."""
        return self.wait + self.wait / _JITTER_FRACTION + self.grace

    # -- control ------------------------------------------------------------

    def start(self) -> None:
        """
        Start watching: the first request goes out now (or ``min_interval``
        after the previous one, when restarted quickly), with ``index=0``.
        Calling it on a running watch does nothing; a stopped watch starts
        again from index 0 and keeps its last value.
        """
        if self._running:
            return
        self._running = True
        self._index = 0
        self._failures = 0
        self._moved = False
        self._log.debug("watch {watch} starting", watch=self.name)
        if (
            self._last_start is None
            or self._clock.seconds() >= self._last_start + self.min_interval
        ):
            self._request()
        else:
            # Stopped and started again quickly: min_interval still holds.
            self._schedule(0.0)

    def stop(self) -> None:
        """
        Stop watching: cancel the request in flight and any scheduled one,
        and fail pending :meth:`when_first` Deferreds with
        :class:`WatchStoppedError`. No callback runs after this returns. Calling it
        again does nothing.
        """
        if not self._running:
            return
        self._running = False
        if self._scheduled is not None:
            scheduled, self._scheduled = self._scheduled, None
            scheduled.cancel()
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            # Our own callbacks see that it is no longer in flight and swallow
            # the CancelledError; its timeout goes with it.
            in_flight.cancel()
        self._waiters.fail(WatchStoppedError(self.name))
        self._log.debug("watch {watch} stopped", watch=self.name)

    def when_first(self) -> Deferred[T]:
        """
        A Deferred that fires with the first value (at once if there is one).
        Cancelling it only drops this waiter; stopping the watch fails it with
        :class:`WatchStoppedError`.
        """
        if self._has_value:
            return succeed(cast(T, self._value))
        return self._waiters.wait()

    # -- the loop -----------------------------------------------------------

    def _continue(self, delay: float) -> None:
        # on_change or on_error may have stopped (or restarted) the watch.
        if self._running and self._scheduled is None and self._in_flight is None:
            self._schedule(delay)

    def _schedule(self, delay: float) -> None:
        now = self._clock.seconds()
        at = now + delay
        moved, self._moved = self._moved, False
        if self._last_start is not None and not (moved and self.wake_on_change):
            at = max(at, self._last_start + self.min_interval)
        self._scheduled = self._clock.callLater(max(0.0, at - now), self._request)

    def _request(self) -> None:
        self._scheduled = None
        index = self._index
        self._last_start = self._clock.seconds()
        self._log.debug(
            "watch {watch} request index={index} wait={wait}",
            watch=self.name,
            index=index,
            wait=self.wait,
        )
        # maybeDeferred turns a fetch function that raises into a failure.
        # Past the timeout it is cancelled, and whatever failure that gives
        # is the timeout; a fetch that ignores the cancellation (a Deferred
        # chained on one that never fires) is abandoned so the bound holds
        # anyway.
        d: Deferred[Indexed[T]] = bounded(
            maybeDeferred(self._fetch, index, self.wait),
            self.timeout,
            self._clock,
            lambda: WatchTimeoutError(self.name, index, self.timeout),
            any_failure=True,
            abandon=True,
        )
        self._in_flight = d
        d.addCallbacks(
            self._answered,
            self._failed,
            callbackArgs=(d, index),
            errbackArgs=(d, index),
        )

    def _settle(self, d: Deferred[Indexed[T]]) -> bool:
        """Clear in-flight state; ``False`` if the answer is stale (stopped)."""
        if d is not self._in_flight or not self._running:
            return False
        self._in_flight = None
        return True

    def _answered(self, result: object, d: Deferred[Indexed[T]], sent: int) -> None:
        if not self._settle(d):
            return
        if not isinstance(result, Indexed):
            self._error(
                _failure(
                    TypeError(
                        f"watch {self.name!r}: the fetch function returned "
                        f"{type(result).__name__}, not an Indexed record"
                    )
                ),
                sent,
            )
            return
        answer: Indexed[T] = result
        self._failures = 0
        self._last_error = None
        delay = 0.0
        received = answer.index
        if received is None:
            # Nothing to block on: ask again (index 0) after poll_interval.
            self._index = 0
            delay = self.poll_interval
        else:
            # Consul never sends an index below 1 on purpose; sending 0 back
            # would ask for an immediate answer and spin.
            received = max(received, 1)
            if received < self._index:
                self._log.info(
                    "watch {watch}: the index went backwards from {held} to "
                    "{received}; starting again from 0",
                    watch=self.name,
                    held=self._index,
                    received=received,
                )
                self._index = 0
            else:
                self._moved = received > sent
                self._index = received
        self._deliver(answer.value, received)
        self._continue(delay)

    def _failed(self, failure: Failure, d: Deferred[Indexed[T]], sent: int) -> None:
        if not self._settle(d):
            return
        self._error(failure, sent)

    def _error(self, failure: Failure, sent: int) -> None:
        self._failures += 1
        self._last_error = failure
        # The retry asks for an immediate answer: blocking on the old index
        # would hide for up to ``wait`` that the agent is back (and an agent
        # that restarted may hold lower indexes than ours).
        self._index = 0
        delay = self._backoff()
        if isinstance(failure.value, (ConsulError, WatchTimeoutError)):
            # Expected trouble (the agent down, slow, refusing us): its
            # message says it all, and a traceback per retry is noise.
            self._log.warn(
                "watch {watch}: request with index={index} failed "
                "({failures} in a row); retrying in {delay:.2f}s: {error}",
                watch=self.name,
                index=sent,
                failures=self._failures,
                delay=delay,
                error=failure.getErrorMessage(),
                # not log_failure: text observers would print its traceback
                error_type=type(failure.value).__name__,
            )
        else:
            self._log.failure(
                "watch {watch}: request with index={index} failed "
                "({failures} in a row); retrying in {delay:.2f}s",
                failure,
                LogLevel.warn,
                watch=self.name,
                index=sent,
                failures=self._failures,
                delay=delay,
            )
        if self._on_error is not None:
            try:
                self._on_error(failure)
            except Exception:
                self._log.failure(
                    "watch {watch}: on_error raised; ignoring it",
                    level=LogLevel.error,
                    watch=self.name,
                )
        self._continue(delay)

    def _backoff(self) -> float:
        return backoff_delay(
            self._failures, self.backoff_initial, self.backoff_max, self._random
        )

    def _deliver(self, value: T, index: int | None) -> None:
        if self._has_value and self._equal(cast(T, self._value), value):
            return
        self._has_value = True
        self._value = value
        self._log.debug(
            "watch {watch}: new value at index {index}", watch=self.name, index=index
        )
        try:
            outcome = self._on_change(value)
        except Exception:
            self._log.failure(
                "watch {watch}: on_change raised; the watch goes on",
                level=LogLevel.error,
                watch=self.name,
            )
        else:
            if isinstance(outcome, Deferred):
                outcome.addErrback(
                    lambda f: self._log.failure(
                        "watch {watch}: on_change failed; the watch goes on",
                        f,
                        LogLevel.error,
                        watch=self.name,
                    )
                )
        self._waiters.fire(value)
