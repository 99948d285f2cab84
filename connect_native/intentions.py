"""
The old name of :mod:`connect_native.authorize.rules` (Consul's intention
precedence and L7 matching, as pure functions), kept so that imports written
for it keep working.  New code imports from :mod:`connect_native.authorize.rules`.
"""

from __future__ import annotations

from connect_native.authorize.rules import (
    DEFAULT_SOURCE,
    HTTP_METHODS,
    L7_SOURCE,
    MATCH_SOURCE,
    CompiledIntentions,
    HTTPRequest,
    IntentionDefault,
    InvalidPermission,
    compile_intentions,
    decide_connection,
    decide_http,
    describe_intention,
    first_match,
    header_matches,
    http_matches,
    intention_precedence,
    matches_destination,
    matches_source,
    sort_by_precedence,
    validate_permission,
)
from connect_native.authorize.rules import WILDCARD as WILDCARD
from connect_native.authorize.rules import HeadersLike as HeadersLike

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
