"""
The errors of :mod:`connect_native.consul`: every failure of the agent's
client is a :class:`ConsulError` (also importable from
:mod:`connect_native.consul.client` and :mod:`connect_native.consul.records`,
where they used to live), and the blocking watches fail with
:class:`WatchTimeoutError` and :class:`WatchStoppedError` (also importable
from :mod:`connect_native.consul.blocking`).  :mod:`connect_native.errors`
exports them all.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError

__all__ = [
    "ConsulConfigurationError",
    "ConsulEnterpriseRequired",
    "ConsulError",
    "ConsulHTTPError",
    "ConsulNotFound",
    "ConsulPermissionDenied",
    "ConsulResponseError",
    "ConsulTimeout",
    "ConsulUnavailable",
    "WatchStoppedError",
    "WatchTimeoutError",
]


class ConsulError(Exception):
    """
    Something went wrong talking to the Consul agent.  Every error the client
    raises is one of these.
    """


class ConsulResponseError(ConsulError):
    """
    The agent answered with something of the wrong shape: not JSON, a missing
    field, or a field of the wrong type.  The message names the field.
    """


class ConsulConfigurationError(ConsulError, ValueError):
    """
    The address, token or TLS settings (arguments or ``CONSUL_*`` variables)
    cannot be used; the message names the setting.
    """


class ConsulHTTPError(ConsulError):
    """
    The agent answered with an error status.  ``body`` is the agent's plain
    text message; ``path`` includes the query string (never a token).
    """

    hint = ""

    def __init__(
        self, status: int, method: str, path: str, body: str, *, agent: str = ""
    ) -> None:
        self.status = status
        self.method = method
        self.path = path
        self.body = body
        self.agent = agent
        where = f"Consul agent at {agent}" if agent else "Consul agent"
        message = f"{where} answered {status} to {method} {path}: {body or '(no body)'}"
        if self.hint:
            message = f"{message}. {self.hint}"
        super().__init__(message)


class ConsulPermissionDenied(ConsulHTTPError):  # noqa: N818
    """403: the ACL token is missing, unknown, or lacks a permission."""

    hint = (
        "The ACL token (token= or CONSUL_HTTP_TOKEN / CONSUL_HTTP_TOKEN_FILE) is "
        "missing, unknown to the agent, or lacks the permission this call needs "
        "(a leaf certificate and authorize need service:write on the service)"
    )


class ConsulNotFound(ConsulHTTPError):  # noqa: N818
    """404: no such service, check, intention or prepared query."""


class ConsulEnterpriseRequired(ConsulHTTPError):  # noqa: N818
    """
    400 for a namespace or partition: the agent is Consul OSS/CE, where
    namespaces and admin partitions do not exist.
    """

    hint = (
        "Namespaces and admin partitions need Consul Enterprise; this agent does "
        "not support them. Unset CONSUL_NAMESPACE / CONSUL_PARTITION (or "
        "namespace= / partition=) or set them to 'default'"
    )


class ConsulTimeout(ConsulError):  # noqa: N818
    """The agent did not answer within the request's timeout."""

    def __init__(
        self, method: str, path: str, seconds: float, *, agent: str = ""
    ) -> None:
        self.method = method
        self.path = path
        self.seconds = seconds
        self.agent = agent
        where = f"the Consul agent at {agent}" if agent else "the Consul agent"
        super().__init__(
            f"{method} {path}: no answer from {where} within {seconds:g}s; the "
            "request was cancelled. Check that the agent is running and not "
            "overloaded, or raise timeout="
        )


class ConsulUnavailable(ConsulError):  # noqa: N818
    """The agent could not be reached: connection refused, reset, TLS failure."""

    def __init__(self, method: str, path: str, reason: str, *, agent: str = "") -> None:
        self.method = method
        self.path = path
        self.reason = reason
        self.agent = agent
        super().__init__(
            f"{method} {path}: could not talk to the Consul agent at {agent}: "
            f"{reason.rstrip('.')}. Check that the agent is running there "
            "(CONSUL_HTTP_ADDR) "
            "and, for HTTPS, that CONSUL_CACERT / CONSUL_TLS_SERVER_NAME match "
            "its certificate"
        )


# -- the blocking watches ------------------------------------------------------


class WatchTimeoutError(Exception):
    """
    A fetch did not answer within its bound and was cancelled.
    """

    def __init__(self, name: str, index: int, bound: float) -> None:
        super().__init__(
            f"watch {name!r}: the request with index={index} did not answer "
            f"within {bound:.1f}s (wait plus wait/16 plus grace) and was "
            "cancelled; it will be retried. Check that the Consul agent is "
            "reachable and responsive."
        )
        self.name = name
        self.index = index
        self.bound = bound


class WatchStoppedError(CancelledError):
    """
    The watch was stopped before it had a value (fired into the Deferreds
    returned by :meth:`~connect_native.consul.blocking.Watch.when_first`).
    """

    def __init__(self, name: str) -> None:
        super().__init__(f"watch {name!r} was stopped before it had a value")
        self.name = name
