"""
``twistd --reactor uvloop``: the plugin is found, and installing it gives
Twisted's asyncio reactor running on a uvloop loop (in a child process: a
reactor is installed once per process).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.application.reactors import getReactorTypes

ROOT = Path(__file__).resolve().parent.parent


def test_the_reactor_plugin_is_found() -> None:
    found = {r.shortName: r for r in getReactorTypes()}
    assert found["uvloop"].moduleName == "connect_native.uvloopreactor"


def test_install_runs_the_asyncio_reactor_on_uvloop() -> None:
    pytest.importorskip("uvloop")
    script = (
        "from connect_native import uvloopreactor\n"
        "uvloopreactor.install()\n"
        "from twisted.internet import reactor\n"
        "reactor.callLater(0, reactor.stop)\n"
        "reactor.run()\n"
        "print(type(reactor).__name__, type(reactor._asyncioEventloop).__module__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["AsyncioSelectorReactor", "uvloop"]
