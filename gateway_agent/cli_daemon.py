"""``gateway-agent run`` and ``gateway-agent status``.

``run``: the daemon. Under systemd (``Type=notify``) it reports READY=1 once its services
and status endpoint are up, pings the watchdog, and STOPPING=1 on SIGTERM. SIGHUP syncs
the CRL at once; SIGTERM and SIGINT stop cleanly (exit 0). A refused configuration
exits 4, a port in use 5 (the table in ``edge_runtime.cli_support``).

``status``: one endpoint of the running agent: ``/status`` (JSON, default),
``--metrics``, ``--ready`` (exit 1 when not ready), ``--health``.
"""

from __future__ import annotations

import argparse
from typing import Any

from edge_runtime.cli_support import add_config_argument, add_status_arguments, print_status, run_daemon
from edge_runtime.sd_notify import Notifier
from gateway_agent.settings import load_agent_settings

CONFIG_NAME = "agent.yaml"


def add_parser(sub: Any) -> None:
    run = sub.add_parser("run", help="run the agent daemon (CRL sync, validation service, lifecycle)")
    add_config_argument(run, CONFIG_NAME, what="agent settings")
    run.set_defaults(func=_run, daemon=True)
    status = sub.add_parser("status", help="query the running agent's status endpoint",
                            description="JSON status by default. Exit 0 when the endpoint answers 200, 1 when "
                                        "it answers not ready (--ready), 5 when unreachable.")
    add_config_argument(status, CONFIG_NAME, what="agent settings")
    add_status_arguments(status)
    status.set_defaults(func=_status)


def _run(args: argparse.Namespace) -> int:
    from gateway_agent.daemon import Agent
    from gateway_agent.services import service_factories

    settings = load_agent_settings(args.config)

    async def main() -> None:
        notify = Notifier()
        async with Agent(settings, extra_services=service_factories(settings)) as agent:
            agent.install_signal_handlers(notify)
            await agent.serve(notify, f"running: {', '.join(s.name for s in agent.services) or 'no services'}")

    run_daemon(main(), config=args.config)
    return 0


def _status(args: argparse.Namespace) -> int:
    settings = load_agent_settings(args.config)
    return print_status("agent", settings.status, source=str(args.config), path=args.path,
                        raw=args.path in ("/metrics", "/healthz"))
