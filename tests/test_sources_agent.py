"""
The agent's identity source, :mod:`connect_native.sources.agent`: the
certificate manager under its name among the sources.
"""

from __future__ import annotations

from connect_native.certs import CertManager, IIdentitySource


def test_the_agent_source_is_the_certificate_manager() -> None:
    from connect_native.sources import AgentIdentitySource
    from connect_native.sources.agent import AgentIdentitySource as from_module

    assert AgentIdentitySource is from_module is CertManager
    assert IIdentitySource.implementedBy(AgentIdentitySource)
