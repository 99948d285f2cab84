"""
Resolving from the Consul agent's HTTP API.

* :class:`ConsulResolver`: ``/v1/health/connect/<service>?passing=1``, kept
  fresh by one blocking watch per (agent client, query) in the process.
* :class:`PreparedQueryResolver`: ``/v1/query/<name>/execute?connect=true``
  (prepared queries cannot block, so answers are cached briefly).
"""

from __future__ import annotations

import datetime
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from connect_native import _logging
from connect_native._checks import positive_seconds, seconds_or_zero
from connect_native._deferreds import Waiters
from connect_native._lease import Lease, Leases
from connect_native.consul.blocking import Watch
from connect_native.consul.records import (
    AgentSelf,
    HealthEntry,
    Indexed,
    PreparedQueryResult,
)
from connect_native.errors import (
    ResolveError,
    StaleAnswer,
)
from connect_native.identity import InvalidIdentity
from connect_native.resolve._base import (
    ExpectedIdentity,
    Instance,
    IResolver,
    _default_reactor,
    _nonempty_name,
    _optional_name,
)

__all__ = [
    "ConsulResolver",
    "HealthClient",
    "PreparedQueryClient",
    "PreparedQueryResolver",
]

log = Logger(observer=_logging.observer)

_failure: Callable[[BaseException], Failure] = Failure


# --- from health entries --------------------------------------------------------


def _instances_from_entries(
    entries: Sequence[HealthEntry],
    *,
    datacenter: str,
    namespace: str,
    partition: str | None,
    what: str,
) -> tuple[Instance, ...]:
    """
    Health entries as instances: the service's address or else the node's;
    a proxy's expected identity is its destination service.
    """
    instances = []
    for entry in entries:
        if entry.port <= 0 or entry.port >= 65536 or not entry.address:
            log.warn(
                "{what}: skipping instance {id} on node {node}: it has no "
                "usable address and port ({address!r}, {port})",
                what=what,
                id=entry.service.id,
                node=entry.node.name,
                address=entry.address,
                port=entry.port,
            )
            continue
        try:
            identity = ExpectedIdentity(
                service=entry.connect_service,
                datacenter=entry.node.datacenter or datacenter,
                namespace=namespace,
                partition=partition,
            )
            instances.append(
                Instance(
                    address=entry.address,
                    port=entry.port,
                    identity=identity,
                    node=entry.node.name,
                    instance_id=entry.service.id,
                )
            )
        except (ValueError, InvalidIdentity) as e:
            log.warn(
                "{what}: skipping instance {id} on node {node}: {error}",
                what=what,
                id=entry.service.id,
                node=entry.node.name,
                error=str(e),
            )
    return tuple(instances)


def _utc(seconds: float) -> str:
    """Clock seconds as a UTC time (a real reactor's are Unix time)."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


# --- Consul health -------------------------------------------------------------


class HealthClient(Protocol):
    """
    What :class:`ConsulResolver` needs of
    :class:`~connect_native.consul.client.ConsulClient`.
    """

    datacenter: str | None
    namespace: str | None
    partition: str | None

    def health_connect(
        self,
        service: str,
        *,
        passing: bool = True,
        index: int | None = None,
        wait: float | None = None,
        datacenter: str | None = None,
        namespace: str | None = None,
        partition: str | None = None,
        filter: str | None = None,
        near: str | None = None,
    ) -> Deferred[Indexed[tuple[HealthEntry, ...]]]: ...

    def agent_self(self) -> Deferred[AgentSelf]: ...


@frozen
class _HealthQuery:
    service: str
    datacenter: str | None
    namespace: str | None
    partition: str | None
    filter: str | None
    near: str | None

    def __str__(self) -> str:
        text = f"/v1/health/connect/{self.service}?passing=1"
        for name in ("datacenter", "namespace", "partition", "filter", "near"):
            value = getattr(self, name)
            if value is not None:
                text += f"&{'dc' if name == 'datacenter' else name}={value}"
        return text


class _SharedHealth:
    """
    One blocking watch on a health query, shared by every
    :class:`ConsulResolver` of the same client and query; it runs while at
    least one of them holds a lease.
    """

    def __init__(
        self,
        clock: IReactorTime,
        client: HealthClient,
        query: _HealthQuery,
        watch_settings: dict[str, Any],
    ) -> None:
        self.query = query
        self._client = client
        self._clock = clock
        self.entries: tuple[HealthEntry, ...] | None = None
        self.error: Failure | None = None
        # When the agent last answered, and when its reads began to fail
        # after that (None while they succeed or are held by the agent).
        self.last_success: float | None = None
        self.failing_since: float | None = None
        self.stale_reported = False
        self._waiters: Waiters[tuple[HealthEntry, ...]] = Waiters()
        self.watch: Watch[tuple[HealthEntry, ...]] = Watch(
            clock,
            self._fetch,
            self._changed,
            name=f"health/connect {query.service}",
            on_error=self._failed,
            **watch_settings,
        )

    def _fetch(
        self, index: int, wait: float
    ) -> Deferred[Indexed[tuple[HealthEntry, ...]]]:
        q = self.query
        return self._client.health_connect(
            q.service,
            passing=True,
            index=index,
            wait=wait,
            datacenter=q.datacenter,
            namespace=q.namespace,
            partition=q.partition,
            filter=q.filter,
            near=q.near,
        ).addCallback(self._answered)

    def _answered(
        self, answer: Indexed[tuple[HealthEntry, ...]]
    ) -> Indexed[tuple[HealthEntry, ...]]:
        # Recorded here rather than in on_change: an unchanged answer (a
        # blocking read that timed out) also proves the last one current.
        self.last_success = self._clock.seconds()
        self.failing_since = None
        if self.stale_reported:
            self.stale_reported = False
            log.info(
                "{query}: the agent answers again; resolving from fresh answers",
                query=str(self.query),
            )
        return answer

    def _changed(self, entries: tuple[HealthEntry, ...]) -> None:
        self.entries = entries
        self.error = None
        self._waiters.fire(entries)

    def _failed(self, failure: Failure) -> None:
        self.error = failure
        if self.failing_since is None:
            self.failing_since = self._clock.seconds()
        if self.entries is None:
            # Before the first answer, a waiter learns why at once rather
            # than waiting out its deadline while the watch backs off.
            self._waiters.fail(failure)

    def start(self) -> None:
        self.watch.start()

    def stop(self) -> None:
        self.watch.stop()
        self.entries = None
        self.error = None
        self.last_success = self.failing_since = None
        self.stale_reported = False
        self._waiters.cancel()

    def next_entries(self) -> Deferred[tuple[HealthEntry, ...]]:
        """
        The first answer, or the first error, whichever comes first.
        """
        return self._waiters.wait()


def _health_leases() -> Leases[_HealthQuery, _SharedHealth]:
    # The first lease on a query starts its watch, the last stops it.
    return Leases(
        lambda query, shared: shared.start(), lambda query, shared: shared.stop()
    )


# Watches shared per (client, query); a client going away takes its watches
# with it.
_shared_health: weakref.WeakKeyDictionary[Any, Leases[_HealthQuery, _SharedHealth]] = (
    weakref.WeakKeyDictionary()
)


def _shared_watch(
    clock: IReactorTime,
    client: HealthClient,
    query: _HealthQuery,
    watch_settings: dict[str, Any],
) -> Lease[_SharedHealth]:
    try:
        per_client = _shared_health.get(client)
        if per_client is None:
            per_client = _shared_health[client] = _health_leases()
    except TypeError:
        # A client that cannot be weakly referenced gets its own watch.
        per_client = _health_leases()
    return per_client.acquire(
        query, lambda: _SharedHealth(clock, client, query, watch_settings)
    )


@implementer(IResolver)
class ConsulResolver:
    """
    The healthy Connect-capable instances of a service, from the Consul
    agent: ``/v1/health/connect/<service>?passing=1`` (native instances and
    sidecar proxies), kept fresh by a blocking watch.

    The watch starts with the first :meth:`resolve` and is shared with every
    other ``ConsulResolver`` of the same client and query in the process; it
    stops when the last of them is closed (:meth:`close`) or garbage
    collected.  When the agent stops answering, the last answer keeps being
    used for ``max_staleness`` seconds after the first failed read; after
    that :meth:`resolve` fails with :class:`StaleAnswer` until the agent
    answers again.  Before the first answer, :meth:`resolve` fails as soon as
    the agent's first request fails.

    For each entry: the address is ``Service.Address``, else
    ``Node.Address``; the port ``Service.Port``; the expected identity is the
    service itself for a native instance and the proxy's destination service
    for a sidecar proxy, in the instance's datacenter (``Node.Datacenter``,
    else the one queried, else the agent's) and the namespace and partition
    queried (else the client's, else the defaults).

    :param client: a :class:`~connect_native.consul.client.ConsulClient`.
    :param service: the service to reach.
    :param datacenter: query another datacenter than the agent's.
    :param namespace: Consul Enterprise namespace.
    :param partition: Consul Enterprise admin partition.
    :param filter: a Consul filter expression, e.g. ``'"v2" in Service.Tags'``.
    :param near: sort by round-trip time from this node (``_agent``: ours).
    :param reactor: schedules the watch (the global reactor by default).
    :param wait: seconds each blocking request may be held by the agent.
    :param min_interval: least seconds between two reads of the watch.
    :param max_staleness: after the agent stops answering, keep resolving
        from the last answer for this many seconds after the first failed
        read, then fail (0: fail as soon as a read fails).  Counted from
        the first failure rather than from the last answer because a
        blocking read held by the agent (up to ``wait``) keeps the answer
        current: the agent would have answered any change.  The default is
        :class:`~connect_native.authorize.intentions.IntentionAuthorizer`'s,
        so that through an agent outage a client keeps dialing for as long
        as a server keeps deciding (long enough for an agent restart), and
        no longer: past it, instances deregistered or failing meanwhile
        would still be dialed (the TLS identity check still refuses another
        service answering there).
    """

    def __init__(
        self,
        client: HealthClient,
        service: str,
        datacenter: str | None = None,
        namespace: str | None = None,
        partition: str | None = None,
        filter: str | None = None,
        near: str | None = None,
        *,
        reactor: IReactorTime | None = None,
        wait: float = 300.0,
        min_interval: float = 1.0,
        max_staleness: float = 300.0,
    ) -> None:
        self.client = client
        self.query = _HealthQuery(
            service=_nonempty_name("service", service),
            datacenter=_optional_name("datacenter", datacenter),
            namespace=_optional_name("namespace", namespace),
            partition=_optional_name("partition", partition),
            filter=filter or None,
            near=near or None,
        )
        self._clock: IReactorTime = (
            reactor if reactor is not None else _default_reactor()
        )
        self._watch_settings = {
            "wait": positive_seconds("wait", wait),
            "min_interval": positive_seconds("min_interval", min_interval),
        }
        self.max_staleness = seconds_or_zero(
            "ConsulResolver max_staleness", max_staleness
        )
        self._shared: _SharedHealth | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._agent_datacenter: str | None = None
        where = f" in datacenter {datacenter!r}" if datacenter else ""
        self.description = f"Consul service {service!r}{where} (healthy instances)"

    @property
    def service(self) -> str:
        return self.query.service

    def __repr__(self) -> str:
        return f"ConsulResolver({self.query})"

    def _lease(self) -> _SharedHealth:
        if self._shared is None:
            lease = _shared_watch(
                self._clock, self.client, self.query, self._watch_settings
            )
            self._shared = lease.value
            self._finalizer = weakref.finalize(self, lease.release)
        return self._shared

    def close(self) -> None:
        """
        Let go of the shared watch (it stops when no resolver holds it).  A
        later :meth:`resolve` takes it again.
        """
        finalizer, self._finalizer = self._finalizer, None
        self._shared = None
        if finalizer is not None:
            finalizer()

    def resolve(self) -> Deferred[Sequence[Instance]]:
        """
        The healthy instances (at once when the watch has an answer).
        """
        shared = self._lease()
        if shared.entries is not None:
            stale = self._stale(shared)
            if stale is not None:
                refused: Deferred[Sequence[Instance]] = Deferred()
                refused.errback(_failure(stale))
                return refused
            entries: Deferred[tuple[HealthEntry, ...]] = succeed(shared.entries)
        elif shared.error is not None:
            entries = Deferred()
            entries.errback(shared.error)
        else:
            entries = shared.next_entries()
        entries.addErrback(self._explain)
        return entries.addCallback(self._instances)

    def _stale(self, shared: _SharedHealth) -> StaleAnswer | None:
        """
        Why the last answer may no longer be used, or ``None`` while it may.
        """
        since = shared.failing_since
        if since is None:
            return None
        failing_for = self._clock.seconds() - since
        if failing_for <= self.max_staleness:
            return None
        last = shared.last_success
        read_at = "never" if last is None else _utc(last)
        why = shared.error.getErrorMessage() if shared.error is not None else "?"
        message = (
            f"cannot find the instances of {self.description}: the last answer "
            f"from the agent is stale: {self.query} has failed since "
            f"{_utc(since)} ({failing_for:g}s, longer than max_staleness "
            f"{self.max_staleness:g}s; last answered at {read_at}): {why}. "
            "Resolving works again when the agent answers; check that it is "
            "running and reachable"
        )
        if not shared.stale_reported:
            shared.stale_reported = True
            log.warn(
                "{query}: the agent has not answered for longer than "
                "max_staleness ({max_staleness}s, failing since {since}); "
                "resolving fails until it answers again",
                query=str(self.query),
                max_staleness=f"{self.max_staleness:g}",
                since=_utc(since),
            )
        return StaleAnswer(message, since, last)

    def _explain(self, failure: Failure) -> Failure:
        if isinstance(failure.value, CancelledError):
            return failure
        return _failure(
            ResolveError(
                f"cannot find the instances of {self.description}: "
                f"{self.query} failed: {failure.getErrorMessage()}"
            )
        )

    def _instances(
        self, entries: tuple[HealthEntry, ...]
    ) -> Deferred[Sequence[Instance]] | Sequence[Instance]:
        datacenter = self.query.datacenter or self.client.datacenter
        if datacenter is None and any(not e.node.datacenter for e in entries):
            # Consul always sends Node.Datacenter; without it, the agent's.
            return self._agent_dc().addCallback(lambda dc: self._convert(entries, dc))
        return self._convert(entries, datacenter or "")

    def _agent_dc(self) -> Deferred[str]:
        if self._agent_datacenter is not None:
            return succeed(self._agent_datacenter)

        def remember(agent: AgentSelf) -> str:
            self._agent_datacenter = agent.datacenter
            return agent.datacenter

        def explain(failure: Failure) -> Failure:
            if isinstance(failure.value, CancelledError):
                return failure
            return _failure(
                ResolveError(
                    f"cannot find the instances of {self.description}: the "
                    "health entries name no datacenter, and reading the "
                    "agent's own (/v1/agent/self) failed: "
                    f"{failure.getErrorMessage()}"
                )
            )

        return self.client.agent_self().addCallbacks(remember, explain)

    def _convert(
        self, entries: tuple[HealthEntry, ...], datacenter: str
    ) -> Sequence[Instance]:
        return _instances_from_entries(
            entries,
            datacenter=datacenter,
            namespace=self.query.namespace or self.client.namespace or "default",
            partition=self.query.partition or self.client.partition,
            what=repr(self),
        )


# --- prepared queries ------------------------------------------------------------


class PreparedQueryClient(Protocol):
    """
    What :class:`PreparedQueryResolver` needs of
    :class:`~connect_native.consul.client.ConsulClient`.
    """

    namespace: str | None
    partition: str | None

    def execute_prepared_query(
        self,
        name: str,
        *,
        connect: bool = True,
        datacenter: str | None = None,
        near: str | None = None,
    ) -> Deferred[Indexed[PreparedQueryResult]]: ...


@implementer(IResolver)
class PreparedQueryResolver:
    """
    The Connect-capable instances a prepared query returns:
    ``/v1/query/<name>/execute?connect=true``.

    Prepared queries cannot block, so an answer is reused for
    ``cache_seconds`` and concurrent :meth:`resolve` calls share one
    request.  The query may fail over to another datacenter: the expected
    identity is in the datacenter the answer names.

    :param client: a :class:`~connect_native.consul.client.ConsulClient`.
    :param name: the query's name or ID.
    :param datacenter: execute it in another datacenter than the agent's.
    :param reactor: the clock the cache is kept by.
    :param cache_seconds: how long an answer is reused.
    """

    def __init__(
        self,
        client: PreparedQueryClient,
        name: str,
        datacenter: str | None = None,
        *,
        reactor: IReactorTime | None = None,
        cache_seconds: float = 2.0,
    ) -> None:
        self.client = client
        self.name = _nonempty_name("name", name)
        self.datacenter = _optional_name("datacenter", datacenter)
        self._clock: IReactorTime = (
            reactor if reactor is not None else _default_reactor()
        )
        self.cache_seconds = positive_seconds("cache_seconds", cache_seconds)
        self._cached: tuple[float, tuple[Instance, ...]] | None = None
        self._in_flight: Waiters[Sequence[Instance]] | None = None
        where = f" in datacenter {datacenter!r}" if datacenter else ""
        self.description = f"Consul prepared query {name!r}{where}"

    def __repr__(self) -> str:
        return f"PreparedQueryResolver({self.name!r}, datacenter={self.datacenter!r})"

    def resolve(self) -> Deferred[Sequence[Instance]]:
        now = self._clock.seconds()
        if self._cached is not None and now < self._cached[0] + self.cache_seconds:
            return succeed(self._cached[1])
        if self._in_flight is not None:
            return self._in_flight.wait()
        self._in_flight = Waiters()
        waiter = self._in_flight.wait()
        asked = self._clock.seconds()
        # A synchronous raise, or an answer that cannot be read, must fail
        # the waiters too: otherwise they and every later resolve() would
        # wait on a request that is over.
        request = maybeDeferred(
            self.client.execute_prepared_query,
            self.name,
            connect=True,
            datacenter=self.datacenter,
        )
        request.addCallback(lambda answer: self._answered(answer.value, asked))
        request.addErrback(self._failed)
        return waiter

    def _answered(self, result: PreparedQueryResult, asked: float) -> None:
        instances = _instances_from_entries(
            result.nodes,
            datacenter=result.datacenter or self.datacenter or "",
            namespace=self.client.namespace or "default",
            partition=self.client.partition,
            what=repr(self),
        )
        self._cached = (asked, instances)
        waiters, self._in_flight = self._in_flight or Waiters(), None
        waiters.fire(instances)

    def _failed(self, failure: Failure) -> None:
        waiters, self._in_flight = self._in_flight or Waiters(), None
        error = ResolveError(
            f"cannot find the instances of {self.description}: executing it "
            f"failed: {failure.getErrorMessage()}"
        )
        waiters.fail(error)
