"""
connect_native: Consul service mesh ("Connect") native applications on Twisted.

Mutual TLS with certificates from Consul's CA and authorization by Consul
intentions, in the process, with no sidecar proxy.

The public names below are imported lazily: Twisted imports this package
whenever it discovers plugins (every ``twistd`` run, every
``serverFromString``), and that should not load TLS, treq and the agent
client.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from connect_native._version import __version__

if TYPE_CHECKING:
    from connect_native.authorize import AgentAuthorizer, IAuthorizer
    from connect_native.authorize.intentions import IntentionAuthorizer
    from connect_native.client import ConnectClientEndpoint
    from connect_native.consul.client import ConsulClient
    from connect_native.errors import (
        AllInstancesFailed,
        CertificateNotReady,
        CertManagerStopped,
        ConnectError,
        ConnectTimeout,
        ConsulConfigurationError,
        ConsulEnterpriseRequired,
        ConsulError,
        ConsulHTTPError,
        ConsulNotFound,
        ConsulPermissionDenied,
        ConsulResponseError,
        ConsulTimeout,
        ConsulUnavailable,
        EndpointStringError,
        HandshakeTimeout,
        IdentityMismatch,
        InvalidBundle,
        InvalidIdentity,
        InvalidPermission,
        LeafPermissionDenied,
        NoCertificate,
        NoHealthyInstances,
        NotAConnectConnection,
        NotAConnectHost,
        PeerIdentityMismatch,
        PeerRefused,
        RequestTimeout,
        ResolutionFailed,
        ResolveError,
        ResponseBodyTimeout,
        ServiceNotStarted,
        StaleAnswer,
        WatchStoppedError,
        WatchTimeoutError,
    )
    from connect_native.identity import ServiceIdentity
    from connect_native.server import ConnectServerEndpoint, peer_identity
    from connect_native.service import ConnectService
    from connect_native.web import ConnectProtected, protect


_LAZY = {
    "ConnectService": "connect_native.service",
    "ConnectServerEndpoint": "connect_native.server",
    "peer_identity": "connect_native.server",
    "ConnectClientEndpoint": "connect_native.client",
    "ConnectProtected": "connect_native.web",
    "protect": "connect_native.web",
    "ServiceIdentity": "connect_native.identity",
    "ConsulClient": "connect_native.consul.client",
    "IAuthorizer": "connect_native.authorize",
    "AgentAuthorizer": "connect_native.authorize",
    "IntentionAuthorizer": "connect_native.authorize.intentions",
    "AllInstancesFailed": "connect_native.errors",
    "CertManagerStopped": "connect_native.errors",
    "CertificateNotReady": "connect_native.errors",
    "ConnectError": "connect_native.errors",
    "ConnectTimeout": "connect_native.errors",
    "ConsulConfigurationError": "connect_native.errors",
    "ConsulEnterpriseRequired": "connect_native.errors",
    "ConsulError": "connect_native.errors",
    "ConsulHTTPError": "connect_native.errors",
    "ConsulNotFound": "connect_native.errors",
    "ConsulPermissionDenied": "connect_native.errors",
    "ConsulResponseError": "connect_native.errors",
    "ConsulTimeout": "connect_native.errors",
    "ConsulUnavailable": "connect_native.errors",
    "EndpointStringError": "connect_native.errors",
    "HandshakeTimeout": "connect_native.errors",
    "IdentityMismatch": "connect_native.errors",
    "InvalidBundle": "connect_native.errors",
    "InvalidIdentity": "connect_native.errors",
    "InvalidPermission": "connect_native.errors",
    "LeafPermissionDenied": "connect_native.errors",
    "NoCertificate": "connect_native.errors",
    "NoHealthyInstances": "connect_native.errors",
    "NotAConnectConnection": "connect_native.errors",
    "NotAConnectHost": "connect_native.errors",
    "PeerIdentityMismatch": "connect_native.errors",
    "PeerRefused": "connect_native.errors",
    "RequestTimeout": "connect_native.errors",
    "ResolutionFailed": "connect_native.errors",
    "ResolveError": "connect_native.errors",
    "ResponseBodyTimeout": "connect_native.errors",
    "ServiceNotStarted": "connect_native.errors",
    "StaleAnswer": "connect_native.errors",
    "WatchStoppedError": "connect_native.errors",
    "WatchTimeoutError": "connect_native.errors",
}

__all__ = [
    "AgentAuthorizer",
    "AllInstancesFailed",
    "CertManagerStopped",
    "CertificateNotReady",
    "ConnectClientEndpoint",
    "ConnectError",
    "ConnectProtected",
    "ConnectServerEndpoint",
    "ConnectService",
    "ConnectTimeout",
    "ConsulClient",
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
    "IAuthorizer",
    "IdentityMismatch",
    "IntentionAuthorizer",
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
    "ServiceIdentity",
    "ServiceNotStarted",
    "StaleAnswer",
    "WatchStoppedError",
    "WatchTimeoutError",
    "__version__",
    "peer_identity",
    "protect",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'connect_native' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
