"""``edge-broker``: run the hardened broker, read its status, check ACL files.

Exit codes: 0 success; 1 refused or failed (the message says why, ``-v`` adds a
traceback); 2 usage error; for ``acl check`` 1 means the file has errors.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from broker_plugins.settings import BrokerSettings, load_settings
from edge_core.errors import ConfigError
from edge_runtime.cli_support import print_status, run_handler

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-broker", description="The hardened MQTT broker of the edge gateway")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the broker")
    run.add_argument("-c", "--config", type=Path, default=Path("configs/broker.yaml"))
    run.set_defaults(func=_run)
    status = sub.add_parser("status", help="print the status of a running broker (from its loopback endpoint)")
    status.add_argument("-c", "--config", type=Path, default=Path("configs/broker.yaml"))
    status.add_argument("--metrics", action="store_true", help="print Prometheus metrics instead of JSON status")
    status.set_defaults(func=_status)
    try:
        from broker_plugins import cli_acl
    except ModuleNotFoundError:  # pragma: no cover - ACL commands ship with the ACL module
        pass
    else:
        cli_acl.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_handler(args)


def _run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if settings.event_loop == "uvloop":
        import uvloop

        uvloop.run(_serve(settings))
    else:
        asyncio.run(_serve(settings))
    return 0


async def _serve(settings: BrokerSettings) -> None:
    from broker_plugins.server import EdgeBroker

    async with EdgeBroker(settings) as broker:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(broker.close()))
        print(f"edge-broker listening on {settings.listener.host}:{broker.port} (TLS 1.3, mTLS)", file=sys.stderr)
        await broker.wait_closed()


def _status(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if settings.status_bind is None:
        raise ConfigError("no 'status:' section, so the broker exposes no status endpoint", source=str(args.config))
    host, port = settings.status_bind
    return print_status("broker", host, port, metrics=args.metrics)


if __name__ == "__main__":
    sys.exit(main())
