"""
``--workers``: several processes accepting on the one public port.

The first process binds the port, then starts ``--workers - 1`` others
(``twistd connect-native --worker``) that bind it too: every listening socket
has ``SO_REUSEPORT`` set before it is bound (:class:`ReusePortEndpoint`), so
the kernel spreads new connections over them.  A worker serves the public
listener only (no registration, no upstreams), and stops when the first
process is gone (:class:`ParentWatch`: its standard input is a pipe from it).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import ConnectionDone, ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReadDescriptor,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from connect_native import _logging
from connect_native.terminator.options import (
    Settings,
    split_description,
    with_default_backlog,
)

__all__ = [
    "ParentWatch",
    "ReusePortEndpoint",
    "WorkerProcess",
    "signal_workers",
    "start_workers",
    "stop_workers",
    "worker_arguments",
]

log = Logger(observer=_logging.observer)


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """
    A TCP server endpoint whose socket has ``SO_REUSEPORT`` set before it is
    bound, so that several processes (``--workers``) listen on one port and
    the kernel spreads new connections over them.
    """

    def __init__(
        self, reactor: Any, family: int, port: int, interface: str, backlog: int
    ) -> None:
        self.reactor = reactor
        self.family = family
        self.port = port
        self.interface = interface
        self.backlog = backlog

    @classmethod
    def from_description(cls, reactor: Any, description: str) -> ReusePortEndpoint:
        """
        The same port, interface and backlog as a tcp/tcp6 description (or a
        bare port), read from the description itself: Twisted's parsed
        endpoint keeps them only in private attributes.
        """
        parts = split_description(description)
        if len(parts) == 1 and parts[0].isdigit():
            parts = ["tcp", parts[0]]
        kind = parts[0].strip().lower()
        if kind not in ("tcp", "tcp6") or len(parts) < 2:
            raise ValueError(
                f"--workers needs a tcp: or tcp6: --listen, not {description!r}"
            )
        options: dict[str, str] = {}
        positional: list[str] = []
        for part in parts[1:]:
            name, equals, value = part.partition("=")
            if equals:
                options[name.strip()] = value.replace("\\:", ":")
            else:
                positional.append(part)
        port_text = options.get("port", positional[0] if positional else "")
        if not port_text.isdigit():
            raise ValueError(f"no port in --listen {description!r}")
        family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
        return cls(
            reactor,
            family,
            int(port_text),
            # No interface= means all of them, as for twistd's own tcp:PORT.
            options.get("interface")
            or ("::" if family == socket.AF_INET6 else "0.0.0.0"),  # noqa: S104
            int(options.get("backlog", "50")),
        )

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return maybeDeferred(self._listen, protocolFactory)

    def _listen(self, factory: IProtocolFactory) -> IListeningPort:
        listening = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listening.bind((self.interface, self.port))
            listening.listen(self.backlog)
            listening.setblocking(False)
            # adoptStreamPort duplicates the descriptor: ours is closed below.
            port: IListeningPort = self.reactor.adoptStreamPort(
                listening.fileno(), self.family, factory
            )
            return port
        finally:
            listening.close()


def worker_arguments(settings: Settings, port: int, consul: str | None) -> list[str]:
    """
    The ``twistd`` command line of one worker: the public listener on the
    port the first process bound (``--listen`` may say 0), no registration,
    no upstreams.
    """
    kind = split_description(settings.listen)[0].lower()
    if kind.isdigit():
        kind = "tcp"
    parsed = ReusePortEndpoint.from_description(
        None, with_default_backlog(settings.listen)
    )
    interface = parsed.interface.replace(":", "\\:")
    assert settings.to is not None
    arguments = [
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "--nodaemon",
        "--pidfile=",
        "connect-native",
        "--worker",
        "--no-register",
        "--service",
        settings.service,
        "--listen",
        f"{kind}:{port}:interface={interface}:backlog={parsed.backlog}",
        "--to",
        settings.to,
        "--authorize",
        settings.authorize,
        "--authorize-cache",
        repr(settings.authorize_cache),
        "--max-connections",
        str(settings.max_connections),
        "--max-handshakes",
        str(settings.max_handshakes),
        "--max-handshakes-per-address",
        str(settings.max_handshakes_per_address),
        "--handshake-timeout",
        repr(settings.handshake_timeout),
        "--connect-timeout",
        repr(settings.connect_timeout),
        "--idle-timeout",
        repr(settings.idle_timeout),
        "--shutdown-timeout",
        repr(settings.shutdown_timeout),
    ]
    if settings.release_buffers:
        arguments.append("--release-buffers")
    if not settings.log_allowed:
        arguments.append("--no-log-allowed")
    elif settings.log_allowed_requests:
        arguments.append("--log-allowed")
    if settings.protocol != "tcp":
        arguments += [
            "--protocol",
            settings.protocol,
            "--request-timeout",
            repr(settings.request_timeout),
            "--max-request-line",
            str(settings.max_request_line),
            "--max-headers-size",
            str(settings.max_headers_size),
            "--max-requests-per-connection",
            str(settings.max_requests_per_connection),
        ]
    if settings.keep_open_on_deny:
        arguments.append("--keep-open-on-deny")
    arguments += ["--buffer-size", str(settings.buffer_size)]
    # The files SIGHUP reloads, by name: each worker reloads them itself.
    if settings.log_level_file is not None:
        arguments += ["--log-level-file", settings.log_level_file]
    else:
        arguments += ["--log-level", settings.log_level]
    arguments += ["--tls-transport", settings.tls_transport]
    arguments += ["--identity", settings.identity_text]
    if settings.allow_ids_file is not None:
        arguments += ["--allow-ids-file", settings.allow_ids_file]
        allowed_ids = settings.allow_id_options
    else:
        allowed_ids = settings.allow_ids
    for allowed in allowed_ids:
        arguments += ["--allow-id", allowed]
    if settings.token_file is not None:
        arguments += ["--token-file", settings.token_file]
    if consul is not None:
        arguments += ["--consul", consul]
    if settings.log_format != "text":
        arguments += ["--log-format", settings.log_format]
    return arguments


class WorkerProcess(ProcessProtocol):
    """One worker as seen from the first process."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.stopping = False
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        if not self.stopping:
            log.warn(
                "connect-native: worker {number} ended on its own ({why}); the "
                "other processes keep accepting on the port",
                number=self.number,
                why=reason.getErrorMessage(),
            )
        elif not (
            isinstance(reason.value, ProcessDone)
            # twistd ends a SIGTERM'd run by raising the signal on itself.
            or getattr(reason.value, "signal", None) == signal.SIGTERM
        ):
            log.info(
                "connect-native: worker {number} stopped ({why})",
                number=self.number,
                why=reason.getErrorMessage(),
            )
        self.ended.callback(None)


@implementer(IReadDescriptor)
class ParentWatch:
    """
    In a worker: standard input is a pipe from the first process, so its end
    means that process is gone, and the worker stops too.
    """

    def __init__(self, on_gone: Callable[[], object]) -> None:
        self._on_gone = on_gone
        os.set_blocking(0, False)

    def fileno(self) -> int:
        return 0

    def doRead(self) -> Failure | None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        except OSError as e:
            return Failure(e)  # type: ignore[no-untyped-call]
        return None if data else Failure(ConnectionDone())  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure) -> None:
        log.info("connect-native worker: the first process is gone; stopping")
        self._on_gone()

    def logPrefix(self) -> str:
        return "connect-native-worker"


def start_workers(
    reactor: Any, settings: Settings, public: IListeningPort, consul: str | None
) -> list[WorkerProcess]:
    """
    Start the other ``settings.workers - 1`` processes on ``public``'s port,
    their agent at ``consul``.
    """
    environment = dict(os.environ)
    if settings.token is not None and settings.token_file is None:
        # The environment, not the command line, which anyone can read.
        environment.pop("CONSUL_HTTP_TOKEN_FILE", None)
        environment["CONSUL_HTTP_TOKEN"] = settings.token
    port = public.getHost().port  # type: ignore[attr-defined]
    arguments = worker_arguments(settings, port, consul)
    workers: list[WorkerProcess] = []
    for number in range(1, settings.workers):
        worker = WorkerProcess(number)
        reactor.spawnProcess(
            worker,
            sys.executable,
            [sys.executable, *arguments],
            env=environment,
            # Standard input is the worker's lifeline (ParentWatch); its
            # logs go where ours go.
            childFDs={0: "w", 1: 1, 2: 2},
        )
        workers.append(worker)
    log.info(
        "connect-native {service}: {count} worker processes share port "
        "{port} (SO_REUSEPORT)",
        service=settings.service,
        count=settings.workers,
        port=port,
    )
    return workers


def signal_workers(workers: list[WorkerProcess], name: str) -> int:
    """
    Send signal ``name`` (``"HUP"``, ``"TERM"``) to the workers still
    running; how many got it.
    """
    sent = 0
    for worker in workers:
        if worker.ended.called:
            continue
        try:
            worker.transport.signalProcess(name)  # type: ignore[union-attr]
        except ProcessExitedAlready:
            continue
        sent += 1
    return sent


async def stop_workers(
    reactor: Any, workers: list[WorkerProcess], shutdown_timeout: float
) -> None:
    """
    Stop the workers still running (SIGTERM), and kill those still running
    ``shutdown_timeout`` (their own drain) + 5 seconds later.
    """
    running = [w for w in workers if not w.ended.called]
    for worker in running:
        worker.stopping = True
        try:
            worker.transport.signalProcess("TERM")  # type: ignore[union-attr]
        except ProcessExitedAlready:
            pass
    if not running:
        return
    ended = DeferredList([w.ended for w in running], consumeErrors=True)
    # A worker drains for --shutdown-timeout; then it has 5 s to exit.
    timer = reactor.callLater(shutdown_timeout + 5.0, _kill_workers, running)
    await ended
    if timer.active():
        timer.cancel()


def _kill_workers(workers: list[WorkerProcess]) -> None:
    for worker in workers:
        if worker.ended.called:
            continue
        log.warn(
            "connect-native: worker {number} still running after "
            "--shutdown-timeout; killing it",
            number=worker.number,
        )
        try:
            worker.transport.signalProcess(signal.SIGKILL)  # type: ignore[union-attr]
        except ProcessExitedAlready:
            pass
