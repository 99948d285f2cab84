"""
Helpers for the development agent's tests (no tests here): an agent on a
``Clock`` behind ``StubTreq``, the real Consul 1.8.7 captures, and the JSON
shape comparison the fidelity tests use.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path
from typing import Any

from attrs import frozen
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from connect_native.devagent import DevAgent

CAPTURES = Path(__file__).parent / "fixtures" / "real-1.8.7"
BASE = "http://127.0.0.1:8500"
# Headers that differ by framing or time, not by behaviour.
IGNORED_HEADERS = {"date", "content-length", "transfer-encoding", "content-encoding"}


@frozen
class Capture:
    """
    One ``*.http`` capture of the real agent (format in its README).
    """

    name: str
    meta: dict[str, str]
    status: int | None
    headers: dict[str, str]
    body: str

    @property
    def method(self) -> str:
        return self.meta["request"].split(" ", 1)[0]

    @property
    def path(self) -> str:
        return self.meta["request"].split(" ", 1)[1]

    @property
    def request_body(self) -> bytes | None:
        body = self.meta.get("request-body")
        return None if body is None else body.encode("utf-8")

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def header_names(self) -> set[str]:
        return {h.lower() for h in self.headers} - IGNORED_HEADERS


def load(name: str) -> Capture:
    """
    The README's ``load()``, as a record.
    """
    meta: dict[str, str] = {}
    lines = (CAPTURES / name).read_text(encoding="utf-8").split("\n")
    while lines and lines[0].startswith("# "):
        k, _, v = lines.pop(0)[2:].partition(": ")
        meta.setdefault(k, v)
    head, _, body = "\n".join(lines).partition("\n\n")
    status_line, *hdrs = head.split("\n")
    headers = dict(h.split(": ", 1) for h in hdrs if ": " in h)
    status = int(status_line.split()[1]) if status_line else None
    return Capture(name, meta, status, headers, body)


def real_trust_domain() -> str:
    return load("ca-roots.http").json()["TrustDomain"]


@frozen
class Answer:
    """
    One response of the development agent.
    """

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None

    @property
    def header_names(self) -> set[str]:
        return {
            h.lower()
            for h, v in self.headers.items()
            if h.lower() != "content-encoding"
        } - IGNORED_HEADERS


class Pending:
    """
    A request that may still be blocked in the agent.
    """

    def __init__(self, harness: Harness, deferred: Deferred[Any]) -> None:
        self._harness = harness
        self._deferred = deferred
        self._results: list[Any] = []
        deferred.addBoth(self._results.append)

    def cancel(self) -> None:
        """
        The client gives up: its connection to the agent is dropped.
        """
        self._deferred.cancel()
        self._harness.stub.flush()

    @property
    def done(self) -> bool:
        self._harness.stub.flush()
        return bool(self._results)

    def answer(self) -> Answer:
        assert self.done, "the request is still blocked"
        response = self._results[0]
        if not hasattr(response, "code"):
            response.raiseException()
        bodies: list[Any] = []
        response.content().addBoth(bodies.append)
        self._harness.stub.flush()
        assert bodies, "the response body never arrived"
        if not isinstance(bodies[0], bytes):
            bodies[0].raiseException()
        headers = {
            name.decode("latin-1"): values[-1].decode("latin-1")
            for name, values in response.headers.getAllRawHeaders()
        }
        return Answer(response.code, headers, bodies[0])


class _FixedRandom(random.Random):
    """
    A ``random.Random`` whose ``random()`` is always ``value``: jitter and
    renewal points are then exactly where a test expects them.
    """

    def __init__(self, value: float, seed: int = 0) -> None:
        super().__init__(seed)
        self.value = value

    def random(self) -> float:
        return self.value


def fixed_random(value: float, seed: int = 0) -> random.Random:
    return _FixedRandom(value, seed)


class Harness:
    """
    A development agent on a ``Clock`` started at the wall-clock time, behind
    ``StubTreq``.
    """

    def __init__(self, *, rng: random.Random | None = None, **kwargs: Any) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())
        self.agent = DevAgent(
            self.clock, rng=rng if rng is not None else random.Random(1), **kwargs
        )
        self.stub = StubTreq(self.agent.resource())

    def start(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        *,
        follow: bool = True,
    ) -> Pending:
        if isinstance(body, str):
            body = body.encode("utf-8")
        d = self.stub.request(
            method,
            BASE + path,
            data=body,
            headers=headers or {},
            allow_redirects=follow,
        )
        return Pending(self, d)

    def call(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        *,
        follow: bool = True,
    ) -> Answer:
        pending = self.start(method, path, body, headers, follow=follow)
        return pending.answer()

    def get(self, path: str, **kwargs: Any) -> Answer:
        return self.call("GET", path, **kwargs)

    def put(self, path: str, body: Any = None) -> Answer:
        if body is not None and not isinstance(body, bytes | str):
            body = json.dumps(body)
        return self.call("PUT", path, body)

    def post(self, path: str, body: Any = None) -> Answer:
        if body is not None and not isinstance(body, bytes | str):
            body = json.dumps(body)
        return self.call("POST", path, body)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.stub.flush()

    def register(self, definition: dict[str, Any]) -> None:
        answer = self.put("/v1/agent/service/register", definition)
        assert answer.status == 200, answer.text

    def uri(self, service: str, *, dc: str = "dc1", ns: str = "default") -> str:
        return f"spiffe://{self.agent.ca.trust_domain}/ns/{ns}/dc/{dc}/svc/{service}"


def shape(value: Any) -> Any:
    """
    The structure of a JSON value: key sets and value types, list elements
    merged, so two answers compare field by field and type by type.
    """
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        # distinct element shapes, in no particular order (Consul orders
        # roots by their random IDs, for example)
        shapes = []
        for item in value:
            s = shape(item)
            if s not in shapes:
                shapes.append(s)
        return ["list", *sorted(shapes, key=repr)]
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    if value is None:
        return "null"
    return "str"


def with_trust_domain(text: str, trust_domain: str) -> str:
    """
    ``text`` from a capture with the real run's trust domain replaced.
    """
    return text.replace(real_trust_domain(), trust_domain)


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def without_uuids(text: str) -> str:
    return UUID.sub("<uuid>", text)
