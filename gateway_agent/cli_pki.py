"""``gateway-agent pki``: the development PKI, certificate pins, revocation.

``pki revoke`` takes a device or a serial::

    gateway-agent pki revoke device-003 --reason key_compromise     # the certificate it uses now
    gateway-agent pki revoke device-003 --all                       # every unexpired certificate of it
    gateway-agent pki revoke 0x4f1c... --reason superseded          # one serial

A device's current certificate is the inventory's (``-c`` config), else the newest the CA
issued for it. Revoking a device blocks it at the CA: nothing more is issued for it
until it is re-enrolled (``gateway-agent devices enroll --reinstate``). The inventory
learns the revocation at once. Publish with ``gateway-agent pki crl``.

Exit codes: 0 done, 1 refused (unknown device or serial), 2 usage error.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edge_core.errors import ConfigError
from edge_core.identity import spki_pin
from gateway_agent.cli_lifecycle_config import LifecyclePaths, add_config_arguments, lifecycle_paths
from gateway_agent.crl_issue import REVOCATION_REASONS, crl_path, issue_crl, revoke, revoke_device
from gateway_agent.inventory import apply_revocations
from gateway_agent.pki import FileCA, init_dev, load_cert
from gateway_agent.validation_service import make_validation_key


def add_parser(sub: Any) -> None:
    pki = sub.add_parser("pki", help="development PKI: create, inspect")
    verbs = pki.add_subparsers(dest="verb", required=True)
    init = verbs.add_parser("init-dev", help="create a dev root CA, issuing CA, broker cert, device certs, registry")
    init.add_argument("--out", type=Path, default=Path("certs-dev"))
    init.add_argument("--devices", type=int, default=3, help="number of device certificates (default 3)")
    init.add_argument("--device-id", action="append", dest="device_ids",
                      help="explicit device id (repeatable); overrides --devices")
    init.add_argument("--force", action="store_true", help="replace an existing CA in --out")
    init.set_defaults(func=_init_dev)
    pin = verbs.add_parser("pin", help="print the SPKI SHA-256 pin of a PEM certificate")
    pin.add_argument("cert", type=Path)
    pin.set_defaults(func=_pin)
    rev = verbs.add_parser("revoke", help="revoke a device (its current certificate, or --all) or a serial",
                           description="TARGET is a device id or a serial (decimal or 0x hex).")
    rev.add_argument("target", help="device id or serial number (decimal or 0x hex)")
    rev.add_argument("--all", action="store_true", dest="all_certs",
                     help="a device: every unexpired certificate, not only the current one")
    rev.add_argument("--serial", action="store_true", help="TARGET is a serial even if a device has that name")
    rev.add_argument("--reason", default="key_compromise", choices=REVOCATION_REASONS)
    add_config_arguments(rev, ca=True)
    rev.set_defaults(func=_revoke)
    from gateway_agent.cli_crl import add_pki_verbs

    add_pki_verbs(verbs)


def _init_dev(args: argparse.Namespace) -> int:
    ca = init_dev(args.out, devices=args.devices, device_ids=args.device_ids, force=args.force)
    issue_crl(ca)
    validation = make_validation_key(ca.dir / "agent", force=True)
    print(f"dev PKI written to {ca.dir}")
    print(f"  trust bundle: {ca.chain_path}")
    print(f"  registry:     {ca.registry_path}")
    print(f"  first CRL:    {crl_path(ca)}")
    print(f"  validation key (gateway answers for MCUs): {validation.public} (kid {validation.kid})")
    for crt in sorted((ca.dir / "devices").glob("*.crt")):
        print(f"  device {crt.stem}: {spki_pin(load_cert(crt))}")
    return 0


def _pin(args: argparse.Namespace) -> int:
    print(spki_pin(load_cert(args.cert)))
    return 0


def _serial(text: str) -> int | None:
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        return None


def _revoke(args: argparse.Namespace) -> int:
    paths = lifecycle_paths(args) if args.config or not args.ca_dir else None
    ca = FileCA(args.ca_dir or (paths.need("ca_dir") if paths else Path("certs-dev")))
    if paths is None and args.db is not None:
        paths = LifecyclePaths(str(args.db), None, None, "--db")
    inventory = paths.open_existing_inventory() if paths is not None else None
    try:
        serial = _serial(args.target)
        device_id = None if args.serial else args.target
        known = device_id is not None and (ca.certificates_of(device_id) or
                                           (inventory is not None and inventory.get(device_id) is not None))
        if known and device_id is not None:
            current = inventory.get(device_id) if inventory is not None else None
            entries = revoke_device(ca, device_id, args.reason, all_certs=args.all_certs,
                                    serial=None if args.all_certs or current is None else current.current.serial)
        elif serial is not None:
            if args.all_certs:
                raise ConfigError("--all applies to a device, not to a serial")
            entries = (revoke(ca, serial, args.reason),)
        else:
            raise ConfigError(f"{args.target!r} is neither a device this CA issued for nor a serial number",
                              hint="check `gateway-agent devices list`, or give the serial (0x hex)")
        if inventory is not None:
            apply_revocations(inventory, {e.serial: e.reason for e in entries}, now=ca.clock.now())
    finally:
        if inventory is not None:
            inventory.close()
    for entry in entries:
        who = f"device {entry.device} " if entry.device else ""
        print(f"revoked {who}serial {entry.serial:#x} ({entry.reason})")
    if known:
        print(f"device {args.target} is blocked at the CA until re-enrolled")
    print("publish with `gateway-agent pki crl`")
    return 0
