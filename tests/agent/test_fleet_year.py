"""A simulated year of a fleet: the CA, the inventory, the registry and the agent agree every day.

The clock is injected (no sleeping). Over 365 days: devices added to the registry late,
devices revoked at the CA (by device, by an operator in a renewal's overlap, by serial),
devices offline for weeks, renewals whose test fails. Checked after every revocation and
every daily scan:

- no certificate of a revoked device is ever admitted by what the broker reads (the
  registry file the agent and ``pki revoke`` write, and the CRL the CA publishes), and no
  revoked device is re-certified (the CA's ledger gains no certificate for it);
- no registry device that may connect is absent from ``certs expiring``;
- no device expires unnoticed: every certificate that expires raised an alarm first.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, MutableMapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from structlog.testing import capture_logs

from edge_core.admission import AdmissionRefused, RevocationView, admit, session_verdict
from edge_core.chain import TrustStore
from edge_core.clock import ManualClock
from edge_core.crl_freshness import StalenessPolicy
from edge_core.crl_trust import accept_crl
from edge_core.identity import IdentityPolicy
from edge_core.lifecycle import CertState, RenewalPolicy, RenewalState
from edge_core.registry import DeviceEntry, Registry, parse_registry
from edge_core.registry_edit import apply_entries
from edge_core.revocation import RevocationIndex
from gateway_agent.cli_pki import revoke_target
from gateway_agent.crl_issue import RevocationStore, issue_crl, revoke
from gateway_agent.inventory import Reconciler, SqliteInventory, export_registry, write_registry
from gateway_agent.pki import FileCA, init_dev, load_cert, new_key
from gateway_agent.renewal import FileCABackend, RenewalOrchestrator
from tests.agent.test_renewal import DAY, T0, FakeDeviceChannel, SimDevice

LIFETIME = timedelta(days=30)


class Fleet:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = ManualClock(T0)
        self.ca: FileCA = init_dev(tmp_path / "pki", devices=0, clock=self.clock)
        self.registry_path = self.ca.registry_path
        self.inventory = SqliteInventory(tmp_path / "inventory.db")
        backend = FileCABackend(self.ca, clock=self.clock, registry=self.registry_path)
        self.channel = FakeDeviceChannel(self.clock, self.ca.issuing().cert, self.pins_of, self.revoked)
        self.orchestrator = RenewalOrchestrator(
            self.inventory, self.channel, backend, clock=self.clock, policy=RenewalPolicy(),
            rand=random.Random(10).random, on_pins_changed=self._pins_changed,
            reconcile=Reconciler(self.inventory, self.registry_path, [self.ca.issued_dir]))
        self.revoked_devices: dict[str, int] = {}  # device -> certificates the CA held for it then
        self._raw, self._parsed = b"", Registry(devices={})
        self._ledger: dict[str, tuple[str, x509.Certificate]] = {}

    def registry(self) -> Registry:
        raw = self.registry_path.read_bytes()
        if raw != self._raw:  # parse once per version of the file: the fake channel asks often
            self._raw, self._parsed = raw, parse_registry(raw)
        return self._parsed

    def pins_of(self, device_id: str) -> tuple[str, ...]:
        entry = export_registry(self.inventory, self.registry()).get(device_id)
        return entry.pins if entry is not None and entry.enabled else ()

    def revoked(self, serial: int) -> bool:
        return serial in {e.serial for e in RevocationStore(self.ca).entries()}

    def _pins_changed(self, _device_id: str) -> None:
        write_registry(self.inventory, self.registry(), self.registry_path)


    def add(self, device_id: str) -> None:
        """An admin adds a device: the CA issues for its key, the registry lists its pin."""
        key = new_key()
        issued = self.ca.issue_device(device_id, lifetime=LIFETIME, write=False, public_key=key.public_key())
        self.channel.devices[device_id] = SimDevice(device_id, key, issued.cert)
        entry = DeviceEntry(device_id, (issued.pin,), frozenset({"sensor"}))
        self.registry_path.write_text(apply_entries(self.registry_path.read_text(), {device_id: entry}))

    def revoke_device(self, device_id: str) -> None:
        """At the CA alone: the agent learns it on its next scan."""
        revoke(self.ca, device_id, "key_compromise")
        self.revoked_devices[device_id] = len(self.ca.certificates_of(device_id))

    def operator_revokes(self, device_id: str) -> None:
        """``pki revoke <device> -c agent.yaml``: the CA, the inventory and the registry at once."""
        revoke_target(self.ca, device_id, "key_compromise", inventory=self.inventory, registry=self.registry_path)
        self.revoked_devices[device_id] = len(self.ca.certificates_of(device_id))

    def broker(self) -> Callable[[x509.Certificate], bool]:
        """The broker's verdict from what it reads now: the registry file and the CA's CRL (``pki crl``)."""
        now = self.clock.now()
        issuing = self.ca.issuing().cert
        update = accept_crl(issue_crl(self.ca), issuers=[issuing], installed=None, now=now)
        view = RevocationView(TrustStore.from_bundle([load_cert(self.ca.dir / "root-ca.crt"), issuing], [issuing]),
                              RevocationIndex().with_update(update), StalenessPolicy(mode="fail_closed"))
        registry = parse_registry(self.registry_path.read_bytes())

        def admits(cert: x509.Certificate) -> bool:
            try:
                admitted = admit(cert_der=cert.public_bytes(serialization.Encoding.DER),
                                 client_id=IdentityPolicy().extract(cert), registry=registry,
                                 policy=IdentityPolicy(), now=now)
            except AdmissionRefused:
                return False
            return session_verdict(admitted, now=now, revocation=view) is None

        return admits

    def issued(self) -> dict[str, list[x509.Certificate]]:
        """The CA's ledger (``issued/``) by device; each file is read once."""
        for path in self.ca.issued_dir.glob("*.crt"):
            if path.name not in self._ledger:
                cert = load_cert(path)
                self._ledger[path.name] = (IdentityPolicy().extract(cert), cert)
        by_device: dict[str, list[x509.Certificate]] = {}
        for device_id, cert in self._ledger.values():
            by_device.setdefault(device_id, []).append(cert)
        return by_device

    def check_no_revoked_admitted(self, day: int) -> None:
        now = self.clock.now()
        admits = self.broker()
        issued = self.issued()
        for device_id in self.revoked_devices:
            for cert in issued[device_id]:
                if cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
                    assert not admits(cert), \
                        f"day {day}: revoked {device_id} is admitted with certificate {cert.serial_number:#x}"
        assert admits(self.channel.devices["dev-00"].cert), f"day {day}: the check admits nobody"


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as captured:
        yield captured


async def test_a_year_of_a_fleet(tmp_path: Path, logs: list[MutableMapping[str, Any]]) -> None:
    fleet = Fleet(tmp_path)
    for n in range(12):
        fleet.add(f"dev-{n:02d}")
    offline = {"dev-03": (20, 80), "dev-04": (100, 104), "dev-05": (150, 300)}  # device: (from day, to day)
    failing_tests = {"dev-06": (30, 45)}
    late = {40: "late-1", 130: "late-2", 250: "late-3"}
    # dev-07: by an operator on the first day from day 60 that finds it in a renewal's overlap
    revocations = {60: ("in_overlap", "dev-07"), 200: ("serial", "dev-08"), 210: ("device", "late-1")}
    pending: list[str] = []
    revoked_in_overlap: list[int] = []
    alarmed: dict[str, list[int]] = {}
    seen = 0
    expired_unnoticed: list[str] = []
    for day in range(1, 366):
        fleet.clock.advance(DAY)
        for device_id, (start, end) in offline.items():
            fleet.channel.devices[device_id].online = not start <= day < end
        for device_id, (start, end) in failing_tests.items():
            fleet.channel.devices[device_id].test_ok = not start <= day < end
        if day in late:
            fleet.add(late[day])
        if day in revocations:
            kind, device_id = revocations[day]
            if kind == "device":
                fleet.revoke_device(device_id)
            elif kind == "in_overlap":
                pending.append(device_id)
            else:
                revoke(fleet.ca, fleet.channel.devices[device_id].cert.serial_number, "key_compromise")
                fleet.revoked_devices[device_id] = len(fleet.ca.certificates_of(device_id))
        for device_id in list(pending):
            state = fleet.inventory.get(device_id)
            if state is not None and state.renewal is RenewalState.OVERLAP:
                fleet.operator_revokes(device_id)
                pending.remove(device_id)
                revoked_in_overlap.append(day)
        fleet.check_no_revoked_admitted(day)  # the broker reloads at once; the CRL is published at once
        for device_id, (_start, end) in offline.items():
            if day == end:  # back online: its connect event
                await fleet.orchestrator.device_online(device_id)
        await fleet.orchestrator.daily_scan()
        now = fleet.clock.now()

        for event in logs[seen:]:
            if event["event"] == "renewal.alarm":
                alarmed.setdefault(event["device"], []).append(day)
        seen = len(logs)

        # 1. no revoked device admitted (re-certification: the CA's ledger only grows, checked at the end)
        fleet.check_no_revoked_admitted(day)
        for device_id in fleet.revoked_devices:
            device = fleet.inventory.get(device_id)
            assert device is not None and device.current.state is CertState.REVOKED
        # 2. every device that may connect is in `certs expiring` (30-day certificates: within 31 days)
        listed = {row.device_id for row in fleet.inventory.expiring(now, timedelta(days=31))}
        for device_id, entry in fleet.registry().devices.items():
            if entry.enabled and device_id in fleet.channel.devices and device_id not in fleet.revoked_devices:
                assert device_id in listed, f"day {day}: {device_id} is absent from certs expiring"
        # 3. no certificate expires without an alarm first
        for device in fleet.inventory.devices():
            if device.current.state is not CertState.REVOKED and now >= device.current.not_after:
                expiry_day = (device.current.not_after - T0) // DAY
                if not any(d <= expiry_day for d in alarmed.get(device.device_id, [])):
                    expired_unnoticed.append(f"{device.device_id} (day {expiry_day})")
    assert not expired_unnoticed, expired_unnoticed

    for device_id, certs_then in fleet.revoked_devices.items():
        assert len(fleet.ca.certificates_of(device_id)) == certs_then, f"{device_id} was re-certified"
    # The year did what it says: late devices enrolled, revocations held, offline devices came back.
    assert {"late-1", "late-2", "late-3"} <= {d.device_id for d in fleet.inventory.devices()}
    assert revoked_in_overlap and not pending, "dev-07 was never found in an overlap"
    assert {"dev-07", "dev-08", "late-1"} <= set(fleet.revoked_devices)
    assert "dev-05" in alarmed, "a device offline for five months raised no alarm"
    back = fleet.inventory.get("dev-04")
    assert back is not None and back.current.state is not CertState.REVOKED
    renewed = sum(len(fleet.ca.certificates_of(f"dev-{n:02d}")) for n in range(12))
    assert renewed > 12 * 10, f"only {renewed} certificates issued in a year of 30-day certificates"
    fleet.inventory.close()
