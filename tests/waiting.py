"""
Bounded waits on a real Consul agent, for the tests.

The agent learns of intention writes in its authorize cache from a
background blocking query: usually at once, but not synchronously with the
write.  A test that changes intentions waits for the agent to say so before
it checks what the library decides.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater

from connect_native.consul.client import ConsulClient


async def authorize_until(
    client: ConsulClient,
    target: str,
    uri: str,
    expected: bool,
    within: float = 10.0,
    serial: str = "0a",
) -> Any:
    """
    The agent's authorize answer, asked again (every 50 ms, for at most
    ``within`` seconds) until it is ``expected``; the last answer otherwise.
    """
    deadline = reactor.seconds() + within  # type: ignore[attr-defined]
    while True:
        answer = await client.authorize(target, uri, serial)
        if answer.authorized is expected or reactor.seconds() > deadline:  # type: ignore[attr-defined]
            return answer
        await deferLater(reactor, 0.05, lambda: None)
