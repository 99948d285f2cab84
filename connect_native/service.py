"""
One Connect service in this process: :class:`ConnectService`, the owner of
its certificates, its authorizer and the endpoints and HTTP client made
through it; and :data:`connect_services`, which shares one per (agent,
service) in a process.

Below it, one :class:`~connect_native.certs.CertManager` per (agent,
service) per process, shared by every user of that service and leased while
the service runs (:class:`CertManagerRegistry`: the first lease creates and
starts a manager, the last release stops it).

What a service's endpoints share lives under the endpoints, in
``connect_native._shared`` (a :class:`ConnectService` is the public face of
one), so that :mod:`connect_native.server` and :mod:`connect_native.client`
share it without importing this module, which is built on them.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamServerEndpoint

from connect_native._http import ConnectHTTPClient, make_client
from connect_native._shared import (
    CertManagerLease,
    CertManagerRegistry,
    HeldCertificates,
    ServiceNotStarted,
    SharedService,
    SharedServiceRegistry,
    acquire_cert_manager,
    cert_managers,
    shared_services,
)
from connect_native.certs import Bundle, CertManager, IBundleSource, ManagerState
from connect_native.client import ConnectClientEndpoint
from connect_native.server import ConnectServerEndpoint

if TYPE_CHECKING:
    from connect_native.authorize import IAuthorizer
    from connect_native.consul.client import ConsulClient
    from connect_native.metrics import ServiceMetrics
    from connect_native.sources import FilesIdentity
    from connect_native.status import ReadinessCheck, StatusResource

__all__ = [
    "CertManagerLease",
    "CertManagerRegistry",
    "ConnectService",
    "ConnectServiceRegistry",
    "ServiceNotStarted",
    "acquire_cert_manager",
    "cert_managers",
    "connect_services",
]


class ConnectService(Service):
    """
    One Connect service in this process, as Consul's Go ``connect.Service``
    is: it owns the service's identity (its certificates and the roots it
    trusts), the authorizer that decides who may call it, and what it dials
    through; the endpoints and the HTTP client made from it share them::

        web = ConnectService(reactor, "web")
        web.setServiceParent(application)      # or web.startService()
        port = await web.server_endpoint(TCP4ServerEndpoint(reactor, 8443)).listen(site)
        http = web.http_client()
        response = await http.get("https://db.service.consul/users")

    Its endpoints start it when they listen or connect, and a service that
    only they started stops when the last of them lets go;
    :meth:`stopService` stops what it started and fails its waiters.
    :data:`connect_services` hands out one per (agent, service) in a
    process: the ``connect:`` endpoint strings, ``http.client()`` and the
    endpoints' ``for_service`` conveniences all get theirs there.

    :param reactor: the reactor (connects, listens, keeps time).
    :param name: the service's name: its certificate's, and the
        authorization target of its server endpoints.
    :param consul: the agent's client; by default the process's shared one
        for the ``CONSUL_*`` environment
        (:func:`~connect_native.consul.client.shared_client`).
    :param identity: where the certificates come from: an
        :class:`~connect_native.sources.IIdentitySource` (such as a
        :class:`~connect_native.sources.files.FileIdentitySource`), or its
        text form (``"files:cert=PATH,key=PATH,roots=PATH"``, see
        :func:`~connect_native.sources.parse_identity`); by default (or
        ``"agent"``) the agent, through the process's shared
        :class:`~connect_native.certs.CertManager` for (agent, service),
        leased while this service runs.
    :param authorizer: decides who may call the service; by default an
        :class:`~connect_native.authorize.AgentAuthorizer` on ``consul``.
    :param cert_managers: where the certificate managers are shared (the
        process's :data:`cert_managers` by default).
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
        self._share(
            SharedService(
                reactor,
                name,
                consul=consul,
                identity=identity,
                authorizer=authorizer,
                cert_managers=cert_managers,
            )
        )

    @classmethod
    def _of(cls, shared: SharedService) -> ConnectService:
        """The face of a service shared through a registry."""
        service = cls.__new__(cls)
        service._share(shared)
        return service

    def _share(self, shared: SharedService) -> None:
        self._shared = shared
        self.reactor = shared.reactor
        self.name = shared.service
        #: The service's name (``name`` is IService's, typed optional).
        self.service: str = shared.service
        self.identity: IBundleSource = shared.identity

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<ConnectService {self.name!r} {state}>"

    @property
    def running(self) -> bool:
        """Whether it runs: started, by its owner or by its endpoints."""
        return self._shared.running

    @running.setter
    def running(self, value: object) -> None:
        # IService's own start and stop set it; ours are the shared state's.
        pass

    # -- what it owns ---------------------------------------------------------

    @property
    def consul(self) -> ConsulClient:
        """The agent's client (the process's shared one unless given)."""
        return self._shared.consul

    @property
    def authorizer(self) -> IAuthorizer:
        """Who decides whether a caller may reach this service."""
        return self._shared.authorizer

    @property
    def cert_manager(self) -> CertManager | None:
        """The shared certificate manager it leases, while it runs."""
        return self._shared.cert_manager

    @property
    def identity_source(self) -> IBundleSource | None:
        """
        Where its certificates come from: the identity source it was given
        (a :class:`~connect_native.sources.files.FileIdentitySource`, say),
        else the certificate manager it leases while it runs (``None``
        before it starts).
        """
        return self._shared._source_now()

    @property
    def state(self) -> ManagerState:
        """
        Where its certificates stand: ``STOPPED`` unless it runs, else its
        certificate manager's state (an identity source without one is
        ``READY`` with a certificate and ``STARTING`` without).
        """
        return self._shared.state

    def when_ready(self) -> Deferred[Bundle]:
        """
        Fires with the first usable certificate (starting the service if
        nothing did); cancellable.  Bound it with a timeout.
        """
        return self._shared.when_ready()

    # -- what it reports ------------------------------------------------------

    @property
    def metrics(self) -> ServiceMetrics:
        """
        Its Prometheus metrics (:class:`~connect_native.metrics.ServiceMetrics`),
        in a ``CollectorRegistry`` of its own, ``metrics.registry``: the
        connections its server endpoints decide, their handshakes and
        authorizations, its certificate's expiry, the agent's errors.
        """
        return self._shared.metrics

    def status_resource(
        self,
        *,
        authorizer: IAuthorizer | None = None,
        checks: Sequence[ReadinessCheck] = (),
    ) -> StatusResource:
        """
        A twisted.web resource with ``/ready``, ``/status`` and ``/metrics``
        for this service (:class:`~connect_native.status.StatusResource`), to
        mount in a twisted.web tree or a Klein app (``branch=True``).

        :param authorizer: whose cache ``/status`` describes, when the
            endpoints were given their own (by default the service's).
        :param checks: more conditions of ``/ready``: each returns ``None``
            (or a Deferred of it) when passing, else the reason it fails.
        """
        from connect_native.status import StatusResource

        return StatusResource(
            self._shared, self.reactor, authorizer=authorizer, checks=checks
        )

    # -- IService ---------------------------------------------------------------

    def startService(self) -> None:
        self._shared.start()

    def stopService(self) -> Deferred[None] | None:
        self._shared.stop()
        return None

    def _hold(self) -> None:
        self._shared.hold()

    def _let_go(self) -> None:
        self._shared.let_go()

    # -- what it makes ----------------------------------------------------------

    def server_endpoint(
        self, wrapped: IStreamServerEndpoint, **options: Any
    ) -> ConnectServerEndpoint:
        """
        A :class:`~connect_native.server.ConnectServerEndpoint` for this
        service over ``wrapped``: its certificates, its authorizer (unless
        ``authorizer=`` says otherwise); each ``listen()`` holds the service
        until its port stops.

        :param options: the endpoint's keyword arguments.
        """
        return ConnectServerEndpoint._of_shared(self._shared, wrapped, **options)

    def client_endpoint(
        self,
        target: str,
        *,
        datacenter: str | None = None,
        namespace: str | None = None,
        partition: str | None = None,
        **options: Any,
    ) -> ConnectClientEndpoint:
        """
        A :class:`~connect_native.client.ConnectClientEndpoint` to
        ``target``'s healthy instances, presenting this service's
        certificate; it holds the service from its first ``connect()`` until
        its ``close()``.

        :param options: the endpoint's keyword arguments.
        """
        return ConnectClientEndpoint._of_shared(
            self._shared,
            target,
            datacenter=datacenter,
            namespace=namespace,
            partition=partition,
            **options,
        )

    def http_client(self, **options: Any) -> ConnectHTTPClient:
        """
        A treq client (:func:`connect_native.http.client`) presenting this
        service's certificate; it holds the service from its first request
        until its ``close()``.

        :param options: :func:`connect_native.http.client`'s settings
            (``timeout``, ``connect_timeout``, ``attempt_timeout``,
            ``retries``, ``max_hosts``, ``pool``).
        """
        return make_client(
            self.reactor,
            self.consul,
            self.held_identity(),
            owns_source=True,
            **options,
        )

    def held_identity(self) -> HeldCertificates:
        """
        The service's certificates as an ``IBundleSource`` that holds the
        service from its first use until its ``close()``.
        """
        return self._shared.held_identity()


class ConnectServiceRegistry:
    """
    The :class:`ConnectService` of each (agent, service) in a process: asked
    twice for the same pair, it gives the same object, for as long as
    something holds it.  Each is the face of the registry's
    ``SharedService`` for the pair, which the endpoints' ``for_service``
    conveniences use too.

    :param shared: where the shared services are kept (a registry of its
        own by default; :data:`connect_services` uses the process's).
    """

    def __init__(self, shared: SharedServiceRegistry | None = None) -> None:
        self._shared = SharedServiceRegistry() if shared is None else shared
        self._services: weakref.WeakValueDictionary[int, ConnectService] = (
            weakref.WeakValueDictionary()
        )

    def get(
        self,
        reactor: Any,
        name: str,
        *,
        consul: ConsulClient | None = None,
        cert_managers: CertManagerRegistry | None = None,
        identity: FilesIdentity | None = None,
    ) -> ConnectService:
        """
        The shared service ``name`` through ``consul`` (the process's shared
        client for the ``CONSUL_*`` environment by default), with its
        certificates from the agent, or from the files ``identity``
        describes (one source per description).
        """
        shared = self._shared.get(
            reactor, name, consul=consul, cert_managers=cert_managers, identity=identity
        )
        return self._face(shared)

    def _face(self, shared: SharedService) -> ConnectService:
        # A face keeps its shared state alive, so the id is not reused while
        # the face is in the dictionary.
        service = self._services.get(id(shared))
        if service is None or service._shared is not shared:
            service = ConnectService._of(shared)
            self._services[id(shared)] = service
        return service

    def services(self) -> Sequence[ConnectService]:
        """
        The services alive now: held by their users, or by the endpoints and
        HTTP clients made from them.
        """
        return [self._face(shared) for shared in self._shared.services()]


#: The process's services, shared by the endpoints and HTTP clients.
connect_services = ConnectServiceRegistry(shared_services)
