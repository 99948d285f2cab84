"""
``AllowIdsAuthorizer``: authorization by a list of SPIFFE IDs, without an
agent, as ghostunnel's ``--allow-uri``.
"""

from __future__ import annotations

import pytest

from connect_native.authorize import (
    AllowIdsAuthorizer,
    IAuthorizer,
    InvalidAllowedId,
    Peer,
)
from connect_native.identity import ServiceIdentity

TD = "11111111-2222-3333-4444-555555555555.consul"


def _peer(service: str, *, dc: str = "dc1", td: str = TD) -> Peer:
    return Peer(ServiceIdentity(td, "default", dc, service), "01")


@pytest.mark.parametrize(
    ("allowed", "peer", "allow"),
    [
        ([f"spiffe://{TD}/ns/default/dc/dc1/svc/api"], _peer("api"), True),
        ([f"spiffe://{TD}/ns/default/dc/dc1/svc/api"], _peer("evil"), False),
        ([f"spiffe://{TD.upper()}/ns/default/dc/dc1/svc/api"], _peer("api"), True),
        ([f"spiffe://{TD}/ns/default/dc/dc1/svc/API"], _peer("api"), False),
        ([f"spiffe://{TD}/ns/default/dc/*/svc/api"], _peer("api", dc="dc9"), True),
        ([f"spiffe://{TD}/ns/default/dc/dc1/svc/*"], _peer("anything"), True),
        (
            [f"spiffe://{TD}/ns/default/dc/dc1/svc/*"],
            _peer("api", td="other.consul"),
            False,
        ),
        ([f"spiffe://{TD}/ns/default/dc/dc1/svc"], _peer("api"), False),
        ([f"spiffe://{TD}/*"], _peer("api"), False),
        (
            [
                f"spiffe://{TD}/ns/default/dc/dc1/svc/web",
                f"spiffe://{TD}/ns/default/dc/dc1/svc/api",
            ],
            _peer("api"),
            True,
        ),
    ],
)
def test_decides_by_the_list(allowed: list[str], peer: Peer, allow: bool) -> None:
    authorizer = AllowIdsAuthorizer(allowed)
    assert IAuthorizer.providedBy(authorizer)
    decision = authorizer.decide_now(peer, "web")
    assert decision.allowed is allow
    assert decision.source == "allow-ids"
    later = authorizer.authorize(peer, "web")
    assert later.result == decision  # type: ignore[attr-defined]
    if not allow:
        assert peer.uri in decision.reason


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("https://example.org/x", "must be a SPIFFE ID"),
        ("spiffe://bad_domain:80/x", "port"),
        (f"spiffe://{TD}", "needs a path"),
        (f"spiffe://{TD}/ns//svc/x", "without empty segments"),
        (f"spiffe://{TD}/ns/default/dc/dc1/svc/we*", "one whole path segment"),
        (f"spiffe://{TD}/svc/x?y", "query, fragment or space"),
    ],
)
def test_bad_patterns_are_refused(pattern: str, says: str) -> None:
    with pytest.raises(InvalidAllowedId) as raised:
        AllowIdsAuthorizer([pattern])
    assert says in str(raised.value)


def test_an_empty_list_is_refused() -> None:
    with pytest.raises(InvalidAllowedId, match="at least one"):
        AllowIdsAuthorizer([])
    with pytest.raises(InvalidAllowedId, match="not one string"):
        AllowIdsAuthorizer(f"spiffe://{TD}/x")  # type: ignore[arg-type]


def test_replace_allows_the_new_list_and_tells_the_subscribers() -> None:
    from connect_native.authorize import INotifiesChanges

    authorizer = AllowIdsAuthorizer([f"spiffe://{TD}/ns/default/dc/dc1/svc/api"])
    assert INotifiesChanges.providedBy(authorizer)
    told: list[None] = []
    unsubscribe = authorizer.subscribe(lambda: told.append(None))
    authorizer.replace([f"spiffe://{TD}/ns/default/dc/dc1/svc/billing"])
    assert told == [None]
    assert not authorizer.decide_now(_peer("api"), "web").allowed
    assert authorizer.decide_now(_peer("billing"), "web").allowed
    # No ID left: no one (fail closed).
    authorizer.replace([])
    decision = authorizer.decide_now(_peer("billing"), "web")
    assert not decision.allowed
    assert "the list is empty" in decision.reason
    unsubscribe()
    authorizer.replace([f"spiffe://{TD}/ns/default/dc/dc1/svc/api"])
    assert told == [None, None]


def test_replace_with_a_bad_pattern_keeps_the_list_before() -> None:
    authorizer = AllowIdsAuthorizer([f"spiffe://{TD}/ns/default/dc/dc1/svc/api"])
    with pytest.raises(InvalidAllowedId):
        authorizer.replace(["https://example/"])
    assert authorizer.decide_now(_peer("api"), "web").allowed
