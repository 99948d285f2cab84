"""
Prepared queries: ``/v1/query``.
"""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request

from connect_native.devagent.gocompat import GoJSONError, decode_go_json, go_quote
from connect_native.devagent.http.bodies import QUERY
from connect_native.devagent.http.handlers import Handlers
from connect_native.devagent.http.wire import (
    Reply,
    first_arg,
    go_atoi,
    meta_headers,
    parse_bool,
    parse_query,
    query_options,
)
from connect_native.devagent.store import ConsulError
from connect_native.devagent.tables.queries import QueryInput


class QueryHandlers(Handlers):
    """
    Prepared queries: ``/v1/query``.
    """

    def _queries(self, request: Request, reply: Reply, rest: str, method: str) -> None:
        query = parse_query(request)
        options = query_options(request, query)
        self._check_dc(options, meta=method == "GET")
        authz = self._authz(request)
        if method == "POST":
            reply.json(
                {
                    "ID": self.agent.query_create(
                        self._query_body(request, creating=True), authz
                    )
                }
            )
            return

        def answer() -> None:
            reply.json(
                self.agent.queries_list(authz),
                meta_headers(
                    self.agent.queries_index,
                    known_leader=True,
                    consistency=options.consistency,
                ),
            )

        self._rpc_blocking(reply, options, lambda: self.agent.queries_index, answer)

    def _query_body(self, request: Request, *, creating: bool = False) -> QueryInput:
        # A null update is decoded as an empty query, as in 1.8.7; a null
        # create makes it panic (robust20-query-create-null.http).
        try:
            body = (
                self._object_body(request, QUERY) if creating else self._body(request)
            )
            d = decode_go_json(body, QUERY)
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
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        query = parse_query(request)
        options = query_options(request, query)
        if rest.endswith("/execute"):
            if method != "GET":
                raise ConsulError(405, f"method {method} not allowed", allow="GET")
            self._check_dc(options)
            limit = 0
            limit_text = first_arg(query, "limit")
            if limit_text:
                limit = go_atoi(limit_text, "Bad limit: ")
            connect = False
            connect_text = first_arg(query, "connect")
            if connect_text:
                try:
                    connect = parse_bool(connect_text)
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
                meta_headers(1, known_leader=True, consistency=options.consistency),
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
                    meta_headers(
                        self.agent.queries_index,
                        known_leader=True,
                        consistency=options.consistency,
                    ),
                )

            try:
                self.agent.query_get(rest, authz)
            except ConsulError as e:
                if e.status != 500:
                    raise
                # The RPC's error after setMeta (robust20-query-get-bad-id.http).
                raise ConsulError(
                    500, e.message, headers=meta_headers(1, known_leader=False)
                ) from None
            self._rpc_blocking(reply, options, lambda: self.agent.queries_index, answer)
        elif method == "PUT":
            self.agent.query_update(rest, self._query_body(request), authz)
            reply.empty()
        else:
            self.agent.query_delete(rest, authz)
            reply.empty()
