"""
A deny reaches open connections: :class:`OpenConnections` keeps the
connections a :class:`~connect_native.server.ConnectServerEndpoint` let
through, and when the intentions or the trusted roots change it decides
each one again and closes those now refused.

The authorizer says when its decisions may have changed by providing
:class:`~connect_native.authorize.INotifiesChanges`; the certificate source
by a ``subscribe_bundles`` method (:class:`~connect_native.certs.CertManager`'s).
A roots change first checks that the peer's certificate still chains to a
current root whose trust domain it names; then, as for an intentions
change, ``authorize()`` decides, bounded by the endpoint's authorization
timeout.  Whatever is not an allowance closes the connection (fail closed):
a denial, an error, no answer in time.  Each closing is logged with the
peer, its address and the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from attrs import define
from OpenSSL import SSL, crypto
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from connect_native import _logging
from connect_native.authorize import Decision, IAuthorizer, INotifiesChanges, Peer
from connect_native.certs import Bundle, TrustedRoot, verify_to_roots
from connect_native.tls import verified_peer

__all__ = ["INTENTIONS_CHANGED", "ROOTS_CHANGED", "OpenConnections"]

log = Logger(observer=_logging.observer)

#: Why a re-check runs, as the closing's log line ends.
INTENTIONS_CHANGED = "intentions changed"
ROOTS_CHANGED = "trusted roots changed"

#: The fewest connections kept before closed ones are swept out.
_SWEEP_AT_LEAST = 64


class _BundleSubscribable(Protocol):
    def subscribe_bundles(
        self, callback: Callable[[Bundle], object]
    ) -> Callable[[], None]: ...


@define(eq=False)
class _Open:
    """One connection the gate let through."""

    peer: Peer
    transport: Any
    address: IAddress | None
    pending: Deferred[Decision] | None = None
    timer: IDelayedCall | None = None

    @property
    def open(self) -> bool:
        transport = self.transport
        return bool(getattr(transport, "connected", False)) and not getattr(
            transport, "_aborted", False
        )

    def settle(self) -> None:
        """Forget the re-check in progress (its answer is then ignored)."""
        pending, self.pending = self.pending, None
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if pending is not None:
            pending.cancel()


def _peer_chain(transport: Any) -> list[crypto.X509]:
    """The intermediates the peer sent (on a server: without its leaf)."""
    handle = transport.getHandle()
    if not isinstance(handle, SSL.Connection):
        return []
    return list(handle.get_peer_cert_chain() or [])


class OpenConnections:
    """
    The authorized, open connections of one listening endpoint.

    :param clock: bounds each re-check.
    :param authorizer: asked again for every connection after a change.
    :param target: the service being served.
    :param timeout: seconds each re-check may take before it counts as a
        denial.
    :param decides_each_request: the application decides each HTTP request
        (``protect()``): a connection-level denial by an L7 intention keeps
        the connection, as the gate does.
    """

    def __init__(
        self,
        clock: IReactorTime,
        authorizer: IAuthorizer,
        target: str,
        timeout: float,
        *,
        decides_each_request: bool = False,
    ) -> None:
        self._clock = clock
        self._authorizer = authorizer
        self.target = target
        self.timeout = timeout
        self.decides_each_request = decides_each_request
        self._open: dict[int, _Open] = {}
        self._sweep_at = _SWEEP_AT_LEAST
        self._roots: tuple[TrustedRoot, ...] | None = None
        #: Moves on with every change; a connection authorized across one
        #: is decided again as it is let through.
        self.generation = 0

    def __len__(self) -> int:
        return sum(1 for each in self._open.values() if each.open)

    # -- following changes --------------------------------------------------

    def follow(self, source: object) -> Callable[[], None]:
        """
        Subscribe to the authorizer's changes (when it provides
        :class:`~connect_native.authorize.INotifiesChanges`) and to the
        certificate source's new Bundles (when it has ``subscribe_bundles``).

        :returns: the function that unsubscribes both.
        """
        stops: list[Callable[[], None]] = []
        if INotifiesChanges.providedBy(self._authorizer):
            stops.append(
                self._authorizer.subscribe(lambda: self.changed(INTENTIONS_CHANGED))
            )
        subscribe = getattr(source, "subscribe_bundles", None)
        current = getattr(source, "current", None)
        if callable(subscribe) and callable(current):
            bundle = current()
            self._roots = bundle.roots if isinstance(bundle, Bundle) else None
            subscribable: _BundleSubscribable = source  # type: ignore[assignment]
            stops.append(subscribable.subscribe_bundles(self._source_changed))

        def unfollow() -> None:
            while stops:
                stops.pop()()

        return unfollow

    def _source_changed(self, bundle: object) -> None:
        if not isinstance(bundle, Bundle) or bundle.roots == self._roots:
            return
        first = self._roots is None
        self._roots = bundle.roots
        if not first:
            self.changed(ROOTS_CHANGED, bundle)

    # -- the connections ----------------------------------------------------

    def add(
        self,
        peer: Peer,
        transport: Any,
        address: IAddress | None,
        since: int | None = None,
    ) -> None:
        """
        Keep ``transport`` (the TLS transport the application got) until it
        closes.  ``since`` is the :attr:`generation` its authorization began
        in: if a change came meanwhile, it is decided again at once.
        """
        entry = _Open(peer, transport, address)
        self._open[id(transport)] = entry
        if len(self._open) >= self._sweep_at:
            self._sweep()
        if since is not None and since != self.generation:
            self._recheck(entry, INTENTIONS_CHANGED, None)

    def _sweep(self) -> None:
        for key, entry in list(self._open.items()):
            if not entry.open:
                entry.settle()
                del self._open[key]
        self._sweep_at = max(_SWEEP_AT_LEAST, 2 * len(self._open))

    def changed(self, why: str, bundle: Bundle | None = None) -> None:
        """
        Decide every open connection again (``bundle``: with its roots
        too), and close those now refused; ``why`` ends the log lines.
        """
        self.generation += 1
        self._sweep()
        if not self._open:
            return
        log.info(
            "Connect {target}: {why}: deciding {count} open connection(s) again",
            target=self.target,
            why=why,
            count=len(self._open),
        )
        for entry in list(self._open.values()):
            self._recheck(entry, why, bundle)

    def _recheck(self, entry: _Open, why: str, bundle: Bundle | None) -> None:
        entry.settle()
        if bundle is not None:
            untrusted = self._untrusted(entry, bundle)
            if untrusted is not None:
                self._close(entry, Decision.deny(untrusted, "roots"), why)
                return
        try:
            pending = self._authorizer.authorize(entry.peer, self.target)
        except Exception as e:
            log.failure("the authorizer raised while deciding an open connection")
            self._close(entry, Decision.deny(f"the authorizer failed: {e}"), why)
            return
        if not isinstance(pending, Deferred):
            self._close(
                entry,
                Decision.deny(
                    f"the authorizer returned {type(pending).__name__}, not a Deferred"
                ),
                why,
            )
            return
        entry.pending = pending
        entry.timer = self._clock.callLater(
            self.timeout, self._timed_out, entry, pending, why
        )
        pending.addCallbacks(
            self._answered,
            self._failed,
            callbackArgs=(entry, pending, why),
            errbackArgs=(entry, pending, why),
        )

    def _timed_out(self, entry: _Open, pending: Deferred[Decision], why: str) -> None:
        if entry.pending is not pending:
            return
        entry.timer = None
        entry.settle()
        # An authorizer whose Deferred ignores the cancellation still denies.
        self._close(
            entry,
            Decision.deny(
                f"the authorizer did not answer within {self.timeout:g}s", "timeout"
            ),
            why,
        )

    def _failed(
        self, failure: Failure, entry: _Open, pending: Deferred[Decision], why: str
    ) -> None:
        if entry.pending is not pending:
            return  # settled (and cancelled): a newer re-check, a timeout
        self._answered(
            Decision.deny(f"the authorizer failed: {failure.getErrorMessage()}"),
            entry,
            pending,
            why,
        )

    def _answered(
        self, decision: object, entry: _Open, pending: Deferred[Decision], why: str
    ) -> None:
        if entry.pending is not pending:
            return
        entry.pending = None
        entry.settle()
        if not isinstance(decision, Decision):
            decision = Decision.deny(
                f"the authorizer answered {type(decision).__name__}, not a Decision"
            )
        if decision.allowed or (decision.per_request and self.decides_each_request):
            log.debug(
                "Connect {target}: {peer} from {address} still allowed ({why})",
                target=self.target,
                peer=entry.peer.uri,
                address=str(entry.address),
                why=why,
            )
            return
        self._close(entry, decision, why)

    def _untrusted(self, entry: _Open, bundle: Bundle) -> str | None:
        """Why the peer's certificate is no longer trusted, or ``None``."""
        identity = entry.peer.identity
        if identity.trust_domain not in bundle.trust_domains:
            return (
                f"its identity is in trust domain {identity.trust_domain!r}, which "
                f"no current root carries (roots carry "
                f"{', '.join(sorted(bundle.trust_domains))})"
            )
        try:
            verified = verified_peer(entry.transport)
            if verified is None:
                return "its verified certificate is no longer known"
            leaf = verified.certificate
            chain = [c.to_cryptography() for c in _peer_chain(entry.transport)]
            verify_to_roots(leaf, chain, bundle.roots, self._clock.seconds())
        except crypto.X509StoreContextError as e:
            return (
                f"its certificate chain does not verify against the current roots: {e}"
            )
        except Exception as e:
            return f"its certificate could not be checked against the new roots: {e}"
        return None

    def _close(self, entry: _Open, decision: Decision, why: str) -> None:
        self._open.pop(id(entry.transport), None)
        if not entry.open:
            return
        log.warn(
            "Connect {target}: closed {peer} from {address}: {reason} ({why})",
            peer=entry.peer.uri,
            serial=entry.peer.serial,
            target=self.target,
            address=str(entry.address) if entry.address is not None else "?",
            reason=decision.reason,
            source=decision.source,
            allowed=False,
            decision="closed",
            why=why,
        )
        entry.transport.abortConnection()
