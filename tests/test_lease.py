"""
connect_native._lease: the one reference-counted sharing.
"""

from __future__ import annotations

import pytest

from connect_native._lease import Lease, Leases


class Thing:
    def __init__(self, name: str) -> None:
        self.name = name
        self.running = False


def recording() -> tuple[Leases[str, Thing], list[tuple[str, str, Thing]]]:
    events: list[tuple[str, str, Thing]] = []

    def start(key: str, thing: Thing) -> None:
        events.append(("start", key, thing))
        thing.running = True

    def stop(key: str, thing: Thing) -> None:
        events.append(("stop", key, thing))
        thing.running = False

    return Leases(start, stop), events


def test_the_first_acquire_makes_and_starts_the_rest_share() -> None:
    leases, events = recording()
    made: list[Thing] = []

    def make() -> Thing:
        made.append(Thing("a"))
        return made[-1]

    first = leases.acquire("a", make)
    second = leases.acquire("a", make)
    assert len(made) == 1
    assert first.value is second.value is made[0]
    assert made[0].running
    assert events == [("start", "a", made[0])]
    assert leases.count(made[0]) == 2
    assert leases.get("a") is made[0]
    assert leases.values() == [made[0]]
    assert len(leases) == 1


def test_keys_are_apart() -> None:
    leases, _ = recording()
    a = leases.acquire("a", lambda: Thing("a"))
    b = leases.acquire("b", lambda: Thing("b"))
    assert a.value is not b.value
    assert len(leases) == 2


def test_the_last_release_stops_and_drops() -> None:
    leases, events = recording()
    first = leases.acquire("a", lambda: Thing("a"))
    second = leases.acquire("a", lambda: Thing("a"))
    thing = first.value
    first.release()
    assert thing.running
    assert leases.count(thing) == 1
    second.release()
    assert not thing.running
    assert events[-1] == ("stop", "a", thing)
    assert leases.count(thing) == 0
    assert leases.get("a") is None
    assert len(leases) == 0


def test_releasing_twice_does_nothing() -> None:
    leases, events = recording()
    first = leases.acquire("a", lambda: Thing("a"))
    second = leases.acquire("a", lambda: Thing("a"))
    first.release()
    first.release()
    assert first.released
    assert not second.released
    assert leases.count(second.value) == 1
    assert [e[0] for e in events] == ["start"]


def test_an_acquire_after_the_last_release_makes_a_fresh_one() -> None:
    leases, _events = recording()
    old = leases.acquire("a", lambda: Thing("old"))
    old.release()
    new = leases.acquire("a", lambda: Thing("new"))
    assert new.value is not old.value
    assert new.value.running
    assert not old.value.running
    # The old lease let go already: releasing it again leaves the new one.
    old.release()
    assert leases.count(new.value) == 1


def test_a_stale_give_back_leaves_the_new_value_alone() -> None:
    leases, _ = recording()
    old = leases.take("a", lambda: Thing("old"))
    leases.give_back("a", old)
    new = leases.take("a", lambda: Thing("new"))
    leases.give_back("a", old)
    assert leases.count(new) == 1
    assert new.running


def test_a_failing_start_drops_the_value_and_raises() -> None:
    def start(key: str, thing: Thing) -> None:
        raise RuntimeError("cannot start")

    leases: Leases[str, Thing] = Leases(start)
    with pytest.raises(RuntimeError):
        leases.acquire("a", lambda: Thing("a"))
    assert len(leases) == 0
    assert leases.get("a") is None


def test_an_acquire_from_stop_makes_a_fresh_one() -> None:
    again: list[Lease[Thing]] = []
    leases: Leases[str, Thing]

    def stop(key: str, thing: Thing) -> None:
        if not again:
            again.append(leases.acquire(key, lambda: Thing("again")))

    leases = Leases(stop=stop)
    first = leases.acquire("a", lambda: Thing("first"))
    first.release()
    assert again[0].value is not first.value
    assert leases.get("a") is again[0].value
    assert leases.count(again[0].value) == 1


def test_keep_is_held_while_in_use() -> None:
    import gc
    import weakref

    class Anchor:
        pass

    anchor = Anchor()
    watcher = weakref.ref(anchor)
    leases: Leases[int, Thing] = Leases()
    lease = leases.acquire(id(anchor), lambda: Thing("a"), keep=anchor)
    del anchor
    gc.collect()
    assert watcher() is not None
    lease.release()
    gc.collect()
    assert watcher() is None
