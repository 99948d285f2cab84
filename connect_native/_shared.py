"""
What the endpoints of one Connect service share in a process, below them.

:class:`SharedService` is the state of a
:class:`~connect_native.service.ConnectService`: its agent client, its
certificates, its authorizer and who holds it.  The endpoints'
``for_service`` conveniences and the service layer above them take theirs
from :data:`shared_services`, one per (reactor, agent client, service,
certificate-manager registry), so that a ``connect:web`` server endpoint,
``ConnectServerEndpoint.for_service(..., "web")`` and ``http.client("web")``
share one.  It lives here, under :mod:`connect_native.server` and
:mod:`connect_native.client`, so that they can share it without importing
:mod:`connect_native.service`, which is built on them.

Below it, one :class:`~connect_native.certs.CertManager` per (agent,
service) per process, shared by every user of that service and
reference-counted (:class:`CertManagerRegistry`).

An endpoint acquires a lease when it starts listening (or connecting) and
releases it when it stops::

    lease = acquire_cert_manager(reactor, client, "web")
    d = lease.manager.when_ready()   # bound it with a timeout
    ...
    lease.release()                  # when the port stops listening

The first lease for a (client, service) pair creates the manager and starts
it; the last release stops it (stopping its watches and failing its pending
``when_ready()`` Deferreds); an acquire after that makes a fresh one.
Releasing a lease twice does nothing, so a port may release in every path
out without counting twice.

The agent is identified by the :class:`~connect_native.consul.client.ConsulClient`
object: endpoints that pass the same client share a manager.  Two clients
for the same agent make two managers, which is correct (they may carry
different tokens) but wasteful: share one client per process.

Public names are re-exported by :mod:`connect_native.service`; import them
from there.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from connect_native import _logging
from connect_native._lease import Lease, Leases
from connect_native.certs import (
    Bundle,
    CertificateAuthorityClient,
    CertManager,
    IBundleSource,
    ManagerState,
)
from connect_native.errors import (
    ServiceNotStarted,
)

if TYPE_CHECKING:
    from connect_native.authorize import IAuthorizer
    from connect_native.consul.client import ConsulClient
    from connect_native.metrics import ServiceMetrics
    from connect_native.sources import FilesIdentity

__all__ = [
    "CertManagerLease",
    "CertManagerRegistry",
    "ServiceNotStarted",
    "SharedService",
    "SharedServiceRegistry",
    "acquire_cert_manager",
    "cert_managers",
    "shared_services",
]

#: Makes a manager: ``factory(clock, client, service)``.
CertManagerFactory = Callable[
    [IReactorTime, CertificateAuthorityClient, str], CertManager
]


class CertManagerLease(Lease[CertManager]):
    """
    One user's hold on a shared :class:`~connect_native.certs.CertManager`.

    :ivar manager: the shared manager, started.
    """

    def __init__(
        self, registry: CertManagerRegistry, key: tuple[int, str], manager: CertManager
    ) -> None:
        super().__init__(manager, lambda: registry._release(key, manager))
        self.manager = manager

    def release(self) -> None:
        """
        Give the manager back; the last release stops it.  Calling it again
        does nothing.
        """
        super().release()

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<CertManagerLease {self.manager!r} {state}>"


class CertManagerRegistry:
    """
    The managers of one process, keyed by (client, service name).

    :param factory: makes a manager for a new key (tests pass one that sets
        options or records what it made); by default
        ``CertManager(clock, client, service)``.
    """

    _log = Logger(observer=_logging.observer)

    def __init__(self, factory: CertManagerFactory = CertManager) -> None:
        self._factory = factory
        self._leases: Leases[tuple[int, str], CertManager] = Leases(
            self._start, self._stop
        )

    def acquire(
        self, clock: IReactorTime, client: CertificateAuthorityClient, service: str
    ) -> CertManagerLease:
        """
        A lease on the manager for ``service`` through ``client``: the
        running one if there is one, else a new one, started now on
        ``clock``.  Wait for certificates with ``lease.manager.when_ready()``.

        :raises ValueError: if ``service`` is not a non-empty string.
        """
        if not isinstance(service, str) or not service:
            raise ValueError(
                f"service must be a non-empty service name, not {service!r}"
            )
        key = (id(client), service)
        manager = self._leases.take(
            key,
            lambda: self._factory(clock, client, service),
            # Keeps the client alive while it is part of a key (keys hold its id).
            keep=client,
        )
        return CertManagerLease(self, key, manager)

    def _start(self, key: tuple[int, str], manager: CertManager) -> None:
        self._log.info("starting the certificate manager for {service}", service=key[1])
        manager.startService()

    def _stop(self, key: tuple[int, str], manager: CertManager) -> None:
        self._log.info(
            "the last user of the certificate manager for {service} released "
            "it; stopping it",
            service=manager.service,
        )
        manager.stopService()

    def _release(self, key: tuple[int, str], manager: CertManager) -> None:
        self._leases.give_back(key, manager)

    def managers(self) -> list[CertManager]:
        """The managers in use now."""
        return self._leases.values()

    def leases(self, manager: CertManager) -> int:
        """How many unreleased leases hold ``manager`` (0 once stopped)."""
        return self._leases.count(manager)


#: The process's registry, used by the endpoints.
cert_managers = CertManagerRegistry()


def acquire_cert_manager(
    clock: IReactorTime, client: CertificateAuthorityClient, service: str
) -> CertManagerLease:
    """
    A lease on this process's shared manager for ``service`` through
    ``client`` (see :meth:`CertManagerRegistry.acquire`); call
    ``lease.release()`` when done.
    """
    return cert_managers.acquire(clock, client, service)


@implementer(IBundleSource)
class _Certificates:
    """
    A :class:`~connect_native.service.ConnectService`'s certificates as an
    ``IBundleSource``: the identity source it was given, or the shared
    certificate manager it leases while it runs.
    """

    def __init__(self, service: SharedService) -> None:
        self._service = service

    def _source(self) -> Any:
        return self._service._source_now()

    def current(self) -> Bundle | None:
        source = self._source()
        return None if source is None else source.current()

    def when_ready(self) -> Deferred[Bundle]:
        source = self._source()
        if source is None:
            return fail(
                ServiceNotStarted(
                    f"ConnectService {self._service.service!r} is not started: start "
                    "it (startService(), or a parent service) or listen/connect "
                    "through its endpoints, which start it"
                )
            )
        ready: Deferred[Bundle] = source.when_ready()
        return ready

    @property
    def reason(self) -> str | None:
        reason = getattr(self._source(), "reason", None)
        return reason if isinstance(reason, str) else None

    def subscribe_bundles(
        self, callback: Callable[[Bundle], object]
    ) -> Callable[[], None]:
        subscribe = getattr(self._source(), "subscribe_bundles", None)
        if not callable(subscribe):
            return lambda: None
        unsubscribe: Callable[[], None] = subscribe(callback)
        return unsubscribe


class _Hold:
    """
    One user's hold on a :class:`~connect_native.service.ConnectService`
    (an endpoint, an HTTP client): the service runs while any hold is open.
    Taken at the first use, let go by :meth:`close` (or when the holder is
    collected).
    """

    def __init__(self, service: SharedService) -> None:
        self._service = service
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def take(self) -> None:
        if self._finalizer is None:
            self._service.hold()
            self._finalizer = weakref.finalize(self, self._service.let_go)

    def close(self) -> None:
        finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer()


@implementer(IBundleSource)
class HeldCertificates(_Hold):
    """The service's certificates, holding the service from the first use."""

    @property
    def service(self) -> str:
        """The name of the service whose certificates these are."""
        return self._service.service

    def current(self) -> Bundle | None:
        self.take()
        return self._service.identity.current()

    def when_ready(self) -> Deferred[Bundle]:
        self.take()
        return self._service.identity.when_ready()

    def subscribe_bundles(
        self, callback: Callable[[Bundle], object]
    ) -> Callable[[], None]:
        self.take()
        return self._service.identity.subscribe_bundles(callback)  # type: ignore[attr-defined,no-any-return]


class SharedService:
    """
    What one Connect service's endpoints share: its agent client, its
    identity (the certificates and the roots it trusts), its authorizer, and
    the holds that keep it running.  A
    :class:`~connect_native.service.ConnectService` is its public face; the
    endpoints' ``for_service`` conveniences use it directly.

    It runs while started (:meth:`start`) or held (:meth:`hold`); one that
    only holds started stops when the last hold lets go.  The arguments are
    :class:`~connect_native.service.ConnectService`'s.
    """

    def __init__(
        self,
        reactor: Any,
        name: str,
        *,
        consul: ConsulClient | None = None,
        identity: IBundleSource | FilesIdentity | str | None = None,
        authorizer: IAuthorizer | None = None,
        cert_managers: CertManagerRegistry | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be the service's name, not {name!r}")
        from connect_native.sources import FilesIdentity, parse_identity

        if isinstance(identity, str):
            identity = parse_identity(identity)
        if isinstance(identity, FilesIdentity):
            # A description: this service's own source of those files.
            identity = identity.source(reactor)
        if identity is not None and not IBundleSource.providedBy(identity):
            raise TypeError(
                "identity must provide IIdentitySource (or be 'agent' or "
                f"'files:cert=...,key=...,roots=...'), not {type(identity).__name__}"
            )
        self.reactor = reactor
        self.service = name
        self.running = False
        self._consul = consul
        self._given_identity = identity
        self._authorizer = authorizer
        self._registry = cert_managers
        self._lease: CertManagerLease | None = None
        self._holds = 0
        self._started_by_holds = False
        self._started_identity = False
        self.identity: IBundleSource = _Certificates(self)
        self._metrics: ServiceMetrics | None = None
        self._unobserve: Callable[[], None] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<SharedService {self.service!r} {state}>"

    @property
    def consul(self) -> ConsulClient:
        """The agent's client (the process's shared one unless given)."""
        if self._consul is None:
            from connect_native.consul.client import shared_client

            self._consul = shared_client(self.reactor)
            if self.running:
                self._observe_consul()
        return self._consul

    @property
    def metrics(self) -> ServiceMetrics:
        """
        Its Prometheus metrics, in a registry of its own (made at the first
        use; the endpoints made from it count there).
        """
        if self._metrics is None:
            from connect_native.metrics import ServiceMetrics

            self._metrics = ServiceMetrics(self.service, self.identity.current)
            if self.running:
                self._observe_consul()
        return self._metrics

    def _observe_consul(self) -> None:
        """Count the agent client's errors, while it runs with metrics."""
        metrics = self._metrics
        if metrics is None or self._unobserve is not None or self._consul is None:
            return
        observe = getattr(self._consul, "observe_errors", None)
        if callable(observe):
            self._unobserve = observe(metrics.consul_error)

    @property
    def authorizer(self) -> IAuthorizer:
        """Who decides whether a caller may reach this service."""
        if self._authorizer is None:
            from connect_native.authorize import AgentAuthorizer

            self._authorizer = AgentAuthorizer(self.consul, self.reactor)
        return self._authorizer

    @property
    def cert_manager(self) -> CertManager | None:
        """The shared certificate manager it leases, while it runs."""
        return None if self._lease is None else self._lease.manager

    def _source_now(self) -> IBundleSource | None:
        if self._given_identity is not None:
            return self._given_identity
        return self.cert_manager

    @property
    def state(self) -> ManagerState:
        """
        Where its certificates stand: ``STOPPED`` unless it runs, else its
        certificate manager's state (an identity source without one is
        ``READY`` with a certificate and ``STARTING`` without).
        """
        if not self.running:
            return ManagerState.STOPPED
        manager = self.cert_manager
        if manager is not None:
            return manager.state
        source = self._given_identity
        state = getattr(source, "state", None)
        if isinstance(state, ManagerState):
            return state
        return ManagerState.READY if self.identity.current() else ManagerState.STARTING

    def when_ready(self) -> Deferred[Bundle]:
        """
        Fires with the first usable certificate (starting the service if
        nothing did); cancellable.  Bound it with a timeout.
        """
        if not self.running:
            self.start()
        return self.identity.when_ready()

    def start(self) -> None:
        """Lease the certificates (or start the given identity source)."""
        if self.running:
            return
        self.running = True
        if self._given_identity is None:
            registry = cert_managers if self._registry is None else self._registry
            self._lease = registry.acquire(self.reactor, self.consul, self.service)
        else:
            start = getattr(self._given_identity, "startService", None)
            if callable(start) and not getattr(self._given_identity, "running", True):
                start()
                # Started here, so stopped here too.
                self._started_identity = True
        self._observe_consul()

    def stop(self) -> None:
        """Release what :meth:`start` took, failing the waiters."""
        if not self.running:
            return
        self.running = False
        self._started_by_holds = False
        unobserve, self._unobserve = self._unobserve, None
        if unobserve is not None:
            unobserve()
        lease, self._lease = self._lease, None
        if lease is not None:
            # The last lease stops the manager, failing its waiters.
            lease.release()
        if self._started_identity:
            self._started_identity = False
            stop = getattr(self._given_identity, "stopService", None)
            if callable(stop):
                stop()

    def hold(self) -> None:
        """One more user: starts the service if it is not running."""
        self._holds += 1
        if not self.running:
            self._started_by_holds = True
            self.start()

    def let_go(self) -> None:
        """
        One user fewer: the last stops the service if only holds started it.
        """
        self._holds = max(0, self._holds - 1)
        if self._holds == 0 and self._started_by_holds:
            self.stop()

    def held_identity(self) -> HeldCertificates:
        """
        The service's certificates as an ``IBundleSource`` that holds the
        service from its first use until its ``close()``.
        """
        return HeldCertificates(self)


class SharedServiceRegistry:
    """
    The :class:`SharedService` of each (agent, service) in a process: asked
    twice for the same pair, it gives the same object, for as long as
    something holds it.
    """

    def __init__(self) -> None:
        self._services: weakref.WeakValueDictionary[
            tuple[object, ...], SharedService
        ] = weakref.WeakValueDictionary()

    def get(
        self,
        reactor: Any,
        name: str,
        *,
        consul: ConsulClient | None = None,
        cert_managers: CertManagerRegistry | None = None,
        identity: FilesIdentity | None = None,
    ) -> SharedService:
        """
        The shared service ``name`` through ``consul`` (the process's shared
        client for the ``CONSUL_*`` environment by default), with its
        certificates from the agent, or from the files ``identity``
        describes (one source per description).
        """
        if consul is None:
            from connect_native.consul.client import shared_client

            consul = shared_client(reactor)
        key = (id(reactor), id(consul), name, id(cert_managers), identity)
        service = self._services.get(key)
        if service is None or service.consul is not consul:
            service = SharedService(
                reactor,
                name,
                consul=consul,
                cert_managers=cert_managers,
                identity=identity,
            )
            self._services[key] = service
        return service

    def services(self) -> Sequence[SharedService]:
        """The services alive now."""
        return list(self._services.values())


#: The process's shared services: the endpoints' ``for_service``
#: conveniences, the ``connect:`` strings, ``http.client()`` and the
#: terminator take theirs here (through
#: :data:`connect_native.service.connect_services` above the endpoints).
shared_services = SharedServiceRegistry()
