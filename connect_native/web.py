"""
twisted.web and Klein over Connect: who the caller of a request is
(:func:`peer_identity`, :func:`request_peer`), and per-request (L7)
authorization of any resource tree by the intentions of our service
(:func:`protect`, :class:`ConnectProtected`).

A Klein app is protected with one line::

    resource = protect(app.resource(), authorizer)

where ``authorizer`` decides HTTP requests (it has ``decide_request``, as
:class:`~connect_native.authorize.intentions.IntentionAuthorizer` does).
Every request is decided once, before the wrapped resource (or any resource
below it) sees it.  A denied request gets ``403 Forbidden`` with a short
plain-text body, and a warning is logged with the :mod:`twisted.logger`
fields ``target``, ``peer``, ``address``, ``method``, ``path``, ``allowed``,
``decision``, ``reason`` (the intention that decided, or why none did) and
``source`` (what decided).
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol, runtime_checkable

from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from zope.interface import implementer

from connect_native import _logging
from connect_native.authorize import Decision, IDecidesEachRequest, Peer
from connect_native.authorize.rules import HeadersLike
from connect_native.identity import ServiceIdentity
from connect_native.server import NotAConnectConnection
from connect_native.server import peer_identity as _connection_peer_identity
from connect_native.tls import verified_peer

__all__ = [
    "FORBIDDEN_BODY",
    "ConnectProtected",
    "NotAConnectConnection",
    "RequestAuthorizer",
    "peer_identity",
    "protect",
    "request_peer",
    "routed_path",
]

log = Logger(observer=_logging.observer)

#: The body of every 403: short, and naming no intention (the caller learns
#: nothing about our rules; the log has the reason).
FORBIDDEN_BODY = b"Forbidden: the service's intentions do not allow this request\n"

#: Where a decision came from when the request itself was unusable.
WEB_SOURCE = "web"


@runtime_checkable
class RequestAuthorizer(Protocol):
    """
    What :class:`ConnectProtected` needs: an L7 decision per HTTP request that
    never waits (and should never raise; an exception denies anyway).
    :class:`~connect_native.authorize.intentions.IntentionAuthorizer`
    provides it.
    """

    def decide_request(
        self,
        peer: Peer | ServiceIdentity,
        method: str | bytes,
        path: str | bytes,
        headers: HeadersLike,
    ) -> Decision: ...


def peer_identity(request: IRequest) -> ServiceIdentity:
    """
    The service identity of the caller of a twisted.web or Klein request
    served over a Connect connection, as its TLS handshake verified it.

    :raises NotAConnectConnection: when the request did not come over a
        verified Connect connection (a plain listener, or a connection that
        is already gone).
    """
    return _connection_peer_identity(request)


def request_peer(request: IRequest) -> Peer:
    """
    The verified peer of a request's connection, with its certificate's
    serial (what an authorizer that asks the agent passes on).

    :raises NotAConnectConnection: as :func:`peer_identity`.
    """
    channel = getattr(request, "channel", None)
    for candidate in (getattr(channel, "transport", None), request):
        if candidate is None:
            continue
        verified = verified_peer(candidate)
        if verified is not None:
            return Peer(verified.identity, verified.serial)
    # The server's lookup raises with the explanation users see everywhere.
    _connection_peer_identity(request)
    raise NotAConnectConnection(  # pragma: no cover (the lookups agree)
        "the request's connection has no verified Connect peer"
    )


def _text(segment: bytes | str) -> str:
    if isinstance(segment, str):
        return segment
    return segment.decode("utf-8", "surrogateescape")


def routed_path(request: IRequest) -> str:
    """
    The path the permissions match: the one the resource tree routes by.

    twisted.web splits the request path on ``/`` and percent-decodes each
    segment (``Request.process``), and resources and Klein's routes see
    those decoded segments (``prepath`` + ``postpath``).  Matching the raw
    path instead would let ``/adm%69n`` or ``/admin%2Fkeys`` past a rule for
    ``/admin`` while the application routes it to ``/admin``.  A ``?`` or
    ``#`` decoded inside a segment is escaped again, so it cannot end the
    path early; the query is kept (the ``:path`` header rules see it) and
    ignored by the path rules, as in Envoy.
    """
    prepath = getattr(request, "prepath", None) or []
    postpath = getattr(request, "postpath", None) or []
    path = "/" + "/".join(_text(segment) for segment in (*prepath, *postpath))
    path = path.replace("?", "%3F").replace("#", "%23")
    uri = getattr(request, "uri", None)
    if isinstance(uri, bytes) and b"?" in uri:
        path += "?" + _text(uri.split(b"?", 1)[1])
    return path


def _address(request: IRequest) -> str:
    untyped: Any = request
    try:
        return str(untyped.getClientAddress())
    except Exception:
        return "?"


def _forbid(request: IRequest) -> bytes:
    # IRequest's methods carry no annotations.
    untyped: Any = request
    untyped.setResponseCode(403)
    untyped.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return FORBIDDEN_BODY


@implementer(IResource)
class _Forbidden:
    """What a denied request traverses to: a leaf that answers 403."""

    isLeaf = True

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        return self  # pragma: no cover (a leaf: traversal stops here)

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError("a denial has no children")

    def render(self, request: IRequest) -> bytes:
        return _forbid(request)


#: Which protectors already decided each request (and what), so that a
#: request meets each protector's check exactly once however it is routed.
_decided: weakref.WeakKeyDictionary[Any, dict[int, Decision]] = (
    weakref.WeakKeyDictionary()
)


@implementer(IResource, IDecidesEachRequest)
class ConnectProtected:
    """
    ``resource``, with every request decided by ``authorizer`` before
    ``resource`` or any resource below it sees it.

    The decision is taken at the top: in :meth:`getChildWithDefault` when
    twisted.web traverses into the wrapped tree, or in :meth:`render` when
    the wrapped resource is a leaf (as ``Klein().resource()`` is) or is the
    target itself.  A denied request is answered ``403`` by a leaf in place
    of the wrapped tree, so no child traversal can get past the check.

    :param resource: any ``IResource``: a ``Resource`` tree, a
        ``Klein().resource()``, a ``File``...
    :param authorizer: has ``decide_request(peer, method, path, headers)``,
        e.g. :class:`~connect_native.authorize.intentions.IntentionAuthorizer`.
        :class:`~connect_native.authorize.AgentAuthorizer` has not: Consul's
        authorize API decides connections, not requests.
    :param service: the service being protected, for the logs; by default
        the authorizer's ``service``.
    :param log_allowed: log allowed requests at info (by default at debug;
        denied ones are logged at warn).

    It provides :class:`~connect_native.authorize.IDecidesEachRequest`: a
    Connect server endpoint serving a ``Site`` with this as its root accepts
    callers whose intention has L7 permissions (each request is decided
    here); a site without it refuses them at the connection.

    :raises TypeError: when ``resource`` is not an ``IResource`` or
        ``authorizer`` cannot decide requests.
    """

    def __init__(
        self,
        resource: IResource,
        authorizer: RequestAuthorizer,
        *,
        service: str | None = None,
        log_allowed: bool = False,
    ) -> None:
        if not IResource.providedBy(resource):
            raise TypeError(
                f"ConnectProtected protects a twisted.web IResource (a Resource, "
                f"Klein().resource(), ...), not {type(resource).__name__}"
            )
        if not callable(getattr(authorizer, "decide_request", None)):
            raise TypeError(
                f"{type(authorizer).__name__} cannot decide HTTP requests: "
                "per-request authorization needs an authorizer with "
                "decide_request(peer, method, path, headers), such as "
                "connect_native.authorize.intentions.IntentionAuthorizer "
                "(authorize=intentions in a connect: endpoint string). "
                "AgentAuthorizer asks the agent once per connection, and the "
                "agent's authorize API has no per-request answer"
            )
        if service is None:
            named = getattr(authorizer, "service", None)
            service = named if isinstance(named, str) else ""
        self.resource = resource
        self.authorizer = authorizer
        self.service = service
        self.log_allowed = log_allowed

    def __repr__(self) -> str:
        return f"<ConnectProtected {self.service!r} {self.resource!r}>"

    @property
    def isLeaf(self) -> bool:
        # A leaf's request arrives at render() with its postpath intact.
        return bool(getattr(self.resource, "isLeaf", False))

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        if not self.decide(request).allowed:
            return _Forbidden()
        wrapped: Any = self.resource
        child: IResource = wrapped.getChildWithDefault(name, request)
        return child

    def putChild(self, path: bytes, child: IResource) -> None:
        wrapped: Any = self.resource
        wrapped.putChild(path, child)

    def render(self, request: IRequest) -> Any:
        if not self.decide(request).allowed:
            return _forbid(request)
        wrapped: Any = self.resource
        return wrapped.render(request)

    def decide(self, request: IRequest) -> Decision:
        """
        This protector's decision for ``request``: taken (and logged) the
        first time, remembered after.  Never raises: anything unexpected
        denies.
        """
        try:
            seen = _decided.setdefault(request, {})
        except TypeError:  # not weak-referenceable: decide every time
            seen = {}
        known = seen.get(id(self))
        if known is not None:
            return known
        decision, peer, method, path = self._decide(request)
        seen[id(self)] = decision
        self._log(request, decision, peer, method, path)
        return decision

    def _decide(self, request: IRequest) -> tuple[Decision, str, str, str]:
        method = _text(getattr(request, "method", b"") or b"")
        try:
            path = routed_path(request)
        except Exception as e:
            return (
                Decision.deny(f"the request's path is unusable: {e}", WEB_SOURCE),
                "?",
                method,
                "?",
            )
        try:
            peer = request_peer(request)
        except NotAConnectConnection:
            return (
                Decision.deny(
                    "the request did not come over a verified Connect "
                    "connection, so there is no caller to decide for",
                    WEB_SOURCE,
                ),
                "(unverified peer)",
                method,
                path,
            )
        try:
            decision = self.authorizer.decide_request(
                peer, method, path, request.requestHeaders
            )
            if not isinstance(decision, Decision):
                raise TypeError(
                    f"decide_request returned {type(decision).__name__}, not a Decision"
                )
        except Exception as e:
            log.failure(
                "Connect {target}: deciding {method} {path} from {peer} failed",
                target=self.service,
                method=method,
                path=path,
                peer=peer.uri,
            )
            decision = Decision.deny(f"deciding the request failed: {e}", WEB_SOURCE)
        return decision, peer.uri, method, path

    def _log(
        self, request: IRequest, decision: Decision, peer: str, method: str, path: str
    ) -> None:
        if decision.allowed:
            emit = log.info if self.log_allowed else log.debug
        else:
            emit = log.warn
        emit(
            "Connect {target}: {decision} {method} {path} from {peer} at "
            "{address} ({reason}; decided by {source})",
            target=self.service,
            peer=peer,
            address=_address(request),
            method=method,
            # Without the query: it may carry secrets, and the path rules
            # never look at it.
            path=path.split("?", 1)[0],
            allowed=decision.allowed,
            decision="allowed" if decision.allowed else "denied",
            reason=decision.reason,
            source=decision.source,
        )


def protect(
    resource: IResource,
    authorizer: RequestAuthorizer,
    *,
    service: str | None = None,
) -> ConnectProtected:
    """
    ``resource`` with per-request authorization: see
    :class:`ConnectProtected`.  For Klein::

        resource = protect(app.resource(), authorizer)
    """
    return ConnectProtected(resource, authorizer, service=service)
