"""
What every endpoint handler shares: the resource's agent, the request's
token, datacenter and namespace checks, the body, and the two kinds of
blocking read (a server RPC's and the agent cache's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.server import Request

from connect_native.devagent.agent import DevAgent
from connect_native.devagent.gocompat import GoJSONError, Schema, parse_go_json
from connect_native.devagent.http.wire import (
    DEFAULT_QUERY_TIME,
    JITTER_FRACTION,
    MAX_QUERY_TIME,
    QueryOptions,
    Reply,
    meta_headers,
    parse_query,
    refuse_namespaces,
    request_token,
)
from connect_native.devagent.store import ConsulError
from connect_native.devagent.tables.acl_rules import Authorizer

T = TypeVar("T")


class Handlers:
    """
    The base of the handler groups that make up
    :class:`~connect_native.devagent.http.resource.AgentResource`.
    """

    agent: DevAgent

    def _authz(self, request: Request) -> Authorizer | None:
        """
        The rights of the request's token (``None`` with ACLs off).

        :raises ConsulError: 403 ``ACL not found`` for an unknown token.
        """
        return self.agent.resolve_token(request_token(request, parse_query(request)))

    def _intention_namespaces(
        self, request: Request, query: dict[str, list[str]]
    ) -> None:
        """
        1.8.7's intention endpoints ignore ``?ns=`` and ``X-Consul-Namespace``
        (measured); from 1.9 they parse them, and Consul OSS refuses them.
        """
        if self.agent.newer_api:
            refuse_namespaces(request, query)

    def _check_dc(self, options: QueryOptions, *, meta: bool = False) -> None:
        """
        Another datacenter is unreachable.  On catalog-backed reads Consul has
        already set (empty) query meta headers when the RPC fails.
        """
        if (
            options.datacenter is not None
            and options.datacenter != self.agent.datacenter
        ):
            raise ConsulError(
                500,
                "No path to datacenter",
                headers=meta_headers(1, known_leader=False) if meta else (),
            )

    def _body(self, request: Request) -> bytes:
        content = request.content
        if content is None:
            return b""
        content.seek(0)
        data: bytes = content.read()
        return data

    def _object_body(self, request: Request, schema: Schema) -> bytes:
        """
        The body, refused when it is JSON ``null``: real 1.8.7 panics on a
        null CA configuration, prepared query or intention update and drops
        the connection (``ca20err-body-null.http``,
        ``robust20-*-null.http``); here it is a decode error in Go's words
        for the other values it cannot take (``ca20err-body-list.http``).

        :raises GoJSONError: for ``null``, or a body that is not JSON.
        """
        body = self._body(request)
        if parse_go_json(body) is None:
            raise GoJSONError(
                f"json: cannot unmarshal null into Go value of type {schema.go_type}"
            )
        return body

    def _after(
        self,
        reply: Reply,
        waiting: Deferred[T],
        then: Callable[[T], None],
    ) -> None:
        """
        Answer with ``then`` once ``waiting`` fires; a client that goes away
        cancels it.
        """

        def cancel(failure: Failure) -> None:
            waiting.cancel()

        reply.request.notifyFinish().addErrback(cancel)
        waiting.addCallback(then).addErrback(reply.failure)

    def _rpc_blocking(
        self,
        reply: Reply,
        options: QueryOptions,
        index: Callable[[], int],
        answer: Callable[[], None],
    ) -> None:
        """
        A server-side blocking query (``blockingQuery`` in Consul's RPC
        layer): at once without an index or when the data moved past it,
        else until it does or the wait (5 minutes by default, 10 at most)
        plus up to 1/16 of it as jitter runs out.
        """
        min_index = options.index
        if min_index == 0 or index() > min_index:
            answer()
            return
        timeout = options.wait
        if timeout > MAX_QUERY_TIME:
            timeout = MAX_QUERY_TIME
        elif timeout <= 0:
            timeout = DEFAULT_QUERY_TIME
        timeout += self.agent.rng.random() * (timeout / JITTER_FRACTION)
        waiting = self.agent.wait_until(lambda: index() > min_index, timeout)
        self._after(reply, waiting, lambda changed: answer())

    def _cache_blocking(
        self,
        reply: Reply,
        options: QueryOptions,
        existed: bool,
        index: Callable[[], int],
        answer: Callable[[bool], None],
    ) -> None:
        """
        A read through a background-refreshed agent cache entry: a hit at
        once unless the caller blocks at (or above) its index; a blocking
        call has no jitter and, without a positive ``wait``, no timeout.
        """
        min_index = options.index
        if not (min_index > 0 and min_index >= index()):
            answer(existed)
            return
        timeout = options.wait if options.wait > 0 else None
        waiting = self.agent.wait_until(lambda: index() > min_index, timeout)
        self._after(reply, waiting, lambda changed: answer(False))
