"""
connect_native: Consul service mesh ("Connect") native applications on Twisted.

Mutual TLS with certificates from Consul's CA and authorization by Consul
intentions, in the process, with no sidecar proxy.
"""

from connect_native._version import __version__
from connect_native.client import ConnectClientEndpoint, ConnectError
from connect_native.server import ConnectServerEndpoint, peer_identity

__all__ = [
    "ConnectClientEndpoint",
    "ConnectError",
    "ConnectServerEndpoint",
    "__version__",
    "peer_identity",
]
