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
    from connect_native.authorize_intentions import IntentionAuthorizer
    from connect_native.certs import InvalidBundle, LeafPermissionDenied
    from connect_native.client import (
        AllInstancesFailed,
        ConnectClientEndpoint,
        ConnectError,
        ConnectTimeout,
        IdentityMismatch,
        NoCertificate,
        NoHealthyInstances,
        ResolutionFailed,
    )
    from connect_native.consul.client import ConsulClient
    from connect_native.consul.errors import ConsulError
    from connect_native.endpoints import EndpointStringError
    from connect_native.identity import InvalidIdentity, ServiceIdentity
    from connect_native.server import (
        CertificateNotReady,
        ConnectServerEndpoint,
        NotAConnectConnection,
        peer_identity,
    )
    from connect_native.service import ConnectService, ServiceNotStarted
    from connect_native.tls import PeerRefused
    from connect_native.web import ConnectProtected, protect

_LAZY = {
    "ConnectService": "connect_native.service",
    "ServiceNotStarted": "connect_native.service",
    "ConnectServerEndpoint": "connect_native.server",
    "CertificateNotReady": "connect_native.server",
    "NotAConnectConnection": "connect_native.server",
    "peer_identity": "connect_native.server",
    "ConnectClientEndpoint": "connect_native.client",
    "ConnectError": "connect_native.client",
    "NoCertificate": "connect_native.client",
    "ResolutionFailed": "connect_native.client",
    "NoHealthyInstances": "connect_native.client",
    "IdentityMismatch": "connect_native.client",
    "ConnectTimeout": "connect_native.client",
    "AllInstancesFailed": "connect_native.client",
    "ConnectProtected": "connect_native.web",
    "protect": "connect_native.web",
    "ServiceIdentity": "connect_native.identity",
    "InvalidIdentity": "connect_native.identity",
    "ConsulClient": "connect_native.consul.client",
    "ConsulError": "connect_native.consul.errors",
    "IAuthorizer": "connect_native.authorize",
    "AgentAuthorizer": "connect_native.authorize",
    "IntentionAuthorizer": "connect_native.authorize_intentions",
    "PeerRefused": "connect_native.tls",
    "InvalidBundle": "connect_native.certs",
    "LeafPermissionDenied": "connect_native.certs",
    "EndpointStringError": "connect_native.endpoints",
}

__all__ = [
    "AgentAuthorizer",
    "AllInstancesFailed",
    "CertificateNotReady",
    "ConnectClientEndpoint",
    "ConnectError",
    "ConnectProtected",
    "ConnectServerEndpoint",
    "ConnectService",
    "ConnectTimeout",
    "ConsulClient",
    "ConsulError",
    "EndpointStringError",
    "IAuthorizer",
    "IdentityMismatch",
    "IntentionAuthorizer",
    "InvalidBundle",
    "InvalidIdentity",
    "LeafPermissionDenied",
    "NoCertificate",
    "NoHealthyInstances",
    "NotAConnectConnection",
    "PeerRefused",
    "ResolutionFailed",
    "ServiceIdentity",
    "ServiceNotStarted",
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
