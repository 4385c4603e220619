"""``gateway-agent run`` and ``gateway-agent status``.

Exit codes: ``run`` 0 after a clean stop (SIGTERM/SIGINT), 1 when the configuration is
refused; ``status`` 0 with the JSON status, 1 when the agent's endpoint is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from edge_core.errors import ConfigError
from edge_runtime.cli_support import print_status
from gateway_agent.settings import load_agent_settings

DEFAULT_CONFIG = Path("configs/agent.yaml")


def add_parser(sub: Any) -> None:
    run = sub.add_parser("run", help="run the agent daemon (CRL sync, validation service, lifecycle)")
    run.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG)
    run.set_defaults(func=_run)
    status = sub.add_parser("status", help="print the status of the running agent (loopback endpoint)")
    status.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG)
    status.add_argument("--metrics", action="store_true", help="Prometheus text instead of JSON")
    status.set_defaults(func=_status)


def _run(args: argparse.Namespace) -> int:
    from gateway_agent.daemon import Agent
    from gateway_agent.services import service_factories

    settings = load_agent_settings(args.config)

    async def main() -> None:
        async with Agent(settings, extra_services=service_factories(settings)) as agent:
            agent.install_signal_handlers()
            print(f"gateway-agent running: {', '.join(s.name for s in agent.services) or 'no services'}",
                  file=sys.stderr)
            await agent.wait_stopped()

    asyncio.run(main())
    return 0


def _status(args: argparse.Namespace) -> int:
    settings = load_agent_settings(args.config)
    if settings.status_bind is None:
        raise ConfigError("no 'status:' section, so the agent exposes no status endpoint", source=str(args.config))
    host, port = settings.status_bind
    return print_status("agent", host, port, metrics=args.metrics)
