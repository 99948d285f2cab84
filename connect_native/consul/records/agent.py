"""
The local agent's own endpoints: ``/v1/agent/self``
(:class:`AgentSelf`), and the body of ``PUT /v1/agent/service/register``
(:class:`ServiceRegistration` with its :class:`TTLCheck`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from attrs import field, frozen

from connect_native.consul.records._base import (
    FrozenDict,
    JSONObject,
    empty_map,
)
from connect_native.consul.records.values import format_duration

__all__ = [
    "AgentSelf",
    "ServiceRegistration",
    "TTLCheck",
    "decode_agent_self",
]


# -- agent self --------------------------------------------------------------


@frozen
class AgentSelf:
    """
    What ``GET /v1/agent/self`` says about the local agent (its ``Config``).
    """

    datacenter: str
    node_name: str
    node_id: str
    server: bool
    version: str
    revision: str = ""
    primary_datacenter: str | None = None


def decode_agent_self(value: object) -> AgentSelf:
    config = JSONObject("agent self", value).obj("Config")
    return AgentSelf(
        datacenter=config.string("Datacenter"),
        node_name=config.string("NodeName"),
        node_id=config.opt_str("NodeID"),
        server=config.boolean("Server"),
        version=config.string("Version"),
        revision=config.opt_str("Revision"),
        primary_datacenter=config.maybe_str("PrimaryDatacenter"),
    )


# -- registration (request bodies) ---------------------------------------------

_CHECK_STATUSES = ("passing", "warning", "critical")


def _check_status(status: str | None) -> str | None:
    if status is not None and status not in _CHECK_STATUSES:
        raise ValueError(
            f"check status must be one of {', '.join(_CHECK_STATUSES)}, got {status!r}"
        )
    return status


def _seconds(instance: object, attribute: object, value: float) -> None:
    format_duration(value, getattr(attribute, "name", "duration"))


def _optional_seconds(instance: object, attribute: object, value: float | None) -> None:
    if value is not None:
        format_duration(value, getattr(attribute, "name", "duration"))


@frozen
class TTLCheck:
    """
    A TTL check to register with a service: the application reports its
    health with ``check_pass``/``check_warn``/``check_fail`` at least every
    ``ttl`` seconds.  Without a ``status`` the agent starts it critical.
    """

    ttl: float = field(validator=_seconds)
    check_id: str | None = None
    name: str | None = None
    status: str | None = field(default=None, converter=_check_status)
    notes: str | None = None
    deregister_critical_service_after: float | None = field(
        default=None, validator=_optional_seconds
    )

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"TTL": format_duration(self.ttl, "ttl")}
        if self.check_id is not None:
            body["CheckID"] = self.check_id
        if self.name is not None:
            body["Name"] = self.name
        if self.status is not None:
            body["Status"] = self.status
        if self.notes is not None:
            body["Notes"] = self.notes
        if self.deregister_critical_service_after is not None:
            body["DeregisterCriticalServiceAfter"] = format_duration(
                self.deregister_critical_service_after,
                "deregister_critical_service_after",
            )
        return body


def _service_name(instance: object, attribute: object, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"a service registration needs a non-empty name, got {value!r}"
        )


def _port(instance: object, attribute: object, value: int | None) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536
    ):
        raise ValueError(f"port must be an integer from 1 to 65535, got {value!r}")


def _str_map(value: Mapping[str, str] | None) -> FrozenDict[str, str]:
    return FrozenDict(value or {})


def _str_tuple(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


def _check_tuple(values: Iterable[TTLCheck]) -> tuple[TTLCheck, ...]:
    return tuple(values)


@frozen
class ServiceRegistration:
    """
    A service to register with the local agent (``PUT
    /v1/agent/service/register``), Connect native by default.

    The agent rejects a native service without a port.  ``id`` defaults (on
    the agent) to ``name``.
    """

    name: str = field(validator=_service_name)
    port: int | None = field(default=None, validator=_port)
    id: str | None = None
    address: str | None = None
    tags: tuple[str, ...] = field(default=(), converter=_str_tuple)
    meta: FrozenDict[str, str] = field(factory=empty_map, converter=_str_map)
    connect_native: bool = True
    checks: tuple[TTLCheck, ...] = field(default=(), converter=_check_tuple)

    def to_json(self) -> dict[str, object]:
        """The JSON body the agent expects (it rejects unknown fields)."""
        body: dict[str, object] = {"Name": self.name}
        if self.id is not None:
            body["ID"] = self.id
        if self.port is not None:
            body["Port"] = self.port
        if self.address is not None:
            body["Address"] = self.address
        if self.tags:
            body["Tags"] = list(self.tags)
        if self.meta:
            body["Meta"] = dict(self.meta)
        if self.connect_native:
            body["Connect"] = {"Native": True}
        if self.checks:
            body["Checks"] = [check.to_json() for check in self.checks]
        return body
