"""
A Connect service's Prometheus metrics: :class:`ServiceMetrics`, one per
:class:`~connect_native.service.ConnectService` (``service.metrics``), each
in a :class:`prometheus_client.CollectorRegistry` of its own, so that
several services in one process, and tests, do not collide in the global
default registry.  Expose them with
:meth:`~connect_native.service.ConnectService.status_resource` (``/metrics``)
or with any ``prometheus_client`` exporter on ``metrics.registry``.

The names and labels are a contract (``docs/metrics.rst``):

- ``connect_native_connections_total{service,outcome,reason}``: connections
  decided, ``outcome`` ``allowed`` or ``refused``, ``reason`` one of
  :data:`REFUSAL_REASONS` (``authorized`` when allowed);
- ``connect_native_open_connections``: connections let through and open;
- ``connect_native_handshake_seconds``: the TLS handshakes that completed;
- ``connect_native_authorization_seconds``: from the handshake's end to the
  decision, for the connections the authorizer decided;
- ``connect_native_certificate_expiry_timestamp_seconds``: the current leaf
  certificate's ``notAfter`` (absent while there is none);
- ``connect_native_bytes_total{direction}``: what the terminator forwarded,
  ``in`` (from the Connect clients to the application) and ``out``;
- ``connect_native_consul_errors_total``: requests to the agent that failed
  (unreachable, timed out, or an error status);
- ``connect_native_requests_total{service,outcome}``: HTTP requests decided
  by the terminator's ``--protocol http``, ``outcome`` ``allowed`` or
  ``denied``.

The hot path stays cheap: the counters' labelled children are bound once,
the open connections and the bytes are plain Python objects read when the
metrics are collected.  This module imports nothing else from the package.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "REFUSAL_REASONS",
    "ByteCounts",
    "ServiceMetrics",
]

#: The ``reason`` of a refused connection.
REFUSAL_REASONS = (
    # the authorizer said no (after the handshake, or inside it)
    "denied",
    # the authorizer failed, or did not answer within authorize_timeout
    "authorizer_error",
    "authorizer_timeout",
    # the handshake verified no peer identity
    "no_identity",
    # the client sent too much before it was authorized
    "early_bytes",
    # the application's factory built no protocol
    "application",
    # the peer's certificate was refused (untrusted, expired, no SPIFFE ID)
    "certificate",
    # OpenSSL refused the handshake (no client certificate, old protocol)
    "handshake_failed",
    # the handshake took longer than handshake_timeout
    "handshake_timeout",
    # dropped for a newer handshake (max_handshakes)
    "too_many_handshakes",
    # the terminator's --max-connections (or its bound on handshakes and
    # authorizations) was reached: closed as soon as accepted
    "too_many_connections",
    # accepted while the terminator drained for its shutdown
    "shutting_down",
)

#: TLS handshakes: a millisecond on loopback to seconds over a slow link.
HANDSHAKE_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: Authorizations: microseconds for a cached or local decision, an agent's
#: round trip otherwise.
AUTHORIZATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class ByteCounts:
    """
    Bytes forwarded, counted by the forwarder per read (two integer
    additions: cheaper than a Prometheus counter's lock).

    :ivar received: from the accepted (Connect) connections.
    :ivar sent: to them.
    """

    __slots__ = ("received", "sent")

    def __init__(self) -> None:
        self.received = 0
        self.sent = 0


class _Live(Collector):
    """The metrics read when collected: open connections, expiry, bytes."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = weakref.ref(metrics)

    def collect(self) -> Iterator[Any]:
        metrics = self._metrics()
        if metrics is None:
            return
        yield GaugeMetricFamily(
            "connect_native_open_connections",
            "Connections let through and still open.",
            value=metrics.open_connections(),
        )
        expiry = GaugeMetricFamily(
            "connect_native_certificate_expiry_timestamp_seconds",
            "When the service's current leaf certificate expires (notAfter), "
            "in seconds since the epoch; absent while there is none.",
        )
        not_after = metrics.certificate_expiry()
        if not_after is not None:
            expiry.add_metric([], not_after)
        yield expiry
        forwarded = CounterMetricFamily(
            "connect_native_bytes",
            "Bytes the terminator forwarded: in, from the Connect clients to "
            "the application; out, back to them.",
            labels=["direction"],
        )
        counts = metrics.bytes
        forwarded.add_metric(["in"], counts.received)
        forwarded.add_metric(["out"], counts.sent)
        yield forwarded


class ServiceMetrics:
    """
    The metrics of one Connect service, in :attr:`registry`.

    :param service: the service's name (the ``service`` label).
    :param certificate: gives the current Bundle (anything with
        ``not_after``, seconds since the epoch), or ``None``: the expiry
        gauge is read from it when collected.
    :param registry: where to register them; a new
        :class:`~prometheus_client.CollectorRegistry` by default.
    """

    def __init__(
        self,
        service: str,
        certificate: Callable[[], object] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.service = service
        self.registry = CollectorRegistry() if registry is None else registry
        self._certificate = certificate
        self._open: weakref.WeakSet[Any] = weakref.WeakSet()
        #: What the terminator forwarded for this service.
        self.bytes = ByteCounts()
        self.connections = Counter(
            "connect_native_connections_total",
            "Connections decided: outcome allowed or refused, and why.",
            ["service", "outcome", "reason"],
            registry=self.registry,
        )
        self.handshake_seconds = Histogram(
            "connect_native_handshake_seconds",
            "TLS handshakes that completed, from the accept to the end of "
            "the handshake.",
            buckets=HANDSHAKE_BUCKETS,
            registry=self.registry,
        )
        self.authorization_seconds = Histogram(
            "connect_native_authorization_seconds",
            "From the end of the handshake to the authorizer's decision.",
            buckets=AUTHORIZATION_BUCKETS,
            registry=self.registry,
        )
        self.consul_errors = Counter(
            "connect_native_consul_errors_total",
            "Requests to the Consul agent that failed: unreachable, timed "
            "out, or answered with an error status.",
            registry=self.registry,
        )
        self.requests = Counter(
            "connect_native_requests_total",
            "HTTP requests decided by the terminator's --protocol http: "
            "outcome allowed or denied.",
            ["service", "outcome"],
            registry=self.registry,
        )
        self.registry.register(_Live(self))
        # Bound once: the hot path does one call.
        self._allowed = self.connections.labels(service, "allowed", "authorized")
        self._refused = {
            reason: self.connections.labels(service, "refused", reason)
            for reason in REFUSAL_REASONS
        }
        self._requests = {
            True: self.requests.labels(service, "allowed"),
            False: self.requests.labels(service, "denied"),
        }
        self.observe_handshake = self.handshake_seconds.observe
        self.observe_authorization = self.authorization_seconds.observe

    def __repr__(self) -> str:
        return f"<ServiceMetrics {self.service!r}>"

    # -- the hot path -----------------------------------------------------

    def allowed(self, transport: object) -> None:
        """A connection let through; counted open while ``transport`` is."""
        self._allowed.inc()
        self._open.add(transport)

    def refused(self, reason: str) -> None:
        """A connection refused, for one of :data:`REFUSAL_REASONS`."""
        child = self._refused.get(reason)
        if child is None:
            raise ValueError(
                f"reason must be one of {', '.join(REFUSAL_REASONS)}, not {reason!r}"
            )
        child.inc()

    def request_decided(self, allowed: bool) -> None:
        """An HTTP request decided (``--protocol http``)."""
        self._requests[bool(allowed)].inc()

    def consul_error(self, error: object = None) -> None:
        """A request to the agent failed."""
        self.consul_errors.inc()

    # -- read when collected ----------------------------------------------

    def open_connections(self) -> int:
        """The connections let through that are still open."""
        return sum(
            1
            for transport in list(self._open)
            if getattr(transport, "connected", False)
            and not getattr(transport, "_aborted", False)
        )

    def certificate_expiry(self) -> float | None:
        """The current leaf's ``notAfter`` in POSIX seconds, or ``None``."""
        if self._certificate is None:
            return None
        try:
            bundle = self._certificate()
        except Exception:
            return None
        not_after = getattr(bundle, "not_after", None)
        return float(not_after) if isinstance(not_after, int | float) else None

    def count(self, outcome: str, reason: str | None = None) -> float:
        """
        How many connections were counted with ``outcome`` (and ``reason``):
        for tests and the status page.
        """
        total = 0.0
        for metric in self.connections.collect():
            for sample in metric.samples:
                if not sample.name.endswith("_total"):
                    continue
                labels = sample.labels
                if labels.get("outcome") == outcome and (
                    reason is None or labels.get("reason") == reason
                ):
                    total += sample.value
        return total
