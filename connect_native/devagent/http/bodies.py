"""
The request bodies of Consul 1.8.7 (and the 1.9+ ones, from the source) as
Go's ``encoding/json`` decodes them (:mod:`connect_native.devagent.gocompat`),
and their conversion into the tables' input records.
"""

from __future__ import annotations

from typing import Any

from connect_native.devagent.gocompat import (
    _Any,
    _Bool,
    _Int,
    _List,
    _Map,
    _Schema,
    _Str,
    _Struct,
    parse_go_duration,
)
from connect_native.devagent.tables.catalog_records import (
    CheckDefinition,
    ProxyConfig,
    ServiceDefinition,
)
from connect_native.devagent.tables.intentions import IntentionInput

# ---- the request bodies of Consul 1.8.7

DURATION = _Any()


def _aux(*fields: str) -> str:
    """
    The anonymous struct a Consul ``UnmarshalJSON`` decodes into, as Go
    names its type in errors.
    """
    return "struct { " + "; ".join((*fields, "*structs.Alias")) + " }"


def _tag(name: str) -> str:
    return f'"json:\\"{name}\\""'


MESH_GATEWAY = _Struct(
    "structs.MeshGatewayConfig",
    "MeshGatewayConfig",
    {"Mode": _Str("structs.MeshGatewayMode")},
)
EXPOSE_PATH = _Struct(
    "structs.ExposePath",
    "ExposePath",
    {
        "ListenerPort": _Int(),
        "Path": _Str(),
        "LocalPathPort": _Int(),
        "Protocol": _Str(),
        "ParsedFromCheck": _Bool(),
    },
)
EXPOSE = _Struct(
    "structs.ExposeConfig",
    "ExposeConfig",
    {"Checks": _Bool(), "Paths": _List(EXPOSE_PATH, "[]structs.ExposePath")},
)
UPSTREAM = _Struct(
    _aux(
        f"DestinationTypeSnake string {_tag('destination_type')}",
        f"DestinationNamespaceSnake string {_tag('destination_namespace')}",
        f"DestinationNameSnake string {_tag('destination_name')}",
        f"LocalBindPortSnake int {_tag('local_bind_port')}",
        f"LocalBindAddressSnake string {_tag('local_bind_address')}",
    ),
    "",
    {
        "DestinationType": _Str(),
        "DestinationNamespace": _Str(),
        "DestinationName": _Str(),
        "Datacenter": _Str(),
        "LocalBindAddress": _Str(),
        "LocalBindPort": _Int(),
        "Config": _Map(_Any()),
        "MeshGateway": MESH_GATEWAY,
    },
    aliases={
        "destination_type": "DestinationType",
        "destination_namespace": "DestinationNamespace",
        "destination_name": "DestinationName",
        "local_bind_address": "LocalBindAddress",
        "local_bind_port": "LocalBindPort",
    },
    custom=True,
)
PROXY = _Struct(
    _aux(
        f"DestinationServiceNameSnake string {_tag('destination_service_name')}",
        f"DestinationServiceIDSnake string {_tag('destination_service_id')}",
        f"LocalServiceAddressSnake string {_tag('local_service_address')}",
        f"LocalServicePortSnake int {_tag('local_service_port')}",
    ),
    "",
    {
        "DestinationServiceName": _Str(),
        "DestinationServiceID": _Str(),
        "LocalServiceAddress": _Str(),
        "LocalServicePort": _Int(),
        "Config": _Map(_Any()),
        "Upstreams": _List(UPSTREAM, "structs.Upstreams"),
        "MeshGateway": MESH_GATEWAY,
        "Expose": EXPOSE,
    },
    aliases={
        "destination_service_name": "DestinationServiceName",
        "destination_service_id": "DestinationServiceID",
        "local_service_address": "LocalServiceAddress",
        "local_service_port": "LocalServicePort",
    },
    custom=True,
)
LEGACY_PROXY = _Struct(
    "structs.ServiceDefinitionConnectProxy",
    "ServiceDefinitionConnectProxy",
    {
        "Command": _List(_Str()),
        "ExecMode": _Str("structs.ProxyExecMode"),
        "Config": _Map(_Any()),
        "Upstreams": _List(UPSTREAM, "structs.Upstreams"),
    },
)
CHECK_DURATIONS = ("Interval", "Timeout", "TTL", "DeregisterCriticalServiceAfter")


def _check_durations(d: dict[str, Any]) -> dict[str, Any]:
    # CheckType.UnmarshalJSON: a string is a Go duration, a number is
    # nanoseconds, anything else is ignored.
    for key in CHECK_DURATIONS:
        value = d[key]
        if isinstance(value, str):
            d[key] = parse_go_duration(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            d[key] = int(value)
        else:
            d[key] = 0
    return d


CHECK = _Struct(
    _aux(
        "Interval interface {}",
        "Timeout interface {}",
        "TTL interface {}",
        "DeregisterCriticalServiceAfter interface {}",
        f"Args []string {_tag('args')}",
        f"ScriptArgsSnake []string {_tag('script_args')}",
        "DeregisterCriticalServiceAfterSnake interface {} "
        + _tag("deregister_critical_service_after"),
        f"DockerContainerIDSnake string {_tag('docker_container_id')}",
        f"TLSSkipVerifySnake bool {_tag('tls_skip_verify')}",
        f"ServiceID string {_tag('ServiceID')}",
        f"ServiceIDSnake string {_tag('service_id')}",
    ),
    "",
    {
        "CheckID": _Str("types.CheckID"),
        "Name": _Str(),
        "Status": _Str(),
        "Notes": _Str(),
        "ScriptArgs": _List(_Str()),
        "HTTP": _Str(),
        "Header": _Map(_List(_Str())),
        "Method": _Str(),
        "Body": _Str(),
        "TCP": _Str(),
        "Interval": DURATION,
        "AliasNode": _Str(),
        "AliasService": _Str(),
        "DockerContainerID": _Str(),
        "Shell": _Str(),
        "GRPC": _Str(),
        "GRPCUseTLS": _Bool(),
        "TLSSkipVerify": _Bool(),
        "Timeout": DURATION,
        "TTL": DURATION,
        "SuccessBeforePassing": _Int(),
        "FailuresBeforeCritical": _Int(),
        "ProxyHTTP": _Str(),
        "ProxyGRPC": _Str(),
        "DeregisterCriticalServiceAfter": DURATION,
        "OutputMaxSize": _Int(),
        "ServiceID": _Str(),
    },
    aliases={
        "args": "ScriptArgs",
        "script_args": "ScriptArgs",
        "deregister_critical_service_after": "DeregisterCriticalServiceAfter",
        "docker_container_id": "DockerContainerID",
        "tls_skip_verify": "TLSSkipVerify",
        "service_id": "ServiceID",
    },
    custom=True,
    post=_check_durations,
)
SERVICE_FIELDS: dict[str, _Schema] = {}
SERVICE = _Struct(
    _aux(
        f"EnableTagOverrideSnake bool {_tag('enable_tag_override')}",
        "TaggedAddressesSnake map[string]structs.ServiceAddress "
        + _tag("tagged_addresses"),
    ),
    "",
    SERVICE_FIELDS,
    aliases={
        "enable_tag_override": "EnableTagOverride",
        "tagged_addresses": "TaggedAddresses",
    },
    custom=True,
)
SERVICE_FIELDS.update(
    {
        "Kind": _Str("structs.ServiceKind"),
        "ID": _Str(),
        "Name": _Str(),
        "Tags": _List(_Str()),
        "Address": _Str(),
        "TaggedAddresses": _Map(
            _Struct(
                "structs.ServiceAddress",
                "ServiceAddress",
                {"Address": _Str(), "Port": _Int()},
            )
        ),
        "Meta": _Map(_Str()),
        "Port": _Int(),
        "Check": CHECK,
        "Checks": _List(CHECK, "structs.CheckTypes"),
        "Weights": _Struct(
            "structs.Weights", "Weights", {"Passing": _Int(), "Warning": _Int()}
        ),
        "Token": _Str(),
        "EnableTagOverride": _Bool(),
        "Proxy": PROXY,
        "Connect": _Struct(
            _aux(
                "SidecarServiceSnake *structs.ServiceDefinition "
                + _tag("sidecar_service")
            ),
            "",
            {
                "Native": _Bool(),
                "Proxy": LEGACY_PROXY,
                "SidecarService": SERVICE,
            },
            aliases={"sidecar_service": "SidecarService"},
            # ServiceConnect.UnmarshalJSON decodes without refusing unknown
            # fields, unlike the structs around it.
            custom=True,
            strict=False,
        ),
    }
)
AUTHORIZE = _Struct(
    "structs.ConnectAuthorizeRequest",
    "ConnectAuthorizeRequest",
    {"Target": _Str(), "ClientCertURI": _Str(), "ClientCertSerial": _Str()},
)
CHECK_UPDATE = _Struct(
    "agent.checkUpdate", "checkUpdate", {"Status": _Str(), "Output": _Str()}
)
INTENTION = _Struct(
    "struct { Hash string; CreatedAt string; UpdatedAt string; *structs.Alias }",
    "",
    {
        "ID": _Str(),
        "Description": _Str(),
        "SourceNS": _Str(),
        "SourceName": _Str(),
        "DestinationNS": _Str(),
        "DestinationName": _Str(),
        "SourceType": _Str("structs.IntentionSourceType"),
        "Action": _Str("structs.IntentionAction"),
        "DefaultAddr": _Str(),
        "DefaultPort": _Int(),
        "Meta": _Map(_Str()),
        "Precedence": _Int(),
        "CreatedAt": _Str(),
        "UpdatedAt": _Str(),
        "Hash": _Str(),
        "CreateIndex": _Int("uint64", 64, signed=False),
        "ModifyIndex": _Int("uint64", 64, signed=False),
    },
    custom=True,
)
QUERY = _Struct(
    "structs.PreparedQuery",
    "",
    {
        "ID": _Str(),
        "Name": _Str(),
        "Session": _Str(),
        "Token": _Str(),
        "Template": _Struct(
            "structs.QueryTemplateOptions",
            "Template",
            {"Type": _Str(), "Regexp": _Str(), "RemoveEmptyTags": _Bool()},
        ),
        "Service": _Struct(
            "structs.ServiceQuery",
            "Service",
            {
                "Service": _Str(),
                "Failover": _Struct(
                    "structs.QueryDatacenterOptions",
                    "Failover",
                    {"NearestN": _Int(), "Datacenters": _List(_Str())},
                ),
                "OnlyPassing": _Bool(),
                "IgnoreCheckIDs": _List(_Str("types.CheckID")),
                "Near": _Str(),
                "Tags": _List(_Str()),
                "NodeMeta": _Map(_Str()),
                "ServiceMeta": _Map(_Str()),
                "Connect": _Bool(),
            },
        ),
        "DNS": _Struct("structs.QueryDNSOptions", "DNS", {"TTL": _Str()}),
        "CreateIndex": _Int("uint64", 64, signed=False),
        "ModifyIndex": _Int("uint64", 64, signed=False),
    },
)
# Consul 1.9+ (from the source): L7 permissions and service-intentions
# config entries.
HEADER_PERMISSION = _Struct(
    "structs.IntentionHTTPHeaderPermission",
    "Header",
    {
        "Name": _Str(),
        "Present": _Bool(),
        "Exact": _Str(),
        "Prefix": _Str(),
        "Suffix": _Str(),
        "Contains": _Str(),
        "Regex": _Str(),
        "Invert": _Bool(),
        "IgnoreCase": _Bool(),
    },
    aliases={"ignore_case": "IgnoreCase"},
)
HTTP_PERMISSION = _Struct(
    "structs.IntentionHTTPPermission",
    "HTTP",
    {
        "PathExact": _Str(),
        "PathPrefix": _Str(),
        "PathRegex": _Str(),
        "Header": _List(HEADER_PERMISSION),
        "Methods": _List(_Str()),
    },
    aliases={
        "path_exact": "PathExact",
        "path_prefix": "PathPrefix",
        "path_regex": "PathRegex",
    },
)
PERMISSION = _Struct(
    "structs.IntentionPermission",
    "Permissions",
    {"Action": _Str("structs.IntentionAction"), "HTTP": HTTP_PERMISSION},
)
SOURCE_INTENTION = _Struct(
    "structs.SourceIntention",
    "Sources",
    {
        "Name": _Str(),
        "Namespace": _Str(),
        "Partition": _Str(),
        "Action": _Str("structs.IntentionAction"),
        "Permissions": _List(PERMISSION),
        "Precedence": _Int(),
        "Type": _Str("structs.IntentionSourceType"),
        "Description": _Str(),
    },
)
CONFIG_ENTRY = _Struct(
    "structs.ServiceIntentionsConfigEntry",
    "",
    {
        "Kind": _Str(),
        "Name": _Str(),
        "Namespace": _Str(),
        "Partition": _Str(),
        "Sources": _List(SOURCE_INTENTION),
        "Meta": _Map(_Str()),
        "CreateIndex": _Int("uint64", 64, signed=False),
        "ModifyIndex": _Int("uint64", 64, signed=False),
    },
)
EXACT_INTENTION = _Struct(
    "structs.Intention",
    "",
    {
        "ID": _Str(),
        "Description": _Str(),
        "SourceNS": _Str(),
        "SourceName": _Str(),
        "DestinationNS": _Str(),
        "DestinationName": _Str(),
        "SourceType": _Str("structs.IntentionSourceType"),
        "Action": _Str("structs.IntentionAction"),
        "Permissions": _List(PERMISSION),
        "Meta": _Map(_Str()),
        "Precedence": _Int(),
    },
)
ACL_POLICY = _Struct(
    "struct { Hash string; *structs.Alias }",
    "",
    {
        "ID": _Str(),
        "Name": _Str(),
        "Description": _Str(),
        "Rules": _Str(),
        "Syntax": _Str("acl.SyntaxVersion"),
        "Datacenters": _List(_Str()),
        "Hash": _Str(),
        "CreateIndex": _Int("uint64", 64, signed=False),
        "ModifyIndex": _Int("uint64", 64, signed=False),
    },
    custom=True,
)
ACL_LINK = _Struct(
    "structs.ACLTokenPolicyLink",
    "Policies",
    {"ID": _Str(), "Name": _Str()},
)
ACL_SERVICE_IDENTITY = _Struct(
    "structs.ACLServiceIdentity",
    "ServiceIdentities",
    {"ServiceName": _Str(), "Datacenters": _List(_Str())},
)
ACL_TOKEN = _Struct(
    "struct { ExpirationTTL interface {}; Hash string; *structs.Alias }",
    "",
    {
        "AccessorID": _Str(),
        "SecretID": _Str(),
        "Description": _Str(),
        "Policies": _List(ACL_LINK),
        "ServiceIdentities": _List(ACL_SERVICE_IDENTITY),
        "Local": _Bool(),
        "CreateTime": _Str(),
        "Hash": _Str(),
        "CreateIndex": _Int("uint64", 64, signed=False),
        "ModifyIndex": _Int("uint64", 64, signed=False),
    },
    custom=True,
)
CA_CONFIGURATION = _Struct(
    _aux("ForceWithoutCrossSigningSnake bool " + _tag("force_without_cross_signing")),
    "",
    {
        "ClusterID": _Str(),
        "Provider": _Str(),
        "Config": _Map(_Any()),
        "State": _Map(_Str()),
        "ForceWithoutCrossSigning": _Bool(),
        "CreateIndex": _Int("uint64", 64, signed=False),
        "ModifyIndex": _Int("uint64", 64, signed=False),
    },
    aliases={"force_without_cross_signing": "ForceWithoutCrossSigning"},
    custom=True,
)


def check_definition(d: dict[str, Any] | None) -> CheckDefinition:
    if d is None:
        return CheckDefinition()
    return CheckDefinition(
        check_id=d["CheckID"] or "",
        name=d["Name"] or "",
        status=d["Status"] or "",
        notes=d["Notes"] or "",
        script_args=tuple(d["ScriptArgs"] or ()),
        http=d["HTTP"] or "",
        header=d["Header"],
        method=d["Method"] or "",
        body=d["Body"] or "",
        tcp=d["TCP"] or "",
        interval=d["Interval"] or 0,
        alias_node=d["AliasNode"] or "",
        alias_service=d["AliasService"] or "",
        docker_container_id=d["DockerContainerID"] or "",
        shell=d["Shell"] or "",
        grpc=d["GRPC"] or "",
        grpc_use_tls=bool(d["GRPCUseTLS"]),
        tls_skip_verify=bool(d["TLSSkipVerify"]),
        timeout=d["Timeout"] or 0,
        ttl=d["TTL"] or 0,
        success_before_passing=d["SuccessBeforePassing"] or 0,
        failures_before_critical=d["FailuresBeforeCritical"] or 0,
        deregister_critical_service_after=d["DeregisterCriticalServiceAfter"] or 0,
        output_max_size=d["OutputMaxSize"] or 0,
    )


def _upstream_json(u: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"DestinationType": u["DestinationType"] or "service"}
    if u["DestinationNamespace"]:
        out["DestinationNamespace"] = u["DestinationNamespace"]
    out["DestinationName"] = u["DestinationName"] or ""
    out["Datacenter"] = u["Datacenter"] or ""
    if u["LocalBindAddress"]:
        out["LocalBindAddress"] = u["LocalBindAddress"]
    out["LocalBindPort"] = u["LocalBindPort"] or 0
    if u["Config"]:
        out["Config"] = u["Config"]
    mesh = u["MeshGateway"] or {}
    out["MeshGateway"] = {"Mode": mesh["Mode"]} if mesh.get("Mode") else {}
    return out


def proxy_config(d: dict[str, Any] | None) -> ProxyConfig | None:
    if d is None:
        return None
    mesh = d["MeshGateway"] or {}
    expose = d["Expose"] or {}
    return ProxyConfig(
        destination_service_name=d["DestinationServiceName"] or "",
        destination_service_id=d["DestinationServiceID"] or "",
        local_service_address=d["LocalServiceAddress"] or "",
        local_service_port=d["LocalServicePort"] or 0,
        config=d["Config"],
        upstreams=tuple(_upstream_json(u) for u in d["Upstreams"] or () if u),
        mesh_gateway_mode=mesh.get("Mode") or "",
        expose_checks=bool(expose.get("Checks")),
        expose_paths=tuple(
            {k: v for k, v in p.items() if v not in (None, "", 0, False)}
            for p in expose.get("Paths") or ()
            if p
        ),
    )


def service_definition(d: dict[str, Any]) -> ServiceDefinition:
    """
    A decoded registration body as a :class:`ServiceDefinition`.
    """
    checks = []
    single = check_definition(d["Check"])
    if not single.is_empty():
        checks.append(single)
    checks.extend(check_definition(c) for c in d["Checks"] or ())
    connect = d["Connect"] or {}
    sidecar_raw = connect.get("SidecarService")
    weights = d["Weights"]
    tagged = d["TaggedAddresses"]
    return ServiceDefinition(
        name=d["Name"] or "",
        id=d["ID"] or "",
        kind=d["Kind"] or "",
        tags=None if d["Tags"] is None else tuple(t or "" for t in d["Tags"]),
        address=d["Address"] or "",
        tagged_addresses=None
        if tagged is None
        else {
            k: ((v or {}).get("Address") or "", (v or {}).get("Port") or 0)
            for k, v in tagged.items()
        },
        meta=None if d["Meta"] is None else {k: v or "" for k, v in d["Meta"].items()},
        port=d["Port"] or 0,
        checks=tuple(checks),
        weights=None
        if weights is None
        else (weights["Passing"] or 0, weights["Warning"] or 0),
        enable_tag_override=bool(d["EnableTagOverride"]),
        proxy=proxy_config(d["Proxy"]),
        connect_native=bool(connect.get("Native")),
        sidecar=None if sidecar_raw is None else service_definition(sidecar_raw),
        sidecar_given=sidecar_raw is not None,
    )


def intention_input(d: dict[str, Any]) -> IntentionInput:
    return IntentionInput(
        id=d["ID"] or "",
        description=d["Description"] or "",
        source_ns=d["SourceNS"] or "",
        source_name=d["SourceName"] or "",
        destination_ns=d["DestinationNS"] or "",
        destination_name=d["DestinationName"] or "",
        source_type=d["SourceType"] or "",
        action=d["Action"] or "",
        default_addr=d["DefaultAddr"] or "",
        default_port=d["DefaultPort"] or 0,
        meta=None if d["Meta"] is None else {k: v or "" for k, v in d["Meta"].items()},
    )
