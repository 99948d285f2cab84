"""
Twisted's asyncio reactor on a uvloop event loop: ``twistd --reactor
uvloop`` (a reactor plugin in ``twisted/plugins/connect_native_plugins.py``).

It needs the optional ``uvloop`` package (``pip install
connect_native[uvloop]``); without it, ``install`` says so in one line.  It
is an alternative to measure, not the default: ``docs/performance.rst`` says
what it measured for the terminator.
"""

from __future__ import annotations

import asyncio

__all__ = ["install"]


def install() -> None:
    """Install ``AsyncioSelectorReactor`` over a new uvloop event loop."""
    try:
        import uvloop
    except ImportError:
        raise SystemExit(
            "--reactor uvloop needs the uvloop package: pip install uvloop"
        ) from None
    from twisted.internet import asyncioreactor

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    asyncioreactor.install(loop)  # type: ignore[no-untyped-call]
