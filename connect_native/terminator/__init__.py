"""
``twistd connect-native``: a Connect TLS terminator in front of a plaintext
local application, and plaintext local listeners (upstreams) that dial other
Connect services as our service.

- ``--listen`` accepts mutual-TLS connections for ``--service`` with
  :class:`~connect_native.server.ConnectServerEndpoint` (certificates from
  the agent, the peer authorized before any byte moves) and forwards each to
  ``--to``;
- each ``--upstream NAME=ENDPOINT`` listens in plaintext (on 127.0.0.1 unless
  told otherwise) and forwards each connection to Connect service ``NAME``
  with :class:`~connect_native.client.ConnectClientEndpoint`;
- the instance is registered with the agent (``--no-register`` not to);
- ``--dev`` runs the development agent in the process, and ``--demo``
  also runs a backend and a Connect client that makes one round trip
  through the terminator, then exits (0 when it went through).

:class:`Options` and :func:`makeService` are what the ``connect-native``
``ServiceMaker`` names.  The package's modules: ``options`` (the options and
their checks), ``service`` (:class:`Terminator`, the service tree),
:mod:`~connect_native.terminator.forward` (the byte forwarding), ``workers``
(``--workers``, SO_REUSEPORT), ``demo`` (``--demo``), and ``_tls``, the
terminator's own TLS server transport, private: it is injected into the
public endpoint as its ``tls_protocol=``.
"""

from __future__ import annotations

from connect_native.terminator.demo import DEMO_CLIENT_SERVICE, DEMO_SERVICE
from connect_native.terminator.options import (
    TLS_TRANSPORTS,
    Options,
    Settings,
    Upstream,
    parse_upstream,
)
from connect_native.terminator.service import Terminator, makeService
from connect_native.terminator.workers import ReusePortEndpoint, worker_arguments

__all__ = [
    "DEMO_CLIENT_SERVICE",
    "DEMO_SERVICE",
    "TLS_TRANSPORTS",
    "Options",
    "ReusePortEndpoint",
    "Settings",
    "Terminator",
    "Upstream",
    "makeService",
    "parse_upstream",
    "worker_arguments",
]
