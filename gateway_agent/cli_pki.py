"""``gateway-agent pki``: the development PKI, certificate pins, revocation.

``pki revoke`` takes a device or a serial::

    gateway-agent pki revoke device-003 --reason key_compromise     # every certificate it may use
    gateway-agent pki revoke device-003 --all                       # every unexpired certificate of it
    gateway-agent pki revoke 0x4f1c... --reason superseded          # one serial

A device's certificates are the inventory's (``-c`` config): the current one, plus an
issued candidate or the old one still pinned in a renewal's overlap. Without an inventory
the CA cannot tell which one is in use, so every unexpired certificate it issued for the
device is revoked (fail closed). Revoking a device blocks it at the CA: nothing more is
issued for it until it is re-enrolled (``gateway-agent devices enroll --reinstate``). The
inventory learns the revocation at once, and the registry (``-c``, ``--registry``) is
rewritten from it, so the broker drops the device's pins on its next reload. Publish with
``gateway-agent pki crl``.

Exit codes: 0 done, 1 refused (unknown device or serial), 2 usage error.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_core.errors import ConfigError
from edge_core.identity import spki_pin
from edge_core.lifecycle import DeviceLifecycle
from edge_core.registry import parse_registry
from gateway_agent.cli_lifecycle_config import LifecyclePaths, add_config_arguments, lifecycle_paths
from gateway_agent.crl_issue import (
    REVOCATION_REASONS,
    RevocationStore,
    RevokedEntry,
    crl_path,
    issue_crl,
    revoke,
    revoke_device,
)
from gateway_agent.inventory import Inventory, apply_revocations, unlisted_revocations, write_registry
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
    rev = verbs.add_parser("revoke", help="revoke a device (every certificate it may use, or --all) or a serial",
                           description="TARGET is a device id or a serial (decimal or 0x hex).")
    rev.add_argument("target", help="device id or serial number (decimal or 0x hex)")
    rev.add_argument("--all", action="store_true", dest="all_certs",
                     help="a device: every unexpired certificate the CA issued for it")
    rev.add_argument("--serial", action="store_true", help="TARGET is a serial even if a device has that name")
    rev.add_argument("--reason", default="key_compromise", choices=REVOCATION_REASONS)
    add_config_arguments(rev, ca=True, registry=True)
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


def _held_serials(device: DeviceLifecycle) -> list[int]:
    """Every certificate of the device the broker may still admit: current, candidate, retiring."""
    return [c.serial for c in (device.current, device.candidate, device.retiring) if c is not None]


def _settle(ca: FileCA, inventory: Inventory, devices: list[str], reason: str) -> list[RevokedEntry]:
    """Put on the CA's list every unexpired certificate the inventory now holds REVOKED for
    ``devices`` (a revoked current certificate ends the retiring and candidate ones too)."""
    listed = {e.serial for e in RevocationStore(ca).entries()}
    return [revoke(ca, record.serial, reason, device=record.device_id)
            for record in unlisted_revocations(inventory, listed, now=ca.clock.now(), devices=devices)]


@dataclass(frozen=True)
class Revocation:
    """What ``revoke_target`` did: the CA's entries, the device it blocked, notes for the operator."""

    entries: tuple[RevokedEntry, ...]
    blocked: str | None = None
    notes: tuple[str, ...] = ()


def revoke_target(ca: FileCA, target: str, reason: str, *, inventory: Inventory | None, registry: Path | None,
                  all_certs: bool = False, serial_only: bool = False) -> Revocation:
    """``pki revoke``: a device (blocked at the CA) or a serial, into the CA, the inventory and the registry.

    A device in the inventory: every certificate of it the broker may still admit (current,
    an issued candidate, the old one in a renewal's overlap) goes on the CA's list. Not in
    the inventory (or none given): every unexpired certificate the CA issued for it that is
    not revoked yet (fail closed: the CA cannot tell which one is in use). ``all_certs``:
    every unexpired one. Then the inventory records the revocations, the CA lists every
    certificate the inventory now holds REVOKED, and the registry (when given) is rewritten
    from the inventory at once: the agent's next scan would see nothing new to write.
    """
    notes: list[str] = []
    serial = _serial(target)
    device_id = None if serial_only else target
    held = inventory.get(device_id) if inventory is not None and device_id is not None else None
    known = device_id is not None and (held is not None or bool(ca.certificates_of(device_id)))
    if known and device_id is not None:
        serials = _held_serials(held) if held is not None else None
        entries = revoke_device(ca, device_id, reason, serials=serials, all_certs=all_certs)
        if held is None and not all_certs:
            where = "no inventory" if inventory is None else f"device {device_id} is not in the inventory"
            notes.append(f"{where}: the certificate in use is unknown, so every unexpired certificate "
                         f"the CA issued for {device_id} is revoked")
    elif serial is not None:
        if all_certs:
            raise ConfigError("--all applies to a device, not to a serial")
        entries = (revoke(ca, serial, reason),)
    else:
        raise ConfigError(f"{target!r} is neither a device this CA issued for nor a serial number",
                          hint="check `gateway-agent devices list`, or give the serial (0x hex)")
    if inventory is not None:
        changed = apply_revocations(inventory, {e.serial: e.reason for e in entries}, now=ca.clock.now())
        entries = (*entries, *_settle(ca, inventory, changed, reason))
        if registry is not None and registry.exists():
            base = parse_registry(registry.read_bytes(), source=str(registry))
            write_registry(inventory, base, registry)
            if changed:
                notes.append(f"registry {registry} rewritten from the inventory "
                             f"({', '.join(changed)}: revoked pins dropped)")
        elif changed:
            notes.append("no registry given (-c or --registry): the broker keeps the old pins until "
                         "the agent next writes the registry; the CRL refuses them once published")
    return Revocation(entries, device_id if known else None, tuple(notes))


def _revoke(args: argparse.Namespace) -> int:
    if args.config or not args.ca_dir:
        paths: LifecyclePaths | None = lifecycle_paths(args)
    elif args.db is not None or args.registry is not None:
        paths = LifecyclePaths(None if args.db is None else str(args.db), None, args.registry, "--db/--registry")
    else:
        paths = None  # the CA alone (--ca-dir): no inventory says which certificate is in use
    ca = FileCA(args.ca_dir or (paths.need("ca_dir") if paths else Path("certs-dev")))
    inventory = paths.open_existing_inventory() if paths is not None else None
    try:
        done = revoke_target(ca, args.target, args.reason, inventory=inventory,
                             registry=paths.registry if paths is not None else None,
                             all_certs=args.all_certs, serial_only=args.serial)
    finally:
        if inventory is not None:
            inventory.close()
    for entry in done.entries:
        who = f"device {entry.device} " if entry.device else ""
        print(f"revoked {who}serial {entry.serial:#x} ({entry.reason})")
    if done.blocked is not None:
        print(f"device {done.blocked} is blocked at the CA until re-enrolled")
    for note in done.notes:
        print(note)
    print("publish with `gateway-agent pki crl`")
    return 0
