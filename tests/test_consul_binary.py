"""
The Consul fetch script reads the Debian mirror from the machine's apt
sources, in both formats, and refuses to guess one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import consul_binary


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_mirror_from_deb822_skips_the_security_archive(tmp_path: Path) -> None:
    sources = write(
        tmp_path,
        "debian.sources",
        "Types: deb\n"
        "URIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\n\n"
        "Types: deb\n"
        "# URIs: http://commented.example/debian\n"
        "URIs: http://mirror.example/debian/\n"
        "Suites: bookworm\n",
    )
    assert consul_binary.debian_mirror([sources]) == "http://mirror.example/debian"


def test_mirror_from_one_line_format_with_options(tmp_path: Path) -> None:
    sources = write(
        tmp_path,
        "sources.list",
        "# deb http://old.example/debian buster main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] "
        "http://mirror.example/debian bookworm main\n",
    )
    assert consul_binary.debian_mirror([sources]) == "http://mirror.example/debian"


def test_no_debian_mirror_is_an_error_saying_what_to_do(tmp_path: Path) -> None:
    sources = write(
        tmp_path, "other.list", "deb https://apt.example/repo stable main\n"
    )
    with pytest.raises(consul_binary.ConsulUnavailable, match="CONSUL_BINARY"):
        consul_binary.debian_mirror([sources, str(tmp_path / "missing.list")])


def test_consul_binary_variable_must_name_an_executable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSUL_BINARY", str(tmp_path / "nope"))
    with pytest.raises(consul_binary.ConsulUnavailable, match="not an executable"):
        consul_binary.find()
