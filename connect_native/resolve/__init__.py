"""
Finding the instances of a Connect service to dial: the :class:`IResolver`
seam and its implementations.

A resolver answers a Deferred of :class:`Instance` records: where to connect
(address and port) and which identity the server there must prove
(:class:`ExpectedIdentity`).  :class:`~connect_native.client.ConnectClientEndpoint`
picks among them and checks the identity in the TLS handshake.

* :class:`ConsulResolver`: ``/v1/health/connect/<service>?passing=1``, kept
  fresh by one blocking watch per (agent client, query) in the process.
* :class:`PreparedQueryResolver`: ``/v1/query/<name>/execute?connect=true``
  (prepared queries cannot block, so answers are cached briefly).
* :class:`DnsResolver`: SRV records of ``<service>.connect.consul`` from the
  agent's DNS interface, with :mod:`twisted.names`.
* :class:`StaticResolver`: fixed instances.

The expected identity carries the service, namespace, datacenter and
partition; its trust domain is usually left open, meaning "any trust domain a
current CA root carries", which is what the chain check already guarantees
(Consul's Go library does the same by copying the server's trust domain into
the expected URI).
"""

from __future__ import annotations

from connect_native.errors import ResolveError, StaleAnswer
from connect_native.resolve._base import ExpectedIdentity, Instance, IResolver
from connect_native.resolve.consul import (
    ConsulResolver,
    PreparedQueryResolver,
)
from connect_native.resolve.consul import HealthClient as HealthClient
from connect_native.resolve.consul import PreparedQueryClient as PreparedQueryClient
from connect_native.resolve.dns import DnsResolver
from connect_native.resolve.static import StaticResolver

__all__ = [
    "ConsulResolver",
    "DnsResolver",
    "ExpectedIdentity",
    "IResolver",
    "Instance",
    "PreparedQueryResolver",
    "ResolveError",
    "StaleAnswer",
    "StaticResolver",
]
