"""
The Connect CA table: roots and their indexes, the CA configuration with the
built-in provider's rules, and the leaf cache
(``agent/cache-types/connect_ca_leaf.go`` on ``agent/cache``).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from attrs import define, field, frozen
from cryptography import x509
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from connect_native import _logging
from connect_native.devagent.ca import DevCA, IssuedLeaf, LeafRequestError
from connect_native.devagent.gocompat import (
    GoDurationError,
    format_config_duration,
    format_go_duration,
    go_asn1_problem,
    go_pem_decode,
    go_quote,
    parse_go_duration,
)
from connect_native.devagent.store import (
    NANOSECOND,
    ConsulError,
    Settings,
    Store,
    stagger,
)

log = Logger(observer=_logging.observer)


# The agent cache's fetch timeout for blocking types (agent/cache/cache.go:
# "fOpts.Timeout = 10 * time.Minute" when the type sets none).
CACHE_FETCH_TIMEOUT = 600.0
# agent/cache-types/connect_ca_leaf.go caChangeJitterWindow.
CA_CHANGE_JITTER = 30.0
# Leaves whose whole lifetime is shorter than this are renewed at once
# (calculateSoftExpiry).
MIN_LEAF_LIFETIME_FOR_JITTER = 600.0
MAX_LEAF_TTL = 100 * 365 * 86400.0


@frozen
class LeafAnswer:
    """
    What the leaf endpoint answers: the leaf JSON, its index, and the cache
    metadata (``X-Cache``, ``Age`` in seconds on a hit).
    """

    body: dict[str, Any]
    index: int
    cache_hit: bool
    age: float | None


@frozen
class CAConfigInput:
    """
    A decoded ``PUT /v1/connect/ca/configuration`` body.
    """

    provider: str = ""
    config: Mapping[str, Any] | None = None
    force_without_cross_signing: bool = False


@define
class _LeafEntry:
    leaf: IssuedLeaf
    index: int
    fetched_at: float
    force_expire_after: float | None = None
    fetch: _LeafFetch | None = None
    waiters: list[Callable[[], None]] = field(factory=list)


class _LeafFetch:
    """
    One background fetch of the leaf cache: it runs until a new certificate
    is issued (at the renewal point, or after a root rotation and its jitter)
    or for ten minutes, whichever comes first, independently of the requests
    that started it, as in Consul's agent cache.
    """

    def __init__(self, table: ConnectCA, key: tuple[str, str], entry: _LeafEntry):
        self._table = table
        self._key = key
        self._entry = entry
        self._timeout: IDelayedCall | None = None
        self._expiry: IDelayedCall | None = None
        self._expires_at = 0.0
        self.done = False

    def start(self) -> None:
        table, entry = self._table, self._entry
        now = table.store.now()
        earliest, latest = _soft_expiry(now, entry.leaf)
        self._expires_at = earliest + stagger(table.store.rng, latest - earliest)
        if (
            entry.force_expire_after is not None
            and entry.force_expire_after < self._expires_at
        ):
            self._expires_at = entry.force_expire_after
        if self._expires_at <= now:
            self.renew()
            return
        self._timeout = table.store.clock.callLater(
            CACHE_FETCH_TIMEOUT, self.complete, None
        )
        self._expiry = table.store.clock.callLater(self._expires_at - now, self.renew)
        # Consul's fetch starts by checking the roots once, so a blocking call
        # at a stale leaf's index schedules its renewal.
        self.roots_changed()

    def roots_changed(self) -> None:
        if self.done:
            return
        table, entry = self._table, self._entry
        if table.ca.active_root_id == entry.leaf.root_id:
            return
        now = table.store.now()
        delay = stagger(table.store.rng, CA_CHANGE_JITTER)
        entry.force_expire_after = now + delay
        if entry.force_expire_after < self._expires_at:
            self._expires_at = entry.force_expire_after
            if self._expiry is not None and self._expiry.active():
                self._expiry.cancel()
            self._expiry = table.store.clock.callLater(delay, self.renew)

    def renew(self) -> None:
        if self.done:
            return
        service, datacenter = self._key
        try:
            leaf = self._table._issue_leaf(service, datacenter)
        except Exception:
            log.failure(
                "renewing the leaf certificate for {service!r}", service=service
            )
            self.complete(None)
            return
        self.complete(leaf)

    def complete(self, leaf: tuple[IssuedLeaf, int] | None) -> None:
        if self.done:
            return
        self.done = True
        for call in (self._timeout, self._expiry):
            if call is not None and call.active():
                call.cancel()
        entry = self._entry
        entry.fetch = None
        entry.fetched_at = self._table.store.now()
        if leaf is not None:
            entry.leaf, entry.index = leaf
            entry.force_expire_after = None
        waiters, entry.waiters = entry.waiters, []
        for waiter in waiters:
            waiter()


def _soft_expiry(now: float, leaf: IssuedLeaf) -> tuple[float, float]:
    """
    ``calculateSoftExpiry``: the window in which a blocking caller's leaf is
    renewed, 60 % to 90 % of its lifetime; ``(now, now)`` when it is due.
    """
    valid_after = leaf.valid_after.timestamp()
    lifetime = leaf.valid_before.timestamp() - valid_after
    if lifetime < MIN_LEAF_LIFETIME_FOR_JITTER:
        return now, now
    soft = valid_after + lifetime * 0.6
    hard = valid_after + lifetime * 0.9
    if now > hard:
        return now, now
    return max(soft, now), hard


class ConnectCA:
    """
    The CA's side of the agent: the roots with their indexes, the CA
    configuration (``/v1/connect/ca/configuration``), and the agent's leaf
    cache, which renews leaves in the background as Consul's does.
    """

    def __init__(self, store: Store, settings: Settings, ca: DevCA | None) -> None:
        self.store = store
        self.settings = settings
        # Indexes as a fresh `consul agent -dev` has them: CA configuration
        # at 5, the first root at 9.
        store.index = 5
        self._ca_config_create_index = 5
        self._ca_config_modify_index = 5
        store.index = 8
        self._ca_index_step = 1
        if ca is None:
            ca = DevCA(
                store.clock,
                datacenter=settings.datacenter,
                rng=store.rng,
                next_index=self._ca_index,
            )
        self.ca = ca
        store.index = max(store.index, 9)
        self._roots_modify_index = 9
        self._root_indexes: dict[str, list[int]] = {
            root.id: [9, 9] for root in ca.roots().roots
        }
        self._ca_config: dict[str, Any] | None = {
            "IntermediateCertTTL": "8760h",
            "LeafCertTTL": format_config_duration(ca.leaf_ttl),
            "RotationPeriod": "2160h",
        }
        self._ca_force_without_cross_signing = False
        self._ca_key_pair = ("", "")
        self._leaves: dict[tuple[str, str], _LeafEntry] = {}
        self._roots_cached = False

    def _ca_index(self) -> int:
        # The CA's writes: one raft entry, or two while a leaf is signed.
        return self.store.bump(self._ca_index_step)

    @property
    def roots_index(self) -> int:
        """
        The index of the roots endpoints: the roots or the CA configuration,
        whichever changed last (a configuration change without a new root
        still moves it, as measured).
        """
        return max(self._roots_modify_index, self._ca_config_modify_index)

    def roots_json(self) -> dict[str, Any]:
        roots = self.ca.roots()
        body = roots.to_json()
        for root in body["Roots"]:
            indexes = self._root_indexes.get(root["ID"])
            if indexes is not None:
                root["CreateIndex"], root["ModifyIndex"] = indexes
        return body

    def roots_cache_lookup(self) -> bool:
        """
        Whether the agent's roots cache already held an entry (``X-Cache``),
        filling it.
        """
        hit, self._roots_cached = self._roots_cached, True
        return hit

    def ca_config_json(self) -> dict[str, Any]:
        config = self._ca_config
        return {
            "Provider": "consul",
            "Config": (
                None
                if config is None
                else {k: copy.deepcopy(config[k]) for k in sorted(config)}
            ),
            "State": None,
            "ForceWithoutCrossSigning": self._ca_force_without_cross_signing,
            "CreateIndex": self._ca_config_create_index,
            "ModifyIndex": self._ca_config_modify_index,
        }

    def set_ca_config(self, request: CAConfigInput) -> None:
        """
        ``PUT /v1/connect/ca/configuration``: check and store the
        configuration, set the leaf lifetime, and rotate the root when the
        supplied ``PrivateKey``/``RootCert`` change.

        :raises ConsulError: with Consul's message (500).
        """
        stored = (
            None if request.config is None else _go_json_numbers(dict(request.config))
        )
        if request.provider == "consul" and _go_equal(stored, self._ca_config):
            # ConfigurationSet returns at once for the configuration already
            # stored (reflect.DeepEqual): nothing is checked or written.
            return
        raw = dict(request.config or {})
        if request.provider != "consul":
            raise ConsulError(500, _other_provider_problem(request.provider, raw))
        parsed = _parse_consul_ca_config(raw)
        private_key, root_cert = key_pair = (parsed["PrivateKey"], parsed["RootCert"])
        if root_cert and not private_key:
            raise ConsulError(
                500,
                "error configuring provider: must provide a private key when "
                "providing a root cert",
            )
        problem = _validate_consul_ca_config(parsed)
        if problem is not None:
            raise ConsulError(500, f"error configuring provider: {problem}")
        leaf_ttl = parsed["LeafCertTTL"] * NANOSECOND
        if not 0 < leaf_ttl <= MAX_LEAF_TTL:
            # Consul would accept these with SkipValidate and sign leaves that
            # are already expired or whose dates overflow.
            raise ConsulError(
                500,
                "error configuring provider: the development agent needs a "
                "LeafCertTTL above 0 and at most 876000h (100 years), not "
                + format_go_duration(parsed["LeafCertTTL"]),
            )
        rotate = key_pair != self._ca_key_pair
        before = self.ca.active_root_id
        index_before = self.store.index
        if rotate:
            if root_cert:
                root_problem = _go_root_problem(root_cert)
                if root_problem is not None:
                    raise ConsulError(500, root_problem)
            self._ca_index_step = 1
            if private_key and not root_cert:
                # GenerateRoot makes a root for the key (ca-key-only-*.http).
                try:
                    self.ca.rotate(private_key)
                except ValueError:
                    signer_problem = _go_signer_problem(private_key)
                    raise ConsulError(
                        500,
                        "error generating CA root certificate: error generating "
                        f"CA: error parsing private key {go_quote(private_key)}: "
                        f"{signer_problem}",
                    ) from None
            elif private_key:
                try:
                    self.ca.rotate(private_key, root_cert)
                except ValueError as e:
                    raise ConsulError(500, f"error configuring provider: {e}") from None
            else:
                self.ca.rotate()
        self.ca.set_leaf_ttl(leaf_ttl)
        self._ca_key_pair = key_pair
        self._ca_config = stored
        self._ca_force_without_cross_signing = request.force_without_cross_signing
        rotated = self.ca.active_root_id != before
        if rotated:
            if self.store.index == index_before:
                self.store.bump()
            roots_index = self.store.index
            for root in self.ca.roots().roots:
                if root.id not in self._root_indexes:
                    self._root_indexes[root.id] = [roots_index, roots_index]
                else:
                    self._root_indexes[root.id][1] = roots_index
            self._roots_modify_index = roots_index
            log.info(
                "CA root rotated: {old} -> {new}",
                old=before,
                new=self.ca.active_root_id,
            )
        self._ca_config_modify_index = self.store.bump()
        if rotated:
            for entry in self._leaves.values():
                if entry.fetch is not None:
                    entry.fetch.roots_changed()
        self.store.changed()

    def _issue_leaf(self, service: str, datacenter: str) -> tuple[IssuedLeaf, int]:
        # Each signing is two raft writes in Consul (the serial, then the
        # certificate), so leaf indexes go up by two.
        before = self.store.index
        self._ca_index_step = 2
        try:
            leaf = self.ca.sign_leaf(service, datacenter=datacenter)
        finally:
            self._ca_index_step = 1
        if self.store.index == before:
            # A CA not wired to this agent's indexes.
            self.store.bump(2)
        index = self.store.index
        log.info(
            "issued leaf {serial} for {service!r} at index {index}",
            serial=leaf.serial_number,
            service=service,
            index=index,
        )
        return leaf, index

    def _leaf_answer(self, entry: _LeafEntry, *, hit: bool) -> LeafAnswer:
        body = entry.leaf.to_json()
        body["CreateIndex"] = body["ModifyIndex"] = entry.index
        age = self.store.now() - entry.fetched_at if hit else None
        return LeafAnswer(body=body, index=entry.index, cache_hit=hit, age=age)

    def leaf(
        self,
        service: str,
        *,
        min_index: int = 0,
        wait: float | None = None,
        datacenter: str | None = None,
    ) -> Deferred[LeafAnswer]:
        """
        ``GET /v1/agent/connect/ca/leaf/<service>`` through the agent's leaf
        cache: a cached leaf at once (a hit, even if a rotation made it
        stale), the first leaf for a name at once, and for a blocking call at
        the current index a leaf renewed at 60-90 % of its lifetime, 0-30 s
        after a root rotation, at once when its lifetime is under ten
        minutes, or the same leaf after ``wait`` (never, for ``None``).

        :raises ConsulError: for a name Consul refuses or another datacenter.
        """
        dc = self.settings.datacenter if datacenter is None else datacenter
        if dc != self.settings.datacenter:
            raise ConsulError(500, "No path to datacenter")
        key = (service, dc)
        entry = self._leaves.get(key)
        hit = entry is not None
        if entry is None:
            try:
                leaf, index = self._issue_leaf(service, dc)
            except LeafRequestError as e:
                raise ConsulError(500, str(e)) from None
            entry = _LeafEntry(leaf=leaf, index=index, fetched_at=self.store.now())
            self._leaves[key] = entry
        if not (min_index > 0 and min_index >= entry.index):
            return succeed(self._leaf_answer(entry, hit=hit))

        timer: IDelayedCall | None = None
        cache_entry = entry

        def stop() -> None:
            if waiter in cache_entry.waiters:
                cache_entry.waiters.remove(waiter)
            if timer is not None and timer.active():
                timer.cancel()

        result: Deferred[LeafAnswer] = Deferred(lambda d: stop())

        def waiter() -> None:
            # A fetch finished: answer if the leaf moved past the caller's
            # index, else keep the cache fetching.
            if result.called:
                return
            if cache_entry.index > min_index:
                stop()
                result.callback(self._leaf_answer(cache_entry, hit=False))
            else:
                cache_entry.waiters.append(waiter)
                self.store.clock.callLater(0, self._start_leaf_fetch, key)

        def expire() -> None:
            if not result.called:
                stop()
                result.callback(self._leaf_answer(cache_entry, hit=False))

        if wait is not None and wait > 0:
            timer = self.store.clock.callLater(wait, expire)
        entry.waiters.append(waiter)
        self._start_leaf_fetch(key)
        return result

    def _start_leaf_fetch(self, key: tuple[str, str]) -> None:
        entry = self._leaves.get(key)
        if entry is None or entry.fetch is not None or not entry.waiters:
            return
        fetch = _LeafFetch(self, key, entry)
        entry.fetch = fetch
        fetch.start()


# --------------------------------------------------------------------------
# the built-in CA provider's configuration (mapstructure onto
# ConsulCAProviderConfig)

_CA_DURATION_KEYS = ("LeafCertTTL", "RotationPeriod", "IntermediateCertTTL")
_CA_FIELDS: dict[str, str] = {
    "LeafCertTTL": "duration",
    "SkipValidate": "bool",
    "CSRMaxPerSecond": "float",
    "CSRMaxConcurrent": "int",
    "PrivateKeyType": "string",
    "PrivateKeyBits": "int",
    "PrivateKey": "string",
    "RootCert": "string",
    "RotationPeriod": "duration",
    "IntermediateCertTTL": "duration",
    "DisableCrossSigning": "bool",
}
_GO_TYPES = {
    "duration": "time.Duration",
    "bool": "bool",
    "float": "float32",
    "int": "int",
    "string": "string",
}


# strconv.ParseBool's spellings.
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def _go_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    if isinstance(value, dict):
        return "map[string]interface {}"
    return "interface {}"


def _parse_consul_ca_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    parsed: dict[str, Any] = {
        "LeafCertTTL": 72 * 3_600_000_000_000,
        "SkipValidate": False,
        "CSRMaxPerSecond": 50.0,
        "CSRMaxConcurrent": 0,
        "PrivateKeyType": "ec",
        "PrivateKeyBits": 256,
        "PrivateKey": "",
        "RootCert": "",
        "RotationPeriod": 2160 * 3_600_000_000_000,
        "IntermediateCertTTL": 8760 * 3_600_000_000_000,
        "DisableCrossSigning": False,
    }
    names = {k.lower(): k for k in _CA_FIELDS}
    errors = []
    for key, value in raw.items():
        name = names.get(key.lower())
        if name is None or value is None:
            continue
        kind = _CA_FIELDS[name]
        unconvertible = (
            f"'{name}' expected type '{_GO_TYPES[kind]}', got unconvertible type "
            f"'{_go_kind(value)}'"
        )
        if kind == "duration":
            if isinstance(value, str):
                try:
                    parsed[name] = parse_go_duration(value)
                except GoDurationError as e:
                    errors.append(f"error decoding '{name}': {e}")
            elif isinstance(value, int | float):
                # mapstructure's weak typing: true is 1ns, false 0.
                parsed[name] = int(value)
            else:
                errors.append(unconvertible)
        elif kind == "bool":
            if isinstance(value, bool):
                parsed[name] = value
            elif isinstance(value, str):
                # mapstructure's weak decoding: strconv.ParseBool, or "".
                if value in _GO_TRUE or value in _GO_FALSE or value == "":
                    parsed[name] = value in _GO_TRUE
                else:
                    errors.append(
                        f"cannot parse '{name}' as bool: strconv.ParseBool: "
                        f"parsing {go_quote(value)}: invalid syntax"
                    )
            elif isinstance(value, int | float):
                parsed[name] = value != 0
            else:
                errors.append(unconvertible)
        elif kind in ("int", "float"):
            if isinstance(value, bool):
                parsed[name] = int(value)
            elif isinstance(value, int | float) and math.isfinite(value):
                parsed[name] = int(value) if kind == "int" else float(value)
            elif isinstance(value, str):
                try:
                    parsed[name] = int(value, 0) if kind == "int" else float(value)
                except ValueError:
                    errors.append(
                        f"cannot parse '{name}' as {_GO_TYPES[kind]}: "
                        f"strconv.Parse{'Int' if kind == 'int' else 'Float'}: parsing "
                        f"{go_quote(value)}: invalid syntax"
                    )
            else:
                errors.append(unconvertible)
        else:
            if isinstance(value, str):
                parsed[name] = value
            elif isinstance(value, bool | int | float):
                parsed[name] = json.dumps(value)
            else:
                errors.append(unconvertible)
    if errors:
        errors.sort()
        listed = "\n".join(f"* {e}" for e in errors)
        raise ConsulError(
            500,
            "error configuring provider: error decoding config: "
            f"{len(errors)} error(s) decoding:\n\n{listed}",
        )
    return parsed


def _other_provider_problem(provider: str, raw: Mapping[str, Any]) -> str:
    """
    What Consul 1.8.7 answers for a provider other than ``consul`` without
    its backend, or the development agent's refusal.
    """
    given = {k.lower(): v for k, v in raw.items()}
    if provider == "vault":
        if not given.get("token"):
            return "error configuring provider: must provide a Vault token"
        if not given.get("rootpkipath"):
            return (
                "error configuring provider: must provide a valid path to a root "
                "PKI backend"
            )
    elif provider == "aws-pca":
        return (
            "error generating CA root certificate: MissingRegion: could not find "
            "region configuration"
        )
    else:
        return (
            f"could not initialize provider: unknown CA provider {go_quote(provider)}"
        )
    return (
        f"error configuring provider: the development agent has no {provider!r} "
        'CA provider; use the built-in "consul" provider'
    )


def _validate_consul_ca_config(parsed: Mapping[str, Any]) -> str | None:
    """
    ``CommonCAProviderConfig.Validate`` in Consul 1.8.
    """
    if parsed["SkipValidate"]:
        return None
    hour = 3_600_000_000_000
    if parsed["LeafCertTTL"] < hour:
        return "leaf cert TTL must be greater or equal than 1h0m0s"
    if parsed["LeafCertTTL"] > 8760 * hour:
        return "leaf cert TTL must be less than 8760h0m0s"
    if parsed["IntermediateCertTTL"] < 3 * hour:
        return "Intermediate Cert TTL must be greater or equal than 3h"
    if parsed["IntermediateCertTTL"] < 3 * parsed["LeafCertTTL"]:
        return (
            "Intermediate Cert TTL must be greater or equal than 3 * LeafCertTTL "
            f"(>={format_go_duration(3 * parsed['LeafCertTTL'])})."
        )
    key_type, bits = parsed["PrivateKeyType"], parsed["PrivateKeyBits"]
    if key_type == "ec":
        if bits not in (224, 256, 384, 521):
            return "EC key length must be one of (224, 256, 384, 521) bits"
    elif key_type == "rsa":
        if bits not in (2048, 4096):
            return "RSA key length must be 2048 or 4096 bits"
    else:
        return "private key type must be either 'ec' or 'rsa'"
    return None


def _go_equal(a: Any, b: Any) -> bool:
    """
    ``reflect.DeepEqual`` on two decoded ``interface{}`` values: a bool is
    never a number, a nil map is not an empty one.
    """
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_go_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_go_equal, a, b))
    return type(a) is type(b) and a == b


# What the development agent says when its parser refuses DER that Go's gets
# further into: the texts past the first field are not modelled.
_UNREAD_DER = "the development agent cannot read this DER (Go would name the problem)"


def _go_signer_problem(pem: str) -> str:
    """
    What ``connect.ParseSigner`` says about a key that does not load.
    """
    block = go_pem_decode(pem)
    if block is None:
        return "no PEM-encoded data found"
    kind, der = block
    if kind == "EC PRIVATE KEY":
        problem = go_asn1_problem(der, "ecPrivateKey", (2, "int"))
        return f"x509: failed to parse EC private key: {problem or _UNREAD_DER}"
    if kind == "RSA PRIVATE KEY":
        return go_asn1_problem(der, "pkcs1PrivateKey", (2, "int")) or _UNREAD_DER
    if kind == "PRIVATE KEY":
        return go_asn1_problem(der, "pkcs8", (2, "int")) or _UNREAD_DER
    return f"unknown PEM block type for signing key: {kind}"


def _go_root_problem(pem: str) -> str | None:
    """
    What ``parseCARoot`` says about a supplied root, or ``None`` when it
    parses (or fails only where the development agent's own checks will name
    the problem): its fingerprint first (``connect.ParseCert``'s PEM checks),
    then the certificate.
    """
    block = go_pem_decode(pem)
    if block is None:
        return "error parsing root fingerprint: no PEM-encoded data found"
    kind, der = block
    if kind != "CERTIFICATE":
        return (
            "error parsing root fingerprint: first PEM-block should be CERTIFICATE type"
        )
    problem = go_asn1_problem(der, "certificate", (16, "tbsCertificate"))
    if problem is None:
        try:
            x509.load_der_x509_certificate(der)
        except ValueError:
            problem = _UNREAD_DER
        else:
            return None
    return f"error parsing root cert: {problem}"


def _go_json_numbers(value: Any) -> Any:
    """
    A decoded ``interface{}`` as Go re-encodes it: every number is a
    float64, so ``1.0`` comes back as ``1``.
    """
    if isinstance(value, dict):
        return {k: _go_json_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_go_json_numbers(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    return value
