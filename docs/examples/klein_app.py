"""
A Connect-native Klein app: the service ``web``.

* It listens over Connect, described by an endpoint string: mutual TLS with
  ``web``'s certificate from the Consul agent, and each connection
  authorized by ``web``'s intentions, cached in the process
  (``authorize=intentions``).
* Each HTTP request is authorized again by the same intentions, with their
  L7 permissions where Consul has them: one line, :func:`protect`.
* ``/hello`` greets the caller by the identity its certificate proves;
  ``/time`` asks another Connect service, ``clock``, with the treq client.

Run it next to an agent (``python -m connect_native.devagent`` or
``consul agent -dev``)::

    CONSUL_HTTP_ADDR=127.0.0.1:8500 python docs/examples/klein_app.py
"""

from __future__ import annotations

import sys
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import react
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.iweb import IRequest
from twisted.web.server import Site

import connect_native.http
from connect_native.web import peer_identity, protect

DESCRIPTION = (
    "connect:web:port=8443:interface=127.0.0.1:authorize=intentions:register=yes"
)


class Web:
    """The application: plain Klein, nothing Connect-specific but the caller."""

    app = Klein()

    def __init__(self, http: Any, upstream: str = "clock") -> None:
        self.http = http
        self.upstream = upstream

    @app.route("/hello")
    def hello(self, request: IRequest) -> str:
        caller = peer_identity(request)
        return f"hello, {caller.service}\n"

    @app.route("/time")
    async def time(self, request: IRequest) -> str:
        response = await self.http.get(f"https://{self.upstream}.service.consul/now")
        if response.code != 200:
            request.setResponseCode(502)
            return f"{self.upstream} answered {response.code}\n"
        now: str = await response.text()
        return f"{self.upstream} says {now}"


async def serve(
    reactor: Any, description: str = DESCRIPTION, upstream: str = "clock"
) -> tuple[IListeningPort, Any]:
    """
    Serve ``web`` as ``description`` says; fires with the port and the treq
    client once ``web`` has its certificate and listens.
    """
    endpoint = serverFromString(reactor, description)
    # Our own identity when we call others: the same agent and certificate.
    http = connect_native.http.client("web", reactor=reactor, consul=endpoint.consul)
    web = Web(http, upstream)
    # The one line: every request decided by web's intentions, per request.
    resource = protect(web.app.resource(), endpoint.authorizer)
    port: IListeningPort = await endpoint.listen(Site(resource))
    return port, http


async def main(reactor: Any) -> None:
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    await serve(reactor)
    await Deferred()  # serve until interrupted


if __name__ == "__main__":
    react(lambda reactor: ensureDeferred(main(reactor)))
