"""
The health table: the node, its serf check, and the health and catalog reads
of the services the catalog table holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from connect_native.devagent.store import Settings, Store
from connect_native.devagent.tables.acl_rules import Authorizer
from connect_native.devagent.tables.catalog import CatalogTable
from connect_native.devagent.tables.catalog_records import HEALTH_PASSING, StoredService


class HealthTable:
    """
    The reads of the catalog: ``/v1/health/(service|connect)`` and
    ``/v1/catalog/(service|connect)`` with their per-name indexes, the node
    and its serf check.
    """

    def __init__(
        self,
        store: Store,
        settings: Settings,
        catalog_table: CatalogTable,
        *,
        node_create_index: int,
        node_modify_index: int,
        serf_index: int,
    ) -> None:
        self.store = store
        self.settings = settings
        self.catalog_table = catalog_table
        self._node_create_index = node_create_index
        self._node_modify_index = node_modify_index
        self._serf_index = serf_index

    def node_tagged_addresses(self) -> dict[str, str]:
        address = self.settings.node_address
        return {
            "lan": address,
            "lan_ipv4": address,
            "wan": address,
            "wan_ipv4": address,
        }

    def node_json(self) -> dict[str, Any]:
        """This agent's node, as ``/v1/catalog/nodes`` lists it."""
        return self._node_json()

    @property
    def node_index(self) -> int:
        """The index of the node's last change."""
        return self._node_modify_index

    def _node_json(self) -> dict[str, Any]:
        return {
            "ID": self.settings.node_id,
            "Node": self.settings.node_name,
            "Address": self.settings.node_address,
            "Datacenter": self.settings.datacenter,
            "TaggedAddresses": self.node_tagged_addresses(),
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": self._node_create_index,
            "ModifyIndex": self._node_modify_index,
        }

    def _serf_check_json(self) -> dict[str, Any]:
        return {
            "Node": self.settings.node_name,
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": HEALTH_PASSING,
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "Definition": {},
            "CreateIndex": self._serf_index,
            "ModifyIndex": self._serf_index,
        }

    def health_index(self, name: str, *, connect: bool) -> int:
        """
        The ``X-Consul-Index`` of ``/v1/health/(service|connect)/<name>``:
        per service name, so unrelated services never move it.
        """
        lower = name.lower()
        instances = self._health_instances(name, connect=connect)
        if not instances:
            return max(self.catalog_table.table_index, 1)
        index = self.catalog_table.service_indexes.get(lower, 0)
        if connect:
            index = max(index, self.catalog_table.connect_indexes.get(lower, 0))
        return max(index, 1)

    def _health_instances(self, name: str, *, connect: bool) -> list[StoredService]:
        lower = name.lower()
        if connect:
            found = [
                s
                for s in self.catalog_table.services.values()
                if s.connect_name is not None and s.connect_name.lower() == lower
            ]
        else:
            found = [
                s
                for s in self.catalog_table.services.values()
                if s.name.lower() == lower
            ]
        return sorted(found, key=lambda s: s.id)

    def health(
        self,
        name: str,
        *,
        connect: bool,
        passing: bool = False,
        tags: Sequence[str] = (),
        node_meta: Mapping[str, str] | None = None,
        authz: Authorizer | None = None,
    ) -> list[dict[str, Any]]:
        """
        ``GET /v1/health/(service|connect)/<name>``: for ``connect``, the
        Connect-native instances of ``name`` and the proxies whose
        destination it is; with ACLs on, only the instances whose node and
        service the token may read.
        """
        if authz is not None and not authz.node_read(self.settings.node_name):
            return []
        if node_meta:
            ours = {"consul-network-segment": ""}
            if any(ours.get(k) != v for k, v in node_meta.items()):
                return []
        wanted_tags = [t.lower() for t in tags]
        out = []
        for service in self._health_instances(name, connect=connect):
            service_tags = [t.lower() for t in service.tags]
            if any(t not in service_tags for t in wanted_tags):
                continue
            if authz is not None and not authz.service_read(service.name):
                continue
            checks = [self._serf_check_json()] + [
                c.to_json(self.settings.node_name, catalog=True)
                for c in sorted(
                    self.catalog_table.checks.values(), key=lambda c: c.check_id
                )
                if c.service_id == service.id
            ]
            if passing and any(c["Status"] != HEALTH_PASSING for c in checks):
                continue
            out.append(
                {
                    "Node": self._node_json(),
                    "Service": service.catalog_json(),
                    "Checks": checks,
                }
            )
        return out

    def catalog_index(self, name: str) -> int:
        """
        The ``X-Consul-Index`` of ``/v1/catalog/(service|connect)/<name>``:
        the service name's own index (1.8.7 does not count the proxies in,
        unlike health).
        """
        index = self.catalog_table.service_indexes.get(name.lower())
        if index is None or not self._health_instances(name, connect=False):
            return max(self.catalog_table.table_index, 1)
        return index

    def catalog(
        self,
        name: str,
        *,
        connect: bool,
        tags: Sequence[str] = (),
        node_meta: Mapping[str, str] | None = None,
        authz: Authorizer | None = None,
    ) -> list[dict[str, Any]]:
        """
        ``GET /v1/catalog/(service|connect)/<name>``: the flat
        ``ServiceNode`` form of the same instances as health.
        """
        out = []
        for entry in self.health(
            name, connect=connect, tags=tags, node_meta=node_meta, authz=authz
        ):
            node, service = entry["Node"], entry["Service"]
            flat: dict[str, Any] = {
                "ID": node["ID"],
                "Node": node["Node"],
                "Address": node["Address"],
                "Datacenter": node["Datacenter"],
                "TaggedAddresses": node["TaggedAddresses"],
                "NodeMeta": node["Meta"],
                "ServiceKind": service.get("Kind", ""),
                "ServiceID": service["ID"],
                "ServiceName": service["Service"],
                "ServiceTags": service["Tags"],
                "ServiceAddress": service["Address"],
            }
            if "TaggedAddresses" in service:
                flat["ServiceTaggedAddresses"] = service["TaggedAddresses"]
            flat.update(
                {
                    "ServiceWeights": service["Weights"],
                    "ServiceMeta": service["Meta"] or {},
                    "ServicePort": service["Port"],
                    "ServiceEnableTagOverride": service["EnableTagOverride"],
                    "ServiceProxy": service["Proxy"],
                    "ServiceConnect": service["Connect"],
                    "CreateIndex": service["CreateIndex"],
                    "ModifyIndex": service["ModifyIndex"],
                }
            )
            out.append(flat)
        return out
