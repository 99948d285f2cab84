"""
``service-intentions`` config entries (Consul 1.9+) for the development
agent: decoding, Consul's validation messages, normalisation (source types,
upper-case methods, precedence, sources ordered by precedence) and JSON.

Written from Consul's source (``agent/structs/config_entry_intentions.go``,
``agent/config_endpoint.go``): there is no 1.9+ agent to compare with here,
so this layer is marked as such in the tests and the docs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from attrs import frozen
from twisted.logger import Logger

from connect_native import _logging
from connect_native.devagent.gocompat import go_quote

log = Logger(observer=_logging.observer)


__all__ = ["IntentionSource", "IntentionsEntry", "entry_problem", "normalized"]

SERVICE_INTENTIONS = "service-intentions"
WILDCARD = "*"
DEFAULT_NAMESPACE = "default"
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE"}
)
META_VALUE_MAX = 512
_HEADER_MATCHES = ("Present", "Exact", "Prefix", "Suffix", "Contains", "Regex")


@frozen
class IntentionSource:
    """
    One source of an entry: an L4 ``action`` or L7 ``permissions`` (plain
    JSON, as Consul marshals ``IntentionPermission``, empty fields left out).
    """

    name: str
    namespace: str
    action: str
    permissions: tuple[Mapping[str, Any], ...]
    precedence: int
    type: str
    description: str

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Name": self.name}
        if self.namespace != DEFAULT_NAMESPACE:
            out["Namespace"] = self.namespace
        if self.action:
            out["Action"] = self.action
        if self.permissions:
            out["Permissions"] = [dict(p) for p in self.permissions]
        out["Precedence"] = self.precedence
        out["Type"] = self.type
        if self.description:
            out["Description"] = self.description
        return out


@frozen
class IntentionsEntry:
    """
    A ``service-intentions`` config entry: the intentions of one destination.
    """

    name: str
    sources: tuple[IntentionSource, ...]
    meta: Mapping[str, str] | None
    create_index: int = 0
    modify_index: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "Kind": SERVICE_INTENTIONS,
            "Name": self.name,
            "Sources": [s.to_json() for s in self.sources],
        }
        if self.meta:
            out["Meta"] = dict(self.meta)
        out["CreateIndex"] = self.create_index
        out["ModifyIndex"] = self.modify_index
        return out


def _count_exact(ns: str, name: str) -> int:
    if ns == WILDCARD:
        return 0
    return 1 if name == WILDCARD else 2


def precedence(source_ns: str, source: str, destination: str) -> int:
    """``computeIntentionPrecedence`` (destination namespace ``default``)."""
    maximum = {2: 9, 1: 6, 0: 3}[_count_exact(DEFAULT_NAMESPACE, destination)]
    return maximum - (2 - _count_exact(source_ns, source))


def _clean_permission(raw: Mapping[str, Any]) -> dict[str, Any]:
    # Go's omitempty: absent, empty and false fields are left out.
    out: dict[str, Any] = {"Action": raw.get("Action") or ""}
    http = raw.get("HTTP")
    if http is not None:
        clean: dict[str, Any] = {}
        for key in ("PathExact", "PathPrefix", "PathRegex"):
            if http.get(key):
                clean[key] = http[key]
        headers = []
        for header in http.get("Header") or ():
            if header is None:
                continue
            h: dict[str, Any] = {"Name": header.get("Name") or ""}
            for key in (*_HEADER_MATCHES, "Invert", "IgnoreCase"):
                if header.get(key):
                    h[key] = header[key]
            headers.append(h)
        if headers:
            clean["Header"] = headers
        methods = [str(m or "").upper() for m in http.get("Methods") or ()]
        if methods:
            clean["Methods"] = methods
        out["HTTP"] = clean
    return out


def normalized(
    name: str, sources: Sequence[Mapping[str, Any]], meta: Any
) -> IntentionsEntry:
    """
    ``Normalize``: default source type, upper-case methods, precedence, and
    sources ordered by precedence (stable).
    """
    built = []
    for raw in sources:
        namespace = raw.get("Namespace") or DEFAULT_NAMESPACE
        source_name = raw.get("Name") or ""
        built.append(
            IntentionSource(
                name=source_name,
                namespace=namespace,
                action=raw.get("Action") or "",
                permissions=tuple(
                    _clean_permission(p) for p in raw.get("Permissions") or () if p
                ),
                precedence=precedence(namespace, source_name, name),
                type=raw.get("Type") or "consul",
                description=raw.get("Description") or "",
            )
        )
    built.sort(key=lambda s: -s.precedence)
    return IntentionsEntry(
        name=name,
        sources=tuple(built),
        meta=None if meta is None else {k: v or "" for k, v in meta.items()},
    )


def _wildcard_problem(namespace: str, name: str) -> str | None:
    if namespace != WILDCARD and WILDCARD in namespace:
        return "Namespace: wildcard character '*' cannot be used with partial values"
    if name != WILDCARD:
        if WILDCARD in name:
            return "Name: wildcard character '*' cannot be used with partial values"
        if namespace == WILDCARD:
            return "Name: exact value cannot follow wildcard namespace"
    return None


def entry_problem(entry: IntentionsEntry) -> str | None:
    """
    ``ServiceIntentionsConfigEntry.Validate``: the first problem, in
    Consul's words.
    """
    if not entry.name:
        return "Name is required"
    problem = _wildcard_problem(DEFAULT_NAMESPACE, entry.name)
    if problem is not None:
        return problem
    if not entry.sources:
        return "At least one source is required"
    destination_wild = entry.name == WILDCARD
    seen: set[tuple[str, str]] = set()
    for i, src in enumerate(entry.sources):
        if not src.name:
            return f"Sources[{i}].Name is required"
        problem = _wildcard_problem(src.namespace, src.name)
        if problem is not None:
            return f"Sources[{i}].{problem}"
        if len(src.description) > META_VALUE_MAX:
            return f"Sources[{i}].Description exceeds maximum length {META_VALUE_MAX}"
        if not src.permissions and src.action not in ("allow", "deny"):
            return f"Sources[{i}].Action must be set to 'allow' or 'deny'"
        if src.permissions and src.action:
            return f"Sources[{i}].Action must be omitted if Permissions are specified"
        if destination_wild and src.permissions:
            return (
                f"Sources[{i}].Permissions cannot be specified on intentions with "
                "wildcarded destinations"
            )
        if src.type != "consul":
            return f"Sources[{i}].Type must be set to 'consul'"
        for j, perm in enumerate(src.permissions):
            problem = _permission_problem(perm, f"Sources[{i}].Permissions[{j}]")
            if problem is not None:
                return problem
        key = (src.namespace, src.name)
        if key in seen:
            quoted = go_quote(f"{src.namespace}/{src.name}")
            return f"Sources[{i}] defines {quoted} more than once"
        seen.add(key)
    return None


def _permission_problem(perm: Mapping[str, Any], where: str) -> str | None:
    if perm.get("Action") not in ("allow", "deny"):
        return f"{where}.Action must be set to 'allow' or 'deny'"
    http = perm.get("HTTP")
    prefix = f"{where}.HTTP"
    if http is None:
        return f"{prefix} is required"
    path_parts = 0
    for key in ("PathExact", "PathPrefix"):
        if http.get(key):
            path_parts += 1
            if not http[key].startswith("/"):
                return f"{prefix}.{key} doesn't start with '/': {go_quote(http[key])}"
    if http.get("PathRegex"):
        path_parts += 1
    if path_parts > 1:
        return (
            f"{prefix} should only contain at most one of PathExact, PathPrefix, "
            "or PathRegex"
        )
    parts = path_parts
    for k, header in enumerate(http.get("Header") or ()):
        if not header.get("Name"):
            return f"{prefix}.Header[{k}] missing required Name field"
        if sum(1 for key in _HEADER_MATCHES if header.get(key)) != 1:
            return (
                f"{prefix}.Header[{k}] should only contain one of Present, Exact, "
                "Prefix, Suffix, or Regex"
            )
        parts += 1
    methods = http.get("Methods") or []
    found: set[str] = set()
    for method in methods:
        if method not in HTTP_METHODS:
            return f"{prefix}.Methods contains an invalid method {go_quote(method)}"
        if method in found:
            return f"{prefix}.Methods contains {go_quote(method)} more than once"
        found.add(method)
    if methods:
        parts += 1
    if parts == 0:
        return f"{prefix} should not be empty"
    return None
