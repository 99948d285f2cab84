"""
Every public exception of connect_native, in one module.

They are defined here, at the bottom of the package, so that every layer
can raise them without importing the layers above it; the modules that
raise them export them too, where they were defined before (for example
``ConnectError`` is also ``connect_native.client.ConnectError``).
The agent client's :class:`ConsulError` family and the blocking watches'
errors are defined in :mod:`connect_native.consul.errors` (so that the
``consul`` package imports nothing above it) and exported here as well.

Refusals of *peers* are log events, not exceptions in your code; the
reference of what each error means and what to do about it is
:doc:`/reference/errors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.web.error import SchemeNotSupported

from connect_native.consul.errors import (
    ConsulConfigurationError,
    ConsulEnterpriseRequired,
    ConsulError,
    ConsulHTTPError,
    ConsulNotFound,
    ConsulPermissionDenied,
    ConsulResponseError,
    ConsulTimeout,
    ConsulUnavailable,
    WatchStoppedError,
    WatchTimeoutError,
)

__all__ = [
    "AllInstancesFailed",
    "CertManagerStopped",
    "CertificateNotReady",
    "ConnectError",
    "ConnectTimeout",
    "ConsulConfigurationError",
    "ConsulEnterpriseRequired",
    "ConsulError",
    "ConsulHTTPError",
    "ConsulNotFound",
    "ConsulPermissionDenied",
    "ConsulResponseError",
    "ConsulTimeout",
    "ConsulUnavailable",
    "EndpointStringError",
    "HandshakeTimeout",
    "IdentityMismatch",
    "InvalidBundle",
    "InvalidIdentity",
    "InvalidPermission",
    "LeafPermissionDenied",
    "NoCertificate",
    "NoHealthyInstances",
    "NotAConnectConnection",
    "NotAConnectHost",
    "PeerIdentityMismatch",
    "PeerRefused",
    "RequestTimeout",
    "ResolutionFailed",
    "ResolveError",
    "ResponseBodyTimeout",
    "ServiceNotStarted",
    "ServiceRefused",
    "StaleAnswer",
    "WatchStoppedError",
    "WatchTimeoutError",
]


# --- identity ---------------------------------------------------------------


class InvalidIdentity(ValueError):  # noqa: N818 (the public name is settled)
    """
    A SPIFFE ID, trust domain, identity field or certificate is not a valid
    Consul identity.  The message says what is wrong with which input;
    ``value`` is that input.
    """

    def __init__(self, message: str, value: object = None) -> None:
        super().__init__(message)
        self.value = value


# --- certificates and TLS ---------------------------------------------------


class InvalidBundle(ValueError):  # noqa: N818 (a refusal, named for what it refuses)
    """
    The leaf certificate, key and roots do not make a usable Bundle.  The
    message names the input at fault (``leaf_cert_pem``,
    ``private_key_pem``, ``roots[i]``, ``trust_domain``) and what is wrong.
    """


class LeafPermissionDenied(Exception):  # noqa: N818 (a refusal, named for it)
    """
    The agent answered 403 to the leaf certificate request: the ACL token
    lacks ``service:write`` on the service.
    """

    def __init__(self, service: str, agent_said: str) -> None:
        self.service = service
        said = agent_said.strip() or "Permission denied"
        if "acl not found" in said.lower():
            # Consul 1.8.7's answer for a token it does not know.
            why = (
                "the agent does not know the ACL token this process sends "
                "(token=, --token-file, CONSUL_HTTP_TOKEN or "
                "CONSUL_HTTP_TOKEN_FILE): a typo, a deleted token, or one "
                "from another cluster"
            )
        else:
            why = (
                "the ACL token this process sends (token=, --token-file, "
                "CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE) lacks "
                f"service:write on {service!r}, or none is sent and the "
                "anonymous token lacks it"
            )
        super().__init__(
            f"the Consul agent refused the leaf certificate for service "
            f"{service!r} (403: {said}): {why}. Give the token a policy with "
            f'service "{service}" {{ policy = "write" }}. Until then nothing '
            "is served: a listen() waiting for this certificate fails with "
            "this error and twistd connect-native exits with status 1; the "
            "certificate manager itself keeps asking with backoff"
        )


class CertManagerStopped(CancelledError):  # noqa: N818 (like WatchStoppedError)
    """
    The :class:`~connect_native.certs.CertManager` was stopped before it
    had a certificate (fired into pending
    :meth:`~connect_native.certs.CertManager.when_ready` Deferreds).
    """

    def __init__(self, service: str) -> None:
        super().__init__(
            f"the certificate manager for service {service!r} was stopped "
            "before it had a certificate"
        )
        self.service = service


class PeerRefused(Exception):  # noqa: N818 (a refusal, named for what happened)
    """
    We refused the peer's certificate during the TLS handshake.

    A client connection refused this way is closed with this error as the
    reason given to the application protocol's ``connectionLost``.
    """

    #: Where in the chain the refused certificate was (0: the leaf), and
    #: how it reads (subject, issuer, serial); set by the verify callback.
    depth: int | None = None
    certificate: str = ""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PeerIdentityMismatch(PeerRefused):
    """
    The server's certificate is valid but names another service than the one
    we meant to reach.
    """

    def __init__(self, got: str, wanted: str) -> None:
        super().__init__(f"peer certificate mismatch: got {got}, want {wanted}")
        self.got = got
        self.wanted = wanted


# --- intentions -------------------------------------------------------------


class InvalidPermission(ValueError):  # noqa: N818 (a kind of bad input)
    """
    An L7 permission that Consul would refuse or that cannot be compiled
    (for example a ``PathRegex`` Python's :mod:`re` rejects).  The message
    names the intention and the field.
    """


# --- serving ----------------------------------------------------------------


class CertificateNotReady(DeferredTimeoutError):  # noqa: N818 (a state, like TimeoutError)
    """
    ``listen()`` gave up: the service had no certificate within
    ``ready_timeout``.  The message says what the certificate source was
    waiting for and what to check.
    """


class NotAConnectConnection(ValueError):  # noqa: N818 (names what the input is not)
    """
    :func:`~connect_native.server.peer_identity` was given something that
    is not a connection whose peer a Connect TLS handshake verified.
    """


# --- resolving and dialing --------------------------------------------------


class ResolveError(Exception):
    """
    A resolver could not find the instances of its service: the agent or the
    DNS server failed or did not answer in time, or answered something that
    cannot be used.  The message names the resolver and what went wrong.
    """


class StaleAnswer(ResolveError):  # noqa: N818 (says what it is, like ResolveError)
    """
    A :class:`~connect_native.resolve.ConsulResolver` has an answer, but the
    agent has failed to confirm it for longer than the resolver's
    ``max_staleness``: the instances may have moved or gone, so they are no
    longer dialed.
    Resolution works again as soon as the agent answers.

    :ivar failing_since: when the reads of the answer began to fail (the
        clock's seconds; the Unix time under a real reactor).
    :ivar last_answer: when the agent last answered, or ``None``.
    """

    def __init__(
        self, message: str, failing_since: float, last_answer: float | None
    ) -> None:
        super().__init__(message)
        self.failing_since = failing_since
        self.last_answer = last_answer


class ConnectError(Exception):
    """
    A Connect client could not reach the service.

    :ivar target: what was being dialed (the resolver's description).
    :ivar attempts: what each instance tried did, in order
        (:class:`~connect_native.client.Attempt` records).
    """

    def __init__(self, message: str, target: str, attempts: Sequence[Any] = ()):
        super().__init__(message)
        self.target = target
        self.attempts = tuple(attempts)


class NoCertificate(ConnectError):  # noqa: N818 (the kinds are named in the API)
    """
    We have no usable certificate of our own to present (not issued yet,
    expired, or the agent refused it).
    """


class ResolutionFailed(ConnectError):  # noqa: N818 (the kinds are named in the API)
    """
    The resolver could not say where the service's instances are.
    """


class NoHealthyInstances(ConnectError):  # noqa: N818 (the kinds are named in the API)
    """
    The resolver found no healthy instance of the service.
    """


class IdentityMismatch(ConnectError):  # noqa: N818 (the kinds are named in the API)
    """
    The server presented a valid certificate of another service than the
    one expected: every instance tried did (or the last one before the
    deadline).  ``got`` and ``wanted`` are the SPIFFE IDs.
    """

    def __init__(
        self,
        message: str,
        target: str,
        attempts: Sequence[Any],
        got: str,
        wanted: str,
    ) -> None:
        super().__init__(message, target, attempts)
        self.got = got
        self.wanted = wanted


class ConnectTimeout(ConnectError):  # noqa: N818 (the kinds are named in the API)
    """
    The deadline passed before a verified connection was made.
    """


class HandshakeTimeout(ConnectTimeout):
    """
    A server accepted the TCP connection but did not complete the TLS
    handshake in time.
    """


class AllInstancesFailed(ConnectError):  # noqa: N818 (the kinds are named in the API)
    """
    Every instance was tried, and each failed; :attr:`attempts` says how.
    """


class ServiceRefused(ConnectError):  # noqa: N818 (the kinds are named in the API)
    """
    The service was reached and refused us: its server ended the TLS
    handshake, or the connection right after it, with a TLS alert and no
    reply.  A Connect server does this when its intentions (or its allowed
    IDs) deny our service, or when it does not accept our certificate; its
    log names which, and our address.  It is not the service's backend being
    down: a terminator whose application is unreachable closes the
    connection without an alert (:class:`AllInstancesFailed`, or
    twisted.web's ``ResponseNeverReceived`` for a request).

    A server that decides after the handshake (``authorize=agent`` for a
    caller it has not decided yet) can only close the connection, and is
    seen as a closed connection.

    :ivar alert: the alert as OpenSSL names it: ``"internal error"`` from a
        connect_native server (pyOpenSSL cannot choose another), ``"bad
        certificate"`` from Consul's built-in proxy and Go library.
    :ivar reasons: for an HTTP request, the failures twisted.web reported
        (as ``ResponseNeverReceived.reasons``); empty otherwise.
    :ivar address: the refusing instance's ``host:port``, when known.
    """

    def __init__(
        self,
        message: str,
        target: str,
        attempts: Sequence[Any] = (),
        *,
        alert: str,
        reasons: Sequence[Any] = (),
        address: str = "",
    ) -> None:
        super().__init__(message, target, attempts)
        self.alert = alert
        self.reasons = list(reasons)
        self.address = address

    @classmethod
    def of(
        cls,
        target: str,
        alert: str,
        attempts: Sequence[Any] = (),
        reasons: Sequence[Any] = (),
        detail: str = "",
        address: str = "",
    ) -> ServiceRefused:
        """
        The refusal by ``target`` with ``alert``, saying what it means;
        ``detail`` (what each attempt did) is added in parentheses.
        """
        return cls(
            f"{target}{f' at {address}' if address else ''} refused this "
            f"connection with the TLS alert '{alert}': "
            f"its intentions deny our service, or it does not accept our "
            f"certificate (its log says which); the service was reached"
            + (f" ({detail})" if detail else ""),
            target,
            attempts,
            alert=alert,
            reasons=reasons,
            address=address,
        )


# --- a service --------------------------------------------------------------


class ServiceNotStarted(RuntimeError):  # noqa: N818 (a state, like CertificateNotReady)
    """
    A :class:`~connect_native.service.ConnectService` was asked for
    certificates before it started.
    """


# --- HTTP -------------------------------------------------------------------


class NotAConnectHost(SchemeNotSupported, ValueError):  # noqa: N818 (says what it is not)
    """
    The URL is not one a Connect client can reach: another scheme than
    ``https``, or a host that is not a Consul service or prepared query
    name.  Use a plain HTTP client for it.
    """


class RequestTimeout(DeferredTimeoutError):  # noqa: N818 (like ConnectTimeout)
    """
    A request did not complete within its timeout: the client's default, or
    (for the body) the request's own ``timeout=``.
    """


class ResponseBodyTimeout(RequestTimeout):
    """
    The response's headers came in time, but its body did not complete
    before the request's deadline (its timeout, counted from the start of
    the request); the connection it was read from was closed.
    """


# --- endpoint strings -------------------------------------------------------


class EndpointStringError(ValueError):
    """
    A ``connect:`` description that cannot be used: the message names the
    option (or the missing part) and what it accepts.
    """
