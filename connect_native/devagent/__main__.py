"""
``python -m connect_native.devagent --port 8500``: serve the development
agent's HTTP API on 127.0.0.1, log what it does to stdout, and stop cleanly
on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.interfaces import IListeningPort
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.web.server import Site

from connect_native import _logging
from connect_native.devagent.agent import DevAgent

log = Logger(observer=_logging.observer)

INTERFACE = "127.0.0.1"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m connect_native.devagent",
        description=(
            "A Consul 1.8.7-compatible development agent (ACLs off unless "
            "--acl-default-policy) for "
            "Connect-native applications, on 127.0.0.1."
        ),
    )
    parser.add_argument(
        "--port",
        type=int,
        default=8500,
        help="TCP port on 127.0.0.1 (default 8500; 0 picks a free one)",
    )
    parser.add_argument("--datacenter", default="dc1", help="datacenter (dc1)")
    parser.add_argument(
        "--node-name", default="devagent", help="this agent's node name (devagent)"
    )
    parser.add_argument(
        "--acl-default-policy",
        choices=("allow", "deny"),
        default=None,
        help="turn ACLs on with this default policy (ACLs are off without it)",
    )
    parser.add_argument(
        "--master-token",
        default=None,
        help="with ACLs on, the token that may do anything (creates policies "
        "and tokens); it is never logged",
    )
    parser.add_argument(
        "--consul-version",
        default="1.8.7",
        help="the Consul version whose API to serve: 1.8.7 (default) or a "
        "1.9+ version such as 1.10.0, which adds service-intentions config "
        "entries with L7 (HTTP) permissions",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="log only warnings and errors, not every request",
    )
    args = parser.parse_args(list(argv))
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, not {args.port}")
    if args.master_token is not None and args.acl_default_policy is None:
        parser.error("--master-token needs --acl-default-policy allow or deny")
    if args.master_token == "":
        parser.error("--master-token must not be empty")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    level = LogLevel.warn if args.quiet else LogLevel.info
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stdout),
                [LogLevelFilterPredicate(defaultLogLevel=level)],
            )
        ],
        redirectStandardIO=False,
    )
    from twisted.internet import reactor

    clock: Any = reactor
    try:
        agent = DevAgent(
            clock,
            datacenter=args.datacenter,
            node_name=args.node_name,
            acl_default_policy=args.acl_default_policy,
            master_token=args.master_token,
            version=args.consul_version,
        )
    except ValueError as e:
        log.error("cannot start the development agent: {error}", error=str(e))
        return 2
    site = Site(agent.resource())  # type: ignore[no-untyped-call]
    # The resource logs each answer with its status and duration.
    site.log = lambda request: None  # type: ignore[method-assign]
    try:
        port: IListeningPort = clock.listenTCP(args.port, site, interface=INTERFACE)
    except Exception as e:
        log.error(
            "cannot listen on {interface}:{port}: {error}; choose another --port",
            interface=INTERFACE,
            port=args.port,
            error=str(e),
        )
        return 1
    address = port.getHost()
    agent.http_port = address.port  # type: ignore[attr-defined]
    log.info(
        "development agent (Consul {version} API, datacenter {dc}, node {node}, "
        "trust domain {td}, ACLs {acls}) listening on http://{host}:{port}",
        acls=f"on, default {args.acl_default_policy}"
        if args.acl_default_policy
        else "off",
        version=agent.version,
        dc=args.datacenter,
        node=args.node_name,
        td=agent.ca.trust_domain,
        host=INTERFACE,
        port=address.port,  # type: ignore[attr-defined]
    )

    def stopping() -> None:
        log.info("development agent stopping")

    clock.addSystemEventTrigger("before", "shutdown", stopping)
    clock.addSystemEventTrigger("before", "shutdown", port.stopListening)
    clock.run()
    log.info("development agent stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
