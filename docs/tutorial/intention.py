"""
Set the intention from one service to another, replacing any intention
between the two, with connect_native's Consul client::

    python intention.py caller greeter allow
"""

import sys

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

from connect_native.consul.client import ConsulClient


async def main(reactor, source, destination, action):
    consul = ConsulClient.from_environment(reactor)  # CONSUL_HTTP_ADDR, ...
    try:
        for intention in (await consul.intentions_list()).value:
            if (intention.source_name, intention.destination_name) == (
                source,
                destination,
            ):
                await consul.delete_intention(intention.id)
        intention_id = await consul.create_intention(source, destination, action)
        print(f"{source} -> {destination}: {action} (intention {intention_id})")
    finally:
        await consul.close()


react(lambda reactor, *args: ensureDeferred(main(reactor, *args)), sys.argv[1:4])
