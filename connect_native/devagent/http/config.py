"""
Consul 1.9+: ``/v1/config`` for service-intentions entries (from the source).
"""

from __future__ import annotations

import re
from typing import Any

from twisted.web.server import Request

from connect_native.devagent.gocompat import GoJSONError, decode_go_json, go_quote
from connect_native.devagent.http.bodies import CONFIG_ENTRY
from connect_native.devagent.http.handlers import Handlers
from connect_native.devagent.http.wire import (
    Reply,
    first_arg,
    meta_headers,
    parse_query,
    query_options,
    refuse_namespaces,
)
from connect_native.devagent.store import ConsulError


class ConfigHandlers(Handlers):
    """
    Consul 1.9+: ``/v1/config`` for service-intentions entries (from the source).
    """

    def _config_apply(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        query = parse_query(request)
        refuse_namespaces(request, query)
        options = query_options(request, query)
        self._check_dc(options)
        try:
            decoded = decode_go_json(self._body(request), CONFIG_ENTRY)
        except GoJSONError as e:
            raise ConsulError(
                400, f"Bad request: Request decoding failed: {e}"
            ) from None
        if decoded["Kind"] is None:
            # decodeConfigEntry looks for the key first: so for a null body
            # too (robust20-config-put-null.http, robust20-config-put-empty.http).
            raise ConsulError(
                400,
                "Bad request: Request decoding failed: Payload does not contain a "
                "kind/Kind key at the top level",
            )
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
        text = first_arg(query, "cas")
        if not re.fullmatch(r"[0-9]+", text) or int(text) >= 1 << 64:
            raise ConsulError(
                400, f"Bad request: Failed to parse 'cas' value: {go_quote(text)}"
            )
        return int(text)

    def _config_entry(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        query = parse_query(request)
        refuse_namespaces(request, query)
        options = query_options(request, query)
        kind, _, name = rest.partition("/")
        if method == "DELETE":
            # Checked in the HTTP layer, before the RPC that needs the
            # datacenter (robust20-config-delete-*.http).
            if not name:
                raise ConsulError(404, "Must provide both a kind and name to delete")
            self.agent.config_check_delete_kind(kind)
        self._check_dc(options, meta=method == "GET")
        authz = self._authz(request)
        if method == "DELETE":
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
                meta_headers(
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
