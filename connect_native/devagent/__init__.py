"""
A Consul-compatible agent for development and tests.

:class:`DevAgent` holds the state of one Consul 1.8.7 ``-dev`` agent, with ACLs
off or on (catalog, checks, intentions, prepared queries, CA, and an opt-in
1.9+ layer) and serves its HTTP API with
:meth:`DevAgent.resource`: in memory behind ``treq.testing.StubTreq``, or over
TCP with ``python -m connect_native.devagent --port 8500``.
"""

# The HTTP API registers itself as DevAgent's IResource adapter on import
# (DevAgent.resource()); the agent below it never imports it.
from connect_native.devagent import http as _http  # noqa: F401
from connect_native.devagent.agent import DevAgent

__all__ = ["DevAgent"]
