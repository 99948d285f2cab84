"""
The development agent's leaf cache renews certificates as the real agent's
does (``REAL-BEHAVIOUR.md`` sections 3 to 5): only for callers blocking at
the current index, at a random point between 60 % and 90 % of the lifetime,
at once when the lifetime is under ten minutes, and 0-30 s after a root
rotation, while non-blocking reads keep getting the cached (possibly stale)
certificate.
"""

from __future__ import annotations

import datetime
from typing import Any

from cryptography import x509

from tests.test_devagent_support import CAPTURES, Harness, fixed_random

LEAF = "/v1/agent/connect/ca/leaf/"
ROOTS = "/v1/agent/connect/ca/roots"


def pems(bundle: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(bundle.encode("ascii"))


def valid_after(leaf: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(leaf["ValidAfter"]).timestamp()


def set_leaf_ttl(h: Harness, ttl: str) -> None:
    answer = h.put(
        "/v1/connect/ca/configuration",
        {"Provider": "consul", "Config": {"LeafCertTTL": ttl, "SkipValidate": True}},
    )
    assert answer.status == 200, answer.text


def rotate_to_captured_root(h: Harness) -> None:
    key = (CAPTURES / "rotation-new-root-input.key.pem").read_text()
    cert = (CAPTURES / "rotation-new-root-input.pem").read_text()
    answer = h.put(
        "/v1/connect/ca/configuration",
        {"Provider": "consul", "Config": {"PrivateKey": key, "RootCert": cert}},
    )
    assert answer.status == 200, answer.text


def active_root(h: Harness) -> x509.Certificate:
    roots = h.get(ROOTS).json()
    root = next(r for r in roots["Roots"] if r["ID"] == roots["ActiveRootID"])
    return x509.load_pem_x509_certificate(root["RootCert"].encode())


# --------------------------------------------------------------------------
# renewal


def test_blocking_caller_gets_a_new_leaf_at_the_random_renewal_point() -> None:
    # random() = 0.5: renewal at 60 % + 0.5 * 30 % = 75 % of a 10 minute
    # lifetime, which one fetch of the agent cache (10 minutes) covers.
    h = Harness(rng=fixed_random(0.5))
    set_leaf_ttl(h, "10m")
    first = h.get(LEAF + "ttl10-svc").json()
    renewal = valid_after(first) + 0.75 * 600
    pending = h.start("GET", f"{LEAF}ttl10-svc?index={first['ModifyIndex']}")
    h.advance(renewal - h.clock.seconds() - 0.5)
    assert not pending.done
    h.advance(0.5)
    answer = pending.answer()
    renewed = answer.json()
    assert renewed["SerialNumber"] != first["SerialNumber"]
    assert renewed["ModifyIndex"] > first["ModifyIndex"]
    assert answer.header("X-Cache") == "MISS"
    assert abs(valid_after(renewed) - (h.clock.seconds() - 60)) <= 1


def test_renewal_point_is_never_before_sixty_percent_of_the_lifetime() -> None:
    h = Harness(rng=fixed_random(0.0))
    first = h.get(LEAF + "web").json()
    renewal = valid_after(first) + 0.6 * 72 * 3600
    pending = h.start("GET", f"{LEAF}web?index={first['ModifyIndex']}")
    h.advance(renewal - h.clock.seconds() - 1)
    assert not pending.done
    h.advance(1)
    assert pending.answer().json()["SerialNumber"] != first["SerialNumber"]


def test_renewal_point_is_never_after_ninety_percent_of_the_lifetime() -> None:
    h = Harness(rng=fixed_random(0.999999))
    first = h.get(LEAF + "web").json()
    pending = h.start("GET", f"{LEAF}web?index={first['ModifyIndex']}")
    hard = valid_after(first) + 0.9 * 72 * 3600
    h.advance(hard - h.clock.seconds())
    renewed = pending.answer().json()
    assert renewed["SerialNumber"] != first["SerialNumber"]
    renewed_at = valid_after(renewed) + 60
    assert valid_after(first) + 0.6 * 72 * 3600 <= renewed_at <= hard + 1


def test_a_client_looping_on_short_waits_still_gets_the_renewal() -> None:
    # REAL-BEHAVIOUR 5: wait=300s calls time out with the same index until the
    # agent renews; the renewal itself does not wait for a call to start.
    h = Harness(rng=fixed_random(0.5))
    set_leaf_ttl(h, "10m")
    leaf = h.get(LEAF + "ttl10-svc").json()
    renewal = valid_after(leaf) + 0.75 * 600
    index = leaf["ModifyIndex"]
    answers = []
    while True:
        pending = h.start("GET", f"{LEAF}ttl10-svc?index={index}&wait=100s")
        h.advance(min(100, renewal - h.clock.seconds()))
        answer = pending.answer()
        answers.append(answer.json()["ModifyIndex"])
        if answer.json()["ModifyIndex"] != index:
            break
    assert answers[:-1] == [index] * (len(answers) - 1)
    assert h.clock.seconds() == renewal


def test_non_blocking_reads_never_renew() -> None:
    h = Harness()
    first = h.get(LEAF + "web").json()
    h.advance(0.95 * 72 * 3600)
    answer = h.get(LEAF + "web")
    assert answer.json() == first
    assert answer.header("X-Cache") == "HIT"
    assert answer.header("Age") == str(round(0.95 * 72 * 3600))


def test_short_lifetime_is_renewed_at_once_for_every_blocking_call() -> None:
    h = Harness()
    set_leaf_ttl(h, "2m")
    leaf = h.get(LEAF + "ttl-svc").json()
    assert (
        valid_after(leaf) + 120
        == datetime.datetime.fromisoformat(leaf["ValidBefore"]).timestamp()
    )
    serials = [leaf["SerialNumber"]]
    for _ in range(3):
        index = leaf["ModifyIndex"]
        pending = h.start("GET", f"{LEAF}ttl-svc?index={index}&wait=20s")
        assert pending.done
        leaf = pending.answer().json()
        assert leaf["ModifyIndex"] == index + 2
        serials.append(leaf["SerialNumber"])
    assert len(set(serials)) == 4


def test_ten_minute_lifetime_is_not_renewed_within_a_short_wait() -> None:
    h = Harness(rng=fixed_random(0.5))
    set_leaf_ttl(h, "10m")
    leaf = h.get(LEAF + "ttl10-svc").json()
    pending = h.start("GET", f"{LEAF}ttl10-svc?index={leaf['ModifyIndex']}&wait=5s")
    h.advance(5)
    assert pending.answer().json() == leaf


def test_leaf_ttl_applies_to_new_leaves() -> None:
    h = Harness()
    set_leaf_ttl(h, "3h")
    leaf = h.get(LEAF + "web").json()
    lifetime = datetime.datetime.fromisoformat(
        leaf["ValidBefore"]
    ).timestamp() - valid_after(leaf)
    assert lifetime == 3 * 3600


# --------------------------------------------------------------------------
# root rotation


def test_roots_after_rotation_list_the_old_root_and_the_cross_signed_one() -> None:
    h = Harness()
    before = h.get(ROOTS)
    old_id = before.json()["ActiveRootID"]
    index = int(before.header("X-Consul-Index") or 0)
    pending = h.start("GET", f"{ROOTS}?index={index}&wait=60s")
    rotate_to_captured_root(h)
    answer = pending.answer()
    body = answer.json()
    assert body["ActiveRootID"] != old_id
    assert {r["ID"] for r in body["Roots"]} == {old_id, body["ActiveRootID"]}
    new = next(r for r in body["Roots"] if r["Active"])
    old = next(r for r in body["Roots"] if not r["Active"])
    (cross,) = pems("".join(new["IntermediateCerts"]))
    old_cert = x509.load_pem_x509_certificate(old["RootCert"].encode())
    new_cert = x509.load_pem_x509_certificate(new["RootCert"].encode())
    cross.verify_directly_issued_by(old_cert)
    assert cross.subject == new_cert.subject
    assert cross.public_key() == new_cert.public_key()


def test_blocking_leaf_gets_a_new_root_certificate_after_the_jitter() -> None:
    # random() = 0.6: the 0-30 s spread after a rotation is 18 s.
    h = Harness(rng=fixed_random(0.6))
    before = h.get(LEAF + "web").json()
    pending = h.start("GET", f"{LEAF}web?index={before['ModifyIndex']}&wait=60s")
    h.advance(1)
    rotate_to_captured_root(h)
    h.advance(17.9)
    assert not pending.done
    h.advance(0.1)
    answer = pending.answer()
    after = answer.json()
    assert after["SerialNumber"] != before["SerialNumber"]
    leaf, cross = pems(after["CertPEM"])
    root = active_root(h)
    leaf.verify_directly_issued_by(root)
    assert cross.subject == root.subject


def test_non_blocking_leaf_reads_stay_stale_after_rotation() -> None:
    h = Harness(rng=fixed_random(0.6))
    before = h.get(LEAF + "nonblocking-svc").json()
    rotate_to_captured_root(h)
    h.advance(35)
    answer = h.get(LEAF + "nonblocking-svc")
    assert answer.json() == before
    assert answer.header("X-Cache") == "HIT"
    assert answer.header("Age") == "35"
    stale = pems(before["CertPEM"])[0]
    assert stale.issuer != active_root(h).subject


def test_blocking_at_a_stale_index_renews_after_the_jitter() -> None:
    h = Harness(rng=fixed_random(0.6))
    before = h.get(LEAF + "nonblocking-svc").json()
    rotate_to_captured_root(h)
    h.advance(35)
    pending = h.start(
        "GET", f"{LEAF}nonblocking-svc?index={before['ModifyIndex']}&wait=60s"
    )
    h.advance(17.9)
    assert not pending.done
    h.advance(0.1)
    renewed = pending.answer().json()
    pems(renewed["CertPEM"])[0].verify_directly_issued_by(active_root(h))
    plain = h.get(LEAF + "nonblocking-svc")
    assert plain.json() == renewed
    assert plain.header("X-Cache") == "HIT"


def test_a_name_never_requested_gets_a_new_root_certificate_at_once() -> None:
    h = Harness()
    h.get(LEAF + "web")
    rotate_to_captured_root(h)
    answer = h.get(LEAF + "fresh-after-rotation")
    assert answer.header("X-Cache") == "MISS"
    leaf, _cross = pems(answer.json()["CertPEM"])
    leaf.verify_directly_issued_by(active_root(h))


def test_rotation_renewal_continues_after_the_blocking_call_timed_out() -> None:
    # The agent cache's fetch outlives the request that started it.
    h = Harness(rng=fixed_random(0.6))
    before = h.get(LEAF + "web").json()
    rotate_to_captured_root(h)
    pending = h.start("GET", f"{LEAF}web?index={before['ModifyIndex']}&wait=5s")
    h.advance(5)
    assert pending.answer().json() == before
    h.advance(13)  # the renewal, 18 s after the rotation
    h.advance(2)
    answer = h.get(LEAF + "web")
    assert answer.json()["SerialNumber"] != before["SerialNumber"]
    assert answer.header("Age") == "2"


def test_rotating_to_the_same_root_again_changes_no_root() -> None:
    h = Harness()
    rotate_to_captured_root(h)
    roots = h.get(ROOTS).json()
    leaf = h.get(LEAF + "web").json()
    rotate_to_captured_root(h)
    assert h.get(ROOTS).json() == roots
    pending = h.start("GET", f"{LEAF}web?index={leaf['ModifyIndex']}&wait=40s")
    h.advance(40)
    assert pending.answer().json() == leaf


def test_rotation_with_a_generated_root_after_a_supplied_one() -> None:
    h = Harness()
    rotate_to_captured_root(h)
    supplied = h.get(ROOTS).json()["ActiveRootID"]
    answer = h.put("/v1/connect/ca/configuration", {"Provider": "consul", "Config": {}})
    assert answer.status == 200
    roots = h.get(ROOTS).json()
    assert roots["ActiveRootID"] != supplied
    assert len(roots["Roots"]) == 3


def test_rotation_with_a_key_that_does_not_match_the_certificate_is_refused() -> None:
    h = Harness()
    key = (CAPTURES / "rotation-new-root-input.key.pem").read_text()
    cert = (CAPTURES / "root.pem").read_text()
    answer = h.put(
        "/v1/connect/ca/configuration",
        {"Provider": "consul", "Config": {"PrivateKey": key, "RootCert": cert}},
    )
    assert answer.status == 500
    assert answer.text.startswith("error configuring provider: ")
    assert len(h.get(ROOTS).json()["Roots"]) == 1
