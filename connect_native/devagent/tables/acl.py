"""
The ACL table: the policies and tokens created through ``/v1/acl/policy``
and ``/v1/acl/token``, the master token, and what a token may do (an
:class:`~connect_native.devagent.tables.acl_rules.Authorizer` over the rules
of its policies and service identities).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from twisted.logger import Logger

from connect_native import _logging
from connect_native.devagent.gocompat import go_quote, rfc3339_nano
from connect_native.devagent.store import (
    ConsulError,
    Settings,
    Store,
    permission_denied,
    random_uuid,
)
from connect_native.devagent.tables.acl_rules import (
    ACL_NOT_FOUND,
    GLOBAL_MANAGEMENT_ID,
    GLOBAL_MANAGEMENT_NAME,
    Authorizer,
    Policy,
    Rules,
    RulesError,
    Token,
    digest,
    is_uuid,
    parse_rules,
    policy_problem,
)

__all__ = ["AclTable"]

log = Logger(observer=_logging.observer)


_SERVICE_IDENTITY_NAME = re.compile(r"^[a-z0-9]([a-z0-9\-_]*[a-z0-9])?$")


class AclTable:
    """
    The ACL system's state: the policies and tokens, the master token, and
    what a token may do (:meth:`resolve_token`).
    """

    def __init__(
        self, store: Store, settings: Settings, master_token: str | None
    ) -> None:
        self.store = store
        self.settings = settings
        self._master_token = master_token
        self._policies: dict[str, Policy] = {}
        self._tokens: dict[str, Token] = {}
        if settings.acl_default_policy is not None:
            # The builtin policy every ACL-enabled cluster has.
            self._policies[GLOBAL_MANAGEMENT_ID] = Policy(
                id=GLOBAL_MANAGEMENT_ID,
                name=GLOBAL_MANAGEMENT_NAME,
                description="Builtin Policy that grants unlimited access",
                rules_text="",
                rules=Rules(),
                hash=digest(GLOBAL_MANAGEMENT_ID),
                create_index=store.index,
                modify_index=store.index,
            )

    @property
    def acls_enabled(self) -> bool:
        return self.settings.acl_default_policy is not None

    def resolve_token(self, token: str) -> Authorizer | None:
        """
        What ``token`` may do: ``None`` with ACLs off (everything), the
        anonymous token's rights (none: the default policy decides) for an
        empty one, everything for the master token.

        :raises ConsulError: 403 ``ACL not found`` for an unknown token.
        """
        if self.settings.acl_default_policy is None:
            return None
        default_allow = self.settings.acl_default_policy == "allow"
        if not token:
            return Authorizer(Rules(), default_allow)
        if token == self._master_token:
            return Authorizer(Rules(), default_allow, management=True)
        found = self._tokens.get(token)
        if found is None:
            raise ConsulError(403, ACL_NOT_FOUND)
        policies = [self._policies[p] for p in found.policy_ids if p in self._policies]
        identities = [
            parse_rules(
                f'service "{name}" {{ policy = "write" }}\n'
                f'service "{name}-sidecar-proxy" {{ policy = "write" }}\n'
                'service_prefix "" { policy = "read" }\n'
                'node_prefix "" { policy = "read" }'
            )
            for name in found.service_identities
        ]
        return Authorizer(
            Rules.merge([*(p.rules for p in policies), *identities]),
            default_allow,
            management=any(p.id == GLOBAL_MANAGEMENT_ID for p in policies),
        )

    def _acl_write(self, authz: Authorizer | None) -> None:
        if authz is None:
            raise ConsulError(401, "ACL support disabled")
        if not authz.allowed("acl", "", "write"):
            raise permission_denied()

    def acl_policy_create(
        self,
        authz: Authorizer | None,
        *,
        name: str,
        description: str,
        rules: str,
    ) -> dict[str, Any]:
        """
        ``PUT /v1/acl/policy``: the new policy.

        :raises ConsulError: 401 with ACLs off, 403 without ``acl =
            "write"``, 500 with Consul's message for a bad name or rules.
        """
        self._acl_write(authz)
        problem = policy_problem(name, [p.name for p in self._policies.values()])
        if problem is not None:
            raise ConsulError(500, problem)
        try:
            parsed = parse_rules(rules)
        except RulesError as e:
            raise ConsulError(500, str(e)) from None
        index = self.store.bump()
        policy_id = random_uuid(self.store.rng)
        policy = Policy(
            id=policy_id,
            name=name,
            description=description,
            rules_text=rules,
            rules=parsed,
            hash=digest(name, description, rules),
            create_index=index,
            modify_index=index,
        )
        self._policies[policy_id] = policy
        log.info("ACL policy created: {name}", name=name)
        return policy.to_json()

    def acl_token_create(
        self,
        authz: Authorizer | None,
        *,
        description: str,
        accessor_id: str,
        secret_id: str,
        policies: Sequence[tuple[str, str]],
        local: bool,
        service_identities: Sequence[str] = (),
    ) -> dict[str, Any]:
        """
        ``PUT /v1/acl/token``: the new token, linked to ``policies`` given as
        ``(id, name)`` pairs (either may be empty), and to the service
        identities named (Consul's templated policy: ``service:write`` on the
        name and its sidecar proxy, read on every service and node).

        :raises ConsulError: 401 with ACLs off, 403 without ``acl =
            "write"``, 500 with Consul's message for a bad or taken ID or an
            unknown policy.
        """
        self._acl_write(authz)
        taken_accessors = {t.accessor_id for t in self._tokens.values()}
        if accessor_id:
            if not is_uuid(accessor_id):
                raise ConsulError(500, "Invalid Token: AccessorID is not a valid UUID")
            if accessor_id in taken_accessors:
                raise ConsulError(500, "Invalid Token: AccessorID is already in use")
        if secret_id:
            if not is_uuid(secret_id):
                raise ConsulError(500, "Invalid Token: SecretID is not a valid UUID")
            if secret_id in self._tokens or secret_id == self._master_token:
                raise ConsulError(500, "Invalid Token: SecretID is already in use")
        linked: list[str] = []
        for policy_id, policy_name in policies:
            if policy_id:
                if policy_id not in self._policies:
                    raise ConsulError(
                        500, f"No such ACL policy with ID {go_quote(policy_id)}"
                    )
                found = policy_id
            else:
                by_name = [
                    p.id for p in self._policies.values() if p.name == policy_name
                ]
                if not by_name:
                    raise ConsulError(
                        500, f"No such ACL policy with name {go_quote(policy_name)}"
                    )
                found = by_name[0]
            if found not in linked:
                linked.append(found)
        for name in service_identities:
            if not _SERVICE_IDENTITY_NAME.match(name):
                raise ConsulError(
                    500,
                    f"Invalid Token: ServiceIdentity.ServiceName {go_quote(name)} "
                    "is not valid (lowercase alphanumeric characters, '-' and '_')",
                )
        index = self.store.bump()
        token = Token(
            accessor_id=accessor_id or random_uuid(self.store.rng),
            secret_id=secret_id or random_uuid(self.store.rng),
            description=description,
            policy_ids=tuple(linked),
            service_identities=tuple(service_identities),
            local=local,
            create_time=rfc3339_nano(self.store.now()),
            hash=digest(description, linked, local),
            create_index=index,
            modify_index=index,
        )
        self._tokens[token.secret_id] = token
        log.info("ACL token created: {description}", description=description)
        return token.to_json({p.id: p.name for p in self._policies.values()})
