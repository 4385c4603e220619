"""``gateway-agent devices``: onboarding as ops do it - one command keeps CA, registry and inventory in step.

::

    gateway-agent devices add pump-42 --role pump --attr site=plant-a      # key + certificate from the CA
    gateway-agent devices enroll pump-43 --csr pump-43.csr --role pump     # the device made its own key
    gateway-agent devices import certs/*.crt --role sensor                 # existing certificates, several each
    gateway-agent devices list
    gateway-agent devices show pump-42
    gateway-agent devices disable pump-42

Every verb reads ``-c/--config`` (``--db``, ``--ca-dir``, ``--registry`` override). Each
change writes the registry round-trip (admins' comments stay), enrols the certificate in
the inventory (so ``certs expiring`` lists it from the first minute) and prints the pins.
A device revoked at the CA or disabled in the registry is re-enrolled only with ``--reinstate``.

Exit codes: 0 done, 1 refused (the message says why), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edge_core.csr import check_csr
from edge_core.errors import ConfigError, CredentialError
from edge_core.files import atomic_write_bytes, atomic_write_text
from edge_core.identity import IdentityPolicy, spki_pin
from edge_core.lifecycle import CertRef, CertState, enroll
from edge_core.registry import MAX_ACTIVE_PINS, DeviceEntry, Registry, parse_registry
from edge_core.registry_edit import apply_entries
from gateway_agent.cli_lifecycle_config import add_config_arguments, lifecycle_paths
from gateway_agent.crl_issue import RevocationStore
from gateway_agent.inventory import import_from_registry
from gateway_agent.pki import FileCA, Issued, cert_pem

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    devices = sub.add_parser("devices", help="device onboarding: add, enroll, import, list, show, disable")
    verbs = devices.add_subparsers(dest="verb", required=True)

    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = verbs.add_parser(name, help=help_text)
        add_config_arguments(parser, ca=True, registry=True)
        return parser

    def profile(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--role", action="append", dest="roles", default=[], help="ACL role (repeatable)")
        parser.add_argument("--attr", action="append", dest="attrs", default=[], metavar="KEY=VALUE",
                            help="attribute bound into ACL filters, like site=plant-a (repeatable)")

    add = verb("add", "issue a key and certificate for a new device and register it")
    add.add_argument("device")
    profile(add)
    add.add_argument("--days", type=int, default=30, help="certificate lifetime in days (default 30)")
    add.add_argument("--out", type=Path, default=None, help="where to write <id>.crt/.key (default <ca>/devices)")
    add.add_argument("--reinstate", action="store_true", help="re-enrol a device revoked at the CA or disabled")
    add.set_defaults(func=_add)
    enr = verb("enroll", "certify a device's own key from its CSR and register it")
    enr.add_argument("device")
    enr.add_argument("--csr", type=Path, required=True, help="PEM CSR naming urn:device:<id>")
    profile(enr)
    enr.add_argument("--days", type=int, default=30)
    enr.add_argument("--out", type=Path, default=None, help="certificate file (default <ca>/issued/<id>.crt)")
    enr.add_argument("--reinstate", action="store_true", help="re-enrol a device revoked at the CA or disabled")
    enr.set_defaults(func=_enroll)
    imp = verb("import", "register existing device certificates (several per device: mid-rotation)")
    imp.add_argument("certs", nargs="+", type=Path)
    profile(imp)
    imp.set_defaults(func=_import)
    lst = verb("list", "every registry device with its certificate state")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_list)
    show = verb("show", "one device: registry entry, pins, certificates, recent history")
    show.add_argument("device")
    show.set_defaults(func=_show)
    dis = verb("disable", "refuse a device at the broker and at the CA, keeping its entry")
    dis.add_argument("device")
    dis.set_defaults(func=_disable)


# --------------------------------------------------------------------------- plumbing


class _Context:
    def __init__(self, args: argparse.Namespace) -> None:
        paths = lifecycle_paths(args)
        self.registry_path = paths.need("registry")
        self.ca = FileCA(paths.need("ca_dir"), registry=self.registry_path)
        self.inventory = paths.open_inventory()

    def registry(self) -> Registry:
        return parse_registry(self.registry_path.read_bytes(), source=str(self.registry_path))

    def write(self, entries: dict[str, DeviceEntry]) -> None:
        text = self.registry_path.read_text("utf-8") if self.registry_path.exists() else ""
        atomic_write_text(self.registry_path, apply_entries(text, entries, source=str(self.registry_path)))

    def close(self) -> None:
        self.inventory.close()


def _profile(args: argparse.Namespace, device_id: str, pins: tuple[str, ...],
             base: DeviceEntry | None) -> DeviceEntry:
    attrs: dict[str, str] = dict(base.attributes) if base else {}
    for item in args.attrs:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"--attr {item!r} must be KEY=VALUE")
        attrs[key] = value
    roles = frozenset(args.roles) or (base.roles if base else frozenset())
    try:
        return DeviceEntry(device_id, pins, roles, attrs, enabled=True)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _reinstate(ctx: _Context, device_id: str, allowed: bool) -> None:
    """A device revoked at the CA is re-enrolled only on purpose (``--reinstate``)."""
    if allowed or device_id not in RevocationStore(ctx.ca).revoked_devices():
        return
    raise CredentialError("device_revoked", f"device {device_id} was revoked at the CA",
                          hint="pass --reinstate to re-enrol it on purpose")


def _enrol(ctx: _Context, device_id: str, cert: x509.Certificate, entry: DeviceEntry) -> None:
    """Registry first (the broker then admits the pin), then the inventory (a fresh device row)."""
    ctx.write({device_id: entry})
    existing = ctx.inventory.get(device_id)
    ref = CertRef.from_certificate(cert, CertState.ACTIVE)
    now = ctx.ca.clock.now()
    if existing is None:
        ctx.inventory.apply(enroll(device_id, ref, now=now, cause="devices:enrolled"))
    elif existing.current.state is CertState.REVOKED or existing.current.serial != ref.serial:
        # A re-enrolled device starts a new life: the old row keeps its history.
        from edge_core.lifecycle import Step, Transition

        after = replace(enroll(device_id, ref, now=now, cause="devices:re-enrolled").after,
                        version=existing.version)
        record = Transition(device_id, "cert", ref.serial, None, ref.state.value, now, "devices:re-enrolled")
        ctx.inventory.apply(Step(existing, after, (record,)))


def _print_pins(device_id: str, pins: tuple[str, ...]) -> None:
    for pin in pins:
        print(f"  pin {device_id}: {pin}")


# --------------------------------------------------------------------------- verbs


def _add(args: argparse.Namespace) -> int:
    ctx = _Context(args)
    try:
        _reinstate(ctx, args.device, args.reinstate)
        base = ctx.registry().get(args.device)
        issued: Issued = ctx.ca.issue_device(args.device, lifetime=timedelta(days=args.days), write=args.out is None,
                                             reinstate=args.reinstate)
        if args.out is not None:
            assert issued.key is not None
            atomic_write_bytes(args.out / f"{args.device}.key", issued.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
                mode=0o600)
            atomic_write_bytes(args.out / f"{args.device}.crt", cert_pem(issued.cert))
        entry = _profile(args, args.device, (issued.pin,), base)
        _enrol(ctx, args.device, issued.cert, entry)
    finally:
        ctx.close()
    where = args.out or ctx.ca.dir / "devices"
    print(f"device {args.device} added: certificate {issued.cert.serial_number:x} in {where}, "
          f"valid until {issued.cert.not_valid_after_utc:%Y-%m-%d}")
    _print_pins(args.device, (issued.pin,))
    return 0


def _enroll(args: argparse.Namespace) -> int:
    ctx = _Context(args)
    try:
        _reinstate(ctx, args.device, args.reinstate)
        checked = check_csr(args.csr.read_bytes(), args.device, IdentityPolicy())
        issued = ctx.ca.issue_device(args.device, lifetime=timedelta(days=args.days), write=False,
                                     public_key=checked.public_key, reinstate=args.reinstate)
        out = args.out or ctx.ca.issued_dir / f"{args.device}.crt"
        atomic_write_bytes(out, cert_pem(issued.cert))
        entry = _profile(args, args.device, (issued.pin,), ctx.registry().get(args.device))
        _enrol(ctx, args.device, issued.cert, entry)
    finally:
        ctx.close()
    print(f"device {args.device} enrolled from {args.csr}: certificate {issued.cert.serial_number:x} in {out}")
    _print_pins(args.device, (issued.pin,))
    return 0


def _import(args: argparse.Namespace) -> int:
    ctx = _Context(args)
    policy = IdentityPolicy()
    try:
        registry = ctx.registry()
        found: dict[str, list[x509.Certificate]] = {}
        for path in args.certs:
            try:
                cert = x509.load_pem_x509_certificate(path.read_bytes())
                found.setdefault(policy.extract(cert), []).append(cert)
            except (ValueError, CredentialError) as exc:
                raise ConfigError(f"{path}: not a device certificate: {exc}") from exc
        entries: dict[str, DeviceEntry] = {}
        for device_id, certs in sorted(found.items()):
            certs.sort(key=lambda c: c.not_valid_before_utc, reverse=True)
            pins = tuple(dict.fromkeys(spki_pin(c) for c in certs))[:MAX_ACTIVE_PINS]
            entries[device_id] = _profile(args, device_id, pins, registry.get(device_id))
            for cert in certs:
                ctx.ca.record_issued(cert)  # the ledger knows them: `pki revoke <device>` finds them
        ctx.write(entries)
        report = import_from_registry(ctx.inventory, ctx.registry_path, ctx.ca.issued_dir, now=ctx.ca.clock.now())
    finally:
        ctx.close()
    for device_id, entry in entries.items():
        state = "enrolled" if device_id in report.enrolled else "already in the inventory"
        print(f"device {device_id}: {len(entry.pins)} certificate(s), {state}")
        _print_pins(device_id, entry.pins)
    return 0


def _list(args: argparse.Namespace) -> int:
    ctx = _Context(args)
    try:
        registry = ctx.registry()
        rows = []
        for device_id in sorted(registry.devices):
            entry = registry.devices[device_id]
            device = ctx.inventory.get(device_id)
            rows.append({
                "device_id": device_id, "enabled": entry.enabled, "roles": sorted(entry.roles),
                "pins": len(entry.pins),
                "cert_state": device.current.state.value if device else "not_enrolled",
                "serial": f"{device.current.serial:x}" if device else None,
                "not_after": device.current.not_after.isoformat() if device else None,
                "renewal": device.renewal.value if device else None,
            })
    finally:
        ctx.close()
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return 0
    print(f"{'DEVICE':<24} {'ENABLED':<8} {'CERT':<13} {'EXPIRES (UTC)':<11} {'RENEWAL':<18} ROLES")
    for row in rows:
        expires = str(row["not_after"] or "-")[:10]
        print(f"{row['device_id']:<24} {'yes' if row['enabled'] else 'no':<8} {row['cert_state']:<13} "
              f"{expires:<11} {row['renewal'] or '-':<18} {','.join(row['roles'])}")  # type: ignore[arg-type]
    return 0


def _show(args: argparse.Namespace) -> int:
    ctx = _Context(args)
    try:
        entry = ctx.registry().get(args.device)
        device = ctx.inventory.get(args.device)
        certs = ctx.inventory.certificates(args.device)
        history = ctx.inventory.history(args.device)[-10:]
        blocked = ctx.ca.issuance_refusal(args.device)
    finally:
        ctx.close()
    if entry is None and device is None:
        raise ConfigError(f"device {args.device} is neither in the registry nor in the inventory")
    print(f"device {args.device}")
    if entry is not None:
        print(f"  registry: enabled={entry.enabled} roles={','.join(sorted(entry.roles)) or '-'} "
              f"attributes={dict(entry.attributes)}")
        _print_pins(args.device, entry.pins)
    else:
        print("  registry: not listed (the broker refuses it)")
    if blocked is not None:
        print(f"  CA: {blocked}")
    if device is not None:
        print(f"  inventory: current {device.current.serial:x} {device.current.state.value} until "
              f"{device.current.not_after:%Y-%m-%d}, renewal {device.renewal.value}")
    for record in certs:
        print(f"  certificate {record.serial:x}: {record.state.value}, {record.not_before:%Y-%m-%d} .. "
              f"{record.not_after:%Y-%m-%d}")
    for t in history:
        print(f"  {t.at:%Y-%m-%d %H:%M}  {t.subject} {t.from_state or '(new)'} -> {t.to_state}  {t.cause}")
    return 0


def _disable(args: argparse.Namespace) -> int:
    ctx = _Context(args)
    try:
        entry = ctx.registry().get(args.device)
        if entry is None:
            raise ConfigError(f"device {args.device} is not in the registry {ctx.registry_path}")
        ctx.write({args.device: replace(entry, enabled=False)})
    finally:
        ctx.close()
    print(f"device {args.device} disabled: the broker refuses it and the CA issues nothing for it")
    return 0
