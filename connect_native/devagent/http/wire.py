"""
The wire format of Consul's HTTP API: query-string parsing and query
options, tokens, Go's JSON encoding of answers, the reply with its headers,
gzip and Consul's error bodies, and the blocking-query constants.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote_to_bytes

from attrs import frozen
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from connect_native import _logging
from connect_native.devagent.bexpr import (
    SCHEMAS,
    BexprError,
    BexprNilPointerError,
    BexprSyntaxError,
    Filter,
    compile_filter,
)
from connect_native.devagent.gocompat import (
    GoDurationError,
    go_quote,
    parse_go_duration,
)
from connect_native.devagent.store import ConsulError
from connect_native.devagent.tables.acl_rules import Authorizer

log = Logger(observer=_logging.observer)


# Consul wraps its API in gziphandler with MinSize(0): every non-empty body
# is compressed when the client asks (measured on 1.8.7).
GZIP_MIN_SIZE = 1
MAX_QUERY_TIME = 600.0
DEFAULT_QUERY_TIME = 300.0
JITTER_FRACTION = 16
TEXT_PLAIN = "text/plain; charset=utf-8"


# --------------------------------------------------------------------------
# HTTP plumbing


def go_json_bytes(value: Any) -> bytes:
    """
    Go's ``json.MarshalIndent(v, "", "    ")`` plus a newline, as a ``-dev``
    agent writes every body: ``<``, ``>``, ``&``, U+2028 and U+2029 escaped.
    """
    text = json.dumps(value, indent=4, ensure_ascii=False, allow_nan=False)
    text = (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )
    return (text + "\n").encode("utf-8", errors="replace")


def parse_query(request: Request) -> dict[str, list[str]]:
    """
    Go's ``url.ParseQuery`` (1.15: ``&`` and ``;`` separate pairs; a pair
    with a bad escape is dropped).
    """
    uri = request.uri
    raw = uri.split(b"?", 1)[1] if b"?" in uri else b""
    out: dict[str, list[str]] = {}
    for pair in re.split(rb"[&;]", raw):
        if not pair:
            continue
        key, _, value = pair.partition(b"=")
        try:
            k = query_unescape(key)
            v = query_unescape(value)
        except ValueError:
            continue
        out.setdefault(k, []).append(v)
    return out


def query_unescape(raw: bytes) -> str:
    if re.search(rb"%(?![0-9A-Fa-f]{2})", raw):
        raise ValueError("invalid URL escape")
    return unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8", errors="replace")


def first_arg(query: dict[str, list[str]], key: str) -> str:
    values = query.get(key)
    return values[0] if values else ""


def parse_bool(text: str) -> bool:
    # strconv.ParseBool
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(text)


@frozen
class QueryOptions:
    """
    The blocking and consistency parameters of a read.
    """

    index: int
    wait: float
    stale: bool
    consistent: bool
    cached: bool
    datacenter: str | None

    @property
    def consistency(self) -> str:
        if self.consistent:
            return "consistent"
        if self.stale:
            return "stale"
        return "leader"


@frozen
class DiscoveryRead:
    """
    A catalog or health read of one service, parsed and checked.
    """

    name: str
    connect: bool
    query: dict[str, list[str]]
    options: QueryOptions
    tags: list[str]
    node_meta: dict[str, str]
    authz: Authorizer | None
    filter: Filter | None = None


def query_options(request: Request, query: dict[str, list[str]]) -> QueryOptions:
    """
    Consul's ``parseDC``, ``parseConsistency``, ``parseCacheControl`` and
    ``parseWait``, in that order, with their 400s.
    """
    stale = "stale" in query
    consistent = "consistent" in query
    cached = "cached" in query
    max_stale = first_arg(query, "max_stale")
    if max_stale:
        try:
            if parse_go_duration(max_stale) > 0:
                stale = True
        except GoDurationError:
            raise ConsulError(
                400, f"Invalid max_stale value {go_quote(max_stale)}"
            ) from None
    if stale and consistent:
        raise ConsulError(
            400, "Cannot specify ?stale with ?consistent, conflicting semantics."
        )
    if cached and consistent:
        raise ConsulError(
            400, "Cannot specify ?cached with ?consistent, conflicting semantics."
        )
    cache_control = request.getHeader("cache-control")
    if cache_control:
        for directive in cache_control.split(","):
            name, _, value = directive.strip().partition("=")
            if name.lower() in ("max-age", "stale-if-error") and not re.fullmatch(
                r"[0-9]+", value
            ):
                raise ConsulError(400, "Invalid Cache-Control header.")
    wait = 0.0
    wait_text = first_arg(query, "wait")
    if wait_text:
        try:
            wait = parse_go_duration(wait_text) * 1e-9
        except GoDurationError:
            raise ConsulError(400, "Invalid wait time") from None
    index = 0
    index_text = first_arg(query, "index")
    if index_text:
        if not re.fullmatch(r"[0-9]+", index_text) or int(index_text) >= 1 << 64:
            raise ConsulError(400, "Invalid index")
        index = int(index_text)
    dc = first_arg(query, "dc") or None
    return QueryOptions(
        index=index,
        wait=wait,
        stale=stale,
        consistent=consistent,
        cached=cached,
        datacenter=dc,
    )


def refuse_namespaces(request: Request, query: dict[str, list[str]]) -> None:
    # parseEntMeta in Consul OSS.
    if request.getHeader("x-consul-namespace"):
        raise ConsulError(
            400,
            'Bad request: Invalid header: "X-Consul-Namespace" - Namespaces are a '
            "Consul Enterprise feature",
        )
    if first_arg(query, "ns"):
        raise ConsulError(
            400,
            'Bad request: Invalid query parameter: "ns" - Namespaces are a Consul '
            "Enterprise feature",
        )


def request_token(request: Request, query: dict[str, list[str]]) -> str:
    """
    The ACL token of a request, where Consul looks for it: ``?token=``,
    then ``X-Consul-Token``, then ``Authorization: Bearer`` (measured: a
    non-empty query token wins over the header).
    """
    token = first_arg(query, "token")
    if token:
        return token
    token = request.getHeader("x-consul-token") or ""
    if token:
        return token
    authorization = request.getHeader("authorization") or ""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    return ""


class Reply:
    """
    One response being built: status, headers, body.
    """

    def __init__(self, request: Request, clock: Any) -> None:
        self.request = request
        self.gone = False
        self._clock = clock
        self._started = clock.seconds()
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, failure: Failure) -> None:
        self.gone = True
        log.info(
            "{method} {uri}: the client went away after {elapsed:.3f} s",
            method=decode_text(self.request.method),
            uri=decode_text(self.request.uri),
            elapsed=self._clock.seconds() - self._started,
        )

    def send(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str | None,
        vary: bool = True,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        request = self.request
        if self.gone or request.finished:
            return
        request.setResponseCode(status)
        response_headers = request.responseHeaders
        response_headers.removeHeader(b"server")
        response_headers.removeHeader(b"content-type")
        request.defaultContentType = None
        for name, value in headers:
            response_headers.setRawHeaders(name, [value])
        if content_type is not None:
            response_headers.setRawHeaders("Content-Type", [content_type])
        if vary:
            response_headers.setRawHeaders("Vary", ["Accept-Encoding"])
        accept = (request.getHeader("accept-encoding") or "").lower()
        if vary and "gzip" in accept and len(body) >= GZIP_MIN_SIZE:
            body = gzip.compress(body)
            response_headers.setRawHeaders("Content-Encoding", ["gzip"])
        response_headers.setRawHeaders("Content-Length", [str(len(body))])
        request.write(body)  # type: ignore[no-untyped-call]
        request.finish()  # type: ignore[no-untyped-call]
        log.info(
            "{method} {uri} -> {status} ({elapsed:.3f} s)",
            method=decode_text(request.method),
            uri=decode_text(request.uri),
            status=status,
            elapsed=self._clock.seconds() - self._started,
        )

    def json(
        self, value: Any, headers: Sequence[tuple[str, str]] = (), status: int = 200
    ) -> None:
        self.send(
            status,
            go_json_bytes(value),
            content_type="application/json",
            headers=headers,
        )

    def empty(self) -> None:
        self.send(200, b"", content_type=None)

    def error(self, error: ConsulError) -> None:
        headers = list(error.headers)
        if error.allow is not None:
            headers.append(("Allow", error.allow))
        self.send(
            error.status,
            error.message.encode("utf-8", errors="replace"),
            content_type=None
            if error.status == 404 and not error.message
            else TEXT_PLAIN,
            headers=headers,
        )

    def failure(self, failure: Failure) -> None:
        if failure.check(CancelledError):  # type: ignore[no-untyped-call]
            return
        error = failure.value
        if isinstance(error, ConsulError):
            self.error(error)
            return
        log.failure("unexpected error answering {uri}", failure, uri=self.request.uri)
        self.error(ConsulError(500, f"dev agent internal error: {error!r}"))


def decode_text(raw: bytes | None) -> str:
    return (raw or b"").decode("ascii", "replace")


def meta_headers(
    index: int, *, known_leader: bool, consistency: str | None = None
) -> list[tuple[str, str]]:
    # setMeta: index (never 0), known leader, last contact, consistency.
    headers = [
        ("X-Consul-Index", str(max(index, 1))),
        ("X-Consul-Knownleader", "true" if known_leader else "false"),
        ("X-Consul-Lastcontact", "0"),
    ]
    if consistency is not None:
        headers.append(("X-Consul-Effective-Consistency", consistency))
    return headers


def cache_headers(hit: bool, age: float | None = 0.0) -> list[tuple[str, str]]:
    if not hit:
        return [("X-Cache", "MISS")]
    return [("X-Cache", "HIT"), ("Age", f"{age or 0.0:.0f}")]


def go_atoi(text: str, prefix: str) -> int:
    # strconv.Atoi, with its two error texts.
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ConsulError(
            500,
            f"{prefix}strconv.Atoi: parsing {go_quote(text)}: invalid syntax",
        )
    value = int(text)
    if not -(1 << 63) <= value < 1 << 63:
        raise ConsulError(
            500,
            f"{prefix}strconv.Atoi: parsing {go_quote(text)}: value out of range",
        )
    return value


def refuse_filter(query: dict[str, list[str]]) -> None:
    if first_arg(query, "filter"):
        # Real Consul evaluates bexpr filters on these listings too; refusing
        # beats answering unfiltered.  The status and headers are those of a
        # filter the real agent cannot evaluate.
        raise ConsulError(
            500,
            "Failed to create boolean expression evaluator: the development "
            "agent does not evaluate ?filter expressions here; filter the "
            "results in the client, or test against a real Consul agent",
            headers=meta_headers(1, known_leader=False),
        )


FILTER_ERROR_PREFIX = "Failed to create boolean expression evaluator: "


def query_filter(
    query: dict[str, list[str]], endpoint: str, *, rpc: bool
) -> Filter | None:
    """
    The ``?filter=`` of a read of *endpoint* (a key of
    :data:`~connect_native.devagent.bexpr.SCHEMAS`), compiled; ``None`` when
    absent or empty.

    :raises ConsulError: 500 with 1.8.7's text for a malformed or invalid
        expression; an RPC-backed read (*rpc*) carries the query meta of a
        failed RPC (index 1, no known leader), as measured.
    """
    expression = first_arg(query, "filter")
    if not expression:
        return None
    try:
        return compile_filter(expression, SCHEMAS[endpoint])
    except BexprError as e:
        # 1.8.7's /v1/agent/checks reports a validation error bare
        # (filter-agent-checks-unknown.http) but wraps a syntax error
        # (filter-agent-checks-malformed.http); the others wrap both.
        bare = endpoint == "agent/checks" and not isinstance(e, BexprSyntaxError)
        prefix = "" if bare else FILTER_ERROR_PREFIX
        raise ConsulError(
            500,
            prefix + str(e),
            headers=meta_headers(1, known_leader=False) if rpc else (),
        ) from None


def apply_filter(flt: Filter | None, body: Any) -> Any:
    """
    *body* (a JSON list, or a JSON object keyed by ID) without the elements
    *flt* rejects.

    :raises ConsulError: 500 where 1.8.7 panics on a nil pointer.
    """
    if flt is None:
        return body
    try:
        if isinstance(body, dict):
            return {key: item for key, item in body.items() if flt.matches(item)}
        return [item for item in body if flt.matches(item)]
    except BexprNilPointerError as e:
        raise ConsulError(500, f"Failed to evaluate the filter: {e}") from None


def node_meta_filter(query: dict[str, list[str]]) -> dict[str, str]:
    node_meta: dict[str, str] = {}
    for item in query.get("node-meta", []):
        key, _, value = item.partition(":")
        node_meta[key] = value
    return node_meta
