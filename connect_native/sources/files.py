"""
An identity from files: a certificate, its key and a CA bundle, on disk and
watched, the way ghostunnel, Vault Agent and consul-template users run.

:class:`FileIdentitySource` reads the three files when it starts and looks
at them again every ``interval`` seconds.  A change is read once the files
have stayed the same for one whole interval, so a file a writer is still
writing is never read; what it reads must then make a valid
:class:`~connect_native.certs.Bundle` (the certificate matches the key,
chains to a root in the CA bundle, is within its validity and carries one
SPIFFE service identity) or it is not used: the last good Bundle stays, and
the reason is logged once per change of the files.  Swapping is atomic: a
new connection gets either the old Bundle or the new one, whole.  Open
connections keep the certificate they started with.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from connect_native import _logging
from connect_native._deferreds import Subscribers, Waiters
from connect_native.certs import (
    Bundle,
    IIdentitySource,
    InvalidBundle,
    ManagerState,
    RootPEMs,
    StateChange,
)
from connect_native.identity import InvalidIdentity, identity_of_certificate

__all__ = ["FileIdentitySource", "IdentityFilesStopped"]

#: Seconds between two tries of unchanged files that could not be used.
RETRY_UNCHANGED = 30.0

#: What ``os.stat`` tells of one file that says it changed, or ``None``
#: when the file is missing.
_Stat = tuple[int, int, int, int] | None


class IdentityFilesStopped(CancelledError):  # noqa: N818 (like CertManagerStopped)
    """
    The :class:`FileIdentitySource` was stopped before it had a certificate
    (fired into pending :meth:`FileIdentitySource.when_ready` Deferreds).
    """

    def __init__(self, cert: str) -> None:
        super().__init__(
            f"the identity source for the files {cert} was stopped before it "
            "had a certificate"
        )
        self.cert = cert


def _stat(path: Path) -> _Stat:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def _read(path: Path, what: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidBundle(f"{what} {path}: {e.strerror or e}") from None
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidBundle(f"{what} {path}: not PEM text") from None


def _roots(pem: str, path: Path) -> list[RootPEMs]:
    try:
        certificates = x509.load_pem_x509_certificates(pem.encode("ascii"))
    except ValueError as e:
        raise InvalidBundle(f"roots {path}: no PEM certificate read ({e})") from None
    from cryptography.hazmat.primitives.serialization import Encoding

    return [
        RootPEMs(c.public_bytes(Encoding.PEM).decode("ascii")) for c in certificates
    ]


def _leaf_trust_domain(pem: str, path: Path) -> str:
    try:
        leaf = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except ValueError as e:
        raise InvalidBundle(f"cert {path}: no PEM certificate read ({e})") from None
    try:
        return identity_of_certificate(leaf).trust_domain
    except InvalidIdentity as e:
        raise InvalidBundle(f"cert {path}: {e}") from None


@implementer(IIdentitySource)
class FileIdentitySource(Service):
    """
    A service's identity from a certificate file, a key file and a CA
    bundle file, watched for changes.

    A Twisted service: ``startService`` reads the files and starts watching
    them; ``stopService`` stops and fails pending :meth:`when_ready`
    Deferreds with :class:`IdentityFilesStopped`.

    :param clock: schedules the checks; ``clock.seconds()`` is the time
        certificates are checked at.
    :param cert: the PEM certificate: the leaf, then the intermediates that
        lead to a root, if any.
    :param key: the leaf's PEM private key.
    :param roots: the PEM CA bundle: every root peers may chain to.
    :param trust_domain: the trust domain peers must be in, besides those
        the roots name in their SPIFFE URIs; by default the one of the
        certificate's own identity.
    :param interval: seconds between two looks at the files; a change is
        used after it has held for one interval.
    """

    _log = Logger(observer=_logging.observer)

    def __init__(
        self,
        clock: IReactorTime,
        *,
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        roots: str | os.PathLike[str],
        trust_domain: str | None = None,
        interval: float = 1.0,
    ) -> None:
        if not (isinstance(interval, int | float) and 0 < interval < float("inf")):
            raise ValueError(
                f"interval must be a positive number of seconds, not {interval!r}"
            )
        self.clock = clock
        self.cert = Path(cert)
        self.key = Path(key)
        self.roots = Path(roots)
        self.trust_domain = trust_domain
        self.interval = float(interval)
        self._bundle: Bundle | None = None
        self._waiters: Waiters[Bundle] = Waiters()
        self._subscribers: Subscribers[Bundle] = Subscribers(
            self._log, f"identity files {self.cert}: a Bundle subscriber"
        )
        self._state_subscribers: Subscribers[StateChange] = Subscribers(
            self._log, f"identity files {self.cert}: a state subscriber"
        )
        self._told: tuple[ManagerState, str] = (ManagerState.STOPPED, "")
        self._seen: tuple[_Stat, ...] | None = None
        self._tried: tuple[_Stat, ...] | None = None
        self._problem: str | None = None
        self._tried_at = 0.0
        self._expired_logged = False
        self._loop: LoopingCall | None = None
        self._stopped = False

    def __repr__(self) -> str:
        return f"<FileIdentitySource cert={str(self.cert)!r}>"

    # -- IIdentitySource --------------------------------------------------------

    def current(self) -> Bundle | None:
        """
        The Bundle for a new connection, or ``None``: not started, no valid
        files read yet, or the certificate has expired.
        """
        bundle = self._bundle
        if not self.running or bundle is None:
            return None
        if self.clock.seconds() >= bundle.not_after:
            return None
        return bundle

    def when_ready(self) -> Deferred[Bundle]:
        """
        Fires with a usable Bundle: at once if there is one, else once the
        files hold one.  Cancelling it only drops this waiter.
        """
        bundle = self.current()
        if bundle is not None:
            return succeed(bundle)
        if self._stopped:
            return fail(IdentityFilesStopped(str(self.cert)))
        return self._waiters.wait()

    def subscribe_bundles(
        self, callback: Callable[[Bundle], object]
    ) -> Callable[[], None]:
        """
        Call ``callback`` with each new Bundle once it is current.  An
        exception it raises is logged and ignored.

        :returns: a function that unsubscribes ``callback``.
        """
        return self._subscribers.add(callback)

    def subscribe(
        self, callback: Callable[[StateChange], object]
    ) -> Callable[[], None]:
        """
        Call ``callback`` with a :class:`~connect_native.certs.StateChange`
        whenever the state or its reason changes (as
        :meth:`CertManager.subscribe <connect_native.certs.CertManager.subscribe>`
        does, so a registration's check can follow the files).

        :returns: a function that unsubscribes ``callback``.
        """
        return self._state_subscribers.add(callback)

    def _tell(self) -> None:
        now = (self.state, self.reason)
        if now == self._told:
            return
        previous, self._told = self._told[0], now
        change = StateChange(state=now[0], reason=now[1], previous=previous)
        self._state_subscribers.tell(change)

    @property
    def state(self) -> ManagerState:
        """``STARTING`` until the files hold a certificate, then ``READY``
        (``DEGRADED`` while changed files cannot be used, ``EXPIRED`` past
        the certificate's end)."""
        if not self.running:
            return ManagerState.STOPPED
        bundle = self._bundle
        if bundle is None:
            return ManagerState.STARTING
        if self.clock.seconds() >= bundle.not_after:
            return ManagerState.EXPIRED
        return ManagerState.DEGRADED if self._problem else ManagerState.READY

    @property
    def reason(self) -> str:
        """Why the source is in its state, as a sentence."""
        bundle = self._bundle
        if bundle is None:
            return self._problem or f"reading {self.cert}"
        if self._problem:
            return f"keeping the certificate read before: {self._problem}"
        return f"serving {bundle.identity.uri} from {self.cert}"

    # -- IService -----------------------------------------------------------------

    def startService(self) -> None:
        if self.running:
            return
        super().startService()  # type: ignore[no-untyped-call]
        self._stopped = False
        self._seen = self._tried = None
        # Read at once: a process starts on the files as they are.
        self._check(first=True)
        self._loop = LoopingCall(self._check)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        if not self.running:
            return
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopped = True
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        self._waiters.fail(IdentityFilesStopped(str(self.cert)))
        self._tell()

    def reload(self) -> str:
        """
        Read the files now, without waiting for them to hold still (an
        operator's SIGHUP: they say the files are in place), and install
        what they hold if it is usable.

        :returns: one line on what is served now.
        """
        if self.running:
            self._check(first=True)
        bundle = self._bundle
        if bundle is None:
            return f"no usable certificate: {self._problem or 'not read yet'}"
        served = f"serving {bundle.identity.uri}, serial {bundle.leaf.serial_number:x}"
        if self._problem is not None:
            return f"{served} (kept: the files hold no usable one: {self._problem})"
        return served

    # -- watching -------------------------------------------------------------------

    def _stats(self) -> tuple[_Stat, ...]:
        return (_stat(self.cert), _stat(self.key), _stat(self.roots))

    def _check(self, first: bool = False) -> None:
        stats = self._stats()
        if not first:
            self._note_expiry()
            self._tell()
            if stats != self._seen:
                # Changed since the last look: wait until it holds still.
                self._seen = stats
                return
            if stats == self._tried and not self._retry_due():
                return
        self._seen = self._tried = stats
        self._tried_at = self.clock.seconds()
        try:
            bundle = self._load()
        except InvalidBundle as e:
            self._refuse(str(e))
        else:
            self._install(bundle)
        self._tell()

    def _retry_due(self) -> bool:
        # Files that could not be used are tried again now and then even
        # unchanged: a certificate that was not valid yet (a clock behind)
        # becomes valid without a write.
        return (
            self._problem is not None
            and self.clock.seconds() - self._tried_at >= RETRY_UNCHANGED
        )

    def _load(self) -> Bundle:
        leaf = _read(self.cert, "cert")
        key = _read(self.key, "key")
        roots = _roots(_read(self.roots, "roots"), self.roots)
        trust_domain = self.trust_domain
        if trust_domain is None:
            trust_domain = _leaf_trust_domain(leaf, self.cert)
        return Bundle.build(
            leaf_cert_pem=leaf,
            private_key_pem=key,
            roots=roots,
            trust_domain=trust_domain,
            now=self.clock.seconds(),
        )

    def _refuse(self, problem: str) -> None:
        again = problem == self._problem
        self._problem = problem
        if again:
            return
        if self._bundle is None:
            self._log.error(
                "identity files: no usable certificate yet: {problem}",
                problem=problem,
            )
        else:
            self._log.warn(
                "identity files: keeping the certificate read before "
                "({uri}, serial {serial:x}): the files now hold no usable one: "
                "{problem}",
                uri=self._bundle.identity.uri,
                serial=self._bundle.leaf.serial_number,
                problem=problem,
            )

    def _install(self, bundle: Bundle) -> None:
        old, self._bundle = self._bundle, bundle
        self._problem = None
        self._expired_logged = False
        if (
            old is not None
            and old.leaf == bundle.leaf
            and old.root_certificates == bundle.root_certificates
            and old.chain == bundle.chain
        ):
            return
        self._log.info(
            "identity files: serving {uri}, serial {serial:x}, valid until "
            "{until}, trusting {roots} root(s), from {cert}",
            uri=bundle.identity.uri,
            serial=bundle.leaf.serial_number,
            until=bundle.leaf.not_valid_after_utc.isoformat(),
            roots=len(bundle.roots),
            cert=str(self.cert),
        )
        self._waiters.fire(bundle)
        self._subscribers.tell(bundle)

    def _note_expiry(self) -> None:
        bundle = self._bundle
        if bundle is None or self._expired_logged:
            return
        if self.clock.seconds() >= bundle.not_after:
            self._expired_logged = True
            self._log.error(
                "identity files: the certificate {uri} in {cert} expired at "
                "{at}; refusing new connections until the files hold a valid one",
                uri=bundle.identity.uri,
                cert=str(self.cert),
                at=bundle.leaf.not_valid_after_utc.isoformat(),
            )
