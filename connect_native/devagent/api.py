"""
The development agent's HTTP API: Consul 1.8.7's endpoints for Connect-native
applications as a plain ``twisted.web`` resource over a
:class:`~connect_native.devagent.agent.DevAgent`.

The resource speaks the wire format the real agent speaks (``REAL-BEHAVIOUR.md``
and ``tests/fixtures/real-1.8.7/``): pretty JSON with Go's escaping,
plain-text error bodies with Consul's exact messages, ``Vary:
Accept-Encoding`` everywhere, gzip for large bodies when asked, the
``X-Consul-*`` and ``X-Cache``/``Age`` headers per endpoint, 405 with
``Allow``, Go's JSON decoding rules for request bodies (keys matched
case-insensitively, unknown fields refused, Go's error texts), and blocking
queries with the real index/wait rules: up to ``wait/16`` jitter and a 5
minute default on catalog-backed endpoints, none and no timeout at all on
agent-cache ones.

Blocking reads answer later (``NOT_DONE_YET``); a client that goes away
cancels its wait.  Every handler answers: an unexpected exception becomes a
500 with a plain-text body and a logged traceback, never a dropped
connection.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.components import registerAdapter
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from connect_native import _logging
from connect_native.devagent.agent import DevAgent
from connect_native.devagent.gocompat import (
    GoDurationError,
    GoJSONError,
    _Any,
    _Bool,
    _Int,
    _List,
    _Map,
    _Schema,
    _Str,
    _Struct,
    decode_go_json,
    go_quote,
    parse_go_duration,
)
from connect_native.devagent.store import ConsulError, permission_denied
from connect_native.devagent.tables.acl import Authorizer
from connect_native.devagent.tables.catalog_records import (
    CheckDefinition,
    ProxyConfig,
    ServiceDefinition,
)
from connect_native.devagent.tables.connect_ca import CAConfigInput, LeafAnswer
from connect_native.devagent.tables.intentions import IntentionInput
from connect_native.devagent.tables.queries import QueryInput

__all__ = ["AgentResource"]

log = Logger(observer=_logging.observer)

T = TypeVar("T")

# Consul wraps its API in gziphandler with MinSize(0): every non-empty body
# is compressed when the client asks (measured on 1.8.7).
GZIP_MIN_SIZE = 1
MAX_QUERY_TIME = 600.0
DEFAULT_QUERY_TIME = 300.0
JITTER_FRACTION = 16
TEXT_PLAIN = "text/plain; charset=utf-8"

# ---- the request bodies of Consul 1.8.7

_DURATION = _Any()


def _aux(*fields: str) -> str:
    """
    The anonymous struct a Consul ``UnmarshalJSON`` decodes into, as Go
    names its type in errors.
    """
    return "struct { " + "; ".join((*fields, "*structs.Alias")) + " }"


def _tag(name: str) -> str:
    return f'"json:\\"{name}\\""'


_MESH_GATEWAY = _Struct(
    "structs.MeshGatewayConfig",
    "MeshGatewayConfig",
    {"Mode": _Str("structs.MeshGatewayMode")},
)
_EXPOSE_PATH = _Struct(
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
_EXPOSE = _Struct(
    "structs.ExposeConfig",
    "ExposeConfig",
    {"Checks": _Bool(), "Paths": _List(_EXPOSE_PATH, "[]structs.ExposePath")},
)
_UPSTREAM = _Struct(
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
        "MeshGateway": _MESH_GATEWAY,
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
_PROXY = _Struct(
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
        "Upstreams": _List(_UPSTREAM, "structs.Upstreams"),
        "MeshGateway": _MESH_GATEWAY,
        "Expose": _EXPOSE,
    },
    aliases={
        "destination_service_name": "DestinationServiceName",
        "destination_service_id": "DestinationServiceID",
        "local_service_address": "LocalServiceAddress",
        "local_service_port": "LocalServicePort",
    },
    custom=True,
)
_LEGACY_PROXY = _Struct(
    "structs.ServiceDefinitionConnectProxy",
    "ServiceDefinitionConnectProxy",
    {
        "Command": _List(_Str()),
        "ExecMode": _Str("structs.ProxyExecMode"),
        "Config": _Map(_Any()),
        "Upstreams": _List(_UPSTREAM, "structs.Upstreams"),
    },
)
_CHECK_DURATIONS = ("Interval", "Timeout", "TTL", "DeregisterCriticalServiceAfter")


def _check_durations(d: dict[str, Any]) -> dict[str, Any]:
    # CheckType.UnmarshalJSON: a string is a Go duration, a number is
    # nanoseconds, anything else is ignored.
    for key in _CHECK_DURATIONS:
        value = d[key]
        if isinstance(value, str):
            d[key] = parse_go_duration(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            d[key] = int(value)
        else:
            d[key] = 0
    return d


_CHECK = _Struct(
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
        "Interval": _DURATION,
        "AliasNode": _Str(),
        "AliasService": _Str(),
        "DockerContainerID": _Str(),
        "Shell": _Str(),
        "GRPC": _Str(),
        "GRPCUseTLS": _Bool(),
        "TLSSkipVerify": _Bool(),
        "Timeout": _DURATION,
        "TTL": _DURATION,
        "SuccessBeforePassing": _Int(),
        "FailuresBeforeCritical": _Int(),
        "ProxyHTTP": _Str(),
        "ProxyGRPC": _Str(),
        "DeregisterCriticalServiceAfter": _DURATION,
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
_SERVICE_FIELDS: dict[str, _Schema] = {}
_SERVICE = _Struct(
    _aux(
        f"EnableTagOverrideSnake bool {_tag('enable_tag_override')}",
        "TaggedAddressesSnake map[string]structs.ServiceAddress "
        + _tag("tagged_addresses"),
    ),
    "",
    _SERVICE_FIELDS,
    aliases={
        "enable_tag_override": "EnableTagOverride",
        "tagged_addresses": "TaggedAddresses",
    },
    custom=True,
)
_SERVICE_FIELDS.update(
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
        "Check": _CHECK,
        "Checks": _List(_CHECK, "structs.CheckTypes"),
        "Weights": _Struct(
            "structs.Weights", "Weights", {"Passing": _Int(), "Warning": _Int()}
        ),
        "Token": _Str(),
        "EnableTagOverride": _Bool(),
        "Proxy": _PROXY,
        "Connect": _Struct(
            _aux(
                "SidecarServiceSnake *structs.ServiceDefinition "
                + _tag("sidecar_service")
            ),
            "",
            {
                "Native": _Bool(),
                "Proxy": _LEGACY_PROXY,
                "SidecarService": _SERVICE,
            },
            aliases={"sidecar_service": "SidecarService"},
            # ServiceConnect.UnmarshalJSON decodes without refusing unknown
            # fields, unlike the structs around it.
            custom=True,
            strict=False,
        ),
    }
)
_AUTHORIZE = _Struct(
    "structs.ConnectAuthorizeRequest",
    "ConnectAuthorizeRequest",
    {"Target": _Str(), "ClientCertURI": _Str(), "ClientCertSerial": _Str()},
)
_CHECK_UPDATE = _Struct(
    "agent.checkUpdate", "checkUpdate", {"Status": _Str(), "Output": _Str()}
)
_INTENTION = _Struct(
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
_QUERY = _Struct(
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
_HEADER_PERMISSION = _Struct(
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
_HTTP_PERMISSION = _Struct(
    "structs.IntentionHTTPPermission",
    "HTTP",
    {
        "PathExact": _Str(),
        "PathPrefix": _Str(),
        "PathRegex": _Str(),
        "Header": _List(_HEADER_PERMISSION),
        "Methods": _List(_Str()),
    },
    aliases={
        "path_exact": "PathExact",
        "path_prefix": "PathPrefix",
        "path_regex": "PathRegex",
    },
)
_PERMISSION = _Struct(
    "structs.IntentionPermission",
    "Permissions",
    {"Action": _Str("structs.IntentionAction"), "HTTP": _HTTP_PERMISSION},
)
_SOURCE_INTENTION = _Struct(
    "structs.SourceIntention",
    "Sources",
    {
        "Name": _Str(),
        "Namespace": _Str(),
        "Partition": _Str(),
        "Action": _Str("structs.IntentionAction"),
        "Permissions": _List(_PERMISSION),
        "Precedence": _Int(),
        "Type": _Str("structs.IntentionSourceType"),
        "Description": _Str(),
    },
)
_CONFIG_ENTRY = _Struct(
    "structs.ServiceIntentionsConfigEntry",
    "",
    {
        "Kind": _Str(),
        "Name": _Str(),
        "Namespace": _Str(),
        "Partition": _Str(),
        "Sources": _List(_SOURCE_INTENTION),
        "Meta": _Map(_Str()),
        "CreateIndex": _Int("uint64", 64, signed=False),
        "ModifyIndex": _Int("uint64", 64, signed=False),
    },
)
_EXACT_INTENTION = _Struct(
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
        "Permissions": _List(_PERMISSION),
        "Meta": _Map(_Str()),
        "Precedence": _Int(),
    },
)
_ACL_POLICY = _Struct(
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
_ACL_LINK = _Struct(
    "structs.ACLTokenPolicyLink",
    "Policies",
    {"ID": _Str(), "Name": _Str()},
)
_ACL_SERVICE_IDENTITY = _Struct(
    "structs.ACLServiceIdentity",
    "ServiceIdentities",
    {"ServiceName": _Str(), "Datacenters": _List(_Str())},
)
_ACL_TOKEN = _Struct(
    "struct { ExpirationTTL interface {}; Hash string; *structs.Alias }",
    "",
    {
        "AccessorID": _Str(),
        "SecretID": _Str(),
        "Description": _Str(),
        "Policies": _List(_ACL_LINK),
        "ServiceIdentities": _List(_ACL_SERVICE_IDENTITY),
        "Local": _Bool(),
        "CreateTime": _Str(),
        "Hash": _Str(),
        "CreateIndex": _Int("uint64", 64, signed=False),
        "ModifyIndex": _Int("uint64", 64, signed=False),
    },
    custom=True,
)
_CA_CONFIGURATION = _Struct(
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


def _check_definition(d: dict[str, Any] | None) -> CheckDefinition:
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


def _proxy_config(d: dict[str, Any] | None) -> ProxyConfig | None:
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
    single = _check_definition(d["Check"])
    if not single.is_empty():
        checks.append(single)
    checks.extend(_check_definition(c) for c in d["Checks"] or ())
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
        proxy=_proxy_config(d["Proxy"]),
        connect_native=bool(connect.get("Native")),
        sidecar=None if sidecar_raw is None else service_definition(sidecar_raw),
        sidecar_given=sidecar_raw is not None,
    )


# --------------------------------------------------------------------------
# HTTP plumbing


def _go_json_bytes(value: Any) -> bytes:
    """
    Go's ``json.MarshalIndent(v, "", "    ")`` plus a newline, as a ``-dev``
    agent writes every body: ``<``, ``>``, ``&``, U+2028 and U+2029 escaped.
    """
    text = json.dumps(value, indent=4, ensure_ascii=False, allow_nan=False)
    text = (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )
    return (text + "\n").encode("utf-8", errors="replace")


def _query(request: Request) -> dict[str, list[str]]:
    """
    Go's ``url.ParseQuery`` (1.15: ``&`` and ``;`` separate pairs; a pair
    with a bad escape is dropped).
    """
    uri = request.uri
    raw = uri.split(b"?", 1)[1] if b"?" in uri else b""
    out: dict[str, list[str]] = {}
    for pair in re.split(rb"[&;]", raw):
        if not pair:
            continue
        key, _, value = pair.partition(b"=")
        try:
            k = _query_unescape(key)
            v = _query_unescape(value)
        except ValueError:
            continue
        out.setdefault(k, []).append(v)
    return out


def _query_unescape(raw: bytes) -> str:
    if re.search(rb"%(?![0-9A-Fa-f]{2})", raw):
        raise ValueError("invalid URL escape")
    return unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8", errors="replace")


def _get(query: dict[str, list[str]], key: str) -> str:
    values = query.get(key)
    return values[0] if values else ""


def _parse_bool(text: str) -> bool:
    # strconv.ParseBool
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(text)


@frozen
class QueryOptions:
    """
    The blocking and consistency parameters of a read.
    """

    index: int
    wait: float
    stale: bool
    consistent: bool
    cached: bool
    datacenter: str | None

    @property
    def consistency(self) -> str:
        if self.consistent:
            return "consistent"
        if self.stale:
            return "stale"
        return "leader"


@frozen
class _DiscoveryRead:
    """
    A catalog or health read of one service, parsed and checked.
    """

    name: str
    connect: bool
    query: dict[str, list[str]]
    options: QueryOptions
    tags: list[str]
    node_meta: dict[str, str]
    authz: Authorizer | None


def _query_options(request: Request, query: dict[str, list[str]]) -> QueryOptions:
    """
    Consul's ``parseDC``, ``parseConsistency``, ``parseCacheControl`` and
    ``parseWait``, in that order, with their 400s.
    """
    stale = "stale" in query
    consistent = "consistent" in query
    cached = "cached" in query
    max_stale = _get(query, "max_stale")
    if max_stale:
        try:
            if parse_go_duration(max_stale) > 0:
                stale = True
        except GoDurationError:
            raise ConsulError(
                400, f"Invalid max_stale value {go_quote(max_stale)}"
            ) from None
    if stale and consistent:
        raise ConsulError(
            400, "Cannot specify ?stale with ?consistent, conflicting semantics."
        )
    if cached and consistent:
        raise ConsulError(
            400, "Cannot specify ?cached with ?consistent, conflicting semantics."
        )
    cache_control = request.getHeader("cache-control")
    if cache_control:
        for directive in cache_control.split(","):
            name, _, value = directive.strip().partition("=")
            if name.lower() in ("max-age", "stale-if-error") and not re.fullmatch(
                r"[0-9]+", value
            ):
                raise ConsulError(400, "Invalid Cache-Control header.")
    wait = 0.0
    wait_text = _get(query, "wait")
    if wait_text:
        try:
            wait = parse_go_duration(wait_text) * 1e-9
        except GoDurationError:
            raise ConsulError(400, "Invalid wait time") from None
    index = 0
    index_text = _get(query, "index")
    if index_text:
        if not re.fullmatch(r"[0-9]+", index_text) or int(index_text) >= 1 << 64:
            raise ConsulError(400, "Invalid index")
        index = int(index_text)
    dc = _get(query, "dc") or None
    return QueryOptions(
        index=index,
        wait=wait,
        stale=stale,
        consistent=consistent,
        cached=cached,
        datacenter=dc,
    )


def _no_namespaces(request: Request, query: dict[str, list[str]]) -> None:
    # parseEntMeta in Consul OSS.
    if request.getHeader("x-consul-namespace"):
        raise ConsulError(
            400,
            'Bad request: Invalid header: "X-Consul-Namespace" - Namespaces are a '
            "Consul Enterprise feature",
        )
    if _get(query, "ns"):
        raise ConsulError(
            400,
            'Bad request: Invalid query parameter: "ns" - Namespaces are a Consul '
            "Enterprise feature",
        )


def request_token(request: Request, query: dict[str, list[str]]) -> str:
    """
    The ACL token of a request, where Consul looks for it: ``?token=``,
    then ``X-Consul-Token``, then ``Authorization: Bearer`` (measured: a
    non-empty query token wins over the header).
    """
    token = _get(query, "token")
    if token:
        return token
    token = request.getHeader("x-consul-token") or ""
    if token:
        return token
    authorization = request.getHeader("authorization") or ""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    return ""


@frozen
class _Route:
    pattern: str
    prefix: bool
    methods: tuple[str, ...]
    handler: str


_ROUTES = (
    _Route("/v1/agent/self", False, ("GET",), "agent_self"),
    _Route("/v1/agent/services", False, ("GET",), "agent_services"),
    _Route("/v1/agent/service/register", False, ("PUT",), "service_register"),
    _Route("/v1/agent/service/deregister/", True, ("PUT",), "service_deregister"),
    _Route("/v1/agent/service/", True, ("GET",), "agent_service"),
    _Route("/v1/agent/checks", False, ("GET",), "agent_checks"),
    _Route("/v1/agent/check/pass/", True, ("PUT",), "check_pass"),
    _Route("/v1/agent/check/warn/", True, ("PUT",), "check_warn"),
    _Route("/v1/agent/check/fail/", True, ("PUT",), "check_fail"),
    _Route("/v1/agent/check/update/", True, ("PUT",), "check_update"),
    _Route("/v1/agent/connect/authorize", False, ("POST",), "authorize"),
    _Route("/v1/agent/connect/ca/roots", False, ("GET",), "agent_roots"),
    _Route("/v1/agent/connect/ca/leaf/", True, ("GET",), "leaf"),
    _Route("/v1/connect/ca/roots", False, ("GET",), "server_roots"),
    _Route("/v1/connect/ca/configuration", False, ("GET", "PUT"), "ca_configuration"),
    _Route("/v1/connect/intentions", False, ("GET", "POST"), "intentions"),
    _Route("/v1/connect/intentions/match", False, ("GET",), "intentions_match"),
    _Route("/v1/connect/intentions/check", False, ("GET",), "intentions_check"),
    _Route("/v1/connect/intentions/", True, ("GET", "PUT", "DELETE"), "intention"),
    _Route("/v1/catalog/service/", True, ("GET",), "catalog_service"),
    _Route("/v1/catalog/connect/", True, ("GET",), "catalog_connect"),
    _Route("/v1/health/service/", True, ("GET",), "health_service"),
    _Route("/v1/health/connect/", True, ("GET",), "health_connect"),
    _Route("/v1/config", False, ("PUT",), "config_apply"),
    _Route("/v1/config/", True, ("GET", "DELETE"), "config_entry"),
    _Route("/v1/query", False, ("GET", "POST"), "queries"),
    _Route("/v1/query/", True, ("GET", "PUT", "DELETE"), "query_specific"),
    _Route("/v1/acl/policy", False, ("PUT",), "acl_policy_create"),
    _Route("/v1/acl/token", False, ("PUT",), "acl_token_create"),
)


def _route(path: str) -> tuple[_Route, str] | None:
    """
    Go's ``ServeMux``: an exact pattern, else the longest matching prefix.
    """
    best: tuple[_Route, str] | None = None
    for route in _ROUTES:
        if not route.prefix and path == route.pattern:
            return route, ""
        if route.prefix and path.startswith(route.pattern):
            if best is None or len(route.pattern) > len(best[0].pattern):
                best = (route, path[len(route.pattern) :])
    return best


class _Reply:
    """
    One response being built: status, headers, body.
    """

    def __init__(self, request: Request, clock: Any) -> None:
        self.request = request
        self.gone = False
        self._clock = clock
        self._started = clock.seconds()
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, failure: Failure) -> None:
        self.gone = True
        log.info(
            "{method} {uri}: the client went away after {elapsed:.3f} s",
            method=_text(self.request.method),
            uri=_text(self.request.uri),
            elapsed=self._clock.seconds() - self._started,
        )

    def send(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str | None,
        vary: bool = True,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        request = self.request
        if self.gone or request.finished:
            return
        request.setResponseCode(status)
        response_headers = request.responseHeaders
        response_headers.removeHeader(b"server")
        response_headers.removeHeader(b"content-type")
        request.defaultContentType = None
        for name, value in headers:
            response_headers.setRawHeaders(name, [value])
        if content_type is not None:
            response_headers.setRawHeaders("Content-Type", [content_type])
        if vary:
            response_headers.setRawHeaders("Vary", ["Accept-Encoding"])
        accept = (request.getHeader("accept-encoding") or "").lower()
        if vary and "gzip" in accept and len(body) >= GZIP_MIN_SIZE:
            body = gzip.compress(body)
            response_headers.setRawHeaders("Content-Encoding", ["gzip"])
        response_headers.setRawHeaders("Content-Length", [str(len(body))])
        request.write(body)  # type: ignore[no-untyped-call]
        request.finish()  # type: ignore[no-untyped-call]
        log.info(
            "{method} {uri} -> {status} ({elapsed:.3f} s)",
            method=_text(request.method),
            uri=_text(request.uri),
            status=status,
            elapsed=self._clock.seconds() - self._started,
        )

    def json(
        self, value: Any, headers: Sequence[tuple[str, str]] = (), status: int = 200
    ) -> None:
        self.send(
            status,
            _go_json_bytes(value),
            content_type="application/json",
            headers=headers,
        )

    def empty(self) -> None:
        self.send(200, b"", content_type=None)

    def error(self, error: ConsulError) -> None:
        headers = list(error.headers)
        if error.allow is not None:
            headers.append(("Allow", error.allow))
        self.send(
            error.status,
            error.message.encode("utf-8", errors="replace"),
            content_type=None
            if error.status == 404 and not error.message
            else TEXT_PLAIN,
            headers=headers,
        )

    def failure(self, failure: Failure) -> None:
        if failure.check(CancelledError):  # type: ignore[no-untyped-call]
            return
        error = failure.value
        if isinstance(error, ConsulError):
            self.error(error)
            return
        log.failure("unexpected error answering {uri}", failure, uri=self.request.uri)
        self.error(ConsulError(500, f"dev agent internal error: {error!r}"))


def _text(raw: bytes | None) -> str:
    return (raw or b"").decode("ascii", "replace")


def _meta_headers(
    index: int, *, known_leader: bool, consistency: str | None = None
) -> list[tuple[str, str]]:
    # setMeta: index (never 0), known leader, last contact, consistency.
    headers = [
        ("X-Consul-Index", str(max(index, 1))),
        ("X-Consul-Knownleader", "true" if known_leader else "false"),
        ("X-Consul-Lastcontact", "0"),
    ]
    if consistency is not None:
        headers.append(("X-Consul-Effective-Consistency", consistency))
    return headers


def _cache_headers(hit: bool, age: float | None = 0.0) -> list[tuple[str, str]]:
    if not hit:
        return [("X-Cache", "MISS")]
    return [("X-Cache", "HIT"), ("Age", f"{age or 0.0:.0f}")]


class AgentResource(Resource):
    """
    The agent's HTTP API.  ``StubTreq(AgentResource(agent))`` talks to it in
    memory; ``Site(AgentResource(agent))`` serves it.
    """

    isLeaf = True

    def __init__(self, agent: DevAgent) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.agent = agent

    def render(self, request: Request) -> bytes | int:
        reply = _Reply(request, self.agent.clock)
        try:
            self._dispatch(request, reply)
        except ConsulError as e:
            reply.error(e)
        except Exception:
            reply.failure(Failure())  # type: ignore[no-untyped-call]
        return NOT_DONE_YET

    def _dispatch(self, request: Request, reply: _Reply) -> None:
        raw_path = request.uri.split(b"?", 1)[0].split(b"#", 1)[0]
        path = unquote_to_bytes(raw_path).decode("utf-8", errors="replace")
        method = (request.method or b"GET").decode("ascii", "replace")
        found = _route(path)
        if found is None and _route(path + "/") is not None and not path.endswith("/"):
            # Go's ServeMux sends a path without its subtree's slash there.
            location = path + "/"
            if b"?" in request.uri:
                location += "?" + _text(request.uri.split(b"?", 1)[1])
            body = b""
            if method == "GET":
                body = f'<a href="{location}">Moved Permanently</a>.\n\n'.encode()
            reply.send(
                301,
                body,
                content_type="text/html; charset=utf-8",
                headers=[("Location", location)],
            )
            return
        if found is None:
            # Outside the API's gzip wrapper: no Vary header here.
            if path == "/":
                reply.send(200, b"Consul Agent", content_type=TEXT_PLAIN, vary=False)
            else:
                reply.send(404, b"", content_type=None, vary=False)
            return
        route, rest = found
        allow = ",".join(("OPTIONS", *route.methods))
        if method == "OPTIONS":
            reply.send(200, b"", content_type=None, headers=[("Allow", allow)])
            return
        if method not in route.methods:
            raise ConsulError(405, f"method {method} not allowed", allow=allow)
        handler: Callable[[Request, _Reply, str, str], None] = getattr(
            self, "_" + route.handler
        )
        handler(request, reply, rest, method)

    # ---- helpers

    def _authz(self, request: Request) -> Authorizer | None:
        """
        The rights of the request's token (``None`` with ACLs off).

        :raises ConsulError: 403 ``ACL not found`` for an unknown token.
        """
        return self.agent.resolve_token(request_token(request, _query(request)))

    def _intention_namespaces(
        self, request: Request, query: dict[str, list[str]]
    ) -> None:
        """
        1.8.7's intention endpoints ignore ``?ns=`` and ``X-Consul-Namespace``
        (measured); from 1.9 they parse them, and Consul OSS refuses them.
        """
        if self.agent.newer_api:
            _no_namespaces(request, query)

    def _check_dc(self, options: QueryOptions, *, meta: bool = False) -> None:
        """
        Another datacenter is unreachable.  On catalog-backed reads Consul has
        already set (empty) query meta headers when the RPC fails.
        """
        if (
            options.datacenter is not None
            and options.datacenter != self.agent.datacenter
        ):
            raise ConsulError(
                500,
                "No path to datacenter",
                headers=_meta_headers(1, known_leader=False) if meta else (),
            )

    def _body(self, request: Request) -> bytes:
        content = request.content
        if content is None:
            return b""
        content.seek(0)
        data: bytes = content.read()
        return data

    def _after(
        self,
        reply: _Reply,
        waiting: Deferred[T],
        then: Callable[[T], None],
    ) -> None:
        """
        Answer with ``then`` once ``waiting`` fires; a client that goes away
        cancels it.
        """

        def cancel(failure: Failure) -> None:
            waiting.cancel()

        reply.request.notifyFinish().addErrback(cancel)
        waiting.addCallback(then).addErrback(reply.failure)

    def _rpc_blocking(
        self,
        reply: _Reply,
        options: QueryOptions,
        index: Callable[[], int],
        answer: Callable[[], None],
    ) -> None:
        """
        A server-side blocking query (``blockingQuery`` in Consul's RPC
        layer): at once without an index or when the data moved past it,
        else until it does or the wait (5 minutes by default, 10 at most)
        plus up to 1/16 of it as jitter runs out.
        """
        min_index = options.index
        if min_index == 0 or index() > min_index:
            answer()
            return
        timeout = options.wait
        if timeout > MAX_QUERY_TIME:
            timeout = MAX_QUERY_TIME
        elif timeout <= 0:
            timeout = DEFAULT_QUERY_TIME
        timeout += self.agent.rng.random() * (timeout / JITTER_FRACTION)
        waiting = self.agent.wait_until(lambda: index() > min_index, timeout)
        self._after(reply, waiting, lambda changed: answer())

    def _cache_blocking(
        self,
        reply: _Reply,
        options: QueryOptions,
        existed: bool,
        index: Callable[[], int],
        answer: Callable[[bool], None],
    ) -> None:
        """
        A read through a background-refreshed agent cache entry: a hit at
        once unless the caller blocks at (or above) its index; a blocking
        call has no jitter and, without a positive ``wait``, no timeout.
        """
        min_index = options.index
        if not (min_index > 0 and min_index >= index()):
            answer(existed)
            return
        timeout = options.wait if options.wait > 0 else None
        waiting = self.agent.wait_until(lambda: index() > min_index, timeout)
        self._after(reply, waiting, lambda changed: answer(False))

    # ---- agent

    def _agent_self(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        authz = self._authz(request)
        if authz is not None and not authz.allowed(
            "agent", self.agent.node_name, "read"
        ):
            raise permission_denied()
        reply.json(self.agent.agent_self())

    def _agent_services(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        query = _query(request)
        _no_namespaces(request, query)
        reply.json(self.agent.services_json(self._authz(request)))

    def _agent_service(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        query = _query(request)
        _no_namespaces(request, query)
        options = _query_options(request, query)
        authz = self._authz(request)
        digest = self.agent.service_json(rest, authz)[1]
        wanted = _get(query, "hash")

        def answer() -> None:
            try:
                body, digest = self.agent.service_json(rest, authz)
            except ConsulError as e:
                reply.error(e)
                return
            reply.json(body, [("X-Consul-Contenthash", digest)])

        if not wanted or wanted != digest:
            answer()
            return
        # agentLocalBlockingQuery: hash-based, 5 minutes by default, at most
        # 10, plus jitter.
        timeout = options.wait or DEFAULT_QUERY_TIME
        timeout = min(timeout, MAX_QUERY_TIME)
        timeout += self.agent.rng.random() * (timeout / JITTER_FRACTION)

        def moved() -> bool:
            try:
                return self.agent.service_json(rest)[1] != wanted
            except ConsulError:
                return True

        waiting = self.agent.wait_until(moved, timeout)
        self._after(reply, waiting, lambda changed: answer())

    def _agent_checks(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        query = _query(request)
        _no_namespaces(request, query)
        reply.json(self.agent.checks_json(self._authz(request)))

    def _service_register(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        query = _query(request)
        _no_namespaces(request, query)
        try:
            decoded = decode_go_json(self._body(request), _SERVICE)
        except (GoJSONError, GoDurationError) as e:
            raise ConsulError(400, f"Request decode failed: {e}") from None
        # Consul 1.8.7 replaces only for a bare flag or "true" (measured:
        # "1", "t" and "TRUE" do not).
        replace = "replace-existing-checks" in query and _get(
            query, "replace-existing-checks"
        ) in ("", "true")
        self.agent.register_service(
            service_definition(decoded),
            replace_existing_checks=replace,
            authz=self._authz(request),
        )
        reply.empty()

    def _service_deregister(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        _no_namespaces(request, _query(request))
        self.agent.deregister_service(rest, self._authz(request))
        reply.empty()

    def _check_status(
        self, request: Request, reply: _Reply, check_id: str, status: str
    ) -> None:
        query = _query(request)
        _no_namespaces(request, query)
        self.agent.update_ttl_check(
            check_id, status, _get(query, "note"), self._authz(request)
        )
        reply.empty()

    def _check_pass(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        self._check_status(request, reply, rest, "passing")

    def _check_warn(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        self._check_status(request, reply, rest, "warning")

    def _check_fail(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        self._check_status(request, reply, rest, "critical")

    def _check_update(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        _no_namespaces(request, _query(request))
        try:
            update = decode_go_json(self._body(request), _CHECK_UPDATE)
        except GoJSONError as e:
            raise ConsulError(400, f"Request decode failed: {e}") from None
        status = update["Status"] or ""
        if status not in ("passing", "warning", "critical"):
            raise ConsulError(400, f"Invalid check status: '{status}'")
        self.agent.update_ttl_check(
            rest, status, update["Output"] or "", self._authz(request)
        )
        reply.empty()

    # ---- Connect: CA, leaf, authorize

    def _agent_roots(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        options = _query_options(request, _query(request))
        self._check_dc(options)
        existed = self.agent.roots_cache_lookup()

        def answer(hit: bool) -> None:
            reply.json(
                self.agent.roots_json(),
                _cache_headers(hit)
                + _meta_headers(self.agent.roots_index, known_leader=False),
            )

        self._cache_blocking(
            reply, options, existed, lambda: self.agent.roots_index, answer
        )

    def _server_roots(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        options = _query_options(request, _query(request))
        self._check_dc(options, meta=True)

        def answer() -> None:
            reply.json(
                self.agent.roots_json(),
                _meta_headers(self.agent.roots_index, known_leader=False),
            )

        self._rpc_blocking(reply, options, lambda: self.agent.roots_index, answer)

    def _ca_configuration(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        options = _query_options(request, _query(request))
        self._check_dc(options)
        authz = self._authz(request)
        access = "read" if method == "GET" else "write"
        if authz is not None and not authz.allowed("operator", "", access):
            raise permission_denied()
        if method == "GET":
            reply.json(self.agent.ca_config_json())
            return
        try:
            decoded = decode_go_json(self._body(request), _CA_CONFIGURATION)
        except GoJSONError as e:
            raise ConsulError(400, f"Bad request: Request decode failed: {e}") from None
        self.agent.set_ca_config(
            CAConfigInput(
                provider=decoded["Provider"] or "",
                config=decoded["Config"],
                force_without_cross_signing=bool(decoded["ForceWithoutCrossSigning"]),
            )
        )
        reply.empty()

    def _leaf(self, request: Request, reply: _Reply, rest: str, method: str) -> None:
        query = _query(request)
        _no_namespaces(request, query)
        options = _query_options(request, query)
        authz = self._authz(request)
        if authz is not None and not authz.service_write(rest):
            raise permission_denied()
        waiting = self.agent.leaf(
            rest,
            min_index=options.index,
            wait=options.wait if options.wait > 0 else None,
            datacenter=options.datacenter,
        )

        def answer(leaf: LeafAnswer) -> None:
            reply.json(
                leaf.body,
                [
                    *_cache_headers(leaf.cache_hit, leaf.age),
                    ("X-Consul-Index", str(max(leaf.index, 1))),
                ],
            )

        self._after(reply, waiting, answer)

    def _authorize(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        _no_namespaces(request, _query(request))
        try:
            decoded = decode_go_json(self._body(request), _AUTHORIZE)
        except GoJSONError as e:
            raise ConsulError(400, f"Bad request: Request decode failed: {e}") from None
        authorized, reason, hit = self.agent.authorize(
            decoded["Target"] or "",
            decoded["ClientCertURI"] or "",
            self._authz(request),
        )
        reply.json({"Authorized": authorized, "Reason": reason}, _cache_headers(hit))

    # ---- intentions

    def _intentions(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        query = _query(request)
        self._intention_namespaces(request, query)
        options = _query_options(request, query)
        self._check_dc(options, meta=method == "GET")
        if method == "POST":
            try:
                decoded = decode_go_json(self._body(request), _INTENTION)
            except GoJSONError as e:
                raise ConsulError(500, f"Failed to decode request body: {e}") from None
            new_id = self.agent.intention_create(
                _intention_input(decoded), self._authz(request)
            )
            reply.json({"ID": new_id})
            return
        authz = self._authz(request)

        def answer() -> None:
            reply.json(
                self.agent.intentions_list(authz),
                _meta_headers(self.agent.intentions_index, known_leader=True),
            )

        self._rpc_blocking(reply, options, lambda: self.agent.intentions_index, answer)

    def _intentions_match(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        query = _query(request)
        self._intention_namespaces(request, query)
        options = _query_options(request, query)
        self._check_dc(options)
        by = query.get("by")
        if not by or len(by) != 1:
            raise ConsulError(500, "required query parameter 'by' not set")
        if by[0] not in ("source", "destination"):
            raise ConsulError(
                500, "'by' parameter must be one of 'source' or 'destination'"
            )
        names = query.get("name")
        if not names:
            raise ConsulError(500, "required query parameter 'name' not set")
        # Check the names and the token before blocking, as Consul does.
        authz = self._authz(request)
        self.agent.intentions_match(by[0], names, authz)

        def body() -> Any:
            return self.agent.intentions_match(by[0], names, authz)

        # Consul 1.8.7 serves match from the servers even with ?cached
        # (measured: no X-Cache header).
        self._rpc_blocking(
            reply,
            options,
            lambda: self.agent.intentions_index,
            lambda: reply.json(body()),
        )

    def _intentions_check(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        query = _query(request)
        self._intention_namespaces(request, query)
        options = _query_options(request, query)
        self._check_dc(options)
        for key in ("source", "destination"):
            if not query.get(key):
                raise ConsulError(500, f"required query parameter '{key}' not set")
        source_type = "consul"
        if query.get("source-type"):
            source_type = query["source-type"][0]
        allowed = self.agent.intentions_check(
            query["source"][0],
            query["destination"][0],
            source_type,
            self._authz(request),
        )
        reply.json({"Allowed": allowed})

    def _intention(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        query = _query(request)
        self._intention_namespaces(request, query)
        options = _query_options(request, query)
        self._check_dc(options)
        authz = self._authz(request)
        if rest == "exact" and self.agent.newer_api:
            self._intention_exact(request, reply, query, method, authz)
            return
        if method == "GET":
            reply.json(self.agent.intention_get(rest, authz))
        elif method == "PUT":
            try:
                decoded = decode_go_json(self._body(request), _INTENTION)
            except GoJSONError as e:
                raise ConsulError(
                    400, f"Bad request: Request decode failed: {e}"
                ) from None
            reply.json(
                {
                    "ID": self.agent.intention_update(
                        rest, _intention_input(decoded), authz
                    )
                }
            )
        else:
            self.agent.intention_delete(rest, authz)
            reply.json(True)

    # ---- health

    def _health_service(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        self._health(request, reply, rest, connect=False)

    def _health_connect(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        self._health(request, reply, rest, connect=True)

    def _catalog_service(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        self._catalog(request, reply, rest, connect=False)

    def _catalog_connect(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        self._catalog(request, reply, rest, connect=True)

    def _catalog(
        self, request: Request, reply: _Reply, name: str, *, connect: bool
    ) -> None:
        read = self._discovery_read(request, reply, name, connect=connect)
        if read is None:
            return
        self._serve_discovery(
            reply,
            read,
            "catalog",
            lambda: self.agent.catalog_index(name),
            lambda: self.agent.catalog(
                name,
                connect=connect,
                tags=read.tags,
                node_meta=read.node_meta,
                authz=read.authz,
            ),
        )

    def _health(
        self, request: Request, reply: _Reply, name: str, *, connect: bool
    ) -> None:
        read = self._discovery_read(request, reply, name, connect=connect)
        if read is None:
            return

        def entries() -> Any:
            # Consul reads ?passing after the query, so a bad value is only
            # reported once a blocking call returns.
            passing = False
            if "passing" in read.query:
                value = _get(read.query, "passing")
                if value:
                    try:
                        passing = _parse_bool(value)
                    except ValueError:
                        raise ConsulError(400, "Invalid value for ?passing") from None
                else:
                    passing = True
            return self.agent.health(
                name,
                connect=connect,
                passing=passing,
                tags=read.tags,
                node_meta=read.node_meta,
                authz=read.authz,
            )

        self._serve_discovery(
            reply,
            read,
            "health",
            lambda: self.agent.health_index(name, connect=connect),
            entries,
        )

    def _discovery_read(
        self, request: Request, reply: _Reply, name: str, *, connect: bool
    ) -> _DiscoveryRead | None:
        """
        The checks and parameters that ``/v1/catalog/service``,
        ``/v1/catalog/connect``, ``/v1/health/service`` and
        ``/v1/health/connect`` share, in Consul's order; ``None`` once a
        Connect read without ``service:read`` has been answered.

        :raises ConsulError: with Consul's status and message for a bad
            parameter, another datacenter, a missing name or an unknown token.
        """
        query = _query(request)
        _no_namespaces(request, query)
        options = _query_options(request, query)
        self._check_dc(options, meta=True)
        if not name:
            raise ConsulError(400, "Missing service name")
        _refuse_filter(query)
        tags = query.get("tag", [])
        node_meta = _node_meta(query)
        authz = self._authz(request)
        if self._connect_denied(reply, authz, name, connect, options):
            return None
        return _DiscoveryRead(
            name=name,
            connect=connect,
            query=query,
            options=options,
            tags=tags,
            node_meta=node_meta,
            authz=authz,
        )

    def _serve_discovery(
        self,
        reply: _Reply,
        read: _DiscoveryRead,
        kind: str,
        index: Callable[[], int],
        body: Callable[[], Any],
    ) -> None:
        """
        Answer a service read with ``body()`` and its query meta, through
        the agent cache under ``kind`` with ``?cached``, else as a blocking
        query.  A :class:`ConsulError` from ``body`` is the answer instead,
        also after a blocking wait.
        """

        def answer(cache_headers: list[tuple[str, str]]) -> None:
            reply.json(
                body(),
                cache_headers
                + _meta_headers(
                    index(), known_leader=True, consistency=read.options.consistency
                ),
            )

        options = read.options
        if options.cached:
            existed = self.agent.cache_lookup(
                (kind, read.connect, read.name.lower(), tuple(read.tags))
            )
            self._cache_blocking(
                reply, options, existed, index, lambda hit: answer(_cache_headers(hit))
            )
            return
        self._rpc_blocking(reply, options, index, lambda: answer([]))

    def _connect_denied(
        self,
        reply: _Reply,
        authz: Authorizer | None,
        name: str,
        connect: bool,
        options: QueryOptions,
    ) -> bool:
        """
        A Connect read without ``service:read`` on the service: Consul
        returns before its blocking query, so the answer is ``[]`` with
        index 1 and no known leader, at once even for a blocking call
        (acl-health-connect-anon-block.http).  A client watching it spins.
        """
        if not connect or authz is None or authz.service_read(name):
            return False
        reply.json(
            [],
            _meta_headers(1, known_leader=False, consistency=options.consistency),
        )
        return True

    # ---- Consul 1.9+: exact intentions and config entries (from the source)

    def _intention_exact(
        self,
        request: Request,
        reply: _Reply,
        query: dict[str, list[str]],
        method: str,
        authz: Authorizer | None,
    ) -> None:
        names = []
        for key in ("source", "destination"):
            if not _get(query, key):
                raise ConsulError(500, f"required query parameter '{key}' not set")
            names.append(_get(query, key))
        source, destination = names
        if method == "GET":
            # No meta headers on this one (IntentionGetExact has no setMeta).
            reply.json(self.agent.intention_exact_get(source, destination, authz))
            return
        if method == "DELETE":
            self.agent.intention_exact_delete(source, destination, authz)
            reply.json(True)
            return
        try:
            fields = decode_go_json(self._body(request), _EXACT_INTENTION)
        except GoJSONError as e:
            raise ConsulError(400, f"Bad request: Request decode failed: {e}") from None
        self.agent.intention_exact_put(source, destination, fields, authz)
        reply.json(True)

    def _config_apply(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        query = _query(request)
        _no_namespaces(request, query)
        options = _query_options(request, query)
        self._check_dc(options)
        try:
            decoded = decode_go_json(self._body(request), _CONFIG_ENTRY)
        except GoJSONError as e:
            raise ConsulError(
                400, f"Bad request: Request decoding failed: {e}"
            ) from None
        kind = decoded["Kind"] or ""
        if kind != "service-intentions" or not self.agent.newer_api:
            raise ConsulError(
                400,
                f"Bad request: Request decoding failed: invalid config entry kind: "
                f"{kind}",
            )
        for key in ("Namespace", "Partition"):
            if decoded[key] and decoded[key] != "default":
                raise ConsulError(
                    400,
                    f"Bad request: Request decoding failed: {key}s are a Consul "
                    "Enterprise feature",
                )
        cas = self._cas(query)
        authz = self._authz(request)
        sources = [src for src in decoded["Sources"] or [] if src is not None]
        reply.json(
            self.agent.config_apply(
                decoded["Name"] or "",
                sources,
                decoded["Meta"],
                cas=cas,
                authz=authz,
            )
        )

    def _cas(self, query: dict[str, list[str]]) -> int | None:
        if "cas" not in query:
            return None
        text = _get(query, "cas")
        if not re.fullmatch(r"[0-9]+", text) or int(text) >= 1 << 64:
            raise ConsulError(
                400, f"Bad request: Failed to parse 'cas' value: {go_quote(text)}"
            )
        return int(text)

    def _config_entry(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        query = _query(request)
        _no_namespaces(request, query)
        options = _query_options(request, query)
        self._check_dc(options, meta=method == "GET")
        kind, _, name = rest.partition("/")
        authz = self._authz(request)
        if method == "DELETE":
            if not name:
                raise ConsulError(
                    405, "method DELETE not allowed", allow="OPTIONS,GET,PUT"
                )
            reply.json(
                self.agent.config_delete(kind, name, cas=self._cas(query), authz=authz)
            )
            return

        def answer() -> None:
            try:
                body: Any = (
                    self.agent.config_get(kind, name, authz)
                    if name
                    else self.agent.config_list(kind, authz)
                )
            except ConsulError as e:
                reply.error(e)
                return
            reply.json(
                body,
                _meta_headers(
                    self.agent.config_index,
                    known_leader=True,
                    consistency=options.consistency,
                ),
            )

        # Errors (an unknown kind) before blocking.
        if name:
            self.agent.config_get(kind, name, authz)
        else:
            self.agent.config_list(kind, authz)
        self._rpc_blocking(reply, options, lambda: self.agent.config_index, answer)

    # ---- prepared queries

    def _queries(self, request: Request, reply: _Reply, rest: str, method: str) -> None:
        query = _query(request)
        options = _query_options(request, query)
        self._check_dc(options, meta=method == "GET")
        authz = self._authz(request)
        if method == "POST":
            reply.json(
                {"ID": self.agent.query_create(self._query_body(request), authz)}
            )
            return

        def answer() -> None:
            reply.json(
                self.agent.queries_list(authz),
                _meta_headers(
                    self.agent.queries_index,
                    known_leader=True,
                    consistency=options.consistency,
                ),
            )

        self._rpc_blocking(reply, options, lambda: self.agent.queries_index, answer)

    def _query_body(self, request: Request) -> QueryInput:
        try:
            d = decode_go_json(self._body(request), _QUERY)
        except GoJSONError as e:
            raise ConsulError(400, f"Request decode failed: {e}") from None
        service = d["Service"] or {}
        failover = service.get("Failover") or {}
        template = d["Template"] or {}
        dns = d["DNS"] or {}

        def strings(value: Any) -> tuple[str, ...] | None:
            return None if value is None else tuple(v or "" for v in value)

        def mapping(value: Any) -> dict[str, str] | None:
            return None if value is None else {k: v or "" for k, v in value.items()}

        return QueryInput(
            id=d["ID"] or "",
            name=d["Name"] or "",
            session=d["Session"] or "",
            token=d["Token"] or "",
            template_type=template.get("Type") or "",
            template_regexp=template.get("Regexp") or "",
            remove_empty_tags=bool(template.get("RemoveEmptyTags")),
            service=service.get("Service") or "",
            nearest_n=failover.get("NearestN") or 0,
            failover_datacenters=strings(failover.get("Datacenters")),
            only_passing=bool(service.get("OnlyPassing")),
            ignore_check_ids=strings(service.get("IgnoreCheckIDs")),
            near=service.get("Near") or "",
            tags=strings(service.get("Tags")),
            node_meta=mapping(service.get("NodeMeta")),
            service_meta=mapping(service.get("ServiceMeta")),
            connect=bool(service.get("Connect")),
            dns_ttl=dns.get("TTL") or "",
        )

    def _query_specific(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        query = _query(request)
        options = _query_options(request, query)
        if rest.endswith("/execute"):
            if method != "GET":
                raise ConsulError(405, f"method {method} not allowed", allow="GET")
            self._check_dc(options)
            limit = 0
            limit_text = _get(query, "limit")
            if limit_text:
                limit = _go_atoi(limit_text, "Bad limit: ")
            connect = False
            connect_text = _get(query, "connect")
            if connect_text:
                try:
                    connect = _parse_bool(connect_text)
                except ValueError:
                    raise ConsulError(
                        500,
                        "Error parsing 'connect' value: strconv.ParseBool: "
                        f"parsing {go_quote(connect_text)}: invalid syntax",
                    ) from None
            authz = self._authz(request)
            # Never blocking: index and wait are ignored, and the index
            # reported is 1 (query-execute-index.http).
            reply.json(
                self.agent.query_execute(
                    rest[: -len("/execute")], connect=connect, limit=limit, authz=authz
                ),
                _meta_headers(1, known_leader=True, consistency=options.consistency),
            )
            return
        self._check_dc(options, meta=method == "GET")
        authz = self._authz(request)
        if method == "GET":

            def answer() -> None:
                try:
                    body = self.agent.query_get(rest, authz)
                except ConsulError as e:
                    reply.error(e)
                    return
                reply.json(
                    body,
                    _meta_headers(
                        self.agent.queries_index,
                        known_leader=True,
                        consistency=options.consistency,
                    ),
                )

            self.agent.query_get(rest, authz)
            self._rpc_blocking(reply, options, lambda: self.agent.queries_index, answer)
        elif method == "PUT":
            self.agent.query_update(rest, self._query_body(request), authz)
            reply.empty()
        else:
            self.agent.query_delete(rest, authz)
            reply.empty()

    # ---- ACLs

    def _acl_policy_create(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        authz = self._acl_authz(request)
        try:
            decoded = decode_go_json(self._body(request), _ACL_POLICY)
        except GoJSONError as e:
            raise ConsulError(
                400, f"Bad request: Policy decoding failed: {e}"
            ) from None
        reply.json(
            self.agent.acl_policy_create(
                authz,
                name=decoded["Name"] or "",
                description=decoded["Description"] or "",
                rules=decoded["Rules"] or "",
            )
        )

    def _acl_token_create(
        self, request: Request, reply: _Reply, rest: str, method: str
    ) -> None:
        authz = self._acl_authz(request)
        try:
            decoded = decode_go_json(self._body(request), _ACL_TOKEN)
        except GoJSONError as e:
            raise ConsulError(400, f"Bad request: Token decoding failed: {e}") from None
        links = [
            (link["ID"] or "", link["Name"] or "")
            for link in decoded["Policies"] or []
            if link is not None
        ]
        identities = [
            identity["ServiceName"] or ""
            for identity in decoded["ServiceIdentities"] or []
            if identity is not None
        ]
        reply.json(
            self.agent.acl_token_create(
                authz,
                service_identities=identities,
                description=decoded["Description"] or "",
                accessor_id=decoded["AccessorID"] or "",
                secret_id=decoded["SecretID"] or "",
                policies=links,
                local=bool(decoded["Local"]),
            )
        )

    def _acl_authz(self, request: Request) -> Authorizer | None:
        if not self.agent.acls_enabled:
            # aclDisabled: before the token is looked at.
            raise ConsulError(401, "ACL support disabled")
        return self._authz(request)


# DevAgent.resource() adapts the agent to IResource: the agent does not
# import this module, the HTTP layer above it plugs itself in.
registerAdapter(AgentResource, DevAgent, IResource)  # type: ignore[no-untyped-call]


def _go_atoi(text: str, prefix: str) -> int:
    # strconv.Atoi, with its two error texts.
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ConsulError(
            500,
            f"{prefix}strconv.Atoi: parsing {go_quote(text)}: invalid syntax",
        )
    value = int(text)
    if not -(1 << 63) <= value < 1 << 63:
        raise ConsulError(
            500,
            f"{prefix}strconv.Atoi: parsing {go_quote(text)}: value out of range",
        )
    return value


def _refuse_filter(query: dict[str, list[str]]) -> None:
    if _get(query, "filter"):
        # Real Consul evaluates bexpr filters; refusing beats answering
        # unfiltered.  The status and headers are those of a filter the real
        # agent cannot evaluate.
        raise ConsulError(
            500,
            "Failed to create boolean expression evaluator: the development "
            "agent does not evaluate ?filter expressions; filter the results "
            "in the client, or test against a real Consul agent",
            headers=_meta_headers(1, known_leader=False),
        )


def _node_meta(query: dict[str, list[str]]) -> dict[str, str]:
    node_meta: dict[str, str] = {}
    for item in query.get("node-meta", []):
        key, _, value = item.partition(":")
        node_meta[key] = value
    return node_meta


def _intention_input(d: dict[str, Any]) -> IntentionInput:
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
