"""
Fakes for the seams: authorizers, bundle sources, resolvers and service instances.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from connect_native._deferreds import Waiters
from connect_native.authorize import Decision, IAuthorizer, Peer
from connect_native.certs import Bundle, IBundleSource, RootPEMs
from connect_native.resolve import (
    ExpectedIdentity,
    Instance,
    IResolver,
)
from connect_native.resolve import StaticResolver as StaticResolver
from connect_native.testing.certificates import CertificateFactory

# An ``IAuthorizer`` whose answers a test chooses: by the peer's service
# name, at once or held until the test releases them, and optionally known
# in the TLS handshake (``decide_now``), where a denial is a TLS alert.


@implementer(IAuthorizer)
class FakeAuthorizer:
    """
    An authorizer for tests: a peer whose service name is in ``allowed`` may
    connect, any other is denied.

    :param allowed: the source service names to allow (change
        :attr:`allowed` at any time).
    :param in_handshake: if true, ``decide_now`` answers too, so a denied
        peer is refused with a TLS alert; otherwise it says "don't know yet".
    :param hold: if true, ``authorize`` returns a Deferred that fires only
        when the test calls :meth:`release` (to test what happens while the
        decision is pending, or when it never comes).

    :ivar decide_now_calls: every ``(peer, target)`` given to ``decide_now``.
    :ivar authorize_calls: every ``(peer, target)`` given to ``authorize``.
    :ivar pending: the held ``(peer, target, deferred)`` not yet released.
    :ivar cancelled: how many held Deferreds their caller cancelled.
    """

    def __init__(
        self,
        allowed: Iterable[str] = (),
        *,
        in_handshake: bool = False,
        hold: bool = False,
        source: str = "fake",
    ) -> None:
        self.allowed = set(allowed)
        self.in_handshake = in_handshake
        self.hold = hold
        self.source = source
        self.decide_now_calls: list[tuple[Peer, str]] = []
        self.authorize_calls: list[tuple[Peer, str]] = []
        self.pending: list[tuple[Peer, str, Deferred[Decision]]] = []
        self.cancelled = 0

    def decision_for(self, peer: Peer, target: str) -> Decision:
        """
        What this authorizer decides for ``peer`` reaching ``target``.
        """
        service = peer.identity.service
        if service in self.allowed:
            return Decision(True, f"{service!r} may reach {target!r}", self.source)
        return Decision(False, f"{service!r} may not reach {target!r}", self.source)

    def decide_now(self, peer: Peer, target: str) -> Decision | None:
        self.decide_now_calls.append((peer, target))
        if not self.in_handshake:
            return None
        return self.decision_for(peer, target)

    def authorize(self, peer: Peer, target: str) -> Deferred[Decision]:
        self.authorize_calls.append((peer, target))
        if not self.hold:
            return succeed(self.decision_for(peer, target))
        entry: tuple[Peer, str, Deferred[Decision]]

        def cancel(d: Deferred[Decision]) -> None:
            self.cancelled += 1
            if entry in self.pending:
                self.pending.remove(entry)

        held: Deferred[Decision] = Deferred(cancel)
        entry = (peer, target, held)
        self.pending.append(entry)
        return held

    def release(self, decision: Decision | None = None) -> int:
        """
        Answer every held call: with ``decision`` if given, otherwise with
        :meth:`decision_for`.  Returns how many were answered.
        """
        pending, self.pending = self.pending, []
        for peer, target, held in pending:
            held.callback(
                decision if decision is not None else self.decision_for(peer, target)
            )
        return len(pending)


# --- Bundle sources ---
#
# An ``IBundleSource`` a test drives by hand, for endpoints and TLS tests that
# need certificates without a CertManager and an agent.


def make_bundle(
    factory: CertificateFactory,
    service: str,
    *,
    now: float | None = None,
    extra_roots: Sequence[CertificateFactory] = (),
) -> Bundle:
    """
    A :class:`~connect_native.certs.Bundle` for ``service`` with a good leaf
    from ``factory``, trusting ``factory``'s root (and those of
    ``extra_roots``), checked at ``now`` (default: the wall clock).
    """
    leaf = factory.leaf(service)
    # The leaf's chain carries any intermediates; only roots are anchors.
    roots = [RootPEMs(f.root_pem) for f in (factory, *extra_roots)]
    return Bundle.build(
        leaf_cert_pem=leaf.chain_pem,
        private_key_pem=leaf.key_pem,
        roots=roots,
        trust_domain=factory.trust_domain,
        now=time.time() if now is None else now,
    )


@implementer(IBundleSource)
class FakeBundleSource:
    """
    A bundle source for tests: :meth:`current` is whatever the test last
    :meth:`set` (``None`` to act as not ready or expired), and
    :meth:`when_ready` waits for the next :meth:`set` or fails on
    :meth:`fail`.

    :ivar current_calls: how many times :meth:`current` was asked (once per
        new connection, for an endpoint).
    """

    def __init__(self, bundle: Bundle | None = None) -> None:
        self._bundle = bundle
        self._waiters: Waiters[Bundle] = Waiters()
        self._subscribers: list[Callable[[Bundle], object]] = []
        self.current_calls = 0

    def subscribe_bundles(
        self, callback: Callable[[Bundle], object]
    ) -> Callable[[], None]:
        """
        Call ``callback`` with each Bundle :meth:`set` (as
        :meth:`connect_native.certs.CertManager.subscribe_bundles` does);
        returns the function that unsubscribes it.
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def current(self) -> Bundle | None:
        self.current_calls += 1
        return self._bundle

    def when_ready(self) -> Deferred[Bundle]:
        if self._bundle is not None:
            return succeed(self._bundle)
        return self._waiters.wait()

    def set(self, bundle: Bundle | None) -> None:
        """
        Make ``bundle`` current; a Bundle also fires pending waiters, then
        tells the subscribers.
        """
        self._bundle = bundle
        if bundle is not None:
            self._waiters.fire(bundle)
            for callback in list(self._subscribers):
                callback(bundle)

    def fail(self, error: Exception) -> None:
        """Fail pending waiters with ``error`` (e.g. ``LeafPermissionDenied``)."""
        self._waiters.fail(error)


# --- Resolvers and fake instances ---
#
# What a test of a Connect client needs: a resolver it controls, and a fake
# running instance of a service that accepts, refuses or stalls the
# connection a ``ConnectClientEndpoint`` makes on a ``MemoryReactor``, with
# real TLS in memory (``twisted.test.iosim``).


# The static resolver, for tests that need fixed instances.


def fake_instance(
    service: str,
    *,
    address: str = "10.0.0.1",
    port: int = 8443,
    datacenter: str = "dc1",
    namespace: str = "default",
    partition: str | None = None,
    trust_domain: str | None = None,
    node: str = "node1",
    instance_id: str = "",
) -> Instance:
    """
    An :class:`~connect_native.resolve.Instance` of ``service``, expecting
    its identity in any trusted trust domain (or ``trust_domain``).
    """
    return Instance(
        address=address,
        port=port,
        identity=ExpectedIdentity(
            service=service,
            datacenter=datacenter,
            namespace=namespace,
            partition=partition,
            trust_domain=trust_domain,
        ),
        node=node,
        instance_id=instance_id or f"{service}-{port}",
    )


@implementer(IResolver)
class FakeResolver:
    """
    A resolver a test drives: :meth:`resolve` answers :attr:`instances` at
    once, or, with ``hold=True``, only when the test calls :meth:`release`;
    :meth:`fail` fails the held (and later) calls.

    :ivar calls: how many times :meth:`resolve` was called.
    """

    description = "fake resolver"

    def __init__(self, instances: Sequence[Instance] = (), *, hold: bool = False):
        self.instances = tuple(instances)
        self.hold = hold
        self.calls = 0
        self.error: Exception | None = None
        self._held: Waiters[Sequence[Instance]] = Waiters()

    def resolve(self) -> Deferred[Sequence[Instance]]:
        self.calls += 1
        if self.error is not None:
            failed: Deferred[Sequence[Instance]] = Deferred()
            failed.errback(self.error)
            return failed
        if not self.hold:
            return succeed(self.instances)
        return self._held.wait()

    def release(self) -> int:
        """Answer the held calls; returns how many there were."""
        held = len(self._held)
        self._held.fire(self.instances)
        return held

    def fail(self, error: Exception) -> None:
        """Fail the held calls, and every later one, with ``error``."""
        self.error = error
        self._held.fail(error)


class RecordingProtocol(Protocol):
    """
    The default application of a :class:`FakeServiceInstance`: records what
    it receives, and whether and why the connection was lost.
    """

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason


def _iosim() -> Any:
    # Twisted's in-memory connections (untyped; a test helper module).
    from twisted.test import iosim

    return iosim


class _SwallowAll(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


class FakeServiceInstance:
    """
    A running instance of a Connect service, in memory: its
    :class:`~connect_native.resolve.Instance` record, and a Connect TLS server
    presenting ``bundle``'s certificate (any client whose certificate
    verifies is accepted) to take the connections a client makes on a
    ``twisted.internet.testing.MemoryReactor``.

    :param bundle: the server's certificates (:func:`make_bundle`); the
        instance's expected identity is its service, namespace, datacenter
        and partition (what a resolver would expect there, which a test may
        override with ``identity``).
    :param app_factory: the server application (default: a factory of
        :class:`RecordingProtocol`, each kept in :attr:`protocols`).
    :param alpn_protocols: the ALPN protocols the server speaks.

    :ivar protocols: the server application protocols built, in order.
    """

    def __init__(
        self,
        bundle: Bundle,
        app_factory: IProtocolFactory | None = None,
        *,
        address: str = "10.0.0.1",
        port: int = 8443,
        node: str = "node1",
        identity: ExpectedIdentity | None = None,
        alpn_protocols: Sequence[bytes] = (),
    ) -> None:
        from connect_native.tls import ServerConnectionCreator

        served = bundle.identity
        if identity is None:
            identity = ExpectedIdentity(
                service=served.service,
                datacenter=served.datacenter,
                namespace=served.namespace,
                partition=served.partition,
            )
        self.instance = Instance(
            address, port, identity, node=node, instance_id=f"{served.service}-{port}"
        )
        self.bundle = bundle
        self.protocols: list[Protocol] = []
        if app_factory is None:
            app_factory = Factory.forProtocol(self._record)
        self.app_factory = app_factory
        self.creator = ServerConnectionCreator(bundle, alpn_protocols=alpn_protocols)

    def _record(self) -> Protocol:
        protocol = RecordingProtocol()
        self.protocols.append(protocol)
        return protocol

    def _pending(self, reactor: Any) -> tuple[int, Any]:
        """
        The oldest connection attempt to this instance not yet answered.
        """
        handled: set[int] = reactor.__dict__.setdefault(
            "_fake_instances_handled", set()
        )
        for index, (host, port, factory, _t, _b) in enumerate(reactor.tcpClients):
            if (host, port) == (self.instance.address, self.instance.port):
                if index not in handled:
                    handled.add(index)
                    return index, factory
        raise AssertionError(
            f"no pending connection to {self.instance.address}:"
            f"{self.instance.port} on the MemoryReactor"
        )

    def accept(self, reactor: Any, clock: Any) -> Any:
        """
        Accept the pending connection to this instance and run the TLS
        handshake in memory; returns the ``IOPump`` (pump it to move more
        bytes).  ``clock`` is the TLS factories' clock (a ``Clock``, which a
        ``MemoryReactorClock`` is).
        """
        from twisted.protocols.tls import TLSMemoryBIOFactory

        iosim = _iosim()

        _, client_factory = self._pending(reactor)
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        server_factory = TLSMemoryBIOFactory(
            self.creator, False, self.app_factory, clock=clock
        )
        server = server_factory.buildProtocol(address)
        client = client_factory.buildProtocol(
            IPv4Address("TCP", self.instance.address, self.instance.port)
        )
        return iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            clock=clock,
        )

    def accept_and_stall(self, reactor: Any, clock: Any) -> Any:
        """
        Accept the pending connection's TCP but never answer the TLS
        handshake (a server that hangs, or is not TLS).
        """
        iosim = _iosim()
        _, client_factory = self._pending(reactor)
        server = _SwallowAll()
        client = client_factory.buildProtocol(
            IPv4Address("TCP", self.instance.address, self.instance.port)
        )
        return iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            clock=clock,
        )

    def refuse(self, reactor: Any) -> None:
        """
        Refuse the pending connection to this instance (nothing listens).
        """
        index, client_factory = self._pending(reactor)
        failure: Any = Failure
        refused: Any = ConnectionRefusedError
        client_factory.clientConnectionFailed(
            reactor.connectors[index], failure(refused())
        )
