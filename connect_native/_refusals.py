"""
Refusal logging that a flood cannot turn into a disk-filler.

Every refusal is logged one by one up to a burst per reason and interval;
past it, refusals of that reason are counted (with the addresses they came
from) and logged as one summary line when the interval ends: ``Connect web:
1,663 handshakes timed out from 12 addresses in the last 10s (past 20 a
reason, refusals are counted, not logged one by one)``.
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.logger import Logger

from connect_native import _logging

__all__ = ["RefusalLog", "address_text", "host_of", "peer_address"]

log = Logger(observer=_logging.observer)

#: Refusals of one reason logged one by one in an interval.
BURST = 20
#: Seconds between summaries.
INTERVAL = 10.0
# Addresses remembered per reason and interval (a summary says "at least").
_ADDRESSES_KEPT = 4096


def address_text(address: object) -> str:
    """How a log line names a peer's address: ``IPv4Address(...)`` or ``?``."""
    return "?" if address is None else str(address)


def peer_address(address: object) -> str:
    """
    A peer's address as structured logs give it: ``host:port`` (``[host]:port``
    for IPv6), else as :func:`address_text` does.
    """
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return address_text(address)


def host_of(address: object) -> str:
    """The host part of an IP address (the source a cap counts), else all of it."""
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else address_text(address)


class RefusalLog:
    """
    Decides, for each refusal about to be logged, whether to log it or only
    count it, and logs what was counted once per ``interval``.

    :param clock: times the intervals.
    :param label: what the summary lines begin with (``Connect web``).
    :param burst: refusals of one reason logged one by one per interval.
    :param interval: seconds per interval.
    """

    def __init__(
        self,
        clock: IReactorTime,
        label: str,
        burst: int = BURST,
        interval: float = INTERVAL,
    ) -> None:
        self._clock = clock
        self._label = label
        self._burst = burst
        self._interval = interval
        self._window_start = clock.seconds()
        self._logged: dict[str, int] = {}
        self._counted: dict[str, tuple[int, set[str]]] = {}
        self._timer: IDelayedCall | None = None

    def allow(self, reason: str, address: IAddress | object | None) -> bool:
        """
        Whether to log this refusal now.  ``False``: it is counted for the
        interval's summary instead.

        :param reason: what kind of refusal, as the summary says it
            ("handshakes timed out", "certificates refused", ...).
        """
        now = self._clock.seconds()
        if now - self._window_start >= self._interval:
            self.flush()
            self._window_start = now
        logged = self._logged.get(reason, 0)
        if logged < self._burst:
            self._logged[reason] = logged + 1
            return True
        count, hosts = self._counted.get(reason, (0, set()))
        if len(hosts) < _ADDRESSES_KEPT:
            hosts.add(host_of(address))
        self._counted[reason] = (count + 1, hosts)
        if self._timer is None:
            delay = max(0.0, self._window_start + self._interval - now)
            self._timer = self._clock.callLater(delay, self._interval_over)
        return False

    def _interval_over(self) -> None:
        self._timer = None
        self.flush()
        self._window_start = self._clock.seconds()

    def flush(self) -> None:
        """
        Log the summary of what was counted, and start counting afresh (when
        the interval ends, and when the listener stops).
        """
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        counted, self._counted = self._counted, {}
        self._logged = {}
        elapsed = round(self._clock.seconds() - self._window_start, 1)
        for reason, (count, hosts) in counted.items():
            many = "at least " if len(hosts) >= _ADDRESSES_KEPT else ""
            log.warn(
                "{label}: {count:,} {reason} from {many}{addresses:,} "
                "{addresses_word} in the last {interval:g}s (past {burst} a "
                "reason, refusals are counted, not logged one by one)",
                label=self._label,
                count=count,
                reason=reason,
                many=many,
                addresses=len(hosts),
                addresses_word="address" if len(hosts) == 1 else "addresses",
                interval=elapsed,
                burst=self._burst,
                allowed=False,
                decision="denied",
                summary=True,
            )
