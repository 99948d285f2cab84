"""
Connect: the CA roots and configuration, leaf certificates and authorize.
"""

from __future__ import annotations

from twisted.web.server import Request

from connect_native.devagent.gocompat import GoJSONError, decode_go_json
from connect_native.devagent.http.bodies import AUTHORIZE, CA_CONFIGURATION
from connect_native.devagent.http.handlers import Handlers
from connect_native.devagent.http.wire import (
    Reply,
    cache_headers,
    meta_headers,
    parse_query,
    query_options,
    refuse_namespaces,
)
from connect_native.devagent.store import ConsulError, permission_denied
from connect_native.devagent.tables.connect_ca import CAConfigInput, LeafAnswer


class ConnectHandlers(Handlers):
    """
    Connect: the CA roots and configuration, leaf certificates and authorize.
    """

    def _agent_roots(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        options = query_options(request, parse_query(request))
        self._check_dc(options)
        existed = self.agent.roots_cache_lookup()

        def answer(hit: bool) -> None:
            reply.json(
                self.agent.roots_json(),
                cache_headers(hit)
                + meta_headers(self.agent.roots_index, known_leader=False),
            )

        self._cache_blocking(
            reply, options, existed, lambda: self.agent.roots_index, answer
        )

    def _server_roots(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        options = query_options(request, parse_query(request))
        self._check_dc(options, meta=True)

        def answer() -> None:
            reply.json(
                self.agent.roots_json(),
                meta_headers(self.agent.roots_index, known_leader=False),
            )

        self._rpc_blocking(reply, options, lambda: self.agent.roots_index, answer)

    def _ca_configuration(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        options = query_options(request, parse_query(request))
        self._check_dc(options)
        authz = self._authz(request)
        access = "read" if method == "GET" else "write"
        if authz is not None and not authz.allowed("operator", "", access):
            raise permission_denied()
        if method == "GET":
            reply.json(self.agent.ca_config_json())
            return
        try:
            body = self._object_body(request, CA_CONFIGURATION)
            decoded = decode_go_json(body, CA_CONFIGURATION)
        except GoJSONError as e:
            raise ConsulError(400, f"Bad request: Request decode failed: {e}") from None
        self.agent.set_ca_config(
            CAConfigInput(
                provider=decoded["Provider"] or "",
                config=decoded["Config"],
                force_without_cross_signing=bool(decoded["ForceWithoutCrossSigning"]),
            )
        )
        reply.empty()

    def _leaf(self, request: Request, reply: Reply, rest: str, method: str) -> None:
        query = parse_query(request)
        refuse_namespaces(request, query)
        options = query_options(request, query)
        authz = self._authz(request)
        if authz is not None and not authz.service_write(rest):
            raise permission_denied()
        waiting = self.agent.leaf(
            rest,
            min_index=options.index,
            wait=options.wait if options.wait > 0 else None,
            datacenter=options.datacenter,
        )

        def answer(leaf: LeafAnswer) -> None:
            reply.json(
                leaf.body,
                [
                    *cache_headers(leaf.cache_hit, leaf.age),
                    ("X-Consul-Index", str(max(leaf.index, 1))),
                ],
            )

        self._after(reply, waiting, answer)

    def _authorize(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        refuse_namespaces(request, parse_query(request))
        try:
            decoded = decode_go_json(self._body(request), AUTHORIZE)
        except GoJSONError as e:
            raise ConsulError(400, f"Bad request: Request decode failed: {e}") from None
        authorized, reason, hit = self.agent.authorize(
            decoded["Target"] or "",
            decoded["ClientCertURI"] or "",
            self._authz(request),
        )
        reply.json({"Authorized": authorized, "Reason": reason}, cache_headers(hit))
