"""
``/v1/acl/policy`` and ``/v1/acl/token``; the rest of the ACL API answers
``ACL support disabled`` with ACLs off.
"""

from __future__ import annotations

from twisted.web.server import Request

from connect_native.devagent.gocompat import GoJSONError, decode_go_json
from connect_native.devagent.http.bodies import ACL_POLICY, ACL_TOKEN
from connect_native.devagent.http.handlers import Handlers
from connect_native.devagent.http.wire import Reply
from connect_native.devagent.store import ConsulError
from connect_native.devagent.tables.acl_rules import Authorizer


class AclHandlers(Handlers):
    """
    ``/v1/acl/policy`` and ``/v1/acl/token``.
    """

    def _acl_policy_create(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        authz = self._acl_authz(request)
        try:
            decoded = decode_go_json(self._body(request), ACL_POLICY)
        except GoJSONError as e:
            raise ConsulError(
                400, f"Bad request: Policy decoding failed: {e}"
            ) from None
        reply.json(
            self.agent.acl_policy_create(
                authz,
                name=decoded["Name"] or "",
                description=decoded["Description"] or "",
                rules=decoded["Rules"] or "",
            )
        )

    def _acl_token_create(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        authz = self._acl_authz(request)
        try:
            decoded = decode_go_json(self._body(request), ACL_TOKEN)
        except GoJSONError as e:
            raise ConsulError(400, f"Bad request: Token decoding failed: {e}") from None
        links = [
            (link["ID"] or "", link["Name"] or "")
            for link in decoded["Policies"] or []
            if link is not None
        ]
        identities = [
            identity["ServiceName"] or ""
            for identity in decoded["ServiceIdentities"] or []
            if identity is not None
        ]
        reply.json(
            self.agent.acl_token_create(
                authz,
                service_identities=identities,
                description=decoded["Description"] or "",
                accessor_id=decoded["AccessorID"] or "",
                secret_id=decoded["SecretID"] or "",
                policies=links,
                local=bool(decoded["Local"]),
            )
        )

    def _acl_other(
        self, request: Request, reply: Reply, rest: str, method: str
    ) -> None:
        """
        The ACL endpoints the agent does not model: ``ACL support disabled``
        with ACLs off, as Consul; with them on, 404 (not modelled).
        """
        self._acl_authz(request)
        reply.send(404, b"", content_type=None, vary=False)

    def _acl_authz(self, request: Request) -> Authorizer | None:
        if not self.agent.acls_enabled:
            # aclDisabled: before the token is looked at.
            raise ConsulError(401, "ACL support disabled")
        return self._authz(request)
