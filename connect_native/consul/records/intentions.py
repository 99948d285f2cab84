"""
Intentions, with their L7 permissions, and the answers of the intention
endpoints (list, match, check, create).
"""

from __future__ import annotations

from datetime import datetime

from attrs import field, frozen

from connect_native.consul.errors import ConsulResponseError
from connect_native.consul.records._base import (
    FrozenDict,
    JSONObject,
    empty_map,
    top_list,
)

__all__ = [
    "Intention",
    "IntentionHTTPHeaderPermission",
    "IntentionHTTPPermission",
    "IntentionPermission",
    "decode_intention",
    "decode_intention_check",
    "decode_intention_id",
    "decode_intentions",
    "decode_intentions_match",
]


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
    meta: FrozenDict[str, str] = field(factory=empty_map)
    default_addr: str = ""
    default_port: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    hash: str = ""
    create_index: int = 0
    modify_index: int = 0


def _decode_header_permission(header: JSONObject) -> IntentionHTTPHeaderPermission:
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


def _decode_permission(permission: JSONObject) -> IntentionPermission:
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


def _decode_intention(ixn: JSONObject) -> Intention:
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
    return _decode_intention(JSONObject("intention", value))


def decode_intentions(value: object) -> tuple[Intention, ...]:
    return tuple(_decode_intention(i) for i in top_list("intentions", value))


def decode_intentions_match(value: object) -> FrozenDict[str, tuple[Intention, ...]]:
    """
    ``{name: [intention, ...]}`` keyed by the literal names asked for; a
    name with no match may come back as ``null`` and reads as empty.
    """
    body = JSONObject("intentions match", value)
    return FrozenDict(
        {
            name: tuple(_decode_intention(i) for i in body.objs(name))
            for name in body.data
        }
    )


def decode_intention_check(value: object) -> bool:
    return JSONObject("intentions check", value).boolean("Allowed")


def decode_intention_id(value: object) -> str:
    return JSONObject("intention create", value).string("ID")
