"""
The development agent's state and behaviour: the catalog with its checks, TTL
checks, intentions (and, from version 1.9, service-intentions config entries),
prepared queries, ACLs (:mod:`connect_native.devagent.acl`), the CA
configuration, the agent caches (roots, leaves,
authorize) and raft-like indexes, with real Consul 1.8.7's rules and messages.

:class:`DevAgent` is the whole agent; :mod:`connect_native.devagent.api` serves
it over HTTP.  Everything here is synchronous and driven by an injected
``IReactorTime``: reads return the current answer, and blocking reads wait on
:meth:`DevAgent.wait_until` or on the leaf cache, both cancellable Deferreds.
Time comes only from the clock and randomness only from the injected
``random.Random``, so a test on ``Clock`` sees the same schedule every run.

The reference is ``REAL-BEHAVIOUR.md`` (measured on Consul 1.8.7) and the
captures in ``tests/fixtures/real-1.8.7/``; where those say nothing, Consul's
source (agent cache, leaf cache type, state store) is followed.  Known
differences are listed in ``docs/devagent.rst``.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import ipaddress
import json
import math
import random
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from attrs import define, evolve, field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.resource import IResource

from connect_native import _logging
from connect_native.devagent.acl import (
    ACL_NOT_FOUND,
    GLOBAL_MANAGEMENT_ID,
    GLOBAL_MANAGEMENT_NAME,
    Authorizer,
    Policy,
    Rules,
    RulesError,
    Token,
    digest,
    is_uuid,
    parse_rules,
    policy_problem,
)
from connect_native.devagent.ca import DevCA, IssuedLeaf, LeafRequestError
from connect_native.devagent.config import (
    SERVICE_INTENTIONS,
    IntentionsEntry,
    entry_problem,
    normalized,
)
from connect_native.devagent.gocompat import (
    GoDurationError,
    format_config_duration,
    format_go_duration,
    go_quote,
    parse_go_duration,
    rfc3339_nano,
)
from connect_native.devagent.query import (
    PreparedQuery,
    QueryInput,
    filter_entries,
    query_problem,
)

__all__ = [
    "ConsulError",
    "DevAgent",
    "LeafAnswer",
]

log = Logger(observer=_logging.observer)

CONSUL_VERSION = "1.8.7"
NANOSECOND = 1e-9
# The agent cache's fetch timeout for blocking types (agent/cache/cache.go:
# "fOpts.Timeout = 10 * time.Minute" when the type sets none).
CACHE_FETCH_TIMEOUT = 600.0
# agent/cache-types/connect_ca_leaf.go caChangeJitterWindow.
CA_CHANGE_JITTER = 30.0
# Leaves whose whole lifetime is shorter than this are renewed at once
# (calculateSoftExpiry).
MIN_LEAF_LIFETIME_FOR_JITTER = 600.0
# check_update_interval: an output-only change of a check reaches the
# catalog after interval/2 + RandomStagger(interval) (local/state.go).
CHECK_UPDATE_INTERVAL = 300.0
CHECK_OUTPUT_MAX_SIZE = 4096
SIDECAR_MIN_PORT = 21000
SIDECAR_MAX_PORT = 21255
# Service metadata limits (structs.ValidateServiceMetadata).
META_MAX_PAIRS = 64
META_KEY_MAX = 128
META_VALUE_MAX = 512
INTENTION_DESCRIPTION_MAX = 512
MAX_LEAF_TTL = 100 * 365 * 86400.0

HEALTH_PASSING = "passing"
HEALTH_WARNING = "warning"
HEALTH_CRITICAL = "critical"
VALID_STATUSES = (HEALTH_PASSING, HEALTH_WARNING, HEALTH_CRITICAL)

KIND_TYPICAL = ""
KIND_CONNECT_PROXY = "connect-proxy"
KIND_MESH_GATEWAY = "mesh-gateway"
GATEWAY_KINDS = ("mesh-gateway", "terminating-gateway", "ingress-gateway")
WILDCARD = "*"
DEFAULT_NAMESPACE = "default"


class ConsulError(Exception):
    """
    An answer real Consul gives as an error: ``status`` and the exact
    plain-text body.  ``allow`` is the ``Allow`` header of a 405; ``headers``
    are other headers the real agent sends with this error.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        allow: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.allow = allow
        self.headers = tuple(headers)


def _parse_version(text: object) -> tuple[int, int, int] | None:
    if not isinstance(text, str):
        return None
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        return None
    return (int(match[1]), int(match[2]), int(match[3] or 0))


def permission_denied(cause: str = "") -> ConsulError:
    """
    ``acl.ErrPermissionDenied`` (403 ``Permission denied``), or a
    ``PermissionDeniedError`` with its cause.
    """
    return ConsulError(
        403, f"Permission denied: {cause}" if cause else "Permission denied"
    )


_SERVICE_IDENTITY_NAME = re.compile(r"^[a-z0-9]([a-z0-9\-_]*[a-z0-9])?$")


def _bad_request(reason: str) -> ConsulError:
    # agent.BadRequestError: the HTTP layer prefixes "Bad request: ".
    return ConsulError(400, f"Bad request: {reason}")


def multierror(messages: Sequence[str]) -> str:
    """
    hashicorp/go-multierror's text, which Consul sends for validation errors.
    """
    head = (
        "1 error occurred:"
        if len(messages) == 1
        else f"{len(messages)} errors occurred:"
    )
    return head + "".join(f"\n\t* {m}" for m in messages) + "\n\n"


def random_uuid(rng: random.Random) -> str:
    """
    A UUID as Consul makes them (``go-uuid``): 16 random bytes, no version
    bits.
    """
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _stagger(rng: random.Random, interval: float) -> float:
    """
    ``lib.RandomStagger``: uniform in [0, interval).
    """
    if interval <= 0:
        return 0.0
    return rng.random() * interval


# --------------------------------------------------------------------------
# SPIFFE IDs as Consul's connect.ParseCertURI reads them


@frozen
class SpiffeService:
    """
    A service SPIFFE ID as Consul parses it: no check of the host.
    """

    host: str
    namespace: str
    datacenter: str
    service: str


_SPIFFE_SERVICE = re.compile(r"^/ns/([^/]+)/dc/([^/]+)/svc/([^/]+)$")
_SPIFFE_AGENT = re.compile(r"^/agent/client/dc/([^/]+)/id/([^/]+)$")
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


class CertURIError(ValueError):
    """
    Not a Connect identifier (``connect.ParseCertURIFromString`` failed).
    """


def _path_unescape(segment: str) -> str:
    if re.search(r"%(?![0-9A-Fa-f]{2})", segment):
        raise CertURIError(f"invalid URL escape in {segment!r}")
    raw = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), segment)
    # The escapes are bytes of UTF-8; Go keeps invalid sequences as bytes.
    return raw.encode("latin-1").decode("utf-8", errors="replace")


def parse_cert_uri(text: str) -> SpiffeService | str:
    """
    Consul 1.8.7's ``connect.ParseCertURIFromString``: a service identity, or
    the kind of another identity (``"agent"``, ``"signing"``).

    :raises CertURIError: when it is not a Connect identifier at all.
    """
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise CertURIError("net/url: invalid control character in URL")
    scheme_match = _URL_SCHEME.match(text)
    if scheme_match is None or scheme_match.group(1).lower() != "spiffe":
        raise CertURIError("SPIFFE ID must have 'spiffe' scheme")
    rest = text[scheme_match.end() :]
    rest = rest.split("#", 1)[0].split("?", 1)[0]
    if not rest.startswith("//"):
        raise CertURIError("SPIFFE ID is not in the expected format")
    authority, slash, path = rest[2:].partition("/")
    path = slash + path
    host = authority.rpartition("@")[2]
    if ":" in host and not host.startswith("["):
        port = host.rpartition(":")[2]
        if port and not port.isdigit():
            raise CertURIError(f"invalid port {port!r} after host")
    if match := _SPIFFE_SERVICE.match(path):
        ns, dc, service = (_path_unescape(s) for s in match.groups())
        return SpiffeService(host=host, namespace=ns, datacenter=dc, service=service)
    if _SPIFFE_AGENT.match(path):
        return "agent"
    if path == "" and host.find(".") > 0:
        return "signing"
    raise CertURIError("SPIFFE ID is not in the expected format")


# --------------------------------------------------------------------------
# Records


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
class _Service:
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
class _Check:
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


@frozen
class Intention:
    """
    A Consul 1.8 intention.  Times are POSIX seconds.
    """

    id: str
    description: str
    source_ns: str
    source_name: str
    destination_ns: str
    destination_name: str
    source_type: str
    action: str
    default_addr: str
    default_port: int
    meta: Mapping[str, str]
    precedence: int
    created_at: float
    updated_at: float
    hash: str
    create_index: int
    modify_index: int
    # Consul 1.9+: L7 permissions (plain JSON), and whether the intention
    # has an ID (made through the ID API) or comes from a config entry.
    permissions: tuple[Mapping[str, Any], ...] = ()
    legacy: bool = True

    def to_json(self) -> dict[str, Any]:
        if not self.legacy:
            # ToIntention, marshalled with omitempty and no zero times.
            out: dict[str, Any] = {}
            if self.description:
                out["Description"] = self.description
            out.update(
                {
                    "SourceNS": self.source_ns,
                    "SourceName": self.source_name,
                    "DestinationNS": self.destination_ns,
                    "DestinationName": self.destination_name,
                    "SourceType": self.source_type,
                }
            )
            if self.action:
                out["Action"] = self.action
            if self.permissions:
                out["Permissions"] = [dict(p) for p in self.permissions]
            if self.meta:
                out["Meta"] = dict(self.meta)
            out.update(
                {
                    "Precedence": self.precedence,
                    "CreateIndex": self.create_index,
                    "ModifyIndex": self.modify_index,
                }
            )
            return out
        return {
            "ID": self.id,
            "Description": self.description,
            "SourceNS": self.source_ns,
            "SourceName": self.source_name,
            "DestinationNS": self.destination_ns,
            "DestinationName": self.destination_name,
            "SourceType": self.source_type,
            "Action": self.action,
            "DefaultAddr": self.default_addr,
            "DefaultPort": self.default_port,
            "Meta": dict(self.meta),
            "Precedence": self.precedence,
            "CreatedAt": rfc3339_nano(self.created_at),
            "UpdatedAt": rfc3339_nano(self.updated_at),
            "Hash": self.hash,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }

    def describe(self, *, newer: bool) -> str:
        """
        ``Intention.String()``: 1.8's form, or 1.9+'s (``default/api =>
        default/web (ID: ..., Precedence: 9, Action: ALLOW)``, the ID only
        for intentions made through the ID API, ``Permissions: n`` for L7).
        """
        if not newer:
            return str(self)
        id_part = f"ID: {self.id}, " if self.legacy else ""
        detail = (
            f"Permissions: {len(self.permissions)}"
            if self.permissions
            else f"Action: {self.action.upper()}"
        )
        return (
            f"{self.source_ns}/{self.source_name} => "
            f"{self.destination_ns}/{self.destination_name} "
            f"({id_part}Precedence: {self.precedence}, {detail})"
        )

    def __str__(self) -> str:
        # structs.Intention.String() in 1.8.
        return (
            f"{self.action.upper()} {self.source_ns}/{self.source_name} => "
            f"{self.destination_ns}/{self.destination_name} "
            f"(ID: {self.id}, Precedence: {self.precedence})"
        )

    def folded(self) -> tuple[str, str, str, str]:
        """
        Source and destination as Consul's intentions table indexes them,
        lowercased (memdb ``Lowercase: true``): what ``match`` finds and
        what a duplicate is (``evil => Web`` after ``Evil => web``).
        """
        return (
            self.source_ns.lower(),
            self.source_name.lower(),
            self.destination_ns.lower(),
            self.destination_name.lower(),
        )

    def sort_key(self) -> tuple[int, str, str, str, str]:
        # IntentionPrecedenceSorter: precedence descending, then the names.
        return (
            -self.precedence,
            self.source_ns,
            self.source_name,
            self.destination_ns,
            self.destination_name,
        )


def _count_exact(ns: str, name: str) -> int:
    if ns == WILDCARD:
        return 0
    return 1 if name == WILDCARD else 2


def intention_precedence(
    source_ns: str, source_name: str, destination_ns: str, destination_name: str
) -> int:
    """
    ``Intention.UpdatePrecedence``: 9 exact to exact, 8 ``*`` to exact, 6
    exact to ``*``, 5 ``*`` to ``*`` (namespaces exact).
    """
    maximum = {2: 9, 1: 6, 0: 3}[_count_exact(destination_ns, destination_name)]
    return maximum - (2 - _count_exact(source_ns, source_name))


@frozen
class IntentionInput:
    """
    The fields of an intention a client writes (decoded request body).
    """

    id: str = ""
    description: str = ""
    source_ns: str = ""
    source_name: str = ""
    destination_ns: str = ""
    destination_name: str = ""
    source_type: str = ""
    action: str = ""
    default_addr: str = ""
    default_port: int = 0
    meta: Mapping[str, str] | None = None


@frozen
class LeafAnswer:
    """
    What the leaf endpoint answers: the leaf JSON, its index, and the cache
    metadata (``X-Cache``, ``Age`` in seconds on a hit).
    """

    body: dict[str, Any]
    index: int
    cache_hit: bool
    age: float | None


@frozen
class CAConfigInput:
    """
    A decoded ``PUT /v1/connect/ca/configuration`` body.
    """

    provider: str = ""
    config: Mapping[str, Any] | None = None
    force_without_cross_signing: bool = False


# --------------------------------------------------------------------------
# The leaf cache (agent/cache-types/connect_ca_leaf.go on agent/cache)


@define
class _LeafEntry:
    leaf: IssuedLeaf
    index: int
    fetched_at: float
    force_expire_after: float | None = None
    fetch: _LeafFetch | None = None
    waiters: list[Callable[[], None]] = field(factory=list)


class _LeafFetch:
    """
    One background fetch of the leaf cache: it runs until a new certificate
    is issued (at the renewal point, or after a root rotation and its jitter)
    or for ten minutes, whichever comes first, independently of the requests
    that started it, as in Consul's agent cache.
    """

    def __init__(self, agent: DevAgent, key: tuple[str, str], entry: _LeafEntry):
        self._agent = agent
        self._key = key
        self._entry = entry
        self._timeout: IDelayedCall | None = None
        self._expiry: IDelayedCall | None = None
        self._expires_at = 0.0
        self.done = False

    def start(self) -> None:
        agent, entry = self._agent, self._entry
        now = agent.now()
        earliest, latest = _soft_expiry(now, entry.leaf)
        self._expires_at = earliest + _stagger(agent.rng, latest - earliest)
        if (
            entry.force_expire_after is not None
            and entry.force_expire_after < self._expires_at
        ):
            self._expires_at = entry.force_expire_after
        if self._expires_at <= now:
            self.renew()
            return
        self._timeout = agent.clock.callLater(CACHE_FETCH_TIMEOUT, self.complete, None)
        self._expiry = agent.clock.callLater(self._expires_at - now, self.renew)
        # Consul's fetch starts by checking the roots once, so a blocking call
        # at a stale leaf's index schedules its renewal.
        self.roots_changed()

    def roots_changed(self) -> None:
        if self.done:
            return
        agent, entry = self._agent, self._entry
        if agent.ca.active_root_id == entry.leaf.root_id:
            return
        now = agent.now()
        delay = _stagger(agent.rng, CA_CHANGE_JITTER)
        entry.force_expire_after = now + delay
        if entry.force_expire_after < self._expires_at:
            self._expires_at = entry.force_expire_after
            if self._expiry is not None and self._expiry.active():
                self._expiry.cancel()
            self._expiry = agent.clock.callLater(delay, self.renew)

    def renew(self) -> None:
        if self.done:
            return
        service, datacenter = self._key
        try:
            leaf = self._agent._issue_leaf(service, datacenter)
        except Exception:
            log.failure(
                "renewing the leaf certificate for {service!r}", service=service
            )
            self.complete(None)
            return
        self.complete(leaf)

    def complete(self, leaf: tuple[IssuedLeaf, int] | None) -> None:
        if self.done:
            return
        self.done = True
        for call in (self._timeout, self._expiry):
            if call is not None and call.active():
                call.cancel()
        entry = self._entry
        entry.fetch = None
        entry.fetched_at = self._agent.now()
        if leaf is not None:
            entry.leaf, entry.index = leaf
            entry.force_expire_after = None
        waiters, entry.waiters = entry.waiters, []
        for waiter in waiters:
            waiter()


def _soft_expiry(now: float, leaf: IssuedLeaf) -> tuple[float, float]:
    """
    ``calculateSoftExpiry``: the window in which a blocking caller's leaf is
    renewed, 60 % to 90 % of its lifetime; ``(now, now)`` when it is due.
    """
    valid_after = leaf.valid_after.timestamp()
    lifetime = leaf.valid_before.timestamp() - valid_after
    if lifetime < MIN_LEAF_LIFETIME_FOR_JITTER:
        return now, now
    soft = valid_after + lifetime * 0.6
    hard = valid_after + lifetime * 0.9
    if now > hard:
        return now, now
    return max(soft, now), hard


# --------------------------------------------------------------------------
# The agent


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
        parsed_version = _parse_version(version)
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
        self.clock = clock
        self.version = version
        # The 1.9+ layer: exact intentions, service-intentions config
        # entries with L7 permissions, namespaces refused on intentions.
        self.newer_api = parsed_version >= (1, 9, 0)
        self._version = parsed_version
        self.rng: random.Random = secrets.SystemRandom() if rng is None else rng
        self.datacenter = datacenter
        self.node_name = node_name
        self.node_id = random_uuid(self.rng)
        self.node_address = "127.0.0.1"
        # The port it is served on, as agent/self reports it; whoever listens
        # sets it.
        self.http_port = 8500

        # Indexes as a fresh `consul agent -dev` has them: CA configuration
        # at 5, the first root at 9, the node at 10/11, 12 applied.
        self._index = 5
        self._ca_config_create_index = 5
        self._ca_config_modify_index = 5
        self._index = 8
        self._ca_index_step = 1
        if ca is None:
            ca = DevCA(
                clock, datacenter=datacenter, rng=self.rng, next_index=self._ca_index
            )
        self.ca = ca
        self._index = max(self._index, 9)
        self._roots_modify_index = 9
        self._root_indexes: dict[str, list[int]] = {
            root.id: [9, 9] for root in ca.roots().roots
        }
        self._node_create_index = 10
        self._node_modify_index = 11
        self._serf_index = 10
        self._index = 12

        self._ca_config: dict[str, Any] = {
            "IntermediateCertTTL": "8760h",
            "LeafCertTTL": format_config_duration(ca.leaf_ttl),
            "RotationPeriod": "2160h",
        }
        self._ca_force_without_cross_signing = False
        self._ca_key_pair = ("", "")

        self._services: dict[str, _Service] = {}
        self._checks: dict[str, _Check] = {}
        self._svc_index: dict[str, int] = {}
        self._connect_index: dict[str, int] = {}
        self._services_table_index = self._node_modify_index

        self._intentions: dict[str, Intention] = {}
        self._intentions_index = 0
        self._intention_entries: dict[str, IntentionsEntry] = {}
        self._config_index = 0

        self._queries: dict[str, PreparedQuery] = {}
        self._queries_index = 0

        self._leaves: dict[tuple[str, str], _LeafEntry] = {}
        self._roots_cached = False
        self._authorize_cached: set[tuple[str, str]] = set()
        self._cached_keys: set[tuple[Any, ...]] = set()

        self._watchers: list[Callable[[], None]] = []

        self.acl_default_policy = acl_default_policy
        self._master_token = master_token
        self._policies: dict[str, Policy] = {}
        self._tokens: dict[str, Token] = {}
        if acl_default_policy is not None:
            # The builtin policy every ACL-enabled cluster has.
            self._policies[GLOBAL_MANAGEMENT_ID] = Policy(
                id=GLOBAL_MANAGEMENT_ID,
                name=GLOBAL_MANAGEMENT_NAME,
                description="Builtin Policy that grants unlimited access",
                rules_text="",
                rules=Rules(),
                hash=digest(GLOBAL_MANAGEMENT_ID),
                create_index=self._index,
                modify_index=self._index,
            )

    # ----------------------------------------------------------------------
    # time, indexes and change notification

    def now(self) -> float:
        return self.clock.seconds()

    @property
    def index(self) -> int:
        """
        The last raft index applied.
        """
        return self._index

    def _bump(self, step: int = 1) -> int:
        self._index += step
        return self._index

    def _ca_index(self) -> int:
        return self._bump(self._ca_index_step)

    def _changed(self) -> None:
        for watcher in list(self._watchers):
            watcher()

    def wait_until(
        self, ready: Callable[[], bool], timeout: float | None
    ) -> Deferred[bool]:
        """
        Fire with ``True`` as soon as ``ready()`` is true after a change of
        state, or with ``False`` after ``timeout`` seconds (never, when
        ``None``).  Cancelling it forgets the wait.
        """
        timer: IDelayedCall | None = None

        def stop() -> None:
            if check in self._watchers:
                self._watchers.remove(check)
            if timer is not None and timer.active():
                timer.cancel()

        result: Deferred[bool] = Deferred(lambda d: stop())

        def check() -> None:
            if not result.called and ready():
                stop()
                result.callback(True)

        def expire() -> None:
            if not result.called:
                stop()
                result.callback(False)

        self._watchers.append(check)
        if timeout is not None:
            timer = self.clock.callLater(max(timeout, 0.0), expire)
        return result

    # ----------------------------------------------------------------------
    # agent/self

    def agent_self(self) -> dict[str, Any]:
        """
        ``GET /v1/agent/self``: the sections real Consul sends, with the
        configuration that matters to clients (``DebugConfig`` is a subset).
        """
        node_tags = {
            "acls": "0",
            "build": f"{self.version}:",
            "dc": self.datacenter,
            "ft_fs": "1",
            "id": self.node_id,
            "port": "8300",
            "raft_vsn": "3",
            "role": "consul",
            "segment": "",
            "vsn": "2",
            "vsn_max": "3",
            "vsn_min": "2",
            "wan_join_port": "8302",
        }
        index = str(self._index)
        ttl_checks = sum(1 for c in self._checks.values() if c.is_ttl)
        return {
            "Config": {
                "Datacenter": self.datacenter,
                "NodeName": self.node_name,
                "NodeID": self.node_id,
                "Revision": "",
                "Server": True,
                "Version": self.version,
            },
            "DebugConfig": self._debug_config(),
            "Coord": {
                "Vec": [0, 0, 0, 0, 0, 0, 0, 0],
                "Error": 1.5,
                "Adjustment": 0,
                "Height": 0.00001,
            },
            "Member": {
                "Name": self.node_name,
                "Addr": self.node_address,
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
                    "checks": str(len(self._checks)),
                    "services": str(len(self._services)),
                },
                "build": {
                    "prerelease": "",
                    "revision": "",
                    "version": self.version,
                },
                "consul": {
                    "acl": "disabled",
                    "bootstrap": "false",
                    "known_datacenters": "1",
                    "leader": "true",
                    "leader_addr": f"{self.node_address}:8300",
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
                "serf_lan": _serf_stats(),
                "serf_wan": _serf_stats(),
            },
            "Meta": {"consul-network-segment": ""},
            "xDS": {
                "SupportedProxies": {"envoy": ["1.14.5", "1.13.6", "1.12.7", "1.11.2"]}
            },
        }

    def _debug_config(self) -> dict[str, Any]:
        address = self.node_address
        return {
            "ACLDatacenter": self.datacenter,
            "ACLDefaultPolicy": self.acl_default_policy or "allow",
            "ACLsEnabled": self.acl_default_policy is not None,
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
            "Datacenter": self.datacenter,
            "DefaultQueryTime": "5m0s",
            "DevMode": True,
            "HTTPAddrs": [f"tcp://{address}:{self.http_port}"],
            "HTTPPort": self.http_port,
            "HTTPUseCache": True,
            "MaxQueryTime": "10m0s",
            "NodeID": self.node_id,
            "NodeMeta": {},
            "NodeName": self.node_name,
            "PrimaryDatacenter": self.datacenter,
            "Revision": "",
            "ServerMode": True,
            "TaggedAddresses": self._node_tagged_addresses(),
            "Version": self.version,
            "VersionPrerelease": "",
        }

    def _node_tagged_addresses(self) -> dict[str, str]:
        address = self.node_address
        return {
            "lan": address,
            "lan_ipv4": address,
            "wan": address,
            "wan_ipv4": address,
        }

    # ----------------------------------------------------------------------
    # CA roots and configuration

    @property
    def roots_index(self) -> int:
        """
        The index of the roots endpoints: the roots or the CA configuration,
        whichever changed last (a configuration change without a new root
        still moves it, as measured).
        """
        return max(self._roots_modify_index, self._ca_config_modify_index)

    def roots_json(self) -> dict[str, Any]:
        roots = self.ca.roots()
        body = roots.to_json()
        for root in body["Roots"]:
            indexes = self._root_indexes.get(root["ID"])
            if indexes is not None:
                root["CreateIndex"], root["ModifyIndex"] = indexes
        return body

    def roots_cache_lookup(self) -> bool:
        """
        Whether the agent's roots cache already held an entry (``X-Cache``),
        filling it.
        """
        hit, self._roots_cached = self._roots_cached, True
        return hit

    def ca_config_json(self) -> dict[str, Any]:
        return {
            "Provider": "consul",
            "Config": {
                k: copy.deepcopy(self._ca_config[k]) for k in sorted(self._ca_config)
            },
            "State": None,
            "ForceWithoutCrossSigning": self._ca_force_without_cross_signing,
            "CreateIndex": self._ca_config_create_index,
            "ModifyIndex": self._ca_config_modify_index,
        }

    def set_ca_config(self, request: CAConfigInput) -> None:
        """
        ``PUT /v1/connect/ca/configuration``: check and store the
        configuration, set the leaf lifetime, and rotate the root when the
        supplied ``PrivateKey``/``RootCert`` change.

        :raises ConsulError: with Consul's message (500).
        """
        raw = dict(request.config or {})
        if request.provider != "consul":
            raise ConsulError(500, _other_provider_problem(request.provider, raw))
        parsed = _parse_consul_ca_config(raw)
        problem = _validate_consul_ca_config(parsed)
        if problem is not None:
            raise ConsulError(500, f"error configuring provider: {problem}")
        leaf_ttl = parsed["LeafCertTTL"] * NANOSECOND
        if not 0 < leaf_ttl <= MAX_LEAF_TTL:
            # Consul would accept these with SkipValidate and sign leaves that
            # are already expired or whose dates overflow.
            raise ConsulError(
                500,
                "error configuring provider: the development agent needs a "
                "LeafCertTTL above 0 and at most 876000h (100 years), not "
                + format_go_duration(parsed["LeafCertTTL"]),
            )
        key_pair = (parsed["PrivateKey"], parsed["RootCert"])
        rotate = key_pair != self._ca_key_pair
        before = self.ca.active_root_id
        index_before = self._index
        if rotate:
            private_key, root_cert = key_pair
            if root_cert and not private_key:
                raise ConsulError(
                    500,
                    "error configuring provider: must provide a private key when "
                    "providing a root cert",
                )
            if private_key and not root_cert:
                raise ConsulError(
                    500,
                    "error configuring provider: the development agent needs "
                    "RootCert together with PrivateKey (Consul would generate a "
                    "root for the key)",
                )
            if root_cert and "-----BEGIN" not in root_cert:
                raise ConsulError(
                    500, "error parsing root fingerprint: no PEM-encoded data found"
                )
            self._ca_index_step = 1
            try:
                if private_key:
                    self.ca.rotate(private_key, root_cert)
                else:
                    self.ca.rotate()
            except ValueError as e:
                raise ConsulError(500, f"error configuring provider: {e}") from None
        self.ca.set_leaf_ttl(leaf_ttl)
        self._ca_key_pair = key_pair
        self._ca_config = _go_json_numbers(raw)
        self._ca_force_without_cross_signing = request.force_without_cross_signing
        rotated = self.ca.active_root_id != before
        if rotated:
            if self._index == index_before:
                self._bump()
            roots_index = self._index
            for root in self.ca.roots().roots:
                if root.id not in self._root_indexes:
                    self._root_indexes[root.id] = [roots_index, roots_index]
                else:
                    self._root_indexes[root.id][1] = roots_index
            self._roots_modify_index = roots_index
            log.info(
                "CA root rotated: {old} -> {new}",
                old=before,
                new=self.ca.active_root_id,
            )
        self._ca_config_modify_index = self._bump()
        if rotated:
            for entry in self._leaves.values():
                if entry.fetch is not None:
                    entry.fetch.roots_changed()
        self._changed()

    # ----------------------------------------------------------------------
    # leaf certificates

    def _issue_leaf(self, service: str, datacenter: str) -> tuple[IssuedLeaf, int]:
        # Each signing is two raft writes in Consul (the serial, then the
        # certificate), so leaf indexes go up by two.
        before = self._index
        self._ca_index_step = 2
        try:
            leaf = self.ca.sign_leaf(service, datacenter=datacenter)
        finally:
            self._ca_index_step = 1
        if self._index == before:
            # A CA not wired to this agent's indexes.
            self._bump(2)
        index = self._index
        log.info(
            "issued leaf {serial} for {service!r} at index {index}",
            serial=leaf.serial_number,
            service=service,
            index=index,
        )
        return leaf, index

    def _leaf_answer(self, entry: _LeafEntry, *, hit: bool) -> LeafAnswer:
        body = entry.leaf.to_json()
        body["CreateIndex"] = body["ModifyIndex"] = entry.index
        age = self.now() - entry.fetched_at if hit else None
        return LeafAnswer(body=body, index=entry.index, cache_hit=hit, age=age)

    def leaf(
        self,
        service: str,
        *,
        min_index: int = 0,
        wait: float | None = None,
        datacenter: str | None = None,
    ) -> Deferred[LeafAnswer]:
        """
        ``GET /v1/agent/connect/ca/leaf/<service>`` through the agent's leaf
        cache: a cached leaf at once (a hit, even if a rotation made it
        stale), the first leaf for a name at once, and for a blocking call at
        the current index a leaf renewed at 60-90 % of its lifetime, 0-30 s
        after a root rotation, at once when its lifetime is under ten
        minutes, or the same leaf after ``wait`` (never, for ``None``).

        :raises ConsulError: for a name Consul refuses or another datacenter.
        """
        dc = self.datacenter if datacenter is None else datacenter
        if dc != self.datacenter:
            raise ConsulError(500, "No path to datacenter")
        key = (service, dc)
        entry = self._leaves.get(key)
        hit = entry is not None
        if entry is None:
            try:
                leaf, index = self._issue_leaf(service, dc)
            except LeafRequestError as e:
                raise ConsulError(500, str(e)) from None
            entry = _LeafEntry(leaf=leaf, index=index, fetched_at=self.now())
            self._leaves[key] = entry
        if not (min_index > 0 and min_index >= entry.index):
            return succeed(self._leaf_answer(entry, hit=hit))

        timer: IDelayedCall | None = None
        cache_entry = entry

        def stop() -> None:
            if waiter in cache_entry.waiters:
                cache_entry.waiters.remove(waiter)
            if timer is not None and timer.active():
                timer.cancel()

        result: Deferred[LeafAnswer] = Deferred(lambda d: stop())

        def waiter() -> None:
            # A fetch finished: answer if the leaf moved past the caller's
            # index, else keep the cache fetching.
            if result.called:
                return
            if cache_entry.index > min_index:
                stop()
                result.callback(self._leaf_answer(cache_entry, hit=False))
            else:
                cache_entry.waiters.append(waiter)
                self.clock.callLater(0, self._start_leaf_fetch, key)

        def expire() -> None:
            if not result.called:
                stop()
                result.callback(self._leaf_answer(cache_entry, hit=False))

        if wait is not None and wait > 0:
            timer = self.clock.callLater(wait, expire)
        entry.waiters.append(waiter)
        self._start_leaf_fetch(key)
        return result

    def _start_leaf_fetch(self, key: tuple[str, str]) -> None:
        entry = self._leaves.get(key)
        if entry is None or entry.fetch is not None or not entry.waiters:
            return
        fetch = _LeafFetch(self, key, entry)
        entry.fetch = fetch
        fetch.start()

    # ----------------------------------------------------------------------
    # ACLs

    @property
    def acls_enabled(self) -> bool:
        return self.acl_default_policy is not None

    def resolve_token(self, token: str) -> Authorizer | None:
        """
        What ``token`` may do: ``None`` with ACLs off (everything), the
        anonymous token's rights (none: the default policy decides) for an
        empty one, everything for the master token.

        :raises ConsulError: 403 ``ACL not found`` for an unknown token.
        """
        if self.acl_default_policy is None:
            return None
        default_allow = self.acl_default_policy == "allow"
        if not token:
            return Authorizer(Rules(), default_allow)
        if token == self._master_token:
            return Authorizer(Rules(), default_allow, management=True)
        found = self._tokens.get(token)
        if found is None:
            raise ConsulError(403, ACL_NOT_FOUND)
        policies = [self._policies[p] for p in found.policy_ids if p in self._policies]
        identities = [
            parse_rules(
                f'service "{name}" {{ policy = "write" }}\n'
                f'service "{name}-sidecar-proxy" {{ policy = "write" }}\n'
                'service_prefix "" { policy = "read" }\n'
                'node_prefix "" { policy = "read" }'
            )
            for name in found.service_identities
        ]
        return Authorizer(
            Rules.merge([*(p.rules for p in policies), *identities]),
            default_allow,
            management=any(p.id == GLOBAL_MANAGEMENT_ID for p in policies),
        )

    def _acl_write(self, authz: Authorizer | None) -> None:
        if authz is None:
            raise ConsulError(401, "ACL support disabled")
        if not authz.allowed("acl", "", "write"):
            raise permission_denied()

    def acl_policy_create(
        self,
        authz: Authorizer | None,
        *,
        name: str,
        description: str,
        rules: str,
    ) -> dict[str, Any]:
        """
        ``PUT /v1/acl/policy``: the new policy.

        :raises ConsulError: 401 with ACLs off, 403 without ``acl =
            "write"``, 500 with Consul's message for a bad name or rules.
        """
        self._acl_write(authz)
        problem = policy_problem(name, [p.name for p in self._policies.values()])
        if problem is not None:
            raise ConsulError(500, problem)
        try:
            parsed = parse_rules(rules)
        except RulesError as e:
            raise ConsulError(500, str(e)) from None
        index = self._bump()
        policy_id = random_uuid(self.rng)
        policy = Policy(
            id=policy_id,
            name=name,
            description=description,
            rules_text=rules,
            rules=parsed,
            hash=digest(name, description, rules),
            create_index=index,
            modify_index=index,
        )
        self._policies[policy_id] = policy
        log.info("ACL policy created: {name}", name=name)
        return policy.to_json()

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
        """
        ``PUT /v1/acl/token``: the new token, linked to ``policies`` given as
        ``(id, name)`` pairs (either may be empty), and to the service
        identities named (Consul's templated policy: ``service:write`` on the
        name and its sidecar proxy, read on every service and node).

        :raises ConsulError: 401 with ACLs off, 403 without ``acl =
            "write"``, 500 with Consul's message for a bad or taken ID or an
            unknown policy.
        """
        self._acl_write(authz)
        taken_accessors = {t.accessor_id for t in self._tokens.values()}
        if accessor_id:
            if not is_uuid(accessor_id):
                raise ConsulError(500, "Invalid Token: AccessorID is not a valid UUID")
            if accessor_id in taken_accessors:
                raise ConsulError(500, "Invalid Token: AccessorID is already in use")
        if secret_id:
            if not is_uuid(secret_id):
                raise ConsulError(500, "Invalid Token: SecretID is not a valid UUID")
            if secret_id in self._tokens or secret_id == self._master_token:
                raise ConsulError(500, "Invalid Token: SecretID is already in use")
        linked: list[str] = []
        for policy_id, policy_name in policies:
            if policy_id:
                if policy_id not in self._policies:
                    raise ConsulError(
                        500, f"No such ACL policy with ID {go_quote(policy_id)}"
                    )
                found = policy_id
            else:
                by_name = [
                    p.id for p in self._policies.values() if p.name == policy_name
                ]
                if not by_name:
                    raise ConsulError(
                        500, f"No such ACL policy with name {go_quote(policy_name)}"
                    )
                found = by_name[0]
            if found not in linked:
                linked.append(found)
        for name in service_identities:
            if not _SERVICE_IDENTITY_NAME.match(name):
                raise ConsulError(
                    500,
                    f"Invalid Token: ServiceIdentity.ServiceName {go_quote(name)} "
                    "is not valid (lowercase alphanumeric characters, '-' and '_')",
                )
        index = self._bump()
        token = Token(
            accessor_id=accessor_id or random_uuid(self.rng),
            secret_id=secret_id or random_uuid(self.rng),
            description=description,
            policy_ids=tuple(linked),
            service_identities=tuple(service_identities),
            local=local,
            create_time=rfc3339_nano(self.now()),
            hash=digest(description, linked, local),
            create_index=index,
            modify_index=index,
        )
        self._tokens[token.secret_id] = token
        log.info("ACL token created: {description}", description=description)
        return token.to_json({p.id: p.name for p in self._policies.values()})

    # ----------------------------------------------------------------------
    # authorize

    def authorize(
        self, target: str, client_cert_uri: str, authz: Authorizer | None = None
    ) -> tuple[bool, str, bool]:
        """
        ``POST /v1/agent/connect/authorize`` with ACLs off: the first
        intention for ``target`` (by precedence) whose source matches the
        client's service and namespace decides; with none, access is allowed.
        The trust domain, datacenter and serial are not checked, as in Consul.

        :returns: ``(authorized, reason, cache_hit)``.
        :raises ConsulError: 400 with Consul's message for bad input.
        """
        if not target:
            raise _bad_request("Target service must be specified")
        try:
            identity = parse_cert_uri(client_cert_uri)
        except CertURIError:
            raise _bad_request("ClientCertURI not a valid Connect identifier") from None
        if not isinstance(identity, SpiffeService):
            raise _bad_request("ClientCertURI not a valid Service identifier")
        # After validation, as real (acl-authz-anon-bad-uri.http).
        if authz is not None and not authz.service_write(target):
            raise permission_denied()
        key = (DEFAULT_NAMESPACE, target)
        hit = key in self._authorize_cached
        self._authorize_cached.add(key)
        for ixn in self._match("destination", DEFAULT_NAMESPACE, target):
            if ixn.source_ns not in (WILDCARD, identity.namespace):
                continue
            if ixn.source_name not in (WILDCARD, identity.service):
                continue
            if not self.newer_api:
                return ixn.action == "allow", f"Matched intention: {ixn}", hit
            described = ixn.describe(newer=True)
            if ixn.permissions:
                # L7 intentions deny at L4: the HTTP layer must decide.
                return False, f"Matched L7 intention: {described}", hit
            return ixn.action == "allow", f"Matched L4 intention: {described}", hit
        if authz is None:
            if self._version >= (1, 11, 0):
                return True, "Default behavior configured by ACLs", hit
            return True, "ACLs disabled, access is allowed by default", hit
        return (
            authz.intention_default_allow(),
            "Default behavior configured by ACLs",
            hit,
        )

    # ----------------------------------------------------------------------
    # intentions

    @property
    def intentions_index(self) -> int:
        return max(self._intentions_index, 1)

    def intentions_list(self, authz: Authorizer | None = None) -> list[dict[str, Any]]:
        """
        ``GET /v1/connect/intentions``: those the token may read (by their
        destination), without a hint that others were left out.
        """
        return [
            i.to_json()
            for i in sorted(self._all_intentions(), key=Intention.sort_key)
            if authz is None or authz.intention_read(i.destination_name)
        ]

    def _all_intentions(self) -> list[Intention]:
        """
        The intentions made through the ID API and, from 1.9, those of the
        ``service-intentions`` config entries (``ToIntention``).
        """
        out = list(self._intentions.values())
        for entry in self._intention_entries.values():
            for src in entry.sources:
                out.append(
                    Intention(
                        id="",
                        description=src.description,
                        source_ns=src.namespace,
                        source_name=src.name,
                        destination_ns=DEFAULT_NAMESPACE,
                        destination_name=entry.name,
                        source_type=src.type,
                        action=src.action,
                        default_addr="",
                        default_port=0,
                        meta=dict(entry.meta or {}),
                        precedence=src.precedence,
                        created_at=0.0,
                        updated_at=0.0,
                        hash="",
                        create_index=entry.create_index,
                        modify_index=entry.modify_index,
                        permissions=src.permissions,
                        legacy=False,
                    )
                )
        return out

    def _match(self, by: str, namespace: str, name: str) -> list[Intention]:
        # state.IntentionMatch: (ns, name), (ns, *) and (*, *), looked up in
        # a lowercased index, so "Web" finds "evil => web" and "WEB".
        namespace, name = namespace.lower(), name.lower()
        wanted = {(namespace, name), (namespace, WILDCARD)}
        if namespace != WILDCARD:
            wanted.add((WILDCARD, WILDCARD))
        found = []
        for ixn in self._all_intentions():
            folded = ixn.folded()
            pair = folded[2:] if by == "destination" else folded[:2]
            if pair in wanted:
                found.append(ixn)
        return sorted(found, key=Intention.sort_key)

    def intentions_match(
        self, by: str, names: Sequence[str], authz: Authorizer | None = None
    ) -> dict[str, list[dict[str, Any]] | None]:
        """
        ``GET /v1/connect/intentions/match``.

        :raises ConsulError: 500 with Consul's messages.
        """
        if by not in ("source", "destination"):
            raise ConsulError(
                500, "'by' parameter must be one of 'source' or 'destination'"
            )
        if authz is not None:
            for raw in names:
                _, name = _parse_match_name(raw)
                if name and not authz.intention_read(name):
                    raise permission_denied()
        out: dict[str, list[dict[str, Any]] | None] = {}
        for raw in names:
            namespace, name = _parse_match_name(raw)
            matched = self._match(by, namespace, name)
            # A nil slice through Consul's RPC: null, not [].
            out[raw] = [i.to_json() for i in matched] or None
        return out

    def intentions_check(
        self,
        source: str,
        destination: str,
        source_type: str,
        authz: Authorizer | None = None,
    ) -> bool:
        """
        ``GET /v1/connect/intentions/check``: with ACLs on, it needs
        ``service:read`` on the destination, and without a matching
        intention the default policy decides.
        """
        if source_type != "consul":
            raise ConsulError(500, f"unsupported SourceType: {go_quote(source_type)}")
        src_ns, src = _parse_match_name(source)
        dst_ns, dst = _parse_match_name(destination)
        if authz is not None and not authz.service_read(dst):
            raise permission_denied()
        for ixn in self._match("destination", dst_ns, dst):
            if ixn.source_ns not in (WILDCARD, src_ns):
                continue
            if ixn.source_name not in (WILDCARD, src):
                continue
            # An L7 intention counts as a deny here.
            return ixn.action == "allow" and not ixn.permissions
        # Consul asks the anonymous token: the default policy.
        return authz is None or self.acl_default_policy == "allow"

    def intention_get(
        self, intention_id: str, authz: Authorizer | None = None
    ) -> dict[str, Any]:
        """
        :raises ConsulError: 404 ``Intention not found``, or 400 for an ID
            that is not a UUID.
        """
        problem = _uuid_problem(intention_id)
        if problem is not None:
            raise _bad_request(f"failed intention lookup: index error: {problem}")
        ixn = self._intentions.get(intention_id.lower())
        if ixn is None:
            raise ConsulError(404, "Intention not found")
        if authz is not None and not authz.intention_read(ixn.destination_name):
            raise permission_denied()
        return ixn.to_json()

    def intention_create(
        self, given: IntentionInput, authz: Authorizer | None = None
    ) -> str:
        """
        ``POST /v1/connect/intentions``: the new intention's ID.

        :raises ConsulError: 500 with Consul's message.
        """
        if given.id:
            raise ConsulError(500, "ID must be empty when creating a new intention")
        # Before validation, as real (acl-intention-create-anon.http).
        if authz is not None and not authz.intention_write(given.destination_name):
            raise permission_denied()
        now = self.now()
        ixn = self._checked_intention(
            given, intention_id=random_uuid(self.rng), created_at=now, create_index=0
        )
        for other in self._all_intentions():
            if other.folded() == ixn.folded():
                raise ConsulError(
                    500,
                    "duplicate intention found: "
                    + other.describe(newer=self.newer_api),
                )
        index = self._bump()
        ixn = evolve(ixn, create_index=index, modify_index=index)
        self._intentions[ixn.id] = ixn
        self._intentions_index = index
        log.info("intention created: {ixn}", ixn=str(ixn))
        self._changed()
        return ixn.id

    def intention_update(
        self, intention_id: str, given: IntentionInput, authz: Authorizer | None = None
    ) -> str:
        """
        ``PUT /v1/connect/intentions/<id>``: the ID in the URL wins over one
        in the body, ``CreatedAt`` and ``CreateIndex`` are kept.  With ACLs
        on, it needs ``intentions = "write"`` on the new and the old
        destination.
        """
        if authz is not None and not authz.intention_write(given.destination_name):
            raise permission_denied()
        existing = self._intention_to_change(intention_id, "modify", authz)
        ixn = self._checked_intention(
            given,
            intention_id=existing.id,
            created_at=existing.created_at,
            create_index=existing.create_index,
        )
        for other in self._intentions.values():
            if other.id != existing.id and other.folded() == ixn.folded():
                raise ConsulError(500, f"duplicate intention found: {other}")
        index = self._bump()
        ixn = evolve(ixn, modify_index=index)
        self._intentions[ixn.id] = ixn
        self._intentions_index = index
        log.info("intention updated: {ixn}", ixn=str(ixn))
        self._changed()
        return ixn.id

    def intention_delete(
        self, intention_id: str, authz: Authorizer | None = None
    ) -> None:
        existing = self._intention_to_change(intention_id, "delete", authz)
        del self._intentions[existing.id]
        self._intentions_index = self._bump()
        log.info("intention deleted: {ixn}", ixn=str(existing))
        self._changed()

    def _intention_to_change(
        self, intention_id: str, verb: str, authz: Authorizer | None
    ) -> Intention:
        """
        The stored intention an update or delete names, as Consul's apply
        endpoint looks it up before changing it.

        :param verb: ``modify`` or ``delete``, for Consul's message.
        :raises ConsulError: 500 for an ID that is not a UUID or names no
            intention, 403 without ``intentions = "write"`` on its
            destination.
        """
        problem = _uuid_problem(intention_id)
        if problem is not None:
            raise ConsulError(
                500,
                "Intention lookup failed: failed intention lookup: index error: "
                + problem,
            )
        existing = self._intentions.get(intention_id.lower())
        if existing is None:
            raise ConsulError(
                500, f"Cannot {verb} non-existent intention: '{intention_id}'"
            )
        if authz is not None and not authz.intention_write(existing.destination_name):
            raise permission_denied()
        return existing

    def _checked_intention(
        self,
        given: IntentionInput,
        *,
        intention_id: str,
        created_at: float,
        create_index: int,
    ) -> Intention:
        # Consul 1.8.7 OSS stores any namespace it is given.
        source_ns = given.source_ns or DEFAULT_NAMESPACE
        destination_ns = given.destination_ns or DEFAULT_NAMESPACE
        source_type = given.source_type or "consul"
        meta = dict(given.meta or {})
        problems = _intention_problems(
            source_ns=source_ns,
            source_name=given.source_name,
            destination_ns=destination_ns,
            destination_name=given.destination_name,
            description=given.description,
            meta=meta,
            action=given.action,
            source_type=source_type,
        )
        if problems:
            raise ConsulError(500, multierror(problems))
        precedence = intention_precedence(
            source_ns, given.source_name, destination_ns, given.destination_name
        )
        # A new intention is created and updated at one instant.
        now = created_at if create_index == 0 else self.now()
        digest = hashlib.sha256(
            json.dumps(
                [
                    intention_id,
                    given.description,
                    source_ns,
                    given.source_name,
                    destination_ns,
                    given.destination_name,
                    source_type,
                    given.action,
                    given.default_addr,
                    given.default_port,
                    sorted(meta.items()),
                    precedence,
                ]
            ).encode("utf-8")
        ).digest()
        return Intention(
            id=intention_id,
            description=given.description,
            source_ns=source_ns,
            source_name=given.source_name,
            destination_ns=destination_ns,
            destination_name=given.destination_name,
            source_type=source_type,
            action=given.action,
            default_addr=given.default_addr,
            default_port=given.default_port,
            meta=meta,
            precedence=precedence,
            created_at=created_at,
            updated_at=now,
            hash=base64.b64encode(digest).decode("ascii"),
            create_index=create_index,
            modify_index=create_index,
        )

    # ----------------------------------------------------------------------
    # catalog: services and checks

    def services_json(self, authz: Authorizer | None = None) -> dict[str, Any]:
        return {
            sid: s.agent_json()
            for sid, s in sorted(self._services.items())
            if authz is None or authz.service_read(s.name)
        }

    def service_json(
        self, service_id: str, authz: Authorizer | None = None
    ) -> tuple[dict[str, Any], str]:
        """
        ``GET /v1/agent/service/<id>``: the service and its content hash.
        """
        service = self._services.get(service_id)
        if service is None:
            raise ConsulError(404, f"unknown service ID: {service_id}")
        if authz is not None and not authz.service_read(service.name):
            raise permission_denied()
        body = service.agent_json()
        digest = hashlib.sha256(
            json.dumps(body, sort_keys=True).encode("utf-8")
        ).hexdigest()[:16]
        out = dict(body)
        # ContentHash sits after EnableTagOverride, as in api.AgentService.
        ordered: dict[str, Any] = {}
        for key, value in out.items():
            ordered[key] = value
            if key == "EnableTagOverride":
                ordered["ContentHash"] = digest
        return ordered, digest

    def checks_json(self, authz: Authorizer | None = None) -> dict[str, Any]:
        return {
            cid: c.to_json(self.node_name, catalog=False)
            for cid, c in sorted(self._checks.items())
            if authz is None or self._check_readable(c, authz)
        }

    def _check_readable(self, check: _Check, authz: Authorizer) -> bool:
        service = self._services.get(check.service_id)
        if service is not None:
            return authz.service_read(service.name)
        return authz.node_read(self.node_name)

    def register_service(
        self,
        definition: ServiceDefinition,
        *,
        replace_existing_checks: bool = False,
        authz: Authorizer | None = None,
    ) -> None:
        """
        ``PUT /v1/agent/service/register``.

        :raises ConsulError: 400 with Consul's message.
        """
        service, checks = self._validated_service(definition)
        sidecar: tuple[_Service, list[CheckDefinition]] | None = None
        if definition.sidecar_given:
            sidecar = self._sidecar_for(service, definition.sidecar)
        if authz is not None:
            # vetServiceRegister, after validation (acl-register-anon.http).
            names = [service.name]
            if service.kind == KIND_CONNECT_PROXY:
                names.append(service.proxy.destination_service_name)
            if sidecar is not None:
                names.append(sidecar[0].name)
            for name in names:
                if not authz.service_write(name):
                    raise permission_denied(f"Missing service:write on {name}")
        all_checks = checks + (sidecar[1] if sidecar is not None else [])
        if any(check.is_script for check in all_checks):
            # enable_script_checks is off, as on a default agent.
            raise ConsulError(
                500,
                "Scripts are disabled on this agent from remote calls; to enable, "
                "configure 'enable_script_checks' to true",
            )
        self._apply_registration(service, checks, replace_existing_checks)
        if sidecar is not None:
            sidecar_service, sidecar_checks = sidecar
            self._services[service.id].sidecar_id = sidecar_service.id
            self._apply_registration(
                sidecar_service, sidecar_checks, replace_existing_checks
            )
        self._refresh_aliases()
        self._changed()

    def _validated_service(
        self, d: ServiceDefinition
    ) -> tuple[_Service, list[CheckDefinition]]:
        if not d.name:
            raise ConsulError(400, "Missing service name")
        try:
            address = ipaddress.ip_address(d.address) if d.address else None
        except ValueError:
            address = None
        if address is not None and address.is_unspecified:
            raise ConsulError(400, "Invalid service address")
        if d.weights is not None:
            passing, warning = d.weights
            if passing < 1:
                raise ConsulError(
                    400, "Invalid Weights: Passing must be greater than 0"
                )
            if warning < 0:
                raise ConsulError(
                    400, "Invalid Weights: Warning must be greater or equal than 0"
                )
        meta_problem = _meta_problem(d.meta or {})
        if meta_problem is not None:
            raise ConsulError(400, f"Invalid Service Meta: {meta_problem}")
        problems = _node_service_problems(d)
        if problems:
            raise ConsulError(400, multierror(problems))
        checks: list[CheckDefinition] = []
        for check in d.checks:
            problem = check.validate()
            if problem is not None:
                raise ConsulError(400, f"Invalid check: {problem}")
            checks.append(check)
        for check in checks:
            if check.status and check.status not in VALID_STATUSES:
                raise ConsulError(
                    400, "Status for checks must 'passing', 'warning', 'critical'"
                )
        return self._node_service(d), checks

    def _node_service(self, d: ServiceDefinition) -> _Service:
        try:
            address = ipaddress.ip_address(d.address) if d.address else None
        except ValueError:
            address = None
        tagged = dict(d.tagged_addresses or {})
        if address is not None:
            family = "ipv4" if address.version == 4 else "ipv6"
            for key in (f"lan_{family}", f"wan_{family}"):
                tagged.setdefault(key, (d.address, d.port))
        proxy = d.proxy or ProxyConfig()
        if d.kind != KIND_CONNECT_PROXY and d.kind not in GATEWAY_KINDS:
            # Consul keeps Proxy only on proxies and gateways.
            proxy = ProxyConfig()
        return _Service(
            id=d.id or d.name,
            name=d.name,
            kind=d.kind,
            tags=tuple(d.tags or ()),
            address=d.address,
            tagged_addresses=tagged,
            meta=None if d.meta is None else dict(d.meta),
            port=d.port,
            weights=d.weights or (1, 1),
            enable_tag_override=d.enable_tag_override,
            proxy=proxy,
            connect_native=d.connect_native,
        )

    def _sidecar_for(
        self, parent: _Service, given: ServiceDefinition | None
    ) -> tuple[_Service, list[CheckDefinition]]:
        # agent/sidecar_service.go sidecarServiceFromNodeService.
        given = given or ServiceDefinition()
        sidecar_id = f"{parent.id}-sidecar-proxy"
        port = given.port
        if not port:
            existing = self._services.get(sidecar_id)
            used = {
                s.port
                for s in self._services.values()
                if s.kind == KIND_CONNECT_PROXY and s.id != sidecar_id
            }
            if existing is not None and existing.port:
                port = existing.port
            else:
                port = next(
                    (
                        p
                        for p in range(SIDECAR_MIN_PORT, SIDECAR_MAX_PORT + 1)
                        if p not in used
                    ),
                    0,
                )
            if not port:
                raise ConsulError(
                    400,
                    "Invalid SidecarService: no port provided for sidecar_service "
                    "and none left in the configured range",
                )
        proxy = given.proxy or ProxyConfig()
        proxy = ProxyConfig(
            destination_service_name=parent.name,
            destination_service_id=parent.id,
            local_service_address=proxy.local_service_address or "127.0.0.1",
            local_service_port=proxy.local_service_port or parent.port,
            config=proxy.config,
            upstreams=proxy.upstreams,
            mesh_gateway_mode=proxy.mesh_gateway_mode,
            expose_checks=proxy.expose_checks,
            expose_paths=proxy.expose_paths,
        )
        tags = given.tags if given.tags else parent.tags
        meta = dict(given.meta) if given.meta else parent.meta
        checks = [c for c in given.checks if not c.is_empty()]
        if not checks:
            checks = [
                CheckDefinition(
                    name="Connect Sidecar Listening",
                    tcp=f"{proxy.local_service_address}:{port}",
                    interval=10_000_000_000,
                ),
                CheckDefinition(
                    name=f"Connect Sidecar Aliasing {parent.id}",
                    alias_service=parent.id,
                ),
            ]
        service = _Service(
            id=sidecar_id,
            name=given.name or f"{parent.name}-sidecar-proxy",
            kind=KIND_CONNECT_PROXY,
            tags=tuple(tags or ()),
            address=given.address,
            tagged_addresses=dict(given.tagged_addresses or {}),
            meta=meta,
            port=port,
            weights=given.weights or (1, 1),
            enable_tag_override=given.enable_tag_override,
            proxy=proxy,
            connect_native=False,
        )
        return service, checks

    def _apply_registration(
        self,
        service: _Service,
        definitions: list[CheckDefinition],
        replace_existing_checks: bool,
    ) -> None:
        previous = self._services.get(service.id)
        index = self._index + 1
        touched: set[str] = {service.name.lower()}
        changed = False
        if previous is None:
            service.create_index = service.modify_index = index
            changed = True
        else:
            service.create_index = previous.create_index
            service.modify_index = previous.modify_index
            service.sidecar_id = previous.sidecar_id
            if previous.catalog_json() != service.catalog_json():
                service.modify_index = index
                changed = True
                touched.add(previous.name.lower())
        self._services[service.id] = service

        new_ids: list[str] = []
        for position, definition in enumerate(definitions, start=1):
            check_id = definition.check_id
            if not check_id:
                check_id = f"service:{service.id}"
                if len(definitions) > 1:
                    check_id += f":{position}"
            new_ids.append(check_id)
            status = definition.status or HEALTH_CRITICAL
            check = _Check(
                check_id=check_id,
                name=definition.name or f"Service '{service.name}' check",
                notes=definition.notes,
                service_id=service.id,
                service_name=service.name,
                service_tags=service.tags,
                definition=definition,
                status=status,
                catalog_status=status,
            )
            old = self._checks.get(check_id)
            if old is not None:
                # Re-registering keeps the check's status and output, and
                # syncs them at once (a deferred output change included).
                check.status, check.output = old.status, old.output
                check.catalog_status, check.catalog_output = old.status, old.output
                check.last_output = old.last_output
                check.create_index = old.create_index
                check.modify_index = old.modify_index
                old.stop_timers()
                if old.to_json(self.node_name, catalog=True) != check.to_json(
                    self.node_name, catalog=True
                ):
                    check.modify_index = index
                    changed = True
            else:
                check.create_index = check.modify_index = index
                changed = True
            self._checks[check_id] = check
            if check.is_ttl:
                self._arm_ttl(check)
        stale = [
            c
            for c in self._checks.values()
            if c.service_id == service.id
            and c.check_id not in new_ids
            and replace_existing_checks
        ]
        for c in stale:
            c.stop_timers()
            del self._checks[c.check_id]
            changed = True
        for c in self._checks.values():
            if c.service_id == service.id and c.service_tags != service.tags:
                c.service_tags = service.tags
        if changed:
            self._bump()
            self._touch_names(touched, index)
            if (
                service.kind == KIND_CONNECT_PROXY
                and service.proxy.destination_service_name
            ):
                self._touch_connect(service.proxy.destination_service_name, index)
            if previous is not None and previous.connect_name:
                self._touch_connect(previous.connect_name, index)
            log.info(
                "service registered: {id} ({name}) at index {index}",
                id=service.id,
                name=service.name,
                index=index,
            )

    def _touch_names(self, names: Iterable[str], index: int) -> None:
        for name in names:
            self._svc_index[name.lower()] = index

    def _touch_connect(self, name: str, index: int) -> None:
        self._connect_index[name.lower()] = index

    def _touch_service(self, service: _Service, index: int) -> None:
        self._touch_names([service.name], index)
        if (
            service.kind == KIND_CONNECT_PROXY
            and service.proxy.destination_service_name
        ):
            self._touch_connect(service.proxy.destination_service_name, index)

    def deregister_service(
        self, service_id: str, authz: Authorizer | None = None
    ) -> None:
        """
        ``PUT /v1/agent/service/deregister/<id>``: the service, its checks
        and its sidecar go; an unknown ID is not an error in 1.8.7 with ACLs
        off, a 500 with them on (vetServiceUpdate, measured).
        """
        service = self._services.get(service_id)
        if authz is not None:
            if service is None:
                # Go's %q of a structs.ServiceID.
                raise ConsulError(
                    500, f"Unknown service {{{go_quote(service_id)} {{}}}}"
                )
            if not authz.service_write(service.name):
                raise permission_denied(f"Missing service:write on {service.name}")
        if service is None:
            return
        index = self._bump()
        for victim in [service, self._services.get(service.sidecar_id or "")]:
            if victim is None:
                continue
            del self._services[victim.id]
            for check in [
                c for c in self._checks.values() if c.service_id == victim.id
            ]:
                check.stop_timers()
                del self._checks[check.check_id]
            self._touch_service(victim, index)
            log.info("service deregistered: {id}", id=victim.id)
        self._services_table_index = index
        self._refresh_aliases()
        self._changed()

    def _arm_ttl(self, check: _Check) -> None:
        if check.ttl_timer is not None and check.ttl_timer.active():
            check.ttl_timer.cancel()
        check.ttl_timer = self.clock.callLater(
            check.definition.ttl * NANOSECOND, self._ttl_expired, check.check_id
        )

    def _ttl_expired(self, check_id: str) -> None:
        check = self._checks.get(check_id)
        if check is None:
            return
        check.ttl_timer = None
        output = "TTL expired"
        if check.last_output:
            output += f" (last output before timeout follows): {check.last_output}"
        log.info("check {id} TTL expired", id=check_id)
        self._set_check(check, HEALTH_CRITICAL, output)
        self._refresh_aliases()

    def update_ttl_check(
        self,
        check_id: str,
        status: str,
        output: str,
        authz: Authorizer | None = None,
    ) -> None:
        """
        ``PUT /v1/agent/check/pass|warn|fail|update/<id>``.

        :raises ConsulError: 500 ``CheckID "x" does not have associated TTL``
            for an unknown or non-TTL check (``Unknown check "x"`` for an
            unknown one with ACLs on, acl-check-pass-unknown-anon.http); 403
            without ``service:write`` on its service.
        """
        check = self._checks.get(check_id)
        if authz is not None:
            if check is None:
                raise ConsulError(500, f"Unknown check {go_quote(check_id)}")
            owner = self._services.get(check.service_id)
            if owner is not None:
                if not authz.service_write(owner.name):
                    raise permission_denied(f"Missing service:write on {owner.name}")
            elif not authz.allowed("node", self.node_name, "write"):
                raise permission_denied(f"Missing node:write on {self.node_name}")
        if check is None or not check.is_ttl:
            raise ConsulError(
                500, f"CheckID {go_quote(check_id)} does not have associated TTL"
            )
        limit = check.definition.output_max_size or CHECK_OUTPUT_MAX_SIZE
        raw = output.encode("utf-8", errors="replace")
        if len(raw) > limit:
            output = (
                raw[:limit].decode("utf-8", errors="replace")
                + f" ... (captured {limit} of {len(raw)} bytes)"
            )
        check.last_output = output
        self._arm_ttl(check)
        self._set_check(check, status, output)
        self._refresh_aliases()

    def _set_check(self, check: _Check, status: str, output: str) -> None:
        if check.status == status and check.output == output:
            return
        if check.status == status:
            # Output-only changes reach the catalog later (local state's
            # deferred sync), so they wake no catalog watcher now.
            check.output = output
            if check.deferred_sync is None:
                delay = CHECK_UPDATE_INTERVAL / 2 + _stagger(
                    self.rng, CHECK_UPDATE_INTERVAL
                )
                check.deferred_sync = self.clock.callLater(
                    delay, self._deferred_sync, check.check_id
                )
            return
        check.status, check.output = status, output
        self._sync_check(check)

    def _refresh_aliases(self) -> None:
        """
        Run the alias checks, as the agent does when the checks they mirror
        change (agent/checks/alias.go).  Aliases of aliases settle within a
        few rounds.
        """
        for _ in range(8):
            moved = False
            for check in sorted(self._checks.values(), key=lambda c: c.check_id):
                if check.definition.type != "alias":
                    continue
                status, output = self._alias_result(check.definition)
                if (status, output) != (check.status, check.output):
                    self._set_check(check, status, output)
                    moved = True
            if not moved:
                return

    def _alias_result(self, definition: CheckDefinition) -> tuple[str, str]:
        node, service_id = definition.alias_node, definition.alias_service
        if node not in ("", self.node_name):
            return HEALTH_PASSING, "No checks found."
        if service_id and service_id not in self._services:
            return (
                HEALTH_CRITICAL,
                f"Service {service_id} could not be found on node {node}",
            )
        health, message = HEALTH_PASSING, "No checks found."
        for check in sorted(self._checks.values(), key=lambda c: c.check_id):
            if check.service_id != service_id:
                continue
            if check.status in (HEALTH_CRITICAL, HEALTH_WARNING):
                health = check.status
                message = (
                    f"Aliased check {go_quote(check.name)} failing: {check.output}"
                )
                if check.status == HEALTH_CRITICAL:
                    break
            # Consul resets the message after a warning too.
            message = "All checks passing."
        return health, message

    def _deferred_sync(self, check_id: str) -> None:
        check = self._checks.get(check_id)
        if check is None:
            return
        check.deferred_sync = None
        self._sync_check(check)

    def _sync_check(self, check: _Check) -> None:
        if (check.catalog_status, check.catalog_output) == (check.status, check.output):
            return
        check.catalog_status, check.catalog_output = check.status, check.output
        index = self._bump()
        check.modify_index = index
        service = self._services.get(check.service_id)
        if service is not None:
            self._touch_service(service, index)
        self._changed()

    # ----------------------------------------------------------------------
    # health

    def _node_json(self) -> dict[str, Any]:
        return {
            "ID": self.node_id,
            "Node": self.node_name,
            "Address": self.node_address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": self._node_tagged_addresses(),
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": self._node_create_index,
            "ModifyIndex": self._node_modify_index,
        }

    def _serf_check_json(self) -> dict[str, Any]:
        return {
            "Node": self.node_name,
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
            return max(self._services_table_index, 1)
        index = self._svc_index.get(lower, 0)
        if connect:
            index = max(index, self._connect_index.get(lower, 0))
        return max(index, 1)

    def _health_instances(self, name: str, *, connect: bool) -> list[_Service]:
        lower = name.lower()
        if connect:
            found = [
                s
                for s in self._services.values()
                if s.connect_name is not None and s.connect_name.lower() == lower
            ]
        else:
            found = [s for s in self._services.values() if s.name.lower() == lower]
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
        if authz is not None and not authz.node_read(self.node_name):
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
                c.to_json(self.node_name, catalog=True)
                for c in sorted(self._checks.values(), key=lambda c: c.check_id)
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
        index = self._svc_index.get(name.lower())
        if index is None or not self._health_instances(name, connect=False):
            return max(self._services_table_index, 1)
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

    # ----------------------------------------------------------------------
    # Consul 1.9+: service-intentions config entries and exact intentions
    # (from Consul's source, not compared with a real agent)

    def _config_kind(self, kind: str) -> None:
        if kind == SERVICE_INTENTIONS and self.newer_api:
            return
        if kind == SERVICE_INTENTIONS or not self.newer_api:
            # What 1.8.7 answers (measured) for a kind it does not know.
            raise ConsulError(500, f"invalid config entry kind: {kind}")
        raise ConsulError(
            500,
            f"the development agent has no {go_quote(kind)} config entries: "
            "only service-intentions (test other kinds against a real agent)",
        )

    @property
    def config_index(self) -> int:
        return max(self._config_index, 1)

    def _entries_changed(self) -> None:
        index = self._bump()
        self._config_index = index
        self._intentions_index = index
        self._changed()

    def config_apply(
        self,
        name: str,
        sources: Sequence[Mapping[str, Any]],
        meta: Mapping[str, str] | None,
        *,
        cas: int | None = None,
        authz: Authorizer | None = None,
    ) -> bool:
        """
        ``PUT /v1/config`` with a ``service-intentions`` entry: ``False``
        when ``cas`` does not match the entry's ``ModifyIndex``.

        :raises ConsulError: 500 with Consul's validation message, 403
            without ``intentions = "write"`` on the destination.
        """
        if authz is not None and not authz.intention_write(name):
            raise permission_denied()
        entry = normalized(name, sources, meta)
        problem = entry_problem(entry)
        if problem is not None:
            raise ConsulError(500, problem)
        existing = self._intention_entries.get(name)
        if cas is not None:
            current = existing.modify_index if existing is not None else 0
            if cas != current:
                return False
        for ixn in self._intentions.values():
            if ixn.destination_name == name and any(
                (src.namespace, src.name) == (ixn.source_ns, ixn.source_name)
                for src in entry.sources
            ):
                raise ConsulError(
                    500,
                    f"duplicate intention found: {ixn.describe(newer=True)}",
                )
        index = self._bump()
        self._intention_entries[name] = evolve(
            entry,
            create_index=existing.create_index if existing is not None else index,
            modify_index=index,
        )
        log.info("service-intentions entry written: {name}", name=name)
        self._entries_changed()
        return True

    def config_get(
        self, kind: str, name: str, authz: Authorizer | None = None
    ) -> dict[str, Any]:
        self._config_kind(kind)
        entry = self._intention_entries.get(name)
        if entry is None:
            raise ConsulError(
                404, f"Config entry not found for {go_quote(kind)} / {go_quote(name)}"
            )
        if authz is not None and not authz.intention_read(name):
            raise permission_denied()
        return entry.to_json()

    def config_list(
        self, kind: str, authz: Authorizer | None = None
    ) -> list[dict[str, Any]]:
        self._config_kind(kind)
        return [
            e.to_json()
            for name, e in sorted(self._intention_entries.items())
            if authz is None or authz.intention_read(name)
        ]

    def config_delete(
        self,
        kind: str,
        name: str,
        *,
        cas: int | None = None,
        authz: Authorizer | None = None,
    ) -> bool:
        self._config_kind(kind)
        if authz is not None and not authz.intention_write(name):
            raise permission_denied()
        entry = self._intention_entries.get(name)
        if cas is not None and (entry.modify_index if entry else 0) != cas:
            return False
        if entry is not None:
            del self._intention_entries[name]
            log.info("service-intentions entry deleted: {name}", name=name)
            self._entries_changed()
        return True

    def _exact_names(self, source: str, destination: str) -> tuple[str, str, str]:
        src_ns, src = _parse_match_name(source)
        dst_ns, dst = _parse_match_name(destination)
        if dst_ns != DEFAULT_NAMESPACE:
            raise ConsulError(
                400,
                'Bad request: Invalid query parameter: "ns" - Namespaces are a '
                "Consul Enterprise feature",
            )
        return src_ns, src, dst

    def intention_exact_get(
        self, source: str, destination: str, authz: Authorizer | None = None
    ) -> dict[str, Any]:
        """
        ``GET /v1/connect/intentions/exact``: 404 ``Intention not found``.
        """
        src_ns, src, dst = self._exact_names(source, destination)
        if authz is not None and not authz.intention_read(dst):
            raise permission_denied()
        for ixn in self._all_intentions():
            if (ixn.source_ns, ixn.source_name, ixn.destination_name) == (
                src_ns,
                src,
                dst,
            ):
                return ixn.to_json()
        raise ConsulError(404, "Intention not found")

    def intention_exact_put(
        self,
        source: str,
        destination: str,
        fields: Mapping[str, Any],
        authz: Authorizer | None = None,
    ) -> None:
        """
        ``PUT /v1/connect/intentions/exact``: the source is upserted into the
        destination's config entry (or the intention of the ID API with the
        same names is updated).
        """
        src_ns, src, dst = self._exact_names(source, destination)
        if authz is not None and not authz.intention_write(dst):
            raise permission_denied()
        for ixn in self._intentions.values():
            if (ixn.source_ns, ixn.source_name, ixn.destination_name) == (
                src_ns,
                src,
                dst,
            ):
                self.intention_update(
                    ixn.id,
                    IntentionInput(
                        description=fields.get("Description") or "",
                        source_ns=src_ns,
                        source_name=src,
                        destination_name=dst,
                        source_type=fields.get("SourceType") or "",
                        action=fields.get("Action") or "",
                        meta=ixn.meta,
                    ),
                    authz,
                )
                return
        new_source = {
            "Name": src,
            "Namespace": src_ns,
            "Action": fields.get("Action") or "",
            "Permissions": fields.get("Permissions"),
            "Type": fields.get("SourceType") or "",
            "Description": fields.get("Description") or "",
        }
        entry = self._intention_entries.get(dst)
        sources = [] if entry is None else [s.to_json() for s in entry.sources]
        sources = [
            s
            for s in sources
            if (s.get("Namespace", DEFAULT_NAMESPACE), s["Name"]) != (src_ns, src)
        ]
        sources.append(new_source)
        self.config_apply(
            dst, sources, None if entry is None else entry.meta, authz=authz
        )

    def intention_exact_delete(
        self, source: str, destination: str, authz: Authorizer | None = None
    ) -> None:
        src_ns, src, dst = self._exact_names(source, destination)
        if authz is not None and not authz.intention_write(dst):
            raise permission_denied()
        for ixn in list(self._intentions.values()):
            if (ixn.source_ns, ixn.source_name, ixn.destination_name) == (
                src_ns,
                src,
                dst,
            ):
                self.intention_delete(ixn.id, authz)
                return
        entry = self._intention_entries.get(dst)
        if entry is None:
            raise ConsulError(404, "Intention not found")
        kept = tuple(s for s in entry.sources if (s.namespace, s.name) != (src_ns, src))
        if len(kept) == len(entry.sources):
            raise ConsulError(404, "Intention not found")
        if kept:
            self._intention_entries[dst] = evolve(
                entry, sources=kept, modify_index=self._bump()
            )
        else:
            del self._intention_entries[dst]
        self._entries_changed()

    # ----------------------------------------------------------------------
    # prepared queries

    @property
    def queries_index(self) -> int:
        return max(self._queries_index, 1)

    def _query_readable(self, query: PreparedQuery, authz: Authorizer | None) -> bool:
        if authz is None or authz.management:
            return True
        # A query without a name is seen only by management tokens.
        return bool(query.name) and authz.allowed("query", query.name, "read")

    def _query_json(
        self, query: PreparedQuery, authz: Authorizer | None
    ) -> dict[str, Any]:
        return query.to_json(redact_token=authz is not None and not authz.management)

    def queries_list(self, authz: Authorizer | None = None) -> list[dict[str, Any]]:
        """
        ``GET /v1/query``: by ID, those the token may read.
        """
        return [
            self._query_json(q, authz)
            for _, q in sorted(self._queries.items())
            if self._query_readable(q, authz)
        ]

    def _query_by_id(self, query_id: str, what: str) -> PreparedQuery | None:
        problem = _uuid_problem(query_id)
        if problem is not None:
            raise ConsulError(
                500, f"{what}failed prepared query lookup: index error: {problem}"
            )
        return self._queries.get(query_id.lower())

    def query_get(
        self, query_id: str, authz: Authorizer | None = None
    ) -> list[dict[str, Any]]:
        """
        ``GET /v1/query/<id>``: a list of one.

        :raises ConsulError: 500 for an ID that is not a UUID, 404 ``Query
            not found``, 403 when the token may not read it.
        """
        query = self._query_by_id(query_id, "")
        if query is None:
            raise ConsulError(404, "Query not found")
        if not self._query_readable(query, authz):
            raise permission_denied()
        return [self._query_json(query, authz)]

    def _query_checked(
        self, given: QueryInput, authz: Authorizer | None, *, own_id: str
    ) -> None:
        problem = query_problem(given)
        if problem is not None:
            raise ConsulError(500, f"Invalid prepared query: {problem}")
        for other in self._queries.values():
            if other.id == own_id:
                continue
            if given.name and other.name == given.name:
                raise ConsulError(
                    500, f"name '{given.name}' aliases an existing query name"
                )
        if (
            given.name
            and given.name.lower() in self._queries
            and (given.name.lower() != own_id)
        ):
            raise ConsulError(500, f"name '{given.name}' aliases an existing query ID")
        if given.template_type:
            # Consul compiles name_prefix_match templates with HIL
            # interpolation; the development agent has no template engine.
            reason = (
                f"Bad Template.Type '{given.template_type}'"
                if given.template_type != "name_prefix_match"
                else "the development agent does not support prepared query "
                "templates; use a query per service name, or a real agent"
            )
            raise ConsulError(500, f"failed compiling template: {reason}")
        if given.session:
            # There are no sessions on the development agent.
            raise ConsulError(500, f"invalid session {go_quote(given.session)}")

    def _query_write(self, name: str, authz: Authorizer | None) -> None:
        if authz is not None and name and not authz.allowed("query", name, "write"):
            raise permission_denied()

    def query_create(self, given: QueryInput, authz: Authorizer | None = None) -> str:
        """
        ``POST /v1/query``: the new query's ID.

        :raises ConsulError: 500 with Consul's message, 403 without
            ``query:write`` on its name.
        """
        if given.id:
            raise ConsulError(
                500, "ID must be empty when creating a new prepared query"
            )
        self._query_write(given.name, authz)
        query_id = random_uuid(self.rng)
        self._query_checked(given, authz, own_id=query_id)
        index = self._bump()
        self._queries[query_id] = PreparedQuery(
            id=query_id, given=given, create_index=index, modify_index=index
        )
        self._queries_index = index
        log.info("prepared query created: {name} ({id})", name=given.name, id=query_id)
        self._changed()
        return query_id

    def query_update(
        self, query_id: str, given: QueryInput, authz: Authorizer | None = None
    ) -> None:
        """
        ``PUT /v1/query/<id>``: the URL's ID wins.
        """
        self._query_write(given.name, authz)
        existing = self._query_by_id(query_id, "Prepared Query lookup failed: ")
        if existing is None:
            raise ConsulError(
                500, f"Cannot modify non-existent prepared query: '{query_id}'"
            )
        self._query_write(existing.name, authz)
        self._query_checked(given, authz, own_id=existing.id)
        index = self._bump()
        self._queries[existing.id] = evolve(
            existing, given=evolve(given, id=existing.id), modify_index=index
        )
        self._queries_index = index
        self._changed()

    def query_delete(self, query_id: str, authz: Authorizer | None = None) -> None:
        """
        ``DELETE /v1/query/<id>``.
        """
        existing = self._query_by_id(query_id, "Prepared Query lookup failed: ")
        if existing is None:
            raise ConsulError(
                500, f"Cannot modify non-existent prepared query: '{query_id}'"
            )
        self._query_write(existing.name, authz)
        del self._queries[existing.id]
        self._queries_index = self._bump()
        log.info("prepared query deleted: {id}", id=existing.id)
        self._changed()

    def query_execute(
        self,
        id_or_name: str,
        *,
        connect: bool = False,
        limit: int = 0,
        authz: Authorizer | None = None,
    ) -> dict[str, Any]:
        """
        ``GET /v1/query/<id-or-name>/execute``: the healthy instances of
        the query's service (native instances and proxies with ``connect``
        or a Connect query), shuffled, with the query metadata in the body
        as 1.8.7 leaks it.  Never blocks.

        :raises ConsulError: 404 ``Query not found``.
        """
        query = (
            self._queries.get(id_or_name.lower())
            if _uuid_problem(id_or_name) is None
            else None
        )
        if query is None:
            query = next(
                (q for q in self._queries.values() if q.name and q.name == id_or_name),
                None,
            )
        if query is None:
            raise ConsulError(404, "Query not found")
        q = query.given
        if q.token:
            # The query runs with its own token, whoever executes it.
            authz = self.resolve_token(q.token)
        entries = self.health(q.service, connect=connect or q.connect, authz=authz)
        nodes = filter_entries(entries, q)
        self.rng.shuffle(nodes)
        if limit > 0:
            nodes = nodes[:limit]
        for entry in nodes:
            # Straight from the RPC: empty tag lists are nil here, unlike
            # the health endpoint's.
            if not entry["Service"]["Tags"]:
                entry["Service"]["Tags"] = None
            for check in entry["Checks"]:
                if not check["ServiceTags"]:
                    check["ServiceTags"] = None
        return {
            "Service": q.service,
            "Nodes": nodes,
            "DNS": {"TTL": q.dns_ttl},
            "Datacenter": self.datacenter,
            "Failovers": 0,
            "Index": 0,
            "LastContact": 0,
            "KnownLeader": True,
            "ConsistencyLevel": "leader",
        }

    def cache_lookup(self, key: tuple[Any, ...]) -> bool:
        """
        Whether a background-refreshed agent cache entry (``?cached`` reads,
        intention match) existed before, creating it.
        """
        hit = key in self._cached_keys
        self._cached_keys.add(key)
        return hit

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


def _serf_stats() -> dict[str, str]:
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


def _parse_match_name(raw: str) -> tuple[str, str]:
    """
    ``parseIntentionMatchEntry``: ``name`` or ``namespace/name``.
    """
    namespace, slash, name = raw.partition("/")
    if not slash:
        return DEFAULT_NAMESPACE, raw
    if "/" in name:
        raise ConsulError(
            500, f"name {go_quote(raw)} is invalid: input can contain at most one '/'"
        )
    return namespace, name


def _uuid_problem(value: str) -> str | None:
    """
    go-memdb's UUIDFieldIndex checks, with its messages.
    """
    if len(value) != 36:
        return "UUID must be 36 characters"
    hyphens = value.count("-")
    if hyphens > 4:
        return f'UUID should have maximum of 4 "-"; got {hyphens}'
    bare = value.replace("-", "")
    if len(bare) % 2:
        return "Input (without hyphens) must be even length"
    for ch in bare:
        if ch not in "0123456789abcdefABCDEF":
            return (
                "Invalid UUID: encoding/hex: invalid byte: "
                f"U+{ord(ch):04X} {_go_rune(ch)}"
            )
    return None


def _go_rune(ch: str) -> str:
    return "'" + go_quote(ch)[1:-1].replace("'", "\\'") + "'"


def _intention_problems(
    *,
    source_ns: str,
    source_name: str,
    destination_ns: str,
    destination_name: str,
    description: str,
    meta: Mapping[str, str],
    action: str,
    source_type: str,
) -> list[str]:
    """
    ``Intention.Validate()`` in Consul 1.8, in its order.
    """
    problems = []
    for label, value in (
        ("SourceNS", source_ns),
        ("SourceName", source_name),
        ("DestinationNS", destination_ns),
        ("DestinationName", destination_name),
    ):
        if not value:
            problems.append(f"{label} must be set")
    for ns_label, ns, name_label, name in (
        ("SourceNS", source_ns, "SourceName", source_name),
        ("DestinationNS", destination_ns, "DestinationName", destination_name),
    ):
        if ns != WILDCARD and WILDCARD in ns:
            problems.append(
                f"{ns_label}: wildcard character '*' cannot be used with partial values"
            )
        if name != WILDCARD:
            if WILDCARD in name:
                problems.append(
                    f"{name_label}: wildcard character '*' cannot be used with "
                    "partial values"
                )
            if ns == WILDCARD:
                problems.append(
                    f"{name_label}: exact value cannot follow wildcard namespace"
                )
    if len(description.encode("utf-8")) > INTENTION_DESCRIPTION_MAX:
        problems.append(
            f"Description exceeds maximum length {INTENTION_DESCRIPTION_MAX}"
        )
    if len(meta) > META_MAX_PAIRS:
        problems.append(f"Meta exceeds maximum element count {META_MAX_PAIRS}")
    for key, value in meta.items():
        if len(key.encode("utf-8")) > META_KEY_MAX:
            problems.append(
                f"Meta key {go_quote(key)} exceeds maximum length {META_KEY_MAX}"
            )
        if len(value.encode("utf-8")) > META_VALUE_MAX:
            problems.append(
                f"Meta value for key {go_quote(key)} exceeds maximum length "
                f"{META_VALUE_MAX}"
            )
    if action not in ("allow", "deny"):
        problems.append("Action must be set to 'allow' or 'deny'")
    if source_type != "consul":
        problems.append("SourceType must be set to 'consul'")
    return problems


_META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")


def _meta_problem(meta: Mapping[str, str]) -> str | None:
    """
    ``structs.ValidateServiceMetadata`` for a typical service.
    """
    if len(meta) > META_MAX_PAIRS:
        return (
            f"Node metadata cannot contain more than {META_MAX_PAIRS} key/value pairs"
        )
    for key, value in meta.items():
        problem = None
        if key == "":
            problem = "Key cannot be blank"
        elif not _META_KEY.match(key):
            problem = "Key contains invalid characters"
        elif len(key) > META_KEY_MAX:
            problem = f"Key is too long (limit: {META_KEY_MAX} characters)"
        elif key.startswith("consul-"):
            problem = "Key prefix 'consul-' is reserved for internal use"
        elif len(value) > META_VALUE_MAX:
            problem = f"Value is too long (limit: {META_VALUE_MAX} characters)"
        if problem is not None:
            return f"Couldn't load metadata pair ('{key}', '{value}'): {problem}"
    return None


def _node_service_problems(d: ServiceDefinition) -> list[str]:
    """
    ``NodeService.Validate()`` in Consul 1.8: the multi-error list.
    """
    problems = []
    proxy = d.proxy or ProxyConfig()
    if d.kind == KIND_CONNECT_PROXY:
        if not proxy.destination_service_name.strip():
            problems.append(
                "Proxy.DestinationServiceName must be non-empty for Connect proxy "
                "services"
            )
        if d.port == 0:
            problems.append("Port must be set for a Connect proxy")
        if d.connect_native:
            problems.append(
                "A Proxy cannot also be Connect Native, only typical services"
            )
        seen: set[str] = set()
        for upstream in proxy.upstreams:
            name = str(upstream.get("DestinationName", ""))
            dtype = str(upstream.get("DestinationType", "") or "service")
            key = f"{dtype}:{name}"
            if key in seen:
                problems.append(f"upstreams cannot contain duplicates of {key}")
            seen.add(key)
    if d.kind == KIND_MESH_GATEWAY:
        if d.port == 0:
            problems.append(f"Port must be non-zero for a {d.kind}")
        if d.sidecar_given:
            problems.append(f"A {d.kind} cannot have a sidecar service defined")
        if proxy.destination_service_name:
            problems.append(
                "The Proxy.DestinationServiceName configuration is invalid for a "
                f"{d.kind}"
            )
        if proxy.destination_service_id:
            problems.append(
                "The Proxy.DestinationServiceID configuration is invalid for a "
                f"{d.kind}"
            )
        if proxy.local_service_address:
            problems.append(
                f"The Proxy.LocalServiceAddress configuration is invalid for a {d.kind}"
            )
        if proxy.local_service_port:
            problems.append(
                f"The Proxy.LocalServicePort configuration is invalid for a {d.kind}"
            )
        if proxy.upstreams:
            problems.append(
                f"The Proxy.Upstreams configuration is invalid for a {d.kind}"
            )
    if d.sidecar_given and d.sidecar is not None:
        if d.sidecar.id:
            problems.append(
                "A SidecarService cannot specify an ID as this is managed by the agent"
            )
        if d.sidecar.sidecar_given:
            problems.append("A SidecarService cannot have a nested SidecarService")
    return problems


# --------------------------------------------------------------------------
# the built-in CA provider's configuration (mapstructure onto
# ConsulCAProviderConfig)

_CA_DURATION_KEYS = ("LeafCertTTL", "RotationPeriod", "IntermediateCertTTL")
_CA_FIELDS: dict[str, str] = {
    "LeafCertTTL": "duration",
    "SkipValidate": "bool",
    "CSRMaxPerSecond": "float",
    "CSRMaxConcurrent": "int",
    "PrivateKeyType": "string",
    "PrivateKeyBits": "int",
    "PrivateKey": "string",
    "RootCert": "string",
    "RotationPeriod": "duration",
    "IntermediateCertTTL": "duration",
    "DisableCrossSigning": "bool",
}
_GO_TYPES = {
    "duration": "time.Duration",
    "bool": "bool",
    "float": "float32",
    "int": "int",
    "string": "string",
}


def _go_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    if isinstance(value, dict):
        return "map[string]interface {}"
    return "interface {}"


def _parse_consul_ca_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    parsed: dict[str, Any] = {
        "LeafCertTTL": 72 * 3_600_000_000_000,
        "SkipValidate": False,
        "CSRMaxPerSecond": 50.0,
        "CSRMaxConcurrent": 0,
        "PrivateKeyType": "ec",
        "PrivateKeyBits": 256,
        "PrivateKey": "",
        "RootCert": "",
        "RotationPeriod": 2160 * 3_600_000_000_000,
        "IntermediateCertTTL": 8760 * 3_600_000_000_000,
        "DisableCrossSigning": False,
    }
    names = {k.lower(): k for k in _CA_FIELDS}
    errors = []
    for key, value in raw.items():
        name = names.get(key.lower())
        if name is None or value is None:
            continue
        kind = _CA_FIELDS[name]
        unconvertible = (
            f"'{name}' expected type '{_GO_TYPES[kind]}', got unconvertible type "
            f"'{_go_kind(value)}'"
        )
        if kind == "duration":
            if isinstance(value, str):
                try:
                    parsed[name] = parse_go_duration(value)
                except GoDurationError as e:
                    errors.append(f"error decoding '{name}': {e}")
            elif isinstance(value, int | float):
                # mapstructure's weak typing: true is 1ns, false 0.
                parsed[name] = int(value)
            else:
                errors.append(unconvertible)
        elif kind == "bool":
            if isinstance(value, bool):
                parsed[name] = value
            elif isinstance(value, str) and value.lower() in (
                "1",
                "t",
                "true",
                "0",
                "f",
                "false",
                "",
            ):
                parsed[name] = value.lower() in ("1", "t", "true")
            elif isinstance(value, int | float):
                parsed[name] = value != 0
            else:
                errors.append(unconvertible)
        elif kind in ("int", "float"):
            if isinstance(value, bool):
                parsed[name] = int(value)
            elif isinstance(value, int | float) and math.isfinite(value):
                parsed[name] = int(value) if kind == "int" else float(value)
            elif isinstance(value, str):
                try:
                    parsed[name] = int(value, 0) if kind == "int" else float(value)
                except ValueError:
                    errors.append(
                        f"cannot parse '{name}' as {_GO_TYPES[kind]}: "
                        f"strconv.Parse{'Int' if kind == 'int' else 'Float'}: parsing "
                        f"{go_quote(value)}: invalid syntax"
                    )
            else:
                errors.append(unconvertible)
        else:
            if isinstance(value, str):
                parsed[name] = value
            elif isinstance(value, bool | int | float):
                parsed[name] = json.dumps(value)
            else:
                errors.append(unconvertible)
    if errors:
        errors.sort()
        listed = "\n".join(f"* {e}" for e in errors)
        raise ConsulError(
            500,
            "error configuring provider: error decoding config: "
            f"{len(errors)} error(s) decoding:\n\n{listed}",
        )
    return parsed


def _other_provider_problem(provider: str, raw: Mapping[str, Any]) -> str:
    """
    What Consul 1.8.7 answers for a provider other than ``consul`` without
    its backend, or the development agent's refusal.
    """
    given = {k.lower(): v for k, v in raw.items()}
    if provider == "vault":
        if not given.get("token"):
            return "error configuring provider: must provide a Vault token"
        if not given.get("rootpkipath"):
            return (
                "error configuring provider: must provide a valid path to a root "
                "PKI backend"
            )
    elif provider == "aws-pca":
        return (
            "error generating CA root certificate: MissingRegion: could not find "
            "region configuration"
        )
    else:
        return (
            f"could not initialize provider: unknown CA provider {go_quote(provider)}"
        )
    return (
        f"error configuring provider: the development agent has no {provider!r} "
        'CA provider; use the built-in "consul" provider'
    )


def _validate_consul_ca_config(parsed: Mapping[str, Any]) -> str | None:
    """
    ``CommonCAProviderConfig.Validate`` in Consul 1.8.
    """
    if parsed["SkipValidate"]:
        return None
    hour = 3_600_000_000_000
    if parsed["LeafCertTTL"] < hour:
        return "leaf cert TTL must be greater or equal than 1h0m0s"
    if parsed["LeafCertTTL"] > 8760 * hour:
        return "leaf cert TTL must be less than 8760h0m0s"
    key_type, bits = parsed["PrivateKeyType"], parsed["PrivateKeyBits"]
    if key_type == "ec":
        if bits not in (224, 256, 384, 521):
            return "ECDSA key length must be one of (224, 256, 384, 521) bits"
    elif key_type == "rsa":
        if bits not in (2048, 4096):
            return "RSA key length must be 2048 or 4096 bits"
    else:
        return "private key type must be either 'ec' or 'rsa'"
    return None


def _go_json_numbers(value: Any) -> Any:
    """
    A decoded ``interface{}`` as Go re-encodes it: every number is a
    float64, so ``1.0`` comes back as ``1``.
    """
    if isinstance(value, dict):
        return {k: _go_json_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_go_json_numbers(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    return value
