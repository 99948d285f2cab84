"""
Twisted's epoll reactor with fewer ``epoll_ctl`` calls: ``twistd --reactor
cn-epoll`` (a reactor plugin in ``twisted/plugins/connect_native_plugins.py``).

Twisted's ``EPollReactor`` makes one ``epoll_ctl`` for every
``addReader``/``addWriter``/``removeReader``/``removeWriter`` that changes
a descriptor's interest: a dialled connection is registered for writing,
then unregistered and registered again for reading when it is up; closing
it after ``loseConnection`` is another unregister, register and unregister.

:class:`CoalescingEPollReactor` keeps the same bookkeeping (``_reads``,
``_writes``, ``_selectables``: what Twisted's callers see, at once) but
only marks a changed descriptor, and sets the kernel's registration to the
net result once, just before the next ``epoll_wait``: several changes in
one reactor turn cost one ``epoll_ctl`` or none.  A descriptor closed in
that turn (its ``fileno()`` is ``-1``) is not unregistered at all: closing
it removed it from the epoll set.

Descriptor numbers are reused: the kernel registration is remembered with
the object it was made for, so a new socket that got a closed socket's
number in the same turn is registered afresh (``EPOLL_CTL_ADD``), never
modified as if it were the old one (also when the old object's
``fileno()`` still names the number after closing it, as Twisted's process
pipes do); an ``ENOENT`` or ``EEXIST`` from the kernel is answered with the
other call.  An event for a number nobody
listens to any more unregisters it.

A caveat that Twisted's reactor does not have: closing a descriptor takes
it out of the epoll set only when no other descriptor or process holds the
same open file (``dup``, a ``fork`` that has not exec'd yet).  A socket
removed and closed in one turn while so shared keeps its registration;
its events then name a number nobody listens to, and the reactor
unregisters the number if it is still open.  The terminator shares no
sockets that way (its ``--workers`` are spawned before it accepts).
"""

from __future__ import annotations

import errno
import select
from typing import Any

from twisted.internet import epollreactor, posixbase
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.python import log

__all__ = ["CoalescingEPollReactor", "install"]

EPOLLIN: int = select.EPOLLIN
EPOLLOUT: int = select.EPOLLOUT

#: Errors of an epoll_ctl on a number whose old file is gone.
_GONE = (errno.ENOENT, errno.EBADF)


class CoalescingEPollReactor(epollreactor.EPollReactor):
    """
    An ``EPollReactor`` that applies interest changes once per turn.

    :param poller: the epoll object (``register``, ``modify``,
        ``unregister``, ``poll``, ``close``); a new ``select.epoll`` by
        default.  Tests pass one that counts the calls.
    """

    def __init__(self, poller: Any = None) -> None:
        self._poller = select.epoll(1024) if poller is None else poller
        self._reads: set[int] = set()
        self._writes: set[int] = set()
        self._selectables: dict[int, Any] = {}
        #: fd -> (the object it was registered for, the mask in the kernel)
        self._registered: dict[int, tuple[Any, int]] = {}
        #: descriptors whose interest changed since the last flush
        self._dirty: set[int] = set()
        self._continuousPolling = posixbase._ContinuousPolling(self)  # type: ignore[no-untyped-call]
        posixbase.PosixReactorBase.__init__(self)

    # --- Twisted's bookkeeping, without the system calls ------------------------

    def _add(
        self,
        xer: Any,
        primary: set[int],
        other: set[int],
        selectables: dict[int, Any],
        event: int,
        antievent: int,
    ) -> None:
        fd = xer.fileno()
        if fd not in primary:
            primary.add(fd)
            selectables[fd] = xer
            self._dirty.add(fd)

    def _remove(
        self,
        xer: Any,
        primary: set[int],
        other: set[int],
        selectables: dict[int, Any],
        event: int,
        antievent: int,
    ) -> None:
        fd = xer.fileno()
        if fd == -1:
            for fd, fdes in selectables.items():  # noqa: B007
                if xer is fdes:
                    break
            else:
                return
        if fd in primary:
            primary.remove(fd)
            if fd not in other:
                del selectables[fd]
            self._dirty.add(fd)

    # --- the kernel's registration, once per turn -------------------------------

    def _flush(self) -> None:
        """Make the epoll set what ``_reads`` and ``_writes`` say."""
        dirty, self._dirty = self._dirty, set()
        for fd in dirty:
            self._apply(fd)

    def _apply(self, fd: int) -> None:
        want = (EPOLLIN if fd in self._reads else 0) | (
            EPOLLOUT if fd in self._writes else 0
        )
        selectable: Any = self._selectables.get(fd)
        had = self._registered.get(fd)
        if (
            had is not None
            and had[0] is not selectable
            and (selectable is not None or had[0].fileno() != fd)
        ):
            # Registered for an object since closed (or renumbered): closing
            # it took it out of the epoll set; the number may be a new file.
            # An object that now has the number is a new file even when the
            # old one's fileno() still names it (Twisted's process pipes keep
            # their number after closing it): it is registered afresh.
            del self._registered[fd]
            had = None
        if not want:
            if had is not None:
                del self._registered[fd]
                if had[0].fileno() == fd:
                    self._unregister(fd)
                # else: closed this turn, already out of the epoll set
            return
        if had is not None and had[1] == want:
            self._registered[fd] = (selectable, want)
            return
        if selectable.fileno() != fd:
            return  # closed without being removed: nothing to register
        try:
            if had is None:
                self._register(fd, want)
            else:
                self._modify(fd, want)
        except OSError as e:
            if e.errno != errno.EPERM:
                raise
            # epoll(7) does not take regular files: poll them continuously,
            # as Twisted's reactor does.
            self._reads.discard(fd)
            self._writes.discard(fd)
            del self._selectables[fd]
            if want & EPOLLIN:
                self._continuousPolling.addReader(selectable)  # type: ignore[no-untyped-call]
            if want & EPOLLOUT:
                self._continuousPolling.addWriter(selectable)  # type: ignore[no-untyped-call]
            return
        self._registered[fd] = (selectable, want)

    def _register(self, fd: int, mask: int) -> None:
        try:
            self._poller.register(fd, mask)
        except FileExistsError:
            self._poller.modify(fd, mask)

    def _modify(self, fd: int, mask: int) -> None:
        try:
            self._poller.modify(fd, mask)
        except FileNotFoundError:
            self._poller.register(fd, mask)

    def _unregister(self, fd: int) -> None:
        try:
            self._poller.unregister(fd)
        except OSError as e:
            if e.errno not in _GONE:
                raise

    # --- the loop -----------------------------------------------------------------

    def doPoll(self, timeout: float | None) -> None:
        """Apply this turn's changes, then wait for events and dispatch them."""
        self._flush()
        try:
            events = self._poller.poll(
                -1 if timeout is None else timeout, max(len(self._registered), 1)
            )
        except InterruptedError:
            return
        drdw = self._doReadOrWrite
        selectables = self._selectables
        call_with_logger = log.callWithLogger
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                if fd not in self._dirty and fd not in self._registered:
                    # A registration that outlived its object (see the
                    # module's caveat): stop its events.
                    self._unregister(fd)
                continue
            call_with_logger(selectable, drdw, selectable, fd, event)  # type: ignore[no-untyped-call]

    doIteration = doPoll

    def removeAll(self) -> list[IReadDescriptor | IWriteDescriptor]:
        removed: list[IReadDescriptor | IWriteDescriptor] = super().removeAll()  # type: ignore[no-untyped-call]
        self._flush()
        return removed


def install() -> None:
    """Install :class:`CoalescingEPollReactor` as Twisted's reactor."""
    from twisted.internet.main import installReactor

    installReactor(CoalescingEPollReactor())  # type: ignore[no-untyped-call]
