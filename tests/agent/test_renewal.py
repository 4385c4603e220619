"""The renewal workflow, end to end: simulated devices, real CA issuance, a real inventory, time travel.

``FakeDeviceChannel`` simulates devices faithfully enough to catch outages: each device makes a
real key and CSR, stores the new certificate next to the old one, tests it against a "test
endpoint" that checks the broker registry (exported from the inventory) really pins it, and
only switches when told. The invariant checked at every simulated instant: every device holds a
certificate that is valid now, not revoked, and pinned in the broker registry.

Every test runs on both inventory backends (the ``open_inv`` fixture of ``tests/agent/conftest.py``:
SQLite, PostgreSQL), the year-long fleet of 200 included (about 20 s on SQLite, 25 s on PostgreSQL).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AttributeOID, NameOID
from structlog.testing import capture_logs

from edge_core.clock import ManualClock
from edge_core.errors import FetchError
from edge_core.events import SecurityEvents
from edge_core.identity import spki_pin
from edge_core.lifecycle import CertRef, CertState, DeviceLifecycle, RenewalPolicy, RenewalState, enroll
from edge_core.registry import DeviceEntry, Registry
from gateway_agent.crl_issue import RevocationStore, issue_crl
from gateway_agent.inventory import Inventory, SqliteInventory, export_registry
from gateway_agent.inventory_pg import PostgresInventory
from gateway_agent.pki import FileCA, init_dev, issue_leaf, new_key
from gateway_agent.renewal import FileCABackend, RenewalOrchestrator, TestResult
from tests.agent.conftest import OpenInventory

T0 = datetime(2025, 1, 1, 2, 0, tzinfo=UTC)
DAY = timedelta(days=1)


# --------------------------------------------------------------------------- simulated devices


@dataclass
class SimDevice:
    device_id: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate  # the certificate in use
    stored: list[x509.Certificate] = field(default_factory=list)  # old certificates kept alongside
    pending_key: ec.EllipticCurvePrivateKey | None = None
    candidate: x509.Certificate | None = None
    online: bool = True
    offline_after_csr: bool = False
    test_ok: bool = True
    lose_switch_reports: int = 0
    csr_identity: str | None = None  # lie about the identity in the CSR
    hang: bool = False


class FakeDeviceChannel:
    """In-memory ``DeviceChannel``.

    ``pins_of(device_id)`` is what the broker and the test endpoint accept for a device (the
    tests read it from the exported registry); ``latency`` simulates a round trip in seconds.
    """

    def __init__(self, clock: ManualClock, issuing: x509.Certificate,
                 pins_of: Callable[[str], tuple[str, ...]], revoked: Callable[[int], bool],
                 *, latency: float = 0.0) -> None:
        self.clock = clock
        self.issuing = issuing
        self.pins_of = pins_of
        self.revoked = revoked
        self.latency = latency
        self.devices: dict[str, SimDevice] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls: Counter[str] = Counter()
        self.checks = 0
        self.violations: list[str] = []

    @asynccontextmanager
    async def _session(self, device_id: str, what: str) -> AsyncIterator[SimDevice]:
        device = self.devices[device_id]
        self.calls[what] += 1
        if not device.online:
            raise FetchError("device_offline", f"{device_id} is offline")
        if device.hang:
            await asyncio.Event().wait()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.latency)  # let other renewals interleave, as real I/O would
            yield device
            self.check(device)
        finally:
            self.in_flight -= 1

    def check(self, device: SimDevice, pins: tuple[str, ...] | None = None) -> None:
        """The no-outage invariant for one device, at this instant."""
        self.checks += 1
        now = self.clock.now()
        cert = device.cert
        if pins is None:
            pins = self.pins_of(device.device_id)
        problems = []
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            problems.append("expired")
        if spki_pin(cert) not in pins:
            problems.append("not pinned")
        if self.revoked(cert.serial_number):
            problems.append("revoked")
        if problems:
            self.violations.append(f"{now:%Y-%m-%d} {device.device_id}: {', '.join(problems)}")

    async def request_csr(self, device_id: str, nonce: str) -> bytes:
        async with self._session(device_id, "request_csr") as device:
            device.pending_key = new_key()
            identity = device.csr_identity or device_id
            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"urn:device:{identity}")]), critical=False)
                .add_attribute(AttributeOID.CHALLENGE_PASSWORD, nonce.encode())
                .sign(device.pending_key, hashes.SHA256())
            )
            if device.offline_after_csr:
                device.online = False
            return csr.public_bytes(serialization.Encoding.PEM)

    async def push_certificate(self, device_id: str, cert_pem: bytes, chain_pem: bytes) -> None:
        async with self._session(device_id, "push_certificate") as device:
            cert = x509.load_pem_x509_certificate(cert_pem)
            assert device.pending_key is not None
            assert cert.public_key() == device.pending_key.public_key()
            assert x509.load_pem_x509_certificates(chain_pem)[0] == self.issuing
            device.candidate = cert

    async def request_test(self, device_id: str, serial: int) -> TestResult:
        async with self._session(device_id, "request_test") as device:
            cand = device.candidate
            if cand is None or cand.serial_number != serial:
                return TestResult(False, "no_such_certificate")
            if not device.test_ok:
                return TestResult(False, "tls_handshake_failed")
            cand.verify_directly_issued_by(self.issuing)
            now = self.clock.now()
            if not cand.not_valid_before_utc <= now < cand.not_valid_after_utc:
                return TestResult(False, "not_yet_valid")
            if spki_pin(cand) not in self.pins_of(device_id):
                return TestResult(False, "pin_refused")
            return TestResult(True)

    async def request_switch(self, device_id: str, serial: int) -> int:
        async with self._session(device_id, "request_switch") as device:
            if device.candidate is not None and device.candidate.serial_number == serial:
                assert device.pending_key is not None
                device.stored.append(device.cert)
                device.cert, device.key = device.candidate, device.pending_key
                device.candidate = device.pending_key = None
            if device.lose_switch_reports > 0:
                device.lose_switch_reports -= 1
                raise FetchError("device_timeout", "switch report lost")
            return device.cert.serial_number


def _admitted_pins(registry: Registry, device_id: str) -> tuple[str, ...]:
    entry = registry.get(device_id)
    return entry.pins if entry is not None and entry.enabled else ()


class _OneDevice:
    """The inventory as ``export_registry`` reads it, narrowed to one device.

    The export of a registry entry depends on that device's row alone, so this gives the pins the
    full export gives, with one read instead of a read of the whole fleet on every device call.
    """

    def __init__(self, inventory: Inventory, device_id: str) -> None:
        self._inventory = inventory
        self._device_id = device_id

    def devices(self) -> Iterator[DeviceLifecycle]:
        device = self._inventory.get(self._device_id)
        if device is not None:
            yield device

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"export_registry was expected to read devices() only, not {name}")


@dataclass
class World:
    clock: ManualClock
    ca: FileCA
    backend: FileCABackend
    inventory: SqliteInventory | PostgresInventory
    base: Registry
    channel: FakeDeviceChannel
    orchestrator: RenewalOrchestrator
    events: SecurityEvents
    pins_changed: list[str]

    def registry(self) -> Registry:
        return export_registry(self.inventory, self.base)

    def check_all(self) -> None:
        registry = self.registry()
        for device in self.channel.devices.values():
            self.channel.check(device, _admitted_pins(registry, device.device_id))

    async def days(self, n: int, each: Callable[[int], None] | None = None) -> None:
        for day in range(n):
            self.clock.advance(DAY)
            if each is not None:
                each(day)
            await self.orchestrator.daily_scan()
            self.check_all()


def make_world(tmp_path: Path, expiries: dict[str, timedelta], *, lifetime: timedelta = timedelta(days=365),
               concurrency: int = 8, seed: int = 7, policy: RenewalPolicy | None = None,
               step_timeout: timedelta = timedelta(seconds=30),
               inventory: SqliteInventory | PostgresInventory | None = None) -> World:
    """A PKI, an inventory and one simulated device per entry (its certificate expires after the delta).

    ``inventory`` is an empty inventory on either backend; by default a SQLite file in ``tmp_path``.
    """
    clock = ManualClock(T0)
    ca = init_dev(tmp_path / "pki", devices=0, clock=clock)
    issuing = ca.issuing()
    backend = FileCABackend(ca, clock=clock)
    if inventory is None:
        inventory = SqliteInventory(tmp_path / "inventory.db")
    devices: dict[str, SimDevice] = {}
    entries: dict[str, DeviceEntry] = {}
    steps = []
    for device_id, left in expiries.items():
        key = new_key()
        not_after = T0 + left
        cert = issue_leaf(issuing, identity=device_id, now=T0, lifetime=lifetime, public_key=key.public_key(),
                          not_before=not_after - lifetime).cert
        devices[device_id] = SimDevice(device_id, key, cert)
        entries[device_id] = DeviceEntry(device_id, (spki_pin(cert),), frozenset({"sensor"}))
        steps.append(enroll(device_id, CertRef.from_certificate(cert, CertState.ACTIVE), now=T0, cause="enrolled"))
    inventory.apply_many(steps)
    base = Registry(devices=entries)

    def pins_of(device_id: str) -> tuple[str, ...]:
        entry = base.devices.get(device_id)
        one = Registry(devices={} if entry is None else {device_id: entry})
        return _admitted_pins(export_registry(_OneDevice(inventory, device_id), one), device_id)

    channel = FakeDeviceChannel(clock, issuing.cert, pins_of, lambda serial: serial in backend.revoked)
    channel.devices = devices
    events = SecurityEvents("test.renewal")
    pins_changed: list[str] = []
    rng = random.Random(seed)
    orchestrator = RenewalOrchestrator(
        inventory, channel, backend, clock=clock, events=events, policy=policy, concurrency=concurrency,
        rand=rng.random, on_pins_changed=pins_changed.append, step_timeout=step_timeout,
    )
    world = World(clock, ca, backend, inventory, base, channel, orchestrator, events, pins_changed)
    return world


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Keep events in memory: a CLI test elsewhere may have pointed structlog at a closed stream."""
    with capture_logs() as logs:
        yield logs


NewWorld = Callable[..., World]


@pytest.fixture
def new_world(tmp_path: Path, open_inv: OpenInventory) -> NewWorld:
    """``make_world`` on this test's inventory backend (each in turn); the inventory is closed afterwards."""

    def new(expiries: dict[str, timedelta], **options: Any) -> World:
        return make_world(tmp_path, expiries, inventory=open_inv(), **options)

    return new


def _events(logs: list[MutableMapping[str, Any]], device: str) -> list[str]:
    return [e["event"] for e in logs if e.get("device") == device]


# --------------------------------------------------------------------------- single devices


async def test_device_near_expiry_is_renewed_with_no_outage(new_world: NewWorld) -> None:
    world = new_world({"pump-1": 100 * DAY, "valve-2": 300 * DAY})
    old = world.channel.devices["pump-1"].cert
    with capture_logs() as logs:
        await world.days(20)  # renewal starts 90 days before expiry: day 10
        dev = world.inventory.get("pump-1")
        assert dev is not None and dev.renewal is RenewalState.IDLE
        new = world.channel.devices["pump-1"].cert
        assert new.serial_number != old.serial_number and dev.current.serial == new.serial_number
        assert dev.current.not_after - dev.current.not_before == timedelta(days=365)
        assert world.channel.devices["pump-1"].stored == [old]
    assert world.channel.violations == []
    assert world.channel.checks > 40
    assert _events(logs, "pump-1") == [
        "renewal.started", "renewal.issued", "renewal.switched", "cert.revoked", "renewal.completed",
    ]
    started = next(e for e in logs if e["event"] == "renewal.started")
    assert started["reason"] == "due" and started["days_left"] == 89
    switched_at = next(t.at for t in world.inventory.history("pump-1") if t.to_state == "overlap")
    revoked = world.inventory.revoked_certificates()
    assert [c.serial for c in revoked] == [old.serial_number]
    assert revoked[0].revoked_at is not None
    assert revoked[0].revoked_at - switched_at >= timedelta(days=7)  # the overlap was honoured
    assert world.backend.revoked == {old.serial_number: "superseded"}
    assert [(e.serial, e.reason) for e in RevocationStore(world.ca).entries()] == [
        (old.serial_number, "superseded")]
    crl = x509.load_der_x509_crl(issue_crl(world.ca))  # the next CRL lists it
    assert crl.get_revoked_certificate_by_serial_number(old.serial_number) is not None
    assert world.registry().get("pump-1").pins == (spki_pin(new),)  # type: ignore[union-attr]
    assert world.pins_changed.count("pump-1") == 3  # candidate pinned, switch, old pin dropped
    assert world.inventory.get("valve-2").renewal is RenewalState.IDLE  # type: ignore[union-attr]


async def test_both_pins_are_valid_during_the_overlap(new_world: NewWorld) -> None:
    world = new_world({"pump-1": 80 * DAY})
    old = world.channel.devices["pump-1"].cert
    report = await world.orchestrator.daily_scan()
    assert report.count("switched") == 1
    new = world.channel.devices["pump-1"].cert
    for _ in range(6):
        assert world.registry().get("pump-1").pins == (spki_pin(new), spki_pin(old))  # type: ignore[union-attr]
        await world.days(1)
    await world.days(2)
    assert world.registry().get("pump-1").pins == (spki_pin(new),)  # type: ignore[union-attr]


async def test_offline_device_is_renewed_when_it_returns(new_world: NewWorld) -> None:
    world = new_world({"pump-1": 60 * DAY})
    sim = world.channel.devices["pump-1"]
    sim.online = False
    with capture_logs() as logs:
        await world.days(3)
        dev = world.inventory.get("pump-1")
        assert dev is not None and dev.renewal is RenewalState.FAILED and dev.attempts >= 3
        assert dev.last_error == "device_offline" and dev.next_attempt_at is not None
        assert world.orchestrator.max_in_flight == 1
        sim.online = True
        outcome = await world.orchestrator.device_online("pump-1")
    assert outcome is not None and outcome.result == "switched"
    failed = [e for e in logs if e["event"] == "renewal.failed"]
    assert {e["reason"] for e in failed} == {"device_offline"} and all(e["retry_at"] for e in failed)
    assert world.backend.revoked == {}  # no certificate was issued while it was away
    assert world.channel.violations == []
    assert world.inventory.get("pump-1").attempts == 0  # type: ignore[union-attr]


async def test_device_lost_after_csr_gets_its_unused_cert_revoked(new_world: NewWorld) -> None:
    world = new_world({"pump-1": 60 * DAY})
    world.channel.devices["pump-1"].offline_after_csr = True
    (outcome,) = (await world.orchestrator.daily_scan()).outcomes
    assert (outcome.result, outcome.detail) == ("failed", "device_offline")
    (cand,) = world.backend.revoked
    assert world.backend.revoked[cand] == "superseded"
    assert [(c.serial, c.revoke_reason) for c in world.inventory.revoked_certificates()] == [
        (cand, "device_offline")]
    assert world.pins_changed == ["pump-1", "pump-1"]  # candidate pinned, then unpinned
    world.channel.devices["pump-1"].offline_after_csr = False
    world.channel.devices["pump-1"].online = True
    await world.days(1)
    assert world.inventory.get("pump-1").renewal is RenewalState.OVERLAP  # type: ignore[union-attr]
    assert world.channel.violations == []


async def test_failed_test_is_rolled_back(new_world: NewWorld) -> None:
    world = new_world({"pump-1": 60 * DAY})
    sim = world.channel.devices["pump-1"]
    sim.test_ok = False
    old = sim.cert
    with capture_logs() as logs:
        (outcome,) = (await world.orchestrator.daily_scan()).outcomes
    assert outcome.result == "rolled_back" and outcome.detail == "test_failed:tls_handshake_failed"
    assert sim.cert == old
    dev = world.inventory.get("pump-1")
    assert dev is not None and dev.renewal is RenewalState.ROLLED_BACK and dev.candidate is None
    (cand,) = world.backend.revoked
    assert cand != old.serial_number
    assert world.registry().get("pump-1").pins == (spki_pin(old),)  # type: ignore[union-attr]
    rolled = [e for e in logs if e["event"] == "renewal.rolled_back"]
    assert rolled[0]["reason"] == "test_failed:tls_handshake_failed" and rolled[0]["log_level"] == "warning"
    sim.test_ok = True
    await world.days(1)
    assert world.inventory.get("pump-1").renewal is RenewalState.OVERLAP  # type: ignore[union-attr]
    assert world.channel.violations == []


async def test_lost_switch_report_keeps_both_pins_until_resolved(new_world: NewWorld) -> None:
    world = new_world({"pump-1": 60 * DAY})
    sim = world.channel.devices["pump-1"]
    sim.lose_switch_reports = 2
    (outcome,) = (await world.orchestrator.daily_scan()).outcomes
    assert outcome.result == "switch_unconfirmed"
    dev = world.inventory.get("pump-1")
    assert dev is not None and dev.renewal is RenewalState.SWITCHING
    assert dev.candidate is not None and dev.candidate.serial == sim.cert.serial_number  # device did switch
    assert world.backend.revoked == {}
    world.check_all()
    assert world.channel.violations == []
    assert (await world.orchestrator.renew("pump-1")).result == "skipped"  # backoff
    world.clock.advance(timedelta(hours=2))
    assert (await world.orchestrator.renew("pump-1")).result == "switch_unconfirmed"
    world.clock.advance(timedelta(hours=2))
    assert (await world.orchestrator.renew("pump-1")).result == "switched"
    assert world.channel.calls["request_csr"] == 1  # resumed, not restarted
    assert world.inventory.get("pump-1").renewal is RenewalState.OVERLAP  # type: ignore[union-attr]


async def test_csr_for_another_identity_is_rejected(new_world: NewWorld) -> None:
    world = new_world({"pump-1": 60 * DAY, "valve-2": 300 * DAY})
    world.channel.devices["pump-1"].csr_identity = "valve-2"
    with capture_logs() as logs:
        (outcome,) = (await world.orchestrator.daily_scan()).outcomes
    assert outcome.result == "csr_rejected"
    rejected = [e for e in logs if e["event"] == "renewal.csr_rejected"]
    assert rejected == [{"event": "renewal.csr_rejected", "reason": "csr_identity_mismatch",
                         "device": "pump-1", "log_level": "warning"}]
    assert world.channel.calls["push_certificate"] == 0
    assert world.inventory.get("pump-1").last_error == "csr_rejected:csr_identity_mismatch"  # type: ignore[union-attr]


async def test_alarm_is_raised_long_before_expiry(new_world: NewWorld) -> None:
    world = new_world({"pump-1": 80 * DAY})
    world.channel.devices["pump-1"].online = False
    with capture_logs() as logs:
        await world.days(10)
    alarms = [e for e in logs if e["event"] == "renewal.alarm"]
    assert alarms, "a device that keeps failing must raise an alarm"
    first = alarms[0]
    assert first["reason"] == "renewal_failing" and first["log_level"] == "error"
    assert first["days_left"] >= 70 and first["last_error"] == "device_offline"
    assert world.events.count("renewal.alarm", "renewal_failing") >= 1


async def test_hanging_device_times_out(new_world: NewWorld) -> None:
    world = new_world({"pump-1": 60 * DAY}, step_timeout=timedelta(milliseconds=20))
    world.channel.devices["pump-1"].hang = True
    (outcome,) = (await world.orchestrator.daily_scan()).outcomes
    assert (outcome.result, outcome.detail) == ("failed", "device_timeout")


async def test_interrupted_renewal_is_recovered(new_world: NewWorld) -> None:
    world = new_world({"pump-1": 60 * DAY})
    world.channel.devices["pump-1"].offline_after_csr = True
    # Simulate a crash after the CA issued: drive the inventory by hand up to RENEWAL_ISSUED.
    from edge_core.lifecycle import begin_renewal, candidate_issued

    dev = world.inventory.get("pump-1")
    assert dev is not None
    dev = world.inventory.apply(begin_renewal(dev, now=T0, cause="due"))
    stray = issue_leaf(world.ca.issuing(), identity="pump-1", now=T0, lifetime=timedelta(days=365))
    world.inventory.apply(candidate_issued(dev, CertRef.from_certificate(stray.cert), now=T0))
    assert await world.orchestrator.recover() == 1
    assert world.backend.revoked == {stray.cert.serial_number: "superseded"}
    assert world.inventory.revoked_certificates()[0].revoke_reason == "interrupted"
    assert world.inventory.get("pump-1").renewal is RenewalState.FAILED  # type: ignore[union-attr]


async def test_short_lived_certs_renew_at_a_third_of_their_life(new_world: NewWorld) -> None:
    world = new_world({"s1": 25 * DAY, "s2": 12 * DAY}, lifetime=timedelta(days=30))
    renewals: list[tuple[str, int]] = []
    with capture_logs() as logs:
        await world.days(90)
    renewals = [(e["device"], e["days_left"]) for e in logs if e["event"] == "renewal.started"]
    assert renewals, "short-lived certificates must renew"
    assert all(9 <= days <= 10 for _, days in renewals)  # with one daily scan: a third of 30 days left
    assert len([r for r in renewals if r[0] == "s1"]) == 4
    assert world.channel.violations == []


# --------------------------------------------------------------------------- the fleet


async def test_fleet_of_200_over_a_year_never_expires_and_stays_bounded(
    new_world: NewWorld
) -> None:
    rng = random.Random(2025)
    expiries = {f"dev-{n:03d}": timedelta(days=rng.uniform(1.5, 365)) for n in range(200)}
    limit = 8
    world = new_world(expiries, concurrency=limit, seed=11)
    away: dict[str, int] = {}

    def weather(day: int) -> None:
        """Devices drop off for up to ten days; a few new certificates fail their test."""
        for device_id, sim in world.channel.devices.items():
            if device_id in away:
                away[device_id] -= 1
                if away[device_id] <= 0:
                    del away[device_id]
                    sim.online = True
            elif rng.random() < 0.01:
                away[device_id] = rng.randint(1, 10)
                sim.online = False
            sim.test_ok = rng.random() > 0.03

    with capture_logs() as logs:
        world.check_all()
        await world.days(365, weather)
    assert world.channel.violations == []
    assert world.channel.max_in_flight <= limit
    assert world.orchestrator.max_in_flight == limit  # the day-one backlog saturates the limit
    switched = Counter(e["device"] for e in logs if e["event"] == "renewal.switched")
    assert set(switched) == set(expiries), "every device renewed at least once"
    assert not [e for e in logs if e["event"] == "renewal.alarm" and e["reason"] != "renewal_failing"]
    assert not [e for e in logs if e["event"] in ("cert.expired", "renewal.error")]
    results = Counter(e["event"] for e in logs)
    assert results["renewal.rolled_back"] > 0 and results["renewal.failed"] > 0
    assert results["cert.revoked"] >= len(expiries)
    for device_id in rng.sample(sorted(expiries), 5):
        assert world.inventory.history(device_id)[0].cause == "enrolled"
