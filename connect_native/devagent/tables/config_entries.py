"""
Consul 1.9+: the ``service-intentions`` config entries and the exact
intention endpoints (from Consul's source, not compared with a real agent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from attrs import evolve
from twisted.logger import Logger

from connect_native import _logging
from connect_native.devagent.gocompat import go_quote
from connect_native.devagent.store import (
    DEFAULT_NAMESPACE,
    ConsulError,
    Settings,
    Store,
    permission_denied,
)
from connect_native.devagent.tables.acl_rules import Authorizer
from connect_native.devagent.tables.intentions import (
    IntentionInput,
    IntentionsTable,
    parse_match_name,
)
from connect_native.devagent.tables.service_intentions import (
    SERVICE_INTENTIONS,
    entry_problem,
    normalized,
)

log = Logger(observer=_logging.observer)


class ConfigEntriesTable:
    """
    ``/v1/config`` for ``service-intentions`` entries and the exact
    intention endpoints, both stored with the intentions table.
    """

    def __init__(
        self, store: Store, settings: Settings, intentions_table: IntentionsTable
    ) -> None:
        self.store = store
        self.settings = settings
        self.intentions_table = intentions_table
        self._config_index = 0

    def _config_kind(self, kind: str, status: int = 500) -> None:
        """
        Refuse a kind this agent does not model: 500 from a read's RPC, 400
        where the HTTP layer makes the entry first (a delete), as measured
        (``robust20-config-delete-bogus.http``).
        """
        if kind == SERVICE_INTENTIONS and self.settings.newer_api:
            return
        if kind == SERVICE_INTENTIONS or not self.settings.newer_api:
            # What 1.8.7 answers (measured) for a kind it does not know.
            raise ConsulError(status, f"invalid config entry kind: {kind}")
        raise ConsulError(
            status,
            f"the development agent has no {go_quote(kind)} config entries: "
            "only service-intentions (test other kinds against a real agent)",
        )

    @property
    def config_index(self) -> int:
        return max(self._config_index, 1)

    def _entries_changed(self) -> None:
        index = self.store.bump()
        self._config_index = index
        self.intentions_table.modify_index = index
        self.store.changed()

    def config_apply(
        self,
        name: str,
        sources: Sequence[Mapping[str, Any]],
        meta: Mapping[str, str] | None,
        *,
        cas: int | None = None,
        authz: Authorizer | None = None,
    ) -> bool:
        """
        ``PUT /v1/config`` with a ``service-intentions`` entry: ``False``
        when ``cas`` does not match the entry's ``ModifyIndex``.

        :raises ConsulError: 500 with Consul's validation message, 403
            without ``intentions = "write"`` on the destination.
        """
        if authz is not None and not authz.intention_write(name):
            raise permission_denied()
        entry = normalized(name, sources, meta)
        problem = entry_problem(entry)
        if problem is not None:
            raise ConsulError(500, problem)
        existing = self.intentions_table.entries.get(name)
        if cas is not None:
            current = existing.modify_index if existing is not None else 0
            if cas != current:
                return False
        for ixn in self.intentions_table.by_id.values():
            if ixn.destination_name == name and any(
                (src.namespace, src.name) == (ixn.source_ns, ixn.source_name)
                for src in entry.sources
            ):
                raise ConsulError(
                    500,
                    f"duplicate intention found: {ixn.describe(newer=True)}",
                )
        index = self.store.bump()
        self.intentions_table.entries[name] = evolve(
            entry,
            create_index=existing.create_index if existing is not None else index,
            modify_index=index,
        )
        log.info("service-intentions entry written: {name}", name=name)
        self._entries_changed()
        return True

    def config_get(
        self, kind: str, name: str, authz: Authorizer | None = None
    ) -> dict[str, Any]:
        self._config_kind(kind)
        entry = self.intentions_table.entries.get(name)
        if entry is None:
            raise ConsulError(
                404, f"Config entry not found for {go_quote(kind)} / {go_quote(name)}"
            )
        if authz is not None and not authz.intention_read(name):
            raise permission_denied()
        return entry.to_json()

    def config_list(
        self, kind: str, authz: Authorizer | None = None
    ) -> list[dict[str, Any]]:
        self._config_kind(kind)
        return [
            e.to_json()
            for name, e in sorted(self.intentions_table.entries.items())
            if authz is None or authz.intention_read(name)
        ]

    def check_delete_kind(self, kind: str) -> None:
        """
        :raises ConsulError: 400 for a kind a delete cannot name.
        """
        self._config_kind(kind, status=400)

    def config_delete(
        self,
        kind: str,
        name: str,
        *,
        cas: int | None = None,
        authz: Authorizer | None = None,
    ) -> bool:
        self.check_delete_kind(kind)
        if authz is not None and not authz.intention_write(name):
            raise permission_denied()
        entry = self.intentions_table.entries.get(name)
        if cas is not None and (entry.modify_index if entry else 0) != cas:
            return False
        if entry is not None:
            del self.intentions_table.entries[name]
            log.info("service-intentions entry deleted: {name}", name=name)
            self._entries_changed()
        return True

    def _exact_names(self, source: str, destination: str) -> tuple[str, str, str]:
        src_ns, src = parse_match_name(source)
        dst_ns, dst = parse_match_name(destination)
        if dst_ns != DEFAULT_NAMESPACE:
            raise ConsulError(
                400,
                'Bad request: Invalid query parameter: "ns" - Namespaces are a '
                "Consul Enterprise feature",
            )
        return src_ns, src, dst

    def intention_exact_get(
        self, source: str, destination: str, authz: Authorizer | None = None
    ) -> dict[str, Any]:
        """
        ``GET /v1/connect/intentions/exact``: 404 ``Intention not found``.
        """
        src_ns, src, dst = self._exact_names(source, destination)
        if authz is not None and not authz.intention_read(dst):
            raise permission_denied()
        for ixn in self.intentions_table.all_intentions():
            if (ixn.source_ns, ixn.source_name, ixn.destination_name) == (
                src_ns,
                src,
                dst,
            ):
                return ixn.to_json()
        raise ConsulError(404, "Intention not found")

    def intention_exact_put(
        self,
        source: str,
        destination: str,
        fields: Mapping[str, Any],
        authz: Authorizer | None = None,
    ) -> None:
        """
        ``PUT /v1/connect/intentions/exact``: the source is upserted into the
        destination's config entry (or the intention of the ID API with the
        same names is updated).
        """
        src_ns, src, dst = self._exact_names(source, destination)
        if authz is not None and not authz.intention_write(dst):
            raise permission_denied()
        for ixn in self.intentions_table.by_id.values():
            if (ixn.source_ns, ixn.source_name, ixn.destination_name) == (
                src_ns,
                src,
                dst,
            ):
                self.intentions_table.intention_update(
                    ixn.id,
                    IntentionInput(
                        description=fields.get("Description") or "",
                        source_ns=src_ns,
                        source_name=src,
                        destination_name=dst,
                        source_type=fields.get("SourceType") or "",
                        action=fields.get("Action") or "",
                        meta=ixn.meta,
                    ),
                    authz,
                )
                return
        new_source = {
            "Name": src,
            "Namespace": src_ns,
            "Action": fields.get("Action") or "",
            "Permissions": fields.get("Permissions"),
            "Type": fields.get("SourceType") or "",
            "Description": fields.get("Description") or "",
        }
        entry = self.intentions_table.entries.get(dst)
        sources = [] if entry is None else [s.to_json() for s in entry.sources]
        sources = [
            s
            for s in sources
            if (s.get("Namespace", DEFAULT_NAMESPACE), s["Name"]) != (src_ns, src)
        ]
        sources.append(new_source)
        self.config_apply(
            dst, sources, None if entry is None else entry.meta, authz=authz
        )

    def intention_exact_delete(
        self, source: str, destination: str, authz: Authorizer | None = None
    ) -> None:
        src_ns, src, dst = self._exact_names(source, destination)
        if authz is not None and not authz.intention_write(dst):
            raise permission_denied()
        for ixn in list(self.intentions_table.by_id.values()):
            if (ixn.source_ns, ixn.source_name, ixn.destination_name) == (
                src_ns,
                src,
                dst,
            ):
                self.intentions_table.intention_delete(ixn.id, authz)
                return
        entry = self.intentions_table.entries.get(dst)
        if entry is None:
            raise ConsulError(404, "Intention not found")
        kept = tuple(s for s in entry.sources if (s.namespace, s.name) != (src_ns, src))
        if len(kept) == len(entry.sources):
            raise ConsulError(404, "Intention not found")
        if kept:
            self.intentions_table.entries[dst] = evolve(
                entry, sources=kept, modify_index=self.store.bump()
            )
        else:
            del self.intentions_table.entries[dst]
        self._entries_changed()
