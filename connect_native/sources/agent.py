"""
The agent's identity source: a service's leaf certificate and the CA roots
from the local Consul agent, kept fresh by blocking queries on
``/v1/agent/connect/ca/leaf/<service>`` and ``/v1/agent/connect/ca/roots``.

It is :class:`~connect_native.certs.CertManager` under the name it has
among the sources; the class itself stays in :mod:`connect_native.certs`,
with the :class:`~connect_native.certs.Bundle` it makes.  Processes normally
share one per (agent client, service), through :mod:`connect_native.service`,
rather than making their own.
"""

from __future__ import annotations

from connect_native.certs import CertManager

__all__ = ["AgentIdentitySource"]

#: The agent's identity source: one service's leaf and the roots, kept
#: fresh by blocking queries (usually shared per process, see
#: :mod:`connect_native.service`).
AgentIdentitySource = CertManager
