"""
Request bodies are decoded as Consul's Go code decodes them
(``encoding/json`` with unknown fields refused): Go's syntax messages, case
insensitive keys, first type error wins, trailing bytes ignored, and no
input can make the decoder crash.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connect_native.devagent.gocompat import (
    GoDurationError,
    GoJSONError,
    decode_go_json,
    format_go_duration,
    parse_go_duration,
    parse_go_json,
)
from connect_native.devagent.http.bodies import AUTHORIZE, CHECK_UPDATE, SERVICE


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "EOF"),
        (b" \n\t", "EOF"),
        (b"{", "unexpected EOF"),
        (b'{"a":', "unexpected EOF"),
        (b"[1,", "unexpected EOF"),
        (b'"abc', "unexpected EOF"),
        (b"-", "unexpected EOF"),
        (b"tru", "unexpected EOF"),
        (b"not json", "invalid character 'o' in literal null (expecting 'u')"),
        (b"xx", "invalid character 'x' looking for beginning of value"),
        (b'{"a" 1}', "invalid character '1' after object key"),
        (b'{"a":1 x}', "invalid character 'x' after object key:value pair"),
        (b"[1 x]", "invalid character 'x' after array element"),
        (b"{x}", "invalid character 'x' looking for beginning of object key string"),
        (
            b'{"a":1,}',
            "invalid character '}' looking for beginning of object key string",
        ),
        (b"[-x]", "invalid character 'x' in numeric literal"),
        (b"[1.x]", "invalid character 'x' after decimal point in numeric literal"),
        (b"[1ex]", "invalid character 'x' in exponent of numeric literal"),
        (b'"\\x"', "invalid character 'x' in string escape code"),
        (b'"\\u12g4"', "invalid character 'g' in \\u hexadecimal character escape"),
        (b'"a\nb"', "invalid character '\\n' in string literal"),
        (b"'a'", "invalid character '\\'' looking for beginning of value"),
        (b"[nulx]", "invalid character 'x' in literal null (expecting 'l')"),
    ],
)
def test_syntax_errors_have_go_messages(raw: bytes, message: str) -> None:
    with pytest.raises(GoJSONError) as caught:
        parse_go_json(raw)
    assert str(caught.value) == message


def test_trailing_bytes_after_the_first_value_are_ignored() -> None:
    decoded = decode_go_json(b'{"Target":"web"} trailing {', AUTHORIZE)
    assert decoded["Target"] == "web"


def test_keys_match_case_insensitively_and_the_last_one_wins() -> None:
    decoded = decode_go_json(b'{"target":"a","TARGET":"b"}', AUTHORIZE)
    assert decoded["Target"] == "b"


def test_null_leaves_a_field_unset() -> None:
    assert decode_go_json(b'{"Target":null}', AUTHORIZE)["Target"] is None
    # the Go client sends "Check": null, "Checks": null
    decoded = decode_go_json(b'{"Name":"x","Check":null,"Checks":null}', SERVICE)
    assert (decoded["Check"], decoded["Checks"]) == (None, None)


def test_first_type_error_in_document_order_wins() -> None:
    with pytest.raises(GoJSONError) as caught:
        decode_go_json(b'{"Status":1,"Output":2}', CHECK_UPDATE)
    assert str(caught.value) == (
        "json: cannot unmarshal number into Go struct field checkUpdate.Status of "
        "type string"
    )


def test_top_level_type_error() -> None:
    with pytest.raises(GoJSONError) as caught:
        decode_go_json(b"[]", CHECK_UPDATE)
    assert str(caught.value) == (
        "json: cannot unmarshal array into Go value of type agent.checkUpdate"
    )


def test_unicode_escapes_and_surrogate_pairs() -> None:
    assert (
        parse_go_json(b'"\\u00fcn\\ud83d\\ude00\\ud800x"') == "\u00fcn\U0001f600\ufffdx"
    )


def test_invalid_utf8_becomes_the_replacement_character() -> None:
    assert parse_go_json(b'"a\xffb"') == "a\ufffdb"


def test_deep_nesting_does_not_crash() -> None:
    with pytest.raises(GoJSONError, match="unexpected EOF"):
        parse_go_json(b"[" * 200_000)
    value = b"[" * 5000 + b"]" * 5000
    with pytest.raises(GoJSONError):
        decode_go_json(b'{"Name":"x","Proxy":{"Config":{"a":' + value + b"}}}", SERVICE)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_fail_with_a_go_error(raw: bytes) -> None:
    for schema in (SERVICE, AUTHORIZE):
        try:
            decode_go_json(raw, schema)
        except (GoJSONError, GoDurationError):
            pass


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=20,
    )
)
def test_any_json_value_decodes_or_fails_with_a_go_error(value: object) -> None:
    import json

    for key in ("Name", "Check", "Checks", "Connect", "Proxy", "Weights", "Meta"):
        raw = json.dumps({key: value}).encode()
        try:
            decode_go_json(raw, SERVICE)
        except (GoJSONError, GoDurationError):
            pass


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("0", 0),
        ("72h", 72 * 3600 * 10**9),
        ("1h30m", 5400 * 10**9),
        ("1.5s", 1_500_000_000),
        ("-1s", -(10**9)),
        ("300ms", 300_000_000),
        ("1us", 1000),
        ("1\u00b5s", 1000),
        (".5s", 500_000_000),
    ],
)
def test_go_durations(text: str, ns: int) -> None:
    assert parse_go_duration(text) == ns


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus", 'time: invalid duration "bogus"'),
        ("", 'time: invalid duration ""'),
        ("1", 'time: missing unit in duration "1"'),
        ("1x", 'time: unknown unit "x" in duration "1x"'),
        ("99999999999h", 'time: invalid duration "99999999999h"'),
    ],
)
def test_bad_go_durations(text: str, message: str) -> None:
    with pytest.raises(GoDurationError) as caught:
        parse_go_duration(text)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0s"),
        (72 * 3600 * 10**9, "72h0m0s"),
        (90 * 10**9, "1m30s"),
        (1_500_000, "1.5ms"),
    ],
)
def test_go_duration_strings(ns: int, text: str) -> None:
    assert format_go_duration(ns) == text
