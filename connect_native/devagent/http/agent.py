"""
``/v1/agent/...``: agent/self, services, checks and their updates.
"""

from __future__ import annotations

from twisted.web.server import Request

from connect_native.devagent.gocompat import (
    GoDurationError,
    GoJSONError,
    decode_go_json,
)
from connect_native.devagent.http.bodies import (
    CHECK_DEFINITION,
    CHECK_UPDATE,
    SERVICE,
    check_definition,
    service_definition,
)
from connect_native.devagent.http.handlers import Handlers
from connect_native.devagent.http.wire import (
    DEFAULT_QUERY_TIME,
    JITTER_FRACTION,
    MAX_QUERY_TIME,
    Reply,
    apply_filter,
    first_arg,
    parse_query,
    query_filter,
    query_options,
    refuse_namespaces,
)
from connect_native.devagent.store import ConsulError, permission_denied


class AgentHandlers(Handlers):
    """
    ``/v1/agent/...``: agent/self, services, checks and their updates.
    """

    def _agent_self(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        authz = self._authz(request)
        if authz is not None and not authz.allowed(
            "agent", self.agent.node_name, "read"
        ):
            raise permission_denied()
        reply.json(self.agent.agent_self())

    def _agent_members(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        """
        ``GET /v1/agent/members``: the one member of this one-node pool
        (``?wan=1``: of the WAN pool), as ``consul members`` asks; a token
        without ``node:read`` on it sees none.
        """
        query = parse_query(request)
        # Consul looks only at whether the parameter is there.
        wan = "wan" in query
        authz = self._authz(request)
        if authz is not None and not authz.allowed(
            "node", self.agent.node_name, "read"
        ):
            reply.json([])
            return
        reply.json([self.agent.member(wan=wan)])

    def _status_leader(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        """``GET /v1/status/leader``: this agent, the leader of its one-node cluster."""
        reply.json(self.agent.leader_address)

    def _status_peers(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        """``GET /v1/status/peers``: the raft peers, this agent alone."""
        reply.json([self.agent.leader_address])

    def _agent_services(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        query = parse_query(request)
        refuse_namespaces(request, query)
        flt = query_filter(query, "agent/services", rpc=False)
        reply.json(apply_filter(flt, self.agent.services_json(self._authz(request))))

    def _agent_service(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        query = parse_query(request)
        refuse_namespaces(request, query)
        options = query_options(request, query)
        authz = self._authz(request)
        digest = self.agent.service_json(rest, authz)[1]
        wanted = first_arg(query, "hash")

        def answer() -> None:
            try:
                body, digest = self.agent.service_json(rest, authz)
            except ConsulError as e:
                reply.error(e)
                return
            reply.json(body, [("X-Consul-Contenthash", digest)])

        if not wanted or wanted != digest:
            answer()
            return
        # agentLocalBlockingQuery: hash-based, 5 minutes by default, at most
        # 10, plus jitter.
        timeout = options.wait or DEFAULT_QUERY_TIME
        timeout = min(timeout, MAX_QUERY_TIME)
        timeout += self.agent.rng.random() * (timeout / JITTER_FRACTION)

        def moved() -> bool:
            try:
                return self.agent.service_json(rest)[1] != wanted
            except ConsulError:
                return True

        waiting = self.agent.wait_until(moved, timeout)
        self._after(reply, waiting, lambda changed: answer())

    def _agent_checks(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        query = parse_query(request)
        refuse_namespaces(request, query)
        flt = query_filter(query, "agent/checks", rpc=False)
        reply.json(apply_filter(flt, self.agent.checks_json(self._authz(request))))

    def _service_register(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        query = parse_query(request)
        refuse_namespaces(request, query)
        try:
            decoded = decode_go_json(self._body(request), SERVICE)
        except (GoJSONError, GoDurationError) as e:
            raise ConsulError(400, f"Request decode failed: {e}") from None
        # Consul 1.8.7 replaces only for a bare flag or "true" (measured:
        # "1", "t" and "TRUE" do not).
        replace = "replace-existing-checks" in query and first_arg(
            query, "replace-existing-checks"
        ) in ("", "true")
        self.agent.register_service(
            service_definition(decoded),
            replace_existing_checks=replace,
            authz=self._authz(request),
        )
        reply.empty()

    def _service_deregister(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        refuse_namespaces(request, parse_query(request))
        self.agent.deregister_service(rest, self._authz(request))
        reply.empty()

    def _check_register(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        refuse_namespaces(request, parse_query(request))
        try:
            decoded = decode_go_json(self._body(request), CHECK_DEFINITION)
        except (GoJSONError, GoDurationError) as e:
            raise ConsulError(400, f"Request decode failed: {e}") from None
        self.agent.register_check(
            check_definition(decoded),
            decoded["ServiceID"] or "",
            self._authz(request),
        )
        reply.empty()

    def _check_deregister(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        refuse_namespaces(request, parse_query(request))
        self.agent.deregister_check(rest, self._authz(request))
        reply.empty()

    def _check_status(
        self, request: Request, reply: Reply, check_id: str, status: str
    ) -> None:
        query = parse_query(request)
        refuse_namespaces(request, query)
        self.agent.update_ttl_check(
            check_id, status, first_arg(query, "note"), self._authz(request)
        )
        reply.empty()

    def _check_pass(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        self._check_status(request, reply, rest, "passing")

    def _check_warn(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        self._check_status(request, reply, rest, "warning")

    def _check_fail(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        self._check_status(request, reply, rest, "critical")

    def _check_update(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        refuse_namespaces(request, parse_query(request))
        try:
            update = decode_go_json(self._body(request), CHECK_UPDATE)
        except GoJSONError as e:
            raise ConsulError(400, f"Request decode failed: {e}") from None
        status = update["Status"] or ""
        if status not in ("passing", "warning", "critical"):
            raise ConsulError(400, f"Invalid check status: '{status}'")
        self.agent.update_ttl_check(
            rest, status, update["Output"] or "", self._authz(request)
        )
        reply.empty()
