"""``gateway-agent uplink run|check|status``: the Zone 2 -> Zone 3 uplink (docs/uplink.md).

The uplink runs as its own daemon (``gateway-agent uplink run -c configs/uplink.yaml``),
hosted by the same supervisor and status endpoint as the agent. SIGHUP re-reads the file
(all or nothing); SIGTERM stops cleanly; the disk queue survives either, and a crash.

Exit codes (the table in ``edge_runtime.cli_support``): ``run`` 0 after a clean stop, 4 when the
settings are refused, 5 when its status port is taken; ``check`` 0 when the file is valid (it
prints the rules), 4 with file, line and reason otherwise; ``status`` 0 with the JSON status,
1 not ready (``--ready``), 5 when the uplink's endpoint is unreachable. Without ``-c`` the
file is ``/etc/edge-gateway/uplink.yaml``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from edge_core.uplink_rules import UplinkConfig, load_uplink_config
from edge_runtime.cli_support import add_config_argument, add_status_arguments, print_status, run_daemon
from edge_runtime.sd_notify import Notifier
from edge_runtime.status_http import StatusSettings

CONFIG_NAME = "uplink.yaml"


def add_parser(sub: Any) -> None:
    uplink = sub.add_parser("uplink", help="the outbound uplink to the cloud broker, with store-and-forward")
    cmds = uplink.add_subparsers(dest="uplink_command", required=True)
    run = cmds.add_parser("run", help="run the uplink daemon")
    add_config_argument(run, CONFIG_NAME, what="uplink settings")
    run.set_defaults(func=_run, daemon=True)
    check = cmds.add_parser("check", help="validate the uplink settings and rules, print the rules")
    add_config_argument(check, CONFIG_NAME, what="uplink settings")
    check.set_defaults(func=_check)
    status = cmds.add_parser("status", help="print the running uplink's status (loopback endpoint)")
    add_config_argument(status, CONFIG_NAME, what="uplink settings")
    add_status_arguments(status)
    status.set_defaults(func=_status)


def _status_settings(config: UplinkConfig) -> StatusSettings | None:
    return None if config.status_bind is None else StatusSettings(*config.status_bind)


def _run(args: argparse.Namespace) -> int:
    from gateway_agent.daemon import Agent
    from gateway_agent.settings import AgentSettings
    from gateway_agent.uplink import UplinkService

    config = load_uplink_config(args.config)
    settings = AgentSettings(agent_id=config.local.client_id, status=_status_settings(config), crl=None,
                             broker=None, validation=None, lifecycle=None, source=config.source)

    async def main() -> None:
        holder: list[UplinkService] = []

        async def factory(agent: Agent) -> UplinkService:
            service = UplinkService(config, events=agent.events)
            holder.append(service)
            return service

        notify = Notifier()
        async with Agent(settings, extra_services=[factory]) as agent:
            agent.install_signal_handlers(notify)

            def hup() -> None:  # SIGHUP here means: re-read the uplink settings (not a CRL sync)
                notify.reloading()
                holder[0].reload()
                notify.ready("uplink settings re-read")

            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hup)
            agent.events.emit("uplink.running", cloud=f"{config.cloud.host}:{config.cloud.port}",
                              forward=len(config.forward), downlink=len(config.downlink))
            await agent.serve(notify, f"uplink to {config.cloud.host}:{config.cloud.port}")

    run_daemon(main(), config=args.config)
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
    return print_status("uplink", _status_settings(config), source=str(args.config), path=args.path,
                        raw=args.path in ("/metrics", "/healthz"))
