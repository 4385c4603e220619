"""``gateway-agent uplink run|check|status``: the Zone 2 -> Zone 3 uplink (docs/uplink.md).

The uplink runs as its own daemon (``gateway-agent uplink run -c configs/uplink.yaml``),
hosted by the same supervisor and status endpoint as the agent. SIGHUP re-reads the file
(all or nothing); SIGTERM stops cleanly; the disk queue survives either, and a crash.

Exit codes: ``run`` 0 after a clean stop, 1 when the settings are refused; ``check`` 0 when the
file is valid (it prints the rules), 1 with file, line and reason otherwise; ``status`` 0 with the
JSON status, 1 when the uplink's endpoint is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from edge_core.errors import ConfigError
from edge_core.uplink_rules import load_uplink_config
from edge_runtime.cli_support import print_status

DEFAULT_CONFIG = Path("configs/uplink.yaml")


def add_parser(sub: Any) -> None:
    uplink = sub.add_parser("uplink", help="the outbound uplink to the cloud broker, with store-and-forward")
    cmds = uplink.add_subparsers(dest="uplink_command", required=True)
    run = cmds.add_parser("run", help="run the uplink daemon")
    run.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG)
    run.set_defaults(func=_run)
    check = cmds.add_parser("check", help="validate the uplink settings and rules, print the rules")
    check.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG)
    check.set_defaults(func=_check)
    status = cmds.add_parser("status", help="print the running uplink's status (loopback endpoint)")
    status.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG)
    status.add_argument("--metrics", action="store_true", help="Prometheus text instead of JSON")
    status.set_defaults(func=_status)


def _run(args: argparse.Namespace) -> int:
    from gateway_agent.daemon import Agent
    from gateway_agent.settings import AgentSettings
    from gateway_agent.uplink import UplinkService

    config = load_uplink_config(args.config)
    settings = AgentSettings(agent_id=config.local.client_id, status_bind=config.status_bind, crl=None,
                             broker=None, validation=None, lifecycle=None, source=config.source)

    async def main() -> None:
        holder: list[UplinkService] = []

        async def factory(agent: Agent) -> UplinkService:
            service = UplinkService(config, events=agent.events)
            holder.append(service)
            return service

        async with Agent(settings, extra_services=[factory]) as agent:
            agent.install_signal_handlers()
            # SIGHUP here means: re-read the uplink settings (the agent's handler would sync CRLs)
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, holder[0].reload)
            print(f"gateway-agent uplink running: {config.cloud.host}:{config.cloud.port}, "
                  f"{len(config.forward)} forward / {len(config.downlink)} downlink rules", file=sys.stderr)
            await agent.wait_stopped()

    asyncio.run(main())
    return 0


def _check(args: argparse.Namespace) -> int:
    config = load_uplink_config(args.config)
    print(f"{config.source}: ok (site {config.site}, gateway {config.gateway}, cloud "
          f"{config.cloud.host}:{config.cloud.port})")
    for kind, rules in (("forward", config.forward), ("downlink", config.downlink)):
        for rule in rules:
            print(f"  {kind:8} line {rule.line}: {rule.source} -> {'/'.join(rule.target)}")
    return 0


def _status(args: argparse.Namespace) -> int:
    config = load_uplink_config(args.config)
    if config.status_bind is None:
        raise ConfigError("no 'status:' section, so the uplink exposes no status endpoint", source=str(args.config))
    host, port = config.status_bind
    return print_status("uplink", host, port, metrics=args.metrics)
