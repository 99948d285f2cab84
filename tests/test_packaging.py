"""
The package as users install it: its Twisted plugins are found in
site-packages by a process that runs outside the source tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE_TREE = Path(__file__).resolve().parent.parent

DISCOVER = """
import json, sys
import twisted.plugins
from twisted.plugin import getCache
cache = getCache(twisted.plugins)
dropin = cache.get("connect_native_plugins")
import connect_native
print(json.dumps({
    "dropin": dropin is not None,
    "plugins": [p.name for p in dropin.plugins] if dropin else [],
    "module": dropin.moduleName if dropin else None,
    "package": connect_native.__file__,
}))
"""


def _installed_normally() -> bool:
    """
    Whether connect_native is installed as a wheel (as tox installs it), and
    not as an editable install or not at all.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution("connect_native")
    except metadata.PackageNotFoundError:
        return False
    direct = dist.read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        return False
    return True


@pytest.mark.skipif(
    not _installed_normally() and os.environ.get("CI") is None,
    reason="connect_native is not installed as a wheel here; tox installs it so",
)
def test_plugins_discovered_from_site_packages(tmp_path: Path) -> None:
    """
    Twisted's plugin discovery finds connect_native_plugins in the installed
    package, not in the source tree (an editable install would hide it).
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", DISCOVER],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["dropin"], result.stderr
    assert found["module"] == "twisted.plugins.connect_native_plugins"
    package = Path(found["package"]).resolve()
    # tox's environments live under the source tree, so compare with the
    # package directory itself rather than with the whole tree.
    assert package.parent != (SOURCE_TREE / "connect_native").resolve(), package
    assert "site-packages" in package.parts, package


LIGHT_IMPORT = """
import json, sys
import twisted.plugins.connect_native_plugins
print(json.dumps(sorted(
    m for m in sys.modules
    if m.startswith(("connect_native", "treq", "OpenSSL", "klein"))
)))
"""


def test_plugin_module_loads_nothing_heavy() -> None:
    """
    Twisted imports every plugin module on every plugin lookup (each twistd
    run, each serverFromString): ours must not pull in TLS, treq or the agent
    client until a connect: endpoint or the terminator is actually used.
    """
    result = subprocess.run(
        [sys.executable, "-c", LIGHT_IMPORT],
        cwd=SOURCE_TREE,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    heavy = [
        m
        for m in loaded
        if m.startswith(("treq", "OpenSSL", "klein"))
        or m
        in {
            "connect_native.tls",
            "connect_native.consul.client",
            "connect_native.server",
            "connect_native.client",
            "connect_native.terminator",
        }
    ]
    assert heavy == [], heavy


def test_every_subpackage_is_in_the_wheel() -> None:
    """
    Each package under connect_native/ is listed in setup.cfg's packages (a
    subpackage left out is missing from the wheel tox installs, and from
    every user's install).
    """
    import configparser

    root = Path(__file__).resolve().parent.parent
    config = configparser.ConfigParser()
    config.read(root / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {
        ".".join(init.parent.relative_to(root).parts)
        for init in (root / "connect_native").rglob("__init__.py")
    }
    assert found - listed == set()


def _link_all_but_connect_native(place: Path, into: Path) -> None:
    """
    Link every entry of ``place`` into ``into`` except connect_native's own
    (the package, its metadata, its plugin module).
    """
    for entry in place.iterdir():
        if entry.name.startswith(("connect_native", "__editable__")):
            continue
        target = into / entry.name
        if entry.name == "twisted" and entry.is_dir():
            target.mkdir(exist_ok=True)
            for child in entry.iterdir():
                if child.name == "plugins":
                    plugins = target / "plugins"
                    plugins.mkdir(exist_ok=True)
                    for plugin in child.iterdir():
                        if not plugin.name.startswith(("connect_native", "dropin")):
                            _link(plugin, plugins / plugin.name)
                else:
                    _link(child, target / child.name)
        else:
            _link(entry, target)


def _link(source: Path, target: Path) -> None:
    if not target.exists():
        target.symlink_to(source)


def test_an_editable_install_keeps_the_plugins(tmp_path: Path) -> None:
    """
    ``pip install -e .`` leaves the twistd plugin and the ``connect:``
    endpoint type discoverable: setuptools puts the source tree on
    ``sys.path`` (a ``.pth`` file) instead of its import hook, which Twisted's
    plugin discovery does not see.  The venv gets only connect_native (no
    dependencies); its dependencies come from this interpreter's
    site-packages, seen through a directory of links that leaves out any
    connect_native installed there (under tox, the wheel's copy would
    otherwise shadow the editable install).
    """
    import shutil
    import site
    import sysconfig
    import venv

    # A copy of the tree: an editable install writes its metadata into it.
    root = tmp_path / "tree"
    source = Path(__file__).resolve().parent.parent
    root.mkdir()
    for part in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(source / part, root / part)
    for part in ("connect_native", "twisted"):
        shutil.copytree(
            source / part,
            root / part,
            ignore=shutil.ignore_patterns("__pycache__", "dropin.cache"),
        )
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(root)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    deps = tmp_path / "deps"
    deps.mkdir()
    ours = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    for place in map(Path, sorted(ours)):
        if place.is_dir():
            _link_all_but_connect_native(place, deps)
    # After the venv's own site-packages, where the editable .pth is read.
    discover = f"import sys; sys.path.append({str(deps)!r})\n" + DISCOVER
    result = subprocess.run(
        [str(python), "-c", discover],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["dropin"], result.stderr
    assert found["module"] == "twisted.plugins.connect_native_plugins"
    # The package imported is the source tree's, as an editable install is.
    assert Path(found["package"]).resolve() == root / "connect_native" / "__init__.py"
