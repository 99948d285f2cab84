"""
The README's quick start, exactly as a new user types it:
``twistd -n connect-native --demo`` runs the development agent, a backend,
the terminator and a Connect client in one process, makes one round trip,
and exits 0.  Run as a subprocess with the source tree on ``PYTHONPATH``
(as an installed package would be on ``sys.path``), in an empty directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SOURCE_TREE = Path(__file__).resolve().parent.parent
QUICK_START = ["twistd", "-n", "connect-native", "--demo"]


def test_the_readme_quick_start_command_is_the_one_tested() -> None:
    readme = (SOURCE_TREE / "README.md").read_text()
    assert " ".join(QUICK_START) in readme


def test_the_demo_makes_a_round_trip_and_exits_0(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env["PYTHONPATH"] = str(SOURCE_TREE)
    twistd = Path(sys.executable).parent / QUICK_START[0]
    finished = subprocess.run(
        [str(twistd) if twistd.exists() else QUICK_START[0], *QUICK_START[1:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output
    assert "demo: OK" in output
    assert "demo backend got: hello through Connect" in output
    # twistd cleaned up after itself: no pid file left in the user's directory.
    assert list(tmp_path.iterdir()) == []
