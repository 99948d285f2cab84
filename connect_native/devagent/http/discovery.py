"""
Service discovery: ``/v1/health/...`` and ``/v1/catalog/...``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.web.server import Request

from connect_native.devagent.http.handlers import Handlers
from connect_native.devagent.http.wire import (
    DiscoveryRead,
    QueryOptions,
    Reply,
    apply_filter,
    cache_headers,
    first_arg,
    meta_headers,
    node_meta_filter,
    parse_bool,
    parse_query,
    query_filter,
    query_options,
    refuse_filter,
    refuse_namespaces,
)
from connect_native.devagent.store import ConsulError
from connect_native.devagent.tables.acl_rules import Authorizer


class DiscoveryHandlers(Handlers):
    """
    Service discovery: ``/v1/health/...`` and ``/v1/catalog/...``.
    """

    def _catalog_services(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        """
        ``GET /v1/catalog/services``: every service and its tags, as a
        blocking query on the services' index (what ``consul catalog
        services`` asks).
        """
        self._catalog_listing(
            request,
            reply,
            self.agent.services_index,
            self.agent.services_listing,
            namespaced=True,
        )

    def _catalog_nodes(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        """``GET /v1/catalog/nodes``: this agent's one node, a blocking query."""
        self._catalog_listing(
            request, reply, self.agent.nodes_index, self.agent.nodes, namespaced=False
        )

    def _catalog_listing(
        self,
        request: Request,
        reply: Reply,
        index: Callable[[], int],
        body: Callable[[Authorizer | None], Any],
        *,
        namespaced: bool,
    ) -> None:
        """A catalog listing read: ``body(authz)`` as a blocking query on ``index``."""
        query = parse_query(request)
        if namespaced:
            refuse_namespaces(request, query)
        options = query_options(request, query)
        self._check_dc(options, meta=True)
        refuse_filter(query)
        authz = self._authz(request)

        def answer() -> None:
            reply.json(
                body(authz),
                meta_headers(
                    index(), known_leader=True, consistency=options.consistency
                ),
            )

        self._rpc_blocking(reply, options, index, answer)

    def _catalog_datacenters(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        """``GET /v1/catalog/datacenters``: the one datacenter."""
        reply.json([self.agent.datacenter])

    def _health_service(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        self._health(request, reply, rest, connect=False)

    def _health_connect(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        self._health(request, reply, rest, connect=True)

    def _catalog_service(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        self._catalog(request, reply, rest, connect=False)

    def _catalog_connect(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        self._catalog(request, reply, rest, connect=True)

    def _catalog(
        self, request: Request, reply: Reply, name: str, *, connect: bool
    ) -> None:
        read = self._discovery_read(
            request, reply, name, connect=connect, schema="catalog/service"
        )
        if read is None:
            return
        self._serve_discovery(
            reply,
            read,
            "catalog",
            lambda: self.agent.catalog_index(name),
            lambda: apply_filter(
                read.filter,
                self.agent.catalog(
                    name,
                    connect=connect,
                    tags=read.tags,
                    node_meta=read.node_meta,
                    authz=read.authz,
                ),
            ),
        )

    def _health(
        self, request: Request, reply: Reply, name: str, *, connect: bool
    ) -> None:
        read = self._discovery_read(
            request, reply, name, connect=connect, schema="health/service"
        )
        if read is None:
            return

        def entries() -> Any:
            # Consul reads ?passing after the query, so a bad value is only
            # reported once a blocking call returns.
            passing = False
            if "passing" in read.query:
                value = first_arg(read.query, "passing")
                if value:
                    try:
                        passing = parse_bool(value)
                    except ValueError:
                        raise ConsulError(400, "Invalid value for ?passing") from None
                else:
                    passing = True
            return apply_filter(
                read.filter,
                self.agent.health(
                    name,
                    connect=connect,
                    passing=passing,
                    tags=read.tags,
                    node_meta=read.node_meta,
                    authz=read.authz,
                ),
            )

        self._serve_discovery(
            reply,
            read,
            "health",
            lambda: self.agent.health_index(name, connect=connect),
            entries,
        )

    def _discovery_read(
        self,
        request: Request,
        reply: Reply,
        name: str,
        *,
        connect: bool,
        schema: str,
    ) -> DiscoveryRead | None:
        """
        The checks and parameters that ``/v1/catalog/service``,
        ``/v1/catalog/connect``, ``/v1/health/service`` and
        ``/v1/health/connect`` share, in Consul's order; ``None`` once a
        Connect read without ``service:read`` has been answered.

        :raises ConsulError: with Consul's status and message for a bad
            parameter, another datacenter, a missing name or an unknown token.
        """
        query = parse_query(request)
        refuse_namespaces(request, query)
        options = query_options(request, query)
        self._check_dc(options, meta=True)
        if not name:
            raise ConsulError(400, "Missing service name")
        flt = query_filter(query, schema, rpc=True)
        tags = query.get("tag", [])
        if connect and not self.agent.newer_api:
            # 1.8.7's state store drops ?tag= on Connect reads: every
            # instance and proxy comes back (health-connect-tag-*.http).
            tags = []
        node_meta = node_meta_filter(query)
        authz = self._authz(request)
        if self._connect_denied(reply, authz, name, connect, options):
            return None
        return DiscoveryRead(
            name=name,
            connect=connect,
            query=query,
            options=options,
            tags=tags,
            node_meta=node_meta,
            authz=authz,
            filter=flt,
        )

    def _serve_discovery(
        self,
        reply: Reply,
        read: DiscoveryRead,
        kind: str,
        index: Callable[[], int],
        body: Callable[[], Any],
    ) -> None:
        """
        Answer a service read with ``body()`` and its query meta, through
        the agent cache under ``kind`` with ``?cached``, else as a blocking
        query.  A :class:`ConsulError` from ``body`` is the answer instead,
        also after a blocking wait.
        """

        def answer(cache_headers: list[tuple[str, str]]) -> None:
            reply.json(
                body(),
                cache_headers
                + meta_headers(
                    index(), known_leader=True, consistency=read.options.consistency
                ),
            )

        options = read.options
        if options.cached:
            existed = self.agent.cache_lookup(
                (kind, read.connect, read.name.lower(), tuple(read.tags))
            )
            self._cache_blocking(
                reply, options, existed, index, lambda hit: answer(cache_headers(hit))
            )
            return
        self._rpc_blocking(reply, options, index, lambda: answer([]))

    def _connect_denied(
        self,
        reply: Reply,
        authz: Authorizer | None,
        name: str,
        connect: bool,
        options: QueryOptions,
    ) -> bool:
        """
        A Connect read without ``service:read`` on the service: Consul
        returns before its blocking query, so the answer is ``[]`` with
        index 1 and no known leader, at once even for a blocking call
        (acl-health-connect-anon-block.http).  A client watching it spins.
        """
        if not connect or authz is None or authz.service_read(name):
            return False
        reply.json(
            [],
            meta_headers(1, known_leader=False, consistency=options.consistency),
        )
        return True
