"""
One :class:`~connect_native.certs.CertManager` per (agent, service) per
process, shared by every endpoint of that service and reference-counted.

An endpoint acquires a lease when it starts listening (or connecting) and
releases it when it stops::

    lease = acquire_cert_manager(reactor, client, "web")
    d = lease.manager.when_ready()   # bound it with a timeout
    ...
    lease.release()                  # when the port stops listening

The first lease for a (client, service) pair creates the manager and starts
it; the last release stops it (stopping its watches and failing its pending
``when_ready()`` Deferreds); an acquire after that makes a fresh one.
Releasing a lease twice does nothing, so a port may release in every path
out without counting twice.

The agent is identified by the :class:`~connect_native.consul.client.ConsulClient`
object: endpoints that pass the same client share a manager.  Two clients
for the same agent make two managers, which is correct (they may carry
different tokens) but wasteful: share one client per process.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from connect_native import _logging
from connect_native.certs import CertificateAuthorityClient, CertManager

__all__ = [
    "CertManagerLease",
    "CertManagerRegistry",
    "acquire_cert_manager",
    "cert_managers",
]

#: Makes a manager: ``factory(clock, client, service)``.
CertManagerFactory = Callable[
    [IReactorTime, CertificateAuthorityClient, str], CertManager
]


class _Entry:
    """A shared manager and how many leases hold it."""

    def __init__(
        self, manager: CertManager, client: CertificateAuthorityClient
    ) -> None:
        self.manager = manager
        # Keeps the client alive while it is part of a key (keys hold its id).
        self.client = client
        self.leases = 0


class CertManagerLease:
    """
    One user's hold on a shared :class:`~connect_native.certs.CertManager`.

    :ivar manager: the shared manager, started.
    """

    def __init__(
        self, registry: CertManagerRegistry, key: tuple[int, str], manager: CertManager
    ) -> None:
        self._registry = registry
        self._key = key
        self.manager = manager
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """
        Give the manager back; the last release stops it.  Calling it again
        does nothing.
        """
        if self._released:
            return
        self._released = True
        self._registry._release(self._key, self.manager)

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"<CertManagerLease {self.manager!r} {state}>"


class CertManagerRegistry:
    """
    The managers of one process, keyed by (client, service name).

    :param factory: makes a manager for a new key (tests pass one that sets
        options or records what it made); by default
        ``CertManager(clock, client, service)``.
    """

    _log = Logger(observer=_logging.observer)

    def __init__(self, factory: CertManagerFactory = CertManager) -> None:
        self._factory = factory
        self._entries: dict[tuple[int, str], _Entry] = {}

    def acquire(
        self, clock: IReactorTime, client: CertificateAuthorityClient, service: str
    ) -> CertManagerLease:
        """
        A lease on the manager for ``service`` through ``client``: the
        running one if there is one, else a new one, started now on
        ``clock``.  Wait for certificates with ``lease.manager.when_ready()``.

        :raises ValueError: if ``service`` is not a non-empty string.
        """
        if not isinstance(service, str) or not service:
            raise ValueError(
                f"service must be a non-empty service name, not {service!r}"
            )
        key = (id(client), service)
        entry = self._entries.get(key)
        if entry is None:
            manager = self._factory(clock, client, service)
            entry = _Entry(manager, client)
            self._entries[key] = entry
            self._log.info(
                "starting the certificate manager for {service}", service=service
            )
            try:
                manager.startService()
            except BaseException:
                del self._entries[key]
                raise
        entry.leases += 1
        return CertManagerLease(self, key, entry.manager)

    def _release(self, key: tuple[int, str], manager: CertManager) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.manager is not manager:
            return
        entry.leases -= 1
        if entry.leases > 0:
            return
        del self._entries[key]
        self._log.info(
            "the last user of the certificate manager for {service} released "
            "it; stopping it",
            service=manager.service,
        )
        manager.stopService()

    def managers(self) -> list[CertManager]:
        """The managers in use now."""
        return [entry.manager for entry in self._entries.values()]

    def leases(self, manager: CertManager) -> int:
        """How many unreleased leases hold ``manager`` (0 once stopped)."""
        for entry in self._entries.values():
            if entry.manager is manager:
                return entry.leases
        return 0


#: The process's registry, used by the endpoints.
cert_managers = CertManagerRegistry()


def acquire_cert_manager(
    clock: IReactorTime, client: CertificateAuthorityClient, service: str
) -> CertManagerLease:
    """
    A lease on this process's shared manager for ``service`` through
    ``client`` (see :meth:`CertManagerRegistry.acquire`); call
    ``lease.release()`` when done.
    """
    return cert_managers.acquire(clock, client, service)
