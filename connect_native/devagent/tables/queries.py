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

from attrs import evolve, frozen
from twisted.logger import Logger

from connect_native import _logging
from connect_native.devagent.gocompat import (
    GoDurationError,
    go_quote,
    parse_go_duration,
)
from connect_native.devagent.store import (
    ConsulError,
    Settings,
    Store,
    permission_denied,
    random_uuid,
)
from connect_native.devagent.tables.acl import AclTable
from connect_native.devagent.tables.acl_rules import Authorizer
from connect_native.devagent.tables.health import HealthTable
from connect_native.devagent.tables.intentions import uuid_problem

log = Logger(observer=_logging.observer)


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


class QueriesTable:
    """
    Prepared queries: their CRUD with Consul's checks and ACLs, and their
    execution on the health table.
    """

    def __init__(
        self,
        store: Store,
        settings: Settings,
        acl_table: AclTable,
        health_table: HealthTable,
    ) -> None:
        self.store = store
        self.settings = settings
        self.acl_table = acl_table
        self.health_table = health_table
        self._queries: dict[str, PreparedQuery] = {}
        self._queries_index = 0

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
        problem = uuid_problem(query_id)
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
        query_id = random_uuid(self.store.rng)
        self._query_checked(given, authz, own_id=query_id)
        index = self.store.bump()
        self._queries[query_id] = PreparedQuery(
            id=query_id, given=given, create_index=index, modify_index=index
        )
        self._queries_index = index
        log.info("prepared query created: {name} ({id})", name=given.name, id=query_id)
        self.store.changed()
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
        index = self.store.bump()
        self._queries[existing.id] = evolve(
            existing, given=evolve(given, id=existing.id), modify_index=index
        )
        self._queries_index = index
        self.store.changed()

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
        self._queries_index = self.store.bump()
        log.info("prepared query deleted: {id}", id=existing.id)
        self.store.changed()

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
            if uuid_problem(id_or_name) is None
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
            authz = self.acl_table.resolve_token(q.token)
        entries = self.health_table.health(
            q.service, connect=connect or q.connect, authz=authz
        )
        nodes = filter_entries(entries, q)
        self.store.rng.shuffle(nodes)
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
            "Datacenter": self.settings.datacenter,
            "Failovers": 0,
            "Index": 0,
            "LastContact": 0,
            "KnownLeader": True,
            "ConsistencyLevel": "leader",
        }
