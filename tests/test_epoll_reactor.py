"""
``connect_native.epollreactor``: the interest changes of one reactor turn
reach the kernel as one ``epoll_ctl`` per descriptor (or none), counted on
a fake epoll object that behaves as the kernel does (``ENOENT``,
``EEXIST``, a closed file leaves the set), and on a real epoll with real
sockets for a reused descriptor number.  Twisted's own ``EPollReactor``
makes more calls for each of these sequences; the counts pin ours.

The plugin (``twistd --reactor cn-epoll``) is found, and a whole process
runs on it.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.application.reactors import getReactorTypes

from connect_native.epollreactor import CoalescingEPollReactor
from tests.processes import reactor_after_install

IN, OUT = select.EPOLLIN, select.EPOLLOUT


class Kernel:
    """Open files by descriptor number: closing one drops it from every set."""

    def __init__(self) -> None:
        self.open: set[int] = set()
        self.pollers: list[FakeEpoll] = []

    def close(self, fd: int) -> None:
        self.open.discard(fd)
        for poller in self.pollers:
            poller.registered.pop(fd, None)


class FakeEpoll:
    """An epoll object that records each epoll_ctl and keeps the kernel's rules."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        kernel.pollers.append(self)
        self.registered: dict[int, int] = {}
        self.calls: list[tuple[str, int, int]] = []
        self.events: list[tuple[int, int]] = []
        self.refuse = errno.EPERM
        self.regular_files: set[int] = set()

    def _check_open(self, fd: int) -> None:
        if fd not in self.kernel.open:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    def register(self, fd: int, mask: int) -> None:
        self.calls.append(("add", fd, mask))
        self._check_open(fd)
        if fd in self.regular_files:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
        if fd in self.registered:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
        self.registered[fd] = mask

    def modify(self, fd: int, mask: int) -> None:
        self.calls.append(("mod", fd, mask))
        self._check_open(fd)
        if fd not in self.registered:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        self.registered[fd] = mask

    def unregister(self, fd: int) -> None:
        self.calls.append(("del", fd, 0))
        self._check_open(fd)
        if fd not in self.registered:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        del self.registered[fd]

    def poll(self, timeout: float, maxevents: int) -> list[tuple[int, int]]:
        events, self.events = self.events, []
        return events

    def close(self) -> None:
        pass

    def fileno(self) -> int:
        return -1

    def take(self) -> list[tuple[str, int, int]]:
        calls, self.calls = self.calls, []
        return calls


class Selectable:
    """A descriptor: ``fileno()`` is -1 once closed, as Twisted's are."""

    def __init__(self, kernel: Kernel, fd: int) -> None:
        self.kernel = kernel
        self.fd = fd
        kernel.open.add(fd)
        self.reads = 0
        self.writes = 0

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        self.kernel.close(self.fd)
        self.fd = -1

    def doRead(self) -> None:
        self.reads += 1

    def doWrite(self) -> None:
        self.writes += 1

    def logPrefix(self) -> str:
        return "Selectable"

    def connectionLost(self, reason: object) -> None:
        pass


@pytest.fixture
def kernel() -> Kernel:
    return Kernel()


@pytest.fixture
def reactor(kernel: Kernel) -> Iterator[CoalescingEPollReactor]:
    poller = FakeEpoll(kernel)
    made = CoalescingEPollReactor(poller)
    kernel.open.add(made.waker.fileno())
    turn(made)  # the waker's registration
    poller.take()
    yield made
    for fd in (made.waker.i, made.waker.o):
        os.close(fd)


def poller_of(reactor: CoalescingEPollReactor) -> FakeEpoll:
    poller: FakeEpoll = reactor._poller
    return poller


def turn(reactor: CoalescingEPollReactor) -> None:
    reactor.doPoll(0)


def test_reader_and_writer_added_in_one_turn_are_one_add(
    reactor: CoalescingEPollReactor, kernel: Kernel
) -> None:
    s = Selectable(kernel, 1010)
    reactor.addReader(s)
    reactor.addWriter(s)
    assert poller_of(reactor).take() == []  # nothing before the turn ends
    turn(reactor)
    assert poller_of(reactor).take() == [("add", 1010, IN | OUT)]
    assert poller_of(reactor).registered[1010] == IN | OUT


def test_a_dial_connected_is_one_modify_from_write_to_read(
    reactor: CoalescingEPollReactor, kernel: Kernel
) -> None:
    s = Selectable(kernel, 1011)
    reactor.addWriter(s)  # connect() in progress
    turn(reactor)
    reactor.removeWriter(s)  # connected: Twisted's DEL then ADD
    reactor.addReader(s)
    turn(reactor)
    assert poller_of(reactor).take() == [("add", 1011, OUT), ("mod", 1011, IN)]


def test_lose_connection_then_close_is_one_modify_and_no_delete(
    reactor: CoalescingEPollReactor, kernel: Kernel
) -> None:
    s = Selectable(kernel, 1012)
    reactor.addReader(s)
    turn(reactor)
    reactor.removeReader(s)  # loseConnection: stopReading, startWriting
    reactor.addWriter(s)
    turn(reactor)
    reactor.removeWriter(s)  # the flush is done: connectionLost, then close
    s.close()
    turn(reactor)
    assert poller_of(reactor).take() == [("add", 1012, IN), ("mod", 1012, OUT)]
    assert 1012 not in poller_of(reactor).registered
    assert s not in reactor.getReaders() + reactor.getWriters()


def test_removed_but_still_open_is_unregistered_once(
    reactor: CoalescingEPollReactor, kernel: Kernel
) -> None:
    s = Selectable(kernel, 1013)
    reactor.addReader(s)
    turn(reactor)
    reactor.removeReader(s)
    turn(reactor)
    turn(reactor)
    assert poller_of(reactor).take() == [("add", 1013, IN), ("del", 1013, 0)]
    assert poller_of(reactor).registered.get(1013) is None


def test_added_and_removed_in_one_turn_costs_nothing(
    reactor: CoalescingEPollReactor, kernel: Kernel
) -> None:
    s = Selectable(kernel, 1014)
    reactor.addReader(s)
    reactor.addWriter(s)
    reactor.removeWriter(s)
    reactor.removeReader(s)
    turn(reactor)
    assert poller_of(reactor).take() == []


def test_readers_and_writers_are_seen_at_once(
    reactor: CoalescingEPollReactor, kernel: Kernel
) -> None:
    s = Selectable(kernel, 1015)
    reactor.addReader(s)
    assert s in reactor.getReaders()
    reactor.addWriter(s)
    reactor.removeReader(s)
    assert s not in reactor.getReaders()
    assert s in reactor.getWriters()


def test_a_number_reused_in_the_same_turn_is_added_for_the_new_file(
    reactor: CoalescingEPollReactor, kernel: Kernel
) -> None:
    old = Selectable(kernel, 1016)
    reactor.addReader(old)
    turn(reactor)
    reactor.removeReader(old)
    old.close()
    new = Selectable(kernel, 1016)  # accept() got the same number
    reactor.addReader(new)
    turn(reactor)
    assert poller_of(reactor).take() == [("add", 1016, IN), ("add", 1016, IN)]
    poller_of(reactor).events = [(1016, IN)]
    turn(reactor)
    assert (old.reads, new.reads) == (0, 1)


def test_a_number_reused_with_another_mask_is_added_not_modified(
    reactor: CoalescingEPollReactor, kernel: Kernel
) -> None:
    old = Selectable(kernel, 1017)
    reactor.addReader(old)
    turn(reactor)
    reactor.removeReader(old)
    old.close()
    new = Selectable(kernel, 1017)  # connect() got the same number
    reactor.addWriter(new)
    turn(reactor)
    assert poller_of(reactor).take() == [("add", 1017, IN), ("add", 1017, OUT)]
    assert poller_of(reactor).registered[1017] == OUT


def test_a_file_closed_without_removal_and_reused_is_still_registered(
    reactor: CoalescingEPollReactor, kernel: Kernel
) -> None:
    # The old object still claims the number (its fileno() is not -1), but
    # another object has it now: a new file, added, not modified.
    old = Selectable(kernel, 1018)
    reactor.addReader(old)
    turn(reactor)
    kernel.close(1018)  # closed behind the reactor's back
    kernel.open.add(1018)  # and the number reused
    reactor.removeReader(old)
    new = Selectable(kernel, 1018)
    reactor.addWriter(new)
    turn(reactor)
    assert poller_of(reactor).take() == [("add", 1018, IN), ("add", 1018, OUT)]
    assert poller_of(reactor).registered[1018] == OUT


class StaleSelectable(Selectable):
    """
    A descriptor whose ``fileno()`` still names its number once closed, as
    Twisted's process pipes (``ProcessReader``, ``ProcessWriter``) do.
    """

    def close(self) -> None:
        self.kernel.close(self.fd)


def test_a_number_reused_with_the_same_mask_after_a_stale_fileno_is_added(
    reactor: CoalescingEPollReactor, kernel: Kernel
) -> None:
    # One process's stdout pipe ends, the next process's gets its number,
    # both read: the old registration went with the old file, so the new
    # one is an ADD (with no call at all the new pipe would never be read).
    old = StaleSelectable(kernel, 1019)
    reactor.addReader(old)
    turn(reactor)
    reactor.removeReader(old)
    old.close()
    new = Selectable(kernel, 1019)
    reactor.addReader(new)
    turn(reactor)
    assert poller_of(reactor).take() == [("add", 1019, IN), ("add", 1019, IN)]
    assert poller_of(reactor).registered[1019] == IN
    poller_of(reactor).events = [(1019, IN)]
    turn(reactor)
    assert (old.reads, new.reads) == (0, 1)


def test_a_stale_fileno_removed_alone_is_still_unregistered(
    reactor: CoalescingEPollReactor, kernel: Kernel
) -> None:
    # Removed without a successor: the number is unregistered as before.
    old = StaleSelectable(kernel, 1020)
    reactor.addReader(old)
    turn(reactor)
    reactor.removeReader(old)
    turn(reactor)
    assert poller_of(reactor).take() == [("add", 1020, IN), ("del", 1020, 0)]
    assert 1020 not in poller_of(reactor).registered


def test_a_regular_file_is_polled_continuously(
    reactor: CoalescingEPollReactor, kernel: Kernel
) -> None:
    s = Selectable(kernel, 1019)
    poller_of(reactor).regular_files.add(1019)
    reactor.addReader(s)
    turn(reactor)
    assert reactor._continuousPolling.isReading(s)
    assert s in reactor.getReaders()
    reactor.removeReader(s)
    assert s not in reactor.getReaders()
    reactor._continuousPolling.removeAll()


def test_an_event_nobody_listens_to_unregisters_its_number(
    reactor: CoalescingEPollReactor, kernel: Kernel
) -> None:
    kernel.open.add(1020)
    poller_of(reactor).registered[1020] = IN  # a registration that outlived its file
    poller_of(reactor).events = [(1020, IN)]
    turn(reactor)
    assert poller_of(reactor).take() == [("del", 1020, 0)]
    assert 1020 not in poller_of(reactor).registered


def test_remove_all_leaves_the_epoll_set_empty(
    reactor: CoalescingEPollReactor, kernel: Kernel
) -> None:
    a, b = Selectable(kernel, 1021), Selectable(kernel, 1022)
    reactor.addReader(a)
    reactor.addWriter(b)
    turn(reactor)
    removed = reactor.removeAll()
    assert {a, b} <= set(removed)
    assert set(poller_of(reactor).registered) & {1021, 1022} == set()


# --- a real epoll and real sockets -------------------------------------------------


class CountingEpoll:
    """select.epoll, each epoll_ctl counted."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.ctl = 0

    def register(self, fd: int, mask: int) -> None:
        self.ctl += 1
        self.epoll.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self.ctl += 1
        self.epoll.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        self.ctl += 1
        self.epoll.unregister(fd)

    def poll(self, timeout: float, maxevents: int) -> Any:
        return self.epoll.poll(timeout, maxevents)

    def close(self) -> None:
        self.epoll.close()

    def fileno(self) -> int:
        return self.epoll.fileno()


class SocketReader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.got = b""

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        self.sock.close()
        self.fd = -1

    def doRead(self) -> None:
        self.got += self.sock.recv(100)

    def doWrite(self) -> None:
        pass

    def logPrefix(self) -> str:
        return "SocketReader"

    def connectionLost(self, reason: object) -> None:
        pass


def test_real_epoll_a_reused_number_gets_the_new_sockets_events() -> None:
    poller = CountingEpoll()
    reactor = CoalescingEPollReactor(poller)
    try:
        turn(reactor)
        first_a, first_b = socket.socketpair()
        old = SocketReader(first_a)
        reactor.addReader(old)
        turn(reactor)
        before = poller.ctl
        reactor.removeReader(old)
        number = old.fd
        old.close()
        second_a, second_b = socket.socketpair()
        assert second_a.fileno() == number  # the lowest free number, reused
        new = SocketReader(second_a)
        reactor.addReader(new)
        second_b.send(b"hello")
        turn(reactor)
        assert poller.ctl - before == 1  # one ADD for the new file, no DEL
        assert new.got == b"hello"
        for s in (first_b, second_a, second_b):
            s.close()
    finally:
        reactor._poller.close()
        for fd in (reactor.waker.i, reactor.waker.o):
            os.close(fd)


class PipeReader:
    """A pipe's read end that, like Twisted's ``ProcessReader``, keeps its
    number in ``fileno()`` after closing it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.got = b""

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        self.got += os.read(self.fd, 100)

    def doWrite(self) -> None:
        pass

    def logPrefix(self) -> str:
        return "PipeReader"

    def connectionLost(self, reason: object) -> None:
        pass


def test_real_epoll_a_pipe_number_reused_in_one_turn_gets_the_new_pipes_events() -> (
    None
):
    # What spawnProcess does when one child's pipes close and the next
    # child's get their numbers in the same reactor turn.
    reactor = CoalescingEPollReactor()
    try:
        turn(reactor)
        first_r, first_w = os.pipe()
        old = PipeReader(first_r)
        reactor.addReader(old)
        turn(reactor)
        reactor.removeReader(old)
        os.close(first_r)
        os.close(first_w)
        second_r, second_w = os.pipe()
        assert second_r == first_r  # the lowest free number, reused
        new = PipeReader(second_r)
        reactor.addReader(new)
        os.write(second_w, b"hello")
        turn(reactor)
        assert new.got == b"hello"
        os.close(second_r)
        os.close(second_w)
    finally:
        reactor._poller.close()
        for fd in (reactor.waker.i, reactor.waker.o):
            os.close(fd)


# --- the plugin --------------------------------------------------------------------


def test_the_reactor_plugin_is_found() -> None:
    found = {r.shortName: r for r in getReactorTypes()}
    assert found["cn-epoll"].moduleName == "connect_native.epollreactor"


def test_install_runs_a_process_on_it() -> None:
    assert reactor_after_install("epollreactor", "type(reactor).__name__") == [
        "CoalescingEPollReactor"
    ]
