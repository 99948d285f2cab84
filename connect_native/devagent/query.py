"""
Prepared queries for the development agent, as Consul 1.8.7 stores, lists
and executes them: the record and its JSON, its validation
(``parseQuery``'s messages), and the filters an execution applies to the
health entries of its service (tags with ``!`` negation, node and service
meta, ignored check IDs, critical instances always removed, warning ones too
with ``OnlyPassing``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from attrs import frozen

from connect_native.devagent.gocompat import GoDurationError, parse_go_duration

__all__ = ["PreparedQuery", "QueryInput", "filter_entries", "query_problem"]

# What Consul shows instead of a query's token to those who may not see it.
REDACTED = "<hidden>"


@frozen
class QueryInput:
    """
    A prepared query as a client sends it (``POST /v1/query``).
    """

    id: str = ""
    name: str = ""
    session: str = ""
    token: str = ""
    template_type: str = ""
    template_regexp: str = ""
    remove_empty_tags: bool = False
    service: str = ""
    nearest_n: int = 0
    failover_datacenters: tuple[str, ...] | None = None
    only_passing: bool = False
    ignore_check_ids: tuple[str, ...] | None = None
    near: str = ""
    tags: tuple[str, ...] | None = None
    node_meta: Mapping[str, str] | None = None
    service_meta: Mapping[str, str] | None = None
    connect: bool = False
    dns_ttl: str = ""


@frozen
class PreparedQuery:
    """
    A stored prepared query.
    """

    id: str
    given: QueryInput
    create_index: int
    modify_index: int

    @property
    def name(self) -> str:
        return self.given.name

    def to_json(self, *, redact_token: bool = False) -> dict[str, Any]:
        q = self.given
        token = q.token
        if redact_token and token:
            token = REDACTED
        return {
            "ID": self.id,
            "Name": q.name,
            "Session": q.session,
            "Token": token,
            "Template": {
                "Type": q.template_type,
                "Regexp": q.template_regexp,
                "RemoveEmptyTags": q.remove_empty_tags,
            },
            "Service": {
                "Service": q.service,
                "Failover": {
                    "NearestN": q.nearest_n,
                    "Datacenters": None
                    if q.failover_datacenters is None
                    else list(q.failover_datacenters),
                },
                "OnlyPassing": q.only_passing,
                "IgnoreCheckIDs": None
                if q.ignore_check_ids is None
                else list(q.ignore_check_ids),
                "Near": q.near,
                "Tags": None if q.tags is None else list(q.tags),
                "NodeMeta": None if q.node_meta is None else dict(q.node_meta),
                "ServiceMeta": None if q.service_meta is None else dict(q.service_meta),
                "Connect": q.connect,
            },
            "DNS": {"TTL": q.dns_ttl},
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


def query_problem(q: QueryInput) -> str | None:
    """
    ``parseQuery``: what is wrong with ``q``, in Consul's words (the caller
    wraps it as ``Invalid prepared query: ...``).
    """
    if not q.name and not q.template_type and not q.session:
        return "Must be bound to a session"
    if q.token == REDACTED:
        return (
            f"Bad Token '{q.token}', it looks like a query definition with a "
            "redacted token was submitted"
        )
    if not q.service:
        return "Must provide a Service name to query"
    if q.nearest_n < 0:
        return f"Bad NearestN '{q.nearest_n}', must be >= 0"
    if q.dns_ttl:
        try:
            ttl = parse_go_duration(q.dns_ttl)
        except GoDurationError as e:
            return f"Bad DNS TTL '{q.dns_ttl}': {e}"
        if ttl < 0:
            return f"Bad DNS TTL '{q.dns_ttl}', must be >=0"
    return None


def filter_entries(
    entries: Sequence[dict[str, Any]], q: QueryInput
) -> list[dict[str, Any]]:
    """
    The health entries an execution of ``q`` keeps (1.8.7's execute: the
    health filter with ``IgnoreCheckIDs``, then tags, node and service meta).
    """
    ignored = set(q.ignore_check_ids or ())
    out = []
    for entry in entries:
        statuses = [c["Status"] for c in entry["Checks"] if c["CheckID"] not in ignored]
        if "critical" in statuses:
            continue
        if q.only_passing and "warning" in statuses:
            continue
        service = entry["Service"]
        have = {t.lower() for t in service["Tags"] or ()}
        wanted_ok = True
        for tag in q.tags or ():
            negate = tag.startswith("!")
            name = tag[1:] if negate else tag
            if (name.lower() in have) == negate:
                wanted_ok = False
                break
        if not wanted_ok:
            continue
        node_meta = entry["Node"]["Meta"] or {}
        if any(node_meta.get(k) != v for k, v in (q.node_meta or {}).items()):
            continue
        service_meta = service["Meta"] or {}
        if any(service_meta.get(k) != v for k, v in (q.service_meta or {}).items()):
            continue
        out.append(entry)
    return out
