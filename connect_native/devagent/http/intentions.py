"""
The intention endpoints (and, from 1.9, the exact ones).
"""

from __future__ import annotations

from typing import Any

from twisted.web.server import Request

from connect_native.devagent.gocompat import GoJSONError, decode_go_json
from connect_native.devagent.http.bodies import (
    EXACT_INTENTION,
    INTENTION,
    intention_input,
)
from connect_native.devagent.http.handlers import Handlers
from connect_native.devagent.http.wire import (
    Reply,
    first_arg,
    meta_headers,
    parse_query,
    query_options,
)
from connect_native.devagent.store import ConsulError
from connect_native.devagent.tables.acl_rules import Authorizer


class IntentionHandlers(Handlers):
    """
    The intention endpoints (and, from 1.9, the exact ones).
    """

    def _intentions(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        query = parse_query(request)
        self._intention_namespaces(request, query)
        options = query_options(request, query)
        self._check_dc(options, meta=method == "GET")
        if method == "POST":
            try:
                decoded = decode_go_json(self._body(request), INTENTION)
            except GoJSONError as e:
                raise ConsulError(500, f"Failed to decode request body: {e}") from None
            new_id = self.agent.intention_create(
                intention_input(decoded), self._authz(request)
            )
            reply.json({"ID": new_id})
            return
        authz = self._authz(request)

        def answer() -> None:
            reply.json(
                self.agent.intentions_list(authz),
                meta_headers(self.agent.intentions_index, known_leader=True),
            )

        self._rpc_blocking(reply, options, lambda: self.agent.intentions_index, answer)

    def _intentions_match(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        query = parse_query(request)
        self._intention_namespaces(request, query)
        options = query_options(request, query)
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
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        query = parse_query(request)
        self._intention_namespaces(request, query)
        options = query_options(request, query)
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
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        query = parse_query(request)
        self._intention_namespaces(request, query)
        options = query_options(request, query)
        self._check_dc(options)
        authz = self._authz(request)
        if rest == "exact" and self.agent.newer_api:
            self._intention_exact(request, reply, query, method, authz)
            return
        if method == "GET":
            reply.json(self.agent.intention_get(rest, authz))
        elif method == "PUT":
            try:
                body = self._object_body(request, INTENTION)
                decoded = decode_go_json(body, INTENTION)
            except GoJSONError as e:
                raise ConsulError(
                    400, f"Bad request: Request decode failed: {e}"
                ) from None
            reply.json(
                {
                    "ID": self.agent.intention_update(
                        rest, intention_input(decoded), authz
                    )
                }
            )
        else:
            self.agent.intention_delete(rest, authz)
            reply.json(True)

    def _intention_exact(
        self,
        request: Request,
        reply: Reply,
        query: dict[str, list[str]],
        method: str,
        authz: Authorizer | None,
    ) -> None:
        names = []
        for key in ("source", "destination"):
            if not first_arg(query, key):
                raise ConsulError(500, f"required query parameter '{key}' not set")
            names.append(first_arg(query, key))
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
            fields = decode_go_json(self._body(request), EXACT_INTENTION)
        except GoJSONError as e:
            raise ConsulError(400, f"Bad request: Request decode failed: {e}") from None
        self.agent.intention_exact_put(source, destination, fields, authz)
        reply.json(True)
