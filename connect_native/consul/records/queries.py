"""
Prepared queries: the answer of ``/v1/query/<name>/execute``.
"""

from __future__ import annotations

from attrs import frozen

from connect_native.consul.records._base import JSONObject
from connect_native.consul.records.catalog import (
    HealthEntry,
    decode_health_entry,
)

__all__ = [
    "PreparedQueryResult",
    "decode_prepared_query_result",
]


@frozen
class PreparedQueryResult:
    """
    ``GET /v1/query/<id-or-name>/execute``: the instances (critical ones
    already removed, order shuffled by the agent) and where they came from.
    """

    service: str
    nodes: tuple[HealthEntry, ...]
    datacenter: str
    dns_ttl: str = ""
    failovers: int = 0


def decode_prepared_query_result(value: object) -> PreparedQueryResult:
    body = JSONObject("prepared query", value)
    dns = body.opt_obj("DNS")
    return PreparedQueryResult(
        service=body.string("Service"),
        nodes=tuple(decode_health_entry(e) for e in body.objs("Nodes", required=False)),
        datacenter=body.opt_str("Datacenter"),
        dns_ttl=dns.opt_str("TTL") if dns is not None else "",
        failovers=body.opt_int("Failovers"),
    )
