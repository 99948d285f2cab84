"""
HTTP to Connect services with treq: :func:`client` makes a
``treq.HTTPClient`` whose ``https://`` requests to Consul service host names
go over Connect.

Host names, as Consul's Go library reads them, and more:

* ``<service>.service[.<namespace>.ns][.<partition>.ap][.<datacenter>].consul``:
  the healthy instances of the service
  (:class:`~connect_native.resolve.ConsulResolver`);
* ``<query>.query[.<datacenter>].consul``: what the prepared query returns
  (:class:`~connect_native.resolve.PreparedQueryResolver`).

Any other host is refused with :class:`NotAConnectHost` (use a plain treq
client for it), and so is any scheme but ``https`` (Connect is always TLS).
The requests speak HTTP/1.1 (Twisted's client speaks nothing else, and only
``http/1.1`` is offered in ALPN), carry a timeout by default (which bounds
the response body as well as the headers), and a request
that can be repeated (an idempotent method without a body) is sent again on
a new connection when the connection fails before any response.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.web.client import HTTPConnectionPool

from connect_native._http import (
    MAX_HOSTS,
    ConnectEndpointFactory,
    ConnectHost,
    ConnectHTTPClient,
    NotAConnectHost,
    RequestTimeout,
    ResponseBodyTimeout,
    check_settings,
    make_client,
    parse_connect_host,
)
from connect_native.certs import IBundleSource
from connect_native.client import our_service_name
from connect_native.service import CertManagerRegistry, connect_services

if TYPE_CHECKING:
    from connect_native.consul.client import ConsulClient

__all__ = [
    "MAX_HOSTS",
    "ConnectEndpointFactory",
    "ConnectHTTPClient",
    "ConnectHost",
    "NotAConnectHost",
    "RequestTimeout",
    "ResponseBodyTimeout",
    "client",
    "parse_connect_host",
]


def client(
    our_service: str | None = None,
    *,
    reactor: Any = None,
    consul: ConsulClient | None = None,
    timeout: float | None = 30.0,
    connect_timeout: float = 10.0,
    attempt_timeout: float = 3.0,
    retries: int = 1,
    max_hosts: int = MAX_HOSTS,
    pool: HTTPConnectionPool | None = None,
    registry: CertManagerRegistry | None = None,
    bundle_source: IBundleSource | None = None,
) -> ConnectHTTPClient:
    """
    A ``treq.HTTPClient`` for Connect services, presenting the certificate
    of ``our_service``::

        http = connect_native.http.client("web")
        response = await http.get("https://db.service.consul/users")
        ...
        await http.close()   # idle connections, watches, certificate manager

    :param our_service: the service we are (our certificate's); by default
        ``$CONNECT_NATIVE_SERVICE``.  An error says so when neither is set.
    :param reactor: the reactor (the global one by default).
    :param consul: the agent's client; by default one configured from the
        ``CONSUL_*`` environment variables.
    :param timeout: seconds a whole request may take unless the request says
        otherwise (``None``: no default): the response's headers must
        arrive, and its body be read to the end, within this many seconds of
        the start of the request, else the request fails with
        :class:`RequestTimeout` (for the body,
        :class:`ResponseBodyTimeout`).  A request's own ``timeout=`` bounds
        both the same way.  A request the service refuses (its intentions
        deny our service) fails with
        :class:`~connect_native.errors.ServiceRefused`, and is not sent
        again.
    :param connect_timeout: seconds to find an instance and make a verified
        connection to it.
    :param attempt_timeout: seconds one instance may take before the next is
        tried.
    :param retries: how many times an idempotent request without a body is
        sent again after its connection failed before any response.
    :param max_hosts: how many host names keep an endpoint and its Consul
        watch; past that the least recently used is let go of (see
        :class:`ConnectEndpointFactory`).
    :param pool: the connection pool (persistent by default).
    :param registry: where the certificate manager is shared (the process's
        by default).
    :param bundle_source: our certificates, instead of the shared certificate
        manager of ``our_service`` (for tests).

    :raises ValueError: when our own service is not named, or a setting is
        out of range.
    """
    ours = our_service_name(our_service) if bundle_source is None else None
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    check_settings(timeout, connect_timeout, attempt_timeout, retries)
    if consul is None:
        from connect_native.consul.client import shared_client

        # The process's client for the agent: what is shared per client (the
        # certificate manager and its watches) is shared with the endpoints.
        consul = shared_client(reactor)
    if bundle_source is not None:
        return make_client(
            reactor,
            consul,
            bundle_source,
            timeout=timeout,
            connect_timeout=connect_timeout,
            attempt_timeout=attempt_timeout,
            retries=retries,
            max_hosts=max_hosts,
            pool=pool,
        )
    assert ours is not None
    service = connect_services.get(reactor, ours, consul=consul, cert_managers=registry)
    return service.http_client(
        timeout=timeout,
        connect_timeout=connect_timeout,
        attempt_timeout=attempt_timeout,
        retries=retries,
        max_hosts=max_hosts,
        pool=pool,
    )
