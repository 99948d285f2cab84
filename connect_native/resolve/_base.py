"""
What every resolver shares: the :class:`Instance` records it answers, the
:class:`ExpectedIdentity` each carries, the :class:`IResolver` interface, and
the checks of the names resolvers are given.

Private: the public names are in :mod:`connect_native.resolve`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attrs import field, frozen
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from connect_native._checks import port_number
from connect_native.identity import ServiceIdentity, normalize_trust_domain

__all__ = ["ExpectedIdentity", "IResolver", "Instance"]

# Stands in for the trust domain while the other fields are checked.
_ANY_TRUST_DOMAIN = "any-trusted-trust-domain.invalid"


# --- records -----------------------------------------------------------------


def _normalize_partition(partition: str | None) -> str | None:
    if partition is None or partition == "":
        return None
    return partition.lower() if partition.lower() != "default" else None


def _optional_trust_domain(value: str | None) -> str | None:
    if value is None:
        return None
    return normalize_trust_domain(value)


@frozen
class ExpectedIdentity:
    """
    The identity a server must prove: a service's SPIFFE ID, with the trust
    domain left open (``None``: any trust domain a current CA root carries)
    or fixed.

    Compared as Consul's Go library compares (:meth:`ServiceIdentity.matches`):
    service, namespace and datacenter ASCII case-insensitively, the partition
    exactly (``None`` is the default partition).
    """

    service: str
    datacenter: str
    namespace: str = "default"
    partition: str | None = field(default=None, converter=_normalize_partition)
    trust_domain: str | None = field(default=None, converter=_optional_trust_domain)

    def __attrs_post_init__(self) -> None:
        # ServiceIdentity validates every field and names the one at fault.
        self.in_trust_domain(self.trust_domain or _ANY_TRUST_DOMAIN)

    @classmethod
    def of(cls, identity: ServiceIdentity) -> ExpectedIdentity:
        """
        Expect exactly ``identity``, trust domain included.
        """
        return cls(
            service=identity.service,
            datacenter=identity.datacenter,
            namespace=identity.namespace,
            partition=identity.partition,
            trust_domain=identity.trust_domain,
        )

    def in_trust_domain(self, trust_domain: str) -> ServiceIdentity:
        """
        This identity as a SPIFFE ID in ``trust_domain`` (ignored when the
        trust domain is fixed).
        """
        return ServiceIdentity(
            trust_domain=self.trust_domain or trust_domain,
            namespace=self.namespace,
            datacenter=self.datacenter,
            service=self.service,
            partition=self.partition,
        )

    def matches(self, peer: ServiceIdentity, trusted: frozenset[str]) -> bool:
        """
        Whether ``peer`` is this identity, ``trusted`` being the trust domains
        of the current CA roots.
        """
        if peer.trust_domain not in trusted:
            return False
        if self.trust_domain is not None and peer.trust_domain != self.trust_domain:
            return False
        return peer.matches(self.in_trust_domain(peer.trust_domain))

    def __str__(self) -> str:
        shown = self.in_trust_domain(_ANY_TRUST_DOMAIN).uri
        if self.trust_domain is None:
            shown = shown.replace(_ANY_TRUST_DOMAIN, "<any trusted trust domain>")
        return shown


def _expected(value: ExpectedIdentity | ServiceIdentity) -> ExpectedIdentity:
    if isinstance(value, ServiceIdentity):
        return ExpectedIdentity.of(value)
    if not isinstance(value, ExpectedIdentity):
        raise TypeError(
            "identity must be an ExpectedIdentity or a ServiceIdentity, not "
            f"{type(value).__name__}: {value!r}"
        )
    return value


def _check_address(instance: object, attribute: object, value: Any) -> None:
    if not isinstance(value, str) or not value or value != value.strip():
        raise ValueError(
            f"Instance address must be a non-empty host name or IP address, "
            f"not {value!r}"
        )


def _check_port(instance: object, attribute: object, value: Any) -> None:
    port_number("Instance port", value)


@frozen
class Instance:
    """
    One instance of a service to dial.

    :ivar address: a host name or an IP address.
    :ivar port: the TCP port.
    :ivar identity: what the server there must prove (a
        :class:`~connect_native.identity.ServiceIdentity` given here becomes
        an :class:`ExpectedIdentity` with its trust domain fixed).
    :ivar node: the Consul node it runs on, for logs and errors.
    :ivar instance_id: the service instance ID, for logs and errors.
    """

    address: str = field(validator=_check_address)
    port: int = field(validator=_check_port)
    identity: ExpectedIdentity = field(converter=_expected)
    node: str = ""
    instance_id: str = ""

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        name = self.instance_id or self.identity.service
        where = f" on node {self.node}" if self.node else ""
        return f"{name} at {host}:{self.port}{where}"


# --- the interface --------------------------------------------------------------


class IResolver(Interface):
    """
    Finds the instances of one service.
    """

    description = Attribute(
        "What is being resolved, for errors and logs: "
        "\"Consul service 'db' (healthy instances)\"."
    )

    def resolve() -> Deferred[Sequence[Instance]]:
        """
        The instances to try, healthy ones only; an empty sequence when there
        are none.  Fails with :class:`ResolveError` when they cannot be
        found.  Cancelling it abandons the lookup.
        """


# --- names ---------------------------------------------------------------------


def _nonempty_name(what: str, value: object) -> str:
    if not isinstance(value, str) or not value or "/" in value:
        raise ValueError(f"{what} must be a non-empty name without '/', not {value!r}")
    return value


def _optional_name(what: str, value: str | None) -> str | None:
    if value is None or value == "":
        return None
    return _nonempty_name(what, value)


def _default_reactor() -> Any:
    from twisted.internet import reactor

    return reactor
