"""``gateway-agent certs``: the certificate inventory (expiry report, lifecycle history, renew now).

Every verb reads ``-c/--config`` (the agent's YAML; ``--db`` overrides the inventory file or URL).

Exit codes: 0 success (an empty report is a success); 1 the inventory could not be read, or
``renew`` was refused (unknown or revoked device, no running agent picked the request up);
2 usage error (a bad ``--within``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import timedelta
from typing import Any

from edge_core.clock import SystemClock
from edge_core.lifecycle import CertState
from edge_runtime.cli_support import resolve_config
from gateway_agent.cli_lifecycle_config import CONFIG_NAME, add_config_arguments, lifecycle_paths
from gateway_agent.inventory import open_inventory

__all__ = ["add_parser", "parse_duration"]

_DURATION_RE = re.compile(r"^(\d{1,6})([wdhm])$")
_UNITS = {"w": timedelta(weeks=1), "d": timedelta(days=1), "h": timedelta(hours=1), "m": timedelta(minutes=1)}


def parse_duration(text: str) -> timedelta:
    """``90d``, ``12w``, ``36h``, ``15m``; a bare number means days."""
    value = text.strip().lower()
    if value.isdigit():
        value += "d"
    match = _DURATION_RE.match(value)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90d, 12w, 36h or 15m")
    return int(match.group(1)) * _UNITS[match.group(2)]


def add_parser(sub: Any) -> None:
    certs = sub.add_parser("certs", help="certificate inventory: expiry report, lifecycle history, renew now")
    verbs = certs.add_subparsers(dest="verb", required=True)
    expiring = verbs.add_parser("expiring",
                                help="devices whose certificate expires within the window, soonest first")
    expiring.add_argument("--within", type=parse_duration, default=timedelta(days=90),
                          help="window such as 90d, 12w, 36h (default 90d)")
    expiring.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    add_config_arguments(expiring)
    expiring.set_defaults(func=_expiring)
    history = verbs.add_parser("history", help="every lifecycle transition of one device, oldest first")
    history.add_argument("device")
    history.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    add_config_arguments(history)
    history.set_defaults(func=_history)
    renew = verbs.add_parser("renew", help="ask the running agent to renew a device now (e.g. key exposure)",
                             description="Queues the request for the daemon (gateway-agent run), which runs "
                                         "the whole rotation over the device's session, and waits until the "
                                         "daemon picked it up. Exit 0 taken up, 1 refused: no lifecycle "
                                         "section, unknown or revoked device, or no running agent.")
    renew.add_argument("device")
    renew.add_argument("--wait", type=float, default=10.0,
                       help="seconds to wait for the agent to take the request (default 10)")
    add_config_arguments(renew)
    renew.set_defaults(func=_renew)


def _expiring(args: argparse.Namespace) -> int:
    with lifecycle_paths(args).open_inventory(create=False) as inventory:
        rows = inventory.expiring(SystemClock().now(), args.within)
    if args.json:
        for row in rows:
            print(json.dumps(row.as_dict(), sort_keys=True))
        return 0
    if not rows:
        print(f"no certificate expires within {args.within.days} days")
        return 0
    print(f"{'DEVICE':<24} {'DAYS LEFT':>9}  {'EXPIRES (UTC)':<20} {'CERT':<9} {'RENEWAL':<18} SERIAL")
    for row in rows:
        print(f"{row.device_id:<24} {row.days_left:>9}  {row.not_after:%Y-%m-%d %H:%M:%S} "
              f"{row.cert_state.value:<9} {row.renewal.value:<18} {row.serial:x}")
    return 0


def _history(args: argparse.Namespace) -> int:
    with lifecycle_paths(args).open_inventory(create=False) as inventory:
        records = inventory.history(args.device)
    if args.json:
        for t in records:
            print(json.dumps({"device_id": t.device_id, "subject": t.subject,
                              "serial": None if t.serial is None else f"{t.serial:x}",
                              "from": t.from_state, "to": t.to_state, "at": t.at.isoformat(),
                              "cause": t.cause}, sort_keys=True))
        return 0
    if not records:
        print(f"no history for device {args.device}")
        return 0
    for t in records:
        subject = "renewal" if t.serial is None else f"cert {t.serial:x}"
        print(f"{t.at:%Y-%m-%d %H:%M:%S}  {t.from_state or '(new)':>18} -> {t.to_state:<18} "
              f"{t.cause:<32} {subject}")
    return 0


def _renew(args: argparse.Namespace) -> int:
    from gateway_agent.agent_session import request_renewal
    from gateway_agent.settings import load_agent_settings

    config = resolve_config(args.config, CONFIG_NAME)
    settings = load_agent_settings(config)
    if settings.lifecycle is None:
        print(f"error: {config} has no 'lifecycle' section, so no agent renews certificates", file=sys.stderr)
        return 1
    with open_inventory(str(args.db or settings.lifecycle.inventory), create=False) as inventory:
        device = inventory.get(args.device)
    if device is None:
        print(f"error: device {args.device} is not in the inventory; see `gateway-agent devices list`",
              file=sys.stderr)
        return 1
    if device.current.state is CertState.REVOKED:
        print(f"error: device {args.device} is revoked; a revoked device is never renewed "
              f"(re-enrol it on purpose: `gateway-agent devices add|enroll ... --reinstate`)", file=sys.stderr)
        return 1
    path = request_renewal(settings.lifecycle, args.device)
    deadline = time.monotonic() + args.wait
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if path.exists():
        path.unlink(missing_ok=True)
        print(f"error: no running agent took the request within {args.wait:g} s; is `gateway-agent run` "
              f"running with {config}?", file=sys.stderr)
        return 1
    print(f"renewal of {args.device} taken up by the agent; follow it with "
          f"`gateway-agent certs history {args.device}`")
    return 0
