"""
The HTTP API's resource: the routes, dispatch (Go's ServeMux redirects, 405
with ``Allow``, ``OPTIONS``), and :class:`AgentResource`, made of one handler
group per area.  It registers itself as the agent's ``IResource`` adapter, so
:meth:`DevAgent.resource() <connect_native.devagent.agent.DevAgent.resource>`
finds it without the agent importing the HTTP layer.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from attrs import frozen
from twisted.python.components import registerAdapter
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from connect_native.devagent.agent import DevAgent
from connect_native.devagent.http.acl import AclHandlers
from connect_native.devagent.http.agent import AgentHandlers
from connect_native.devagent.http.config import ConfigHandlers
from connect_native.devagent.http.connect import ConnectHandlers
from connect_native.devagent.http.discovery import DiscoveryHandlers
from connect_native.devagent.http.intentions import IntentionHandlers
from connect_native.devagent.http.queries import QueryHandlers
from connect_native.devagent.http.wire import TEXT_PLAIN, Reply, decode_text
from connect_native.devagent.store import ConsulError


@frozen
class _Route:
    pattern: str
    prefix: bool
    methods: tuple[str, ...]
    handler: str


ROUTES = (
    _Route("/v1/agent/self", False, ("GET",), "agent_self"),
    _Route("/v1/agent/members", False, ("GET",), "agent_members"),
    _Route("/v1/status/leader", False, ("GET",), "status_leader"),
    _Route("/v1/status/peers", False, ("GET",), "status_peers"),
    _Route("/v1/agent/services", False, ("GET",), "agent_services"),
    _Route("/v1/agent/service/register", False, ("PUT",), "service_register"),
    _Route("/v1/agent/service/deregister/", True, ("PUT",), "service_deregister"),
    _Route("/v1/agent/service/", True, ("GET",), "agent_service"),
    _Route("/v1/agent/checks", False, ("GET",), "agent_checks"),
    _Route("/v1/agent/check/register", False, ("PUT",), "check_register"),
    _Route("/v1/agent/check/deregister/", True, ("PUT",), "check_deregister"),
    _Route("/v1/agent/check/pass/", True, ("PUT",), "check_pass"),
    _Route("/v1/agent/check/warn/", True, ("PUT",), "check_warn"),
    _Route("/v1/agent/check/fail/", True, ("PUT",), "check_fail"),
    _Route("/v1/agent/check/update/", True, ("PUT",), "check_update"),
    _Route("/v1/agent/connect/authorize", False, ("POST",), "authorize"),
    _Route("/v1/agent/connect/ca/roots", False, ("GET",), "agent_roots"),
    _Route("/v1/agent/connect/ca/leaf/", True, ("GET",), "leaf"),
    _Route("/v1/connect/ca/roots", False, ("GET",), "server_roots"),
    _Route("/v1/connect/ca/configuration", False, ("GET", "PUT"), "ca_configuration"),
    _Route("/v1/connect/intentions", False, ("GET", "POST"), "intentions"),
    _Route("/v1/connect/intentions/match", False, ("GET",), "intentions_match"),
    _Route("/v1/connect/intentions/check", False, ("GET",), "intentions_check"),
    _Route("/v1/connect/intentions/", True, ("GET", "PUT", "DELETE"), "intention"),
    _Route("/v1/catalog/services", False, ("GET",), "catalog_services"),
    _Route("/v1/catalog/nodes", False, ("GET",), "catalog_nodes"),
    _Route("/v1/catalog/datacenters", False, ("GET",), "catalog_datacenters"),
    _Route("/v1/catalog/service/", True, ("GET",), "catalog_service"),
    _Route("/v1/catalog/connect/", True, ("GET",), "catalog_connect"),
    _Route("/v1/health/service/", True, ("GET",), "health_service"),
    _Route("/v1/health/connect/", True, ("GET",), "health_connect"),
    _Route("/v1/config", False, ("PUT",), "config_apply"),
    _Route("/v1/config/", True, ("GET", "DELETE"), "config_entry"),
    _Route("/v1/query", False, ("GET", "POST"), "queries"),
    _Route("/v1/query/", True, ("GET", "PUT", "DELETE"), "query_specific"),
    _Route("/v1/acl/policy", False, ("PUT",), "acl_policy_create"),
    _Route("/v1/acl/token", False, ("PUT",), "acl_token_create"),
    # The rest of 1.8.7's ACL API: 401 with ACLs off (after the method
    # check, as measured); not modelled with them on.
    *(
        _Route(pattern, pattern.endswith("/"), methods, "acl_other")
        for pattern, methods in (
            ("/v1/acl/bootstrap", ("PUT",)),
            ("/v1/acl/create", ("PUT",)),
            ("/v1/acl/update", ("PUT",)),
            ("/v1/acl/destroy/", ("PUT",)),
            ("/v1/acl/info/", ("GET",)),
            ("/v1/acl/clone/", ("PUT",)),
            ("/v1/acl/list", ("GET",)),
            ("/v1/acl/login", ("POST",)),
            ("/v1/acl/logout", ("POST",)),
            ("/v1/acl/replication", ("GET",)),
            ("/v1/acl/policies", ("GET",)),
            ("/v1/acl/policy/", ("GET", "PUT", "DELETE")),
            ("/v1/acl/policy/name/", ("GET",)),
            ("/v1/acl/roles", ("GET",)),
            ("/v1/acl/role", ("PUT",)),
            ("/v1/acl/role/", ("GET", "PUT", "DELETE")),
            ("/v1/acl/role/name/", ("GET",)),
            ("/v1/acl/binding-rules", ("GET",)),
            ("/v1/acl/binding-rule", ("PUT",)),
            ("/v1/acl/binding-rule/", ("GET", "PUT", "DELETE")),
            ("/v1/acl/auth-methods", ("GET",)),
            ("/v1/acl/auth-method", ("PUT",)),
            ("/v1/acl/auth-method/", ("GET", "PUT", "DELETE")),
            ("/v1/acl/rules/translate", ("POST",)),
            ("/v1/acl/rules/translate/", ("GET",)),
            ("/v1/acl/tokens", ("GET",)),
            ("/v1/acl/token/self", ("GET",)),
            ("/v1/acl/token/", ("GET", "PUT", "DELETE")),
        )
    ),
)


def _route(path: str) -> tuple[_Route, str] | None:
    """
    Go's ``ServeMux``: an exact pattern, else the longest matching prefix.
    """
    best: tuple[_Route, str] | None = None
    for route in ROUTES:
        if not route.prefix and path == route.pattern:
            return route, ""
        if route.prefix and path.startswith(route.pattern):
            if best is None or len(route.pattern) > len(best[0].pattern):
                best = (route, path[len(route.pattern) :])
    return best


class AgentResource(
    Resource,
    AgentHandlers,
    ConnectHandlers,
    IntentionHandlers,
    DiscoveryHandlers,
    ConfigHandlers,
    QueryHandlers,
    AclHandlers,
):
    """
    The agent's HTTP API.  ``StubTreq(AgentResource(agent))`` talks to it in
    memory; ``Site(AgentResource(agent))`` serves it.
    """

    isLeaf = True

    def __init__(self, agent: DevAgent) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.agent = agent

    def render(self, request: Request) -> bytes | int:
        reply = Reply(request, self.agent.clock)
        try:
            self._dispatch(request, reply)
        except ConsulError as e:
            reply.error(e)
        except Exception:
            reply.failure(Failure())  # type: ignore[no-untyped-call]
        return NOT_DONE_YET

    def _dispatch(self, request: Request, reply: Reply) -> None:
        raw_path = request.uri.split(b"?", 1)[0].split(b"#", 1)[0]
        path = unquote_to_bytes(raw_path).decode("utf-8", errors="replace")
        method = (request.method or b"GET").decode("ascii", "replace")
        if not path.isprintable():
            # Consul's HTTP wrapper refuses, before any route, a path with a
            # character Go's unicode.IsPrint rejects (the same set as
            # str.isprintable): 400, no body (robust20-path-*.http).
            reply.send(400, b"", content_type=None, vary=False)
            return
        found = _route(path)
        if found is None and _route(path + "/") is not None and not path.endswith("/"):
            # Go's ServeMux sends a path without its subtree's slash there.
            location = path + "/"
            if b"?" in request.uri:
                location += "?" + decode_text(request.uri.split(b"?", 1)[1])
            body = b""
            if method == "GET":
                body = f'<a href="{location}">Moved Permanently</a>.\n\n'.encode()
            reply.send(
                301,
                body,
                content_type="text/html; charset=utf-8",
                headers=[("Location", location)],
            )
            return
        if found is None:
            # Outside the API's gzip wrapper: no Vary header here.
            if path == "/":
                reply.send(200, b"Consul Agent", content_type=TEXT_PLAIN, vary=False)
            else:
                reply.send(404, b"", content_type=None, vary=False)
            return
        route, rest = found
        allow = ",".join(("OPTIONS", *route.methods))
        if method == "OPTIONS":
            reply.send(200, b"", content_type=None, headers=[("Allow", allow)])
            return
        if method not in route.methods:
            raise ConsulError(405, f"method {method} not allowed", allow=allow)
        handler: Callable[[Request, Reply, str, str], None] = getattr(
            self, "_" + route.handler
        )
        handler(request, reply, rest, method)


# DevAgent.resource() adapts the agent to IResource: the agent does not
# import this module, the HTTP layer above it plugs itself in.
registerAdapter(AgentResource, DevAgent, IResource)  # type: ignore[no-untyped-call]
