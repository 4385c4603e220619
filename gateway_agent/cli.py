"""``gateway-agent``: the command line of the gateway agent.

Each command group lives in its own module (``cli_pki``, ``cli_crl``, ...), which exposes
``add_parser(subparsers)``; the parser stores ``func(args) -> int`` as the handler.

Every verb that reads a config takes ``-c/--config`` (default ``/etc/edge-gateway/agent.yaml``;
``command`` verbs ``operator.yaml``, ``uplink`` ``uplink.yaml``, ``zones`` ``zones.yaml``,
``firmware`` ``firmware.yaml``), never a working-directory default; only ``pki init-dev``
(creates a dev CA in ``--out``) and ``pki pin FILE`` read none. Exit codes follow the one
table in ``edge_runtime.cli_support`` (docs/ops.md).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from edge_runtime.cli_support import EXIT_CODES_HELP, add_version_argument, parse_args, run_handler

__all__ = ["main"]

# Command groups, imported by name so that a group can be added without touching this file's logic.
GROUPS = ("cli_daemon", "cli_pki", "cli_crl", "cli_certs", "cli_devices", "cli_command", "cli_firmware",
          "cli_uplink", "cli_zones")  # uplink and zones: docs/uplink.md, docs/zones.md


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway-agent", description=__doc__.splitlines()[0],
                                     epilog=EXIT_CODES_HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and debug logs")
    add_version_argument(parser)
    sub = parser.add_subparsers(dest="group", required=True)
    for name in GROUPS:
        try:
            module = importlib.import_module(f"gateway_agent.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"gateway_agent.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    return run_handler(args)


if __name__ == "__main__":
    sys.exit(main())
