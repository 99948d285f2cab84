"""
Hypothesis strategies for Consul's SPIFFE identities.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

    from connect_native.identity import (
        AgentIdentity,
        ServiceIdentity,
        SigningIdentity,
    )


# Like ``hyperlink.hypothesis``: strategies shipped beside the code they
# generate for, so that applications can property-test their own handling of
# peer identities.  Every value generated is valid, so
# ``parse_spiffe_id(x.uri) == x`` for each of them.

_LABEL_INNER = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
_LABEL_EDGE = _LABEL_INNER.replace("-", "")
# Names that exercise escaping: space, non-ASCII, "/", "%", dot segments,
# characters Go leaves unescaped, and the real captures' ``a b`` and ``ünï``.
_AWKWARD_NAMES = (
    "web",
    "Web",
    "a b",
    "ünï",
    "a/b",
    "%",
    "%41",
    ".",
    "..",
    "...",
    "a.b",
    "a_b",
    "~",
    "$&+,:;=@",
    "!*'()",
    "?#[]",
    "default",
    "\x00",
    "日本",
)


def trust_domain_labels() -> SearchStrategy[str]:
    """
    One DNS-like label of a trust domain: 1 to 63 letters (either case),
    digits, ``-`` and ``_``, not starting or ending with ``-``.
    """
    from hypothesis import strategies as st

    edge = st.sampled_from(_LABEL_EDGE)
    middle = st.text(alphabet=_LABEL_INNER, max_size=61)
    return st.one_of(
        edge,
        st.tuples(edge, middle, edge).map("".join),
    )


def trust_domains() -> SearchStrategy[str]:
    """
    Valid trust domains, as given (mixed case); the identity records store
    them lower-cased.  Includes Consul's real shape, ``<uuid>.consul``.
    """
    from hypothesis import strategies as st

    consul_like = st.uuids().map(lambda u: f"{u}.consul")
    generic = st.lists(trust_domain_labels(), min_size=1, max_size=4).map(".".join)
    return st.one_of(consul_like, generic)


def identity_names() -> SearchStrategy[str]:
    """
    Values for the path segments of a SPIFFE ID (namespace, datacenter,
    service, agent, partition): any non-empty text that UTF-8 can encode,
    weighted towards names that need escaping.
    """
    from hypothesis import strategies as st

    return st.one_of(
        st.sampled_from(_AWKWARD_NAMES),
        st.text(
            alphabet=st.characters(codec="utf-8"),
            min_size=1,
            max_size=30,
        ),
    )


def partitions() -> SearchStrategy[str | None]:
    """
    Admin partitions: ``None`` (the default partition), ``"default"`` in
    any case, or another name.
    """
    from hypothesis import strategies as st

    return st.one_of(
        st.none(),
        st.sampled_from(["default", "DEFAULT", ""]),
        identity_names(),
    )


def service_identities(
    trust_domain: SearchStrategy[str] | None = None,
    partition: SearchStrategy[str | None] | None = None,
) -> SearchStrategy[ServiceIdentity]:
    """
    Valid :class:`~connect_native.identity.ServiceIdentity` values.  Pass
    ``trust_domain`` (e.g. ``just("<uuid>.consul")``) or ``partition``
    (e.g. ``none()``) to narrow them.
    """
    from hypothesis import strategies as st

    from connect_native.identity import ServiceIdentity

    return st.builds(
        ServiceIdentity,
        trust_domain=trust_domain if trust_domain is not None else trust_domains(),
        namespace=identity_names(),
        datacenter=identity_names(),
        service=identity_names(),
        partition=partition if partition is not None else partitions(),
    )


def agent_identities(
    trust_domain: SearchStrategy[str] | None = None,
) -> SearchStrategy[AgentIdentity]:
    """
    Valid :class:`~connect_native.identity.AgentIdentity` values.
    """
    from hypothesis import strategies as st

    from connect_native.identity import AgentIdentity

    return st.builds(
        AgentIdentity,
        trust_domain=trust_domain if trust_domain is not None else trust_domains(),
        datacenter=identity_names(),
        agent=identity_names(),
        partition=partitions(),
    )


def signing_identities() -> SearchStrategy[SigningIdentity]:
    """
    Valid :class:`~connect_native.identity.SigningIdentity` values.
    """
    from hypothesis import strategies as st

    from connect_native.identity import SigningIdentity

    return st.builds(SigningIdentity, trust_domain=trust_domains())


def spiffe_ids() -> SearchStrategy[ServiceIdentity | AgentIdentity | SigningIdentity]:
    """
    Any of Consul's SPIFFE identities that
    :func:`~connect_native.identity.parse_spiffe_id` returns.
    """
    from hypothesis import strategies as st

    return st.one_of(service_identities(), agent_identities(), signing_identities())
