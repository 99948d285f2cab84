"""
Authorization of a verified peer: the ``IAuthorizer`` seam and the authorizer
that asks the Consul agent.

An authorizer answers in two ways.  ``decide_now`` is called inside the TLS
verify callback, which cannot wait: it returns a `Decision` when one is
known at once, or ``None`` ("don't know yet").  ``authorize`` returns a
Deferred and runs in the server's authorization gate, after the handshake and
before the application sees the connection.  Every authorizer fails closed:
an error, a timeout or a doubt is a denial with a reason.

An authorizer that can tell when its decisions may have changed (the
intentions were written) also provides :class:`INotifiesChanges`; the
server then decides its open connections again, and closes those now
refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from connect_native import _logging
from connect_native._checks import positive_seconds, seconds_or_zero
from connect_native._deferreds import Waiters, bounded
from connect_native.consul.blocking import Watch
from connect_native.consul.records import AuthorizeResult, Indexed, Intention
from connect_native.identity import ServiceIdentity

log = Logger(observer=_logging.observer)

#: How many decisions an authorizer remembers at most.  Each certificate
#: renewal is a new serial, and so a new entry: without a bound a long
#: ``cache_ttl`` would let the memory grow for as long as peers renew.
MAX_REMEMBERED = 4096

_K = TypeVar("_K")
_V = TypeVar("_V")


def remember_bounded(
    memory: dict[_K, _V], key: _K, value: _V, limit: int = MAX_REMEMBERED
) -> None:
    """
    ``memory[key] = value``, as the newest entry, dropping the oldest ones
    past ``limit`` (a dict keeps insertion order).
    """
    memory.pop(key, None)
    memory[key] = value
    while len(memory) > limit:
        del memory[next(iter(memory))]


@frozen
class Peer:
    """
    A peer whose certificate chain and SPIFFE identity were verified in the
    TLS handshake.

    ``serial`` is the certificate's serial number as Consul's authorize API
    takes it: lowercase hex bytes separated by colons.
    """

    identity: ServiceIdentity
    serial: str

    @property
    def uri(self) -> str:
        return self.identity.uri


def colon_hex_serial(serial: int) -> str:
    """
    A certificate serial number in the colon-separated hex form that Consul
    uses (``0x1f2a`` -> ``1f:2a``).
    """
    raw = serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big")
    return ":".join(f"{b:02x}" for b in raw)


@frozen
class Decision:
    """
    The answer to "may this peer connect to this target?".

    ``reason`` says why, for the logs; ``source`` says who decided (for
    example ``agent``, ``agent-cache``, ``intentions``, ``error``).

    ``per_request`` marks a denial that only stands at the connection level:
    the matching intention carries L7 (HTTP) permissions, which Consul's
    authorize API and Envoy's network filter treat as a deny.  A server
    whose application decides every request itself (a ``twisted.web`` site
    serving :func:`connect_native.web.protect`, which provides
    :class:`IDecidesEachRequest`) may accept such a connection; every other
    listener refuses it, so forgetting ``protect()`` fails closed.
    """

    allowed: bool
    reason: str
    source: str
    per_request: bool = False

    @classmethod
    def deny(cls, reason: str, source: str = "error") -> Decision:
        return cls(allowed=False, reason=reason, source=source)


class IAuthorizer(Interface):
    """
    Decides whether a verified peer may reach a target service.
    """

    def decide_now(peer: Peer, target: str) -> Decision | None:
        """
        A decision that is known at once, or ``None``.  Called inside the TLS
        verify callback: must not block, must not raise.
        """

    def authorize(peer: Peer, target: str) -> Deferred[Decision]:
        """
        The decision, eventually.  The Deferred never fails: any error is a
        denial carrying the reason.  Cancelling it is allowed.
        """


class INotifiesChanges(Interface):
    """
    An authorizer (or another source of trust) that says when the decisions
    it gave may have changed: the intentions were written, the trusted
    roots moved.  The server subscribes while it listens and decides each
    open connection again on every call.
    """

    def subscribe(callback: Callable[[], object]) -> Callable[[], None]:
        """
        Call ``callback`` (with no arguments) after each change, once the
        new decisions are in place (a ``decide_now`` or ``authorize`` made
        from the callback already sees them).  An exception it raises is
        logged and ignored.

        :returns: a function that unsubscribes ``callback`` (calling it
            again does nothing).
        """


class ChangeListeners:
    """
    The subscribers of an :class:`INotifiesChanges` provider.

    :param first: called when the first subscriber comes (e.g. to start
        the watch that learns of changes).
    :param last: called when the last one goes.
    """

    def __init__(
        self,
        first: Callable[[], object] | None = None,
        last: Callable[[], object] | None = None,
    ) -> None:
        self._callbacks: list[Callable[[], object]] = []
        self._first = first
        self._last = last

    def __len__(self) -> int:
        return len(self._callbacks)

    def subscribe(self, callback: Callable[[], object]) -> Callable[[], None]:
        self._callbacks.append(callback)
        if len(self._callbacks) == 1 and self._first is not None:
            self._first()
        subscribed = [True]

        def unsubscribe() -> None:
            if not subscribed:
                return
            subscribed.clear()
            self._callbacks.remove(callback)
            if not self._callbacks and self._last is not None:
                self._last()

        return unsubscribe

    def notify(self) -> None:
        """Call every subscriber; one that raises is logged and skipped."""
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                log.failure("a subscriber to authorization changes failed")


#: How the reason of a ``per_request`` denial ends; a server that decides
#: each request lifts the denial and replaces this.
L7_AT_L4 = (
    "; its HTTP permissions can only be enforced per request: serve the "
    "resource wrapped with connect_native.web.protect() to accept this caller"
)


class IDecidesEachRequest(Interface):
    """
    A marker: the provider (a protocol factory, or the root resource of a
    ``twisted.web`` site) decides every HTTP request by the intentions'
    L7 permissions before the application sees it.  Only a listener whose
    factory or site root provides it accepts a connection that an L7
    intention decides (``Decision.per_request``).
    """


def decides_each_request(factory: object) -> bool:
    """
    Whether ``factory`` (a protocol factory) enforces L7 permissions per
    request: it provides :class:`IDecidesEachRequest`, or it is a site
    whose root resource does.
    """
    if IDecidesEachRequest.providedBy(factory):
        return True
    return IDecidesEachRequest.providedBy(getattr(factory, "resource", None))


class AuthorizeCall(Protocol):
    """
    What `AgentAuthorizer` needs of the Consul client.
    """

    def authorize(
        self, target: str, client_cert_uri: str, client_cert_serial: str
    ) -> Deferred[AuthorizeResult]: ...


class IntentionsListCall(Protocol):
    """
    What `AgentAuthorizer` needs of the Consul client to learn that the
    intentions changed (a blocking read of ``/v1/connect/intentions``).
    """

    def intentions_list(
        self, index: int | None = None, wait: float | None = None
    ) -> Deferred[Indexed[tuple[Intention, ...]]]: ...


@implementer(IAuthorizer, INotifiesChanges)
class AgentAuthorizer:
    """
    Asks the agent's ``POST /v1/agent/connect/authorize`` for every new
    connection.

    Identical calls in flight are coalesced into one request.  A decision may
    be remembered per (certificate serial, target) for ``cache_ttl`` seconds
    (default 1 s, at most what a user sets; 0 turns it off), so a burst of
    connections from one peer costs one round trip; at most
    :data:`MAX_REMEMBERED` decisions are kept, the oldest dropped first.
    Every request is bounded by ``timeout``.  Errors and timeouts deny.

    While anyone is subscribed (:class:`INotifiesChanges`; a
    :class:`~connect_native.server.ConnectServerEndpoint` is, while it
    listens) and the client can list intentions, a blocking read of
    ``/v1/connect/intentions`` (held ``wait`` seconds) learns of every
    intention write: the remembered decisions are dropped at once, rather
    than aged out, and the subscribers are told.  An answer asked before the
    change and received after it is not remembered.
    """

    def __init__(
        self,
        client: AuthorizeCall,
        clock: IReactorTime,
        *,
        timeout: float = 5.0,
        cache_ttl: float = 1.0,
        watch_intentions: bool = True,
        wait: float = 60.0,
    ) -> None:
        # NaN or infinity would make a timer that never fires: an unbounded
        # wait, or a decision remembered forever.
        timeout = positive_seconds("timeout", timeout)
        seconds_or_zero("cache_ttl", cache_ttl)
        self._client = client
        self._clock = clock
        self._timeout = timeout
        self._cache_ttl = float(cache_ttl)
        self.max_remembered = MAX_REMEMBERED
        self._remembered: dict[tuple[str, str, str], tuple[float, Decision]] = {}
        self._in_flight: dict[tuple[str, str, str], Waiters[Decision]] = {}
        #: Moves on with every intentions change seen.
        self.generation = 0
        self._seen_intentions = False
        self._intentions: Watch[tuple[Intention, ...]] | None = None
        lister = getattr(client, "intentions_list", None)
        if watch_intentions and callable(lister):
            listing: IntentionsListCall = client  # type: ignore[assignment]
            self._intentions = Watch(
                clock,
                lambda index, wait: (
                    listing.intentions_list()
                    if index == 0
                    else listing.intentions_list(index=index, wait=wait)
                ),
                self._intentions_changed,
                name="intentions (the authorize cache)",
                wait=positive_seconds("wait", wait),
                wake_on_change=True,
            )
        self._listeners = ChangeListeners(self._start_watch, self._stop_watch)

    @property
    def cache_ttl(self) -> float:
        """Seconds a decision is remembered per (certificate, target)."""
        return self._cache_ttl

    # -- changes ------------------------------------------------------------

    @property
    def watching(self) -> bool:
        """Whether the intentions watch runs (someone is subscribed)."""
        return self._intentions is not None and self._intentions.running

    def subscribe(self, callback: Callable[[], object]) -> Callable[[], None]:
        return self._listeners.subscribe(callback)

    def _start_watch(self) -> None:
        if self._intentions is not None:
            self._intentions.start()

    def _stop_watch(self) -> None:
        if self._intentions is not None:
            self._intentions.stop()

    def _intentions_changed(self, intentions: tuple[Intention, ...]) -> None:
        self.intentions_changed(first=not self._seen_intentions)
        self._seen_intentions = True

    def intentions_changed(self, *, first: bool = False) -> None:
        """
        Forget every remembered decision and tell the subscribers (unless
        ``first``: the watch's first answer is no change).
        """
        self.generation += 1
        self._remembered.clear()
        if not first:
            log.info(
                "authorize: the intentions changed; {count} subscriber(s) told",
                count=len(self._listeners),
            )
            self._listeners.notify()

    # -- deciding -------------------------------------------------------------

    def decide_now(self, peer: Peer, target: str) -> Decision | None:
        key = (peer.uri, peer.serial, target)
        remembered = self._remembered.get(key)
        if remembered is None:
            return None
        expires, decision = remembered
        if self._clock.seconds() >= expires:
            del self._remembered[key]
            return None
        return Decision(decision.allowed, decision.reason, "agent-cache")

    def authorize(self, peer: Peer, target: str) -> Deferred[Decision]:
        known = self.decide_now(peer, target)
        if known is not None:
            return succeed(known)
        key = (peer.uri, peer.serial, target)
        # Cancelling a waiter fires it with CancelledError; the shared request
        # keeps running for the others (and for the cache).
        waiters = self._in_flight.get(key)
        if waiters is not None:
            return waiters.wait()
        waiters = self._in_flight[key] = Waiters()
        waiter = waiters.wait()
        self._ask(key, peer, target)
        return waiter

    def _prune(self) -> None:
        if len(self._remembered) < 1024:
            return
        now = self._clock.seconds()
        for key, (expires, _) in list(self._remembered.items()):
            if expires <= now:
                del self._remembered[key]

    def _ask(self, key: tuple[str, str, str], peer: Peer, target: str) -> None:
        started = time.monotonic()
        generation = self.generation
        # Whatever a request that timed out fails with, it did not answer.
        request = bounded(
            self._client.authorize(target, peer.uri, peer.serial),
            self._timeout,
            self._clock,
            CancelledError,
            any_failure=True,
        )

        def decided(result: AuthorizeResult) -> Decision:
            if not isinstance(result.authorized, bool):
                return Decision.deny("the agent's answer had no boolean Authorized")
            return Decision(bool(result.authorized), str(result.reason), "agent")

        def failed(failure: Failure) -> Decision:
            if isinstance(failure.value, CancelledError):
                reason = f"the agent did not answer within {self._timeout:g}s"
            else:
                reason = (
                    f"the agent's authorize call failed: {failure.getErrorMessage()}"
                )
            return Decision.deny(reason)

        def finish(decision: Decision) -> None:
            if (
                decision.source == "agent"
                and self._cache_ttl > 0
                and generation == self.generation
            ):
                self._prune()
                remember_bounded(
                    self._remembered,
                    key,
                    (self._clock.seconds() + self._cache_ttl, decision),
                    self.max_remembered,
                )
            log.debug(
                "authorize {peer} -> {target}: {allowed} ({reason}) in {ms:.1f} ms",
                peer=peer.uri,
                target=target,
                allowed=decision.allowed,
                reason=decision.reason,
                ms=(time.monotonic() - started) * 1000,
            )
            self._in_flight.pop(key, Waiters()).fire(decision)

        # decided's own exceptions must reach failed too, or the waiters hang.
        decision = request.addCallback(decided)
        decision.addErrback(failed)
        decision.addCallback(finish).addErrback(
            lambda f: log.failure("authorize bookkeeping failed", f)  # never raised
        )


# --- AllowIdsAuthorizer ----------------------------------------------------------


class InvalidAllowedId(ValueError):  # noqa: N818 (a refusal of input)
    """An ``--allow-id`` pattern that cannot be used; the message says why."""


@frozen
class AllowedId:
    """
    One allowed SPIFFE ID, as ghostunnel's ``--allow-uri`` takes it:
    ``spiffe://<trust domain>/<path>``, where a path segment may be ``*``
    (any one segment, never part of one and never several).  The trust
    domain compares case-insensitively, the path exactly.
    """

    trust_domain: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> AllowedId:
        """:raises InvalidAllowedId: with a one-line reason."""
        from connect_native.identity import InvalidIdentity, normalize_trust_domain

        if not isinstance(text, str) or not text.startswith("spiffe://"):
            raise InvalidAllowedId(
                f"allowed ID {text!r} must be a SPIFFE ID: "
                "spiffe://<trust domain>/<path>"
            )
        if any(c in text for c in "?#") or any(c.isspace() for c in text):
            raise InvalidAllowedId(
                f"allowed ID {text!r} has a query, fragment or space; "
                "a SPIFFE ID has none"
            )
        authority, _, path = text[len("spiffe://") :].partition("/")
        try:
            trust_domain = normalize_trust_domain(authority)
        except InvalidIdentity as e:
            raise InvalidAllowedId(f"allowed ID {text!r}: {e}") from None
        segments = tuple(path.split("/"))
        if not path or any(not s for s in segments):
            raise InvalidAllowedId(
                f"allowed ID {text!r} needs a path without empty segments "
                "(spiffe://<trust domain>/ns/<ns>/dc/<dc>/svc/<service>)"
            )
        for segment in segments:
            if "*" in segment and segment != "*":
                raise InvalidAllowedId(
                    f"allowed ID {text!r}: '*' stands for one whole path "
                    f"segment, not part of one ({segment!r})"
                )
        return cls(trust_domain, segments)

    def matches(self, uri: str) -> bool:
        """Whether the peer's SPIFFE ID ``uri`` is allowed by this one."""
        if not uri.startswith("spiffe://"):
            return False
        authority, _, path = uri[len("spiffe://") :].partition("/")
        if authority.lower() != self.trust_domain:
            return False
        segments = path.split("/")
        if len(segments) != len(self.segments):
            return False
        return all(
            (want == "*" and got != "") or want == got
            for want, got in zip(self.segments, segments, strict=True)
        )

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/{'/'.join(self.segments)}"


@implementer(IAuthorizer, INotifiesChanges)
class AllowIdsAuthorizer:
    """
    Allows the peers whose SPIFFE ID matches one of a list, and no other:
    authorization without an agent (no intentions), as ghostunnel's
    ``--allow-uri``.  Decided at once, in the handshake.

    :param allowed: SPIFFE IDs (``*`` for a whole path segment), as strings
        or :class:`AllowedId`.

    :raises InvalidAllowedId: for a pattern that cannot be used, or none.
    """

    def __init__(self, allowed: Sequence[str | AllowedId]) -> None:
        if isinstance(allowed, str):
            raise InvalidAllowedId(
                "allowed must be a list of SPIFFE IDs, not one string"
            )
        patterns = tuple(
            a if isinstance(a, AllowedId) else AllowedId.parse(a) for a in allowed
        )
        if not patterns:
            raise InvalidAllowedId(
                "no allowed ID: give at least one SPIFFE ID (--allow-id URI)"
            )
        self.allowed = patterns
        self._listeners = ChangeListeners()

    def __repr__(self) -> str:
        return f"<AllowIdsAuthorizer {', '.join(map(str, self.allowed))}>"

    def replace(self, allowed: Sequence[str | AllowedId]) -> None:
        """
        Allow these IDs from now on (an ``--allow-ids-file`` re-read on
        SIGHUP), and tell the subscribers (the server decides each open
        connection again).  An empty list allows no one: fail closed.

        :raises InvalidAllowedId: for a pattern that cannot be used (the
            list before stays).
        """
        if isinstance(allowed, str):
            raise InvalidAllowedId(
                "allowed must be a list of SPIFFE IDs, not one string"
            )
        self.allowed = tuple(
            a if isinstance(a, AllowedId) else AllowedId.parse(a) for a in allowed
        )
        self._listeners.notify()

    def subscribe(self, callback: Callable[[], object]) -> Callable[[], None]:
        """:class:`INotifiesChanges`: called after each :meth:`replace`."""
        return self._listeners.subscribe(callback)

    def decide_now(self, peer: Peer, target: str) -> Decision:
        uri = peer.uri
        for pattern in self.allowed:
            if pattern.matches(uri):
                return Decision(True, f"allowed by --allow-id {pattern}", "allow-ids")
        if not self.allowed:
            return Decision(False, "no ID is allowed (the list is empty)", "allow-ids")
        return Decision(False, f"{uri} matches no allowed ID", "allow-ids")

    def authorize(self, peer: Peer, target: str) -> Deferred[Decision]:
        return succeed(self.decide_now(peer, target))
