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
    from connect_native.client import ConnectClientEndpoint, ConnectError
    from connect_native.server import ConnectServerEndpoint, peer_identity
    from connect_native.web import ConnectProtected, protect

_LAZY = {
    "ConnectClientEndpoint": "connect_native.client",
    "ConnectError": "connect_native.client",
    "ConnectServerEndpoint": "connect_native.server",
    "peer_identity": "connect_native.server",
    "ConnectProtected": "connect_native.web",
    "protect": "connect_native.web",
}

__all__ = [
    "ConnectClientEndpoint",
    "ConnectError",
    "ConnectProtected",
    "ConnectServerEndpoint",
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
