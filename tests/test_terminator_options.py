"""
Tests for ``twistd connect-native``'s options: every option parsed into
:class:`~connect_native.terminator.Settings`, and every bad input refused
with a ``UsageError`` naming the option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.python.usage import UsageError

from connect_native.terminator import (
    DEMO_SERVICE,
    Options,
    Settings,
    Upstream,
    parse_upstream,
    worker_arguments,
)

BASE = ["--service", "web", "--to", "tcp:127.0.0.1:8080"]


@pytest.fixture(autouse=True)
def no_consul_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)


def parse(*args: str) -> Settings:
    options = Options()
    options.parseOptions(list(args))
    assert options.settings is not None
    return options.settings


def refused(*args: str) -> str:
    with pytest.raises(UsageError) as raised:
        parse(*args)
    return str(raised.value)


def test_the_defaults() -> None:
    settings = parse(*BASE)
    assert settings == Settings(service="web", to="tcp:127.0.0.1:8080")
    assert settings.listen == "tcp:8443"
    assert settings.authorize == "agent"
    assert settings.register is True
    assert settings.dev is False
    assert settings.demo is False
    assert settings.max_connections == 1000
    assert settings.max_handshakes == 256
    assert settings.max_handshakes_per_address == 64
    assert settings.upstreams == ()


def test_every_option() -> None:
    settings = parse(
        "--service", "web",
        "--listen", "tcp:9443:interface=127.0.0.1",
        "--to", "unix:/run/app.sock",
        "--upstream", "db=tcp:9191",
        "--upstream", "cache.query=tcp:9192:interface=0.0.0.0",
        "--upstream", "auth@dc2=tcp6:9193",
        "--upstream", "logs.query@dc3=unix:/run/logs.sock",
        "--consul", "http://127.0.0.1:8501",
        "--authorize", "intentions",
        "--no-register",
        "--max-connections", "7",
        "--max-handshakes", "5",
        "--max-handshakes-per-address", "2",
        "--handshake-timeout", "1.5",
        "--connect-timeout", "2",
        "--idle-timeout", "30",
        "--shutdown-timeout", "4",
    )  # fmt: skip
    assert settings.listen == "tcp:9443:interface=127.0.0.1"
    assert settings.to == "unix:/run/app.sock"
    assert settings.consul == "http://127.0.0.1:8501"
    assert settings.authorize == "intentions"
    assert settings.register is False
    assert settings.max_connections == 7
    assert settings.max_handshakes == 5
    assert settings.max_handshakes_per_address == 2
    assert settings.handshake_timeout == 1.5
    assert settings.connect_timeout == 2.0
    assert settings.idle_timeout == 30.0
    assert settings.shutdown_timeout == 4.0
    assert settings.upstreams == (
        Upstream("db", "tcp:9191:interface=127.0.0.1", interface="127.0.0.1"),
        Upstream(
            "cache",
            "tcp:9192:interface=0.0.0.0",
            query=True,
            interface="0.0.0.0",
        ),
        Upstream(
            "auth", r"tcp6:9193:interface=\:\:1", datacenter="dc2", interface="::1"
        ),
        Upstream("logs", "unix:/run/logs.sock", query=True, datacenter="dc3"),
    )


def test_the_buffer_size_is_256_kib_unless_given() -> None:
    assert parse(*BASE).buffer_size == 262144
    assert parse(*BASE, "--buffer-size", "1048576").buffer_size == 1048576


def test_the_tls_transport_is_connect_natives_unless_given() -> None:
    assert parse(*BASE).tls_transport == "connect_native"
    assert parse(*BASE, "--tls-transport", "twisted").tls_transport == "twisted"


def test_the_log_level_is_info_unless_given() -> None:
    assert parse(*BASE).log_level == "info"
    assert parse(*BASE, "--log-level", "debug").log_level == "debug"


def test_keep_open_on_deny_is_off_unless_asked_for() -> None:
    assert parse(*BASE).keep_open_on_deny is False
    assert parse(*BASE, "--keep-open-on-deny").keep_open_on_deny is True


def test_allowed_connections_are_logged_unless_no_log_allowed() -> None:
    assert parse(*BASE).log_allowed is True
    assert parse(*BASE, "--no-log-allowed").log_allowed is False
    assert parse(*BASE, "--no-log-allowed", "--log-allowed").log_allowed is True


def test_register_and_no_register_last_one_wins() -> None:
    assert parse(*BASE, "--no-register", "--register").register is True
    assert parse(*BASE, "--register", "--no-register").register is False


def test_token_file_is_read_and_kept_out_of_the_repr(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    settings = parse(*BASE, "--token-file", str(token))
    assert settings.token == "s3cret-token"
    assert "s3cret" not in repr(settings)


def test_dev_uses_the_embedded_agent() -> None:
    assert parse(*BASE, "--dev").dev is True


def test_demo_needs_nothing_else() -> None:
    settings = parse("--demo")
    assert settings.demo is True
    assert settings.dev is True
    assert settings.service == DEMO_SERVICE
    assert settings.listen == "tcp:0:interface=127.0.0.1"
    assert settings.register is True


def test_upstreams_alone_need_no_to() -> None:
    settings = parse("--service", "web", "--upstream", "db=tcp:9191")
    assert settings.to is None


@pytest.mark.parametrize(
    ("description", "interface"),
    [
        ("tcp:9191", "127.0.0.1"),
        ("9191", "127.0.0.1"),
        ("tcp6:9191", "::1"),
        (r"tcp6:9191:interface=\:\:1", "::1"),
        ("tcp:9191:interface=10.0.0.5", "10.0.0.5"),
        ("unix:/tmp/x.sock", None),
    ],
)
def test_upstream_interface(description: str, interface: str | None) -> None:
    assert parse_upstream(f"db={description}").interface == interface


@pytest.mark.parametrize(
    ("interface", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("10.0.0.5", False),
        ("::", False),
        (None, True),
    ],
)
def test_upstream_loopback_only(interface: str | None, loopback: bool) -> None:
    upstream = Upstream("db", "tcp:1", interface=interface)
    assert upstream.loopback_only is loopback


def test_upstream_targets_name_what_is_dialled() -> None:
    assert parse_upstream("db=tcp:1").target == "Connect service 'db'"
    assert (
        parse_upstream("db.query@dc2=tcp:1").target
        == "prepared query 'db' in datacenter 'dc2'"
    )


# --- errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--to", "tcp:127.0.0.1:8080"], "--service"),
        (["--service", "web"], "--to"),
        (["--service", "bad name!", "--to", "tcp:127.0.0.1:1"], "--service"),
        ([*BASE[:2], "--to", "nonsense:thing"], "--to"),
        ([*BASE, "--listen", "nonsense:thing"], "--listen"),
        ([*BASE, "--listen", "tcp:notaport"], "--listen"),
        ([*BASE, "--upstream", "db"], "--upstream"),
        ([*BASE, "--upstream", "=tcp:1"], "--upstream"),
        ([*BASE, "--upstream", "db="], "--upstream"),
        ([*BASE, "--upstream", "d b=tcp:1"], "--upstream"),
        ([*BASE, "--upstream", "db@=tcp:1"], "--upstream"),
        ([*BASE, "--upstream", ".query=tcp:1"], "--upstream"),
        ([*BASE, "--upstream", "db=nonsense:x"], "--upstream"),
        ([*BASE, "--authorize", "anyone"], "--authorize"),
        ([*BASE, "--log-level", "verbose"], "--log-level"),
        ([*BASE, "--tls-transport", "openssl"], "--tls-transport"),
        ([*BASE, "--buffer-size", "4095"], "--buffer-size"),
        ([*BASE, "--buffer-size", "1MiB"], "--buffer-size"),
        ([*BASE, "--max-connections", "0"], "--max-connections"),
        ([*BASE, "--max-connections", "many"], "--max-connections"),
        ([*BASE, "--max-connections", "1.5"], "--max-connections"),
        ([*BASE, "--max-handshakes", "0"], "--max-handshakes"),
        ([*BASE, "--max-handshakes-per-address", "x"], "--max-handshakes-per-address"),
        ([*BASE, "--handshake-timeout", "0"], "--handshake-timeout"),
        ([*BASE, "--connect-timeout", "-1"], "--connect-timeout"),
        ([*BASE, "--idle-timeout", "inf"], "--idle-timeout"),
        ([*BASE, "--shutdown-timeout", "soon"], "--shutdown-timeout"),
        ([*BASE, "--consul", "ftp://127.0.0.1:8500"], "--consul"),
        ([*BASE, "--dev", "--consul", "http://127.0.0.1:8500"], "--consul"),
        (["--demo", "--consul", "http://127.0.0.1:8500"], "--consul"),
        (["--demo", "--no-register"], "--no-register"),
        (["--demo", "--to", "tcp:127.0.0.1:1"], "--to"),
        ([*BASE, "--token-file", "/nonexistent/token"], "--token-file"),
        ([*BASE, "--dev", "--token-file", "/etc/hostname"], "--token-file"),
    ],
)
def test_bad_options_are_refused_naming_the_option(args: list[str], named: str) -> None:
    assert named in refused(*args)


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    message = refused(*BASE, "--token-file", str(empty))
    assert "--token-file" in message
    assert "empty" in message


def test_a_bad_consul_variable_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "ftp://nowhere")
    assert "CONSUL_HTTP_ADDR" in refused(*BASE)


def test_an_unknown_option_is_refused() -> None:
    assert "--frobnicate" in refused(*BASE, "--frobnicate")


def test_the_plugin_is_found_by_twistd() -> None:
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    makers: dict[str, Any] = {m.tapname: m for m in getPlugins(IServiceMaker)}
    maker = makers["connect-native"]
    assert maker.module == "connect_native.terminator"
    assert isinstance(maker.options(), Options)


def listen_of(*args: str) -> str:
    arguments = worker_arguments(parse(*BASE, "--workers", "2", *args), 8443, None)
    return arguments[arguments.index("--listen") + 1]


def test_the_public_listener_backlog_is_a_servers_not_twisteds_50() -> None:
    # A burst of 51 connects overflowed Twisted's default backlog of 50.
    assert listen_of().endswith(":backlog=1024")


def test_a_backlog_the_listen_description_names_is_kept() -> None:
    assert listen_of("--listen", "tcp:8443:backlog=64").endswith(":backlog=64")


def test_identity_files_and_allow_ids() -> None:
    settings = parse(
        "--service",
        "web",
        "--to",
        "tcp:127.0.0.1:8080",
        "--identity",
        "files:cert=/c.pem,key=/k.pem,roots=/r.pem",
        "--authorize",
        "allow-ids",
        "--allow-id",
        "spiffe://example.consul/ns/default/dc/dc1/svc/api",
        "--allow-id",
        "spiffe://example.consul/ns/default/dc/*/svc/billing",
    )
    assert settings.identity is not None
    assert settings.identity.cert == Path("/c.pem")
    assert settings.authorize == "allow-ids"
    assert settings.allow_ids == (
        "spiffe://example.consul/ns/default/dc/dc1/svc/api",
        "spiffe://example.consul/ns/default/dc/*/svc/billing",
    )


def test_the_identity_is_the_agent_unless_given() -> None:
    assert parse("--service", "web", "--to", "tcp:127.0.0.1:1").identity is None


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--identity", "vault"), "--identity: identity must be 'agent' or 'files:"),
        (("--identity", "files:cert=/c"), "--identity: identity files: key=PATH"),
        (("--authorize", "allow-ids"), "needs at least one --allow-id"),
        (
            ("--allow-id", "spiffe://td/ns/x"),
            "--allow-id goes with --authorize allow-ids",
        ),
        (("--allow-id", "https://x/y"), "--allow-id: allowed ID 'https://x/y' must be"),
        (("--allow-id", "spiffe://td/svc/a*"), "one whole path segment"),
    ],
)
def test_bad_identity_and_allow_ids(args: tuple[str, ...], says: str) -> None:
    assert says in refused("--service", "web", "--to", "tcp:127.0.0.1:1", *args)


def test_identity_files_cannot_go_with_demo() -> None:
    assert "cannot be used with --demo" in refused(
        "--demo", "--identity", "files:cert=/c,key=/k,roots=/r"
    )


# --- what SIGHUP reloads ---------------------------------------------------------

SPIFFE = "spiffe://example.consul/ns/default/dc/dc1/svc/"


def test_an_allow_ids_file_adds_to_the_allow_id_options(tmp_path: Path) -> None:
    listed = tmp_path / "allowed"
    listed.write_text(
        f"# callers\n\n{SPIFFE}api  # the API\nspiffe://example.consul/ns/default/dc/*/svc/web\n"
    )
    settings = parse(
        *BASE,
        "--authorize",
        "allow-ids",
        "--allow-id",
        f"{SPIFFE}billing",
        "--allow-ids-file",
        str(listed),
    )
    assert settings.allow_ids == (
        f"{SPIFFE}billing",
        f"{SPIFFE}api",
        "spiffe://example.consul/ns/default/dc/*/svc/web",
    )
    assert settings.allow_id_options == (f"{SPIFFE}billing",)
    assert settings.allow_ids_file == str(listed)


def test_an_allow_ids_file_alone_is_enough(tmp_path: Path) -> None:
    listed = tmp_path / "allowed"
    listed.write_text(f"{SPIFFE}api\n")
    settings = parse(*BASE, "--authorize", "allow-ids", "--allow-ids-file", str(listed))
    assert settings.allow_ids == (f"{SPIFFE}api",)


def test_the_log_level_file_sets_the_level(tmp_path: Path) -> None:
    level = tmp_path / "level"
    level.write_text("Debug\n")
    settings = parse(*BASE, "--log-level-file", str(level))
    assert settings.log_level == "debug"
    assert settings.log_level_file == str(level)


def test_the_token_file_is_remembered_for_sighup(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    settings = parse(*BASE, "--token-file", str(token))
    assert (settings.token, settings.token_file) == ("t0ken", str(token))


@pytest.mark.parametrize(
    ("content", "args", "says"),
    [
        (None, ("--authorize", "allow-ids"), "--allow-ids-file: cannot read"),
        ("", ("--authorize", "allow-ids"), "or an --allow-ids-file holding one"),
        (
            f"{SPIFFE}api\nhttps://x/y\n",
            ("--authorize", "allow-ids"),
            "line 2: allowed ID 'https://x/y' must be",
        ),
        (f"{SPIFFE}api\n", (), "--allow-ids-file goes with --authorize allow-ids"),
    ],
)
def test_a_bad_allow_ids_file_is_refused_in_one_line(
    tmp_path: Path, content: str | None, args: tuple[str, ...], says: str
) -> None:
    listed = tmp_path / "allowed"
    if content is not None:
        listed.write_text(content)
    message = refused(*BASE, *args, "--allow-ids-file", str(listed))
    assert says in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("content", "args", "says"),
    [
        (None, (), "--log-level-file: cannot read"),
        ("loud\n", (), "holds 'loud', not one of debug, info, warn"),
        ("info", ("--log-level", "warn"), "cannot both be used"),
    ],
)
def test_a_bad_log_level_file_is_refused_in_one_line(
    tmp_path: Path, content: str | None, args: tuple[str, ...], says: str
) -> None:
    level = tmp_path / "level"
    if content is not None:
        level.write_text(content)
    message = refused(*BASE, *args, "--log-level-file", str(level))
    assert says in message
    assert "\n" not in message
