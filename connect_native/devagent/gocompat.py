"""
Go's behaviour where Consul's answers show it: ``strconv.Quote`` (``%q``),
``time.ParseDuration`` and ``Duration.String()``, ``time.RFC3339Nano``, and
``encoding/json`` as Consul decodes request bodies (Go's syntax messages,
case-insensitive keys, unknown fields refused, first type error wins).

A leaf: nothing here imports the rest of the development agent.
"""

from __future__ import annotations

import binascii
import datetime
import re
from collections.abc import Callable
from typing import Any

from attrs import frozen

__all__ = [
    "AnyValue",
    "Bool",
    "GoDurationError",
    "GoJSONError",
    "Int",
    "List",
    "Map",
    "Schema",
    "Str",
    "Struct",
    "decode_go_json",
    "format_config_duration",
    "format_go_duration",
    "go_asn1_problem",
    "go_pem_decode",
    "go_quote",
    "parse_go_duration",
    "parse_go_json",
    "rfc3339_nano",
]

# --------------------------------------------------------------------------
# Go's time.Duration


class GoDurationError(ValueError):
    """
    Go's ``time.ParseDuration`` refused the text; the message is Go's.
    """


_DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_MAX_INT64 = (1 << 63) - 1


def go_quote(text: str) -> str:
    """
    Go's ``strconv.Quote`` for the texts that appear in Consul's messages.
    """
    out = []
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\\ufffd")
        elif not ch.isprintable() and code >= 0x80:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def parse_go_duration(text: str) -> int:
    """
    ``time.ParseDuration``: the duration in integer nanoseconds.

    :raises GoDurationError: with Go's message (``time: invalid duration
        "bogus"``, ``time: missing unit in duration "1"``, ...).
    """
    orig = text
    invalid = GoDurationError(f"time: invalid duration {go_quote(orig)}")
    negative = False
    if text[:1] in ("-", "+"):
        negative = text[0] == "-"
        text = text[1:]
    if text == "0":
        return 0
    if not text:
        raise invalid
    total = 0
    while text:
        if not (text[0] == "." or (text[0].isdigit() and text[0].isascii())):
            raise invalid
        match = re.match(r"([0-9]*)(?:\.([0-9]*))?", text)
        assert match is not None
        whole, frac = match.group(1), match.group(2)
        if not whole and not frac:
            raise invalid
        text = text[match.end() :]
        unit_match = re.match(r"[^0-9.]*", text)
        assert unit_match is not None
        unit = unit_match.group(0)
        text = text[len(unit) :]
        if not unit:
            raise GoDurationError(f"time: missing unit in duration {go_quote(orig)}")
        if unit not in _DURATION_UNITS:
            raise GoDurationError(
                f"time: unknown unit {go_quote(unit)} in duration {go_quote(orig)}"
            )
        scale = _DURATION_UNITS[unit]
        value = int(whole or "0") * scale
        if frac:
            value += int(int(frac) * scale / 10 ** len(frac))
        total += value
        if total > _MAX_INT64:
            raise invalid
    return -total if negative else total


def format_go_duration(ns: int) -> str:
    """
    Go's ``time.Duration.String()``: ``72h0m0s``, ``1m0s``, ``1.5s``, ``0s``.
    """
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000_000_000:
        for unit, scale in (("ms", 1_000_000), ("\u00b5s", 1_000), ("ns", 1)):
            if ns >= scale:
                return sign + _trim_fraction(ns, scale) + unit
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    seconds = _trim_fraction(rest, 1_000_000_000)
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{sign}{minutes}m{seconds}s"
    return f"{sign}{seconds}s"


def _trim_fraction(value: int, scale: int) -> str:
    whole, frac = divmod(value, scale)
    if not frac:
        return str(whole)
    digits = len(str(scale)) - 1
    return f"{whole}." + f"{frac:0{digits}d}".rstrip("0")


def format_config_duration(seconds: float) -> str:
    """
    How a duration appears in the default CA configuration (``72h``), or Go's
    ``Duration.String()`` when it is not a whole number of hours.
    """
    if seconds > 0 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    return format_go_duration(round(seconds * 1e9))


def rfc3339_nano(seconds: float) -> str:
    """
    Go's ``time.RFC3339Nano`` in UTC: trailing zeros of the fraction dropped.
    """
    ns = round(seconds * 1e9)
    whole, frac = divmod(ns, 1_000_000_000)
    moment = datetime.datetime.fromtimestamp(whole, tz=datetime.UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


# --------------------------------------------------------------------------
# Go's encoding/json, as Consul decodes request bodies


class GoJSONError(ValueError):
    """
    Go's ``encoding/json`` refused a body; the message is Go's (``EOF``,
    ``invalid character 'x' looking for beginning of value``,
    ``json: unknown field "X"``, ...).
    """


class JNumber(str):
    """
    A JSON number, as its literal text.
    """

    __slots__ = ()


class JObject(list[tuple[str, Any]]):
    """
    A JSON object as its key/value pairs, in order, duplicates kept.
    """

    __slots__ = ()


_SPACE = frozenset(b" \t\r\n")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = {
    ord('"'): '"',
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}


def _quote_char(c: int) -> str:
    # encoding/json quoteChar
    if c == ord("'"):
        return "'\\''"
    if c == ord('"'):
        return "'\"'"
    return "'" + go_quote(chr(c))[1:-1] + "'"


def _syntax(c: int, context: str) -> GoJSONError:
    return GoJSONError(f"invalid character {_quote_char(c)} {context}")


class _Scanner:
    """
    One JSON value from the front of a body, as ``json.Decoder.Decode``
    reads it: Go's syntax errors, trailing bytes ignored, no recursion (so no
    nesting depth can crash it).
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.i = 0

    def _skip(self) -> None:
        data, i = self.data, self.i
        while i < len(data) and data[i] in _SPACE:
            i += 1
        self.i = i

    def _peek(self) -> int:
        if self.i >= len(self.data):
            raise GoJSONError("unexpected EOF")
        return self.data[self.i]

    def value(self) -> Any:
        self._skip()
        if self.i >= len(self.data):
            raise GoJSONError("EOF")
        # open containers, and the keys of the object values being read
        stack: list[tuple[Any, bool]] = []
        keys: list[str] = []
        while True:
            # expecting a value
            c = self._peek()
            done: Any
            if c == ord("{"):
                self.i += 1
                self._skip()
                if self._peek() == ord("}"):
                    self.i += 1
                    done = JObject()
                else:
                    keys.append(self._key())
                    stack.append((JObject(), True))
                    continue
            elif c == ord("["):
                self.i += 1
                self._skip()
                if self._peek() == ord("]"):
                    self.i += 1
                    done = []
                else:
                    stack.append(([], False))
                    continue
            elif c == ord('"'):
                done = self._string()
            elif c == ord("-") or c in _DIGITS:
                done = self._number(top=not stack)
            elif c == ord("t"):
                self._literal(b"true")
                done = True
            elif c == ord("f"):
                self._literal(b"false")
                done = False
            elif c == ord("n"):
                self._literal(b"null")
                done = None
            else:
                raise _syntax(c, "looking for beginning of value")
            # a value is complete: hand it to its container
            while True:
                if not stack:
                    return done
                container, is_object = stack[-1]
                self._skip()
                c = self._peek()
                if is_object:
                    container.append((keys.pop(), done))
                    if c == ord(","):
                        self.i += 1
                        self._skip()
                        keys.append(self._key())
                        break
                    if c == ord("}"):
                        self.i += 1
                        stack.pop()
                        done = container
                        continue
                    raise _syntax(c, "after object key:value pair")
                container.append(done)
                if c == ord(","):
                    self.i += 1
                    self._skip()
                    break
                if c == ord("]"):
                    self.i += 1
                    stack.pop()
                    done = container
                    continue
                raise _syntax(c, "after array element")

    def _key(self) -> str:
        c = self._peek()
        if c != ord('"'):
            raise _syntax(c, "looking for beginning of object key string")
        key = self._string()
        self._skip()
        c = self._peek()
        if c != ord(":"):
            raise _syntax(c, "after object key")
        self.i += 1
        self._skip()
        return key

    def _literal(self, word: bytes) -> None:
        for expected in word:
            c = self._peek()
            if c != expected:
                raise _syntax(
                    c,
                    f"in literal {word.decode()} (expecting {_quote_char(expected)})",
                )
            self.i += 1

    def _digits(self) -> None:
        data = self.data
        while self.i < len(data) and data[self.i] in _DIGITS:
            self.i += 1

    def _number(self, *, top: bool) -> JNumber:
        data, start = self.data, self.i

        def peek() -> int | None:
            if self.i < len(data):
                return data[self.i]
            if top:
                return None
            raise GoJSONError("unexpected EOF")

        if data[self.i] == ord("-"):
            self.i += 1
            c = peek()
            if c is None:
                raise GoJSONError("unexpected EOF")
            if c not in _DIGITS:
                raise _syntax(c, "in numeric literal")
        if data[self.i] == ord("0"):
            self.i += 1
        else:
            self._digits()
        c = peek()
        if c == ord("."):
            self.i += 1
            c = peek()
            if c is None:
                raise GoJSONError("unexpected EOF")
            if c not in _DIGITS:
                raise _syntax(c, "after decimal point in numeric literal")
            self._digits()
            c = peek()
        if c in (ord("e"), ord("E")):
            self.i += 1
            c = peek()
            if c in (ord("+"), ord("-")):
                self.i += 1
                c = peek()
            if c is None:
                raise GoJSONError("unexpected EOF")
            if c not in _DIGITS:
                raise _syntax(c, "in exponent of numeric literal")
            self._digits()
        return JNumber(data[start : self.i].decode("ascii"))

    def _string(self) -> str:
        data = self.data
        self.i += 1
        out = bytearray()
        pieces: list[str] = []

        def flush() -> None:
            if out:
                pieces.append(out.decode("utf-8", errors="replace"))
                out.clear()

        while True:
            if self.i >= len(data):
                raise GoJSONError("unexpected EOF")
            c = data[self.i]
            if c == ord('"'):
                self.i += 1
                flush()
                return "".join(pieces)
            if c < 0x20:
                raise _syntax(c, "in string literal")
            if c != ord("\\"):
                out.append(c)
                self.i += 1
                continue
            self.i += 1
            c = self._peek()
            if c in _ESCAPES:
                out.extend(_ESCAPES[c].encode())
                self.i += 1
                continue
            if c != ord("u"):
                raise _syntax(c, "in string escape code")
            self.i += 1
            code = self._hex4()
            flush()
            if 0xD800 <= code < 0xDC00 and data[self.i : self.i + 2] == b"\\u":
                saved = self.i
                self.i += 2
                low = self._hex4()
                if 0xDC00 <= low < 0xE000:
                    code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                else:
                    self.i = saved
                    code = 0xFFFD
            if 0xD800 <= code < 0xE000:
                code = 0xFFFD
            pieces.append(chr(code))

    def _hex4(self) -> int:
        value = 0
        for _ in range(4):
            c = self._peek()
            if c not in _HEX:
                raise _syntax(c, "in \\u hexadecimal character escape")
            value = value * 16 + int(chr(c), 16)
            self.i += 1
        return value


def parse_go_json(data: bytes) -> Any:
    """
    The first JSON value of ``data`` as Go's ``json.Decoder`` reads it.

    :raises GoJSONError: with Go's syntax message.
    """
    return _Scanner(data).value()


# ---- schemas: the Go types Consul decodes into


class Schema:
    go_type = "interface {}"


class Str(Schema):
    def __init__(self, go_type: str = "string"):
        self.go_type = go_type


class Int(Schema):
    def __init__(self, go_type: str = "int", bits: int = 64, signed: bool = True):
        self.go_type = go_type
        self.bits = bits
        self.signed = signed


class Bool(Schema):
    go_type = "bool"


class AnyValue(Schema):
    go_type = "interface {}"


class List(Schema):
    def __init__(self, elem: Schema, go_type: str | None = None):
        self.elem = elem
        self.go_type = go_type or f"[]{elem.go_type}"


class Map(Schema):
    def __init__(self, elem: Schema, go_type: str | None = None):
        self.elem = elem
        self.go_type = go_type or f"map[string]{elem.go_type}"


class Struct(Schema):
    """
    A Go struct: ``fields`` maps each field's name to its schema, and
    ``aliases`` snake_case keys to field names.  ``custom`` structs have
    their own ``UnmarshalJSON`` in Consul, decoding into an anonymous
    struct (``go_type``) with a decoder of their own (``strict`` or not):
    errors inside them abort at once and are reported against the field
    that holds them.
    """

    def __init__(
        self,
        go_type: str,
        context_name: str,
        fields: dict[str, Schema],
        *,
        aliases: dict[str, str] | None = None,
        custom: bool = False,
        strict: bool = True,
        post: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.go_type = go_type
        self.context_name = context_name
        self.fields = fields
        self.aliases = aliases or {}
        self.custom = custom
        self.strict = strict
        self.post = post

    def lookup(self, key: str) -> tuple[str, Schema, bool] | None:
        """
        The field a JSON key sets (exact name first, then Go's
        case-insensitive match): its canonical name, schema, and whether the
        key was a snake_case alias.
        """
        names = list(self.fields) + list(self.aliases)
        name = key if key in names else None
        if name is None:
            name = next((n for n in names if n.lower() == key.lower()), None)
        if name is None:
            return None
        canonical = self.aliases.get(name, name)
        return canonical, self.fields[canonical], name in self.aliases


class _ImmediateError(Exception):
    def __init__(self, error: GoJSONError | GoDurationError):
        self.error = error


@frozen
class _Context:
    """
    Where a value sits, as encoding/json (Go 1.15) reports it: the innermost
    struct's type name and the path of field names from the decoder's root.
    """

    struct: str | None
    path: tuple[str, ...]

    def field(self, struct: str, name: str) -> _Context:
        return _Context(struct, (*self.path, name))


_ROOT = _Context(None, ())
_TYPE_ERROR = re.compile(r"into Go (struct field \S*|value) of type")


class _Decoder:
    def __init__(self, *, strict: bool = True) -> None:
        self.strict = strict
        self.saved: GoJSONError | None = None

    def save(self, error: GoJSONError) -> None:
        if self.saved is None:
            self.saved = error

    def type_error(self, what: str, schema: Schema, ctx: _Context) -> None:
        if ctx.path:
            where = f"Go struct field {ctx.struct or ''}.{'.'.join(ctx.path)}"
        else:
            where = "Go value"
        self.save(
            GoJSONError(
                f"json: cannot unmarshal {what} into {where} of type {schema.go_type}"
            )
        )

    def decode(self, value: Any, schema: Schema, ctx: _Context) -> Any:
        if value is None:
            return None
        if isinstance(schema, AnyValue):
            return _plain(value)
        if isinstance(schema, Struct):
            if schema.custom:
                return self.custom(value, schema, ctx)
            if not isinstance(value, JObject):
                self.type_error(_kind(value), schema, ctx)
                return None
            return self.struct(value, schema, ctx)
        if isinstance(schema, List):
            if not isinstance(value, list) or isinstance(value, JObject):
                self.type_error(_kind(value), schema, ctx)
                return None
            return [self.decode(v, schema.elem, ctx) for v in value]
        if isinstance(schema, Map):
            if not isinstance(value, JObject):
                self.type_error(_kind(value), schema, ctx)
                return None
            mapping: dict[str, Any] = {}
            for key, item in value:
                mapping[key] = self.decode(item, schema.elem, ctx)
            return mapping
        if isinstance(schema, Str):
            if isinstance(value, str) and not isinstance(value, JNumber):
                return value
            self.type_error(_kind(value), schema, ctx)
            return None
        if isinstance(schema, Bool):
            if isinstance(value, bool):
                return value
            self.type_error(_kind(value), schema, ctx)
            return None
        if isinstance(schema, Int):
            if isinstance(value, JNumber):
                if re.fullmatch(r"-?[0-9]+", value):
                    number = int(value)
                    low = -(1 << (schema.bits - 1)) if schema.signed else 0
                    high = (
                        (1 << (schema.bits - 1)) - 1
                        if schema.signed
                        else (1 << schema.bits) - 1
                    )
                    if low <= number <= high:
                        return number
                self.type_error(f"number {value}", schema, ctx)
                return None
            self.type_error(_kind(value), schema, ctx)
            return None
        raise AssertionError(f"unknown schema {schema!r}")

    def custom(self, value: Any, schema: Struct, ctx: _Context) -> Any:
        """
        A struct with its own ``UnmarshalJSON``: a fresh decoder, and any
        error aborts the whole decoding, reported against the field that
        holds the struct (encoding/json's ``addErrorContext``).
        """
        inner = _Decoder(strict=schema.strict)
        error: GoJSONError | GoDurationError | None = None
        out: Any = None
        try:
            if isinstance(value, JObject):
                out = inner.struct(value, schema, _ROOT)
            else:
                inner.type_error(_kind(value), schema, _ROOT)
            error = inner.saved
        except _ImmediateError as e:
            error = e.error
        if error is None and out is not None and schema.post is not None:
            try:
                out = schema.post(out)
            except GoDurationError as e:
                error = e
        if error is None:
            return out
        if ctx.path and isinstance(error, GoJSONError):
            where = (
                f"into Go struct field {ctx.struct or ''}.{'.'.join(ctx.path)} of type"
            )
            error = GoJSONError(_TYPE_ERROR.sub(where, str(error), count=1))
        raise _ImmediateError(error)

    def struct(self, value: JObject, schema: Struct, ctx: _Context) -> dict[str, Any]:
        out: dict[str, Any] = {name: None for name in schema.fields}
        for key, item in value:
            found = schema.lookup(key)
            if found is None:
                if self.strict:
                    self.save(GoJSONError(f"json: unknown field {go_quote(key)}"))
                continue
            name, field_schema, alias = found
            decoded = self.decode(
                item, field_schema, ctx.field(schema.context_name, name)
            )
            if decoded is None:
                # null, or a type error already saved: the field keeps its value.
                continue
            if alias and out[name]:
                # Consul copies a snake_case alias only over an empty field.
                continue
            out[name] = decoded
        return out


def _kind(value: Any) -> str:
    if isinstance(value, JNumber):
        return "number"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "string"
    if isinstance(value, JObject):
        return "object"
    if isinstance(value, list):
        return "array"
    return "null"


def _plain(value: Any) -> Any:
    """
    A parsed value as Python data (``interface{}``): numbers as int or float.
    """
    if isinstance(value, JNumber):
        if re.fullmatch(r"-?[0-9]+", value):
            return int(value)
        return float(value)
    if isinstance(value, JObject):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def decode_go_json(data: bytes, schema: Schema) -> Any:
    """
    Decode a request body as Consul does (``json.Decoder`` with
    ``DisallowUnknownFields``) into ``schema``: a dict with every field of a
    struct (``None`` when absent).

    :raises GoJSONError: with Go's message.
    :raises GoDurationError: for a bad duration inside a check.
    """
    value = parse_go_json(data)
    decoder = _Decoder()
    try:
        out = decoder.decode(value, schema, _ROOT)
    except _ImmediateError as e:
        raise e.error from None
    except RecursionError:
        raise GoJSONError("exceeded max depth") from None
    if decoder.saved is not None:
        raise decoder.saved
    if out is None and isinstance(schema, Struct):
        out = {name: None for name in schema.fields}
    return out


# --------------------------------------------------------------------------
# encoding/pem and encoding/asn1, as far as Consul's CA messages show them

_PEM_BLOCK = re.compile(
    r"(?:^|\n)-----BEGIN ([^\n]*?)-----[ \t]*\r?\n(.*?)(?:^|\n)-----END \1-----",
    re.DOTALL,
)


def go_pem_decode(text: str) -> tuple[str, bytes] | None:
    """
    Go's ``pem.Decode``: the type and bytes of the first well-formed block
    (matching END line, valid base64), or ``None`` when there is none (Consul
    then says ``no PEM-encoded data found``).
    """
    for match in _PEM_BLOCK.finditer(text):
        body = match.group(2)
        if ":" in body.split("\n\n", 1)[0] and "\n\n" in body:
            body = body.split("\n\n", 1)[1]  # RFC 1421 headers
        encoded = "".join(body.split())
        if len(encoded) % 4 or "=" in encoded[:-2]:
            continue
        try:
            data = binascii.a2b_base64(encoded.encode("ascii"), strict_mode=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            continue
        return match.group(1), data
    return None


class _Asn1Error(Exception):
    pass


def _asn1_syntax(message: str) -> _Asn1Error:
    return _Asn1Error(f"asn1: syntax error: {message}")


def _asn1_structural(message: str) -> _Asn1Error:
    return _Asn1Error(f"asn1: structure error: {message}")


# fieldParameters of a field without tags, as %+v prints them.
_NO_PARAMS = (
    "{optional:false explicit:false application:false private:false "
    "defaultValue:<nil> tag:<nil> stringType:0 timeType:0 set:false "
    "omitEmpty:false}"
)


def _tag_and_length(der: bytes, offset: int) -> tuple[int, bool, int, int, int]:
    """
    ``parseTagAndLength``: class, compound, tag, length, and the offset after.
    """
    b = der[offset]
    offset += 1
    cls, compound, tag = b >> 6, bool(b & 0x20), b & 0x1F
    if tag == 0x1F:
        tag = 0
        for shifted in range(6):
            if offset >= len(der):
                raise _asn1_syntax("truncated base 128 integer")
            if shifted == 5:
                raise _asn1_structural("base 128 integer too large")
            b = der[offset]
            if shifted == 0 and b == 0x80:
                raise _asn1_syntax("integer is not minimally encoded")
            tag = (tag << 7) | (b & 0x7F)
            offset += 1
            if not b & 0x80:
                break
        if tag > 0x7FFFFFFF:
            raise _asn1_structural("base 128 integer too large")
        if tag < 0x1F:
            raise _asn1_syntax("non-minimal tag")
    if offset >= len(der):
        raise _asn1_syntax("truncated tag or length")
    b = der[offset]
    offset += 1
    if not b & 0x80:
        return cls, compound, tag, b, offset
    count = b & 0x7F
    if count == 0:
        raise _asn1_syntax("indefinite length found (not DER)")
    length = 0
    for _ in range(count):
        if offset >= len(der):
            raise _asn1_syntax("truncated tag or length")
        b = der[offset]
        offset += 1
        if length >= 1 << 23:
            raise _asn1_structural("length too large")
        length = (length << 8) | b
        if length == 0:
            raise _asn1_structural("superfluous leading zeros in length")
    if length < 0x80:
        raise _asn1_structural("non-minimal length")
    return cls, compound, tag, length, offset


def _field(der: bytes, expected: int, type_name: str) -> bytes:
    """
    ``parseField`` for a field without tags, expecting universal tag
    ``expected`` (16: a struct, 2: an int): its contents.
    """
    if not der:
        raise _asn1_syntax("sequence truncated")
    cls, compound, tag, length, offset = _tag_and_length(der, 0)
    if (cls, tag, compound) != (0, expected, expected == 16):
        raise _asn1_structural(
            f"tags don't match ({expected} vs {{class:{cls} tag:{tag} "
            f"length:{length} isCompound:{str(compound).lower()}}}) {_NO_PARAMS} "
            f"{type_name} @{offset}"
        )
    if offset + length > len(der):
        raise _asn1_syntax("data truncated")
    return der[offset : offset + length]


def go_asn1_problem(
    der: bytes, struct: str, first_field: tuple[int, str]
) -> str | None:
    """
    The error Go's ``asn1.Unmarshal`` of ``der`` into the struct named
    ``struct`` starts with, when it is in the outer element or the header of
    the struct's first field (``(universal tag, Go type name)``): e.g.
    ``asn1: structure error: tags don't match (16 vs {class:0 tag:0 ...})
    ... certificate @2`` for three zero bytes.  ``None`` when those parse:
    deeper problems are not modelled.
    """
    try:
        inner = _field(der, 16, struct)
        _field(inner, *first_field)
    except _Asn1Error as e:
        return str(e)
    return None
