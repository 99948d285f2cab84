"""
The development agent held to issue 20's captures of a real 1.8.7 agent
(``tests/fixtures/real-1.8.7/{ca20,ca20b,ca20err,ca20x,misc20}-*.http``, taken by
``capture_issue20.py``): every capture's request is replayed, in capture
order, against a fresh in-process agent on a ``Clock``, and the answer is
compared with the real one.

What differs from run to run (root IDs, trust domain, times, the serials and
names of supplied roots) is compared by structure: roots are named by their
role in the sequence (``generated-1``, ``supplied``...), which root is active,
which carry a cross-signed certificate and from which root, in which order
(by ID, as Consul's state store lists them).  Error bodies are compared byte
for byte; indexes exactly, since both agents count them the same way.
"""

from __future__ import annotations

import base64
import json
from functools import cache
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from connect_native.devagent.gocompat import go_asn1_problem, go_pem_decode
from tests.roots import new_root
from tests.test_devagent_support import CAPTURES, Answer, Capture, Harness, load, shape

# Which captures one agent answered, in capture order (index.tsv rows are
# appended as the script takes them).  ``misc20`` followed ``ca20b`` on the
# same agent (its roots-0 lists ca20b's three roots).
SEQUENCES: dict[str, tuple[str, ...]] = {
    "ca20": ("ca20-",),
    "ca20b": ("ca20b-", "misc20-"),
    "ca20err": ("ca20err-",),
    "ca20x": ("ca20x-",),
}


def _index_rows() -> list[str]:
    rows = (CAPTURES / "index.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [row.split("\t", 1)[0] for row in rows]


def sequence_of(prefixes: tuple[str, ...]) -> list[str]:
    names = _index_rows()
    return [n for prefix in prefixes for n in names if n.startswith(prefix)]


ALL = [(seq, name) for seq, pre in SEQUENCES.items() for name in sequence_of(pre)]
CA = "/v1/connect/ca/configuration"


@cache
def replay(sequence: str) -> dict[str, Answer]:
    """
    Every request of ``sequence`` sent, in order, to one fresh agent.
    """
    harness = Harness(node_name="h22")
    answers = {}
    for name in sequence_of(SEQUENCES[sequence]):
        capture = load(name)
        answers[name] = harness.call(capture.method, capture.path, capture.request_body)
    return answers


def test_every_issue20_capture_is_replayed() -> None:
    names = {n for _, n in ALL}
    on_disk = {
        p.name
        for prefix in ("ca20-", "ca20b-", "ca20err-", "ca20x-", "misc20-")
        for p in CAPTURES.glob(f"{prefix}*.http")
    }
    assert names == on_disk
    assert len(names) == 75 + 51


# --------------------------------------------------------------------------
# indexes, by rank: a real -dev agent also writes to raft in the background
# (coordinates, its node), so the values differ from run to run, but which
# steps move an index and which index is above which do not.


def _indexes(answers: list[tuple[dict[str, str], str]]) -> set[int]:
    seen = set()
    for headers, body in answers:
        if "X-Consul-Index" in headers:
            seen.add(int(headers["X-Consul-Index"]))
        if body.startswith("{"):
            data = json.loads(body)
            for item in [data, *data.get("Roots", [])]:
                for key in ("CreateIndex", "ModifyIndex"):
                    if key in item:
                        seen.add(item[key])
    return seen


def run_of(name: str) -> str:
    """
    The capture script run (its ``sequence`` argument) that took ``name``.
    """
    return name.split("-", 1)[0] + "-"


@cache
def index_ranks(run: str, *, real: bool) -> dict[int, int]:
    """
    Each index value one run of the script saw, by rank.  Ranked per run,
    not per agent: between two runs on one agent (ca20b, then misc20) the
    real agent's indexes moved on their own.
    """
    sequence = next(seq for seq, prefixes in SEQUENCES.items() if run in prefixes)
    names = [n for n in sequence_of(SEQUENCES[sequence]) if n.startswith(run)]
    if real:
        answers = [(load(n).headers, load(n).body) for n in names]
    else:
        answers = [
            (replay(sequence)[n].headers, replay(sequence)[n].text) for n in names
        ]
    return {value: rank for rank, value in enumerate(sorted(_indexes(answers)))}


# --------------------------------------------------------------------------
# roots, named by role


def _cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode("ascii"))


def _public(pem_key: str) -> bytes:
    key = serialization.load_pem_private_key(pem_key.encode("ascii"), password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class RootNames:
    """
    Names for one agent's roots that mean the same in every run: a supplied
    root by its file, a root made for a supplied key by the key's file, a
    generated one by the order it appeared in.
    """

    def __init__(self, sequence: str, *, real: bool) -> None:
        self.real = real
        self.names: dict[str, str] = {}
        self.generated = 0
        self.supplied = {
            (CAPTURES / p.name).read_text(encoding="ascii"): p.name
            for p in CAPTURES.glob(f"{sequence}-*.pem")
            if not p.name.endswith(".key.pem")
        }
        self.keys = {
            _public(p.read_text(encoding="ascii")): p.name
            for p in CAPTURES.glob(f"{sequence}-*.key.pem")
            if (CAPTURES / p.name.replace(".key.pem", ".pem")).exists() is False
        }

    def name(self, root: dict[str, Any]) -> str:
        if root["ID"] not in self.names:
            if root["RootCert"] in self.supplied:
                label = "supplied " + self.supplied[root["RootCert"]]
            elif _spki(_cert(root["RootCert"])) in self.keys:
                label = "made for " + self.keys[_spki(_cert(root["RootCert"]))]
            else:
                self.generated += 1
                label = f"generated-{self.generated}"
            self.names[root["ID"]] = label
        return self.names[root["ID"]]

    def view(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        ranks = index_ranks(run_of(name), real=self.real)
        roots = body["Roots"]
        for root in sorted(roots, key=lambda r: r["CreateIndex"]):
            self.name(root)
        by_subject = {_cert(r["RootCert"]).subject: self.name(r) for r in roots}
        listed = []
        for root in roots:
            cert = _cert(root["RootCert"])
            crossed = None
            if root["IntermediateCerts"] is not None:
                crossed = []
                for pem in root["IntermediateCerts"]:
                    ic = _cert(pem)
                    assert ic.subject == cert.subject
                    assert _spki(ic) == _spki(cert)
                    crossed.append((by_subject.get(ic.issuer, "?"), ic.serial_number))
            generated = not self.name(root).startswith("supplied")
            listed.append(
                {
                    "root": self.name(root),
                    "Active": root["Active"],
                    "cross-signed by": crossed,
                    "key": (root["PrivateKeyType"], root["PrivateKeyBits"]),
                    # generated roots: the agent's serial counter; supplied:
                    # the operator's random serial, the same cert in both
                    "SerialNumber": root["SerialNumber"] if generated else "theirs",
                    "lifetime": (
                        cert.not_valid_after_utc - cert.not_valid_before_utc
                    ).days,
                    "indexes": (
                        ranks[root["CreateIndex"]],
                        ranks[root["ModifyIndex"]],
                    ),
                }
            )
        return {
            "active": self.names[body["ActiveRootID"]],
            "ExternalTrustDomain": {r["ExternalTrustDomain"] for r in roots}
            == {body["TrustDomain"].removesuffix(".consul")},
            "order by ID": [r["ID"] for r in roots] == sorted(r["ID"] for r in roots),
            # by role: the ID order differs from run to run ("order by ID")
            "roots": sorted(listed, key=lambda r: r["root"]),
        }


@cache
def root_views(sequence: str, *, real: bool) -> dict[str, dict[str, Any]]:
    names = RootNames(sequence, real=real)
    views = {}
    for name in sequence_of(SEQUENCES[sequence]):
        if "-roots-" not in name:
            continue
        body = load(name).json() if real else replay(sequence)[name].json()
        views[name] = names.view(name, body)
    return views


# --------------------------------------------------------------------------
# one test per capture


@pytest.mark.parametrize(("sequence", "name"), ALL)
def test_as_real(sequence: str, name: str) -> None:
    capture = load(name)
    answer = replay(sequence)[name]
    if capture.status is None:
        # ``null`` as the whole body: 1.8.7 panics and drops the connection
        # (curl-exit 52); the development agent answers in one line instead
        # (test_devagent_robustness.py holds it to that).
        assert answer.status in (400, 500)
        assert answer.text
        assert "\n" not in answer.text.strip()
        return
    assert answer.status == capture.status, answer.text
    assert answer.header_names == capture.header_names
    assert answer.header("Content-Type") == capture.headers.get("Content-Type")
    if "X-Consul-Index" in capture.headers:
        real = index_ranks(run_of(name), real=True)
        dev = index_ranks(run_of(name), real=False)
        assert (
            dev[int(answer.header("X-Consul-Index") or 0)]
            == real[int(capture.headers["X-Consul-Index"])]
        )
    if capture.status != 200:
        assert answer.text == capture.body
    elif not capture.body:
        assert answer.body == b""
    elif "-roots-" in name:
        check_roots(sequence, name, capture, answer)
    elif capture.path == CA:
        check_config(capture, answer)
    else:
        check_instances(capture, answer)


def check_roots(sequence: str, name: str, capture: Capture, answer: Answer) -> None:
    assert shape(answer.json()) == shape(capture.json())
    real = root_views(sequence, real=True)[name]
    dev = root_views(sequence, real=False)[name]
    assert real["order by ID"], "the rule the captures show"
    assert dev == real


def check_config(capture: Capture, answer: Answer) -> None:
    real, dev = capture.json(), answer.json()
    for body, ranks in (
        (real, index_ranks(run_of(capture.name), real=True)),
        (dev, index_ranks(run_of(capture.name), real=False)),
    ):
        body["CreateIndex"] = ranks[body["CreateIndex"]]
        body["ModifyIndex"] = ranks[body["ModifyIndex"]]
    assert dev == real


def check_instances(capture: Capture, answer: Answer) -> None:
    def instances(body: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
        return [
            (e["Service"]["ID"], e["Service"]["Tags"])
            if "Service" in e
            else (e["ServiceID"], e["ServiceTags"])
            for e in body
        ]

    assert instances(answer.json()) == instances(capture.json())
    assert shape(answer.json()) == shape(capture.json())


def test_roots_are_listed_by_id_not_by_age() -> None:
    # ca20b: the supplied root's random ID sorts before the first root's in
    # the capture; the dev agent's list must follow IDs whatever they are.
    for sequence in SEQUENCES:
        for name, answer in replay(sequence).items():
            if "-roots-" in name:
                ids = [r["ID"] for r in answer.json()["Roots"]]
                assert ids == sorted(ids), name
    first = load("ca20b-roots-1.http").json()["Roots"]
    assert [r["CreateIndex"] for r in first] == [16, 9]


def test_request_bodies_are_the_scripts() -> None:
    # The replay sends what the capture script sent: spot-check one.
    capture = load("ca20err-interttl-1h.http")
    assert json.loads(capture.request_body or b"") == {
        "Provider": "consul",
        "Config": {"IntermediateCertTTL": "1h"},
    }


# --------------------------------------------------------------------------
# Go's PEM and ASN.1 texts: the captures hold one junk DER each for a key and
# a root; these are the real 1.8.7 agent's answers (after its prefixes) for
# more junk (base64 of the DER -> text), as captured in ca20x-*-junk-*.http
# and replayed above: here the model itself, without the agent around it.

_NO_PARAMS = (
    "{optional:false explicit:false application:false private:false "
    "defaultValue:<nil> tag:<nil> stringType:0 timeType:0 set:false "
    "omitEmpty:false}"
)


def _mismatch(expected: int, found: str, type_name: str) -> str:
    return (
        f"asn1: structure error: tags don't match ({expected} vs {{{found}}}) "
        f"{_NO_PARAMS} {type_name} @2"
    )


@pytest.mark.parametrize(
    ("b64", "as_cert", "as_ec_key"),
    [
        (
            "BAA=",
            _mismatch(16, "class:0 tag:4 length:0 isCompound:false", "certificate"),
            _mismatch(16, "class:0 tag:4 length:0 isCompound:false", "ecPrivateKey"),
        ),
        (
            "EAA=",
            _mismatch(16, "class:0 tag:16 length:0 isCompound:false", "certificate"),
            _mismatch(16, "class:0 tag:16 length:0 isCompound:false", "ecPrivateKey"),
        ),
        (
            "oAA=",
            _mismatch(16, "class:2 tag:0 length:0 isCompound:true", "certificate"),
            _mismatch(16, "class:2 tag:0 length:0 isCompound:true", "ecPrivateKey"),
        ),
        (
            "MAOAAQE=",
            _mismatch(16, "class:2 tag:0 length:1 isCompound:false", "tbsCertificate"),
            _mismatch(2, "class:2 tag:0 length:1 isCompound:false", "int"),
        ),
        ("MAA=", "asn1: syntax error: sequence truncated", None),
        ("MAAA", "asn1: syntax error: sequence truncated", None),
        ("MIIB", "asn1: syntax error: truncated tag or length", None),
        ("MAEA", "asn1: syntax error: truncated tag or length", None),
        ("H4EA", "asn1: syntax error: truncated tag or length", None),
        ("/wA=", "asn1: syntax error: non-minimal tag", None),
        ("MIAA", "asn1: syntax error: indefinite length found (not DER)", None),
        ("MAU=", "asn1: syntax error: data truncated", None),
        ("MIGA", "asn1: syntax error: data truncated", None),
        ("MIEA", "asn1: structure error: superfluous leading zeros in length", None),
    ],
)
def test_go_asn1_texts_as_measured(
    b64: str, as_cert: str, as_ec_key: str | None
) -> None:
    der = base64.b64decode(b64)
    assert go_asn1_problem(der, "certificate", (16, "tbsCertificate")) == as_cert
    assert go_asn1_problem(der, "ecPrivateKey", (2, "int")) == (as_ec_key or as_cert)


@pytest.mark.parametrize(
    ("pem", "text"),
    [
        ("-----BEGIN X-----\nAAAA====\n-----END X-----\n", None),
        ("-----BEGIN X-----\n!!!!\n-----END X-----\n", None),
        ("-----BEGIN X-----\nAAAA\n-----END Y-----\n", None),
        ("junk", None),
        ("-----BEGIN X-----\nAA\n AA\n-----END X-----\n", ("X", b"\0\0\0")),
    ],
)
def test_go_pem_decode(pem: str, text: tuple[str, bytes] | None) -> None:
    assert go_pem_decode(pem) == text


def _put(harness: Harness, config: dict[str, Any]) -> Answer:
    return harness.put(CA, {"Provider": "consul", "Config": config})


@pytest.mark.parametrize(
    ("pem", "text"),
    [
        (
            "-----BEGIN FOO-----\nAAAA\n-----END FOO-----\n",
            "unknown PEM block type for signing key: FOO",
        ),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
            _mismatch(16, "class:0 tag:0 length:0 isCompound:false", "pkcs1PrivateKey"),
        ),
        (
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            _mismatch(16, "class:0 tag:0 length:0 isCompound:false", "pkcs8"),
        ),
        (
            "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END FOO-----\n",
            "no PEM-encoded data found",
        ),
    ],
)
def test_key_alone_texts_as_measured(pem: str, text: str) -> None:
    answer = _put(Harness(), {"PrivateKey": pem})
    assert answer.status == 500
    assert answer.text == (
        "error generating CA root certificate: error generating CA: error "
        f"parsing private key {json.dumps(pem)}: {text}"
    )


def test_junk_the_model_passes_is_refused_without_library_text() -> None:
    # A SEQUENCE holding one INTEGER: Go says "sequence truncated" deeper in
    # (not modelled); the dev agent names its own limit, in one line.
    pem = "-----BEGIN EC PRIVATE KEY-----\nMAMCAQE=\n-----END EC PRIVATE KEY-----\n"
    answer = _put(Harness(), {"PrivateKey": pem})
    assert answer.status == 500
    assert answer.text.endswith(
        "x509: failed to parse EC private key: the development agent cannot "
        "read this DER (Go would name the problem)"
    )
    assert "\n" not in answer.text
    for leak in ("ParseError", "Could not deserialize", "cryptography"):
        assert leak not in answer.text


def test_a_root_pem_of_another_type_is_refused_as_measured() -> None:
    harness = Harness()
    key, root, _ = new_root(harness.agent.ca.trust_domain)
    answer = _put(harness, {"PrivateKey": key, "RootCert": root.replace("CERT", "X")})
    assert (answer.status, answer.text) == (
        500,
        "error parsing root fingerprint: first PEM-block should be CERTIFICATE type",
    )


def test_a_supplied_root_with_a_junk_key_is_refused_without_library_text() -> None:
    # Real 1.8.7 takes this (200) and cannot sign with it; the dev agent
    # refuses it, in its own words.
    harness = Harness()
    _, root, _ = new_root(harness.agent.ca.trust_domain)
    junk = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n"
    answer = _put(harness, {"PrivateKey": junk, "RootCert": root})
    assert (answer.status, answer.text) == (
        500,
        "error configuring provider: private_key_pem is not an unencrypted PEM "
        "private key",
    )


@pytest.mark.parametrize(
    ("config", "text"),
    [
        (
            {"IntermediateCertTTL": "100h"},
            "Intermediate Cert TTL must be greater or equal than 3 * LeafCertTTL "
            "(>=216h0m0s).",
        ),
        (
            {"IntermediateCertTTL": "2h", "LeafCertTTL": "30m"},
            "leaf cert TTL must be greater or equal than 1h0m0s",
        ),
        (
            {"IntermediateCertTTL": "2h", "PrivateKeyType": "dsa"},
            "Intermediate Cert TTL must be greater or equal than 3h",
        ),
        (
            {"IntermediateCertTTL": 0},
            "Intermediate Cert TTL must be greater or equal than 3h",
        ),
        (
            {"RootCert": "x", "IntermediateCertTTL": "1h"},
            "must provide a private key when providing a root cert",
        ),
        (
            {"SkipValidate": "tRuE"},
            "error decoding config: 1 error(s) decoding:\n\n* cannot parse "
            "'SkipValidate' as bool: strconv.ParseBool: parsing \"tRuE\": "
            "invalid syntax",
        ),
    ],
)
def test_validation_order_as_measured(config: dict[str, Any], text: str) -> None:
    answer = _put(Harness(), config)
    assert (answer.status, answer.text) == (500, f"error configuring provider: {text}")


def test_skip_validate_takes_go_spellings_and_skips_the_ttl_checks() -> None:
    harness = Harness()
    answer = _put(harness, {"IntermediateCertTTL": "1h", "SkipValidate": "TRUE"})
    assert answer.status == 200, answer.text


def test_the_configuration_already_stored_writes_nothing() -> None:
    harness = Harness()
    assert _put(harness, {"LeafCertTTL": "5h"}).status == 200
    index = harness.get(CA).json()["ModifyIndex"]
    roots_index = harness.get("/v1/connect/ca/roots").header("X-Consul-Index")
    # The same again, even with the force flag changed: no write at all.
    answer = harness.put(
        CA,
        {
            "Provider": "consul",
            "Config": {"LeafCertTTL": "5h"},
            "ForceWithoutCrossSigning": True,
        },
    )
    assert answer.status == 200
    assert harness.get(CA).json()["ModifyIndex"] == index
    assert harness.get(CA).json()["ForceWithoutCrossSigning"] is False
    assert harness.get("/v1/connect/ca/roots").header("X-Consul-Index") == roots_index
    # 5.0 is the same float64 as 5 in Go; true is not 1.
    assert _put(harness, {"LeafCertTTL": "5h", "X": 5}).status == 200
    index = harness.get(CA).json()["ModifyIndex"]
    assert harness.put(
        CA, '{"Provider":"consul","Config":{"LeafCertTTL":"5h","X":5.0}}'
    )
    assert harness.get(CA).json()["ModifyIndex"] == index
    assert _put(harness, {"LeafCertTTL": "5h", "X": True}).status == 200
    assert harness.get(CA).json()["ModifyIndex"] > index


def test_a_null_config_is_stored_as_null() -> None:
    harness = Harness()
    assert harness.put(CA, {"Provider": "consul", "Config": None}).status == 200
    assert harness.get(CA).json()["Config"] is None
