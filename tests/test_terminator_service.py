"""
Tests for the Terminator service in memory: a MemoryReactorClock for
listening, the development agent behind StubTreq for the agent.
"""

from __future__ import annotations

import time
from typing import Any

from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

from connect_native.consul.client import ConsulClient
from connect_native.devagent import DevAgent
from connect_native.service import cert_managers
from connect_native.terminator import Settings, Terminator, parse_upstream


def terminator(settings: Settings) -> tuple[Terminator, MemoryReactorClock, list[int]]:
    reactor = MemoryReactorClock()
    reactor.advance(time.time())
    agent = DevAgent(reactor)
    client = ConsulClient(reactor, http_client=StubTreq(agent.resource()))
    finished: list[int] = []
    return (
        Terminator(
            settings, reactor, consul_client=client, on_finished=finished.append
        ),
        reactor,
        finished,
    )


def test_an_upstream_on_a_non_loopback_interface_is_logged_as_a_warning() -> None:
    service, reactor, finished = terminator(
        Settings(
            service="web",
            upstreams=(
                parse_upstream("db=tcp:9191:interface=0.0.0.0"),
                parse_upstream("cache=tcp:9192"),
            ),
            register=False,
        )
    )
    with capturedLogs() as events:
        service.startService()
    texts = [formatEvent(e) for e in events]
    warnings = [t for t in texts if "not a loopback address" in t]
    assert len(warnings) == 1
    assert "upstream db" in warnings[0]
    assert "0.0.0.0" in warnings[0]
    # The upstreams listen where they were told, the second on 127.0.0.1.
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (9191, "0.0.0.0"),
        (9192, "127.0.0.1"),
    ]
    assert finished == []
    manager = service.connect_service.cert_manager
    assert cert_managers.leases(manager) == 1
    with capturedLogs():
        service.stopService()
    assert cert_managers.leases(manager) == 0


def test_a_listener_that_cannot_start_ends_the_process_with_1() -> None:
    service, reactor, finished = terminator(
        Settings(service="web", upstreams=(parse_upstream("db=tcp:9191"),))
    )

    def refuse(*args: Any, **kwargs: Any) -> Any:
        from twisted.internet.error import CannotListenError

        raise CannotListenError("127.0.0.1", 9191, OSError("address in use"))

    reactor.listenTCP = refuse  # type: ignore[method-assign]
    with capturedLogs() as events:
        service.startService()
    assert finished == [1]
    [critical] = [e for e in events if e["log_level"].name == "critical"]
    assert "cannot start" in formatEvent(critical)
    assert "address in use" in formatEvent(critical)
    with capturedLogs():
        service.stopService()


def test_the_log_level_holds_while_the_terminator_runs_and_is_put_back() -> None:
    """
    twistd shows every event whatever its level: the terminator drops
    connect_native's events below --log-level (info by default) while it
    runs, and puts the level back when it stops.
    """
    from connect_native.authorize import log as library_log

    service, _, _ = terminator(
        Settings(service="web", upstreams=(parse_upstream("db=tcp:9191"),))
    )
    with capturedLogs() as events:
        library_log.debug("before: {n}", n=1)
        service.startService()
        library_log.debug("while running: {n}", n=2)
        library_log.info("while running, info: {n}", n=3)
        service.stopService()
        library_log.debug("after: {n}", n=4)
    texts = [formatEvent(e) for e in events]
    assert "before: 1" in texts
    assert "while running: 2" not in texts
    assert "while running, info: 3" in texts
    assert "after: 4" in texts


# --- SIGHUP: reloading -------------------------------------------------------------


def test_reload_reads_the_token_allowed_ids_and_log_level_files_again(
    tmp_path: Any,
) -> None:
    from connect_native.authorize import Peer
    from connect_native.identity import ServiceIdentity

    td = "example.consul"
    api = f"spiffe://{td}/ns/default/dc/dc1/svc/api"
    billing = f"spiffe://{td}/ns/default/dc/dc1/svc/billing"
    token = tmp_path / "token"
    token.write_text("first\n")
    allowed = tmp_path / "allowed"
    allowed.write_text(f"{api}\n")
    level = tmp_path / "level"
    level.write_text("info\n")
    service, _, _ = terminator(
        Settings(
            service="web",
            upstreams=(parse_upstream("db=tcp:9191"),),
            register=False,
            authorize="allow-ids",
            allow_ids=(api,),
            allow_ids_file=str(allowed),
            token_file=str(token),
            log_level_file=str(level),
        )
    )

    def allows(service_name: str) -> bool:
        peer = Peer(ServiceIdentity(td, "default", "dc1", service_name), "01")
        return bool(service._allow_ids.decide_now(peer, "web").allowed)

    service.client.set_token("first")  # as read from the file at start
    with capturedLogs() as events:
        service.startService()
        assert service.reload("SIGHUP") == [
            f"the ACL token in {token} is unchanged",
            f"the allowed IDs in {allowed} are unchanged (1 allowed)",
            f"log level info (from {level}, info before)",
        ]
        token.write_text("second\n")
        allowed.write_text(f"# rotated\n{billing}\n")
        level.write_text("warn\n")
        said = service.reload("SIGHUP")
        assert said == [
            f"a new ACL token from {token} is in use",
            f"1 IDs allowed now (1 from {allowed}), 1 before",
            f"log level warn (from {level}, info before)",
        ]
        assert service.client._token == "second"
        assert allows("billing")
        assert not allows("api")
        # What cannot be used is logged as an error; the values in use stay.
        token.write_text("")
        allowed.write_text("spiffe://nope\n")
        level.write_text("shouty\n")
        said = service.reload("SIGHUP")
        service.stopService()
    assert [line.split(":")[0] for line in said] == [
        "kept the ACL token in use",
        "kept the allowed IDs in use",
        "kept the log level in use",
    ]
    assert service.client._token == "second"
    assert allows("billing")
    errors = [formatEvent(e) for e in events if e["log_level"].name == "error"]
    assert len(errors) == 3
    assert all(text.startswith("connect-native web: SIGHUP: kept") for text in errors)
    # The level change was said at warn, so that it shows at that level.
    [warned] = [
        formatEvent(e)
        for e in events
        if e["log_level"].name == "warn" and "log level warn" in formatEvent(e)
    ]
    assert warned.startswith("connect-native web: SIGHUP: log level warn")


def test_reload_with_nothing_to_reload_says_so() -> None:
    service, _, _ = terminator(
        Settings(service="web", upstreams=(parse_upstream("db=tcp:9191"),))
    )
    with capturedLogs():
        service.startService()
        assert service.reload("SIGHUP") == [
            "nothing to reload (SIGHUP reloads --token-file, --log-level-file, "
            "--allow-ids-file and --identity files)"
        ]
        service.stopService()
