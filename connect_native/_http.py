"""
The Connect treq client behind :mod:`connect_native.http`: the host names it
reaches, the endpoint factory, the retrying agent and the client class, and
:func:`make_client`, which builds one for certificates the caller already
has.  It lives under :mod:`connect_native.service`, whose
``ConnectService.http_client()`` builds on it;
:func:`connect_native.http.client`, the convenience that finds the
service's certificates itself, is above.

Import the public names from :mod:`connect_native.http`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from attrs import frozen
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from connect_native import _logging
from connect_native._checks import positive_seconds, whole_number
from connect_native._deferreds import bounded
from connect_native.certs import IBundleSource
from connect_native.client import ConnectClientEndpoint
from connect_native.errors import (
    NotAConnectHost,
    RequestTimeout,
    ResponseBodyTimeout,
    ServiceRefused,
)
from connect_native.resolve import ConsulResolver, IResolver, PreparedQueryResolver

if TYPE_CHECKING:
    from connect_native.consul.client import ConsulClient

__all__ = [
    "MAX_HOSTS",
    "ConnectEndpointFactory",
    "ConnectHTTPClient",
    "ConnectHost",
    "NotAConnectHost",
    "RequestTimeout",
    "ResponseBodyTimeout",
    "check_settings",
    "make_client",
    "parse_connect_host",
]

log = Logger(observer=_logging.observer)

_failure: Callable[[BaseException], Failure] = Failure

_T = TypeVar("_T")

#: The only protocol offered in ALPN: Twisted's HTTP client speaks HTTP/1.1.
ALPN = (b"http/1.1",)

# Methods that may be sent twice (RFC 9110 9.2.2).
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

_FORMS = (
    "<service>.service[.<namespace>.ns][.<partition>.ap][.<datacenter>].consul "
    "or <query>.query[.<datacenter>].consul"
)


@frozen
class ConnectHost:
    """
    What a Connect host name names.

    :ivar kind: ``"service"`` or ``"query"``.
    :ivar name: the service or prepared query.
    """

    kind: str
    name: str
    datacenter: str | None = None
    namespace: str | None = None
    partition: str | None = None


def parse_connect_host(host: str) -> ConnectHost:
    """
    Read a Consul service or prepared query host name (see the module
    documentation for the forms).

    :raises NotAConnectHost: naming the host and the forms accepted.
    """
    labels = host.rstrip(".").split(".")

    def refuse(why: str) -> NotAConnectHost:
        return NotAConnectHost(
            f"{host!r} is not a Connect service host name ({why}); Connect "
            f"clients reach {_FORMS}. Use a plain HTTP client (treq, Agent) "
            "for other hosts"
        )

    if len(labels) < 3 or labels[-1].lower() != "consul":
        raise refuse("it does not end in .consul")
    if any(not label for label in labels):
        raise refuse("it has an empty label")
    name, kind = labels[0], labels[1].lower()
    rest = labels[2:-1]
    if kind == "query":
        if len(rest) > 1:
            raise refuse("a query name is <query>.query[.<datacenter>].consul")
        return ConnectHost("query", name, datacenter=rest[0] if rest else None)
    if kind != "service":
        raise refuse(f"the second label is {labels[1]!r}, not 'service' or 'query'")
    namespace = partition = None
    if len(rest) >= 2 and rest[1].lower() == "ns":
        namespace, rest = rest[0], rest[2:]
    if len(rest) >= 2 and rest[1].lower() == "ap":
        partition, rest = rest[0], rest[2:]
    if len(rest) > 1:
        raise refuse(
            "after the service come [<namespace>.ns][.<partition>.ap][.<datacenter>]"
        )
    return ConnectHost(
        "service",
        name,
        datacenter=rest[0] if rest else None,
        namespace=namespace,
        partition=partition,
    )


class _HostEndpoint(ConnectClientEndpoint):
    """
    The endpoint of one host name in a :class:`ConnectEndpointFactory`: it
    counts its ``connect()`` calls in flight, so that the factory can let go
    of its resolver once it is both forgotten and idle.

    Only a dial uses the resolver: a connection once made (pooled or in
    use) does not, so closing the resolver of an idle endpoint never
    touches a connection.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dialing = 0
        self.retired = False

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        self.dialing += 1
        try:
            dialing = super().connect(protocolFactory)
        except BaseException:
            self._dial_ended(None)
            raise
        return dialing.addBoth(self._dial_ended)

    def _dial_ended(self, result: _T) -> _T:
        self.dialing -= 1
        if self.retired and self.dialing == 0:
            _close_resolver(self)
        return result

    def retire(self) -> None:
        """
        Let go of the resolver now if no dial is in flight, else when the
        last one ends (a dial that is still resolving would otherwise fail
        with a cancelled resolution).  A later ``connect()`` still works:
        the resolver takes its watch again and lets go after that dial.
        """
        self.retired = True
        if self.dialing == 0:
            _close_resolver(self)


def _close_resolver(endpoint: ConnectClientEndpoint) -> None:
    close = getattr(endpoint.resolver, "close", None)
    if callable(close):
        close()


#: How many host names a client keeps an endpoint (and, for a service, a
#: Consul watch) for by default.
MAX_HOSTS = 64


@implementer(IAgentEndpointFactory)
class ConnectEndpointFactory:
    """
    Gives ``Agent.usingEndpointFactory`` a
    :class:`~connect_native.client.ConnectClientEndpoint` for each Connect
    host name (one per host, reused, so that its resolver and its memory of
    failed instances carry over).

    The endpoints are kept for at most ``max_hosts`` host names, the least
    recently used forgotten first: a service's endpoint holds a blocking
    watch on the agent, and host names may come from outside input, so an
    unbounded map would grow (and keep watches running) without end.  A
    forgotten endpoint's resolver is closed once no dial of it is in flight;
    its pooled connections are not touched.  Asking for that host again
    makes a new endpoint.

    :param reactor: connects and keeps time.
    :param consul: the agent's client, for the resolvers.
    :param bundle_source: our own service's certificates.
    :param max_hosts: how many host names keep an endpoint.
    :param endpoint_options: keyword arguments for each endpoint
        (``timeout``, ``attempt_timeout``, ...).
    """

    def __init__(
        self,
        reactor: Any,
        consul: ConsulClient,
        bundle_source: IBundleSource,
        *,
        max_hosts: int = MAX_HOSTS,
        **endpoint_options: Any,
    ) -> None:
        whole_number("max_hosts", max_hosts, 1)
        self._reactor = reactor
        self._consul = consul
        self._source = bundle_source
        self._options = endpoint_options
        self.max_hosts = max_hosts
        self._endpoints: OrderedDict[ConnectHost, _HostEndpoint] = OrderedDict()

    def resolver_for(self, host: ConnectHost) -> IResolver:
        """The resolver a host name stands for."""
        if host.kind == "query":
            return PreparedQueryResolver(
                self._consul, host.name, host.datacenter, reactor=self._reactor
            )
        return ConsulResolver(
            self._consul,
            host.name,
            datacenter=host.datacenter,
            namespace=host.namespace,
            partition=host.partition,
            reactor=self._reactor,
        )

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """
        The Connect endpoint for ``uri``'s host.

        :raises NotAConnectHost: for a scheme other than ``https`` or a host
            that names no Consul service or prepared query.
        """
        scheme = uri.scheme.decode("ascii", "replace")
        host_text = uri.host.decode("ascii", "replace")
        if scheme != "https":
            raise NotAConnectHost(
                f"{scheme}://{host_text}: Connect is always TLS: use "
                f"https://{host_text}/... (the certificates are Connect's, not "
                "the web's)"
            )
        host = parse_connect_host(host_text)
        endpoint = self._endpoints.get(host)
        if endpoint is not None:
            self._endpoints.move_to_end(host)
            return endpoint
        options = {"alpn_protocols": ALPN, **self._options}
        endpoint = _HostEndpoint(
            self._reactor, self.resolver_for(host), self._source, **options
        )
        self._endpoints[host] = endpoint
        while len(self._endpoints) > self.max_hosts:
            _, forgotten = self._endpoints.popitem(last=False)
            forgotten.retire()
        return endpoint

    def close(self) -> None:
        """
        Let go of the resolvers' shared watches now (a dial still resolving
        fails).
        """
        endpoints, self._endpoints = self._endpoints, OrderedDict()
        for endpoint in endpoints.values():
            _close_resolver(endpoint)


def _request_not_sent() -> tuple[type[BaseException], ...]:
    """
    twisted.web's RequestNotSent (a pooled connection closed before the
    request went out), as ``twisted.web.client`` names it; if a Twisted
    release drops it, such a failure is simply not retried.
    """
    try:
        from twisted.web.client import RequestNotSent  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover (present in every Twisted we support)
        return ()
    return (RequestNotSent,)


def _retryable(failure: Failure) -> bool:
    """
    Whether a request failed with its connection before any response: the
    only failures after which sending it again is safe (for a request that
    may be repeated).
    """
    error = failure.value
    if not isinstance(
        error, (*_request_not_sent(), RequestTransmissionFailed, ResponseNeverReceived)
    ):
        return False
    reasons = getattr(error, "reasons", []) or []
    return not any(isinstance(r.value, CancelledError) for r in reasons)


def _refusal(failure: Failure) -> Failure | None:
    """
    A request that failed because the service refused our connection (a
    TLS alert before any reply), as :class:`ServiceRefused` carrying
    twisted.web's reasons; ``None`` for any other failure.
    """
    error = failure.value
    if not isinstance(error, RequestTransmissionFailed | ResponseNeverReceived):
        return None
    reasons = list(getattr(error, "reasons", []) or [])
    for reason in reasons:
        if isinstance(reason.value, ServiceRefused):
            refused = reason.value
            return Failure(  # type: ignore[no-untyped-call]
                ServiceRefused.of(
                    refused.target,
                    refused.alert,
                    reasons=reasons,
                    address=refused.address,
                )
            )
    return None


@implementer(IAgent)
class _RetryingAgent:
    """
    Sends an idempotent request without a body again (at most ``retries``
    times) when its connection failed before any response; each retry makes
    a new connection, which prefers an instance that has not failed lately.
    """

    def __init__(self, agent: IAgent, retries: int) -> None:
        self._agent = agent
        self.retries = retries

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        repeatable = method in _IDEMPOTENT and bodyProducer is None
        state: dict[str, Any] = {"left": self.retries if repeatable else 0}

        def cancel(_: Deferred[IResponse]) -> None:
            state["cancelled"] = True
            state["current"].cancel()

        result: Deferred[IResponse] = Deferred(cancel)

        def send() -> None:
            current = self._agent.request(method, uri, headers, bodyProducer)
            state["current"] = current
            current.addCallbacks(answered, failed)

        def answered(response: IResponse) -> None:
            if not result.called:
                result.callback(response)

        def failed(failure: Failure) -> None:
            if result.called:
                return
            refused = _refusal(failure)
            if refused is not None:
                # Every instance answers by the same intentions: no retry.
                result.errback(refused)
                return
            if state["left"] > 0 and not state.get("cancelled") and _retryable(failure):
                state["left"] -= 1
                log.info(
                    "Connect HTTP: {method} {uri} lost its connection before a "
                    "response; sending it again on a new connection",
                    method=method.decode("ascii", "replace"),
                    uri=uri.decode("ascii", "replace"),
                )
                send()
                return
            result.errback(failure)

        send()
        return result


@implementer(IBodyProducer)
class _BytesProducer:
    """
    A request body already in memory, written at once (treq's default for
    bytes schedules its writes on the global reactor's cooperator).
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def _body_producer(data: Any) -> IBodyProducer:
    if isinstance(data, bytes):
        return _BytesProducer(data)
    producer: IBodyProducer = IBodyProducer(data)
    return producer


@frozen
class _BodyDeadline:
    """
    When one request's response bodies must be complete (``at``, in
    ``clock``'s seconds), and the error for a body that is not.
    """

    clock: IReactorTime
    at: float
    expired: Callable[[], Exception]


@implementer(IProtocol)
class _DeadlineBodyProtocol(Protocol):
    """
    Passes a response body on to ``inner`` unless the deadline passes first:
    then it stops the body's transport (which closes the connection: a body
    left half read cannot be reused) and ends ``inner`` with
    ``expired()``, whatever the transport does next.
    """

    def __init__(self, inner: IProtocol, deadline: _BodyDeadline) -> None:
        self._inner = inner
        self._deadline = deadline
        self._timer: IDelayedCall | None = None
        self._ended = False
        self._body_transport: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self._body_transport = transport
        # A body already complete is delivered (and the timer cancelled) by
        # the calls that follow at once; a deadline already past ends a
        # body still streaming on the next turn.
        clock = self._deadline.clock
        remaining = max(0.0, self._deadline.at - clock.seconds())
        self._timer = clock.callLater(remaining, self._expire)
        self._inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if not self._ended:
            self._inner.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        if self._ended:
            # The body after its deadline: the caller already has the timeout.
            return
        self._ended = True
        self._inner.connectionLost(reason)

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _expire(self) -> None:
        self._timer = None
        if self._ended:
            return
        # Ended first, so that a connectionLost the transport delivers while
        # stopping is not passed on as well.
        self._ended = True
        self._body_transport.stopProducing()
        self._inner.connectionLost(_failure(self._deadline.expired()))


@implementer(IResponse)
class _DeadlineResponse:
    """
    ``original``, whose body is delivered through a
    :class:`_DeadlineBodyProtocol`.
    """

    def __init__(self, original: IResponse, deadline: _BodyDeadline) -> None:
        # Any: IResponse's methods are declared without types.
        self._original: Any = original
        self._deadline = deadline

    def __getattr__(self, name: str) -> Any:
        # version, code, phrase, headers, length, request, previousResponse:
        # the original's, unchanged.  Never our own private names (asked for
        # before __init__ ran, e.g. by copy), or this would recurse.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._original, name)

    def setPreviousResponse(self, response: IResponse) -> None:
        self._original.setPreviousResponse(response)

    def deliverBody(self, protocol: IProtocol) -> None:
        self._original.deliverBody(_DeadlineBodyProtocol(protocol, self._deadline))


@implementer(IAgent)
class _BodyDeadlineAgent:
    """
    One request's view of the client's agent: every response it gives
    (the first and, through treq's redirect handling, each redirected one)
    has its body bounded by the request's ``deadline``.
    Header timeouts stay with the caller (treq's ``timeout=``, or
    :meth:`ConnectHTTPClient.request`'s default).
    """

    def __init__(self, agent: IAgent, deadline: _BodyDeadline) -> None:
        self._agent = agent
        self.deadline = deadline

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        answered = self._agent.request(method, uri, headers, bodyProducer)
        return answered.addCallback(self._bounded)

    def _bounded(self, response: IResponse) -> IResponse:
        return _DeadlineResponse(response, self.deadline)


class ConnectHTTPClient(HTTPClient):
    """
    A ``treq.HTTPClient`` whose requests carry a timeout (and the injected
    reactor) unless the caller gives one, and which can :meth:`close` what it
    holds.  Made by :func:`client`.

    A request's timeout (the client's default, or the request's own
    ``timeout=``) bounds the whole request: the response's headers and then
    its body, both counted from the start of the request.  A body still
    incomplete at that deadline is cut off (its connection closed) and
    reading it fails with :class:`ResponseBodyTimeout`.  With no timeout
    (``timeout=None`` for the client and none for the request) neither is
    bounded.
    """

    def __init__(
        self, agent: IAgent, reactor: Any, timeout: float | None, **kwargs: Any
    ) -> None:
        super().__init__(agent, data_to_body_producer=_body_producer, **kwargs)
        self._reactor = reactor
        self._timeout = timeout
        self._pool: HTTPConnectionPool | None = None
        self._closing: list[Any] = []

    def close(self) -> Deferred[None]:
        """
        Close the idle connections and let go of the resolvers' watches and
        of our certificate manager (each stops when nothing else uses it).
        """
        for part in self._closing:
            part.close()
        self._closing = []
        pool: Any = self._pool
        if pool is None:
            return succeed(None)
        closed: Deferred[None] = pool.closeCachedConnections()
        return closed

    def request(self, method: str, url: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("reactor", self._reactor)
        own = kwargs.get("timeout")
        seconds = self._timeout if own is None else own
        if not seconds:
            # No timeout at all (treq too reads 0 as none).
            return super().request(method, url, **kwargs)
        if own is None:
            why = "the client's default timeout; pass timeout= to a request for another"
        else:
            why = "the request's own timeout="

        def body_expired() -> Exception:
            return ResponseBodyTimeout(
                f"{method} {url}: the response body did not complete within "
                f"{seconds:g}s of the request ({why}); its connection was closed"
            )

        # treq's HTTPClient sends through self._agent: a client over this
        # request's own view of it gives this request (and its redirects)
        # its deadline without sharing it with any other request.
        clock: IReactorTime = kwargs["reactor"] or self._reactor
        client = HTTPClient(
            _BodyDeadlineAgent(
                self._agent,
                _BodyDeadline(clock, clock.seconds() + seconds, body_expired),
            ),
            cookiejar=self._cookiejar,
            data_to_body_producer=self._data_to_body_producer,
        )
        d: Deferred[Any] = client.request(method, url, **kwargs)
        if own is not None:
            # treq bounds the headers with the request's own timeout.
            return d
        return bounded(
            d,
            seconds,
            self._reactor,
            lambda: RequestTimeout(
                f"{method} {url} did not complete within {seconds:g}s "
                "(the client's default timeout; pass timeout= to a "
                "request for another)"
            ),
            any_failure=True,
        )


def check_settings(
    timeout: float | None, connect_timeout: float, attempt_timeout: float, retries: int
) -> float | None:
    """
    Check a client's timeouts and retries, before anything is made for it;
    gives the request timeout.

    :raises ValueError: when one is out of range.
    """
    request_timeout = None if timeout is None else positive_seconds("timeout", timeout)
    positive_seconds("connect_timeout", connect_timeout)
    positive_seconds("attempt_timeout", attempt_timeout)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer >= 0, not {retries!r}")
    return request_timeout


def make_client(
    reactor: Any,
    consul: ConsulClient,
    bundle_source: IBundleSource,
    *,
    timeout: float | None = 30.0,
    connect_timeout: float = 10.0,
    attempt_timeout: float = 3.0,
    retries: int = 1,
    max_hosts: int = MAX_HOSTS,
    pool: HTTPConnectionPool | None = None,
    owns_source: bool = False,
) -> ConnectHTTPClient:
    """
    A :class:`ConnectHTTPClient` presenting ``bundle_source``'s certificates
    and resolving through ``consul``; the settings are
    :func:`connect_native.http.client`'s.  Closing it closes the endpoint
    factory's resolvers and, with ``owns_source``, ``bundle_source`` (a
    held identity, which lets go of its service).

    :raises ValueError: when a setting is out of range.
    """
    request_timeout = check_settings(timeout, connect_timeout, attempt_timeout, retries)
    endpoints = ConnectEndpointFactory(
        reactor,
        consul,
        bundle_source,
        max_hosts=max_hosts,
        timeout=connect_timeout,
        attempt_timeout=attempt_timeout,
    )
    if pool is None:
        make_pool: Any = HTTPConnectionPool
        pool = make_pool(reactor, persistent=True)
    make_agent: Any = Agent.usingEndpointFactory
    agent: IAgent = make_agent(reactor, endpoints, pool=pool)
    http = ConnectHTTPClient(_RetryingAgent(agent, retries), reactor, request_timeout)
    http._pool = pool
    http._closing = [endpoints]
    if owns_source:
        http._closing.append(bundle_source)
    return http
