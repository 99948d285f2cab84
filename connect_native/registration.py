"""
Registration with the local Consul agent: :class:`Registration`, a Twisted
service that registers one Connect-native service instance, keeps a TTL check
in step with the certificate manager's state, registers again when the agent
has forgotten it, and deregisters on stop.

The check says whether the instance accepts Connect connections now:

=============  =================================================================
manager state  check status (output: the manager's reason)
=============  =================================================================
``READY``      ``passing``
``DEGRADED``   ``degraded_status``, ``passing`` by default: the certificate is
               still valid, so the instance still accepts connections (see
               :class:`Registration` for why)
``EXPIRED``    ``critical``: the instance refuses every connection
``STARTING``   ``critical``: no certificate yet
``STOPPED``    ``critical``: the certificate manager was stopped
=============  =================================================================

With a ``backend`` (a :class:`BackendHealth`, e.g. the terminator's probe of
``--to``), the check is also ``critical`` while the backend is unreachable,
whatever the certificate: the output says which of the two it is.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from connect_native import _logging
from connect_native._backoff import backoff_delay
from connect_native._checks import port_number, positive_seconds, service_name
from connect_native._deferreds import bounded
from connect_native.certs import ManagerState, StateChange
from connect_native.consul.records import ServiceRegistration, TTLCheck

__all__ = [
    "BackendHealth",
    "CheckStatus",
    "ReadinessSource",
    "Registration",
    "RegistrationClient",
    "check_for_state",
]

CheckStatus = Literal["passing", "warning", "critical"]
_STATUSES: tuple[CheckStatus, ...] = ("passing", "warning", "critical")

log = Logger(observer=_logging.observer)


class RegistrationClient(Protocol):
    """
    What :class:`Registration` needs of the agent;
    :class:`~connect_native.consul.client.ConsulClient` provides it.
    """

    def register_service(self, registration: ServiceRegistration) -> Deferred[None]:
        """``PUT /v1/agent/service/register``."""

    def deregister_service(self, service_id: str) -> Deferred[None]:
        """``PUT /v1/agent/service/deregister/<id>``."""

    def check_update(
        self, check_id: str, status: str, output: str = ""
    ) -> Deferred[None]:
        """``PUT /v1/agent/check/update/<id>``."""


class ReadinessSource(Protocol):
    """
    Whose state the check reports;
    :class:`~connect_native.certs.CertManager` provides it.
    """

    @property
    def state(self) -> ManagerState:
        """The current state."""

    @property
    def reason(self) -> str:
        """Why, as a sentence."""

    def subscribe(
        self, callback: Callable[[StateChange], object]
    ) -> Callable[[], None]:
        """Call ``callback`` on every change; returns the unsubscriber."""


class BackendHealth(Protocol):
    """
    Whether the application behind the instance answers; the terminator's
    :class:`~connect_native.terminator.health.BackendProbe` provides it.
    """

    @property
    def healthy(self) -> bool:
        """Whether the last probe reached the backend."""

    @property
    def reason(self) -> str:
        """What the last probe found, as a sentence."""

    def subscribe(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Call ``callback`` when ``healthy`` changes; returns the unsubscriber."""


def check_for_state(
    state: ManagerState, reason: str, degraded_status: CheckStatus = "passing"
) -> tuple[CheckStatus, str]:
    """
    The TTL check's status and output for a certificate manager's state and
    reason (the table in this module's docstring).
    """
    if state is ManagerState.READY:
        return "passing", reason
    if state is ManagerState.DEGRADED:
        return degraded_status, f"degraded: {reason}"
    if state is ManagerState.EXPIRED:
        return "critical", f"not accepting connections: {reason}"
    if state is ManagerState.STARTING:
        return "critical", f"not accepting connections yet: {reason}"
    return "critical", f"not accepting connections: {reason}"


def _optional_seconds(name: str, value: object) -> float | None:
    return None if value is None else positive_seconds(name, value)


def _forgotten(error: BaseException) -> bool:
    """
    Does this error from a check update mean the agent no longer knows the
    check?  Consul 1.8 answers 500 ``CheckID "x" does not have associated
    TTL``; newer agents 404 ``Unknown check ID``.
    """
    status = getattr(error, "status", None)
    if status == 404:
        return True
    body = str(getattr(error, "body", ""))
    return status == 500 and "does not have associated TTL" in body


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified
    except ValueError:
        return False


class Registration(Service):
    """
    Register one Connect-native instance of ``service`` with the local agent,
    with a TTL check driven by ``readiness`` (the service's certificate
    manager), while this service runs.

    On ``startService`` the instance is registered with ``"Connect":
    {"Native": true}``, the port, and a TTL check ``<service_id>:ttl``; the
    check is then updated with the status and output of
    :func:`check_for_state` at once on every state change of ``readiness``
    and every ``refresh_interval`` seconds, well within ``check_ttl``.  When a
    check update answers that the agent does not know the check (an agent
    restarted, or someone deregistered us), the instance is registered again.
    Agent errors are logged with the agent's reason and retried after a
    delay that doubles from ``backoff_initial`` up to ``backoff_max``
    (randomised between half and all of it).  ``stopService`` deregisters,
    bounded by ``stop_timeout``, and returns a Deferred that fires when that
    is done or given up (it never fails).

    Degraded means the agent is unreachable or sent something unusable, but
    our certificate is still valid, so the server still accepts connections.
    It is reported ``passing`` by default, with the reason in the output:
    clients look for ``passing`` instances (``?passing=1``), and every
    instance of a service goes degraded together, for a moment, during a CA
    rotation; any other status would take the whole service out of discovery
    while it can still serve.  Pass ``degraded_status="warning"`` or
    ``"critical"`` to change that.

    :param clock: schedules refreshes, back-off and timeouts.
    :param client: the agent, see :class:`RegistrationClient`.
    :param readiness: the certificate manager, see :class:`ReadinessSource`.
    :param service: the service name.
    :param port: the port the instance accepts Connect connections on: a
        number, or the ``IListeningPort`` the server endpoint gave, read when
        registering.  With a listening port bound to one address (not
        ``0.0.0.0`` or ``::``), that address is registered unless ``address``
        says otherwise.
    :param service_id: the instance ID on the agent.  Default:
        ``<service>-<host name>-<port>``, stable across restarts, so a process
        that restarts after a crash replaces its old registration instead of
        leaving a second one, and unique among processes sharing one agent
        (containers have their own host names; one host, one port).
    :param address: the address clients should dial; default the listening
        port's address as above, else the agent's node address.
    :param tags: service tags.
    :param meta: service metadata.
    :param check_ttl: seconds the agent waits for an update before marking
        the check critical.
    :param refresh_interval: seconds between updates when nothing changes;
        default a third of ``check_ttl``; must be less than it.
    :param deregister_critical_after: if given, the agent removes the
        instance after its check has been critical this long (for instances
        that die without deregistering).
    :param degraded_status: the check status while the manager is degraded.
    :param request_timeout: seconds each call to the agent may take.
    :param stop_timeout: seconds ``stopService`` waits for deregistration.
    :param backoff_initial: first delay after an agent error, in seconds.
    :param backoff_max: longest delay after agent errors, in seconds.
    :param rng: randomness for the back-off (tests pass a seeded one).
    :param backend: if given, the check is also critical while
        ``backend.healthy`` is false (its reason in the output), and is
        updated at once when it changes.
    :param hostname: the host name in the default ID (default
        :func:`socket.gethostname`).
    """

    def __init__(
        self,
        clock: IReactorTime,
        client: RegistrationClient,
        readiness: ReadinessSource,
        service: str,
        port: int | IListeningPort,
        *,
        service_id: str | None = None,
        address: str | None = None,
        tags: Sequence[str] = (),
        meta: Mapping[str, str] | None = None,
        check_ttl: float = 30.0,
        refresh_interval: float | None = None,
        deregister_critical_after: float | None = None,
        degraded_status: CheckStatus = "passing",
        request_timeout: float = 15.0,
        stop_timeout: float = 5.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        rng: random.Random | None = None,
        hostname: str | None = None,
        backend: BackendHealth | None = None,
    ) -> None:
        service_name("service", service)
        if isinstance(port, bool) or not (
            isinstance(port, int) or IListeningPort.providedBy(port)
        ):
            raise TypeError(
                "port must be a port number or the IListeningPort the server "
                f"endpoint's listen() gave, not {port!r}"
            )
        if isinstance(port, int):
            port_number("port", port)
        if service_id is not None and (
            not isinstance(service_id, str) or not service_id
        ):
            raise ValueError(
                f"service_id must be a non-empty string, not {service_id!r}"
            )
        if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
            raise TypeError(f"tags must be a sequence of strings, not {tags!r}")
        if meta is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise TypeError(f"meta must map strings to strings, not {meta!r}")
        if degraded_status not in _STATUSES:
            raise ValueError(
                f"degraded_status must be one of {', '.join(_STATUSES)}, not "
                f"{degraded_status!r}"
            )
        ttl = positive_seconds("check_ttl", check_ttl)
        refresh = _optional_seconds("refresh_interval", refresh_interval)
        if refresh is None:
            refresh = ttl / 3
        if refresh >= ttl:
            raise ValueError(
                f"refresh_interval ({refresh:g}s) must be less than check_ttl "
                f"({ttl:g}s), or the check goes critical between updates"
            )
        initial = positive_seconds("backoff_initial", backoff_initial)
        maximum = positive_seconds("backoff_max", backoff_max)
        if maximum < initial:
            raise ValueError(
                f"backoff_max ({maximum:g}s) must be at least backoff_initial "
                f"({initial:g}s)"
            )
        self.clock = clock
        self.client = client
        self.readiness = readiness
        self.service = service
        self.port = port
        self.address = address
        self.tags = tuple(tags)
        self.meta = dict(meta or {})
        self.check_ttl = ttl
        self.refresh_interval = refresh
        self.deregister_critical_after = _optional_seconds(
            "deregister_critical_after", deregister_critical_after
        )
        self.degraded_status: CheckStatus = degraded_status
        self.request_timeout = positive_seconds("request_timeout", request_timeout)
        self.stop_timeout = positive_seconds("stop_timeout", stop_timeout)
        self.backoff_initial = initial
        self.backoff_max = maximum
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 (back-off jitter)
        self._hostname = hostname
        self._service_id = service_id
        self.backend = backend
        if isinstance(port, int):
            # Refuse a bad name, address or ID now rather than at start.
            self.registration()

        self._registered = False
        self._in_flight: Deferred[None] | None = None
        self._again = False
        self._timer: IDelayedCall | None = None
        self._failures = 0
        self._forgotten_in_a_row = 0
        self._unsubscribe: Callable[[], None] | None = None
        self._unsubscribe_backend: Callable[[], None] | None = None
        self._reported: tuple[CheckStatus, str] | None = None

    def __repr__(self) -> str:
        return (
            f"<Registration service={self.service!r} id={self.service_id!r} "
            f"registered={self._registered}>"
        )

    # -- what is registered --------------------------------------------------

    def _port_and_host(self) -> tuple[int, str | None]:
        if isinstance(self.port, int):
            return self.port, None
        host: Any = self.port.getHost()
        number = getattr(host, "port", None)
        if isinstance(number, bool) or not isinstance(number, int) or number <= 0:
            raise ValueError(
                f"the listening port {self.port!r} has no TCP port number "
                f"(getHost() gave {host!r}); pass port= as a number"
            )
        bound = getattr(host, "host", None)
        if isinstance(bound, str) and bound and not _is_wildcard(bound):
            return number, bound
        return number, None

    @property
    def service_id(self) -> str:
        """The instance ID on the agent."""
        if self._service_id is not None:
            return self._service_id
        hostname = (
            self._hostname if self._hostname is not None else socket.gethostname()
        )
        port, _ = self._port_and_host()
        return f"{self.service}-{hostname or 'localhost'}-{port}"

    @property
    def check_id(self) -> str:
        """The TTL check's ID: ``<service_id>:ttl``."""
        return f"{self.service_id}:ttl"

    @property
    def registered(self) -> bool:
        """Whether the agent last acknowledged our registration."""
        return self._registered

    def check(self) -> tuple[CheckStatus, str]:
        """
        The check status and output for the manager's state now, and the
        backend's when there is one: critical if either says so.
        """
        status, output = check_for_state(
            self.readiness.state, self.readiness.reason, self.degraded_status
        )
        backend = self.backend
        if backend is None:
            return status, output
        if not backend.healthy:
            if status == "critical":
                return status, f"{output}; and the backend: {backend.reason}"
            return "critical", (
                f"not accepting connections: the backend: {backend.reason} "
                f"(certificate: {output})"
            )
        return status, f"{output}; backend: {backend.reason}"

    def registration(self) -> ServiceRegistration:
        """What :meth:`startService` registers."""
        port, bound = self._port_and_host()
        status, _ = self.check()
        return ServiceRegistration(
            name=self.service,
            port=port,
            id=self.service_id,
            address=self.address if self.address is not None else bound,
            # records.py's converter=tuple is untyped for mypy's attrs plugin
            tags=self.tags,
            meta=self.meta,
            connect_native=True,
            checks=(
                TTLCheck(
                    ttl=self.check_ttl,
                    check_id=self.check_id,
                    name=(
                        f"Connect certificate for {self.service}"
                        if self.backend is None
                        else f"Connect certificate and backend for {self.service}"
                    ),
                    status=status,
                    notes=(
                        "passing while this instance holds a valid Connect "
                        "certificate and accepts connections"
                        + ("" if self.backend is None else " and its backend answers")
                        + "; updated by connect_native"
                    ),
                    deregister_critical_service_after=self.deregister_critical_after,
                ),
            ),
        )

    # -- IService ------------------------------------------------------------

    def startService(self) -> None:
        if self.running:
            return
        super().startService()  # type: ignore[no-untyped-call]
        self._registered = False
        self._failures = 0
        self._forgotten_in_a_row = 0
        self._reported = None
        self._again = False
        self._unsubscribe = self.readiness.subscribe(self._changed)
        if self.backend is not None:
            self._unsubscribe_backend = self.backend.subscribe(self._kick)
        self._kick()

    def stopService(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        super().stopService()  # type: ignore[no-untyped-call]
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._unsubscribe_backend is not None:
            self._unsubscribe_backend()
            self._unsubscribe_backend = None
        self._cancel_timer()
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.cancel()
        self._registered = False
        try:
            service_id = self.service_id
        except ValueError as e:
            log.warn(
                "not deregistering {service}: {error}", service=self.service, error=e
            )
            return succeed(None)
        d = self._bounded(
            maybeDeferred(self.client.deregister_service, service_id),
            self.stop_timeout,
        )

        def deregistered(_: object) -> None:
            log.info(
                "deregistered {service_id} from the Consul agent",
                service_id=service_id,
            )

        def failed(failure: Failure) -> None:
            log.warn(
                "could not deregister {service_id} from the Consul agent: "
                "{error}; its TTL check will go critical within {ttl:g}s",
                service_id=service_id,
                error=_describe(failure),
                ttl=self.check_ttl,
            )

        d.addCallbacks(deregistered, failed)
        return d

    # -- the loop ------------------------------------------------------------
    #
    # One request to the agent at a time.  A state change while one is in
    # flight is remembered (``_again``) and sent as soon as it is answered,
    # so the agent always ends with the latest state.

    def _changed(self, change: StateChange) -> None:
        self._kick()

    def _kick(self) -> None:
        if not self.running:
            return
        if self._in_flight is not None:
            self._again = True
            return
        self._cancel_timer()
        self._again = False
        if self._registered:
            status, output = self.check()
            d = self._bounded(
                maybeDeferred(self.client.check_update, self.check_id, status, output),
                self.request_timeout,
            )
            self._in_flight = d
            d.addBoth(self._updated, status, output)
        else:
            try:
                registration = self.registration()
            except ValueError as e:
                log.error(
                    "cannot register {service}: {error}",
                    service=self.service,
                    error=e,
                )
                return
            d = self._bounded(
                maybeDeferred(self.client.register_service, registration),
                self.request_timeout,
            )
            self._in_flight = d
            d.addBoth(self._registered_answer, registration)

    def _bounded(self, d: Deferred[None], seconds: float) -> Deferred[None]:
        return bounded(
            d, seconds, self.clock, lambda: DeferredTimeoutError(seconds, "Deferred")
        )

    def _done(self) -> bool:
        """Whether the answer still matters (we were not stopped meanwhile)."""
        self._in_flight = None
        return bool(self.running)

    def _registered_answer(
        self, result: object, registration: ServiceRegistration
    ) -> None:
        if not self._done():
            return
        if isinstance(result, Failure):
            log.warn(
                "could not register {service_id} with the Consul agent: {error}",
                service_id=registration.id,
                error=_describe(result),
            )
            self._back_off()
            return
        self._registered = True
        # Failures are forgiven only once the check is updated too: an agent
        # that takes registrations and then forgets them must not be looped on.
        log.info(
            "registered {service_id} ({service}, port {port}) with the Consul "
            "agent, TTL check {check_id}",
            service_id=registration.id,
            service=self.service,
            port=registration.port,
            check_id=self.check_id,
        )
        # The registration set the status but not the output: say why now.
        self._reported = None
        self._kick()

    def _updated(self, result: object, status: CheckStatus, output: str) -> None:
        if not self._done():
            return
        if isinstance(result, Failure):
            if result.value is not None and _forgotten(result.value):
                log.warn(
                    "the Consul agent has forgotten {service_id} ({error}); "
                    "registering it again",
                    service_id=self.service_id,
                    error=_describe(result),
                )
                self._registered = False
                self._forgotten_in_a_row += 1
                if self._forgotten_in_a_row == 1:
                    self._kick()
                else:
                    # Registered, then forgotten at once: do not spin.
                    self._back_off()
                return
            log.warn(
                "could not update the check {check_id}: {error}",
                check_id=self.check_id,
                error=_describe(result),
            )
            self._back_off()
            return
        self._failures = 0
        self._forgotten_in_a_row = 0
        if self._reported is None or self._reported[0] != status:
            log.info(
                "check {check_id} is {status}: {output}",
                check_id=self.check_id,
                status=status,
                output=output,
            )
        self._reported = (status, output)
        if self._again:
            self._kick()
        else:
            self._schedule(self.refresh_interval)

    def _back_off(self) -> None:
        self._failures += 1
        self._schedule(
            backoff_delay(
                self._failures, self.backoff_initial, self.backoff_max, self._rng.random
            )
        )

    def _schedule(self, delay: float) -> None:
        self._cancel_timer()
        self._again = False
        self._timer = self.clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._kick()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def _describe(failure: Failure) -> str:
    error = failure.value
    if isinstance(error, CancelledError | DeferredTimeoutError):
        return "no answer in time; the request was cancelled"
    return str(error) or type(error).__name__
