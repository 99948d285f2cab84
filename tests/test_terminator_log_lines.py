"""
The terminator's text log lines (``TextLinesObserver``) are Twisted's
``textFileLogObserver``'s lines, character for character, for every kind of
event; and the JSON lines' ``message`` is Twisted's ``formatEvent``.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from twisted.logger import LogLevel, formatEvent, textFileLogObserver
from twisted.python.failure import Failure

from connect_native.terminator import logs

WHEN = 1765080000.25


class _Thing:
    name = "thing"

    def method(self) -> str:
        return "called"

    def __repr__(self) -> str:
        return "<a thing>"


def _failure() -> Failure:
    try:
        raise ValueError("broken")
    except ValueError:
        return Failure()  # type: ignore[no-untyped-call]


EVENTS: list[dict[str, Any]] = [
    # The connection decision, as connect_native.server logs it.
    {
        "log_format": "Connect {target}: {decision} {peer} from {address} {stage} "
        "({reason}; decided by {source} in {elapsed:.3f}s)",
        "target": "web",
        "decision": "allowed",
        "peer": "spiffe://d.consul/ns/default/dc/dc1/svc/client",
        "address": "127.0.0.1:5555",
        "stage": "after the handshake",
        "reason": "allowed by an intention",
        "source": "intentions",
        "elapsed": 0.000123,
        "log_namespace": "connect_native.server",
        "log_level": LogLevel.info,
    },
    {"log_format": "two\nlines", "log_system": "-"},
    {"log_format": "{thing.name} {thing!r} {n:>5}", "thing": _Thing(), "n": 3},
    # Call syntax, which only Twisted's formatter knows.
    {"log_format": "{thing.method()}", "thing": _Thing()},
    {"log_format": "missing {key}"},
    {"log_format": "bad {", "log_level": LogLevel.warn},
    {"log_format": None, "message": ("legacy",), "log_system": "HTTP"},
    {"log_format": "", "log_namespace": "x"},
    {"log_format": "a failure", "log_failure": _failure()},
    {"log_format": "no time", "log_time": None},
    {"log_format": "{x}", "x": "from a system", "log_system": "TCP,3,127.0.0.1"},
]


def _twisted_text(event: dict[str, Any]) -> str:
    out = io.StringIO()
    textFileLogObserver(out)(event)
    return out.getvalue()


@pytest.mark.parametrize("index", range(len(EVENTS)))
def test_a_text_line_is_twisteds_line(index: int) -> None:
    event = dict(EVENTS[index])
    event.setdefault("log_time", WHEN)
    out = io.StringIO()
    logs.TextLinesObserver(out)(event)
    assert out.getvalue() == _twisted_text(event)


def test_the_prefix_kept_for_a_second_is_the_next_seconds_own() -> None:
    out = io.StringIO()
    observer = logs.TextLinesObserver(out)
    first = {"log_format": "one", "log_time": WHEN, "log_namespace": "n"}
    second = {"log_format": "two", "log_time": WHEN + 1, "log_namespace": "n"}
    other = {"log_format": "three", "log_time": WHEN + 1, "log_namespace": "m"}
    for event in (first, second, other):
        observer(event)
    assert out.getvalue() == "".join(map(_twisted_text, (first, second, other)))


@pytest.mark.parametrize("index", range(len(EVENTS)))
def test_a_json_message_is_twisteds_message(index: int) -> None:
    event = dict(EVENTS[index], log_time=WHEN)
    assert logs.event_text(event) == formatEvent(event)
    out = io.StringIO()
    logs.JSONLinesObserver(out)(event)
    assert json.loads(out.getvalue())["message"] == formatEvent(event)


def test_the_text_observer_is_the_terminators() -> None:
    observer: Any = logs.observer_for(io.StringIO(), "text", "debug")
    assert isinstance(observer, logs.TextLinesObserver)
