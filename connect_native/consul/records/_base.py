"""
What every record module shares: :class:`Indexed` (the answer of a read, with
its blocking-query index), :class:`FrozenDict` (an immutable, hashable
mapping), and the JSON decoding helpers that name the field at fault in a
:class:`~connect_native.consul.errors.ConsulResponseError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Generic, TypeVar

from attrs import frozen

from connect_native.consul.errors import ConsulResponseError

__all__ = [
    "FrozenDict",
    "Indexed",
]

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")


# -- the answer of a read ---------------------------------------------------


@frozen
class Indexed(Generic[T]):
    """
    One answer from a (possibly blocking) read: the decoded value and the
    query metadata that the blocking loop needs.

    ``index`` is the ``X-Consul-Index`` header, or ``None`` when the endpoint
    sends none (``/v1/connect/intentions/match`` never does).
    """

    value: T
    index: int | None
    known_leader: bool | None = None
    last_contact_ms: int | None = None
    cache_hit: bool | None = None
    age_s: int | None = None


# -- an immutable, hashable mapping ------------------------------------------


class FrozenDict(Mapping[K, V]):
    """
    A read-only mapping that can be hashed, so that records holding maps
    (``Meta``, tagged addresses) stay hashable and comparable.  It compares
    equal to any mapping with the same items.
    """

    __slots__ = ("_data", "_hash")

    def __init__(self, items: Mapping[K, V] | None = None) -> None:
        self._data: dict[K, V] = dict(items) if items is not None else {}
        self._hash: int | None = None

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._data == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"


def empty_map() -> FrozenDict[str, str]:
    return FrozenDict()


# -- decoding helpers --------------------------------------------------------


def kind_of(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"([Zz]|[+-]\d{2}:\d{2})"
)


def _parse_time(text: str) -> datetime | None:
    """
    Go's RFC 3339 (nanoseconds allowed) to an aware datetime; ``None`` if the
    text is not one.
    """
    m = _RFC3339.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    fraction, offset = m.group(7), m.group(8)
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    if offset in ("Z", "z"):
        tz = timezone.utc
    else:
        sign = -1 if offset[0] == "-" else 1
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError:
        return None


class JSONObject:
    """
    One JSON object being decoded, with where it sits in the response so
    that errors can name the field.
    """

    def __init__(self, what: str, value: object, path: str = "") -> None:
        self.what = what
        self.path = path
        if not isinstance(value, dict):
            where = f"field {path!r}" if path else "the response"
            raise ConsulResponseError(
                f"{what}: {where} is {kind_of(value)}, expected an object"
            )
        self.data: dict[str, object] = value

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def missing(self, key: str) -> ConsulResponseError:
        return ConsulResponseError(f"{self.what}: field {self._name(key)!r} missing")

    def wrong(self, key: str, value: object, expected: str) -> ConsulResponseError:
        return ConsulResponseError(
            f"{self.what}: field {self._name(key)!r} is {kind_of(value)}, "
            f"expected {expected}"
        )

    def _get(self, key: str) -> object:
        if key not in self.data:
            raise self.missing(key)
        return self.data[key]

    def string(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self.wrong(key, value, "a string")
        return value

    def opt_str(self, key: str, default: str = "") -> str:
        """A string that newer agents omit when empty; null reads as empty."""
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.wrong(key, value, "a string")
        return value

    def maybe_str(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.wrong(key, value, "a string")
        return value

    def integer(self, key: str) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.wrong(key, value, "an integer")
        return value

    def opt_int(self, key: str, default: int = 0) -> int:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.wrong(key, value, "an integer")
        return value

    def boolean(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self.wrong(key, value, "a boolean")
        return value

    def opt_bool(self, key: str, default: bool = False) -> bool:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.wrong(key, value, "a boolean")
        return value

    def timestamp(self, key: str) -> datetime:
        text = self.string(key)
        parsed = _parse_time(text)
        if parsed is None:
            raise ConsulResponseError(
                f"{self.what}: field {self._name(key)!r} is {text!r}, "
                "expected an RFC 3339 time"
            )
        return parsed

    def opt_time(self, key: str) -> datetime | None:
        """A time newer agents omit; Go's zero time reads as ``None`` too."""
        text = self.maybe_str(key)
        if not text:
            return None
        parsed = self.timestamp(key)
        return None if parsed.year == 1 else parsed

    def obj(self, key: str) -> JSONObject:
        return JSONObject(self.what, self._get(key), self._name(key))

    def opt_obj(self, key: str) -> JSONObject | None:
        value = self.data.get(key)
        if value is None:
            return None
        return JSONObject(self.what, value, self._name(key))

    def items(self, key: str, *, required: bool = True) -> list[tuple[str, object]]:
        """
        The elements of a list with their paths; null is an empty list, and
        so is a missing key when not ``required``.
        """
        value = self._get(key) if required else self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.wrong(key, value, "a list")
        return [(f"{self._name(key)}[{i}]", v) for i, v in enumerate(value)]

    def objs(self, key: str, *, required: bool = True) -> list[JSONObject]:
        return [
            JSONObject(self.what, v, path)
            for path, v in self.items(key, required=required)
        ]

    def str_list(self, key: str) -> tuple[str, ...]:
        """A list of strings; null or missing is empty."""
        out = []
        for path, v in self.items(key, required=False):
            if not isinstance(v, str):
                raise ConsulResponseError(
                    f"{self.what}: field {path!r} is {kind_of(v)}, expected a string"
                )
            out.append(v)
        return tuple(out)

    def str_map(self, key: str) -> FrozenDict[str, str]:
        """An object of strings (``Meta``); null or missing is empty."""
        value = self.data.get(key)
        if value is None:
            return FrozenDict()
        if not isinstance(value, dict):
            raise self.wrong(key, value, "an object")
        for k, v in value.items():
            if not isinstance(v, str):
                raise ConsulResponseError(
                    f"{self.what}: field {self._name(key) + '.' + k!r} is "
                    f"{kind_of(v)}, expected a string"
                )
        return FrozenDict(value)


def freeze(value: object) -> object:
    """Arbitrary JSON made immutable: objects to FrozenDict, lists to tuples."""
    if isinstance(value, dict):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: object) -> object:
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [thaw(v) for v in value]
    return value


def top_list(what: str, value: object) -> list[JSONObject]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConsulResponseError(
            f"{what}: the response is {kind_of(value)}, expected a list"
        )
    return [JSONObject(what, v, f"[{i}]") for i, v in enumerate(value)]
