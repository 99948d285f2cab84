"""
ACLs for the development agent, as Consul 1.8.7 enforces them: a master
(management) token, policies with rules (``service "web" { policy =
"write" }``, ``service_prefix``, ``node_prefix``, ``agent``, ``query``,
``intentions = "write"``, ``operator``, ``acl``...), tokens that link
policies, and a default policy (``allow`` or ``deny``) for whatever no rule
decides.

An :class:`Authorizer` answers one question at a time (may this token read
or write this resource?) with Consul's resolution: an exact rule beats the
longest matching prefix rule, ``deny`` beats ``write`` beats ``read`` when
several policies name the same resource, and the default policy decides
where no rule does (except ACL management itself, which the default policy
never grants).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from attrs import field, frozen

from connect_native.devagent.gocompat import go_quote

__all__ = [
    "ACL_NOT_FOUND",
    "GLOBAL_MANAGEMENT_ID",
    "PERMISSION_DENIED",
    "Authorizer",
    "Rules",
    "RulesError",
    "parse_rules",
]

GLOBAL_MANAGEMENT_ID = "00000000-0000-0000-0000-000000000001"
GLOBAL_MANAGEMENT_NAME = "global-management"

READ = "read"
WRITE = "write"
DENY = "deny"
LIST = "list"

# Resources with a name (``service "web" {...}``) and their prefix forms.
NAMED = ("service", "node", "agent", "key", "session", "event", "query")
# Resources given as one value at the top level (``operator = "read"``).
SCALAR = ("acl", "operator", "keyring")


PERMISSION_DENIED = "Permission denied"
ACL_NOT_FOUND = "ACL not found"


class RulesError(ValueError):
    """
    Rules that Consul refuses, with its message.
    """


_PRECEDENCE = {DENY: 3, WRITE: 2, READ: 1, LIST: 0}


def _stronger(a: str, b: str) -> str:
    # Consul's takesPrecedenceOver: deny, then write, then read, then list.
    return a if _PRECEDENCE[a] >= _PRECEDENCE[b] else b


@frozen
class Rules:
    """
    Parsed rules: per resource, exact names and prefixes to policies, and
    the scalar resources (``acl``, ``operator``, ``keyring``).
    """

    exact: Mapping[str, Mapping[str, str]] = field(factory=dict)
    prefix: Mapping[str, Mapping[str, str]] = field(factory=dict)
    scalar: Mapping[str, str] = field(factory=dict)

    @classmethod
    def merge(cls, all_rules: Iterable[Rules]) -> Rules:
        exact: dict[str, dict[str, str]] = {}
        prefix: dict[str, dict[str, str]] = {}
        scalar: dict[str, str] = {}
        for rules in all_rules:
            for target, source in ((exact, rules.exact), (prefix, rules.prefix)):
                for resource, names in source.items():
                    merged = target.setdefault(resource, {})
                    for name, policy in names.items():
                        merged[name] = (
                            _stronger(merged[name], policy)
                            if name in merged
                            else policy
                        )
            for resource, policy in rules.scalar.items():
                scalar[resource] = (
                    _stronger(scalar[resource], policy)
                    if resource in scalar
                    else policy
                )
        return cls(exact=exact, prefix=prefix, scalar=scalar)

    def decide(self, resource: str, name: str) -> str | None:
        """
        The policy for ``name``: its exact rule, else the longest prefix rule
        that matches, else ``None`` (no opinion).
        """
        found = self.exact.get(resource, {}).get(name)
        if found is not None:
            return found
        best: tuple[int, str] | None = None
        for prefix, policy in self.prefix.get(resource, {}).items():
            if name.startswith(prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), policy)
        return None if best is None else best[1]


def _allows(policy: str, access: str) -> bool:
    if policy == WRITE:
        return True
    if policy in (READ, LIST):
        return access == READ
    return False


@frozen
class Authorizer:
    """
    What one token may do.  ``management`` is the master token and any token
    with the ``global-management`` policy; ``default_allow`` is the agent's
    default policy.
    """

    rules: Rules
    default_allow: bool
    management: bool = False

    def allowed(self, resource: str, name: str, access: str) -> bool:
        if self.management:
            return True
        if resource in SCALAR:
            policy = self.rules.scalar.get(resource)
        else:
            policy = self.rules.decide(resource, name)
        if policy is not None:
            return _allows(policy, access)
        # acl.AllowAll never grants ACL management.
        return self.default_allow and resource != "acl"

    def service_read(self, name: str) -> bool:
        return self.allowed("service", name, READ)

    def service_write(self, name: str) -> bool:
        return self.allowed("service", name, WRITE)

    def node_read(self, name: str) -> bool:
        return self.allowed("node", name, READ)

    def intention_read(self, name: str) -> bool:
        return self.allowed("intention", name, READ)

    def intention_write(self, name: str) -> bool:
        return self.allowed("intention", name, WRITE)

    def intention_default_allow(self) -> bool:
        """
        ``IntentionDefaultAllow``: no rule has an opinion, so even the
        master token gets the agent's default policy (measured on 1.8.7).
        """
        return self.default_allow


# --------------------------------------------------------------------------
# rules: HCL (the subset policies are written in) and JSON

_TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*|//[^\n]*|/\*.*?\*/)
    | (?P<string>"(?:[^"\\\n]|\\.)*")
    | (?P<ident>[A-Za-z_][A-Za-z0-9_\-.]*)
    | (?P<punct>[{}=,\[\]])
    """,
    re.VERBOSE | re.DOTALL,
)


def _tokens(text: str) -> list[tuple[str, str, int, int]]:
    out = []
    pos = 0
    line, col = 1, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise RulesError(
                f"Failed to parse ACL rules: At {line}:{col}: illegal char"
            )
        kind = m.lastgroup or ""
        value = m.group()
        if kind != "space":
            out.append((kind, value, line, col))
        newlines = value.count("\n")
        if newlines:
            line += newlines
            col = len(value) - value.rfind("\n")
        else:
            col += len(value)
        pos = m.end()
    return out


def _parse_hcl(text: str) -> dict[str, Any]:
    """
    The HCL subset of ACL rules: ``key = "value"``, ``key "label" { ... }``
    and ``key = { ... }`` blocks, nested.
    """
    tokens = _tokens(text)
    lines = text.split("\n")
    end = (len(lines), len(lines[-1]) + 1)
    position = [0]

    def peek() -> tuple[str, str, int, int] | None:
        return tokens[position[0]] if position[0] < len(tokens) else None

    def fail(expected: str) -> RulesError:
        token = peek()
        if token is None:
            # HCL reports EOF one column past the end (measured: "garbage {"
            # fails "At 1:11").
            where = f"{end[0]}:{end[1] + 1}"
            return RulesError(
                f"Failed to parse ACL rules: At {where}: {expected} got: EOF"
            )
        return RulesError(
            f"Failed to parse ACL rules: At {token[2]}:{token[3]}: {expected} "
            f"got: {token[1]}"
        )

    def string(value: str) -> str:
        decoded: str = json.loads(value)
        return decoded

    def body(closing: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            token = peek()
            if token is None:
                if closing:
                    raise fail("object expected closing RBRACE")
                return out
            if token[1] == "}" and closing:
                position[0] += 1
                return out
            if token[1] == ",":
                position[0] += 1
                continue
            if token[0] not in ("ident", "string"):
                raise fail("expected: IDENT | STRING")
            key = string(token[1]) if token[0] == "string" else token[1]
            position[0] += 1
            labels = []
            while (t := peek()) is not None and t[0] == "string":
                labels.append(string(t[1]))
                position[0] += 1
            t = peek()
            if t is not None and t[1] == "=":
                position[0] += 1
                t = peek()
                if t is None:
                    raise fail("expected value")
                if t[1] == "{":
                    position[0] += 1
                    value: Any = body(True)
                elif t[0] == "string":
                    position[0] += 1
                    value = string(t[1])
                elif t[0] == "ident":
                    position[0] += 1
                    value = t[1]
                else:
                    raise fail("expected value")
            elif t is not None and t[1] == "{":
                position[0] += 1
                value = body(True)
            else:
                raise fail("key must be followed by '=' or '{'")
            target = out
            for label in [key, *labels[:-1]]:
                target = target.setdefault(label, {})
                if not isinstance(target, dict):
                    raise RulesError(f"Failed to parse ACL rules: {key!s} given twice")
            final = labels[-1] if labels else key
            if labels:
                target[final] = value
            else:
                out[final] = value

    return body(False)


def parse_rules(text: str) -> Rules:
    """
    A policy's ``Rules``, in HCL or JSON, as Consul 1.8.7 reads them.

    :raises RulesError: with Consul's message for an unknown policy value
        (``Invalid service policy: ...``) or a syntax error
        (``Failed to parse ACL rules: ...``).
    """
    if not text.strip():
        return Rules()
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise RulesError(f"Failed to parse ACL rules: {e}") from None
        if not isinstance(raw, dict):
            raise RulesError("Failed to parse ACL rules: not an object")
    else:
        raw = _parse_hcl(text)
    exact: dict[str, dict[str, str]] = {}
    prefix: dict[str, dict[str, str]] = {}
    scalar: dict[str, str] = {}
    for key, value in raw.items():
        if key in SCALAR:
            if value not in ("", READ, WRITE, DENY):
                raise RulesError(f"Invalid {key} policy: {go_quote(str(value))}")
            if value:
                scalar[key] = value
            continue
        resource, is_prefix = key, False
        if key.endswith("_prefix"):
            resource, is_prefix = key[: -len("_prefix")], True
        if resource not in NAMED:
            # Consul 1.8.7 ignores rules it does not know (measured).
            continue
        if not isinstance(value, dict):
            raise RulesError(f"Failed to parse ACL rules: {key} must be a block")
        for name, rule in value.items():
            if not isinstance(rule, dict):
                raise RulesError(f"Failed to parse ACL rules: {key} must be a block")
            policy = rule.get("policy", "")
            intentions = rule.get("intentions", "")
            allowed = (
                (READ, WRITE, DENY, LIST)
                if resource == "key"
                else (
                    READ,
                    WRITE,
                    DENY,
                )
            )
            if policy not in allowed or (
                resource == "service" and intentions not in ("", READ, WRITE, DENY)
            ):
                raise RulesError(_invalid_rule(resource, name, rule))
            table = prefix if is_prefix else exact
            table.setdefault(resource, {})[name] = policy
            if resource == "service":
                # Intentions follow the service policy unless given: read
                # for read or write, deny otherwise (1.8.7's loadRules).
                if not intentions:
                    intentions = READ if policy in (READ, WRITE) else DENY
                table.setdefault("intention", {})[name] = intentions
    return Rules(exact=exact, prefix=prefix, scalar=scalar)


def _invalid_rule(resource: str, name: str, rule: Mapping[str, Any]) -> str:
    # Consul prints the rule struct with %#v.
    policy = go_quote(str(rule.get("policy", "")))
    if resource == "service":
        intentions = go_quote(str(rule.get("intentions", "")))
        return (
            f"Invalid service policy: &acl.ServiceRule{{Name:{go_quote(name)}, "
            f"Policy:{policy}, Intentions:{intentions}, "
            "EnterpriseRule:acl.EnterpriseRule{}}"
        )
    struct = {
        "node": "NodeRule",
        "agent": "AgentRule",
        "key": "KeyRule",
        "session": "SessionRule",
        "event": "EventRule",
        "query": "PreparedQueryRule",
    }[resource]
    label = {"event": "Event", "query": "Prefix"}.get(resource, "Name")
    return (
        f"Invalid {resource} policy: &acl.{struct}{{{label}:{go_quote(name)}, "
        f"Policy:{policy}, EnterpriseRule:acl.EnterpriseRule{{}}}}"
    )


# --------------------------------------------------------------------------
# policies and tokens


@frozen
class Policy:
    id: str
    name: str
    description: str
    rules_text: str
    rules: Rules
    hash: str
    create_index: int
    modify_index: int

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Name": self.name,
            "Description": self.description,
            "Rules": self.rules_text,
            "Hash": self.hash,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@frozen
class Token:
    accessor_id: str
    secret_id: str
    description: str
    policy_ids: tuple[str, ...]
    service_identities: tuple[str, ...]
    local: bool
    create_time: str
    hash: str
    create_index: int
    modify_index: int

    def to_json(self, policy_names: Mapping[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "AccessorID": self.accessor_id,
            "SecretID": self.secret_id,
            "Description": self.description,
        }
        if self.policy_ids:
            out["Policies"] = [
                {"ID": pid, "Name": policy_names.get(pid, "")}
                for pid in self.policy_ids
            ]
        if self.service_identities:
            out["ServiceIdentities"] = [
                {"ServiceName": name} for name in self.service_identities
            ]
        out.update(
            {
                "Local": self.local,
                "CreateTime": self.create_time,
                "Hash": self.hash,
                "CreateIndex": self.create_index,
                "ModifyIndex": self.modify_index,
            }
        )
        return out


_POLICY_NAME = re.compile(r"^[A-Za-z0-9\-_]{1,128}$")
_UUID = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)


def digest(*parts: object) -> str:
    """
    An opaque base64 hash, in the form of Consul's (not its value).
    """
    raw = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return base64.b64encode(hashlib.sha256(raw).digest()).decode("ascii")


def policy_problem(name: str, taken: Sequence[str]) -> str | None:
    if not name:
        return "Invalid Policy: no Name is set"
    if not _POLICY_NAME.match(name):
        return (
            "Invalid Policy: invalid Name. Only alphanumeric characters, '-' "
            "and '_' are allowed"
        )
    if name in taken:
        return f"Invalid Policy: A Policy with Name {go_quote(name)} already exists"
    return None


def is_uuid(text: str) -> bool:
    return bool(_UUID.match(text))
