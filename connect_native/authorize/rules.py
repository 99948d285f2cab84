"""
Consul intentions decided locally: precedence, matching, and the L7 (HTTP)
permission semantics, as pure functions over the records of
:mod:`connect_native.consul.records`.  No I/O here; the authorizer that keeps
the intentions cached lives in :mod:`connect_native.authorize.intentions`.

The rules, read from Consul's source (not from any development agent):

* Precedence (``agent/structs/intention.go`` ``UpdatePrecedence``, and
  ``computeIntentionPrecedence`` for config entries): the destination's exact
  parts set the ceiling (namespace and name exact 9, name ``*`` 6, both ``*``
  3), each wildcard on the source side takes one off.  With namespaces fixed
  to ``default``: exact->exact 9, ``*``->exact 8, exact->``*`` 6,
  ``*``->``*`` 5.  Partitions and peers are never wildcards and do not count.
* For a concrete source and destination at most one intention matches at each
  precedence (the precedence fixes which side is a wildcard, and Consul
  refuses duplicates), so "deny over allow at equal precedence" never arises:
  the *first matching intention* in precedence order decides (the agent's
  authorize endpoint, ``ConnectAuthorize``; ties in a list are ordered by
  ``(SourceNS, SourceName, DestinationNS, DestinationName)`` as
  ``IntentionPrecedenceSorter`` does).
* A source matches when its partition equals the intention's (``default``
  when absent), the intention's namespace is ``*`` or equal, and its name is
  ``*`` or equal (``connect.IntentionMatch``).  An intention for a peer or a
  sameness group never matches a local identity: a SPIFFE ID does not carry
  the peer.
* An intention with L7 ``Permissions`` (``agent/xds/rbac.go``): the first
  permission whose HTTP match fits the request decides; when none fits, the
  *default* decides, not a lower-precedence intention (``removeSourcePrecedence``
  excludes the source from every later intention).  At L4 Consul's authorize
  endpoint denies such an intention ("Matched L7 intention") and Envoy's
  network filter treats it as deny.
* An HTTP match is the AND of its parts (``convertPermission``): one path
  rule (``PathExact``, ``PathPrefix``, or ``PathRegex``, a full match), every
  header rule, and the method list.  Header rules follow Envoy's
  ``HeaderMatcher``: all values of a header are joined with ``,``; a missing
  header matches only an inverted ``Present`` rule; ``Invert`` negates the
  rule for a header that is present.  Regular expressions are RE2 in Consul
  and Python's :mod:`re` here, matched with ``fullmatch``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, Protocol

from attrs import field, frozen

from connect_native.authorize import L7_AT_L4, Decision
from connect_native.consul.records import (
    Intention,
    IntentionHTTPHeaderPermission,
    IntentionHTTPPermission,
    IntentionPermission,
)
from connect_native.errors import (
    InvalidPermission,
)
from connect_native.identity import ServiceIdentity

__all__ = [
    "DEFAULT_SOURCE",
    "HTTP_METHODS",
    "L7_SOURCE",
    "MATCH_SOURCE",
    "CompiledIntentions",
    "HTTPRequest",
    "IntentionDefault",
    "InvalidPermission",
    "compile_intentions",
    "decide_connection",
    "decide_http",
    "describe_intention",
    "first_match",
    "header_matches",
    "http_matches",
    "intention_precedence",
    "matches_destination",
    "matches_source",
    "sort_by_precedence",
    "validate_permission",
]

WILDCARD = "*"

IntentionDefault = Literal["deny", "allow", "agent"]

# Decision.source values for what decided.
MATCH_SOURCE = "intentions"
"""An L4 intention matched."""
L7_SOURCE = "intentions-l7"
"""
An intention with HTTP permissions matched at L4: the connection is denied
(``per_request``) unless the server decides each request by
:func:`decide_http`.
"""
DEFAULT_SOURCE = "intentions-default"
"""No intention matched; the configured default decided."""

HTTP_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE")
)
"""The methods Consul accepts in ``Permissions[].HTTP.Methods``."""


# -- precedence and matching ---------------------------------------------------


def _count_exact(namespace: str, name: str) -> int:
    if namespace == WILDCARD:
        return 0
    if name == WILDCARD:
        return 1
    return 2


def intention_precedence(
    source_ns: str, source_name: str, destination_ns: str, destination_name: str
) -> int:
    """
    The precedence Consul gives an intention (``UpdatePrecedence``): 9 for
    exact->exact down to 1 when both namespaces are wildcards.
    """
    ceiling = {2: 9, 1: 6, 0: 3}[_count_exact(destination_ns, destination_name)]
    return ceiling - (2 - _count_exact(source_ns, source_name))


def _partition(value: str | None) -> str:
    return value or "default"


def matches_source(intention: Intention, source: ServiceIdentity) -> bool:
    """Whether ``intention`` covers ``source`` on the source side."""
    if intention.source_peer or intention.source_sameness_group:
        return False
    if _partition(intention.source_partition) != _partition(source.partition):
        return False
    if intention.source_ns != WILDCARD and intention.source_ns != source.namespace:
        return False
    return intention.source_name in (WILDCARD, source.service)


def matches_destination(
    intention: Intention,
    service: str,
    namespace: str = "default",
    partition: str | None = None,
) -> bool:
    """
    Whether ``intention`` covers the destination ``namespace/service``.

    Case-insensitively, as Consul finds them: its intentions table indexes
    ``DestinationNS`` and ``DestinationName`` lowercased (memdb
    ``StringFieldIndex{Lowercase: true}``), so ``evil => Web`` is an
    intention of ``web`` for the agent's authorize API and match endpoint.
    The source side is compared exactly (``SpiffeIDService.Authorize``).
    """
    if _partition(intention.destination_partition) != _partition(partition):
        return False
    if intention.destination_ns != WILDCARD and not _same_name(
        intention.destination_ns, namespace
    ):
        return False
    return intention.destination_name == WILDCARD or _same_name(
        intention.destination_name, service
    )


def _same_name(a: str, b: str) -> bool:
    # Go's strings.ToLower, for the ASCII names Consul accepts.
    return a.lower() == b.lower()


def _sort_key(intention: Intention) -> tuple[int, str, str, str, str]:
    return (
        -intention.precedence,
        intention.source_ns,
        intention.source_name,
        intention.destination_ns,
        intention.destination_name,
    )


def sort_by_precedence(intentions: Iterable[Intention]) -> tuple[Intention, ...]:
    """Highest precedence first, ties in ``IntentionPrecedenceSorter`` order."""
    return tuple(sorted(intentions, key=_sort_key))


def first_match(
    intentions: Iterable[Intention], source: ServiceIdentity
) -> Intention | None:
    """
    The intention that decides for ``source``: the first, in precedence
    order, whose source side covers it.  ``intentions`` are those of one
    destination (``/v1/connect/intentions/match?by=destination``).
    """
    for intention in sort_by_precedence(intentions):
        if matches_source(intention, source):
            return intention
    return None


def describe_intention(intention: Intention) -> str:
    """
    ``ALLOW default/api => default/web (ID: ..., Precedence: 9)``, the way
    Consul's reasons show an intention (``L7`` for one with permissions).
    """
    if intention.permissions:
        action = "L7"
    else:
        action = (intention.action or "").upper()
    ident = intention.id if intention.id is not None else "config entry"
    return (
        f"{action} {intention.source_ns}/{intention.source_name} => "
        f"{intention.destination_ns}/{intention.destination_name} "
        f"(ID: {ident}, Precedence: {intention.precedence})"
    )


# -- L7 permissions -----------------------------------------------------------------


def _where(intention: Intention, index: int) -> str:
    return (
        f"intention {intention.source_ns}/{intention.source_name} => "
        f"{intention.destination_ns}/{intention.destination_name}: "
        f"Permissions[{index}]"
    )


def validate_permission(permission: IntentionPermission, where: str) -> None:
    """
    Raise :class:`InvalidPermission` for a permission Consul's
    ``ServiceIntentionsConfigEntry.Validate`` refuses (``where`` names it in
    the message).  Also checks that each regular expression compiles here.
    """
    if permission.action not in ("allow", "deny"):
        raise InvalidPermission(
            f"{where}.Action must be 'allow' or 'deny', got {permission.action!r}"
        )
    http = permission.http
    if http is None:
        raise InvalidPermission(f"{where}.HTTP is required")
    paths = [
        (key, value)
        for key, value in (
            ("PathExact", http.path_exact),
            ("PathPrefix", http.path_prefix),
            ("PathRegex", http.path_regex),
        )
        if value
    ]
    if len(paths) > 1:
        raise InvalidPermission(
            f"{where}.HTTP should only contain at most one of PathExact, "
            f"PathPrefix, or PathRegex, got {', '.join(k for k, _ in paths)}"
        )
    for key, value in paths:
        if key != "PathRegex" and not value.startswith("/"):
            raise InvalidPermission(
                f"{where}.HTTP.{key} doesn't start with '/': {value!r}"
            )
    if http.path_regex:
        _compile(http.path_regex, f"{where}.HTTP.PathRegex")
    for k, header in enumerate(http.headers):
        here = f"{where}.HTTP.Header[{k}]"
        if not header.name:
            raise InvalidPermission(f"{here} missing required Name field")
        rules = [
            header.present,
            bool(header.exact),
            bool(header.prefix),
            bool(header.suffix),
            bool(header.contains),
            bool(header.regex),
        ]
        if sum(rules) != 1:
            raise InvalidPermission(
                f"{here} should only contain one of Present, Exact, Prefix, "
                "Suffix, Contains, or Regex"
            )
        if header.regex:
            _compile(header.regex, f"{here}.Regex")
    seen: set[str] = set()
    for method in http.methods:
        if method.upper() not in HTTP_METHODS:
            raise InvalidPermission(
                f"{where}.HTTP.Methods contains an invalid method {method!r}"
            )
        if method.upper() in seen:
            raise InvalidPermission(
                f"{where}.HTTP.Methods contains {method!r} more than once"
            )
        seen.add(method.upper())
    if not paths and not http.headers and not http.methods:
        raise InvalidPermission(f"{where}.HTTP should not be empty")


def _compile(pattern: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise InvalidPermission(
            f"{where}: {pattern!r} is not a regular expression Python accepts ({e})"
        ) from None


class _Headers(Protocol):
    def getAllRawHeaders(self) -> Iterable[tuple[bytes, Sequence[bytes]]]: ...


HeadersLike = Mapping[str, str | Sequence[str]] | Iterable[tuple[str, str]] | _Headers


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _normalize_headers(headers: HeadersLike) -> dict[str, str]:
    """Lower-case names; several values joined by ``,`` as Envoy does."""
    values: dict[str, list[str]] = {}
    if hasattr(headers, "getAllRawHeaders"):
        pairs: Iterable[tuple[str | bytes, Sequence[str | bytes] | str | bytes]] = (
            headers.getAllRawHeaders()
        )
    elif isinstance(headers, Mapping):
        pairs = headers.items()
    else:
        pairs = ((name, [value]) for name, value in headers)
    for name, raw in pairs:
        items = [raw] if isinstance(raw, str | bytes) else list(raw)
        values.setdefault(_text(name).lower(), []).extend(_text(v) for v in items)
    return {name: ",".join(vs) for name, vs in values.items()}


@frozen
class HTTPRequest:
    """
    What an L7 permission looks at.  ``path`` is the request target as sent
    (query included; the path rules look at the part before ``?``, as
    Envoy's ``url_path`` does); ``headers`` maps lower-case names to the
    joined value.  The pseudo-headers ``:method``, ``:path`` and
    ``:authority`` (from ``Host``) are available to header rules.
    """

    method: str
    path: str
    headers: Mapping[str, str] = field(factory=dict)

    @classmethod
    def of(
        cls, method: str | bytes, path: str | bytes, headers: HeadersLike
    ) -> HTTPRequest:
        joined = _normalize_headers(headers)
        method_text, path_text = _text(method), _text(path)
        joined.setdefault(":method", method_text)
        joined.setdefault(":path", path_text)
        if "host" in joined:
            joined.setdefault(":authority", joined["host"])
        return cls(method=method_text, path=path_text, headers=joined)

    @property
    def url_path(self) -> str:
        return self.path.split("?", 1)[0].split("#", 1)[0]


def header_matches(rule: IntentionHTTPHeaderPermission, request: HTTPRequest) -> bool:
    """One header rule against a request (Envoy ``HeaderMatcher`` semantics)."""
    value = request.headers.get(rule.name.lower())
    if value is None:
        return rule.invert and rule.present
    if rule.present:
        matched = True
    elif rule.regex:
        matched = re.fullmatch(rule.regex, value) is not None
    else:
        subject = value.lower() if rule.ignore_case else value

        def fold(s: str) -> str:
            return s.lower() if rule.ignore_case else s

        if rule.exact:
            matched = subject == fold(rule.exact)
        elif rule.prefix:
            matched = subject.startswith(fold(rule.prefix))
        elif rule.suffix:
            matched = subject.endswith(fold(rule.suffix))
        elif rule.contains:
            matched = fold(rule.contains) in subject
        else:
            # Consul skips a rule with nothing to match ("impossible").
            return True
    return matched != rule.invert


def http_matches(http: IntentionHTTPPermission | None, request: HTTPRequest) -> bool:
    """
    Whether a request fits a permission's HTTP match: every part holds.  A
    permission without an HTTP part matches everything, as in Consul.
    """
    if http is None:
        return True
    path = request.url_path
    if http.path_exact and path != http.path_exact:
        return False
    if http.path_prefix and not path.startswith(http.path_prefix):
        return False
    if http.path_regex and re.fullmatch(http.path_regex, path) is None:
        return False
    if http.methods and request.method not in {m.upper() for m in http.methods}:
        return False
    return all(header_matches(rule, request) for rule in http.headers)


# -- compiled table and decisions --------------------------------------------------


@frozen
class CompiledIntentions:
    """
    The intentions of one destination, sorted by precedence, with every L7
    permission checked once.  ``invalid`` maps the position (in ``ordered``)
    of an intention whose permissions are unusable to the reason: such an
    intention denies its sources, as Consul's RBAC treats L7 intentions it
    cannot express.
    """

    ordered: tuple[Intention, ...]
    invalid: Mapping[int, str] = field(factory=dict)

    def first_match(self, source: ServiceIdentity) -> tuple[int, Intention] | None:
        for position, intention in enumerate(self.ordered):
            if matches_source(intention, source):
                return position, intention
        return None


def compile_intentions(
    intentions: Iterable[Intention],
    service: str,
    namespace: str = "default",
    partition: str | None = None,
) -> CompiledIntentions:
    """
    Sort, keep those that cover ``namespace/service``, and validate the L7
    permissions (a bad one is recorded in ``invalid``, never raised: the
    cache must go on deciding for the other sources).
    """
    ordered = sort_by_precedence(
        i for i in intentions if matches_destination(i, service, namespace, partition)
    )
    invalid: dict[int, str] = {}
    for position, intention in enumerate(ordered):
        for k, permission in enumerate(intention.permissions):
            try:
                validate_permission(permission, _where(intention, k))
            except InvalidPermission as e:
                invalid[position] = str(e)
                break
    return CompiledIntentions(ordered=ordered, invalid=invalid)


def _could_allow(intention: Intention, default_allows: bool | None) -> bool:
    return default_allows is True or any(
        p.action == "allow" for p in intention.permissions
    )


def decide_connection(
    table: CompiledIntentions, source: ServiceIdentity, default_allows: bool | None
) -> Decision | None:
    """
    The L4 decision for a connection from ``source``; ``None`` when no
    intention matches and ``default_allows`` is ``None`` (the caller's
    default, e.g. asking the agent, decides).

    An intention with L7 permissions denies the connection, as Consul's
    authorize API does; when some request could be allowed (one of its
    permissions allows, or the default allows requests no permission
    matches) the denial has source :data:`L7_SOURCE` and ``per_request``
    set, and a server whose application decides each request through
    :func:`decide_http` accepts the connection.
    """
    found = table.first_match(source)
    if found is None:
        if default_allows is None:
            return None
        word = "allows" if default_allows else "denies"
        return Decision(
            default_allows,
            f"No intention matches {source.namespace}/{source.service}; "
            f"the default {word}",
            DEFAULT_SOURCE,
        )
    position, intention = found
    described = describe_intention(intention)
    if position in table.invalid:
        return Decision(
            False,
            f"Matched intention {described} has unusable permissions: "
            f"{table.invalid[position]}",
            MATCH_SOURCE,
        )
    if not intention.permissions:
        return Decision(
            intention.action == "allow", f"Matched intention: {described}", MATCH_SOURCE
        )
    if _could_allow(intention, default_allows):
        # Denied here, as the agent's authorize API denies it: only a server
        # that decides each request (connect_native.web.protect) lifts it.
        return Decision(
            False,
            f"Matched L7 intention: {described}{L7_AT_L4}",
            L7_SOURCE,
            per_request=True,
        )
    return Decision(
        False,
        f"Matched L7 intention: {described}; none of its permissions allows",
        MATCH_SOURCE,
    )


def decide_http(
    table: CompiledIntentions,
    source: ServiceIdentity,
    request: HTTPRequest,
    default_allows: bool | None,
) -> Decision | None:
    """
    The L7 decision for one request from ``source``.  An L4 intention decides
    every request; an L7 intention's first matching permission decides; when
    no permission matches, or no intention does, the default decides
    (``None`` when ``default_allows`` is ``None``).
    """
    found = table.first_match(source)
    if found is None:
        return decide_connection(table, source, default_allows)
    position, intention = found
    described = describe_intention(intention)
    if position in table.invalid or not intention.permissions:
        return decide_connection(table, source, default_allows)
    for k, permission in enumerate(intention.permissions):
        if http_matches(permission.http, request):
            return Decision(
                permission.action == "allow",
                f"Matched intention {described} permission {k} "
                f"({permission.action}) for {request.method} {request.url_path}",
                MATCH_SOURCE,
            )
    if default_allows is None:
        return None
    word = "allows" if default_allows else "denies"
    return Decision(
        default_allows,
        f"No permission of intention {described} matches {request.method} "
        f"{request.url_path}; the default {word}",
        DEFAULT_SOURCE,
    )
