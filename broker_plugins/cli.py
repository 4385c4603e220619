"""``edge-broker``: run the hardened broker, read its status, check ACL files.

Every verb takes ``-c/--config`` (default ``/etc/edge-gateway/broker.yaml``, never the
working directory) and reads the paths it needs from it. Exit codes follow the table in
``edge_runtime.cli_support`` (docs/ops.md).

Signals to ``run``: SIGHUP reloads the registry, ACL, operators, CRLs and the TLS
certificate and key (for new connections) and logs what changed; SIGTERM and SIGINT
drain and stop. Other signals keep their default.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from broker_plugins.settings import BrokerSettings, load_settings
from edge_runtime.cli_support import (
    EXIT_CODES_HELP,
    add_config_argument,
    add_status_arguments,
    add_version_argument,
    parse_args,
    print_status,
    run_daemon,
    run_handler,
)

__all__ = ["build_parser", "main"]

CONFIG_NAME = "broker.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-broker", description="The hardened MQTT broker of the edge gateway",
                                     epilog=EXIT_CODES_HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    add_version_argument(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the broker (SIGHUP reloads, SIGTERM drains and stops)",
                         epilog=EXIT_CODES_HELP)
    add_config_argument(run, CONFIG_NAME, what="broker settings")
    run.set_defaults(func=_run, daemon=True)
    status = sub.add_parser("status", help="query a running broker's status endpoint", epilog=EXIT_CODES_HELP,
                            description="JSON status by default. Exit 0 when the endpoint answers 200, 1 when "
                                        "it answers not ready (--ready), 5 when unreachable.")
    add_config_argument(status, CONFIG_NAME, what="broker settings")
    add_status_arguments(status)
    status.set_defaults(func=_status)
    from broker_plugins import cli_acl

    cli_acl.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    return run_handler(args)


def _run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    run_daemon(_serve(settings), config=args.config, use_uvloop=settings.event_loop == "uvloop")
    return 0


async def _serve(settings: BrokerSettings) -> None:
    from broker_plugins.server import EdgeBroker
    from broker_plugins.signals import serve_until_stopped

    async with EdgeBroker(settings) as broker:
        await serve_until_stopped(broker)


def _status(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    return print_status("broker", settings.status, source=str(args.config), path=args.path,
                        raw=args.path in ("/metrics", "/healthz"))


if __name__ == "__main__":
    sys.exit(main())
