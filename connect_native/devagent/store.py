"""
The machinery the development agent's tables share: Consul's error answers,
the raft-like index, change notification and blocking waits, the agent
cache's keys, and the agent's identity (:class:`Settings`).

Everything is synchronous and driven by an injected clock; randomness comes
only from the injected ``random.Random``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

CONSUL_VERSION = "1.8.7"
NANOSECOND = 1e-9
WILDCARD = "*"
DEFAULT_NAMESPACE = "default"
# Service metadata limits (structs.ValidateServiceMetadata).
META_MAX_PAIRS = 64
META_KEY_MAX = 128
META_VALUE_MAX = 512


class ConsulError(Exception):
    """
    An answer real Consul gives as an error: ``status`` and the exact
    plain-text body.  ``allow`` is the ``Allow`` header of a 405; ``headers``
    are other headers the real agent sends with this error.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        allow: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.allow = allow
        self.headers = tuple(headers)


def parse_version(text: object) -> tuple[int, int, int] | None:
    if not isinstance(text, str):
        return None
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        return None
    return (int(match[1]), int(match[2]), int(match[3] or 0))


def permission_denied(cause: str = "") -> ConsulError:
    """
    ``acl.ErrPermissionDenied`` (403 ``Permission denied``), or a
    ``PermissionDeniedError`` with its cause.
    """
    return ConsulError(
        403, f"Permission denied: {cause}" if cause else "Permission denied"
    )


def bad_request(reason: str) -> ConsulError:
    # agent.BadRequestError: the HTTP layer prefixes "Bad request: ".
    return ConsulError(400, f"Bad request: {reason}")


def multierror(messages: Sequence[str]) -> str:
    """
    hashicorp/go-multierror's text, which Consul sends for validation errors.
    """
    head = (
        "1 error occurred:"
        if len(messages) == 1
        else f"{len(messages)} errors occurred:"
    )
    return head + "".join(f"\n\t* {m}" for m in messages) + "\n\n"


def random_uuid(rng: random.Random) -> str:
    """
    A UUID as Consul makes them (``go-uuid``): 16 random bytes, no version
    bits.
    """
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def stagger(rng: random.Random, interval: float) -> float:
    """
    ``lib.RandomStagger``: uniform in [0, interval).
    """
    if interval <= 0:
        return 0.0
    return rng.random() * interval


@frozen
class Settings:
    """
    What the agent is, as every table sees it.
    """

    datacenter: str
    node_name: str
    node_id: str
    node_address: str
    version: str
    version_info: tuple[int, int, int]
    # The 1.9+ layer: exact intentions, service-intentions config entries
    # with L7 permissions, namespaces refused on intentions.
    newer_api: bool
    acl_default_policy: str | None


class Store:
    """
    The machinery the tables share: the clock and the randomness, the
    raft-like index every write moves, change notification for blocking
    waits, and the agent cache's keys.
    """

    def __init__(self, clock: IReactorTime, rng: random.Random) -> None:
        self.clock = clock
        self.rng = rng
        # The last raft index applied.
        self.index = 0
        self._watchers: list[Callable[[], None]] = []
        self._cached_keys: set[tuple[Any, ...]] = set()

    def now(self) -> float:
        return self.clock.seconds()

    def bump(self, step: int = 1) -> int:
        """
        Apply a write: the index moves on by ``step`` (a write that is two
        raft entries in Consul moves it by two).
        """
        self.index += step
        return self.index

    def changed(self) -> None:
        """
        Wake the blocking waits: the state changed.
        """
        for watcher in list(self._watchers):
            watcher()

    def wait_until(
        self, ready: Callable[[], bool], timeout: float | None
    ) -> Deferred[bool]:
        """
        Fire with ``True`` as soon as ``ready()`` is true after a change of
        state, or with ``False`` after ``timeout`` seconds (never, when
        ``None``).  Cancelling it forgets the wait.
        """
        timer: IDelayedCall | None = None

        def stop() -> None:
            if check in self._watchers:
                self._watchers.remove(check)
            if timer is not None and timer.active():
                timer.cancel()

        result: Deferred[bool] = Deferred(lambda d: stop())

        def check() -> None:
            if not result.called and ready():
                stop()
                result.callback(True)

        def expire() -> None:
            if not result.called:
                stop()
                result.callback(False)

        self._watchers.append(check)
        if timeout is not None:
            timer = self.clock.callLater(max(timeout, 0.0), expire)
        return result

    def cache_lookup(self, key: tuple[Any, ...]) -> bool:
        """
        Whether a background-refreshed agent cache entry (``?cached`` reads,
        intention match) existed before, creating it.
        """
        hit = key in self._cached_keys
        self._cached_keys.add(key)
        return hit
