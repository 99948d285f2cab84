"""
The development agent's HTTP API: Consul 1.8.7's endpoints for Connect-native
applications as a plain ``twisted.web`` resource
(:class:`~connect_native.devagent.http.resource.AgentResource`) over a
:class:`~connect_native.devagent.agent.DevAgent`.  One module per area of
the API handles its endpoints; ``wire`` and ``bodies`` hold what they share.

The resource speaks the wire format the real agent speaks (``REAL-BEHAVIOUR.md``
and ``tests/fixtures/real-1.8.7/``): pretty JSON with Go's escaping,
plain-text error bodies with Consul's exact messages, ``Vary:
Accept-Encoding`` everywhere, gzip for large bodies when asked, the
``X-Consul-*`` and ``X-Cache``/``Age`` headers per endpoint, 405 with
``Allow``, Go's JSON decoding rules for request bodies (keys matched
case-insensitively, unknown fields refused, Go's error texts), and blocking
queries with the real index/wait rules: up to ``wait/16`` jitter and a 5
minute default on catalog-backed endpoints, none and no timeout at all on
agent-cache ones.

Blocking reads answer later (``NOT_DONE_YET``); a client that goes away
cancels its wait.  Every handler answers: an unexpected exception becomes a
500 with a plain-text body and a logged traceback, never a dropped
connection.
"""

from connect_native.devagent.http.resource import AgentResource

__all__ = ["AgentResource"]
