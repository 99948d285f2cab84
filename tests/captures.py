"""
The real Consul 1.8.7 captures under ``tests/fixtures/real-1.8.7/``: one
loader, the one that directory's README.md gives, for every test module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"
REAL = FIXTURES / "real-1.8.7"

#: (meta, status, headers, body): the ``# key: value`` lines, the HTTP status
#: (``None`` when the client gave up before any answer), headers, body text.
Capture = tuple[dict[str, str], int | None, dict[str, str], str]


def load(name: str | Path) -> Capture:
    """
    One capture, by file name in ``real-1.8.7`` or by path, parsed as the
    README says.
    """
    path = name if isinstance(name, Path) else REAL / name
    meta: dict[str, str] = {}
    lines = path.read_text(encoding="utf-8").split("\n")
    while lines and lines[0].startswith("# "):
        k, _, v = lines.pop(0)[2:].partition(": ")
        meta.setdefault(k, v)
    head, _, body = "\n".join(lines).partition("\n\n")
    status_line, *hdrs = head.split("\n")
    headers = dict(h.split(": ", 1) for h in hdrs if ": " in h)
    status = int(status_line.split()[1]) if status_line else None
    return meta, status, headers, body


def body(name: str | Path) -> Any:
    """A capture's body, decoded as JSON."""
    return json.loads(load(name)[3])
