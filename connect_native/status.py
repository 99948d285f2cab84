"""
A Connect service's status pages, as a twisted.web resource:
:class:`StatusResource`, what
:meth:`~connect_native.service.ConnectService.status_resource` returns and
``twistd connect-native --status`` serves.

- ``/ready``: ``200 ready`` while the service can serve (a certificate in
  use, and every extra check passing: the terminator's checks that its
  backend answers), else ``503`` and the reason, one line;
- ``/status``: JSON: state, the certificate's serial and expiry, the roots
  and trust domain, the authorizer and the age of its cache, the open
  connections;
- ``/metrics``: the service's metrics (:mod:`connect_native.metrics`) in
  Prometheus' text format.

Mount it under any path of a twisted.web tree
(``root.putChild(b"admin", service.status_resource())``) or a Klein app
(``@app.route("/admin", branch=True)`` returning it).  It is plaintext and
unauthenticated: serve it on loopback or an internal interface only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from connect_native.authorize import colon_hex_serial
from connect_native.certs import ManagerState
from connect_native.metrics import ServiceMetrics

__all__ = ["READY_TIMEOUT", "ReadinessCheck", "StatusResource"]

#: A readiness check: fires with ``None`` when passing, else the reason
#: (one line) the service is not ready.  It must bound its own waits.
ReadinessCheck = Callable[[], Any]

#: The longest ``/ready`` waits for its checks before it answers 503.
READY_TIMEOUT = 5.0

#: States in which a certificate is in use (DEGRADED: the agent is away
#: but the certificate is still valid).
_SERVING = (ManagerState.READY, ManagerState.DEGRADED)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


def _plain(request: Any, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return (text + "\n").encode("utf-8")


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, page: StatusResource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.page = page


class _Ready(_Leaf):
    def render_GET(self, request: Any) -> Any:
        return self.page._render_ready(request)

    render_HEAD = render_GET


class _Status(_Leaf):
    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        body = json.dumps(self.page.status(), indent=2, sort_keys=True)
        return (body + "\n").encode("utf-8")


class _Metrics(_Leaf):
    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return generate_latest(self.page.metrics.registry)


class StatusResource(Resource):
    """
    ``/ready``, ``/status`` and ``/metrics`` for one service.

    :param service: the service: a
        :class:`~connect_native.service.ConnectService` (or its shared
        state): its ``state``, ``identity``, ``metrics`` and ``service``.
    :param clock: bounds ``/ready``'s wait for its checks.
    :param authorizer: whose cache ``/status`` describes; by default the
        service's.
    :param checks: more conditions of readiness (see :data:`ReadinessCheck`).
    :param ready_timeout: how long ``/ready`` waits for the checks.
    """

    def __init__(
        self,
        service: Any,
        clock: Any,
        *,
        authorizer: Any = None,
        checks: Sequence[ReadinessCheck] = (),
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.service = service
        self.clock = clock
        self._authorizer = authorizer
        self.checks = list(checks)
        self.ready_timeout = ready_timeout
        self.metrics: ServiceMetrics = service.metrics
        self.putChild(b"ready", _Ready(self))
        self.putChild(b"status", _Status(self))
        self.putChild(b"metrics", _Metrics(self))
        self.putChild(b"", self)

    def render_GET(self, request: Any) -> bytes:
        return _plain(request, 200, "/ready /status /metrics")

    # -- readiness ----------------------------------------------------------

    def certificate_problem(self) -> str | None:
        """Why no certificate is in use now, or ``None``."""
        state = self.service.state
        identity = self.service.identity
        if state in _SERVING and identity.current() is not None:
            return None
        reason = getattr(identity, "reason", None)
        detail = f": {reason}" if isinstance(reason, str) and reason else ""
        return f"no certificate in use (state {state.value}){detail}"

    def ready(self) -> Deferred[str | None]:
        """
        Fires with ``None`` when ready, else with the first reason it is
        not; within :attr:`ready_timeout`.
        """
        problem = self.certificate_problem()
        if problem is not None or not self.checks:
            return succeed(problem)
        results: list[Deferred[Any]] = [maybeDeferred(check) for check in self.checks]
        answer: Deferred[str | None] = Deferred()
        left = [len(results)]
        timeout = self.ready_timeout

        def give_up() -> None:
            if not answer.called:
                answer.callback(
                    f"the readiness checks did not answer within {timeout:g}s"
                )

        timer = self.clock.callLater(timeout, give_up)

        def one(result: object) -> None:
            if answer.called:
                return
            if isinstance(result, Failure):
                result = f"a readiness check failed: {result.getErrorMessage()}"
            if result is not None:
                answer.callback(str(result))
                return
            left[0] -= 1
            if left[0] == 0:
                answer.callback(None)

        for each in results:
            each.addBoth(one)

        def settle(result: object) -> object:
            # Answered, timed out or cancelled (the client went away): stop
            # the timer and the checks still running.
            if timer.active():
                timer.cancel()
            for each in results:
                if not each.called:
                    each.cancel()
            return result

        answer.addBoth(settle)
        return answer

    def _render_ready(self, request: Any) -> Any:
        checking = self.ready()
        if checking.called:
            result: list[str | None] = []
            checking.addCallback(result.append)
            return self._ready_page(request, result[0])

        def answer(problem: str | None) -> None:
            if getattr(request, "_disconnected", False):
                return
            request.write(self._ready_page(request, problem))
            request.finish()

        finished = request.notifyFinish()
        finished.addErrback(lambda _: checking.cancel())
        checking.addCallback(answer)
        checking.addErrback(lambda _: None)
        return NOT_DONE_YET

    def _ready_page(self, request: Any, problem: str | None) -> bytes:
        if problem is None:
            return _plain(request, 200, "ready")
        return _plain(request, 503, f"not ready: {problem}")

    # -- status ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What ``/status`` shows, as a dict."""
        service = self.service
        state = service.state
        bundle = service.identity.current()
        problem = self.certificate_problem()
        out: dict[str, Any] = {
            "service": service.service,
            "state": state.value,
            "certificate_ready": problem is None,
            "reason": getattr(service.identity, "reason", None),
            "open_connections": self.metrics.open_connections(),
            "certificate": None,
            "roots": [],
            "trust_domain": None,
            "trust_domains": [],
            "authorizer": self._authorizer_status(),
        }
        if bundle is not None:
            now = time.time()
            out["certificate"] = {
                "uri": bundle.identity.uri,
                "serial": colon_hex_serial(bundle.leaf.serial_number),
                "not_before": _iso(bundle.not_before),
                "not_after": _iso(bundle.not_after),
                "expires_in_seconds": round(bundle.not_after - now, 3),
            }
            out["trust_domain"] = bundle.identity.trust_domain
            out["trust_domains"] = sorted(bundle.trust_domains)
            out["roots"] = [
                {
                    "subject": root.certificate.subject.rfc4514_string(),
                    "serial": colon_hex_serial(root.certificate.serial_number),
                    "not_after": _iso(root.certificate.not_valid_after_utc.timestamp()),
                }
                for root in bundle.roots
            ]
        return out

    def _authorizer_status(self) -> dict[str, Any]:
        authorizer = self._authorizer
        if authorizer is None:
            try:
                authorizer = self.service.authorizer
            except Exception as e:  # the default one needs the agent's client
                return {"type": None, "error": str(e)}
        out: dict[str, Any] = {"type": type(authorizer).__name__}
        for name in ("cache_ttl", "cache_age", "fresh"):
            value = getattr(authorizer, name, None)
            if isinstance(value, bool | int | float):
                out[name] = value
        return out
