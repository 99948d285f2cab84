"""
The catalog table: service registration and its validation (Consul's
messages), checks with their TTLs, aliases and the output-only sync delay.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.logger import Logger

from connect_native import _logging
from connect_native.devagent.gocompat import go_quote
from connect_native.devagent.store import (
    META_KEY_MAX,
    META_MAX_PAIRS,
    META_VALUE_MAX,
    NANOSECOND,
    ConsulError,
    Settings,
    Store,
    multierror,
    permission_denied,
    stagger,
)
from connect_native.devagent.tables.acl_rules import Authorizer
from connect_native.devagent.tables.catalog_records import (
    CHECK_OUTPUT_MAX_SIZE,
    CHECK_UPDATE_INTERVAL,
    GATEWAY_KINDS,
    HEALTH_CRITICAL,
    HEALTH_PASSING,
    HEALTH_WARNING,
    KIND_CONNECT_PROXY,
    KIND_MESH_GATEWAY,
    SIDECAR_MAX_PORT,
    SIDECAR_MIN_PORT,
    VALID_STATUSES,
    CheckDefinition,
    ProxyConfig,
    ServiceDefinition,
    StoredCheck,
    StoredService,
)

log = Logger(observer=_logging.observer)


class CatalogTable:
    """
    The local agent's services and checks as the catalog holds them:
    registration (with sidecars), deregistration, TTL and alias checks and
    their sync to the catalog, and the per-name indexes blocking reads
    watch.
    """

    def __init__(self, store: Store, settings: Settings, *, table_index: int) -> None:
        self.store = store
        self.settings = settings
        self.services: dict[str, StoredService] = {}
        self.checks: dict[str, StoredCheck] = {}
        # Per lowercased service name: the last change of its instances,
        # and of the proxies whose destination it is.
        self.service_indexes: dict[str, int] = {}
        self.connect_indexes: dict[str, int] = {}
        # The services table's own index (what a name without instances
        # answers).
        self.table_index = table_index

    def services_listing(self, authz: Authorizer | None = None) -> dict[str, list[str]]:
        """
        ``GET /v1/catalog/services``: every service name the token may read,
        with the tags of all its instances, each once; ``consul`` (the
        server's own service, no tags) among them, as a real server lists it.
        Go's encoder sorts the names.
        """
        listing: dict[str, list[str]] = {"consul": []}
        # Proxies and gateways are listed under their own names, as any
        # other instance.
        for service in self.services.values():
            tags = listing.setdefault(service.name, [])
            for tag in service.tags:
                if tag not in tags:
                    tags.append(tag)
        return {
            name: tags
            for name, tags in sorted(listing.items())
            if authz is None or authz.service_read(name)
        }

    def services_index(self) -> int:
        """The index of the last change to any service's instances."""
        return max(self.service_indexes.values(), default=self.table_index)

    def services_json(self, authz: Authorizer | None = None) -> dict[str, Any]:
        return {
            sid: s.agent_json()
            for sid, s in sorted(self.services.items())
            if authz is None or authz.service_read(s.name)
        }

    def service_json(
        self, service_id: str, authz: Authorizer | None = None
    ) -> tuple[dict[str, Any], str]:
        """
        ``GET /v1/agent/service/<id>``: the service and its content hash.
        """
        service = self.services.get(service_id)
        if service is None:
            raise ConsulError(404, f"unknown service ID: {service_id}")
        if authz is not None and not authz.service_read(service.name):
            raise permission_denied()
        body = service.agent_json()
        digest = hashlib.sha256(
            json.dumps(body, sort_keys=True).encode("utf-8")
        ).hexdigest()[:16]
        out = dict(body)
        # ContentHash sits after EnableTagOverride, as in api.AgentService.
        ordered: dict[str, Any] = {}
        for key, value in out.items():
            ordered[key] = value
            if key == "EnableTagOverride":
                ordered["ContentHash"] = digest
        return ordered, digest

    def checks_json(self, authz: Authorizer | None = None) -> dict[str, Any]:
        return {
            cid: c.to_json(self.settings.node_name, catalog=False)
            for cid, c in sorted(self.checks.items())
            if authz is None or self._check_readable(c, authz)
        }

    def _check_readable(self, check: StoredCheck, authz: Authorizer) -> bool:
        service = self.services.get(check.service_id)
        if service is not None:
            return authz.service_read(service.name)
        return authz.node_read(self.settings.node_name)

    def register_service(
        self,
        definition: ServiceDefinition,
        *,
        replace_existing_checks: bool = False,
        authz: Authorizer | None = None,
    ) -> None:
        """
        ``PUT /v1/agent/service/register``.

        :raises ConsulError: 400 with Consul's message.
        """
        service, checks = self._validated_service(definition)
        sidecar: tuple[StoredService, list[CheckDefinition]] | None = None
        if definition.sidecar_given:
            sidecar = self._sidecar_for(service, definition.sidecar)
        if authz is not None:
            # vetServiceRegister, after validation (acl-register-anon.http).
            names = [service.name]
            if service.kind == KIND_CONNECT_PROXY:
                names.append(service.proxy.destination_service_name)
            if sidecar is not None:
                names.append(sidecar[0].name)
            for name in names:
                if not authz.service_write(name):
                    raise permission_denied(f"Missing service:write on {name}")
        all_checks = checks + (sidecar[1] if sidecar is not None else [])
        if any(check.is_script for check in all_checks):
            # enable_script_checks is off, as on a default agent.
            raise ConsulError(
                500,
                "Scripts are disabled on this agent from remote calls; to enable, "
                "configure 'enable_script_checks' to true",
            )
        self._apply_registration(service, checks, replace_existing_checks)
        if sidecar is not None:
            sidecar_service, sidecar_checks = sidecar
            self.services[service.id].sidecar_id = sidecar_service.id
            self._apply_registration(
                sidecar_service, sidecar_checks, replace_existing_checks
            )
        self._refresh_aliases()
        self.store.changed()

    def _validated_service(
        self, d: ServiceDefinition
    ) -> tuple[StoredService, list[CheckDefinition]]:
        if not d.name:
            raise ConsulError(400, "Missing service name")
        try:
            address = ipaddress.ip_address(d.address) if d.address else None
        except ValueError:
            address = None
        if address is not None and address.is_unspecified:
            raise ConsulError(400, "Invalid service address")
        if d.weights is not None:
            passing, warning = d.weights
            if passing < 1:
                raise ConsulError(
                    400, "Invalid Weights: Passing must be greater than 0"
                )
            if warning < 0:
                raise ConsulError(
                    400, "Invalid Weights: Warning must be greater or equal than 0"
                )
        meta_problem = _meta_problem(d.meta or {})
        if meta_problem is not None:
            raise ConsulError(400, f"Invalid Service Meta: {meta_problem}")
        problems = _node_service_problems(d)
        if problems:
            raise ConsulError(400, multierror(problems))
        checks: list[CheckDefinition] = []
        for check in d.checks:
            problem = check.validate()
            if problem is not None:
                raise ConsulError(400, f"Invalid check: {problem}")
            checks.append(check)
        for check in checks:
            if check.status and check.status not in VALID_STATUSES:
                raise ConsulError(
                    400, "Status for checks must 'passing', 'warning', 'critical'"
                )
        return self._node_service(d), checks

    def _node_service(self, d: ServiceDefinition) -> StoredService:
        try:
            address = ipaddress.ip_address(d.address) if d.address else None
        except ValueError:
            address = None
        tagged = dict(d.tagged_addresses or {})
        if address is not None:
            family = "ipv4" if address.version == 4 else "ipv6"
            for key in (f"lan_{family}", f"wan_{family}"):
                tagged.setdefault(key, (d.address, d.port))
        proxy = d.proxy or ProxyConfig()
        if d.kind != KIND_CONNECT_PROXY and d.kind not in GATEWAY_KINDS:
            # Consul keeps Proxy only on proxies and gateways.
            proxy = ProxyConfig()
        return StoredService(
            id=d.id or d.name,
            name=d.name,
            kind=d.kind,
            tags=tuple(d.tags or ()),
            address=d.address,
            tagged_addresses=tagged,
            meta=None if d.meta is None else dict(d.meta),
            port=d.port,
            weights=d.weights or (1, 1),
            enable_tag_override=d.enable_tag_override,
            proxy=proxy,
            connect_native=d.connect_native,
        )

    def _sidecar_for(
        self, parent: StoredService, given: ServiceDefinition | None
    ) -> tuple[StoredService, list[CheckDefinition]]:
        # agent/sidecar_service.go sidecarServiceFromNodeService.
        given = given or ServiceDefinition()
        sidecar_id = f"{parent.id}-sidecar-proxy"
        port = given.port
        if not port:
            existing = self.services.get(sidecar_id)
            used = {
                s.port
                for s in self.services.values()
                if s.kind == KIND_CONNECT_PROXY and s.id != sidecar_id
            }
            if existing is not None and existing.port:
                port = existing.port
            else:
                port = next(
                    (
                        p
                        for p in range(SIDECAR_MIN_PORT, SIDECAR_MAX_PORT + 1)
                        if p not in used
                    ),
                    0,
                )
            if not port:
                raise ConsulError(
                    400,
                    "Invalid SidecarService: no port provided for sidecar_service "
                    "and none left in the configured range",
                )
        proxy = given.proxy or ProxyConfig()
        proxy = ProxyConfig(
            destination_service_name=parent.name,
            destination_service_id=parent.id,
            local_service_address=proxy.local_service_address or "127.0.0.1",
            local_service_port=proxy.local_service_port or parent.port,
            config=proxy.config,
            upstreams=proxy.upstreams,
            mesh_gateway_mode=proxy.mesh_gateway_mode,
            expose_checks=proxy.expose_checks,
            expose_paths=proxy.expose_paths,
        )
        tags = given.tags if given.tags else parent.tags
        meta = dict(given.meta) if given.meta else parent.meta
        checks = [c for c in given.checks if not c.is_empty()]
        if not checks:
            checks = [
                CheckDefinition(
                    name="Connect Sidecar Listening",
                    tcp=f"{proxy.local_service_address}:{port}",
                    interval=10_000_000_000,
                ),
                CheckDefinition(
                    name=f"Connect Sidecar Aliasing {parent.id}",
                    alias_service=parent.id,
                ),
            ]
        service = StoredService(
            id=sidecar_id,
            name=given.name or f"{parent.name}-sidecar-proxy",
            kind=KIND_CONNECT_PROXY,
            tags=tuple(tags or ()),
            address=given.address,
            tagged_addresses=dict(given.tagged_addresses or {}),
            meta=meta,
            port=port,
            weights=given.weights or (1, 1),
            enable_tag_override=given.enable_tag_override,
            proxy=proxy,
            connect_native=False,
        )
        return service, checks

    def _apply_registration(
        self,
        service: StoredService,
        definitions: list[CheckDefinition],
        replace_existing_checks: bool,
    ) -> None:
        previous = self.services.get(service.id)
        index = self.store.index + 1
        touched: set[str] = {service.name.lower()}
        changed = False
        if previous is None:
            service.create_index = service.modify_index = index
            changed = True
        else:
            service.create_index = previous.create_index
            service.modify_index = previous.modify_index
            service.sidecar_id = previous.sidecar_id
            if previous.catalog_json() != service.catalog_json():
                service.modify_index = index
                changed = True
                touched.add(previous.name.lower())
        self.services[service.id] = service

        new_ids: list[str] = []
        for position, definition in enumerate(definitions, start=1):
            check_id = definition.check_id
            if not check_id:
                check_id = f"service:{service.id}"
                if len(definitions) > 1:
                    check_id += f":{position}"
            new_ids.append(check_id)
            status = definition.status or HEALTH_CRITICAL
            check = StoredCheck(
                check_id=check_id,
                name=definition.name or f"Service '{service.name}' check",
                notes=definition.notes,
                service_id=service.id,
                service_name=service.name,
                service_tags=service.tags,
                definition=definition,
                status=status,
                catalog_status=status,
            )
            old = self.checks.get(check_id)
            if old is not None:
                # Re-registering keeps the check's status and output, and
                # syncs them at once (a deferred output change included).
                check.status, check.output = old.status, old.output
                check.catalog_status, check.catalog_output = old.status, old.output
                check.last_output = old.last_output
                check.create_index = old.create_index
                check.modify_index = old.modify_index
                old.stop_timers()
                if old.to_json(self.settings.node_name, catalog=True) != check.to_json(
                    self.settings.node_name, catalog=True
                ):
                    check.modify_index = index
                    changed = True
            else:
                check.create_index = check.modify_index = index
                changed = True
            self.checks[check_id] = check
            if check.is_ttl:
                self._arm_ttl(check)
        stale = [
            c
            for c in self.checks.values()
            if c.service_id == service.id
            and c.check_id not in new_ids
            and replace_existing_checks
        ]
        for c in stale:
            c.stop_timers()
            del self.checks[c.check_id]
            changed = True
        for c in self.checks.values():
            if c.service_id == service.id and c.service_tags != service.tags:
                c.service_tags = service.tags
        if changed:
            self.store.bump()
            self._touch_names(touched, index)
            if (
                service.kind == KIND_CONNECT_PROXY
                and service.proxy.destination_service_name
            ):
                self._touch_connect(service.proxy.destination_service_name, index)
            if previous is not None and previous.connect_name:
                self._touch_connect(previous.connect_name, index)
            log.info(
                "service registered: {id} ({name}) at index {index}",
                id=service.id,
                name=service.name,
                index=index,
            )

    def _touch_names(self, names: Iterable[str], index: int) -> None:
        for name in names:
            self.service_indexes[name.lower()] = index

    def _touch_connect(self, name: str, index: int) -> None:
        self.connect_indexes[name.lower()] = index

    def _touch_service(self, service: StoredService, index: int) -> None:
        self._touch_names([service.name], index)
        if (
            service.kind == KIND_CONNECT_PROXY
            and service.proxy.destination_service_name
        ):
            self._touch_connect(service.proxy.destination_service_name, index)

    def deregister_service(
        self, service_id: str, authz: Authorizer | None = None
    ) -> None:
        """
        ``PUT /v1/agent/service/deregister/<id>``: the service, its checks
        and its sidecar go; an unknown ID is not an error in 1.8.7 with ACLs
        off, a 500 with them on (vetServiceUpdate, measured).
        """
        service = self.services.get(service_id)
        if authz is not None:
            if service is None:
                # Go's %q of a structs.ServiceID.
                raise ConsulError(
                    500, f"Unknown service {{{go_quote(service_id)} {{}}}}"
                )
            if not authz.service_write(service.name):
                raise permission_denied(f"Missing service:write on {service.name}")
        if service is None:
            return
        index = self.store.bump()
        for victim in [service, self.services.get(service.sidecar_id or "")]:
            if victim is None:
                continue
            del self.services[victim.id]
            for check in [c for c in self.checks.values() if c.service_id == victim.id]:
                check.stop_timers()
                del self.checks[check.check_id]
            self._touch_service(victim, index)
            log.info("service deregistered: {id}", id=victim.id)
        self.table_index = index
        self._refresh_aliases()
        self.store.changed()

    def register_check(
        self,
        definition: CheckDefinition,
        service_id: str,
        authz: Authorizer | None = None,
    ) -> None:
        """
        ``PUT /v1/agent/check/register``: a check of the node, or of a
        registered service (``AgentRegisterCheck`` and ``AddCheck``).

        :raises ConsulError: 400 with Consul's message for a bad definition;
            500 ``ServiceID "x" does not exist`` for an unknown service, as
            measured (check-register-unknown-service.http).
        """
        if not definition.name:
            raise ConsulError(400, "Missing check name")
        if definition.status and definition.status not in VALID_STATUSES:
            raise ConsulError(400, "Bad check status")
        problem = definition.validate()
        if problem is not None:
            raise ConsulError(400, f"Invalid check: {problem}")
        check_id = definition.check_id or definition.name
        service = self.services.get(service_id) if service_id else None
        if authz is not None:
            # vetCheckRegister: the service's write, else the node's; and
            # the same for a check it replaces.
            owners = [service.name if service is not None else None]
            old = self.checks.get(check_id)
            if old is not None:
                old_owner = self.services.get(old.service_id)
                owners.append(old_owner.name if old_owner is not None else None)
            for owner in owners:
                if owner is not None and service_id:
                    if not authz.service_write(owner):
                        raise permission_denied(f"Missing service:write on {owner}")
                elif not authz.allowed("node", self.settings.node_name, "write"):
                    raise permission_denied(
                        f"Missing node:write on {self.settings.node_name}"
                    )
        if service_id and service is None:
            # Before the disabled scripts, as measured
            # (robust20-check-register-script-unknown-service.http).
            raise ConsulError(500, f"ServiceID {go_quote(service_id)} does not exist")
        if definition.is_script:
            raise ConsulError(
                500,
                "Scripts are disabled on this agent from remote calls; to enable, "
                "configure 'enable_script_checks' to true",
            )
        status = definition.status or HEALTH_CRITICAL
        check = StoredCheck(
            check_id=check_id,
            name=definition.name,
            notes=definition.notes,
            service_id=service.id if service is not None else "",
            service_name=service.name if service is not None else "",
            service_tags=service.tags if service is not None else (),
            definition=definition,
            status=status,
            catalog_status=status,
        )
        index = self.store.bump()
        old = self.checks.pop(check_id, None)
        if old is not None:
            old.stop_timers()
            check.create_index = old.create_index
            old_owner = self.services.get(old.service_id)
            if old_owner is not None:
                self._touch_service(old_owner, index)
        else:
            check.create_index = index
        check.modify_index = index
        self.checks[check_id] = check
        if check.is_ttl:
            self._arm_ttl(check)
        if service is not None:
            self._touch_service(service, index)
        log.info("check registered: {id} at index {index}", id=check_id, index=index)
        self._refresh_aliases()
        self.store.changed()

    def deregister_check(self, check_id: str, authz: Authorizer | None = None) -> None:
        """
        ``PUT /v1/agent/check/deregister/<id>``: an unknown ID is no error
        with ACLs off (200, measured), ``Unknown check "x"`` (500) with them
        on; no ID at all is a 500 ``CheckID missing``.
        """
        check = self.checks.get(check_id)
        if authz is not None:
            if check is None:
                raise ConsulError(500, f"Unknown check {go_quote(check_id)}")
            owner = self.services.get(check.service_id)
            if owner is not None:
                if not authz.service_write(owner.name):
                    raise permission_denied(f"Missing service:write on {owner.name}")
            elif not authz.allowed("node", self.settings.node_name, "write"):
                raise permission_denied(
                    f"Missing node:write on {self.settings.node_name}"
                )
        if not check_id:
            raise ConsulError(500, "CheckID missing")
        if check is None:
            return
        check.stop_timers()
        del self.checks[check_id]
        index = self.store.bump()
        owner = self.services.get(check.service_id)
        if owner is not None:
            self._touch_service(owner, index)
        log.info("check deregistered: {id}", id=check_id)
        self._refresh_aliases()
        self.store.changed()

    def _arm_ttl(self, check: StoredCheck) -> None:
        if check.ttl_timer is not None and check.ttl_timer.active():
            check.ttl_timer.cancel()
        check.ttl_timer = self.store.clock.callLater(
            check.definition.ttl * NANOSECOND, self._ttl_expired, check.check_id
        )

    def _ttl_expired(self, check_id: str) -> None:
        check = self.checks.get(check_id)
        if check is None:
            return
        check.ttl_timer = None
        output = "TTL expired"
        if check.last_output:
            output += f" (last output before timeout follows): {check.last_output}"
        log.info("check {id} TTL expired", id=check_id)
        self._set_check(check, HEALTH_CRITICAL, output)
        self._refresh_aliases()

    def update_ttl_check(
        self,
        check_id: str,
        status: str,
        output: str,
        authz: Authorizer | None = None,
    ) -> None:
        """
        ``PUT /v1/agent/check/pass|warn|fail|update/<id>``.

        :raises ConsulError: 500 ``CheckID "x" does not have associated TTL``
            for an unknown or non-TTL check (``Unknown check "x"`` for an
            unknown one with ACLs on, acl-check-pass-unknown-anon.http); 403
            without ``service:write`` on its service.
        """
        check = self.checks.get(check_id)
        if authz is not None:
            if check is None:
                raise ConsulError(500, f"Unknown check {go_quote(check_id)}")
            owner = self.services.get(check.service_id)
            if owner is not None:
                if not authz.service_write(owner.name):
                    raise permission_denied(f"Missing service:write on {owner.name}")
            elif not authz.allowed("node", self.settings.node_name, "write"):
                raise permission_denied(
                    f"Missing node:write on {self.settings.node_name}"
                )
        if check is None or not check.is_ttl:
            raise ConsulError(
                500, f"CheckID {go_quote(check_id)} does not have associated TTL"
            )
        limit = check.definition.output_max_size or CHECK_OUTPUT_MAX_SIZE
        raw = output.encode("utf-8", errors="replace")
        if len(raw) > limit:
            output = (
                raw[:limit].decode("utf-8", errors="replace")
                + f" ... (captured {limit} of {len(raw)} bytes)"
            )
        check.last_output = output
        self._arm_ttl(check)
        self._set_check(check, status, output)
        self._refresh_aliases()

    def _set_check(self, check: StoredCheck, status: str, output: str) -> None:
        if check.status == status and check.output == output:
            return
        if check.status == status:
            # Output-only changes reach the catalog later (local state's
            # deferred sync), so they wake no catalog watcher now.
            check.output = output
            if check.deferred_sync is None:
                delay = CHECK_UPDATE_INTERVAL / 2 + stagger(
                    self.store.rng, CHECK_UPDATE_INTERVAL
                )
                check.deferred_sync = self.store.clock.callLater(
                    delay, self._deferred_sync, check.check_id
                )
            return
        check.status, check.output = status, output
        self._sync_check(check)

    def _refresh_aliases(self) -> None:
        """
        Run the alias checks, as the agent does when the checks they mirror
        change (agent/checks/alias.go).  Aliases of aliases settle within a
        few rounds.
        """
        for _ in range(8):
            moved = False
            for check in sorted(self.checks.values(), key=lambda c: c.check_id):
                if check.definition.type != "alias":
                    continue
                status, output = self._alias_result(check.definition)
                if (status, output) != (check.status, check.output):
                    self._set_check(check, status, output)
                    moved = True
            if not moved:
                return

    def _alias_result(self, definition: CheckDefinition) -> tuple[str, str]:
        node, service_id = definition.alias_node, definition.alias_service
        if node not in ("", self.settings.node_name):
            return HEALTH_PASSING, "No checks found."
        if service_id and service_id not in self.services:
            return (
                HEALTH_CRITICAL,
                f"Service {service_id} could not be found on node {node}",
            )
        health, message = HEALTH_PASSING, "No checks found."
        for check in sorted(self.checks.values(), key=lambda c: c.check_id):
            if check.service_id != service_id:
                continue
            if check.status in (HEALTH_CRITICAL, HEALTH_WARNING):
                health = check.status
                message = (
                    f"Aliased check {go_quote(check.name)} failing: {check.output}"
                )
                if check.status == HEALTH_CRITICAL:
                    break
            # Consul resets the message after a warning too.
            message = "All checks passing."
        return health, message

    def _deferred_sync(self, check_id: str) -> None:
        check = self.checks.get(check_id)
        if check is None:
            return
        check.deferred_sync = None
        self._sync_check(check)

    def _sync_check(self, check: StoredCheck) -> None:
        if (check.catalog_status, check.catalog_output) == (check.status, check.output):
            return
        check.catalog_status, check.catalog_output = check.status, check.output
        index = self.store.bump()
        check.modify_index = index
        service = self.services.get(check.service_id)
        if service is not None:
            self._touch_service(service, index)
        self.store.changed()


_META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")


def _meta_problem(meta: Mapping[str, str]) -> str | None:
    """
    ``structs.ValidateServiceMetadata`` for a typical service.
    """
    if len(meta) > META_MAX_PAIRS:
        return (
            f"Node metadata cannot contain more than {META_MAX_PAIRS} key/value pairs"
        )
    for key, value in meta.items():
        problem = None
        if key == "":
            problem = "Key cannot be blank"
        elif not _META_KEY.match(key):
            problem = "Key contains invalid characters"
        elif len(key) > META_KEY_MAX:
            problem = f"Key is too long (limit: {META_KEY_MAX} characters)"
        elif key.startswith("consul-"):
            problem = "Key prefix 'consul-' is reserved for internal use"
        elif len(value) > META_VALUE_MAX:
            problem = f"Value is too long (limit: {META_VALUE_MAX} characters)"
        if problem is not None:
            return f"Couldn't load metadata pair ('{key}', '{value}'): {problem}"
    return None


def _node_service_problems(d: ServiceDefinition) -> list[str]:
    """
    ``NodeService.Validate()`` in Consul 1.8: the multi-error list.
    """
    problems = []
    proxy = d.proxy or ProxyConfig()
    if d.kind == KIND_CONNECT_PROXY:
        if not proxy.destination_service_name.strip():
            problems.append(
                "Proxy.DestinationServiceName must be non-empty for Connect proxy "
                "services"
            )
        if d.port == 0:
            problems.append("Port must be set for a Connect proxy")
        if d.connect_native:
            problems.append(
                "A Proxy cannot also be Connect Native, only typical services"
            )
        seen: set[str] = set()
        for upstream in proxy.upstreams:
            name = str(upstream.get("DestinationName", ""))
            dtype = str(upstream.get("DestinationType", "") or "service")
            key = f"{dtype}:{name}"
            if key in seen:
                problems.append(f"upstreams cannot contain duplicates of {key}")
            seen.add(key)
    if d.kind == KIND_MESH_GATEWAY:
        if d.port == 0:
            problems.append(f"Port must be non-zero for a {d.kind}")
        if d.sidecar_given:
            problems.append(f"A {d.kind} cannot have a sidecar service defined")
        if proxy.destination_service_name:
            problems.append(
                "The Proxy.DestinationServiceName configuration is invalid for a "
                f"{d.kind}"
            )
        if proxy.destination_service_id:
            problems.append(
                "The Proxy.DestinationServiceID configuration is invalid for a "
                f"{d.kind}"
            )
        if proxy.local_service_address:
            problems.append(
                f"The Proxy.LocalServiceAddress configuration is invalid for a {d.kind}"
            )
        if proxy.local_service_port:
            problems.append(
                f"The Proxy.LocalServicePort configuration is invalid for a {d.kind}"
            )
        if proxy.upstreams:
            problems.append(
                f"The Proxy.Upstreams configuration is invalid for a {d.kind}"
            )
    if d.sidecar_given and d.sidecar is not None:
        if d.sidecar.id:
            problems.append(
                "A SidecarService cannot specify an ID as this is managed by the agent"
            )
        if d.sidecar.sidecar_given:
            problems.append("A SidecarService cannot have a nested SidecarService")
    return problems
