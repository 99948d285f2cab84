"""
Find, or fetch, the real Consul 1.8.7 agent that the tests run against.

Order: ``$CONSUL_BINARY``; the cache this script fills
(``~/.cache/connect-native/consul-1.8.7/usr/bin/consul``, or under
``$XDG_CACHE_HOME``); ``consul`` on ``PATH``.  When none is found,
``ensure()`` downloads Debian bullseye's ``consul`` package with
``apt-get download`` through a private sources list that names the Debian
mirror already configured in this machine's apt sources (never a host name
written here), checks its SHA-256 and unpacks it with ``dpkg-deb -x``.

Run ``python -m tests.consul_binary --ensure`` to fetch it ahead of the tests.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "consul"
VERSION = "1.8.7+dfsg1-2+b3"
DEB_NAME = "consul_1.8.7+dfsg1-2+b3_amd64.deb"
DEB_SHA256 = "e4e888bba104daba1d9161f49bfc52649a7e4efd45b1a7ead5bc54f2cb9c89d9"
SUITE = "bullseye"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

HOW_TO_GET_ONE = (
    "Install Consul 1.8.7 (Debian bullseye's 'consul' package), put it on PATH, "
    "or set CONSUL_BINARY to its path; or run 'python -m tests.consul_binary "
    "--ensure' on a Debian machine with apt-get and dpkg-deb."
)


class ConsulUnavailable(Exception):
    """
    No Consul binary could be found or fetched; the message says why and what
    to do.
    """


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return Path(base) / "connect-native"


def cached_binary() -> Path:
    return cache_dir() / "consul-1.8.7" / "usr" / "bin" / "consul"


def find() -> Path | None:
    """
    The Consul binary to use, without downloading anything, or ``None``.
    """
    explicit = os.environ.get("CONSUL_BINARY")
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ConsulUnavailable(
                f"CONSUL_BINARY={explicit!r} is not an executable file. "
                + HOW_TO_GET_ONE
            )
        return path
    cached = cached_binary()
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    on_path = shutil.which("consul")
    if on_path:
        return Path(on_path)
    return None


def debian_mirror(
    sources: list[str] | None = None,
) -> str:
    """
    The URI of the Debian archive mirror in this machine's apt sources (the
    main archive, not the security one), in either the one-line or the
    deb822 format.
    """
    if sources is None:
        sources = [
            *glob.glob("/etc/apt/sources.list"),
            *sorted(glob.glob("/etc/apt/sources.list.d/*.list")),
            *sorted(glob.glob("/etc/apt/sources.list.d/*.sources")),
        ]
    candidates: list[str] = []
    for name in sources:
        try:
            text = Path(name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("#"):
                continue
            if line.startswith("URIs:"):
                candidates.extend(line.split()[1:])
            elif line.startswith("deb "):
                # deb [options] uri suite components...; options may hold spaces
                words = re.sub(r"\[[^\]]*\]", "", line).split()
                if len(words) >= 2:
                    candidates.append(words[1])
    for uri in candidates:
        stripped = uri.rstrip("/")
        if stripped.endswith("/debian") and "security" not in stripped:
            return stripped
    raise ConsulUnavailable(
        "No Debian archive mirror (a URI ending in /debian) was found in the "
        "apt sources of this machine. " + HOW_TO_GET_ONE
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run(argv: list[str], what: str) -> None:
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConsulUnavailable(f"{what} failed: {e}. " + HOW_TO_GET_ONE) from e
    if result.returncode != 0:
        raise ConsulUnavailable(
            f"{what} failed (exit {result.returncode}): "
            f"{result.stderr.strip()[-2000:]} " + HOW_TO_GET_ONE
        )


def download() -> Path:
    """
    Fetch and unpack the bullseye package into the cache; return the binary.
    """
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise ConsulUnavailable(f"{tool} is not available. " + HOW_TO_GET_ONE)
    mirror = debian_mirror()
    target = cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="consul-apt-", dir=target) as tmp:
        work = Path(tmp)
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "cache" / "archives" / "partial").mkdir(parents=True)
        signed = f"[signed-by={KEYRING}] " if os.path.exists(KEYRING) else ""
        (work / "sources.list").write_text(f"deb {signed}{mirror} {SUITE} main\n")
        opts = [
            f"-o=Dir::Etc::SourceList={work / 'sources.list'}",
            "-o=Dir::Etc::SourceParts=/dev/null",
            f"-o=Dir::State::Lists={work / 'lists'}",
            f"-o=Dir::Cache={work / 'cache'}",
            "-o=Dir::State::status=/dev/null",
            "-o=APT::Sandbox::User=root",
            "-o=Debug::NoLocking=1",
        ]
        _run(["apt-get", *opts, "update"], "apt-get update (bullseye)")
        download_dir = work / "download"
        download_dir.mkdir()
        try:
            result = subprocess.run(
                ["apt-get", *opts, "download", f"{PACKAGE}={VERSION}"],
                cwd=download_dir,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ConsulUnavailable(f"apt-get download failed: {e}") from e
        deb = download_dir / DEB_NAME
        if result.returncode != 0 or not deb.is_file():
            raise ConsulUnavailable(
                f"apt-get download {PACKAGE}={VERSION} failed: "
                f"{result.stderr.strip()[-2000:]} " + HOW_TO_GET_ONE
            )
        actual = sha256_of(deb)
        if actual != DEB_SHA256:
            raise ConsulUnavailable(
                f"{DEB_NAME} has SHA-256 {actual}, expected {DEB_SHA256}; "
                "refusing to use it."
            )
        unpack = work / "unpacked"
        _run(["dpkg-deb", "-x", str(deb), str(unpack)], "dpkg-deb -x")
        final = target / "consul-1.8.7"
        if final.exists():
            shutil.rmtree(final)
        unpack.rename(final)
    binary = cached_binary()
    if not binary.is_file():
        raise ConsulUnavailable(f"{DEB_NAME} held no usr/bin/consul.")
    return binary


def ensure() -> Path:
    """
    The Consul binary, downloading it if it is nowhere to be found.
    """
    return find() or download()


def version_of(binary: Path) -> str:
    out = subprocess.run(
        [str(binary), "version"], capture_output=True, text=True, timeout=30
    ).stdout
    first = out.splitlines()[0] if out else ""
    return first.removeprefix("Consul ").strip()


def main(argv: list[str]) -> int:
    try:
        binary = ensure() if "--ensure" in argv else find()
    except ConsulUnavailable as e:
        print(f"consul: {e}", file=sys.stderr)
        return 1
    if binary is None:
        print("consul: not found. " + HOW_TO_GET_ONE, file=sys.stderr)
        return 1
    print(f"consul: {binary} ({version_of(binary)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
