"""
``twistd --reactor uvloop``: the plugin is found, and installing it gives
Twisted's asyncio reactor running on a uvloop loop (in a child process: a
reactor is installed once per process).
"""

from __future__ import annotations

import pytest
from twisted.application.reactors import getReactorTypes

from tests.processes import reactor_after_install


def test_the_reactor_plugin_is_found() -> None:
    found = {r.shortName: r for r in getReactorTypes()}
    assert found["uvloop"].moduleName == "connect_native.uvloopreactor"


def test_install_runs_the_asyncio_reactor_on_uvloop() -> None:
    pytest.importorskip("uvloop")
    assert reactor_after_install(
        "uvloopreactor",
        "type(reactor).__name__, type(reactor._asyncioEventloop).__module__",
    ) == ["AsyncioSelectorReactor", "uvloop"]
