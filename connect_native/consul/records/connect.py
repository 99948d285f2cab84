"""
Connect's CA and the agent's Connect endpoints: the CA roots and
configuration, a service's leaf certificate, and the answer of
``/v1/agent/connect/authorize``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from attrs import field, frozen

from connect_native.consul.errors import ConsulResponseError
from connect_native.consul.records._base import (
    FrozenDict,
    JSONObject,
    freeze,
    kind_of,
    thaw,
)

__all__ = [
    "AuthorizeResult",
    "CAConfiguration",
    "CARoot",
    "CARoots",
    "LeafCert",
    "decode_authorize",
    "decode_ca_configuration",
    "decode_ca_roots",
    "decode_leaf",
]


# -- CA roots ----------------------------------------------------------------


@frozen
class CARoot:
    """
    One Connect CA root.  ``serial_number`` is the low 64 bits of the
    certificate's serial (a JSON number); ``intermediate_certs_pem`` holds the
    PEMs (a cross-signed root after a rotation) that leaves signed under this
    root carry in their chain.
    """

    id: str
    name: str
    serial_number: int
    signing_key_id: str
    external_trust_domain: str
    not_before: datetime
    not_after: datetime
    root_cert_pem: str = field(repr=False)
    intermediate_certs_pem: tuple[str, ...] = field(repr=False)
    active: bool
    private_key_type: str
    private_key_bits: int
    create_index: int
    modify_index: int


@frozen
class CARoots:
    """
    All the roots of the Connect CA, active and inactive: a peer's chain must
    be verified against every one of them.
    """

    active_root_id: str
    trust_domain: str
    roots: tuple[CARoot, ...]

    @property
    def active_root(self) -> CARoot | None:
        for root in self.roots:
            if root.active:
                return root
        return None


def _decode_root(root: JSONObject) -> CARoot:
    intermediates = []
    for path, pem in root.items("IntermediateCerts", required=False):
        if not isinstance(pem, str):
            raise ConsulResponseError(
                f"{root.what}: field {path!r} is {kind_of(pem)}, expected a string"
            )
        intermediates.append(pem)
    return CARoot(
        id=root.string("ID"),
        name=root.opt_str("Name"),
        serial_number=root.integer("SerialNumber"),
        signing_key_id=root.opt_str("SigningKeyID"),
        external_trust_domain=root.opt_str("ExternalTrustDomain"),
        not_before=root.timestamp("NotBefore"),
        not_after=root.timestamp("NotAfter"),
        root_cert_pem=root.string("RootCert"),
        intermediate_certs_pem=tuple(intermediates),
        active=root.boolean("Active"),
        private_key_type=root.opt_str("PrivateKeyType"),
        private_key_bits=root.opt_int("PrivateKeyBits"),
        create_index=root.opt_int("CreateIndex"),
        modify_index=root.opt_int("ModifyIndex"),
    )


def decode_ca_roots(value: object) -> CARoots:
    body = JSONObject("ca roots", value)
    return CARoots(
        active_root_id=body.opt_str("ActiveRootID"),
        trust_domain=body.string("TrustDomain"),
        roots=tuple(_decode_root(r) for r in body.objs("Roots", required=False)),
    )


# -- CA configuration ----------------------------------------------------------


def _config_repr(config: Mapping[str, object]) -> str:
    # The configuration may hold the CA's private key in clear (Consul echoes
    # a user-supplied PrivateKey); a repr must never print it.
    return f"<keys {sorted(config)!r}>"


@frozen
class CAConfiguration:
    """
    ``GET /v1/connect/ca/configuration``.  ``config`` is the provider's
    free-form configuration (``LeafCertTTL``, ``RotationPeriod``, possibly a
    ``PrivateKey``), made immutable; its repr lists only the keys.
    """

    provider: str
    config: FrozenDict[str, object] = field(repr=_config_repr)
    force_without_cross_signing: bool = False
    create_index: int = 0
    modify_index: int = 0

    def config_json(self) -> dict[str, object]:
        """The configuration as plain JSON values, e.g. to modify and PUT."""
        thawed = thaw(self.config)
        assert isinstance(thawed, dict)
        return thawed


def decode_ca_configuration(value: object) -> CAConfiguration:
    body = JSONObject("ca configuration", value)
    config = body.opt_obj("Config")
    frozen_config = freeze(config.data if config is not None else {})
    assert isinstance(frozen_config, FrozenDict)
    return CAConfiguration(
        provider=body.string("Provider"),
        config=frozen_config,
        force_without_cross_signing=body.opt_bool("ForceWithoutCrossSigning"),
        create_index=body.opt_int("CreateIndex"),
        modify_index=body.opt_int("ModifyIndex"),
    )


# -- leaf certificates ---------------------------------------------------------


@frozen
class LeafCert:
    """
    A leaf certificate issued by the agent for ``service``.

    ``serial_number`` is Consul's hex string (``"08"``); ``cert_pem`` may be
    a chain (the leaf followed by intermediates); ``private_key_pem`` is a
    SEC1 EC key and is left out of the repr.
    """

    serial_number: str
    cert_pem: str = field(repr=False)
    private_key_pem: str = field(repr=False)
    service: str
    service_uri: str
    valid_after: datetime
    valid_before: datetime
    create_index: int
    modify_index: int


def decode_leaf(value: object) -> LeafCert:
    body = JSONObject("leaf", value)
    return LeafCert(
        serial_number=body.string("SerialNumber"),
        cert_pem=body.string("CertPEM"),
        private_key_pem=body.string("PrivateKeyPEM"),
        service=body.string("Service"),
        service_uri=body.string("ServiceURI"),
        valid_after=body.timestamp("ValidAfter"),
        valid_before=body.timestamp("ValidBefore"),
        create_index=body.integer("CreateIndex"),
        modify_index=body.integer("ModifyIndex"),
    )


# -- authorize -----------------------------------------------------------------


@frozen
class AuthorizeResult:
    """
    The agent's answer to ``POST /v1/agent/connect/authorize``.  ``reason``
    is carried verbatim: its wording changes between Consul versions, so
    nothing may depend on it.
    """

    authorized: bool
    reason: str


def decode_authorize(value: object) -> AuthorizeResult:
    body = JSONObject("authorize", value)
    return AuthorizeResult(
        authorized=body.boolean("Authorized"), reason=body.string("Reason")
    )
