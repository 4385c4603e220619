"""``gateway-agent zones check|nft``: IEC 62443 zones and conduits of this gateway (docs/zones.md).

``check`` verifies ``zones.yaml`` itself and the broker, agent, uplink and firmware settings
against it, and prints every violation as ``file:line: message [code]``. ``nft`` writes the nftables
ruleset that enforces exactly the declared conduits (only for a compliant zone file).

The zone file is ``-c/--config`` (``--zones`` is the same), else the deployed one
(``$EDGE_GATEWAY_CONFIG_DIR/zones.yaml``, else ``/etc/edge-gateway/zones.yaml``; never the
working directory). ``check`` reads the broker, agent, uplink and firmware settings beside it
unless ``--broker``, ``--agent``, ``--uplink``, ``--firmware`` name others.

Exit codes (docs/ops.md): 0 compliant (``nft``: ruleset written); 1 violations found (each
printed); 2 usage error; 4 a file is missing, unreadable or invalid (nothing was checked).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edge_core import zones
from edge_core.errors import ConfigError
from edge_core.files import atomic_write_text
from edge_runtime.cli_support import EXIT_OK, EXIT_REFUSED, add_config_argument

CONFIG_NAME = "zones.yaml"
CHECKS = (("broker", zones.check_broker), ("agent", zones.check_agent), ("uplink", zones.check_uplink),
          ("firmware", zones.check_firmware))


def add_parser(sub: Any) -> None:
    group = sub.add_parser("zones", help="IEC 62443 zones and conduits: check the configs, write nftables rules")
    cmds = group.add_subparsers(dest="zones_command", required=True)
    check = cmds.add_parser("check", description=_EXITS,
                            help="check zones.yaml and the broker, agent, uplink and firmware settings against it")
    _zone_file_argument(check)
    for name, _ in CHECKS:
        check.add_argument(f"--{name}", type=Path, default=None, metavar="FILE",
                           help=f"{name} settings (default: {name}.yaml beside the zone file, if present)")
    check.add_argument("--json", action="store_true", help="violations as JSON lines (and nothing else on stdout)")
    check.set_defaults(func=_check)
    nft = cmds.add_parser("nft", help="write the nftables ruleset enforcing the conduits of zones.yaml",
                          description=_EXITS.replace("compliant", "ruleset written"))
    _zone_file_argument(nft)
    nft.add_argument("-o", "--output", type=Path, default=None, help="file to write (default: stdout)")
    nft.add_argument("--table", default="edge_zones")
    nft.add_argument("--no-log", action="store_true", help="no log rule for dropped packets")
    nft.set_defaults(func=_nft)


_EXITS = ("Exit codes: 0 compliant, 1 violations found (each printed), 2 usage error, 4 a file is missing, "
          "unreadable or invalid (nothing was checked).")


def _zone_file_argument(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser, CONFIG_NAME, what="the zone file")
    parser.add_argument("--zones", dest="config", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                        help="same as -c")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(path),
                          hint="check the path and its permissions") from exc


def _load_zones(path: Path) -> zones.ZoneModel:
    return zones.parse_zones(_read(path), source=str(path))


def _check(args: argparse.Namespace) -> int:
    model = _load_zones(args.config)
    found = zones.check_model(model)
    checked = [str(args.config)]
    for name, check in CHECKS:
        explicit: Path | None = getattr(args, name)
        path = explicit or args.config.parent / f"{name}.yaml"
        if explicit is None and not path.exists():
            continue
        found += check(model, zones.load_yaml(_read(path), source=str(path)), source=str(path))
        checked.append(str(path))
    for violation in found:
        if args.json:
            print(json.dumps({"code": violation.code, "file": violation.source, "line": violation.line,
                              "message": violation.message}))
        else:
            print(violation)
    if not args.json:
        verdict = f"{len(found)} violation(s)" if found else "compliant"
        print(f"zones check: {verdict} ({', '.join(checked)})", file=sys.stderr)
    return EXIT_REFUSED if found else EXIT_OK


def _nft(args: argparse.Namespace) -> int:
    model = _load_zones(args.config)
    found = zones.check_model(model)
    if found:
        for violation in found:
            print(violation, file=sys.stderr)
        print("zones nft: refusing to write rules for a zone file with violations", file=sys.stderr)
        return EXIT_REFUSED
    ruleset = zones.render_nftables(model, table=args.table, log=not args.no_log)
    if args.output is None:
        sys.stdout.write(ruleset)
    else:
        atomic_write_text(args.output, ruleset, mode=0o640)
        print(f"wrote {args.output}: load with `nft -f {args.output}`", file=sys.stderr)
    return EXIT_OK
