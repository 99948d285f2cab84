"""
The intentions table: intentions made through the ID API and, from 1.9, those
of ``service-intentions`` config entries, their precedence, Consul's
validation messages, and the authorize endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from attrs import evolve, frozen
from twisted.logger import Logger

from connect_native import _logging
from connect_native.devagent.gocompat import go_quote, rfc3339_nano
from connect_native.devagent.store import (
    DEFAULT_NAMESPACE,
    META_KEY_MAX,
    META_MAX_PAIRS,
    META_VALUE_MAX,
    WILDCARD,
    ConsulError,
    Settings,
    Store,
    bad_request,
    multierror,
    permission_denied,
    random_uuid,
)
from connect_native.devagent.tables.acl_rules import Authorizer
from connect_native.devagent.tables.service_intentions import IntentionsEntry
from connect_native.devagent.tables.spiffe import (
    CertURIError,
    SpiffeService,
    parse_cert_uri,
)

log = Logger(observer=_logging.observer)


INTENTION_DESCRIPTION_MAX = 512


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


class IntentionsTable:
    """
    The intentions (the ID API's and, from 1.9, those of the
    ``service-intentions`` config entries) and the authorize endpoint that
    applies them.
    """

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        # The intentions of the ID API, by ID.
        self.by_id: dict[str, Intention] = {}
        self.modify_index = 0
        # From 1.9: the service-intentions config entries, by destination.
        self.entries: dict[str, IntentionsEntry] = {}
        self._authorize_cached: set[tuple[str, str]] = set()

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
            raise bad_request("Target service must be specified")
        try:
            identity = parse_cert_uri(client_cert_uri)
        except CertURIError:
            raise bad_request("ClientCertURI not a valid Connect identifier") from None
        if not isinstance(identity, SpiffeService):
            raise bad_request("ClientCertURI not a valid Service identifier")
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
            if not self.settings.newer_api:
                return ixn.action == "allow", f"Matched intention: {ixn}", hit
            described = ixn.describe(newer=True)
            if ixn.permissions:
                # L7 intentions deny at L4: the HTTP layer must decide.
                return False, f"Matched L7 intention: {described}", hit
            return ixn.action == "allow", f"Matched L4 intention: {described}", hit
        if authz is None:
            if self.settings.version_info >= (1, 11, 0):
                return True, "Default behavior configured by ACLs", hit
            return True, "ACLs disabled, access is allowed by default", hit
        return (
            authz.intention_default_allow(),
            "Default behavior configured by ACLs",
            hit,
        )

    @property
    def intentions_index(self) -> int:
        return max(self.modify_index, 1)

    def intentions_list(self, authz: Authorizer | None = None) -> list[dict[str, Any]]:
        """
        ``GET /v1/connect/intentions``: those the token may read (by their
        destination), without a hint that others were left out.
        """
        return [
            i.to_json()
            for i in sorted(self.all_intentions(), key=Intention.sort_key)
            if authz is None or authz.intention_read(i.destination_name)
        ]

    def all_intentions(self) -> list[Intention]:
        """
        The intentions made through the ID API and, from 1.9, those of the
        ``service-intentions`` config entries (``ToIntention``).
        """
        out = list(self.by_id.values())
        for entry in self.entries.values():
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
        for ixn in self.all_intentions():
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
                _, name = parse_match_name(raw)
                if name and not authz.intention_read(name):
                    raise permission_denied()
        out: dict[str, list[dict[str, Any]] | None] = {}
        for raw in names:
            namespace, name = parse_match_name(raw)
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
        src_ns, src = parse_match_name(source)
        dst_ns, dst = parse_match_name(destination)
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
        return authz is None or self.settings.acl_default_policy == "allow"

    def intention_get(
        self, intention_id: str, authz: Authorizer | None = None
    ) -> dict[str, Any]:
        """
        :raises ConsulError: 404 ``Intention not found``, or 400 for an ID
            that is not a UUID.
        """
        problem = uuid_problem(intention_id)
        if problem is not None:
            raise bad_request(f"failed intention lookup: index error: {problem}")
        ixn = self.by_id.get(intention_id.lower())
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
        now = self.store.now()
        ixn = self._checked_intention(
            given,
            intention_id=random_uuid(self.store.rng),
            created_at=now,
            create_index=0,
        )
        for other in self.all_intentions():
            if other.folded() == ixn.folded():
                raise ConsulError(
                    500,
                    "duplicate intention found: "
                    + other.describe(newer=self.settings.newer_api),
                )
        index = self.store.bump()
        ixn = evolve(ixn, create_index=index, modify_index=index)
        self.by_id[ixn.id] = ixn
        self.modify_index = index
        log.info("intention created: {ixn}", ixn=str(ixn))
        self.store.changed()
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
        for other in self.by_id.values():
            if other.id != existing.id and other.folded() == ixn.folded():
                raise ConsulError(500, f"duplicate intention found: {other}")
        index = self.store.bump()
        ixn = evolve(ixn, modify_index=index)
        self.by_id[ixn.id] = ixn
        self.modify_index = index
        log.info("intention updated: {ixn}", ixn=str(ixn))
        self.store.changed()
        return ixn.id

    def intention_delete(
        self, intention_id: str, authz: Authorizer | None = None
    ) -> None:
        existing = self._intention_to_change(intention_id, "delete", authz)
        del self.by_id[existing.id]
        self.modify_index = self.store.bump()
        log.info("intention deleted: {ixn}", ixn=str(existing))
        self.store.changed()

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
        problem = uuid_problem(intention_id)
        if problem is not None:
            raise ConsulError(
                500,
                "Intention lookup failed: failed intention lookup: index error: "
                + problem,
            )
        existing = self.by_id.get(intention_id.lower())
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
        now = created_at if create_index == 0 else self.store.now()
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


def parse_match_name(raw: str) -> tuple[str, str]:
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


def uuid_problem(value: str) -> str | None:
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
