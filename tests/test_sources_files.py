"""
The files identity source: reads, watches and swaps a certificate, key and CA
bundle on disk; never serves half-written or bad files; keeps the last good
Bundle; and the text form ``--identity`` / ``identity=`` take.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher

from connect_native.certs import IIdentitySource, ManagerState
from connect_native.sources import (
    FilesIdentity,
    InvalidIdentityDescription,
    parse_identity,
)
from connect_native.sources.files import FileIdentitySource, IdentityFilesStopped
from connect_native.testing import CertificateFactory


@pytest.fixture
def captured_events() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _write(path: Path, text: str) -> None:
    # A new inode and mtime each time, as a rename into place gives.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _files(tmp_path: Path, ca: CertificateFactory, service: str = "web") -> Path:
    leaf = ca.leaf(service)
    _write(tmp_path / "cert.pem", leaf.chain_pem)
    _write(tmp_path / "key.pem", leaf.key_pem)
    _write(tmp_path / "ca.pem", ca.root_pem)
    return tmp_path


def _looks(clock: Clock, count: int) -> None:
    """``count`` looks at the files, one interval apart."""
    for _ in range(count):
        clock.advance(1)


def _source(tmp_path: Path, clock: Clock) -> FileIdentitySource:
    return FileIdentitySource(
        clock,
        cert=tmp_path / "cert.pem",
        key=tmp_path / "key.pem",
        roots=tmp_path / "ca.pem",
    )


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(time.time())
    return clock


def test_reads_the_files_at_start(tmp_path: Path, clock: Clock) -> None:
    ca = CertificateFactory()
    _files(tmp_path, ca)
    source = _source(tmp_path, clock)
    assert IIdentitySource.providedBy(source)
    assert source.current() is None  # not started
    ready = source.when_ready()
    source.startService()
    bundle = source.current()
    assert bundle is not None
    assert bundle.identity.service == "web"
    assert bundle.carries_trust_domain(ca.trust_domain)
    assert ready.result is bundle
    assert source.state is ManagerState.READY
    source.stopService()
    assert source.current() is None


def test_a_replaced_certificate_is_served_after_it_holds_one_interval(
    tmp_path: Path, clock: Clock
) -> None:
    ca = CertificateFactory()
    _files(tmp_path, ca)
    source = _source(tmp_path, clock)
    source.startService()
    seen = []
    source.subscribe_bundles(seen.append)
    first = source.current()
    assert first is not None
    _files(tmp_path, ca)
    clock.advance(1)  # the change is seen: not read yet
    assert source.current() is first
    clock.advance(1)  # it held for an interval: read and swapped
    second = source.current()
    assert second is not None
    assert second.leaf.serial_number != first.leaf.serial_number
    assert seen == [second]
    source.stopService()


def test_a_half_written_file_is_never_read(tmp_path: Path, clock: Clock) -> None:
    ca = CertificateFactory()
    _files(tmp_path, ca)
    retired = CertificateFactory()
    _write(tmp_path / "ca.pem", ca.root_pem + retired.root_pem)
    source = _source(tmp_path, clock)
    source.startService()
    first = source.current()
    assert first is not None
    assert len(first.roots) == 2
    # The CA bundle rewritten a piece at a time, each piece a valid bundle
    # of one root: every look sees it changed, so none is read.
    added = CertificateFactory()
    new_roots = ca.root_pem + added.root_pem
    for cut in (len(ca.root_pem), len(ca.root_pem) + 10, len(ca.root_pem) + 200):
        _write(tmp_path / "ca.pem", new_roots[:cut])
        clock.advance(1)
        assert source.current() is first
    _write(tmp_path / "ca.pem", new_roots)
    clock.advance(1)
    assert source.current() is first
    clock.advance(1)
    bundle = source.current()
    assert bundle is not None
    assert bundle is not first
    assert bundle.root_certificates == (ca.root_certificate, added.root_certificate)
    source.stopService()


def test_bad_files_keep_the_last_good_bundle_and_say_why(
    tmp_path: Path, clock: Clock, captured_events: list[LogEvent]
) -> None:
    ca = CertificateFactory()
    _files(tmp_path, ca)
    source = _source(tmp_path, clock)
    source.startService()
    first = source.current()
    # A new certificate without its key: they do not match.
    _write(tmp_path / "cert.pem", ca.leaf("web").chain_pem)
    _looks(clock, 2)
    assert source.current() is first
    assert source.state is ManagerState.DEGRADED
    warnings = [
        e for e in captured_events if "keeping the certificate" in str(e["log_format"])
    ]
    assert len(warnings) == 1
    assert "not the key of the certificate" in str(warnings[0]["problem"])
    _looks(clock, 10)  # the same problem is not logged again
    assert (
        len(
            [
                e
                for e in captured_events
                if "keeping the certificate" in str(e["log_format"])
            ]
        )
        == 1
    )
    # A certificate from a CA the roots do not hold.
    stranger = CertificateFactory(ca.trust_domain).leaf("web")
    _write(tmp_path / "cert.pem", stranger.chain_pem)
    _write(tmp_path / "key.pem", stranger.key_pem)
    _looks(clock, 2)
    assert source.current() is first
    source.stopService()


def test_no_usable_files_at_start_is_not_ready(tmp_path: Path, clock: Clock) -> None:
    ca = CertificateFactory()
    _files(tmp_path, ca)
    (tmp_path / "key.pem").unlink()
    source = _source(tmp_path, clock)
    source.startService()
    ready = source.when_ready()
    assert source.current() is None
    assert source.state is ManagerState.STARTING
    assert "key.pem" in source.reason
    assert not ready.called
    _write(tmp_path / "key.pem", "garbage")
    _looks(clock, 2)
    assert not ready.called
    _files(tmp_path, ca)
    _looks(clock, 2)
    assert ready.called
    assert ready.result is source.current()
    source.stopService()


def test_an_expired_certificate_is_not_served(tmp_path: Path, clock: Clock) -> None:
    ca = CertificateFactory(clock=clock)
    _files(tmp_path, ca)
    source = _source(tmp_path, clock)
    source.startService()
    bundle = source.current()
    assert bundle is not None
    clock.advance(bundle.not_after - clock.seconds())
    assert source.current() is None
    assert source.state is ManagerState.EXPIRED
    source.stopService()


def test_stop_fails_the_waiters(tmp_path: Path, clock: Clock) -> None:
    source = _source(tmp_path, clock)  # no files at all
    source.startService()
    ready = source.when_ready()
    source.stopService()
    assert isinstance(ready.result.value, IdentityFilesStopped)  # type: ignore[attr-defined]
    ready.addErrback(lambda _: None)
    assert not clock.getDelayedCalls()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("agent", None),
        (
            "files:cert=/c.pem,key=/k.pem,roots=/r.pem",
            FilesIdentity(Path("/c.pem"), Path("/k.pem"), Path("/r.pem")),
        ),
        (
            "files:cert=/c,key=/k,roots=/r,trustDomain=example.org,interval=2.5",
            FilesIdentity(Path("/c"), Path("/k"), Path("/r"), "example.org", 2.5),
        ),
    ],
)
def test_identity_descriptions(text: str, expected: FilesIdentity | None) -> None:
    assert parse_identity(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("vault", "must be 'agent' or 'files:"),
        ("files:cert=/c,key=/k", "roots=PATH missing"),
        ("files:cert=/c,key=/k,roots=/r,colour=red", "'colour=red' is not one of"),
        ("files:cert=/c,cert=/d,key=/k,roots=/r", "cert= given twice"),
        ("files:cert=/c,key=/k,roots=/r,interval=0", "interval must be a positive"),
        ("files:cert=/c,key=/k,roots=/r,interval=soon", "interval must be a positive"),
    ],
)
def test_bad_identity_descriptions(text: str, says: str) -> None:
    with pytest.raises(InvalidIdentityDescription, match=r".+") as raised:
        parse_identity(text)
    assert says in str(raised.value)
    assert "\n" not in str(raised.value)


def test_reload_reads_the_files_now_without_waiting_for_them_to_hold_still(
    tmp_path: Path, clock: Clock
) -> None:
    ca = CertificateFactory()
    _files(tmp_path, ca)
    source = _source(tmp_path, clock)
    source.startService()
    first = source.current()
    assert first is not None
    _files(tmp_path, ca)  # no interval passes: an operator's SIGHUP
    said = source.reload()
    second = source.current()
    assert second is not None
    assert second.leaf.serial_number != first.leaf.serial_number
    assert (
        said == f"serving {second.identity.uri}, serial {second.leaf.serial_number:x}"
    )
    _write(tmp_path / "key.pem", "not a key")
    said = source.reload()
    assert source.current() is second  # the last good one stays
    assert said.startswith(f"serving {second.identity.uri}")
    assert "(kept: the files hold no usable one:" in said
    source.stopService()
