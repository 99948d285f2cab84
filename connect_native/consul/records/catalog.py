"""
Discovery: the nodes, service instances and health checks of
``/v1/health/connect/<service>`` and ``/v1/catalog/connect/<service>``.
"""

from __future__ import annotations

from attrs import field, frozen

from connect_native.consul.records._base import (
    FrozenDict,
    JSONObject,
    empty_map,
    top_list,
)

__all__ = [
    "CatalogEntry",
    "HealthCheck",
    "HealthEntry",
    "Node",
    "ServiceAddress",
    "ServiceInstance",
    "decode_catalog_entries",
    "decode_health_entries",
]


# -- discovery: health and catalog -------------------------------------------


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
    tagged_addresses: FrozenDict[str, str] = field(factory=empty_map)
    meta: FrozenDict[str, str] = field(factory=empty_map)
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
    meta: FrozenDict[str, str] = field(factory=empty_map)
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


def _tagged_service_addresses(
    obj: JSONObject, key: str
) -> FrozenDict[str, ServiceAddress]:
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


def _decode_node(node: JSONObject) -> Node:
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


def _proxy_fields(proxy: JSONObject | None) -> tuple[str | None, str | None]:
    if proxy is None:
        return None, None
    return proxy.maybe_str("DestinationServiceName") or None, (
        proxy.maybe_str("DestinationServiceID") or None
    )


def _decode_service(service: JSONObject) -> ServiceInstance:
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


def _decode_check(check: JSONObject) -> HealthCheck:
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


def decode_health_entry(entry: JSONObject) -> HealthEntry:
    return HealthEntry(
        node=_decode_node(entry.obj("Node")),
        service=_decode_service(entry.obj("Service")),
        checks=tuple(_decode_check(c) for c in entry.objs("Checks", required=False)),
    )


def decode_health_entries(
    value: object, what: str = "health/connect"
) -> tuple[HealthEntry, ...]:
    return tuple(decode_health_entry(e) for e in top_list(what, value))


def _decode_catalog_entry(entry: JSONObject) -> CatalogEntry:
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
    return tuple(_decode_catalog_entry(e) for e in top_list("catalog/connect", value))
