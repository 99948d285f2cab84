"""
The tutorial's second program, the service ``caller``: one HTTPS request to
a Connect service with the treq client, presenting ``caller``'s certificate.

    python caller.py https://greeter.service.consul/
"""

import sys

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

from connect_native import ConnectService


async def main(reactor, url):
    caller = ConnectService(reactor, "caller")  # we are "caller"
    http = caller.http_client()
    try:
        response = await http.get(url)
        print(response.code, await response.text(), end="")
    except Exception as e:
        print(f"no answer from {url}: {e}")
        raise SystemExit(1) from None
    finally:
        await http.close()


react(lambda reactor: ensureDeferred(main(reactor, sys.argv[1])))
