"""
The request bodies of Consul 1.8.7 (and the 1.9+ ones, from the source) as
Go's ``encoding/json`` decodes them (:mod:`connect_native.devagent.gocompat`),
and their conversion into the tables' input records.
"""

from __future__ import annotations

from typing import Any

from connect_native.devagent.gocompat import (
    AnyValue,
    Bool,
    Int,
    List,
    Map,
    Schema,
    Str,
    Struct,
    parse_go_duration,
)
from connect_native.devagent.tables.catalog_records import (
    CheckDefinition,
    ProxyConfig,
    ServiceDefinition,
)
from connect_native.devagent.tables.intentions import IntentionInput

# ---- the request bodies of Consul 1.8.7

DURATION = AnyValue()


def _aux(*fields: str) -> str:
    """
    The anonymous struct a Consul ``UnmarshalJSON`` decodes into, as Go
    names its type in errors.
    """
    return "struct { " + "; ".join((*fields, "*structs.Alias")) + " }"


def _tag(name: str) -> str:
    return f'"json:\\"{name}\\""'


MESH_GATEWAY = Struct(
    "structs.MeshGatewayConfig",
    "MeshGatewayConfig",
    {"Mode": Str("structs.MeshGatewayMode")},
)
EXPOSE_PATH = Struct(
    "structs.ExposePath",
    "ExposePath",
    {
        "ListenerPort": Int(),
        "Path": Str(),
        "LocalPathPort": Int(),
        "Protocol": Str(),
        "ParsedFromCheck": Bool(),
    },
)
EXPOSE = Struct(
    "structs.ExposeConfig",
    "ExposeConfig",
    {"Checks": Bool(), "Paths": List(EXPOSE_PATH, "[]structs.ExposePath")},
)
UPSTREAM = Struct(
    _aux(
        f"DestinationTypeSnake string {_tag('destination_type')}",
        f"DestinationNamespaceSnake string {_tag('destination_namespace')}",
        f"DestinationNameSnake string {_tag('destination_name')}",
        f"LocalBindPortSnake int {_tag('local_bind_port')}",
        f"LocalBindAddressSnake string {_tag('local_bind_address')}",
    ),
    "",
    {
        "DestinationType": Str(),
        "DestinationNamespace": Str(),
        "DestinationName": Str(),
        "Datacenter": Str(),
        "LocalBindAddress": Str(),
        "LocalBindPort": Int(),
        "Config": Map(AnyValue()),
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
PROXY = Struct(
    _aux(
        f"DestinationServiceNameSnake string {_tag('destination_service_name')}",
        f"DestinationServiceIDSnake string {_tag('destination_service_id')}",
        f"LocalServiceAddressSnake string {_tag('local_service_address')}",
        f"LocalServicePortSnake int {_tag('local_service_port')}",
    ),
    "",
    {
        "DestinationServiceName": Str(),
        "DestinationServiceID": Str(),
        "LocalServiceAddress": Str(),
        "LocalServicePort": Int(),
        "Config": Map(AnyValue()),
        "Upstreams": List(UPSTREAM, "structs.Upstreams"),
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
LEGACY_PROXY = Struct(
    "structs.ServiceDefinitionConnectProxy",
    "ServiceDefinitionConnectProxy",
    {
        "Command": List(Str()),
        "ExecMode": Str("structs.ProxyExecMode"),
        "Config": Map(AnyValue()),
        "Upstreams": List(UPSTREAM, "structs.Upstreams"),
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


CHECK = Struct(
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
        "CheckID": Str("types.CheckID"),
        "Name": Str(),
        "Status": Str(),
        "Notes": Str(),
        "ScriptArgs": List(Str()),
        "HTTP": Str(),
        "Header": Map(List(Str())),
        "Method": Str(),
        "Body": Str(),
        "TCP": Str(),
        "Interval": DURATION,
        "AliasNode": Str(),
        "AliasService": Str(),
        "DockerContainerID": Str(),
        "Shell": Str(),
        "GRPC": Str(),
        "GRPCUseTLS": Bool(),
        "TLSSkipVerify": Bool(),
        "Timeout": DURATION,
        "TTL": DURATION,
        "SuccessBeforePassing": Int(),
        "FailuresBeforeCritical": Int(),
        "ProxyHTTP": Str(),
        "ProxyGRPC": Str(),
        "DeregisterCriticalServiceAfter": DURATION,
        "OutputMaxSize": Int(),
        "ServiceID": Str(),
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
# ``PUT /v1/agent/check/register``'s structs.CheckDefinition: the same
# fields with ``ID`` for ``CheckID`` (``CheckID`` is an unknown field there,
# measured) and the service it belongs to.
CHECK_DEFINITION = Struct(
    CHECK.go_type,
    "",
    {
        "ID": Str("types.CheckID"),
        **{k: v for k, v in CHECK.fields.items() if k != "CheckID"},
        "Token": Str(),
    },
    aliases=CHECK.aliases,
    custom=True,
    post=_check_durations,
)
SERVICE_FIELDS: dict[str, Schema] = {}
SERVICE = Struct(
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
        "Kind": Str("structs.ServiceKind"),
        "ID": Str(),
        "Name": Str(),
        "Tags": List(Str()),
        "Address": Str(),
        "TaggedAddresses": Map(
            Struct(
                "structs.ServiceAddress",
                "ServiceAddress",
                {"Address": Str(), "Port": Int()},
            )
        ),
        "Meta": Map(Str()),
        "Port": Int(),
        "Check": CHECK,
        "Checks": List(CHECK, "structs.CheckTypes"),
        "Weights": Struct(
            "structs.Weights", "Weights", {"Passing": Int(), "Warning": Int()}
        ),
        "Token": Str(),
        "EnableTagOverride": Bool(),
        "Proxy": PROXY,
        "Connect": Struct(
            _aux(
                "SidecarServiceSnake *structs.ServiceDefinition "
                + _tag("sidecar_service")
            ),
            "",
            {
                "Native": Bool(),
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
AUTHORIZE = Struct(
    "structs.ConnectAuthorizeRequest",
    "ConnectAuthorizeRequest",
    {"Target": Str(), "ClientCertURI": Str(), "ClientCertSerial": Str()},
)
CHECK_UPDATE = Struct(
    "agent.checkUpdate", "checkUpdate", {"Status": Str(), "Output": Str()}
)
INTENTION = Struct(
    "struct { Hash string; CreatedAt string; UpdatedAt string; *structs.Alias }",
    "",
    {
        "ID": Str(),
        "Description": Str(),
        "SourceNS": Str(),
        "SourceName": Str(),
        "DestinationNS": Str(),
        "DestinationName": Str(),
        "SourceType": Str("structs.IntentionSourceType"),
        "Action": Str("structs.IntentionAction"),
        "DefaultAddr": Str(),
        "DefaultPort": Int(),
        "Meta": Map(Str()),
        "Precedence": Int(),
        "CreatedAt": Str(),
        "UpdatedAt": Str(),
        "Hash": Str(),
        "CreateIndex": Int("uint64", 64, signed=False),
        "ModifyIndex": Int("uint64", 64, signed=False),
    },
    custom=True,
)
QUERY = Struct(
    "structs.PreparedQuery",
    "",
    {
        "ID": Str(),
        "Name": Str(),
        "Session": Str(),
        "Token": Str(),
        "Template": Struct(
            "structs.QueryTemplateOptions",
            "Template",
            {"Type": Str(), "Regexp": Str(), "RemoveEmptyTags": Bool()},
        ),
        "Service": Struct(
            "structs.ServiceQuery",
            "Service",
            {
                "Service": Str(),
                "Failover": Struct(
                    "structs.QueryDatacenterOptions",
                    "Failover",
                    {"NearestN": Int(), "Datacenters": List(Str())},
                ),
                "OnlyPassing": Bool(),
                "IgnoreCheckIDs": List(Str("types.CheckID")),
                "Near": Str(),
                "Tags": List(Str()),
                "NodeMeta": Map(Str()),
                "ServiceMeta": Map(Str()),
                "Connect": Bool(),
            },
        ),
        "DNS": Struct("structs.QueryDNSOptions", "DNS", {"TTL": Str()}),
        "CreateIndex": Int("uint64", 64, signed=False),
        "ModifyIndex": Int("uint64", 64, signed=False),
    },
)
# Consul 1.9+ (from the source): L7 permissions and service-intentions
# config entries.
HEADER_PERMISSION = Struct(
    "structs.IntentionHTTPHeaderPermission",
    "Header",
    {
        "Name": Str(),
        "Present": Bool(),
        "Exact": Str(),
        "Prefix": Str(),
        "Suffix": Str(),
        "Contains": Str(),
        "Regex": Str(),
        "Invert": Bool(),
        "IgnoreCase": Bool(),
    },
    aliases={"ignore_case": "IgnoreCase"},
)
HTTP_PERMISSION = Struct(
    "structs.IntentionHTTPPermission",
    "HTTP",
    {
        "PathExact": Str(),
        "PathPrefix": Str(),
        "PathRegex": Str(),
        "Header": List(HEADER_PERMISSION),
        "Methods": List(Str()),
    },
    aliases={
        "path_exact": "PathExact",
        "path_prefix": "PathPrefix",
        "path_regex": "PathRegex",
    },
)
PERMISSION = Struct(
    "structs.IntentionPermission",
    "Permissions",
    {"Action": Str("structs.IntentionAction"), "HTTP": HTTP_PERMISSION},
)
SOURCE_INTENTION = Struct(
    "structs.SourceIntention",
    "Sources",
    {
        "Name": Str(),
        "Namespace": Str(),
        "Partition": Str(),
        "Action": Str("structs.IntentionAction"),
        "Permissions": List(PERMISSION),
        "Precedence": Int(),
        "Type": Str("structs.IntentionSourceType"),
        "Description": Str(),
    },
)
CONFIG_ENTRY = Struct(
    "structs.ServiceIntentionsConfigEntry",
    "",
    {
        "Kind": Str(),
        "Name": Str(),
        "Namespace": Str(),
        "Partition": Str(),
        "Sources": List(SOURCE_INTENTION),
        "Meta": Map(Str()),
        "CreateIndex": Int("uint64", 64, signed=False),
        "ModifyIndex": Int("uint64", 64, signed=False),
    },
)
EXACT_INTENTION = Struct(
    "structs.Intention",
    "",
    {
        "ID": Str(),
        "Description": Str(),
        "SourceNS": Str(),
        "SourceName": Str(),
        "DestinationNS": Str(),
        "DestinationName": Str(),
        "SourceType": Str("structs.IntentionSourceType"),
        "Action": Str("structs.IntentionAction"),
        "Permissions": List(PERMISSION),
        "Meta": Map(Str()),
        "Precedence": Int(),
    },
)
ACL_POLICY = Struct(
    "struct { Hash string; *structs.Alias }",
    "",
    {
        "ID": Str(),
        "Name": Str(),
        "Description": Str(),
        "Rules": Str(),
        "Syntax": Str("acl.SyntaxVersion"),
        "Datacenters": List(Str()),
        "Hash": Str(),
        "CreateIndex": Int("uint64", 64, signed=False),
        "ModifyIndex": Int("uint64", 64, signed=False),
    },
    custom=True,
)
ACL_LINK = Struct(
    "structs.ACLTokenPolicyLink",
    "Policies",
    {"ID": Str(), "Name": Str()},
)
ACL_SERVICE_IDENTITY = Struct(
    "structs.ACLServiceIdentity",
    "ServiceIdentities",
    {"ServiceName": Str(), "Datacenters": List(Str())},
)
ACL_TOKEN = Struct(
    "struct { ExpirationTTL interface {}; Hash string; *structs.Alias }",
    "",
    {
        "AccessorID": Str(),
        "SecretID": Str(),
        "Description": Str(),
        "Policies": List(ACL_LINK),
        "ServiceIdentities": List(ACL_SERVICE_IDENTITY),
        "Local": Bool(),
        "CreateTime": Str(),
        "Hash": Str(),
        "CreateIndex": Int("uint64", 64, signed=False),
        "ModifyIndex": Int("uint64", 64, signed=False),
    },
    custom=True,
)
CA_CONFIGURATION = Struct(
    _aux("ForceWithoutCrossSigningSnake bool " + _tag("force_without_cross_signing")),
    "",
    {
        "ClusterID": Str(),
        "Provider": Str(),
        "Config": Map(AnyValue()),
        "State": Map(Str()),
        "ForceWithoutCrossSigning": Bool(),
        "CreateIndex": Int("uint64", 64, signed=False),
        "ModifyIndex": Int("uint64", 64, signed=False),
    },
    aliases={"force_without_cross_signing": "ForceWithoutCrossSigning"},
    custom=True,
)


def check_definition(d: dict[str, Any] | None) -> CheckDefinition:
    if d is None:
        return CheckDefinition()
    return CheckDefinition(
        check_id=(d["CheckID"] if "CheckID" in d else d["ID"]) or "",
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
