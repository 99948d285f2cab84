"""
The two agents the shared client suite (``tests/test_agent_suite.py``) runs
against, behind one face: the development agent served over TCP on the real
reactor, and a real Consul 1.8.7 ``consul agent -dev``.

Both are reached through identical client code: a
:class:`~connect_native.consul.client.ConsulClient` for what the library
does, and :class:`RawHTTP` (treq on the real reactor) for what the client
never sends (bad input) and for the status, headers and bytes of an answer.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from typing import Any

import attrs
import treq
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from connect_native.consul.client import ConsulClient
from connect_native.devagent import DevAgent

# Headers whose presence says nothing about the agent: framing and the date.
FRAMING_HEADERS = frozenset({"date", "content-length", "transfer-encoding"})


@attrs.frozen
class RawAnswer:
    """One HTTP answer: status, headers (lower-case names), body bytes."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def header_names(self) -> frozenset[str]:
        """The header names that carry meaning (no date or body framing)."""
        return frozenset(self.headers) - FRAMING_HEADERS


class RawHTTP:
    """
    Plain HTTP requests to one agent, with nothing added but what is given.

    Twisted's ``Agent`` itself, not ``treq.request``: treq asks for gzip and
    decodes it, which would hide the agent's ``Content-Encoding``.
    """

    def __init__(self, address: str) -> None:
        self.base = f"http://{address}"
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self._agent = Agent(reactor, pool=self.pool)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 15.0,
    ) -> RawAnswer:
        if isinstance(body, str):
            body = body.encode("utf-8")
        d = self._agent.request(
            method.encode("ascii"),
            (self.base + path).encode("ascii"),
            Headers({k: [v] for k, v in (headers or {}).items()}),
            None if body is None else FileBodyProducer(io.BytesIO(body)),
        )
        d.addCallback(
            lambda response: treq.content(response).addCallback(
                lambda content: (response, content)
            )
        )
        call = reactor.callLater(timeout, d.cancel)
        try:
            response, content = await d
        finally:
            if call.active():
                call.cancel()
        found = {
            name.decode("latin-1").lower(): values[0].decode("latin-1")
            for name, values in response.headers.getAllRawHeaders()
        }
        return RawAnswer(response.code, found, content)

    async def get(self, path: str) -> RawAnswer:
        return await self.request("GET", path)

    async def put(self, path: str, body: object | None = None) -> RawAnswer:
        return await self.request("PUT", path, _body(body))

    async def post(self, path: str, body: object | None = None) -> RawAnswer:
        return await self.request("POST", path, _body(body))

    async def close(self) -> None:
        await self.pool.closeCachedConnections()


def _body(body: object | None) -> bytes | str | None:
    if body is None or isinstance(body, bytes | str):
        return body
    return json.dumps(body)


@attrs.define
class AgentUnderTest:
    """
    One agent the suite runs against: ``kind`` is ``"dev"`` or ``"real"``;
    ``dev`` is the :class:`DevAgent` itself for the development agent.
    """

    kind: str
    address: str
    client: ConsulClient
    http: RawHTTP
    dev: DevAgent | None = None
    _port: Any = None
    master_token: str | None = None

    async def close(self) -> None:
        await self.client.close()
        await self.http.close()
        if self._port is not None:
            await self._port.stopListening()


def serve_dev_agent(
    *,
    acl_default_policy: str | None = None,
    master_token: str | None = None,
    version: str = "1.8.7",
) -> AgentUnderTest:
    """
    A new development agent on 127.0.0.1 (a free port), on the real reactor;
    with ACLs on when ``acl_default_policy`` is given, and the 1.9+ API
    layer for a later ``version``.
    """
    dev = DevAgent(
        reactor,
        acl_default_policy=acl_default_policy,
        master_token=master_token,
        version=version,
    )
    site = Site(dev.resource())
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    address = f"127.0.0.1:{port.getHost().port}"
    return AgentUnderTest(
        kind="dev",
        address=address,
        client=ConsulClient(reactor, address=address, timeout=15),
        http=RawHTTP(address),
        dev=dev,
        port=port,
        master_token=master_token,
    )


def reach_real_agent(
    http_address: str, *, master_token: str | None = None
) -> AgentUnderTest:
    """The real agent at ``http_address``, through the same client code."""
    return AgentUnderTest(
        kind="real",
        address=http_address,
        client=ConsulClient(reactor, address=http_address, timeout=15),
        http=RawHTTP(http_address),
        master_token=master_token,
    )


# -- certificate helpers ---------------------------------------------------------


def colon_hex(data: bytes) -> str:
    """Consul's form of key IDs and fingerprints: ``aa:bb:...``, lower case."""
    return ":".join(f"{b:02x}" for b in data)


def sha1_id(cert: x509.Certificate) -> str:
    """A root's ``ID``: the SHA-1 of its DER, in colon hex."""
    return colon_hex(hashlib.sha1(cert.public_bytes(Encoding.DER)).digest())


def load_pems(text: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(text.encode("ascii"))


# -- captured answers of the real agent --------------------------------------------


def load_capture(name: str) -> RawAnswer:
    """
    A response captured from real Consul 1.8.7 in
    ``tests/fixtures/real-1.8.7/`` (format in its README).
    """
    from tests.conftest import FIXTURES_DIR

    lines = (FIXTURES_DIR / "real-1.8.7" / name).read_text("utf-8").split("\n")
    while lines and lines[0].startswith("# "):
        lines.pop(0)
    head, _, body = "\n".join(lines).partition("\n\n")
    status_line, *header_lines = head.split("\n")
    headers = {
        k.lower(): v for k, v in (h.split(": ", 1) for h in header_lines if ": " in h)
    }
    return RawAnswer(int(status_line.split()[1]), headers, body.encode("utf-8"))


def shape(value: Any) -> Any:
    """
    The structure of a JSON value: key sets and value types (list elements
    merged), so two answers compare field by field and type by type.
    """
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        shapes: list[Any] = []
        for item in value:
            s = shape(item)
            if s not in shapes:
                shapes.append(s)
        return ["list", *shapes]
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if value is None:
        return "null"
    return "str"
