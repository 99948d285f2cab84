"""
The catalog's records: check and service definitions as the HTTP API decodes
them, and the services and checks the agent stores, with their JSON.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from attrs import define, frozen
from twisted.internet.interfaces import IDelayedCall

# check_update_interval: an output-only change of a check reaches the
# catalog after interval/2 + RandomStagger(interval) (local/state.go).
CHECK_UPDATE_INTERVAL = 300.0
CHECK_OUTPUT_MAX_SIZE = 4096
SIDECAR_MIN_PORT = 21000
SIDECAR_MAX_PORT = 21255


HEALTH_PASSING = "passing"
HEALTH_WARNING = "warning"
HEALTH_CRITICAL = "critical"
VALID_STATUSES = (HEALTH_PASSING, HEALTH_WARNING, HEALTH_CRITICAL)


KIND_TYPICAL = ""
KIND_CONNECT_PROXY = "connect-proxy"
KIND_MESH_GATEWAY = "mesh-gateway"
GATEWAY_KINDS = ("mesh-gateway", "terminating-gateway", "ingress-gateway")


@frozen
class CheckDefinition:
    """
    One check of a service registration (Consul's ``CheckType``), durations
    in nanoseconds.
    """

    check_id: str = ""
    name: str = ""
    status: str = ""
    notes: str = ""
    script_args: tuple[str, ...] = ()
    http: str = ""
    header: Mapping[str, Sequence[str]] | None = None
    method: str = ""
    body: str = ""
    tcp: str = ""
    interval: int = 0
    alias_node: str = ""
    alias_service: str = ""
    docker_container_id: str = ""
    shell: str = ""
    grpc: str = ""
    grpc_use_tls: bool = False
    tls_skip_verify: bool = False
    timeout: int = 0
    ttl: int = 0
    success_before_passing: int = 0
    failures_before_critical: int = 0
    deregister_critical_service_after: int = 0
    output_max_size: int = 0

    @property
    def is_alias(self) -> bool:
        return bool(self.alias_node or self.alias_service)

    @property
    def is_script(self) -> bool:
        return bool(self.script_args)

    @property
    def type(self) -> str:
        """
        ``CheckType.Type()`` in Consul 1.8.
        """
        if self.grpc and self.interval > 0:
            return "grpc"
        if self.http and self.interval > 0:
            return "http"
        if self.ttl > 0:
            return "ttl"
        if self.tcp and self.interval > 0:
            return "tcp"
        if self.is_alias:
            return "alias"
        if self.is_script and self.docker_container_id and self.interval > 0:
            return "docker"
        if self.is_script:
            return "script"
        return ""

    def is_empty(self) -> bool:
        return self == CheckDefinition()

    def validate(self) -> str | None:
        """
        ``CheckType.Validate()``'s message, or ``None``.
        """
        interval_check = self.is_script or bool(self.http or self.tcp or self.grpc)
        if self.interval > 0 and self.ttl > 0:
            return "Interval and TTL cannot both be specified"
        if interval_check and self.interval <= 0:
            return "Interval must be > 0 for Script, HTTP, or TCP checks"
        if not interval_check and not self.is_alias and self.ttl <= 0:
            return "TTL must be > 0 for TTL checks"
        if self.output_max_size < 0:
            return "MaxOutputMaxSize must be positive"
        return None


@frozen
class ProxyConfig:
    """
    ``ConnectProxyConfig`` of a registration.  ``upstreams`` are the decoded
    upstream objects, echoed back.
    """

    destination_service_name: str = ""
    destination_service_id: str = ""
    local_service_address: str = ""
    local_service_port: int = 0
    config: Mapping[str, Any] | None = None
    upstreams: tuple[Mapping[str, Any], ...] = ()
    mesh_gateway_mode: str = ""
    expose_checks: bool = False
    expose_paths: tuple[Mapping[str, Any], ...] = ()

    def to_json(self, *, agent: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.destination_service_name or agent:
            out["DestinationServiceName"] = self.destination_service_name
        if self.destination_service_id:
            out["DestinationServiceID"] = self.destination_service_id
        if self.local_service_address:
            out["LocalServiceAddress"] = self.local_service_address
        if self.local_service_port:
            out["LocalServicePort"] = self.local_service_port
        if self.config:
            out["Config"] = copy.deepcopy(dict(self.config))
        if self.upstreams:
            out["Upstreams"] = [copy.deepcopy(dict(u)) for u in self.upstreams]
        out["MeshGateway"] = (
            {"Mode": self.mesh_gateway_mode} if self.mesh_gateway_mode else {}
        )
        expose: dict[str, Any] = {}
        if self.expose_checks:
            expose["Checks"] = True
        if self.expose_paths:
            expose["Paths"] = [copy.deepcopy(dict(p)) for p in self.expose_paths]
        out["Expose"] = expose
        return out


@frozen
class ServiceDefinition:
    """
    A service registration (``ServiceDefinition``) after decoding.
    ``tags`` and ``meta`` are ``None`` when not given.
    """

    name: str = ""
    id: str = ""
    kind: str = ""
    tags: tuple[str, ...] | None = None
    address: str = ""
    tagged_addresses: Mapping[str, tuple[str, int]] | None = None
    meta: Mapping[str, str] | None = None
    port: int = 0
    checks: tuple[CheckDefinition, ...] = ()
    weights: tuple[int, int] | None = None
    enable_tag_override: bool = False
    proxy: ProxyConfig | None = None
    connect_native: bool = False
    sidecar: ServiceDefinition | None = None
    sidecar_given: bool = False


@define
class StoredService:
    """
    A registered service instance: the agent's copy and its catalog indexes.
    """

    id: str
    name: str
    kind: str
    tags: tuple[str, ...]
    address: str
    tagged_addresses: dict[str, tuple[str, int]]
    meta: dict[str, str] | None
    port: int
    weights: tuple[int, int]
    enable_tag_override: bool
    proxy: ProxyConfig
    connect_native: bool
    create_index: int = 0
    modify_index: int = 0
    sidecar_id: str | None = None

    @property
    def connect_name(self) -> str | None:
        """
        The name this instance serves in Connect (``connectNameFromServiceNode``).
        """
        if self.kind == KIND_CONNECT_PROXY:
            return self.proxy.destination_service_name or None
        if self.connect_native:
            return self.name
        return None

    def catalog_json(self) -> dict[str, Any]:
        """
        ``structs.NodeService`` as health endpoints show it.
        """
        out: dict[str, Any] = {}
        if self.kind:
            out["Kind"] = self.kind
        out["ID"] = self.id
        out["Service"] = self.name
        out["Tags"] = list(self.tags)
        out["Address"] = self.address
        if self.tagged_addresses:
            out["TaggedAddresses"] = _tagged_json(self.tagged_addresses)
        out["Meta"] = None if self.meta is None else dict(self.meta)
        out["Port"] = self.port
        out["Weights"] = {"Passing": self.weights[0], "Warning": self.weights[1]}
        out["EnableTagOverride"] = self.enable_tag_override
        out["Proxy"] = self.proxy.to_json(agent=False)
        out["Connect"] = {"Native": True} if self.connect_native else {}
        out["CreateIndex"] = self.create_index
        out["ModifyIndex"] = self.modify_index
        return out

    def agent_json(self) -> dict[str, Any]:
        """
        ``api.AgentService`` as ``/v1/agent/services`` shows it.
        """
        out: dict[str, Any] = {}
        if self.kind:
            out["Kind"] = self.kind
        out["ID"] = self.id
        out["Service"] = self.name
        out["Tags"] = list(self.tags)
        out["Meta"] = {} if self.meta is None else dict(self.meta)
        out["Port"] = self.port
        out["Address"] = self.address
        if self.tagged_addresses:
            out["TaggedAddresses"] = _tagged_json(self.tagged_addresses)
        out["Weights"] = {"Passing": self.weights[0], "Warning": self.weights[1]}
        out["EnableTagOverride"] = self.enable_tag_override
        if self.kind == KIND_CONNECT_PROXY or self.kind in GATEWAY_KINDS:
            out["Proxy"] = self.proxy.to_json(agent=True)
        if self.connect_native:
            out["Connect"] = {"Native": True}
        return out


def _tagged_json(tagged: Mapping[str, tuple[str, int]]) -> dict[str, Any]:
    return {
        key: {"Address": address, "Port": port}
        for key, (address, port) in sorted(tagged.items())
    }


@define
class StoredCheck:
    """
    A check on this agent: the agent's view (``status``, ``output``) and what
    the catalog has (``catalog_status``, ``catalog_output``), which an
    output-only change reaches later, as in Consul.
    """

    check_id: str
    name: str
    notes: str
    service_id: str
    service_name: str
    service_tags: tuple[str, ...]
    definition: CheckDefinition
    status: str
    output: str = ""
    catalog_status: str = ""
    catalog_output: str = ""
    create_index: int = 0
    modify_index: int = 0
    last_output: str = ""
    ttl_timer: IDelayedCall | None = None
    deferred_sync: IDelayedCall | None = None

    @property
    def is_ttl(self) -> bool:
        return self.definition.type == "ttl"

    def to_json(self, node: str, *, catalog: bool) -> dict[str, Any]:
        return {
            "Node": node,
            "CheckID": self.check_id,
            "Name": self.name,
            "Status": self.catalog_status if catalog else self.status,
            "Notes": self.notes,
            "Output": self.catalog_output if catalog else self.output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": list(self.service_tags),
            "Type": self.definition.type,
            # Consul 1.8.7 shows an empty Definition for agent checks.
            "Definition": {},
            "CreateIndex": self.create_index if catalog else 0,
            "ModifyIndex": self.modify_index if catalog else 0,
        }

    def stop_timers(self) -> None:
        for call in (self.ttl_timer, self.deferred_sync):
            if call is not None and call.active():
                call.cancel()
        self.ttl_timer = None
        self.deferred_sync = None
