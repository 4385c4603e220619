"""One truth per device: the CA, the inventory, the registry and the renewal agree.

Each test reproduces one way the parts used to disagree about a device: a revoked device
renewed, a revocation the inventory never heard of, a device added to the registry after
the first start, a fleet mid-rotation that could not be imported, 30-day certificates
EXPIRING from issuance, a forced renewal never retried. Every test with an inventory runs on
both backends (the fixtures of ``tests/agent/conftest.py``: SQLite, PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from structlog.testing import capture_logs

from edge_core.clock import ManualClock
from edge_core.csr import CheckedCsr
from edge_core.errors import CredentialError
from edge_core.identity import spki_pin, spki_pin_of_key
from edge_core.lifecycle import CertRef, CertState, RenewalPolicy, RenewalState, enroll, refresh
from edge_core.registry import DeviceEntry, Registry, dump_registry, parse_registry
from gateway_agent.crl_issue import RevocationStore, revoke
from gateway_agent.inventory import Inventory, apply_revocations, export_registry, import_from_registry
from gateway_agent.pki import FileCA, Issued, init_dev, issue_leaf, new_key
from gateway_agent.renewal import FileCABackend
from tests.agent.conftest import OpenInventory
from tests.agent.test_renewal import DAY, T0, World, make_world


@pytest.fixture(autouse=True)
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as captured:
        yield captured


@pytest.fixture
def world(tmp_path: Path, open_inv: OpenInventory) -> World:
    return make_world(tmp_path, {"pump-1": timedelta(days=200), "pump-2": timedelta(days=200)},
                      inventory=open_inv())


def _ledger_serials(world: World, device_id: str) -> set[int]:
    return {c.serial_number for c in world.ca.certificates_of(device_id)}


async def test_revoked_device_is_not_renewed_even_when_forced(world: World,
                                                              logs: list[MutableMapping[str, Any]]) -> None:
    """``pki revoke pump-1`` then ``certs renew pump-1`` used to issue a fresh certificate."""
    current = world.inventory.get("pump-1")
    assert current is not None
    world.ca.record_issued(world.channel.devices["pump-1"].cert)
    revoke(world.ca, "pump-1", "key_compromise")
    before = _ledger_serials(world, "pump-1")
    outcome = await world.orchestrator.renew("pump-1", ignore_backoff=True, force=True)
    assert outcome.result == "refused" and outcome.detail == "device_revoked"
    assert _ledger_serials(world, "pump-1") == before, "the CA issued for a revoked device"
    assert world.channel.calls["request_csr"] == 0
    device = world.inventory.get("pump-1")
    assert device is not None and device.current.state is CertState.REVOKED
    assert [r.device_id for r in world.inventory.expiring(world.clock.now(), timedelta(days=400))] == ["pump-2"]
    refused = [e for e in logs if e["event"] == "renewal.refused"]
    assert refused and refused[0]["reason"] == "device_revoked"
    assert not world.registry().devices["pump-1"].enabled


async def test_daily_scan_feeds_ca_revocations_into_the_inventory(world: World) -> None:
    """A serial revoked at the CA (``pki revoke <serial>``) is REVOKED in the inventory by the next scan."""
    serial = world.channel.devices["pump-2"].cert.serial_number
    revoke(world.ca, serial, "key_compromise")
    world.clock.advance(DAY)
    await world.orchestrator.daily_scan()
    device = world.inventory.get("pump-2")
    assert device is not None and device.current.state is CertState.REVOKED
    assert "pump-2" not in {r.device_id for r in world.inventory.expiring(world.clock.now(), timedelta(days=400))}


async def test_ca_backend_refuses_revoked_unknown_and_disabled_devices(tmp_path: Path) -> None:
    ca = init_dev(tmp_path / "pki", device_ids=["pump-1", "pump-2", "pump-3"])
    registry = parse_registry(ca.registry_path.read_bytes())
    devices = dict(registry.devices)
    devices["pump-3"] = DeviceEntry("pump-3", devices["pump-3"].pins, devices["pump-3"].roles, enabled=False)
    ca.registry_path.write_text(dump_registry(Registry(devices)))
    backend = FileCABackend(ca, clock=ca.clock, registry=ca.registry_path)
    revoke(ca, "pump-1", "key_compromise")
    key = new_key().public_key()
    for device_id, reason in (("pump-1", "device_revoked"), ("ghost", "device_unknown"),
                              ("pump-3", "device_disabled")):
        with pytest.raises(CredentialError) as info:
            await backend.issue(CheckedCsr(device_id, key, spki_pin_of_key(key)), device_id, timedelta(days=30))
        assert info.value.reason == reason
    issued = await backend.issue(CheckedCsr("pump-2", key, spki_pin_of_key(key)), "pump-2", timedelta(days=30))
    assert issued.ref.serial in {c.serial_number for c in ca.certificates_of("pump-2")}


def test_device_added_to_the_registry_later_is_enrolled_by_reconcile(tmp_path: Path, inv: Inventory) -> None:
    ca = init_dev(tmp_path / "pki", device_ids=["pump-1"])
    first = import_from_registry(inv, ca.registry_path, ca.issued_dir, now=ca.clock.now())
    assert first.enrolled == ("pump-1",)
    late = ca.issue_device("pump-9")
    registry = parse_registry(ca.registry_path.read_bytes())
    devices = dict(registry.devices)
    devices["pump-9"] = DeviceEntry("pump-9", (late.pin,), frozenset({"sensor"}))
    ca.registry_path.write_text(dump_registry(Registry(devices)))
    again = import_from_registry(inv, ca.registry_path, ca.issued_dir, now=ca.clock.now())
    assert again.enrolled == ("pump-9",)
    rows = inv.expiring(ca.clock.now(), timedelta(days=31))
    assert {r.device_id for r in rows} == {"pump-1", "pump-9"}


def _mid_rotation(tmp_path: Path, device_ids: list[str]) -> tuple[FileCA, x509.Certificate, Issued]:
    """A dev PKI where pump-1 holds two registered certificates, 20 days apart."""
    clock = ManualClock(T0)
    ca = init_dev(tmp_path / "pki", device_ids=device_ids, clock=clock)
    older = ca.certificates_of("pump-1")[-1]
    clock.advance(timedelta(days=20))
    newer = ca.issue_device("pump-1", write=False)
    devices = dict(parse_registry(ca.registry_path.read_bytes()).devices)
    devices["pump-1"] = DeviceEntry("pump-1", (spki_pin(older), newer.pin), frozenset({"sensor"}))
    ca.registry_path.write_text(dump_registry(Registry(devices)))
    return ca, older, newer


def test_fleet_mid_rotation_imports_with_both_pins_kept(tmp_path: Path, inv: Inventory) -> None:
    """Two certificates of one device (mid-rotation) used to fail the import as "already in the
    inventory", and the agent's first registry write dropped the older pin."""
    ca, older, newer = _mid_rotation(tmp_path, ["pump-1", "pump-2"])
    base = parse_registry(ca.registry_path.read_bytes())
    report = import_from_registry(inv, ca.registry_path, ca.issued_dir, now=ca.clock.now())
    assert set(report.enrolled) == {"pump-1", "pump-2"}
    device = inv.get("pump-1")
    assert device is not None
    assert device.current.serial == newer.cert.serial_number
    assert device.retiring is not None and device.retiring.serial == older.serial_number
    assert device.renewal is RenewalState.OVERLAP
    assert set(export_registry(inv, base).devices["pump-1"].pins) == {spki_pin(older), newer.pin}


def test_thirty_day_certificates_are_not_expiring_from_issuance() -> None:
    policy = RenewalPolicy()
    key = new_key()
    from gateway_agent.pki import new_intermediate, new_root

    ca = new_intermediate(new_root("R", T0), "I", T0)
    cert = issue_leaf(ca, identity="pump-1", now=T0, lifetime=timedelta(days=30), public_key=key.public_key(),
                      not_before=T0).cert
    device = enroll("pump-1", CertRef.from_certificate(cert, CertState.ACTIVE), now=T0, cause="t").after
    assert not refresh(device, now=T0 + timedelta(hours=1), policy=policy).transitions
    assert not refresh(device, now=T0 + timedelta(days=19), policy=policy).transitions
    late = refresh(device, now=T0 + timedelta(days=21), policy=policy)
    assert late.after.current.state is CertState.EXPIRING


async def test_forced_renewal_that_fails_is_retried_with_backoff(world: World) -> None:
    """``certs renew`` while the device is away: the renewal used to be dropped after one failure."""
    world.channel.devices["pump-1"].online = False
    first = await world.orchestrator.renew("pump-1", ignore_backoff=True, force=True)
    assert first.result == "failed"
    device = world.inventory.get("pump-1")
    assert device is not None and device.forced and device.next_attempt_at is not None
    world.channel.devices["pump-1"].online = True
    world.clock.advance(timedelta(hours=2))  # past the first backoff (30 min +/- 25 %)
    report = await world.orchestrator.daily_scan()
    assert [o.result for o in report.outcomes if o.device_id == "pump-1"] == ["switched"]
    device = world.inventory.get("pump-1")
    assert device is not None and not device.forced


def test_revocation_of_a_retiring_certificate_ends_the_overlap(tmp_path: Path, inv: Inventory) -> None:
    ca, older, newer = _mid_rotation(tmp_path, ["pump-1"])
    import_from_registry(inv, ca.registry_path, ca.issued_dir, now=ca.clock.now())
    changed = apply_revocations(inv, {older.serial_number: "key_compromise"}, now=ca.clock.now())
    assert changed == ["pump-1"]
    device = inv.get("pump-1")
    assert device is not None and device.retiring is None and device.renewal is RenewalState.IDLE
    assert device.current.state is CertState.ACTIVE
    assert device.pins() == (newer.pin,)


async def test_an_accepted_crl_feeds_the_inventory(world: World) -> None:
    """The inventory learns revocations from every accepted CRL too (a CA it does not run itself)."""
    from edge_core.crl import RevokedSerials

    serial = world.channel.devices["pump-2"].cert.serial_number
    changed = await world.orchestrator.sync_revocations(world.clock.now(), RevokedSerials([serial, 12345]))
    assert changed == ["pump-2"]
    device = world.inventory.get("pump-2")
    assert device is not None and device.current.state is CertState.REVOKED
    history = world.inventory.history("pump-2")
    assert history[-1].cause == "ca_revoked:crl"


class _OtherAgentHolds:
    """``RenewalClaims`` where another agent holds some devices (the PostgreSQL claims, in memory)."""

    def __init__(self, elsewhere: set[str]) -> None:
        self.elsewhere = elsewhere
        self.claimed: list[str] = []
        self.mine: set[str] = set()

    def claim(self, device_id: str) -> bool:
        self.claimed.append(device_id)
        if device_id in self.elsewhere:
            return False
        self.mine.add(device_id)
        return True

    def holds(self, device_id: str) -> bool:
        return device_id in self.mine

    def release(self, device_id: str) -> None:
        self.mine.discard(device_id)


async def test_forced_retries_online_trigger_and_reconciled_devices_take_the_claim_first(
        tmp_path: Path, open_inv: OpenInventory) -> None:
    """The paths that start renewals (a forced retry, a device coming online, the scan over
    devices reconciliation enrolled) never touch a device another agent is renewing."""
    world = make_world(tmp_path, {"pump-1": timedelta(days=200), "pump-2": timedelta(days=20)},
                       inventory=open_inv())
    try:
        world.channel.devices["pump-1"].online = False
        first = await world.orchestrator.renew("pump-1", ignore_backoff=True, force=True)
        assert first.result == "failed"
        world.channel.devices["pump-1"].online = True
        claims = _OtherAgentHolds({"pump-1", "pump-2"})
        world.orchestrator.claims = claims
        world.clock.advance(timedelta(hours=2))  # past the forced retry's backoff
        asked = world.channel.calls["request_csr"]

        assert [o.result for o in await world.orchestrator.retry_forced()] == ["busy"]
        online = await world.orchestrator.device_online("pump-2")
        assert online is not None and online.result == "busy"
        report = await world.orchestrator.daily_scan()
        assert {o.device_id: o.result for o in report.outcomes} == {"pump-1": "busy", "pump-2": "busy"}
        assert world.channel.calls["request_csr"] == asked, "a device held by another agent was asked for a CSR"
        assert claims.claimed.count("pump-1") == 2 and claims.claimed.count("pump-2") == 2
        device = world.inventory.get("pump-1")
        assert device is not None and device.forced and device.renewal is RenewalState.FAILED  # untouched

        claims.elsewhere.clear()  # the other agent finished: the retry goes ahead, under our claim
        assert [o.result for o in await world.orchestrator.retry_forced()] == ["switched"]
        assert claims.mine == set(), "the claim is released when the renewal ends"
    finally:
        world.inventory.close()


async def test_the_online_trigger_is_wired_only_while_the_runner_leads(tmp_path: Path, inv_url: str) -> None:
    """A device's online announcement starts a renewal through the leading orchestrator only: once
    the lifecycle stops leading (leadership lost, shutdown), the channel forgets the callback."""
    import asyncio
    from typing import cast

    import aiomqtt

    from edge_core.events import SecurityEvents
    from gateway_agent.agent_session import LifecycleRunner
    from gateway_agent.rotation_channel import MqttDeviceChannel
    from gateway_agent.settings import LifecycleSettings

    ca = init_dev(tmp_path / "pki", device_ids=["pump-1"])
    settings = LifecycleSettings(inventory=inv_url, ca_dir=ca.dir,
                                 registry=ca.registry_path, policy=RenewalPolicy(), spool_dir=tmp_path / "spool")
    runner = LifecycleRunner(settings, clock=ManualClock(T0), events=SecurityEvents("test.online"),
                             broker_status_url=None)
    try:
        channel = MqttDeviceChannel(cast(aiomqtt.Client, object()))
        leading = asyncio.create_task(runner.run(channel))
        for _ in range(200):
            if channel.on_online is not None or leading.done():
                break
            await asyncio.sleep(0.01)
        assert channel.on_online is not None, "the leading runner listens to devices coming online"
        leading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leading
        assert channel.on_online is None, "a runner that stopped leading still starts renewals"
        leaders = [t for t in asyncio.all_tasks() if t.get_name() == "lifecycle-leader"]
        assert leaders == [], "the leader outlived its runner: it still scans and answers devices coming online"
    finally:
        runner.inventory.close()


async def test_a_device_revoked_at_the_ca_mid_overlap_loses_its_old_certificate_at_the_ca_too(
        tmp_path: Path, open_inv: OpenInventory, logs: list[MutableMapping[str, Any]]) -> None:
    """The CA revokes a device's current certificate (by serial, as an outside CA would) while
    its old one is still in the renewal's overlap: the inventory revokes both, and the next scan
    puts the old one on the CA's list too, so the CRL the brokers and the MCU validation service
    read agrees with the inventory."""
    world = make_world(tmp_path, {"pump-1": 30 * DAY}, inventory=open_inv())
    await world.orchestrator.daily_scan()  # due: renewed, the old certificate retires for 7 days
    device = world.inventory.get("pump-1")
    assert device is not None and device.retiring is not None
    old, current = device.retiring.serial, device.current.serial
    revoke(world.ca, current, "key_compromise")
    world.clock.advance(timedelta(hours=1))
    await world.orchestrator.daily_scan()
    on_the_ca = {e.serial: e.reason for e in RevocationStore(world.ca).entries()}
    assert on_the_ca.get(old) == "key_compromise" and on_the_ca.get(current) == "key_compromise"
    extra = [e for e in logs if e["event"] == "cert.revoked" and e.get("reason") == "inventory_revoked"]
    assert [e["serial"] for e in extra] == [f"{old:x}"]
    await world.orchestrator.daily_scan()  # nothing left to add: said once
    assert len([e for e in logs if e.get("reason") == "inventory_revoked"]) == 1
