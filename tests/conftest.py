"""
Fixtures shared by the whole suite: real Consul agents, Hypothesis profiles,
and the count of tests that ran against the real agent.

``CONNECT_NATIVE_REAL_CONSUL=required`` (tox and CI set it) turns a missing
Consul binary into a failure; otherwise those tests skip and say how to get
one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests import consul_binary
from tests.consul_agent import RealConsulAgent

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)


@pytest.fixture(autouse=True)
def _library_log_level_restored() -> Iterator[None]:
    """
    A terminator started in a test and never stopped would leave
    connect_native's log level raised for every later test.
    """
    from twisted.logger import LogLevel

    from connect_native import _logging

    yield
    _logging.set_log_level(LogLevel.debug)


REAL_FIXTURES = {
    "real_consul",
    "fresh_real_consul",
    "module_real_consul",
    "real_consul_acl",
}
FIXTURES_DIR = Path(__file__).parent / "fixtures"


def real_consul_required() -> bool:
    return os.environ.get("CONNECT_NATIVE_REAL_CONSUL", "").lower() == "required"


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    for item in items:
        if REAL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_consul)


_real_outcomes: dict[str, int] = {"passed": 0, "failed": 0, "skipped": 0}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "real_consul" not in report.keywords:
        return
    if report.when == "call":
        _real_outcomes[report.outcome] = _real_outcomes.get(report.outcome, 0) + 1
    elif report.outcome != "passed":
        # setup/teardown failures and setup skips count too
        if report.when == "setup" or report.outcome == "failed":
            _real_outcomes[report.outcome] = _real_outcomes.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    version = ""
    try:
        binary = consul_binary.find()
        if binary is not None:
            version = f" {consul_binary.version_of(binary)}"
    except consul_binary.ConsulUnavailable:
        pass
    terminalreporter.write_sep(
        "-",
        f"real Consul{version}: {_real_outcomes['passed']} passed, "
        f"{_real_outcomes['failed']} failed, {_real_outcomes['skipped']} skipped",
    )


@pytest.fixture(scope="session")
def consul_binary_path() -> Path:
    try:
        binary = consul_binary.ensure()
    except consul_binary.ConsulUnavailable as e:
        if real_consul_required():
            pytest.fail(f"a real Consul agent is required: {e}")
        pytest.skip(f"no real Consul agent: {e}")
    return binary


def _started(binary: Path, **kwargs: object) -> RealConsulAgent:
    agent = RealConsulAgent(binary, **kwargs)  # type: ignore[arg-type]
    agent.start()
    return agent


@pytest.fixture(scope="session")
def real_consul(consul_binary_path: Path) -> Iterator[RealConsulAgent]:
    """
    One ``consul agent -dev`` for the session: use unique service names.
    """
    agent = _started(consul_binary_path)
    yield agent
    agent.stop()


@pytest.fixture
def fresh_real_consul(consul_binary_path: Path) -> Iterator[RealConsulAgent]:
    """
    An agent of this test's own, for destructive cases (CA rotation, restart).
    """
    agent = _started(consul_binary_path)
    yield agent
    agent.stop()


@pytest.fixture(scope="module")
def module_real_consul(consul_binary_path: Path) -> Iterator[RealConsulAgent]:
    """
    An agent of this module's own, for answers that the session's agent, with
    other modules' services in it, would not give (a fresh catalog).
    """
    agent = _started(consul_binary_path)
    yield agent
    agent.stop()


@pytest.fixture(scope="session")
def real_consul_acl(consul_binary_path: Path) -> Iterator[RealConsulAgent]:
    """
    An agent with ACLs on: default deny, ``agent.master_token`` as master.
    """
    agent = _started(consul_binary_path, acl=True)
    yield agent
    agent.stop()


@pytest.fixture
def unique_name() -> str:
    """
    A service name no other test uses, for tests sharing the session agent.
    """
    return f"svc-{uuid.uuid4().hex[:10]}"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """
    ``CONNECT_NATIVE_TEST_REACTOR=cn-epoll`` runs the in-process tests on
    ``connect_native.epollreactor`` (before pytest-twisted installs its
    default, an ``EPollReactor`` this one subclasses).
    """
    if os.environ.get("CONNECT_NATIVE_TEST_REACTOR") == "cn-epoll":
        from connect_native import epollreactor

        epollreactor.install()
