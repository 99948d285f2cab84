"""
Consul's ``?filter=`` language (go-bexpr v0.1.2, as vendored by Consul 1.8.7).

Pure and reactor-free: :func:`compile_filter` parses an expression, checks it
against the fields of one endpoint's Go struct (a :class:`Field` tree, see
:data:`SCHEMAS`) and returns a :class:`Filter` that tests the JSON objects the
endpoint answers with.  Every problem is a :class:`BexprError` whose text is
the real agent's (parse errors are those of the pigeon-generated parser:
farthest failure position and the sorted set of expected tokens).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from connect_native.devagent.gocompat import go_quote

__all__ = [
    "SCHEMAS",
    "BexprError",
    "BexprNilPointerError",
    "BexprSyntaxError",
    "Field",
    "Filter",
    "compile_filter",
]


class BexprError(ValueError):
    """A filter the real agent refuses; ``str()`` is the real agent's text."""


class BexprSyntaxError(BexprError):
    """The expression does not parse (the text is the parser's)."""


class BexprNilPointerError(ValueError):
    """
    Evaluation reached a nil pointer: real Consul 1.8.7 panics there and
    drops the connection.  ``str()`` is our one-line explanation.
    """


# ---------------------------------------------------------------------------
# AST

EQUAL = "Equal"
NOT_EQUAL = "Not Equal"
IN = "In"
NOT_IN = "Not In"
IS_EMPTY = "Is Empty"
IS_NOT_EMPTY = "Is Not Empty"
MATCHES = "Matches"
NOT_MATCHES = "Not Matches"


@dataclass
class Match:
    selector: list[str]
    operator: str
    raw: str | None
    converted: object = None


@dataclass
class Not:
    operand: Node


@dataclass
class Binary:
    operator: str  # "and" / "or"
    left: Node
    right: Node


Node = Match | Not | Binary

# ---------------------------------------------------------------------------
# Parser: a transcription of grammar.peg with pigeon's error reporting.


class _Fail:
    pass


FAIL = _Fail()
_WS = " \t\r\n"
_ALPHA = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_IDENT = _ALPHA | frozenset("0123456789_")


def _go_unquote(text: str) -> str:
    if text[0] == "`":
        return text[1:-1].replace("\r", "")
    body = text[1:-1]
    if "\n" in body:
        raise ValueError("invalid syntax")
    out: list[str] = []
    i = 0
    simple = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
    simple.update({"v": "\v", "\\": "\\", '"': '"'})
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        if i + 1 >= len(body):
            raise ValueError("invalid syntax")
        esc = body[i + 1]
        if esc in simple:
            out.append(simple[esc])
            i += 2
            continue
        width = {"x": 2, "u": 4, "U": 8}.get(esc)
        if width is not None:
            digits = body[i + 2 : i + 2 + width]
            if len(digits) != width or not all(
                c in "0123456789abcdefABCDEF" for c in digits
            ):
                raise ValueError("invalid syntax")
            value = int(digits, 16)
            if esc != "x" and (value > 0x10FFFF or 0xD800 <= value < 0xE000):
                raise ValueError("invalid syntax")
            out.append(chr(value))
            i += 2 + width
            continue
        digits = body[i + 1 : i + 4]
        if (
            len(digits) == 3
            and all(c in "01234567" for c in digits)
            and int(digits, 8) < 256
        ):
            out.append(chr(int(digits, 8)))
            i += 4
            continue
        raise ValueError("invalid syntax")
    return "".join(out)


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.n = len(text)
        self.pos = 0
        self.max_fail = -1
        self.expected: set[str] = set()
        self.invert = False
        self.errors: list[tuple[int, str]] = []
        self.rules: list[str] = []
        self.memo: dict[tuple[str, int, bool], tuple[object, int]] = {}

    # -- pigeon's bookkeeping
    def fail_at(self, matched: bool, pos: int, want: str) -> None:
        if matched != self.invert:
            return
        if pos < self.max_fail:
            return
        if pos > self.max_fail:
            self.max_fail = pos
            self.expected = set()
        self.expected.add("!" + want if self.invert else want)

    def position(self, pos: int) -> str:
        line, col = 1, 0
        for ch in self.s[:pos]:
            col += 1
            if ch == "\n":
                line, col = line + 1, 0
        offset = len(self.s[:pos].encode("utf-8", "surrogatepass"))
        return f"{line}:{col + 1} ({offset})"

    def error(self, message: str, pos: int | None = None) -> None:
        rule = f'rule "{self.rules[-1]}": ' if self.rules else ""
        self.errors.append((self.pos if pos is None else pos, rule + message))

    # -- matchers
    def lit(self, text: str) -> object:
        start = self.pos
        if self.s.startswith(text, start):
            self.pos += len(text)
            self.fail_at(True, start, go_quote(text))
            return text
        self.fail_at(False, start, go_quote(text))
        return FAIL

    def cls(self, chars: frozenset[str] | str, want: str) -> object:
        start = self.pos
        if start < self.n and self.s[start] in chars:
            self.pos += 1
            self.fail_at(True, start, want)
            return self.s[start]
        self.fail_at(False, start, want)
        return FAIL

    def any(self) -> object:
        start = self.pos
        if start < self.n:
            self.pos += 1
            self.fail_at(True, start, ".")
            return self.s[start]
        self.fail_at(False, start, ".")
        return FAIL

    def ws(self) -> object:
        if self.cls(_WS, "[ \\t\\r\\n]") is FAIL:
            return FAIL
        while self.cls(_WS, "[ \\t\\r\\n]") is not FAIL:
            pass
        return True

    def opt_ws(self) -> None:
        self.ws()

    def not_(self, fn: Callable[[], object]) -> bool:
        start = self.pos
        self.invert = not self.invert
        result = fn()
        self.invert = not self.invert
        self.pos = start
        return result is FAIL

    def and_(self, fn: Callable[[], object]) -> bool:
        start = self.pos
        result = fn()
        self.pos = start
        return result is not FAIL

    def seq(self, *parts: Callable[[], object]) -> object:
        start = self.pos
        values = []
        for part in parts:
            value = part()
            if value is FAIL:
                self.pos = start
                return FAIL
            values.append(value)
        return values

    def choice(self, *alts: Callable[[], object]) -> object:
        for alt in alts:
            value = alt()
            if value is not FAIL:
                return value
        return FAIL

    def rule(self, name: str, display: str | None, fn: Callable[[], object]) -> object:
        key = (name, self.pos, self.invert)
        if key in self.memo:
            value, end = self.memo[key]
            self.pos = end
            return value
        self.rules.append(display or name)
        try:
            value = fn()
        finally:
            self.rules.pop()
        self.memo[key] = (value, self.pos)
        return value

    def pred_error(self, message: str) -> object:
        self.error(message)
        return FAIL

    # -- grammar
    def input(self) -> object:
        def paren() -> object:
            r = self.seq(
                self._opt_ws,
                lambda: self.lit("("),
                self._opt_ws,
                self.or_expr,
                self._opt_ws,
                lambda: self.lit(")"),
                self._opt_ws,
                self.eof,
            )
            return r if r is FAIL else r[3]  # type: ignore[index]

        def plain() -> object:
            r = self.seq(self._opt_ws, self.or_expr, self._opt_ws, self.eof)
            return r if r is FAIL else r[1]  # type: ignore[index]

        return self.rule("Input", None, lambda: self.choice(paren, plain))

    def _opt_ws(self) -> object:
        self.ws()
        return True

    def eof(self) -> object:
        return (
            True
            if self.rule("EOF", None, lambda: True if self.not_(self.any) else FAIL)
            is True
            else FAIL
        )

    def _binary(
        self,
        name: str,
        word: str,
        sub: Callable[[], object],
        again: Callable[[], object],
    ) -> object:
        def alt1() -> object:
            r = self.seq(sub, self.ws, lambda: self.lit(word), self.ws, again)
            if r is FAIL:
                return FAIL
            return Binary(word, r[0], r[4])  # type: ignore[index]

        return self.rule(name, None, lambda: self.choice(alt1, sub))

    def or_expr(self) -> object:
        return self._binary("OrExpression", "or", self.and_expr, self.or_expr)

    def and_expr(self) -> object:
        return self._binary("AndExpression", "and", self.not_expr, self.and_expr)

    def not_expr(self) -> object:
        def alt1() -> object:
            r = self.seq(lambda: self.lit("not"), self.ws, self.not_expr)
            if r is FAIL:
                return FAIL
            operand = r[2]  # type: ignore[index]
            return operand.operand if isinstance(operand, Not) else Not(operand)

        return self.rule(
            "NotExpression", None, lambda: self.choice(alt1, self.paren_expr)
        )

    def paren_expr(self) -> object:
        def alt1() -> object:
            r = self.seq(
                lambda: self.lit("("),
                self._opt_ws,
                self.or_expr,
                self._opt_ws,
                lambda: self.lit(")"),
            )
            return r if r is FAIL else r[2]  # type: ignore[index]

        def alt3() -> object:
            return self.seq(
                lambda: self.lit("("),
                self._opt_ws,
                self.or_expr,
                self._opt_ws,
                lambda: True if self.not_(lambda: self.lit(")")) else FAIL,
                lambda: self.pred_error("Unmatched parentheses"),
            )

        return self.rule(
            "ParenthesizedExpression",
            "grouping",
            lambda: self.choice(alt1, self.match_expr, alt3),
        )

    def match_expr(self) -> object:
        return self.rule(
            "MatchExpression",
            "match",
            lambda: self.choice(self.match_sov, self.match_so, self.match_vos),
        )

    def _op(
        self, name: str, words: list[str], leading_optional: bool, value: str
    ) -> Callable[[], object]:
        def run() -> object:
            parts: list[Callable[[], object]] = []
            for i, word in enumerate(words):
                if i == 0 and leading_optional:
                    parts.append(self._opt_ws)
                else:
                    parts.append(self.ws)
                parts.append(lambda w=word: self.lit(w))  # type: ignore[misc]
            if name not in ("MatchIsEmpty", "MatchIsNotEmpty"):
                parts.append(self._opt_ws if leading_optional else self.ws)
            r = self.rule(name, None, lambda: self.seq(*parts))
            return FAIL if r is FAIL else value

        return run

    def match_sov(self) -> object:
        ops = self.choice
        r = self.seq(
            self.selector,
            lambda: ops(
                self._op("MatchEqual", ["=="], True, EQUAL),
                self._op("MatchNotEqual", ["!="], True, NOT_EQUAL),
                self._op("MatchContains", ["contains"], False, IN),
                self._op("MatchNotContains", ["not", "contains"], False, NOT_IN),
                self._op("MatchMatches", ["matches"], False, MATCHES),
                self._op("MatchNotMatches", ["not", "matches"], False, NOT_MATCHES),
            ),
            self.value,
        )
        if r is FAIL:
            return FAIL
        return Match(r[0], r[1], r[2])  # type: ignore[index]

    def match_so(self) -> object:
        r = self.seq(
            self.selector,
            lambda: self.choice(
                self._op("MatchIsEmpty", ["is", "empty"], False, IS_EMPTY),
                self._op(
                    "MatchIsNotEmpty", ["is", "not", "empty"], False, IS_NOT_EMPTY
                ),
            ),
        )
        if r is FAIL:
            return FAIL
        return Match(r[0], r[1], None)  # type: ignore[index]

    def match_vos(self) -> object:
        def in_ops() -> object:
            return self.choice(
                self._op("MatchIn", ["in"], False, IN),
                self._op("MatchNotIn", ["not", "in"], False, NOT_IN),
            )

        def alt1() -> object:
            r = self.seq(self.value, in_ops, self.selector)
            if r is FAIL:
                return FAIL
            return Match(r[2], r[1], r[0])  # type: ignore[index]

        def alt2() -> object:
            return self.seq(
                self.value,
                in_ops,
                lambda: True if self.not_(self.selector) else FAIL,
                lambda: self.pred_error("Invalid selector"),
            )

        return self.rule(
            "MatchValueOpSelector", "match", lambda: self.choice(alt1, alt2)
        )

    def selector(self) -> object:
        def run() -> object:
            first = self.identifier()
            if first is FAIL:
                return FAIL
            parts = [first]
            while True:
                more = self.selector_or_index()
                if more is FAIL:
                    return parts
                parts.append(more)

        return self.rule("Selector", "selector", run)

    def identifier(self) -> object:
        def run() -> object:
            start = self.pos
            if self.cls(_ALPHA, "[a-zA-Z]") is FAIL:
                return FAIL
            while self.cls(_IDENT, "[a-zA-Z0-9_]") is not FAIL:
                pass
            return self.s[start : self.pos]

        return self.rule("Identifier", None, run)

    def selector_or_index(self) -> object:
        def dot() -> object:
            r = self.seq(lambda: self.lit("."), self.identifier)
            return r if r is FAIL else r[1]  # type: ignore[index]

        return self.rule(
            "SelectorOrIndex", None, lambda: self.choice(dot, self.index_expr)
        )

    def index_expr(self) -> object:
        def alt1() -> object:
            r = self.seq(
                lambda: self.lit("["),
                self._opt_ws,
                self.string_lit,
                self._opt_ws,
                lambda: self.lit("]"),
            )
            return r if r is FAIL else r[2]  # type: ignore[index]

        def alt2() -> object:
            return self.seq(
                lambda: self.lit("["),
                self._opt_ws,
                lambda: True if self.not_(self.string_lit) else FAIL,
                lambda: self.pred_error("Invalid index"),
            )

        def alt3() -> object:
            return self.seq(
                lambda: self.lit("["),
                self._opt_ws,
                self.string_lit,
                self._opt_ws,
                lambda: True if self.not_(lambda: self.lit("]")) else FAIL,
                lambda: self.pred_error("Unclosed index expression"),
            )

        return self.rule(
            "IndexExpression", "index", lambda: self.choice(alt1, alt2, alt3)
        )

    def value(self) -> object:
        def sel() -> object:
            r = self.selector()
            return r if r is FAIL else ".".join(r)  # type: ignore[arg-type]

        return self.rule(
            "Value", "value", lambda: self.choice(sel, self.number_lit, self.string_lit)
        )

    def number_lit(self) -> object:
        def after() -> object:
            ok = self.and_(
                lambda: self.rule(
                    "AfterNumbers",
                    None,
                    lambda: (
                        True
                        if self.and_(
                            lambda: self.choice(
                                self.ws, self.eof, lambda: self.lit(")")
                            )
                        )
                        else FAIL
                    ),
                )
            )
            return True if ok else FAIL

        def alt1() -> object:
            start = self.pos
            r = self.seq(self._opt_minus, self.integer_or_float, after)
            return r if r is FAIL else self.s[start : self.pos]

        def alt2() -> object:
            return self.seq(
                self._opt_minus,
                self.integer_or_float,
                lambda: True if self.not_(after) else FAIL,
                lambda: self.pred_error("Invalid number literal"),
            )

        return self.rule("NumberLiteral", "number", lambda: self.choice(alt1, alt2))

    def _opt_minus(self) -> object:
        self.lit("-")
        return True

    def integer_or_float(self) -> object:
        def digits_from_one() -> object:
            if self.cls("123456789", "[1-9]") is FAIL:
                return FAIL
            while self.cls("0123456789", "[0-9]") is not FAIL:
                pass
            return True

        def fraction() -> object:
            start = self.pos
            if self.lit(".") is FAIL or self.cls("0123456789", "[0-9]") is FAIL:
                self.pos = start
                return FAIL
            while self.cls("0123456789", "[0-9]") is not FAIL:
                pass
            return True

        def run() -> object:
            if self.choice(lambda: self.lit("0"), digits_from_one) is FAIL:
                return FAIL
            fraction()
            return True

        return self.rule("IntegerOrFloat", None, run)

    def string_lit(self) -> object:
        def body(quote: str, closed: bool) -> Callable[[], object]:
            def run() -> object:
                start = self.pos
                if self.lit(quote) is FAIL:
                    return FAIL
                while True:
                    here = self.pos
                    if not self.not_(lambda: self.lit(quote)) or self.any() is FAIL:
                        self.pos = here
                        break
                if closed and self.lit(quote) is FAIL:
                    self.pos = start
                    return FAIL
                return True

            return run

        def alt1() -> object:
            start = self.pos
            if self.choice(body("`", True), body('"', True)) is FAIL:
                return FAIL
            try:
                return _go_unquote(self.s[start : self.pos])
            except ValueError as e:
                self.error(str(e), start)
                return ""

        def alt2() -> object:
            return self.seq(
                lambda: self.choice(body("`", False), body('"', False)),
                self.eof,
                lambda: self.pred_error("Unterminated string literal"),
            )

        return self.rule("StringLiteral", "string", lambda: self.choice(alt1, alt2))

    def parse(self) -> Node:
        result = self.input()
        if not self.errors and result is FAIL:
            wants = sorted(self.expected - {"!."})
            if "!." in self.expected:
                wants.append("EOF")
            text = (
                wants[0]
                if len(wants) == 1
                else ", ".join(wants[:-1]) + " or " + wants[-1]
            )
            self.errors.append((self.max_fail, "no match found, expected: " + text))
        if self.errors:
            seen: list[str] = []
            for pos, message in self.errors:
                line = f"{self.position(pos)}: {message}"
                if line not in seen:
                    seen.append(line)
            raise BexprSyntaxError("\n".join(seen))
        assert isinstance(result, (Match, Not, Binary))
        return result


def parse(text: str) -> Node:
    """Parse *text*; raise :class:`BexprError` with the real parser's message."""
    try:
        return _Parser(text).parse()
    except RecursionError:
        raise BexprError(
            "expression nested too deeply for the development agent"
        ) from None


# ---------------------------------------------------------------------------
# Field configurations (bexpr's reflection over Consul's Go structs)


@dataclass(frozen=True)
class Field:
    """
    One Go type: ``kind`` is ``string``, ``int``, ``uint``, ``bool``, ``list``,
    ``map`` (string keys), ``struct`` or ``ptr`` (a pointer to a struct,
    which bexpr dereferences and 1.8.7 panics on when nil).
    """

    kind: str
    elem: Field | None = None
    fields: Mapping[str, Field] = field(default_factory=dict)


S, INT, U, B = Field("string"), Field("int"), Field("uint"), Field("bool")


def L(elem: Field) -> Field:
    return Field("list", elem=elem)


def M(elem: Field) -> Field:
    return Field("map", elem=elem)


def T(**fields: Field) -> Field:
    return Field("struct", fields=fields)


def P(target: Field) -> Field:
    return Field("ptr", elem=target)


_PRIMITIVE_OPS = {
    "string": (EQUAL, NOT_EQUAL, IN, NOT_IN, MATCHES, NOT_MATCHES),
    "int": (EQUAL, NOT_EQUAL),
    "uint": (EQUAL, NOT_EQUAL),
    "bool": (EQUAL, NOT_EQUAL),
}


def _ops(f: Field) -> tuple[str, ...]:
    if f.kind in _PRIMITIVE_OPS:
        return _PRIMITIVE_OPS[f.kind]
    if f.kind == "list":
        assert f.elem is not None
        if f.elem.kind in _PRIMITIVE_OPS:
            return (IN, NOT_IN, IS_EMPTY, IS_NOT_EMPTY)
        return (IS_EMPTY, IS_NOT_EMPTY)
    if f.kind == "map":
        return (IS_EMPTY, IS_NOT_EMPTY, IN, NOT_IN)
    return ()


def _target(f: Field) -> Field:
    while f.kind == "ptr":
        assert f.elem is not None
        f = f.elem
    return f


def _subfields(f: Field) -> Mapping[str, Field]:
    f = _target(f)
    if f.kind == "struct":
        return f.fields
    if f.kind == "list":
        assert f.elem is not None
        elem = _target(f.elem)
        return elem.fields if elem.kind == "struct" else {}
    if f.kind == "map":
        assert f.elem is not None
        return {"": f.elem}
    return {}


def _coerce_kind(f: Field) -> str | None:
    f = _target(f)
    if f.kind in _PRIMITIVE_OPS:
        return f.kind
    if f.kind == "list":
        assert f.elem is not None
        return f.elem.kind if f.elem.kind in _PRIMITIVE_OPS else None
    if f.kind == "map":
        return "string"
    return None


_INT_RE = re.compile(r"[+-]?(0[xX][0-9a-fA-F]+|0[bB][01]+|0[oO]?[0-7]*|[1-9][0-9]*)\Z")


def _coerce(kind: str, raw: str) -> object:
    if kind == "string":
        return raw
    if kind == "bool":
        if raw in ("1", "t", "T", "TRUE", "true", "True"):
            return True
        if raw in ("0", "f", "F", "FALSE", "false", "False"):
            return False
        raise ValueError(f"strconv.ParseBool: parsing {go_quote(raw)}: invalid syntax")
    fn = "ParseInt" if kind == "int" else "ParseUint"
    text = raw
    if kind == "uint" and text[:1] in "+-" and text:
        raise ValueError(f"strconv.{fn}: parsing {go_quote(raw)}: invalid syntax")
    if not _INT_RE.match(text):
        raise ValueError(f"strconv.{fn}: parsing {go_quote(raw)}: invalid syntax")
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    if body[:2].lower() == "0x":
        value = int(body[2:], 16)
    elif body[:2].lower() == "0b":
        value = int(body[2:], 2)
    elif body[:2].lower() == "0o":
        value = int(body[2:], 8)
    elif body.startswith("0") and len(body) > 1:
        value = int(body[1:], 8)
    else:
        value = int(body)
    value *= sign
    low, high = (-(1 << 63), (1 << 63) - 1) if kind == "int" else (0, (1 << 64) - 1)
    if not low <= value <= high:
        raise ValueError(f"strconv.{fn}: parsing {go_quote(raw)}: value out of range")
    return value


def _validate(node: Node, fields: Mapping[str, Field]) -> int:
    if isinstance(node, Not):
        return _validate(node.operand, fields)
    if isinstance(node, Binary):
        return _validate(node.left, fields) + _validate(node.right, fields)
    sel = ".".join(node.selector)
    configs: Mapping[str, Field] = fields
    last: Field | None = None
    for idx, name in enumerate(node.selector):
        if name in configs:
            last = configs[name]
        elif "" in configs:
            last = configs[""]
        else:
            prefix = ".".join(node.selector[: idx + 1])
            raise BexprError(f"Selector {go_quote(prefix)} is not valid")
        configs = _subfields(last)
    assert last is not None
    if node.operator not in _ops(_target(last)):
        raise BexprError(
            f"Invalid match operator {go_quote(node.operator)} "
            f"for selector {go_quote(sel)}"
        )
    if node.raw is not None:
        kind = _coerce_kind(last)
        node.converted = node.raw
        if kind is not None:
            try:
                node.converted = _coerce(kind, node.raw)
            except ValueError as e:
                raise BexprError(
                    f"Failed to coerce value {go_quote(node.raw)} "
                    f"for selector {go_quote(sel)}: {e}"
                ) from None
        if node.operator in (MATCHES, NOT_MATCHES):
            try:
                node.converted = re.compile(str(node.converted))
            except (re.error, OverflowError, RecursionError) as e:
                raise BexprError(
                    "Failed to compile regular expression "
                    f"{go_quote(str(node.converted))}: error parsing regexp: {e}"
                ) from None
    return 1


# ---------------------------------------------------------------------------
# Evaluation over the JSON objects the endpoints answer with


def _zero(f: Field) -> object:
    return {
        "string": "",
        "int": 0,
        "uint": 0,
        "bool": False,
        "list": [],
        "map": {},
    }.get(f.kind, {})


def _leaf(node: Match, value: object) -> bool:
    op = node.operator
    if op in (IS_EMPTY, IS_NOT_EMPTY):
        empty = not value if isinstance(value, (str, list, dict)) else value is None
        return empty if op == IS_EMPTY else not empty
    if op in (MATCHES, NOT_MATCHES):
        assert isinstance(node.converted, re.Pattern)
        found = node.converted.search(str(value)) is not None
        return found if op == MATCHES else not found
    want = node.converted
    if op in (EQUAL, NOT_EQUAL):
        equal = type(value) is type(want) and value == want
        return equal if op == EQUAL else not equal
    if isinstance(value, dict):
        found = want in value
    elif isinstance(value, list):
        found = any(type(item) is type(want) and item == want for item in value)
    elif isinstance(value, str):
        found = isinstance(want, str) and want in value
    else:
        found = False
    return found if op == IN else not found


def _walk(node: Match, depth: int, value: object, f: Field) -> bool:
    if depth >= len(node.selector):
        return _leaf(node, value)
    name = node.selector[depth]
    target = _target(f)
    if target.kind == "struct":
        sub = target.fields[name]
        got = value.get(name) if isinstance(value, dict) else None
        if got is None:
            if sub.kind == "ptr":
                where = go_quote(".".join(node.selector[: depth + 1]))
                raise BexprNilPointerError(
                    f"nil pointer at selector {where}: real Consul 1.8.7 panics "
                    "on this filter and drops the connection"
                )
            got = _zero(sub)
        return _walk(node, depth + 1, got, sub)
    if target.kind == "list":
        assert target.elem is not None
        return any(_walk(node, depth, item, target.elem) for item in (value or []))  # type: ignore[attr-defined]
    if target.kind == "map":
        assert target.elem is not None
        items = value if isinstance(value, dict) else {}
        if name not in items or items[name] is None:
            return node.operator not in (EQUAL, IS_NOT_EMPTY, IN)
        return _walk(node, depth + 1, items[name], target.elem)
    return False


def _evaluate(node: Node, item: object, root: Field) -> bool:
    if isinstance(node, Not):
        return not _evaluate(node.operand, item, root)
    if isinstance(node, Binary):
        if node.operator == "and":
            return _evaluate(node.left, item, root) and _evaluate(
                node.right, item, root
            )
        return _evaluate(node.left, item, root) or _evaluate(node.right, item, root)
    return _walk(node, 0, item, root)


@dataclass(frozen=True)
class Filter:
    """A validated expression bound to one endpoint's element type."""

    ast: Node
    root: Field

    def matches(self, item: object) -> bool:
        """Whether one JSON element passes (or a nil pointer error)."""
        return _evaluate(self.ast, item, self.root)


def compile_filter(expression: str, root: Field) -> Filter:
    """Parse and validate *expression* against *root* (a ``struct`` Field)."""
    ast = parse(expression)
    # Consul 1.8.7 passes no bexpr config: no limit on the number of
    # matches or on value lengths (filter-agent-services-33-matches.http,
    # filter-agent-services-long-value.http).
    _validate(ast, _subfields(root))
    return Filter(ast, root)


# ---------------------------------------------------------------------------
# Consul 1.8.7's types (fields tagged bexpr:"-" left out)

_SERVICE_ADDRESS = T(Address=S, Port=INT)
_WEIGHTS = T(Passing=INT, Warning=INT)
_UPSTREAM = T(
    DestinationType=S,
    DestinationNamespace=S,
    DestinationName=S,
    Datacenter=S,
    LocalBindAddress=S,
    LocalBindPort=INT,
    MeshGateway=T(Mode=S),
)
_EXPOSE = T(
    Checks=B,
    Paths=L(
        T(ListenerPort=INT, Path=S, LocalPathPort=INT, Protocol=S, ParsedFromCheck=B)
    ),
)
_PROXY = T(
    DestinationServiceName=S,
    DestinationServiceID=S,
    LocalServiceAddress=S,
    LocalServicePort=INT,
    Upstreams=L(_UPSTREAM),
    MeshGateway=T(Mode=S),
    Expose=_EXPOSE,
)
_CHECK_DEFINITION = T(
    HTTP=S,
    TLSSkipVerify=B,
    Header=M(L(S)),
    Method=S,
    TCP=S,
    Interval=INT,
    OutputMaxSize=U,
    Timeout=INT,
    DeregisterCriticalServiceAfter=INT,
)
HEALTH_CHECK = T(
    Node=S,
    CheckID=S,
    Name=S,
    Status=S,
    Notes=S,
    Output=S,
    ServiceID=S,
    ServiceName=S,
    ServiceTags=L(S),
    Type=S,
    Definition=_CHECK_DEFINITION,
)
AGENT_SERVICE = T(
    Kind=S,
    ID=S,
    Service=S,
    Tags=L(S),
    Meta=M(S),
    Port=INT,
    Address=S,
    TaggedAddresses=M(_SERVICE_ADDRESS),
    Weights=_WEIGHTS,
    EnableTagOverride=B,
    CreateIndex=U,
    ModifyIndex=U,
    Proxy=P(_PROXY),
    Connect=P(T(Native=B)),
    Namespace=S,
)
NODE = T(ID=S, Node=S, Address=S, Datacenter=S, TaggedAddresses=M(S), Meta=M(S))
NODE_SERVICE = T(
    Kind=S,
    ID=S,
    Service=S,
    Tags=L(S),
    Address=S,
    TaggedAddresses=M(_SERVICE_ADDRESS),
    Meta=M(S),
    Port=INT,
    Weights=P(_WEIGHTS),
    EnableTagOverride=B,
    Proxy=_PROXY,
    Connect=T(Native=B),
)
CHECK_SERVICE_NODE = T(Node=P(NODE), Service=P(NODE_SERVICE), Checks=L(P(HEALTH_CHECK)))
SERVICE_NODE = T(
    ID=S,
    Node=S,
    Address=S,
    Datacenter=S,
    TaggedAddresses=M(S),
    NodeMeta=M(S),
    ServiceKind=S,
    ServiceID=S,
    ServiceName=S,
    ServiceTags=L(S),
    ServiceAddress=S,
    ServiceTaggedAddresses=M(_SERVICE_ADDRESS),
    ServiceWeights=_WEIGHTS,
    ServiceMeta=M(S),
    ServicePort=INT,
    ServiceEnableTagOverride=B,
    ServiceProxy=_PROXY,
    ServiceConnect=T(Native=B),
)

#: Element type of each endpoint's answer, keyed by endpoint name.
SCHEMAS: Mapping[str, Field] = {
    "agent/services": AGENT_SERVICE,
    "agent/checks": HEALTH_CHECK,
    "health/service": CHECK_SERVICE_NODE,
    "health/connect": CHECK_SERVICE_NODE,
    "catalog/service": SERVICE_NODE,
}
