"""
The package's one reference-counted sharing: :class:`Leases`, things shared
per key, made and started by the first acquire, stopped by the last
release, made afresh by an acquire after that; a :class:`Lease` is one
holder's, and releasing it twice does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Lease", "Leases"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Lease(Generic[V]):
    """
    One holder's share of ``value``: :meth:`release` gives it back once,
    whatever number of times it is called.
    """

    def __init__(self, value: V, give_back: Callable[[], None]) -> None:
        self.value = value
        self._give_back = give_back
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the share back; calling it again does nothing."""
        if self._released:
            return
        self._released = True
        self._give_back()


class _Entry(Generic[V]):
    def __init__(self, value: V, keep: object) -> None:
        self.value = value
        # Whatever must stay alive while the key names it (a key holding an
        # object's id).
        self.keep = keep
        self.count = 0


class Leases(Generic[K, V]):
    """
    The values shared per key, each counted.

    :param start: called with the key and a value just made by the first
        :meth:`take` of its key; if it raises, the value is dropped and the
        error raised.
    :param stop: called with the key and the value once the last share is
        given back (after it is dropped: an acquire from ``stop`` makes a
        fresh one).
    """

    def __init__(
        self,
        start: Callable[[K, V], object] = lambda key, value: None,
        stop: Callable[[K, V], object] = lambda key, value: None,
    ) -> None:
        self._start = start
        self._stop = stop
        self._entries: dict[K, _Entry[V]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def acquire(
        self, key: K, make: Callable[[], V], *, keep: object = None
    ) -> Lease[V]:
        """A :class:`Lease` on :meth:`take`'s value."""
        value = self.take(key, make, keep=keep)
        return Lease(value, lambda: self.give_back(key, value))

    def take(self, key: K, make: Callable[[], V], *, keep: object = None) -> V:
        """
        One more share of the value for ``key``: the one in use, else
        ``make()``, started.  Each take is given back by one
        :meth:`give_back`.
        """
        entry = self._entries.get(key)
        if entry is None:
            entry = _Entry(make(), keep)
            self._entries[key] = entry
            try:
                self._start(key, entry.value)
            except BaseException:
                if self._entries.get(key) is entry:
                    del self._entries[key]
                raise
        entry.count += 1
        return entry.value

    def give_back(self, key: K, value: V) -> None:
        """
        One share fewer of ``value``; the last stops it.  A value no longer
        in use under ``key`` (stopped already, or replaced) is left alone.
        """
        entry = self._entries.get(key)
        if entry is None or entry.value is not value:
            return
        entry.count -= 1
        if entry.count > 0:
            return
        del self._entries[key]
        self._stop(key, value)

    def get(self, key: K) -> V | None:
        """The value in use for ``key``, if any."""
        entry = self._entries.get(key)
        return None if entry is None else entry.value

    def values(self) -> list[V]:
        """The values in use now."""
        return [entry.value for entry in self._entries.values()]

    def count(self, value: V) -> int:
        """How many shares hold ``value`` (0 once it is stopped)."""
        for entry in self._entries.values():
            if entry.value is value:
                return entry.count
        return 0
