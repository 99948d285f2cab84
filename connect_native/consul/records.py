"""
Frozen attrs records decoded from the Consul agent's JSON.

JSON is decoded once, at the edge (the client), into these records; nothing
past the client sees a dict of JSON.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from attrs import frozen

T = TypeVar("T")


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
