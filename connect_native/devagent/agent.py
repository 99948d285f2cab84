"""
The development agent: :class:`DevAgent` composes the tables (catalog,
health, intentions, config entries, prepared queries, ACLs, the Connect CA
with the leaf cache) over one :class:`~connect_native.devagent.store.Store`,
and answers ``/v1/agent/self``.  Its methods are the operations the HTTP API
(:mod:`connect_native.devagent.http`, which sits above it) calls.

The reference is ``REAL-BEHAVIOUR.md`` (measured on Consul 1.8.7) and the
captures in ``tests/fixtures/real-1.8.7/``; where those say nothing, Consul's
source (agent cache, leaf cache type, state store) is followed.  Known
differences are listed in ``docs/devagent.rst``.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import IResource

from connect_native.devagent.ca import DevCA
from connect_native.devagent.gocompat import format_go_duration
from connect_native.devagent.store import (
    CONSUL_VERSION,
    Settings,
    Store,
    parse_version,
    random_uuid,
)
from connect_native.devagent.tables.acl import AclTable
from connect_native.devagent.tables.acl_rules import Authorizer
from connect_native.devagent.tables.catalog import CatalogTable
from connect_native.devagent.tables.catalog_records import (
    CHECK_OUTPUT_MAX_SIZE,
    CHECK_UPDATE_INTERVAL,
    SIDECAR_MAX_PORT,
    SIDECAR_MIN_PORT,
    CheckDefinition,
    ServiceDefinition,
)
from connect_native.devagent.tables.config_entries import ConfigEntriesTable
from connect_native.devagent.tables.connect_ca import (
    CAConfigInput,
    ConnectCA,
    LeafAnswer,
)
from connect_native.devagent.tables.health import HealthTable
from connect_native.devagent.tables.intentions import IntentionInput, IntentionsTable
from connect_native.devagent.tables.queries import QueriesTable, QueryInput


class DevAgent:
    """
    A Consul 1.8.7-compatible agent in memory, with ACLs off unless asked.

    :param clock: all time comes from it; a test ``Clock`` should start at
        the wall-clock time, since certificate validity is checked by OpenSSL
        against it.
    :param datacenter: the agent's datacenter.
    :param node_name: the node this agent is (``Node`` in health results).
    :param rng: all randomness (IDs, jitter, renewal points); a seeded
        ``random.Random`` makes a test repeatable.
    :param ca: the certificate authority; by default a new
        :class:`~connect_native.devagent.ca.DevCA`.
    :param acl_default_policy: ``None`` (the default) for ACLs off, as a
        ``-dev`` agent; ``"allow"`` or ``"deny"`` turns ACLs on with that
        default policy.
    :param version: the Consul version to behave as: ``"1.8.7"`` (the
        default, compared with a real agent) or a later one such as
        ``"1.10.0"``, which adds the 1.9+ API layer (exact intentions,
        ``service-intentions`` config entries with L7 permissions, the OSS
        400 for namespaces on intention endpoints), written from Consul's
        source and not compared with a real agent.
    :param master_token: with ACLs on, the token that may do anything
        (``acl.tokens.master``); it creates policies and tokens through
        ``/v1/acl/policy`` and ``/v1/acl/token``.

    :meth:`resource` is the HTTP API as a ``twisted.web`` resource.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        datacenter: str = "dc1",
        node_name: str = "devagent",
        rng: random.Random | None = None,
        ca: DevCA | None = None,
        acl_default_policy: str | None = None,
        master_token: str | None = None,
        version: str = CONSUL_VERSION,
    ) -> None:
        parsed_version = parse_version(version)
        if parsed_version is None or parsed_version < (1, 8, 7):
            raise ValueError(
                f"version must be a Consul version from 1.8.7 on, such as '1.8.7' "
                f"or '1.10.0', not {version!r}"
            )
        if acl_default_policy not in (None, "allow", "deny"):
            raise ValueError(
                "acl_default_policy must be None (ACLs off), 'allow' or 'deny', "
                f"not {acl_default_policy!r}"
            )
        if master_token is not None and (
            acl_default_policy is None
            or not isinstance(master_token, str)
            or not master_token
        ):
            raise ValueError(
                "master_token must be a non-empty str, and needs ACLs on "
                "(acl_default_policy='allow' or 'deny')"
            )
        if not isinstance(datacenter, str) or not datacenter or "/" in datacenter:
            raise ValueError(
                f"datacenter must be a non-empty name without '/', not {datacenter!r}"
            )
        if not isinstance(node_name, str) or not node_name:
            raise ValueError(f"node_name must be a non-empty str, not {node_name!r}")
        self.store = Store(clock, secrets.SystemRandom() if rng is None else rng)
        self.settings = Settings(
            datacenter=datacenter,
            node_name=node_name,
            node_id=random_uuid(self.store.rng),
            node_address="127.0.0.1",
            version=version,
            version_info=parsed_version,
            newer_api=parsed_version >= (1, 9, 0),
            acl_default_policy=acl_default_policy,
        )
        # The port it is served on, as agent/self reports it; whoever listens
        # sets it.
        self.http_port = 8500

        # Indexes as a fresh `consul agent -dev` has them: CA configuration
        # at 5, the first root at 9, the node at 10/11, 12 applied.
        self.ca_table = ConnectCA(self.store, self.settings, ca)
        self.store.index = 12
        self.catalog_table = CatalogTable(self.store, self.settings, table_index=11)
        self.health_table = HealthTable(
            self.store,
            self.settings,
            self.catalog_table,
            node_create_index=10,
            node_modify_index=11,
            serf_index=10,
        )
        self.intentions_table = IntentionsTable(self.store, self.settings)
        self.config_table = ConfigEntriesTable(
            self.store, self.settings, self.intentions_table
        )
        self.acl_table = AclTable(self.store, self.settings, master_token)
        self.queries_table = QueriesTable(
            self.store, self.settings, self.acl_table, self.health_table
        )

    # ----------------------------------------------------------------------
    # what the agent is

    @property
    def clock(self) -> IReactorTime:
        return self.store.clock

    @property
    def rng(self) -> random.Random:
        return self.store.rng

    @property
    def index(self) -> int:
        """
        The last raft index applied.
        """
        return self.store.index

    @property
    def ca(self) -> DevCA:
        return self.ca_table.ca

    @property
    def version(self) -> str:
        return self.settings.version

    @property
    def newer_api(self) -> bool:
        return self.settings.newer_api

    @property
    def datacenter(self) -> str:
        return self.settings.datacenter

    @property
    def node_name(self) -> str:
        return self.settings.node_name

    @property
    def node_id(self) -> str:
        return self.settings.node_id

    @property
    def node_address(self) -> str:
        return self.settings.node_address

    @property
    def acl_default_policy(self) -> str | None:
        return self.settings.acl_default_policy

    # ----------------------------------------------------------------------
    # agent/self

    def agent_self(self) -> dict[str, Any]:
        """
        ``GET /v1/agent/self``: the sections real Consul sends, with the
        configuration that matters to clients (``DebugConfig`` is a subset).
        """
        node_tags = {
            "acls": "0",
            "build": f"{self.settings.version}:",
            "dc": self.settings.datacenter,
            "ft_fs": "1",
            "id": self.settings.node_id,
            "port": "8300",
            "raft_vsn": "3",
            "role": "consul",
            "segment": "",
            "vsn": "2",
            "vsn_max": "3",
            "vsn_min": "2",
            "wan_join_port": "8302",
        }
        index = str(self.store.index)
        ttl_checks = sum(1 for c in self.catalog_table.checks.values() if c.is_ttl)
        return {
            "Config": {
                "Datacenter": self.settings.datacenter,
                "NodeName": self.settings.node_name,
                "NodeID": self.settings.node_id,
                "Revision": "",
                "Server": True,
                "Version": self.settings.version,
            },
            "DebugConfig": self._debug_config(),
            "Coord": {
                "Vec": [0, 0, 0, 0, 0, 0, 0, 0],
                "Error": 1.5,
                "Adjustment": 0,
                "Height": 0.00001,
            },
            "Member": {
                "Name": self.settings.node_name,
                "Addr": self.settings.node_address,
                "Port": 8301,
                "Tags": node_tags,
                "Status": 1,
                "ProtocolMin": 1,
                "ProtocolMax": 5,
                "ProtocolCur": 2,
                "DelegateMin": 2,
                "DelegateMax": 5,
                "DelegateCur": 4,
            },
            "Stats": {
                "agent": {
                    "check_monitors": "0",
                    "check_ttls": str(ttl_checks),
                    "checks": str(len(self.catalog_table.checks)),
                    "services": str(len(self.catalog_table.services)),
                },
                "build": {
                    "prerelease": "",
                    "revision": "",
                    "version": self.settings.version,
                },
                "consul": {
                    "acl": "disabled",
                    "bootstrap": "false",
                    "known_datacenters": "1",
                    "leader": "true",
                    "leader_addr": f"{self.settings.node_address}:8300",
                    "server": "true",
                },
                "raft": {
                    "applied_index": index,
                    "commit_index": index,
                    "fsm_pending": "0",
                    "last_contact": "0",
                    "last_log_index": index,
                    "last_log_term": "2",
                    "last_snapshot_index": "0",
                    "last_snapshot_term": "0",
                    "num_peers": "0",
                    "protocol_version": "3",
                    "protocol_version_max": "3",
                    "protocol_version_min": "0",
                    "snapshot_version_max": "1",
                    "snapshot_version_min": "0",
                    "state": "Leader",
                    "term": "2",
                },
                "runtime": {
                    "arch": "amd64",
                    "cpu_count": "1",
                    "goroutines": "1",
                    "max_procs": "1",
                    "os": "linux",
                    "version": "go1.15.9",
                },
                "serf_lan": serf_stats(),
                "serf_wan": serf_stats(),
            },
            "Meta": {"consul-network-segment": ""},
            "xDS": {
                "SupportedProxies": {"envoy": ["1.14.5", "1.13.6", "1.12.7", "1.11.2"]}
            },
        }

    def _debug_config(self) -> dict[str, Any]:
        address = self.settings.node_address
        return {
            "ACLDatacenter": self.settings.datacenter,
            "ACLDefaultPolicy": self.settings.acl_default_policy or "allow",
            "ACLsEnabled": self.settings.acl_default_policy is not None,
            "AdvertiseAddrLAN": address,
            "AdvertiseAddrWAN": address,
            "BindAddr": address,
            "Cache": {
                "EntryFetchMaxBurst": 2,
                "EntryFetchRate": 1.7976931348623157e308,
            },
            "CheckOutputMaxSize": CHECK_OUTPUT_MAX_SIZE,
            "CheckUpdateInterval": format_go_duration(int(CHECK_UPDATE_INTERVAL * 1e9)),
            "ClientAddrs": [address],
            "ConnectCAConfig": {},
            "ConnectCAProvider": "",
            "ConnectEnabled": True,
            "ConnectSidecarMaxPort": SIDECAR_MAX_PORT,
            "ConnectSidecarMinPort": SIDECAR_MIN_PORT,
            "ConnectTestCALeafRootChangeSpread": "0s",
            "DNSDomain": "consul.",
            "Datacenter": self.settings.datacenter,
            "DefaultQueryTime": "5m0s",
            "DevMode": True,
            "HTTPAddrs": [f"tcp://{address}:{self.http_port}"],
            "HTTPPort": self.http_port,
            "HTTPUseCache": True,
            "MaxQueryTime": "10m0s",
            "NodeID": self.settings.node_id,
            "NodeMeta": {},
            "NodeName": self.settings.node_name,
            "PrimaryDatacenter": self.settings.datacenter,
            "Revision": "",
            "ServerMode": True,
            "TaggedAddresses": self.health_table.node_tagged_addresses(),
            "Version": self.settings.version,
            "VersionPrerelease": "",
        }

    # ----------------------------------------------------------------------
    # HTTP

    def resource(self) -> IResource:
        """
        The agent's HTTP API as a ``twisted.web`` ``IResource``.

        The HTTP layer sits above the agent and registers itself as the
        agent's ``IResource`` adapter (the package imports it), so the state
        never imports its own HTTP API.
        """
        return IResource(self)

    # ----------------------------------------------------------------------
    # blocking waits and the agent cache (Store)

    def now(self) -> float:
        return self.store.now()

    def wait_until(
        self, ready: Callable[[], bool], timeout: float | None
    ) -> Deferred[bool]:
        return self.store.wait_until(ready, timeout)

    def cache_lookup(self, key: tuple[Any, ...]) -> bool:
        return self.store.cache_lookup(key)

    # ----------------------------------------------------------------------
    # CA roots and configuration, leaf certificates (ConnectCA)

    @property
    def roots_index(self) -> int:
        return self.ca_table.roots_index

    def roots_json(self) -> dict[str, Any]:
        return self.ca_table.roots_json()

    def roots_cache_lookup(self) -> bool:
        return self.ca_table.roots_cache_lookup()

    def ca_config_json(self) -> dict[str, Any]:
        return self.ca_table.ca_config_json()

    def set_ca_config(self, request: CAConfigInput) -> None:
        self.ca_table.set_ca_config(request)

    def leaf(
        self,
        service: str,
        *,
        min_index: int = 0,
        wait: float | None = None,
        datacenter: str | None = None,
    ) -> Deferred[LeafAnswer]:
        return self.ca_table.leaf(
            service, min_index=min_index, wait=wait, datacenter=datacenter
        )

    # ----------------------------------------------------------------------
    # ACLs (AclTable)

    @property
    def acls_enabled(self) -> bool:
        return self.acl_table.acls_enabled

    def resolve_token(self, token: str) -> Authorizer | None:
        return self.acl_table.resolve_token(token)

    def acl_policy_create(
        self,
        authz: Authorizer | None,
        *,
        name: str,
        description: str,
        rules: str,
    ) -> dict[str, Any]:
        return self.acl_table.acl_policy_create(
            authz, name=name, description=description, rules=rules
        )

    def acl_token_create(
        self,
        authz: Authorizer | None,
        *,
        description: str,
        accessor_id: str,
        secret_id: str,
        policies: Sequence[tuple[str, str]],
        local: bool,
        service_identities: Sequence[str] = (),
    ) -> dict[str, Any]:
        return self.acl_table.acl_token_create(
            authz,
            description=description,
            accessor_id=accessor_id,
            secret_id=secret_id,
            policies=policies,
            local=local,
            service_identities=service_identities,
        )

    # ----------------------------------------------------------------------
    # intentions and authorize (IntentionsTable)

    def authorize(
        self, target: str, client_cert_uri: str, authz: Authorizer | None = None
    ) -> tuple[bool, str, bool]:
        return self.intentions_table.authorize(target, client_cert_uri, authz)

    @property
    def intentions_index(self) -> int:
        return self.intentions_table.intentions_index

    def intentions_list(self, authz: Authorizer | None = None) -> list[dict[str, Any]]:
        return self.intentions_table.intentions_list(authz)

    def intentions_match(
        self, by: str, names: Sequence[str], authz: Authorizer | None = None
    ) -> dict[str, list[dict[str, Any]] | None]:
        return self.intentions_table.intentions_match(by, names, authz)

    def intentions_check(
        self,
        source: str,
        destination: str,
        source_type: str,
        authz: Authorizer | None = None,
    ) -> bool:
        return self.intentions_table.intentions_check(
            source, destination, source_type, authz
        )

    def intention_get(
        self, intention_id: str, authz: Authorizer | None = None
    ) -> dict[str, Any]:
        return self.intentions_table.intention_get(intention_id, authz)

    def intention_create(
        self, given: IntentionInput, authz: Authorizer | None = None
    ) -> str:
        return self.intentions_table.intention_create(given, authz)

    def intention_update(
        self, intention_id: str, given: IntentionInput, authz: Authorizer | None = None
    ) -> str:
        return self.intentions_table.intention_update(intention_id, given, authz)

    def intention_delete(
        self, intention_id: str, authz: Authorizer | None = None
    ) -> None:
        self.intentions_table.intention_delete(intention_id, authz)

    # ----------------------------------------------------------------------
    # catalog: services and checks (CatalogTable)

    def services_json(self, authz: Authorizer | None = None) -> dict[str, Any]:
        return self.catalog_table.services_json(authz)

    def service_json(
        self, service_id: str, authz: Authorizer | None = None
    ) -> tuple[dict[str, Any], str]:
        return self.catalog_table.service_json(service_id, authz)

    def checks_json(self, authz: Authorizer | None = None) -> dict[str, Any]:
        return self.catalog_table.checks_json(authz)

    def register_service(
        self,
        definition: ServiceDefinition,
        *,
        replace_existing_checks: bool = False,
        authz: Authorizer | None = None,
    ) -> None:
        self.catalog_table.register_service(
            definition, replace_existing_checks=replace_existing_checks, authz=authz
        )

    def deregister_service(
        self, service_id: str, authz: Authorizer | None = None
    ) -> None:
        self.catalog_table.deregister_service(service_id, authz)

    def register_check(
        self,
        definition: CheckDefinition,
        service_id: str = "",
        authz: Authorizer | None = None,
    ) -> None:
        self.catalog_table.register_check(definition, service_id, authz)

    def deregister_check(self, check_id: str, authz: Authorizer | None = None) -> None:
        self.catalog_table.deregister_check(check_id, authz)

    def update_ttl_check(
        self,
        check_id: str,
        status: str,
        output: str,
        authz: Authorizer | None = None,
    ) -> None:
        self.catalog_table.update_ttl_check(check_id, status, output, authz)

    # ----------------------------------------------------------------------
    # health and catalog reads (HealthTable)

    def health_index(self, name: str, *, connect: bool) -> int:
        return self.health_table.health_index(name, connect=connect)

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
        return self.health_table.health(
            name,
            connect=connect,
            passing=passing,
            tags=tags,
            node_meta=node_meta,
            authz=authz,
        )

    def services_listing(self, authz: Authorizer | None = None) -> dict[str, list[str]]:
        return self.catalog_table.services_listing(authz)

    def services_index(self) -> int:
        return self.catalog_table.services_index()

    def member(self, *, wan: bool = False) -> dict[str, Any]:
        """
        This agent as ``/v1/agent/members`` lists it (``wan``: as the WAN
        pool names it, ``<node>.<dc>`` on the WAN port, without
        ``wan_join_port``), the same record as ``agent/self``'s ``Member``.
        """
        member = dict(self.agent_self()["Member"])
        if wan:
            tags = dict(member["Tags"])
            tags.pop("wan_join_port", None)
            member["Name"] = f"{self.settings.node_name}.{self.settings.datacenter}"
            member["Port"] = 8302
            member["Tags"] = tags
        return member

    def nodes(self, authz: Authorizer | None = None) -> list[dict[str, Any]]:
        """``GET /v1/catalog/nodes``: this one node, if the token may read it."""
        if authz is not None and not authz.allowed("node", self.node_name, "read"):
            return []
        return [self.health_table.node_json()]

    def nodes_index(self) -> int:
        return self.health_table.node_index

    @property
    def leader_address(self) -> str:
        """The server RPC address ``/v1/status/leader`` names: this agent."""
        return f"{self.settings.node_address}:8300"

    def catalog_index(self, name: str) -> int:
        return self.health_table.catalog_index(name)

    def catalog(
        self,
        name: str,
        *,
        connect: bool,
        tags: Sequence[str] = (),
        node_meta: Mapping[str, str] | None = None,
        authz: Authorizer | None = None,
    ) -> list[dict[str, Any]]:
        return self.health_table.catalog(
            name, connect=connect, tags=tags, node_meta=node_meta, authz=authz
        )

    # ----------------------------------------------------------------------
    # Consul 1.9+: config entries and exact intentions (ConfigEntriesTable)

    @property
    def config_index(self) -> int:
        return self.config_table.config_index

    def config_apply(
        self,
        name: str,
        sources: Sequence[Mapping[str, Any]],
        meta: Mapping[str, str] | None,
        *,
        cas: int | None = None,
        authz: Authorizer | None = None,
    ) -> bool:
        return self.config_table.config_apply(name, sources, meta, cas=cas, authz=authz)

    def config_get(
        self, kind: str, name: str, authz: Authorizer | None = None
    ) -> dict[str, Any]:
        return self.config_table.config_get(kind, name, authz)

    def config_list(
        self, kind: str, authz: Authorizer | None = None
    ) -> list[dict[str, Any]]:
        return self.config_table.config_list(kind, authz)

    def config_check_delete_kind(self, kind: str) -> None:
        self.config_table.check_delete_kind(kind)

    def config_delete(
        self,
        kind: str,
        name: str,
        *,
        cas: int | None = None,
        authz: Authorizer | None = None,
    ) -> bool:
        return self.config_table.config_delete(kind, name, cas=cas, authz=authz)

    def intention_exact_get(
        self, source: str, destination: str, authz: Authorizer | None = None
    ) -> dict[str, Any]:
        return self.config_table.intention_exact_get(source, destination, authz)

    def intention_exact_put(
        self,
        source: str,
        destination: str,
        fields: Mapping[str, Any],
        authz: Authorizer | None = None,
    ) -> None:
        self.config_table.intention_exact_put(source, destination, fields, authz)

    def intention_exact_delete(
        self, source: str, destination: str, authz: Authorizer | None = None
    ) -> None:
        self.config_table.intention_exact_delete(source, destination, authz)

    # ----------------------------------------------------------------------
    # prepared queries (QueriesTable)

    @property
    def queries_index(self) -> int:
        return self.queries_table.queries_index

    def queries_list(self, authz: Authorizer | None = None) -> list[dict[str, Any]]:
        return self.queries_table.queries_list(authz)

    def query_get(
        self, query_id: str, authz: Authorizer | None = None
    ) -> list[dict[str, Any]]:
        return self.queries_table.query_get(query_id, authz)

    def query_create(self, given: QueryInput, authz: Authorizer | None = None) -> str:
        return self.queries_table.query_create(given, authz)

    def query_update(
        self, query_id: str, given: QueryInput, authz: Authorizer | None = None
    ) -> None:
        self.queries_table.query_update(query_id, given, authz)

    def query_delete(self, query_id: str, authz: Authorizer | None = None) -> None:
        self.queries_table.query_delete(query_id, authz)

    def query_execute(
        self,
        id_or_name: str,
        *,
        connect: bool = False,
        limit: int = 0,
        authz: Authorizer | None = None,
    ) -> dict[str, Any]:
        return self.queries_table.query_execute(
            id_or_name, connect=connect, limit=limit, authz=authz
        )


def serf_stats() -> dict[str, str]:
    return {
        "coordinate_resets": "0",
        "encrypted": "false",
        "event_queue": "0",
        "event_time": "1",
        "failed": "0",
        "health_score": "0",
        "intent_queue": "0",
        "left": "0",
        "member_time": "1",
        "members": "1",
        "query_queue": "0",
        "query_time": "1",
    }
