"""
Frozen attrs records decoded from the Consul agent's JSON.

JSON is decoded once, at the edge (the client), into these records; nothing
past the client sees a dict of JSON.  The decoders follow the shapes a real
Consul 1.8.7 agent sends (``IntermediateCerts`` and ``Meta`` may be ``null``,
a root's ``SerialNumber`` is a number and a leaf's a hex string, native
health entries carry no ``Kind`` key, ...) and are lenient only where newer
agents omit a field (``omitempty``).  Anything else of the wrong shape raises
:class:`ConsulResponseError` naming the field, e.g.
``leaf: field 'CertPEM' missing``.

The request side lives here too: :class:`ServiceRegistration` and
:class:`TTLCheck` render the body of ``PUT /v1/agent/service/register``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Generic, TypeVar

from attrs import field, frozen

from connect_native.consul.errors import ConsulError, ConsulResponseError

__all__ = [
    "AgentSelf",
    "AuthorizeResult",
    "CAConfiguration",
    "CARoot",
    "CARoots",
    "CatalogEntry",
    "ConsulError",
    "ConsulResponseError",
    "FrozenDict",
    "HealthCheck",
    "HealthEntry",
    "Indexed",
    "Intention",
    "IntentionHTTPHeaderPermission",
    "IntentionHTTPPermission",
    "IntentionPermission",
    "LeafCert",
    "Node",
    "PreparedQueryResult",
    "ServiceAddress",
    "ServiceInstance",
    "ServiceRegistration",
    "TTLCheck",
    "decode_agent_self",
    "decode_authorize",
    "decode_ca_configuration",
    "decode_ca_roots",
    "decode_catalog_entries",
    "decode_health_entries",
    "decode_intention",
    "decode_intention_check",
    "decode_intention_id",
    "decode_intentions",
    "decode_intentions_match",
    "decode_leaf",
    "decode_prepared_query_result",
    "format_duration",
]

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")


# -- errors -----------------------------------------------------------------
#
# The root of the error family and the shape error live here because the
# decoders raise them; connect_native.consul.client defines the rest of the
# family and re-exports these two.


# -- the answer of a read ---------------------------------------------------


@frozen
class Indexed(Generic[T]):
    """
    One answer from a (possibly blocking) read: the decoded value and the
    query metadata that the blocking loop needs.

    ``index`` is the ``X-Consul-Index`` header, or ``None`` when the endpoint
    sends none (``/v1/connect/intentions/match`` never does).
    """

    value: T
    index: int | None
    known_leader: bool | None = None
    last_contact_ms: int | None = None
    cache_hit: bool | None = None
    age_s: int | None = None


# -- an immutable, hashable mapping ------------------------------------------


class FrozenDict(Mapping[K, V]):
    """
    A read-only mapping that can be hashed, so that records holding maps
    (``Meta``, tagged addresses) stay hashable and comparable.  It compares
    equal to any mapping with the same items.
    """

    __slots__ = ("_data", "_hash")

    def __init__(self, items: Mapping[K, V] | None = None) -> None:
        self._data: dict[K, V] = dict(items) if items is not None else {}
        self._hash: int | None = None

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._data == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"


def _empty_map() -> FrozenDict[str, str]:
    return FrozenDict()


# -- decoding helpers --------------------------------------------------------


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"([Zz]|[+-]\d{2}:\d{2})"
)


def _parse_time(text: str) -> datetime | None:
    """
    Go's RFC 3339 (nanoseconds allowed) to an aware datetime; ``None`` if the
    text is not one.
    """
    m = _RFC3339.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    fraction, offset = m.group(7), m.group(8)
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    if offset in ("Z", "z"):
        tz = timezone.utc
    else:
        sign = -1 if offset[0] == "-" else 1
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError:
        return None


class _Obj:
    """
    One JSON object being decoded, with where it sits in the response so
    that errors can name the field.
    """

    def __init__(self, what: str, value: object, path: str = "") -> None:
        self.what = what
        self.path = path
        if not isinstance(value, dict):
            where = f"field {path!r}" if path else "the response"
            raise ConsulResponseError(
                f"{what}: {where} is {_kind(value)}, expected an object"
            )
        self.data: dict[str, object] = value

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def missing(self, key: str) -> ConsulResponseError:
        return ConsulResponseError(f"{self.what}: field {self._name(key)!r} missing")

    def wrong(self, key: str, value: object, expected: str) -> ConsulResponseError:
        return ConsulResponseError(
            f"{self.what}: field {self._name(key)!r} is {_kind(value)}, "
            f"expected {expected}"
        )

    def _get(self, key: str) -> object:
        if key not in self.data:
            raise self.missing(key)
        return self.data[key]

    def string(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self.wrong(key, value, "a string")
        return value

    def opt_str(self, key: str, default: str = "") -> str:
        """A string that newer agents omit when empty; null reads as empty."""
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.wrong(key, value, "a string")
        return value

    def maybe_str(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.wrong(key, value, "a string")
        return value

    def integer(self, key: str) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.wrong(key, value, "an integer")
        return value

    def opt_int(self, key: str, default: int = 0) -> int:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.wrong(key, value, "an integer")
        return value

    def boolean(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self.wrong(key, value, "a boolean")
        return value

    def opt_bool(self, key: str, default: bool = False) -> bool:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.wrong(key, value, "a boolean")
        return value

    def timestamp(self, key: str) -> datetime:
        text = self.string(key)
        parsed = _parse_time(text)
        if parsed is None:
            raise ConsulResponseError(
                f"{self.what}: field {self._name(key)!r} is {text!r}, "
                "expected an RFC 3339 time"
            )
        return parsed

    def opt_time(self, key: str) -> datetime | None:
        """A time newer agents omit; Go's zero time reads as ``None`` too."""
        text = self.maybe_str(key)
        if not text:
            return None
        parsed = self.timestamp(key)
        return None if parsed.year == 1 else parsed

    def obj(self, key: str) -> _Obj:
        return _Obj(self.what, self._get(key), self._name(key))

    def opt_obj(self, key: str) -> _Obj | None:
        value = self.data.get(key)
        if value is None:
            return None
        return _Obj(self.what, value, self._name(key))

    def items(self, key: str, *, required: bool = True) -> list[tuple[str, object]]:
        """
        The elements of a list with their paths; null is an empty list, and
        so is a missing key when not ``required``.
        """
        value = self._get(key) if required else self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.wrong(key, value, "a list")
        return [(f"{self._name(key)}[{i}]", v) for i, v in enumerate(value)]

    def objs(self, key: str, *, required: bool = True) -> list[_Obj]:
        return [
            _Obj(self.what, v, path) for path, v in self.items(key, required=required)
        ]

    def str_list(self, key: str) -> tuple[str, ...]:
        """A list of strings; null or missing is empty."""
        out = []
        for path, v in self.items(key, required=False):
            if not isinstance(v, str):
                raise ConsulResponseError(
                    f"{self.what}: field {path!r} is {_kind(v)}, expected a string"
                )
            out.append(v)
        return tuple(out)

    def str_map(self, key: str) -> FrozenDict[str, str]:
        """An object of strings (``Meta``); null or missing is empty."""
        value = self.data.get(key)
        if value is None:
            return FrozenDict()
        if not isinstance(value, dict):
            raise self.wrong(key, value, "an object")
        for k, v in value.items():
            if not isinstance(v, str):
                raise ConsulResponseError(
                    f"{self.what}: field {self._name(key) + '.' + k!r} is "
                    f"{_kind(v)}, expected a string"
                )
        return FrozenDict(value)


def _freeze(value: object) -> object:
    """Arbitrary JSON made immutable: objects to FrozenDict, lists to tuples."""
    if isinstance(value, dict):
        return FrozenDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: object) -> object:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_thaw(v) for v in value]
    return value


def _top_list(what: str, value: object) -> list[_Obj]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConsulResponseError(
            f"{what}: the response is {_kind(value)}, expected a list"
        )
    return [_Obj(what, v, f"[{i}]") for i, v in enumerate(value)]


# -- agent self --------------------------------------------------------------


@frozen
class AgentSelf:
    """
    What ``GET /v1/agent/self`` says about the local agent (its ``Config``).
    """

    datacenter: str
    node_name: str
    node_id: str
    server: bool
    version: str
    revision: str = ""
    primary_datacenter: str | None = None


def decode_agent_self(value: object) -> AgentSelf:
    config = _Obj("agent self", value).obj("Config")
    return AgentSelf(
        datacenter=config.string("Datacenter"),
        node_name=config.string("NodeName"),
        node_id=config.opt_str("NodeID"),
        server=config.boolean("Server"),
        version=config.string("Version"),
        revision=config.opt_str("Revision"),
        primary_datacenter=config.maybe_str("PrimaryDatacenter"),
    )


# -- CA roots ----------------------------------------------------------------


@frozen
class CARoot:
    """
    One Connect CA root.  ``serial_number`` is the low 64 bits of the
    certificate's serial (a JSON number); ``intermediate_certs_pem`` holds the
    PEMs (a cross-signed root after a rotation) that leaves signed under this
    root carry in their chain.
    """

    id: str
    name: str
    serial_number: int
    signing_key_id: str
    external_trust_domain: str
    not_before: datetime
    not_after: datetime
    root_cert_pem: str = field(repr=False)
    intermediate_certs_pem: tuple[str, ...] = field(repr=False)
    active: bool
    private_key_type: str
    private_key_bits: int
    create_index: int
    modify_index: int


@frozen
class CARoots:
    """
    All the roots of the Connect CA, active and inactive: a peer's chain must
    be verified against every one of them.
    """

    active_root_id: str
    trust_domain: str
    roots: tuple[CARoot, ...]

    @property
    def active_root(self) -> CARoot | None:
        for root in self.roots:
            if root.active:
                return root
        return None


def _decode_root(root: _Obj) -> CARoot:
    intermediates = []
    for path, pem in root.items("IntermediateCerts", required=False):
        if not isinstance(pem, str):
            raise ConsulResponseError(
                f"{root.what}: field {path!r} is {_kind(pem)}, expected a string"
            )
        intermediates.append(pem)
    return CARoot(
        id=root.string("ID"),
        name=root.opt_str("Name"),
        serial_number=root.integer("SerialNumber"),
        signing_key_id=root.opt_str("SigningKeyID"),
        external_trust_domain=root.opt_str("ExternalTrustDomain"),
        not_before=root.timestamp("NotBefore"),
        not_after=root.timestamp("NotAfter"),
        root_cert_pem=root.string("RootCert"),
        intermediate_certs_pem=tuple(intermediates),
        active=root.boolean("Active"),
        private_key_type=root.opt_str("PrivateKeyType"),
        private_key_bits=root.opt_int("PrivateKeyBits"),
        create_index=root.opt_int("CreateIndex"),
        modify_index=root.opt_int("ModifyIndex"),
    )


def decode_ca_roots(value: object) -> CARoots:
    body = _Obj("ca roots", value)
    return CARoots(
        active_root_id=body.opt_str("ActiveRootID"),
        trust_domain=body.string("TrustDomain"),
        roots=tuple(_decode_root(r) for r in body.objs("Roots", required=False)),
    )


# -- CA configuration ----------------------------------------------------------


def _config_repr(config: Mapping[str, object]) -> str:
    # The configuration may hold the CA's private key in clear (Consul echoes
    # a user-supplied PrivateKey); a repr must never print it.
    return f"<keys {sorted(config)!r}>"


@frozen
class CAConfiguration:
    """
    ``GET /v1/connect/ca/configuration``.  ``config`` is the provider's
    free-form configuration (``LeafCertTTL``, ``RotationPeriod``, possibly a
    ``PrivateKey``), made immutable; its repr lists only the keys.
    """

    provider: str
    config: FrozenDict[str, object] = field(repr=_config_repr)
    force_without_cross_signing: bool = False
    create_index: int = 0
    modify_index: int = 0

    def config_json(self) -> dict[str, object]:
        """The configuration as plain JSON values, e.g. to modify and PUT."""
        thawed = _thaw(self.config)
        assert isinstance(thawed, dict)
        return thawed


def decode_ca_configuration(value: object) -> CAConfiguration:
    body = _Obj("ca configuration", value)
    config = body.opt_obj("Config")
    frozen_config = _freeze(config.data if config is not None else {})
    assert isinstance(frozen_config, FrozenDict)
    return CAConfiguration(
        provider=body.string("Provider"),
        config=frozen_config,
        force_without_cross_signing=body.opt_bool("ForceWithoutCrossSigning"),
        create_index=body.opt_int("CreateIndex"),
        modify_index=body.opt_int("ModifyIndex"),
    )


# -- leaf certificates ---------------------------------------------------------


@frozen
class LeafCert:
    """
    A leaf certificate issued by the agent for ``service``.

    ``serial_number`` is Consul's hex string (``"08"``); ``cert_pem`` may be
    a chain (the leaf followed by intermediates); ``private_key_pem`` is a
    SEC1 EC key and is left out of the repr.
    """

    serial_number: str
    cert_pem: str = field(repr=False)
    private_key_pem: str = field(repr=False)
    service: str
    service_uri: str
    valid_after: datetime
    valid_before: datetime
    create_index: int
    modify_index: int


def decode_leaf(value: object) -> LeafCert:
    body = _Obj("leaf", value)
    return LeafCert(
        serial_number=body.string("SerialNumber"),
        cert_pem=body.string("CertPEM"),
        private_key_pem=body.string("PrivateKeyPEM"),
        service=body.string("Service"),
        service_uri=body.string("ServiceURI"),
        valid_after=body.timestamp("ValidAfter"),
        valid_before=body.timestamp("ValidBefore"),
        create_index=body.integer("CreateIndex"),
        modify_index=body.integer("ModifyIndex"),
    )


# -- authorize -----------------------------------------------------------------


@frozen
class AuthorizeResult:
    """
    The agent's answer to ``POST /v1/agent/connect/authorize``.  ``reason``
    is carried verbatim: its wording changes between Consul versions, so
    nothing may depend on it.
    """

    authorized: bool
    reason: str


def decode_authorize(value: object) -> AuthorizeResult:
    body = _Obj("authorize", value)
    return AuthorizeResult(
        authorized=body.boolean("Authorized"), reason=body.string("Reason")
    )


# -- discovery: health, catalog, prepared queries ------------------------------


@frozen
class Node:
    """
    A Consul node.  ``create_index``/``modify_index`` are ``None`` where the
    answer does not carry the node's own (``/v1/catalog/connect``).
    """

    id: str
    name: str
    address: str
    datacenter: str
    tagged_addresses: FrozenDict[str, str] = field(factory=_empty_map)
    meta: FrozenDict[str, str] = field(factory=_empty_map)
    create_index: int | None = None
    modify_index: int | None = None


@frozen
class ServiceAddress:
    """One entry of a service's ``TaggedAddresses`` (``lan_ipv4``, ...)."""

    address: str
    port: int


@frozen
class ServiceInstance:
    """
    One registered service instance as health and catalog reads show it.

    ``kind`` is ``""`` for a typical service (native instances send no
    ``Kind`` key) and ``"connect-proxy"`` for a sidecar, whose
    ``proxy_destination`` names the service it fronts: a client dials the
    proxy and expects that service's identity.  ``address`` is ``""`` when
    the instance was registered without one: use the node's.
    """

    id: str
    service: str
    kind: str = ""
    address: str = ""
    port: int = 0
    tags: tuple[str, ...] = ()
    meta: FrozenDict[str, str] = field(factory=_empty_map)
    tagged_addresses: FrozenDict[str, ServiceAddress] = field(factory=FrozenDict)
    connect_native: bool = False
    proxy_destination: str | None = None
    proxy_destination_id: str | None = None
    create_index: int = 0
    modify_index: int = 0


@frozen
class HealthCheck:
    """One health check of a node (``serfHealth``) or of a service instance."""

    node: str
    check_id: str
    name: str
    status: str
    notes: str = ""
    output: str = ""
    service_id: str = ""
    service_name: str = ""
    service_tags: tuple[str, ...] = ()
    type: str = ""
    create_index: int = 0
    modify_index: int = 0


@frozen
class HealthEntry:
    """One element of ``/v1/health/connect/<service>``: node, instance, checks."""

    node: Node
    service: ServiceInstance
    checks: tuple[HealthCheck, ...]

    @property
    def address(self) -> str:
        """The address to dial: the instance's, else its node's."""
        return self.service.address or self.node.address

    @property
    def port(self) -> int:
        return self.service.port

    @property
    def connect_service(self) -> str:
        """
        The service whose identity answers at this address: the instance's
        own name if it is native, else the proxy's destination.
        """
        if self.service.kind == "connect-proxy" and self.service.proxy_destination:
            return self.service.proxy_destination
        return self.service.service

    @property
    def passing(self) -> bool:
        """Every check, the node's included, is passing."""
        return all(check.status == "passing" for check in self.checks)


@frozen
class CatalogEntry:
    """One element of ``/v1/catalog/connect/<service>``: no checks there."""

    node: Node
    service: ServiceInstance


def _tagged_service_addresses(obj: _Obj, key: str) -> FrozenDict[str, ServiceAddress]:
    tagged = obj.opt_obj(key)
    if tagged is None:
        return FrozenDict()
    out = {}
    for name in tagged.data:
        entry = tagged.obj(name)
        out[name] = ServiceAddress(
            address=entry.string("Address"), port=entry.opt_int("Port")
        )
    return FrozenDict(out)


def _decode_node(node: _Obj) -> Node:
    return Node(
        id=node.opt_str("ID"),
        name=node.string("Node"),
        address=node.string("Address"),
        datacenter=node.opt_str("Datacenter"),
        tagged_addresses=node.str_map("TaggedAddresses"),
        meta=node.str_map("Meta"),
        create_index=node.opt_int("CreateIndex"),
        modify_index=node.opt_int("ModifyIndex"),
    )


def _proxy_fields(proxy: _Obj | None) -> tuple[str | None, str | None]:
    if proxy is None:
        return None, None
    return proxy.maybe_str("DestinationServiceName") or None, (
        proxy.maybe_str("DestinationServiceID") or None
    )


def _decode_service(service: _Obj) -> ServiceInstance:
    connect = service.opt_obj("Connect")
    destination, destination_id = _proxy_fields(service.opt_obj("Proxy"))
    return ServiceInstance(
        id=service.string("ID"),
        service=service.string("Service"),
        kind=service.opt_str("Kind"),
        address=service.opt_str("Address"),
        port=service.opt_int("Port"),
        tags=service.str_list("Tags"),
        meta=service.str_map("Meta"),
        tagged_addresses=_tagged_service_addresses(service, "TaggedAddresses"),
        connect_native=connect.opt_bool("Native") if connect is not None else False,
        proxy_destination=destination,
        proxy_destination_id=destination_id,
        create_index=service.opt_int("CreateIndex"),
        modify_index=service.opt_int("ModifyIndex"),
    )


def _decode_check(check: _Obj) -> HealthCheck:
    return HealthCheck(
        node=check.opt_str("Node"),
        check_id=check.string("CheckID"),
        name=check.opt_str("Name"),
        status=check.string("Status"),
        notes=check.opt_str("Notes"),
        output=check.opt_str("Output"),
        service_id=check.opt_str("ServiceID"),
        service_name=check.opt_str("ServiceName"),
        service_tags=check.str_list("ServiceTags"),
        type=check.opt_str("Type"),
        create_index=check.opt_int("CreateIndex"),
        modify_index=check.opt_int("ModifyIndex"),
    )


def _decode_health_entry(entry: _Obj) -> HealthEntry:
    return HealthEntry(
        node=_decode_node(entry.obj("Node")),
        service=_decode_service(entry.obj("Service")),
        checks=tuple(_decode_check(c) for c in entry.objs("Checks", required=False)),
    )


def decode_health_entries(
    value: object, what: str = "health/connect"
) -> tuple[HealthEntry, ...]:
    return tuple(_decode_health_entry(e) for e in _top_list(what, value))


def _decode_catalog_entry(entry: _Obj) -> CatalogEntry:
    connect = entry.opt_obj("ServiceConnect")
    destination, destination_id = _proxy_fields(entry.opt_obj("ServiceProxy"))
    node = Node(
        id=entry.opt_str("ID"),
        name=entry.string("Node"),
        address=entry.string("Address"),
        datacenter=entry.opt_str("Datacenter"),
        tagged_addresses=entry.str_map("TaggedAddresses"),
        meta=entry.str_map("NodeMeta"),
    )
    service = ServiceInstance(
        id=entry.string("ServiceID"),
        service=entry.string("ServiceName"),
        kind=entry.opt_str("ServiceKind"),
        address=entry.opt_str("ServiceAddress"),
        port=entry.opt_int("ServicePort"),
        tags=entry.str_list("ServiceTags"),
        meta=entry.str_map("ServiceMeta"),
        tagged_addresses=_tagged_service_addresses(entry, "ServiceTaggedAddresses"),
        connect_native=connect.opt_bool("Native") if connect is not None else False,
        proxy_destination=destination,
        proxy_destination_id=destination_id,
        create_index=entry.opt_int("CreateIndex"),
        modify_index=entry.opt_int("ModifyIndex"),
    )
    return CatalogEntry(node=node, service=service)


def decode_catalog_entries(value: object) -> tuple[CatalogEntry, ...]:
    return tuple(_decode_catalog_entry(e) for e in _top_list("catalog/connect", value))


@frozen
class PreparedQueryResult:
    """
    ``GET /v1/query/<id-or-name>/execute``: the instances (critical ones
    already removed, order shuffled by the agent) and where they came from.
    """

    service: str
    nodes: tuple[HealthEntry, ...]
    datacenter: str
    dns_ttl: str = ""
    failovers: int = 0


def decode_prepared_query_result(value: object) -> PreparedQueryResult:
    body = _Obj("prepared query", value)
    dns = body.opt_obj("DNS")
    return PreparedQueryResult(
        service=body.string("Service"),
        nodes=tuple(
            _decode_health_entry(e) for e in body.objs("Nodes", required=False)
        ),
        datacenter=body.opt_str("Datacenter"),
        dns_ttl=dns.opt_str("TTL") if dns is not None else "",
        failovers=body.opt_int("Failovers"),
    )


# -- intentions ----------------------------------------------------------------


@frozen
class IntentionHTTPHeaderPermission:
    """One header rule of an L7 permission (Consul 1.9+)."""

    name: str
    present: bool = False
    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    contains: str | None = None
    regex: str | None = None
    invert: bool = False
    ignore_case: bool = False


@frozen
class IntentionHTTPPermission:
    """The HTTP match of an L7 permission (Consul 1.9+)."""

    path_exact: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    headers: tuple[IntentionHTTPHeaderPermission, ...] = ()
    methods: tuple[str, ...] = ()


@frozen
class IntentionPermission:
    """One L7 permission: ``action`` applies to requests that match ``http``."""

    action: str
    http: IntentionHTTPPermission | None = None


@frozen
class Intention:
    """
    One intention, as ``/v1/connect/intentions`` and ``/match`` show it.

    ``id`` is ``None`` for config-entry intentions (Consul 1.9+), which also
    have no ``created_at``/``updated_at``; ``action`` is ``None`` for an L7
    intention, whose ``permissions`` decide instead.
    """

    source_ns: str
    source_name: str
    destination_ns: str
    destination_name: str
    source_type: str
    precedence: int
    action: str | None = None
    permissions: tuple[IntentionPermission, ...] = ()
    id: str | None = None
    description: str = ""
    source_partition: str | None = None
    destination_partition: str | None = None
    source_peer: str | None = None
    source_sameness_group: str | None = None
    meta: FrozenDict[str, str] = field(factory=_empty_map)
    default_addr: str = ""
    default_port: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    hash: str = ""
    create_index: int = 0
    modify_index: int = 0


def _decode_header_permission(header: _Obj) -> IntentionHTTPHeaderPermission:
    return IntentionHTTPHeaderPermission(
        name=header.string("Name"),
        present=header.opt_bool("Present"),
        exact=header.maybe_str("Exact"),
        prefix=header.maybe_str("Prefix"),
        suffix=header.maybe_str("Suffix"),
        contains=header.maybe_str("Contains"),
        regex=header.maybe_str("Regex"),
        invert=header.opt_bool("Invert"),
        ignore_case=header.opt_bool("IgnoreCase"),
    )


def _decode_permission(permission: _Obj) -> IntentionPermission:
    http = permission.opt_obj("HTTP")
    decoded_http = None
    if http is not None:
        decoded_http = IntentionHTTPPermission(
            path_exact=http.maybe_str("PathExact"),
            path_prefix=http.maybe_str("PathPrefix"),
            path_regex=http.maybe_str("PathRegex"),
            headers=tuple(
                _decode_header_permission(h)
                for h in http.objs("Header", required=False)
            ),
            methods=http.str_list("Methods"),
        )
    return IntentionPermission(action=permission.string("Action"), http=decoded_http)


def _decode_intention(ixn: _Obj) -> Intention:
    action = ixn.maybe_str("Action") or None
    permissions = tuple(
        _decode_permission(p) for p in ixn.objs("Permissions", required=False)
    )
    if action is None and not permissions:
        raise ConsulResponseError(
            f"{ixn.what}: field {ixn._name('Action')!r} missing "
            "(an intention needs an Action or Permissions)"
        )
    return Intention(
        id=ixn.maybe_str("ID") or None,
        description=ixn.opt_str("Description"),
        source_ns=ixn.opt_str("SourceNS", "default"),
        source_name=ixn.string("SourceName"),
        destination_ns=ixn.opt_str("DestinationNS", "default"),
        destination_name=ixn.string("DestinationName"),
        source_partition=ixn.maybe_str("SourcePartition") or None,
        destination_partition=ixn.maybe_str("DestinationPartition") or None,
        source_peer=ixn.maybe_str("SourcePeer") or None,
        source_sameness_group=ixn.maybe_str("SourceSamenessGroup") or None,
        source_type=ixn.opt_str("SourceType", "consul"),
        action=action,
        permissions=permissions,
        default_addr=ixn.opt_str("DefaultAddr"),
        default_port=ixn.opt_int("DefaultPort"),
        meta=ixn.str_map("Meta"),
        precedence=ixn.integer("Precedence"),
        created_at=ixn.opt_time("CreatedAt"),
        updated_at=ixn.opt_time("UpdatedAt"),
        hash=ixn.opt_str("Hash"),
        create_index=ixn.opt_int("CreateIndex"),
        modify_index=ixn.opt_int("ModifyIndex"),
    )


def decode_intention(value: object) -> Intention:
    return _decode_intention(_Obj("intention", value))


def decode_intentions(value: object) -> tuple[Intention, ...]:
    return tuple(_decode_intention(i) for i in _top_list("intentions", value))


def decode_intentions_match(value: object) -> FrozenDict[str, tuple[Intention, ...]]:
    """
    ``{name: [intention, ...]}`` keyed by the literal names asked for; a
    name with no match may come back as ``null`` and reads as empty.
    """
    body = _Obj("intentions match", value)
    return FrozenDict(
        {
            name: tuple(_decode_intention(i) for i in body.objs(name))
            for name in body.data
        }
    )


def decode_intention_check(value: object) -> bool:
    return _Obj("intentions check", value).boolean("Allowed")


def decode_intention_id(value: object) -> str:
    return _Obj("intention create", value).string("ID")


# -- registration (request bodies) ---------------------------------------------

_CHECK_STATUSES = ("passing", "warning", "critical")


def positive_seconds(what: str, value: object) -> float:
    """
    ``value`` as a float if it is a finite number of seconds > 0 (a timeout,
    an interval, a lifetime); a :class:`ValueError` naming ``what``
    otherwise.  Every module's settings use this one check, so they all
    refuse alike and word the error alike.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(
            f"{what} must be a finite number of seconds > 0, not {value!r}"
        )
    return float(value)


def seconds_or_zero(what: str, value: object) -> float:
    """
    :func:`positive_seconds`, with 0 allowed too (a bound where 0 means
    "never": never reuse, never serve stale); the error says ``>= 0``.
    """
    if not isinstance(value, bool) and isinstance(value, int | float) and value == 0:
        return 0.0
    try:
        return positive_seconds(what, value)
    except ValueError:
        raise ValueError(
            f"{what} must be a finite number of seconds >= 0, not {value!r}"
        ) from None


def whole_number(what: str, value: object, minimum: int, unit: str = "") -> int:
    """
    ``value`` if it is an ``int`` (not a bool) of at least ``minimum``; a
    :class:`ValueError` naming ``what`` (and the ``unit``, e.g. "bytes")
    otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        of = f" of {unit}" if unit else ""
        raise ValueError(
            f"{what} must be a whole number{of} >= {minimum}, not {value!r}"
        )
    return value


def format_duration(seconds: float, what: str = "duration") -> str:
    """
    Seconds as a Go duration string, as the agent parses them: whole seconds
    as ``"15s"``, anything finer in milliseconds (``"1500ms"``, what Consul's
    own Go client sends).
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"{what} must be a number of seconds, got {seconds!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(
            f"{what} must be a finite number of seconds > 0, got {seconds!r}"
        )
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    millis = round(seconds * 1000)
    if millis < 1:
        raise ValueError(f"{what} must be at least 1 millisecond, got {seconds!r}")
    return f"{millis}ms"


def _check_status(status: str | None) -> str | None:
    if status is not None and status not in _CHECK_STATUSES:
        raise ValueError(
            f"check status must be one of {', '.join(_CHECK_STATUSES)}, got {status!r}"
        )
    return status


def _seconds(instance: object, attribute: object, value: float) -> None:
    format_duration(value, getattr(attribute, "name", "duration"))


def _optional_seconds(instance: object, attribute: object, value: float | None) -> None:
    if value is not None:
        format_duration(value, getattr(attribute, "name", "duration"))


@frozen
class TTLCheck:
    """
    A TTL check to register with a service: the application reports its
    health with ``check_pass``/``check_warn``/``check_fail`` at least every
    ``ttl`` seconds.  Without a ``status`` the agent starts it critical.
    """

    ttl: float = field(validator=_seconds)
    check_id: str | None = None
    name: str | None = None
    status: str | None = field(default=None, converter=_check_status)
    notes: str | None = None
    deregister_critical_service_after: float | None = field(
        default=None, validator=_optional_seconds
    )

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"TTL": format_duration(self.ttl, "ttl")}
        if self.check_id is not None:
            body["CheckID"] = self.check_id
        if self.name is not None:
            body["Name"] = self.name
        if self.status is not None:
            body["Status"] = self.status
        if self.notes is not None:
            body["Notes"] = self.notes
        if self.deregister_critical_service_after is not None:
            body["DeregisterCriticalServiceAfter"] = format_duration(
                self.deregister_critical_service_after,
                "deregister_critical_service_after",
            )
        return body


def _service_name(instance: object, attribute: object, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"a service registration needs a non-empty name, got {value!r}"
        )


def _port(instance: object, attribute: object, value: int | None) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536
    ):
        raise ValueError(f"port must be an integer from 1 to 65535, got {value!r}")


def _str_map(value: Mapping[str, str] | None) -> FrozenDict[str, str]:
    return FrozenDict(value or {})


def _str_tuple(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


def _check_tuple(values: Iterable[TTLCheck]) -> tuple[TTLCheck, ...]:
    return tuple(values)


@frozen
class ServiceRegistration:
    """
    A service to register with the local agent (``PUT
    /v1/agent/service/register``), Connect native by default.

    The agent rejects a native service without a port.  ``id`` defaults (on
    the agent) to ``name``.
    """

    name: str = field(validator=_service_name)
    port: int | None = field(default=None, validator=_port)
    id: str | None = None
    address: str | None = None
    tags: tuple[str, ...] = field(default=(), converter=_str_tuple)
    meta: FrozenDict[str, str] = field(factory=_empty_map, converter=_str_map)
    connect_native: bool = True
    checks: tuple[TTLCheck, ...] = field(default=(), converter=_check_tuple)

    def to_json(self) -> dict[str, object]:
        """The JSON body the agent expects (it rejects unknown fields)."""
        body: dict[str, object] = {"Name": self.name}
        if self.id is not None:
            body["ID"] = self.id
        if self.port is not None:
            body["Port"] = self.port
        if self.address is not None:
            body["Address"] = self.address
        if self.tags:
            body["Tags"] = list(self.tags)
        if self.meta:
            body["Meta"] = dict(self.meta)
        if self.connect_native:
            body["Connect"] = {"Native": True}
        if self.checks:
            body["Checks"] = [check.to_json() for check in self.checks]
        return body
