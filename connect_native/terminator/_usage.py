"""
How ``twistd connect-native`` talks about its options: ``--help`` grouped by
what the options are for (internal ones left out), and an option error as
one line with a pointer to ``--help`` instead of the whole help first.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

from twisted.python import usage

#: The sections of ``--help``, in order, and the options in each.  An option
#: not named here is shown under "Other"; one in :data:`HIDDEN` is not shown.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "The service and its listener",
        ("service", "listen", "to", "protocol", "upstream"),
    ),
    (
        "Certificates and the Consul agent",
        ("consul", "token-file", "identity", "dev"),
    ),
    (
        "Registration and health",
        (
            "register",
            "no-register",
            "to-check",
            "check-interval",
            "tag",
            "meta",
            "deregister-critical-after",
        ),
    ),
    (
        "Authorization",
        (
            "authorize",
            "allow-id",
            "allow-ids-file",
            "authorize-cache",
            "keep-open-on-deny",
        ),
    ),
    (
        "Limits and timeouts",
        (
            "max-connections",
            "max-handshakes",
            "max-handshakes-per-address",
            "handshake-timeout",
            "connect-timeout",
            "idle-timeout",
            "shutdown-timeout",
            "request-timeout",
            "max-request-line",
            "max-headers-size",
            "max-requests-per-connection",
        ),
    ),
    (
        "Performance",
        ("workers", "buffer-size", "tls-transport", "release-buffers"),
    ),
    (
        "Logging and status",
        (
            "log-level",
            "log-level-file",
            "log-format",
            "log-allowed",
            "no-log-allowed",
            "status",
        ),
    ),
    ("Trying it out", ("demo",)),
    ("This program", ("version", "help")),
)

#: Options for the terminator's own use (the workers it starts).
HIDDEN = frozenset({"worker"})


def _chunks(entries: list[dict[str, Any]], width: int) -> str:
    chunks: list[str] = usage.docMakeChunks(entries, width)  # type: ignore[no-untyped-call]
    return "".join(chunks)


def grouped_usage(options: usage.Options, width: int | None = None) -> str:
    """
    The ``--help`` text of ``options``: its options by :data:`GROUPS`, then
    its long description.
    """
    if not width:
        width = int(os.environ.get("COLUMNS", "80"))
    described: dict[str, dict[str, Any]] = {}
    for opt in options.longOpt:
        parameter = opt.endswith("=")
        name = opt[:-1] if parameter else opt
        if name in HIDDEN:
            continue
        described[name] = {
            "long": name,
            "short": None,
            "doc": options.docs.get(name),
            "optType": "parameter" if parameter else "flag",
            "default": options.defaults.get(name),
            "dispatch": None,
        }
    sections = []
    shown: set[str] = set()
    for title, names in GROUPS:
        entries = [described[n] for n in names if n in described]
        shown.update(n for n in names if n in described)
        if entries:
            sections.append(f"{title}:\n" + _chunks(entries, width))
    rest = [d for n, d in described.items() if n not in shown]
    if rest:
        sections.append("Other:\n" + _chunks(rest, width))
    longdesc = getattr(options, "longdesc", "") or ""
    text = "\n".join(sections)
    if longdesc:
        import textwrap

        text += "\n" + "\n".join(textwrap.wrap(longdesc, width)) + "\n"
    return text


def refuse(error: usage.UsageError) -> NoReturn:
    """
    An option error under twistd: one line saying what is wrong and where
    the options are, on standard error, and exit status 2 (as twistd's own
    usage errors).
    """
    sys.stderr.write(
        f"twistd connect-native: {error}\n"
        "Run 'twistd connect-native --help' for the options.\n"
    )
    raise SystemExit(2)
