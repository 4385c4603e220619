"""``gateway-agent zones check|nft``: IEC 62443 zones and conduits of this gateway (docs/zones.md).

``check`` verifies ``zones.yaml`` itself and the broker, agent and uplink settings against it,
and prints every violation as ``file:line: message [code]``. ``nft`` writes the nftables
ruleset that enforces exactly the declared conduits (only for a compliant zone file).

Exit codes: 0 compliant (``nft``: ruleset written); 1 violations found (each printed);
2 usage error; 3 a file is missing, unreadable or not valid YAML (nothing was checked).
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

DEFAULT_ZONES = Path("configs/zones.yaml")
CHECKS = (("broker", zones.check_broker), ("agent", zones.check_agent), ("uplink", zones.check_uplink),
          ("firmware", zones.check_firmware))


def add_parser(sub: Any) -> None:
    group = sub.add_parser("zones", help="IEC 62443 zones and conduits: check the configs, write nftables rules")
    cmds = group.add_subparsers(dest="zones_command", required=True)
    check = cmds.add_parser("check", help="check zones.yaml and the broker, agent and uplink settings against it")
    check.add_argument("--zones", type=Path, default=DEFAULT_ZONES)
    for name, _ in CHECKS:
        check.add_argument(f"--{name}", type=Path, default=None,
                           help=f"{name} settings (default: {name}.yaml beside the zone file, if present)")
    check.add_argument("--json", action="store_true", help="violations as JSON lines")
    check.set_defaults(func=_check)
    nft = cmds.add_parser("nft", help="write the nftables ruleset enforcing the conduits of zones.yaml")
    nft.add_argument("--zones", type=Path, default=DEFAULT_ZONES)
    nft.add_argument("-o", "--output", type=Path, default=None, help="file to write (default: stdout)")
    nft.add_argument("--table", default="edge_zones")
    nft.add_argument("--no-log", action="store_true", help="no log rule for dropped packets")
    nft.set_defaults(func=_nft)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(path)) from exc


def _check(args: argparse.Namespace) -> int:
    try:
        model = zones.parse_zones(_read(args.zones), source=str(args.zones))
        found = zones.check_model(model)
        checked = [str(args.zones)]
        for name, check in CHECKS:
            explicit: Path | None = getattr(args, name)
            path = explicit or args.zones.parent / f"{name}.yaml"
            if explicit is None and not path.exists():
                continue
            found += check(model, zones.load_yaml(_read(path), source=str(path)), source=str(path))
            checked.append(str(path))
    except ConfigError as exc:
        print(f"error: {exc.diagnostics()}", file=sys.stderr)
        return 3
    for violation in found:
        if args.json:
            print(json.dumps({"code": violation.code, "file": violation.source, "line": violation.line,
                              "message": violation.message}))
        else:
            print(violation)
    if not args.json:
        verdict = f"{len(found)} violation(s)" if found else "compliant"
        print(f"zones check: {verdict} ({', '.join(checked)})", file=sys.stderr)
    return 1 if found else 0


def _nft(args: argparse.Namespace) -> int:
    try:
        model = zones.parse_zones(_read(args.zones), source=str(args.zones))
    except ConfigError as exc:
        print(f"error: {exc.diagnostics()}", file=sys.stderr)
        return 3
    found = zones.check_model(model)
    if found:
        for violation in found:
            print(violation, file=sys.stderr)
        print("zones nft: refusing to write rules for a zone file with violations", file=sys.stderr)
        return 1
    ruleset = zones.render_nftables(model, table=args.table, log=not args.no_log)
    if args.output is None:
        sys.stdout.write(ruleset)
    else:
        atomic_write_text(args.output, ruleset, mode=0o640)
        print(f"wrote {args.output}: load with `nft -f {args.output}`", file=sys.stderr)
    return 0
