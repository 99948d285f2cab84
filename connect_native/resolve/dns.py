"""
:class:`DnsResolver`: the SRV records of ``<service>.connect.consul`` from
the Consul agent's DNS interface, with :mod:`twisted.names`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from connect_native import _logging
from connect_native._checks import positive_seconds
from connect_native._deferreds import bounded
from connect_native.errors import ResolveError
from connect_native.resolve._base import (
    ExpectedIdentity,
    Instance,
    IResolver,
    _default_reactor,
    _nonempty_name,
)

__all__ = ["DnsResolver"]

log = Logger(observer=_logging.observer)

_failure: Callable[[BaseException], Failure] = Failure


def _dns_label(what: str, value: str) -> str:
    if not value or "." in value or len(value) > 63 or not value.isascii():
        raise ValueError(
            f"{what} must be a single DNS label (1 to 63 ASCII characters, no "
            f"'.'), not {value!r}"
        )
    return value


@implementer(IResolver)
class DnsResolver:
    """
    The Connect-capable instances of a service from the Consul agent's DNS
    interface: the SRV records of ``<service>.connect[.<datacenter>].<domain>``
    (native instances and sidecar proxies, healthy ones only), each target's
    address from the A/AAAA records the agent adds (asked for separately when
    missing).  The expected identity is ``service`` in the datacenter the
    target's name carries (``<hex>.addr.<dc>.consul``,
    ``<node>.node.<dc>.consul``), else ``datacenter``.

    The seed's ``<service>.connect`` syntax is accepted as ``service``.

    :param service: the service to reach.
    :param datacenter: ask for another datacenter than the agent's.
    :param namespace: the namespace of the expected identity.
    :param partition: the partition of the expected identity.
    :param domain: the agent's DNS domain.
    :param dns_address: the agent's DNS server ``(host, port)``.
    :param reactor: does the UDP (and TCP) queries and the timeouts.
    :param timeout: seconds each query may take.
    """

    def __init__(
        self,
        service: str,
        *,
        datacenter: str | None = None,
        namespace: str = "default",
        partition: str | None = None,
        domain: str = "consul",
        dns_address: tuple[str, int] = ("127.0.0.1", 8600),
        reactor: Any = None,
        timeout: float = 2.0,
    ) -> None:
        if isinstance(service, str) and service.endswith(".connect"):
            service = service[: -len(".connect")]
        self.service = _dns_label("service", service)
        self.datacenter = (
            None if datacenter is None else _dns_label("datacenter", datacenter)
        )
        self.namespace = _nonempty_name("namespace", namespace)
        self.partition = partition
        self.domain = domain.strip(".").lower()
        if not self.domain:
            raise ValueError(
                f"domain must be a DNS domain such as 'consul', not {domain!r}"
            )
        host, port = dns_address
        if (
            not isinstance(host, str)
            or not isinstance(port, int)
            or not 0 < port < 65536
        ):
            raise ValueError(
                f"dns_address must be (host, port), such as ('127.0.0.1', 8600), "
                f"not {dns_address!r}"
            )
        self.dns_address = (host, port)
        self.timeout = positive_seconds("timeout", timeout)
        self._reactor: Any = reactor if reactor is not None else _default_reactor()
        from twisted.names import client

        make_resolver: Any = client.Resolver
        self._resolver: Any = make_resolver(
            servers=[self.dns_address], reactor=self._reactor
        )
        dc = f".{self.datacenter}" if self.datacenter else ""
        self.name = f"{self.service}.connect{dc}.{self.domain}"
        self.description = f"Consul DNS {self.name} SRV at {host}:{port}"

    def __repr__(self) -> str:
        return f"DnsResolver({self.name!r}, dns_address={self.dns_address!r})"

    def _query(self, d: Deferred[Any], what: str) -> Deferred[Any]:
        """
        One DNS lookup, bounded, its failures explained (except NXDOMAIN,
        which the callers handle).
        """
        from twisted.names import error

        def timed_out() -> Exception:
            return ResolveError(
                f"cannot find the instances of {self.description}: the DNS "
                f"query for {what} did not answer within {self.timeout:g}s"
            )

        def explain(failure: Failure) -> Failure:
            value = failure.value
            if isinstance(value, error.DNSNameError | ResolveError | CancelledError):
                return failure
            if isinstance(value, DeferredTimeoutError):
                return _failure(timed_out())
            return _failure(
                ResolveError(
                    f"cannot find the instances of {self.description}: the DNS "
                    f"query for {what} failed: "
                    f"{failure.getErrorMessage() or type(value).__name__}"
                )
            )

        # twisted.names gives up after its own timeout; the bound is for a
        # lookup that would not.
        limited = bounded(
            d,
            self.timeout + 1.0,
            self._reactor,
            timed_out,
            any_failure=True,
            abandon=True,
        )
        return limited.addErrback(explain)

    def resolve(self) -> Deferred[Sequence[Instance]]:
        from twisted.names import dns, error

        lookup = self._query(
            self._resolver.lookupService(self.name, timeout=(self.timeout,)),
            f"{self.name} SRV",
        )

        def nxdomain(failure: Failure) -> Failure | Sequence[Instance]:
            if isinstance(failure.value, error.DNSNameError):
                # NXDOMAIN: Consul's answer for a service with no healthy
                # Connect instance.
                return ()
            return failure

        def answered(
            result: tuple[list[Any], list[Any], list[Any]],
        ) -> Deferred[Sequence[Instance]]:
            answers, _authority, additional = result
            records = [
                r.payload
                for r in answers
                if r.type == dns.SRV and isinstance(r.payload, dns.Record_SRV)
            ]
            addresses: dict[str, list[str]] = {}
            for r in additional:
                if r.type in (dns.A, dns.AAAA):
                    addresses.setdefault(str(r.name).lower(), []).append(
                        r.payload.dottedQuad()
                        if r.type == dns.A
                        else _ipv6_text(r.payload.address)
                    )
            return self._instances(records, addresses)

        return lookup.addCallbacks(answered, nxdomain)

    def _instances(
        self, records: list[Any], addresses: dict[str, list[str]]
    ) -> Deferred[Sequence[Instance]]:
        from twisted.internet.defer import gatherResults

        pending: list[Deferred[str | None]] = []
        for srv in records:
            target = str(srv.target).lower().rstrip(".")
            known = addresses.get(target)
            if known:
                pending.append(succeed(known[0]))
            else:
                pending.append(self._address_of(target))
        gathered: Deferred[list[str | None]] = gatherResults(
            pending, consumeErrors=True
        )

        def build(found: list[str | None]) -> Sequence[Instance]:
            instances = []
            for srv, address in zip(records, found, strict=True):
                target = str(srv.target).lower().rstrip(".")
                if address is None:
                    continue
                datacenter = self._datacenter_of(target)
                if datacenter is None:
                    log.warn(
                        "{resolver}: skipping SRV target {target}: its name "
                        "says no datacenter, and no datacenter= was given",
                        resolver=repr(self),
                        target=target,
                    )
                    continue
                instances.append(
                    Instance(
                        address=address,
                        port=srv.port,
                        identity=ExpectedIdentity(
                            service=self.service,
                            datacenter=datacenter,
                            namespace=self.namespace,
                            partition=self.partition,
                        ),
                        node=self._node_of(target),
                        instance_id="",
                    )
                )
            return tuple(instances)

        def unwrap(failure: Failure) -> Failure:
            from twisted.internet.defer import FirstError

            if isinstance(failure.value, FirstError):
                return failure.value.subFailure
            return failure

        return gathered.addCallbacks(build, unwrap)

    def _address_of(self, target: str) -> Deferred[str | None]:
        d = self._query(
            self._resolver.lookupAddress(target, timeout=(self.timeout,)),
            f"{target} A",
        )

        def first(result: tuple[list[Any], list[Any], list[Any]]) -> str | None:
            from twisted.names import dns

            for r in result[0]:
                if r.type == dns.A:
                    address: str = r.payload.dottedQuad()
                    return address
            log.warn(
                "{resolver}: skipping SRV target {target}: it has no A record",
                resolver=repr(self),
                target=target,
            )
            return None

        def missing(failure: Failure) -> Failure | None:
            from twisted.names import error

            if isinstance(failure.value, error.DNSNameError):
                return None
            return failure

        return d.addCallbacks(first, missing)

    def _labels(self, target: str) -> list[str] | None:
        suffix = "." + self.domain
        if not target.endswith(suffix):
            return None
        return target[: -len(suffix)].split(".")

    def _datacenter_of(self, target: str) -> str | None:
        labels = self._labels(target)
        if labels is not None and len(labels) >= 3 and labels[-2] in ("addr", "node"):
            return labels[-1]
        return self.datacenter

    def _node_of(self, target: str) -> str:
        labels = self._labels(target)
        if labels is not None and len(labels) >= 3 and labels[-2] == "node":
            return ".".join(labels[:-2])
        return ""


def _ipv6_text(packed: bytes) -> str:
    return str(ipaddress.IPv6Address(packed))
