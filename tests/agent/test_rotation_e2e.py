"""Certificate rotation over the real wire (issue 6, steps 1-6).

Everything is real except the orchestrator's clock: the hardened broker with its certificate
test endpoint on loopback, the ACL, registry hot reload, SQLite inventory, a copy of the
session's issuing CA, the agent's aiomqtt session with its own certificate, and the reference
device (``device_client.rotation``) with its on-disk credential store. Time travel (backoff, the
7-day overlap) moves only the orchestrator's ``ManualClock``; the broker and the CA keep the
system clock.
Real-time waits are for real network events, and bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import ssl
import time
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from device_client.client import DeviceConfig
from device_client.credential_store import CredentialStore
from device_client.rotation import DeviceRotation, RotationHandler
from edge_core.clock import ManualClock, SystemClock
from edge_core.csr import check_csr
from edge_core.errors import ConfigError, CredentialError
from edge_core.events import SecurityEvents
from edge_core.identity import IdentityPolicy, spki_pin
from edge_core.lifecycle import RenewalPolicy, RenewalState
from edge_core.registry import DeviceEntry, Registry, dump_registry, parse_registry
from gateway_agent.agent_session import AgentSession, LifecycleRunner
from gateway_agent.commanding import BrokerEndpoint
from gateway_agent.crl_issue import RevocationStore, issue_crl
from gateway_agent.inventory import SqliteInventory, import_from_registry, write_registry
from gateway_agent.pki import FileCA, cert_pem, issue_leaf, key_pem, new_intermediate, new_key, new_root
from gateway_agent.renewal import FileCABackend, RenewalOrchestrator
from gateway_agent.rotation_channel import MqttDeviceChannel
from gateway_agent.settings import LifecycleSettings
from tests.broker.acl_fixture import replace_file
from tests.conftest import StartBroker
from tests.support.broker import BrokerThread
from tests.support.mqtt import Device
from tests.support.pki import Credential, DevPki

pytestmark = pytest.mark.integration

DEVICE = "meter-1"
ACCEPTED, NOT_AUTHORIZED = 0, 5
ROTATION_ACL = """\
version: 1
attributes: [site, line]
roles:
  gateway:
    - allow publish devices/+/rotation/request
    - allow subscribe devices/+/rotation/response
    - allow subscribe $SYS/broker/clients/+/connected
  sensor:
    - allow subscribe devices/{device}/rotation/request
    - allow publish devices/{device}/rotation/response
"""
WAIT = 10.0  # bound on every real-time wait for a network event


@pytest.fixture
def ca(tmp_path: Path, pki: DevPki) -> FileCA:
    """The test PKI's issuing CA with a revocation store of this test's own."""
    return pki.private_ca(tmp_path / "ca")


@pytest.fixture(autouse=True)
def _logs() -> Any:
    with capture_logs() as logs:
        yield logs


@dataclass
class World:
    broker: BrokerThread
    pki: DevPki
    ca: FileCA
    clock: ManualClock
    inventory: SqliteInventory
    backend: FileCABackend
    channel: MqttDeviceChannel
    orchestrator: RenewalOrchestrator
    registry_file: Path
    base: Registry
    factory: Credential
    store: CredentialStore
    test_port: int
    events: SecurityEvents
    publish_pins: bool = True  # False: the registry writer "lags" and the broker never learns new pins
    written_digest: str = ""
    device: DeviceRotation | None = None
    device_task: asyncio.Task[None] | None = None
    pins_written: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    def on_pins_changed(self, device_id: str) -> None:
        if not self.publish_pins:
            return
        written = write_registry(self.inventory, self.base, self.registry_file)
        self.written_digest = written.digest
        entry = written.get(device_id)
        self.pins_written.append((device_id, entry.pins if entry else ()))

    async def pins_ready(self, device_id: str) -> None:
        """Wait until the broker serves the registry we wrote last (it polls the file every 0.1 s)."""
        edge = self.broker.edge
        assert edge is not None and edge.runtime is not None
        for _ in range(int(WAIT / 0.02)):
            if not self.written_digest or edge.runtime.registry.digest == self.written_digest:
                return
            await asyncio.sleep(0.02)
        raise TimeoutError(f"the broker did not load registry {self.written_digest[:12]} within {WAIT}s")

    def write_pins(self, pins: tuple[str, ...]) -> None:
        """Write the registry by hand with these pins for the device (as an admin would)."""
        devices = dict(self.base.devices)
        devices[DEVICE] = replace(devices[DEVICE], pins=pins)
        text = dump_registry(Registry(devices))
        replace_file(self.registry_file, text)
        self.written_digest = hashlib.sha256(text.encode("utf-8")).hexdigest()

    def old_serial(self) -> int:
        return x509.load_pem_x509_certificate(self.factory.cert.read_bytes()).serial_number

    async def start_device(self) -> DeviceRotation:
        config = DeviceConfig(DEVICE, "127.0.0.1", self.broker.port, ca=self.pki.chain, cert=self.factory.cert,
                              key=self.factory.key)
        self.device = DeviceRotation(config, self.store, test_endpoint=("127.0.0.1", self.test_port),
                                     test_timeout=5.0)
        self.device_task = asyncio.create_task(self.device.run())
        async with asyncio.timeout(WAIT):
            await self.device.wait_connected()
        return self.device

    async def stop_device(self) -> None:
        task, self.device_task = self.device_task, None
        if task is not None:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    async def connect_with(self, cert: Path, key: Path) -> int | None:
        """One paho connection with these credentials as the device; the CONNACK code (None: no CONNACK)."""
        def attempt() -> int | None:
            client = Device(self.broker.port, self.pki.chain, Credential(cert, key), DEVICE)
            code = client.connect()
            if code == ACCEPTED:
                client.close()
            return code
        return await asyncio.to_thread(attempt)

    async def wait_event(self, event: str, reason: str | None = None, **match: str) -> dict[str, Any]:
        def find() -> dict[str, Any]:
            found = self.broker.wait_event(event, reason, timeout=WAIT)
            hits = [e for e in found if all(e.get(k) == v for k, v in match.items())]
            if hits:
                return hits[-1]
            return self.broker.wait_event(event, reason, timeout=WAIT, count=len(found) + 1)[-1]
        return await asyncio.to_thread(find)


def _agent_tls(pki: DevPki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=pki.chain)
    ctx.load_cert_chain(pki.root / "agent" / "gateway-agent.crt", pki.root / "agent" / "gateway-agent.key")
    return ctx


def _issue_device(ca: FileCA, directory: Path, *, days_left: int = 5) -> Credential:
    """A 30-day device certificate with ``days_left`` to go: due for renewal (a third of its life)."""
    now = datetime.now(UTC)
    key = new_key()
    cert = issue_leaf(ca.issuing(), identity=DEVICE, now=now, lifetime=timedelta(days=30), public_key=key.public_key(),
                      not_before=now - timedelta(days=30 - days_left)).cert
    directory.mkdir(parents=True)
    crt, key_path = directory / f"{DEVICE}.crt", directory / f"{DEVICE}.key"
    crt.write_bytes(cert_pem(cert))
    key_path.write_bytes(key_pem(key))
    key_path.chmod(0o600)
    return Credential(crt, key_path)


def _register(registry_file: Path, factory: Credential) -> Registry:
    """Admit the test device in the per-test registry (role sensor, its factory pin); the admin's part."""
    registry = parse_registry(registry_file.read_bytes())
    devices = dict(registry.devices)
    pin = spki_pin(x509.load_pem_x509_certificate(factory.cert.read_bytes()))
    devices[DEVICE] = DeviceEntry(DEVICE, (pin,), frozenset({"sensor"}), {"site": "plant-a", "line": "line-1"})
    replace_file(registry_file, dump_registry(Registry(devices)))
    return parse_registry(registry_file.read_bytes(), source=str(registry_file))


@pytest.fixture
async def world(tmp_path: Path, pki: DevPki, ca: FileCA, registry_file: Path,
                start_broker: StartBroker) -> AsyncIterator[World]:
    factory = _issue_device(ca, tmp_path / "factory")
    base = _register(registry_file, factory)
    acl = tmp_path / "acl.yaml"
    replace_file(acl, ROTATION_ACL)
    broker = start_broker(acl=acl, extra="cert_test_listener:\n  bind: 127.0.0.1:0\n")
    assert broker.edge is not None and broker.edge.cert_test_listener is not None

    clock = ManualClock()
    inventory = SqliteInventory(tmp_path / "inventory.db")
    report = import_from_registry(inventory, registry_file, factory.cert.parent, now=clock.now())
    assert report.enrolled == (DEVICE,)
    # The CA, like the broker, keeps real time: a certificate issued on the orchestrator's
    # travelled clock would not be valid yet, and the device would rightly refuse it.
    backend = FileCABackend(ca, clock=SystemClock())
    events = SecurityEvents("test.rotation")
    client = aiomqtt.Client("127.0.0.1", broker.port, identifier="gateway-agent", tls_context=_agent_tls(pki),
                            protocol=aiomqtt.ProtocolVersion.V311, clean_session=True)
    try:
        async with client:
            channel = MqttDeviceChannel(client, timeout=WAIT, events=events)
            async with channel:
                worlds: list[World] = []  # the callback needs the World, which needs the orchestrator

                def pins_changed(device_id: str) -> None:
                    worlds[0].on_pins_changed(device_id)

                orchestrator = RenewalOrchestrator(inventory, channel, backend, clock=clock, events=events,
                                                   step_timeout=timedelta(seconds=2 * WAIT),
                                                   on_pins_changed=pins_changed)
                w = World(broker, pki, ca, clock, inventory, backend, channel, orchestrator, registry_file, base,
                          factory, CredentialStore(tmp_path / "device-store"), broker.edge.cert_test_listener.port,
                          events)
                worlds.append(w)
                channel.pins_ready = w.pins_ready
                try:
                    yield w
                finally:
                    await w.stop_device()
    finally:
        client._client._reset_sockets()  # paho 2.x leaves its wake-up socket pair to __del__
        inventory.close()


def _names(logs: list[MutableMapping[str, Any]], prefix: str) -> list[str]:
    return [e["event"] for e in logs if e["event"].startswith(prefix)]


# --------------------------------------------------------------------------- (a) the whole rotation


async def test_full_rotation_over_the_wire(world: World, _logs: list[MutableMapping[str, Any]]) -> None:
    device = await world.start_device()
    old = world.old_serial()
    assert device.serial_in_use == old

    outcome = await world.orchestrator.renew(DEVICE)

    assert outcome.result == "switched", outcome
    new = int(outcome.detail, 16)
    # Step 3 ran on the broker's real test endpoint, with the candidate pin the agent exported.
    tested = await world.wait_event("cert_test.passed", device=DEVICE)
    assert tested["serial"] == f"{new:x}"
    # Step 4: the device reconnected with the new certificate and the broker admitted it.
    async with asyncio.timeout(WAIT):
        assert await device.wait_connected(new) == new
    await world.wait_event("auth.accepted", device=DEVICE, serial=f"{new:x}")
    assert world.store.active().serial == new
    previous = world.store.previous()
    assert previous is not None and previous.serial == old
    assert world.store.active().key_path.stat().st_mode & 0o777 == 0o600
    assert world.store.active().key_path != previous.key_path  # a fresh key, generated on the device
    dev = world.inventory.get(DEVICE)
    assert dev is not None and dev.renewal is RenewalState.OVERLAP and dev.current.serial == new
    new_cert = world.store.active().certificate()
    old_cert = previous.certificate()
    assert new_cert.public_key() != old_cert.public_key()

    # Step 5: during the overlap both certificates are pinned and both connect.
    registry = parse_registry(world.registry_file.read_bytes())
    assert registry.get(DEVICE).pins == (spki_pin(new_cert), spki_pin(old_cert))  # type: ignore[union-attr]
    await world.stop_device()
    assert await world.connect_with(previous.cert_path, previous.key_path) == ACCEPTED
    assert await world.connect_with(world.store.active().cert_path, world.store.active().key_path) == ACCEPTED

    # After the overlap the old certificate is revoked, listed in the next CRL, and unpinned.
    world.clock.advance(timedelta(days=7, hours=1))
    report = await world.orchestrator.daily_scan()
    assert report.overlaps_ended == 1
    await world.pins_ready(DEVICE)
    assert world.backend.revoked == {old: "superseded"}
    assert [(e.serial, e.reason) for e in RevocationStore(world.ca).entries()] == [(old, "superseded")]
    crl = x509.load_der_x509_crl(issue_crl(world.ca))
    assert crl.get_revoked_certificate_by_serial_number(old) is not None
    assert crl.get_revoked_certificate_by_serial_number(new) is None
    assert [c.serial for c in world.inventory.revoked_certificates()] == [old]
    registry = parse_registry(world.registry_file.read_bytes())
    assert registry.get(DEVICE).pins == (spki_pin(new_cert),)  # type: ignore[union-attr]
    assert await world.connect_with(previous.cert_path, previous.key_path) == NOT_AUTHORIZED
    await world.wait_event("auth.rejected", "pin_mismatch", device=DEVICE)

    # The device restarts from its store and comes back on the new certificate.
    device = await world.start_device()
    assert device.serial_in_use == new
    assert _names(_logs, "renewal.") == ["renewal.started", "renewal.issued", "renewal.switched",
                                         "renewal.completed"]
    assert _names(_logs, "rotation.") == ["rotation.csr_created", "rotation.cert_stored", "rotation.test_passed",
                                          "rotation.switching", "rotation.switched"]
    assert world.events.count("rotation.response_dropped") == 0


# --------------------------------------------------------------------------- (b) a failed test


async def test_failed_test_rolls_back_and_revokes_the_candidate(
    world: World, _logs: list[MutableMapping[str, Any]]
) -> None:
    device = await world.start_device()
    old = world.old_serial()
    world.publish_pins = False  # the broker never learns the candidate's pin

    outcome = await world.orchestrator.renew(DEVICE)

    assert (outcome.result, outcome.detail) == ("rolled_back", "test_failed:refused_not_authorized")
    await world.wait_event("cert_test.failed", "pin_mismatch")
    dev = world.inventory.get(DEVICE)
    assert dev is not None and dev.renewal is RenewalState.ROLLED_BACK and dev.current.serial == old
    (candidate,) = world.backend.revoked
    assert candidate != old and world.backend.revoked[candidate] == "superseded"
    assert [(c.serial, c.revoke_reason) for c in world.inventory.revoked_certificates()] == [
        (candidate, "test_failed:refused_not_authorized")]
    crl = x509.load_der_x509_crl(issue_crl(world.ca))
    assert crl.get_revoked_certificate_by_serial_number(candidate) is not None
    # The device rolled back: nothing pending, still on the old certificate, session working.
    assert world.store.pending() is None and world.store.active().serial == old
    assert device.serial_in_use == old
    assert await world.channel.request_switch(DEVICE, candidate) == old  # "which certificate do you use?"
    test_failed = [e for e in _logs if e["event"] == "rotation.test_failed"]
    assert test_failed[0]["reason"] == "refused_not_authorized"

    # Once the registry is written again, the retry after the backoff goes through.
    world.publish_pins = True
    assert (await world.orchestrator.renew(DEVICE)).result == "skipped"  # still backing off
    world.clock.advance(timedelta(hours=1))
    outcome = await world.orchestrator.renew(DEVICE)
    assert outcome.result == "switched", outcome
    async with asyncio.timeout(WAIT):
        await device.wait_connected(int(outcome.detail, 16))


# --------------------------------------------------------------------------- (c) an offline device


async def test_offline_device_times_out_then_renews_when_it_comes_online(
    world: World, _logs: list[MutableMapping[str, Any]]
) -> None:
    world.channel.timeout = 0.5  # the device is not connected: nobody will answer
    outcome = await world.orchestrator.renew(DEVICE)

    assert (outcome.result, outcome.detail) == ("failed", "device_timeout")
    dev = world.inventory.get(DEVICE)
    assert dev is not None and dev.renewal is RenewalState.FAILED and dev.attempts == 1
    assert dev.next_attempt_at is not None and dev.next_attempt_at > world.clock.now()
    failed = [e for e in _logs if e["event"] == "renewal.failed"]
    assert failed[0]["reason"] == "device_timeout" and failed[0]["retry_at"]
    assert world.backend.revoked == {}  # nothing was issued
    assert (await world.orchestrator.renew(DEVICE)).result == "skipped"  # backoff

    world.channel.timeout = WAIT
    # The device announces its connection over the broker; that alone starts the due renewal
    # (the agent used to wait out the backoff: device_online was never called).
    came_back: asyncio.Queue[asyncio.Task[Any]] = asyncio.Queue()
    world.channel.on_online = lambda device_id: came_back.put_nowait(
        asyncio.create_task(world.orchestrator.device_online(device_id)))
    device = await world.start_device()
    async with asyncio.timeout(WAIT):
        back = await (await came_back.get())
    assert next(e for e in _logs if e["event"] == "device.online")["device"] == DEVICE

    assert back is not None and back.result == "switched", back
    async with asyncio.timeout(WAIT):
        await device.wait_connected(int(back.detail, 16))
    dev = world.inventory.get(DEVICE)
    assert dev is not None and dev.renewal is RenewalState.OVERLAP and dev.attempts == 0


async def _events(events: SecurityEvents, event: str, count: int) -> list[dict[str, Any]]:
    """Wait (bounded) until ``count`` of ``event`` were emitted; returns them."""
    for _ in range(int(WAIT / 0.02)):
        if len(found := events.recent(event)) >= count:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {count} {event} within {WAIT}s: {events.recent(event)}")


async def test_the_broker_connect_event_starts_the_due_renewal_of_a_device_that_never_announces_itself(
    pki: DevPki, ca: FileCA, registry_file: Path, start_broker: StartBroker, tmp_path: Path,
    _logs: list[MutableMapping[str, Any]],
) -> None:
    """A device without the reference client sends no ``type: online``. Its renewal failed while it
    was away; when it connects (a plain paho client, no subscription, no message) the broker's
    ``$SYS/broker/clients/<id>/connected`` reaches the agent's session and the renewal starts again at
    once, though the orchestrator's clock never moves (its backoff, over 20 min, never ends).
    Its certificate test endpoint connection, made first, announces nothing."""
    factory = _issue_device(ca, ca.dir / "devices")  # 5 days left: due
    _register(registry_file, factory)
    acl = tmp_path / "acl.yaml"
    replace_file(acl, ROTATION_ACL)
    broker = start_broker(acl=acl, extra="cert_test_listener:\n  bind: 127.0.0.1:0\n")
    assert broker.edge is not None and broker.edge.cert_test_listener is not None
    clock = ManualClock()
    settings = LifecycleSettings(inventory=f"sqlite:///{tmp_path / 'inventory.db'}", ca_dir=ca.dir,
                                 registry=registry_file, policy=RenewalPolicy(), spool_dir=tmp_path / "spool")
    events = SecurityEvents("test.presence")
    runner = LifecycleRunner(settings, clock=clock, events=events, broker_status_url=None)
    endpoint = BrokerEndpoint("127.0.0.1", broker.port, pki.chain, pki.root / "agent" / "gateway-agent.crt",
                              pki.root / "agent" / "gateway-agent.key")
    session = AgentSession(endpoint, "gateway-agent", events, lifecycle=runner, channel_timeout=0.5)
    running = asyncio.create_task(session.run())
    try:
        (failed,) = await _events(events, "renewal.failed", 1)  # the start-up scan: nobody answers
        assert failed["device"] == DEVICE and failed["reason"] == "device_timeout"
        dev = runner.inventory.get(DEVICE)
        assert dev is not None and dev.attempts == 1 and dev.next_attempt_at is not None
        assert dev.next_attempt_at - clock.now() >= timedelta(minutes=20)

        def test_then_connect() -> float:
            tester = Device(broker.edge.cert_test_listener.port, pki.chain, factory, DEVICE)  # type: ignore[union-attr]
            assert tester.connect() == ACCEPTED
            tester.client.loop_stop()
            tester.client._reset_sockets()
            broker.wait_event("cert_test.passed")
            plain = Device(broker.port, pki.chain, factory, DEVICE)
            assert plain.connect() == ACCEPTED
            devices.append(plain)
            return time.monotonic()

        devices: list[Device] = []
        connected_at = await asyncio.to_thread(test_then_connect)
        started = await _events(events, "renewal.started", 2)
        assert time.monotonic() - connected_at < WAIT
        assert started[1]["device"] == DEVICE and started[1]["attempt"] == 2
        assert clock.now() < dev.next_attempt_at, "the backoff did not end: the connect event started it"
        online = [e for e in _logs if e["event"] == "device.online"]
        assert [(e["device"], e["source"], e["session_present"]) for e in online] == [(DEVICE, "broker", False)]
        (_, again) = await _events(events, "renewal.failed", 2)  # it answers nothing: failed once more
        assert again["reason"] == "device_timeout"
        assert runner.inventory.get(DEVICE).attempts == 2  # type: ignore[union-attr]
        assert not [e for e in _logs if e["event"] == "rotation.presence_unavailable"]
        for device in devices:
            await asyncio.to_thread(device.close)
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        runner.inventory.close()


# --------------------------------------------------------------------------- (d) the device checks what it gets


async def test_device_refuses_a_certificate_for_another_identity_or_key(world: World) -> None:
    await world.start_device()
    csr = x509.load_pem_x509_csr(await world.channel.request_csr(DEVICE, "n" * 22))
    pending_key = csr.public_key()
    assert isinstance(pending_key, ec.EllipticCurvePublicKey)
    issuing = world.ca.issuing()
    chain = world.ca.chain_path.read_bytes()
    now = datetime.now(UTC)

    def pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    other_identity = issue_leaf(issuing, identity="pump-18", now=now, public_key=pending_key).cert
    other_key = issue_leaf(issuing, identity=DEVICE, now=now).cert
    rogue = new_intermediate(new_root("Rogue Root", now), "Rogue Issuing", now)
    untrusted = issue_leaf(rogue, identity=DEVICE, now=now, public_key=pending_key).cert
    for cert, chain_pem, reason in (
        (other_identity, chain, "cert_identity_mismatch"),
        (other_key, chain, "cert_key_mismatch"),
        (untrusted, cert_pem(rogue.cert), "cert_untrusted"),
    ):
        with pytest.raises(CredentialError) as refused:
            await world.channel.push_certificate(DEVICE, pem(cert), chain_pem)
        assert refused.value.reason == f"device_refused:{reason}"
        pending = world.store.pending()
        assert pending is not None and pending.credential is None  # nothing stored
    assert world.store.active().serial == world.old_serial()

    good = issue_leaf(issuing, identity=DEVICE, now=now, public_key=pending_key).cert
    await world.channel.push_certificate(DEVICE, pem(good), chain)
    pending = world.store.pending()
    assert pending is not None and pending.credential is not None
    assert pending.credential.serial == good.serial_number and not pending.tested
    # Not tested yet: a switch request leaves the device on its old certificate.
    assert await world.channel.request_switch(DEVICE, good.serial_number) == world.old_serial()


# --------------------------------------------------------------------------- the switch itself fails


async def test_device_rolls_back_when_its_new_certificate_is_refused_at_reconnect(
    world: World, _logs: list[MutableMapping[str, Any]]
) -> None:
    """Steps driven by hand: the test passes, then the candidate pin vanishes before the switch."""
    device = await world.start_device()
    old = world.old_serial()
    old_pin = spki_pin(world.store.active().certificate())
    nonce = secrets.token_urlsafe(16)
    checked = check_csr(await world.channel.request_csr(DEVICE, nonce), DEVICE, IdentityPolicy(), nonce=nonce)
    issued = await world.backend.issue(checked, DEVICE, timedelta(days=30))
    new = issued.ref.serial
    world.write_pins((old_pin, issued.ref.pin))
    await world.pins_ready(DEVICE)
    await world.channel.push_certificate(DEVICE, issued.cert_pem, issued.chain_pem)
    assert (await world.channel.request_test(DEVICE, new)).ok
    world.write_pins((old_pin,))
    await world.pins_ready(DEVICE)

    assert await world.channel.request_switch(DEVICE, new) == old

    await world.wait_event("auth.rejected", "pin_mismatch", device=DEVICE)
    rolled = [e for e in _logs if e["event"] == "rotation.rolled_back"]
    assert rolled[0]["reason"] == "reconnect_failed" and rolled[0]["serial"] == f"{old:x}"
    assert world.store.active().serial == old
    assert world.store.previous() is None and world.store.pending() is None
    async with asyncio.timeout(WAIT):
        assert await device.wait_connected(old) == old
    assert await world.channel.request_switch(DEVICE, new) == old  # asked again: same answer


# --------------------------------------------------------------------------- only the device answers


async def test_another_device_can_neither_read_requests_nor_answer(world: World) -> None:
    await world.start_device()

    def intrude() -> list[int]:
        pump = Device(world.broker.port, world.pki.chain, world.pki.device("pump-17"), "pump-17")
        assert pump.connect() == ACCEPTED
        try:
            codes = pump.subscribe(f"devices/{DEVICE}/rotation/request")
            forged = {"v": 1, "id": "x", "type": "switched", "serial_in_use": "1"}
            pump.publish(f"devices/{DEVICE}/rotation/response", json.dumps(forged).encode())
            return codes
        finally:
            pump.close()

    assert await asyncio.to_thread(intrude) == [0x80]
    denied = await world.wait_event("acl.denied", device="pump-17", action="publish")
    assert denied["topic"] == f"devices/{DEVICE}/rotation/response"
    assert world.events.count("rotation.response_dropped") == 0  # it never reached the agent


# --------------------------------------------------------------------------- QoS 1 duplicates (no network)


async def test_a_duplicated_request_gets_the_same_answer_and_one_key(tmp_path: Path, ca: FileCA, pki: DevPki) -> None:
    factory = _issue_device(ca, tmp_path / "factory")
    store = CredentialStore(tmp_path / "store")
    store.initialize(factory.cert.read_bytes(), factory.key.read_bytes())
    handler = RotationHandler(DEVICE, store, trust=pki.chain, test_endpoint=("127.0.0.1", 9))
    request = json.dumps({"v": 1, "id": "r1", "type": "csr_request", "nonce": "a" * 20}).encode()

    first = await handler.handle(request)
    pending = store.pending()
    second = await handler.handle(request)

    assert first is not None and second is not None and first.response == second.response
    again = store.pending()
    assert again is not None and pending is not None
    assert again.key.public_key() == pending.key.public_key()
    keys = list((tmp_path / "store" / "keys").iterdir())
    assert len(keys) == 2 and all(k.stat().st_mode & 0o777 == 0o600 for k in keys)
    refused = await handler.handle(json.dumps({"v": 2, "id": "r2", "type": "test", "serial": "1"}).encode())
    assert refused is not None and refused.response == {"type": "error", "reason": "unsupported_version"}
    assert await handler.handle(b"not json") is None


def _presence(device: str, *, present: bool = False, topic_device: str | None = None) -> aiomqtt.Message:
    body = {"device": device, "serial": "1f", "at": "2026-12-02T02:45:00+00:00", "session_present": present}
    return aiomqtt.Message(f"$SYS/broker/clients/{topic_device or device}/connected", json.dumps(body).encode(),
                           1, False, 1, None)


async def test_one_connection_is_one_online_trigger_and_a_malformed_event_is_dropped(
    _logs: list[MutableMapping[str, Any]],
) -> None:
    """The channel alone (no network): a new session's connect event waits the settle time, and the
    device's own announcement within it replaces it (one trigger); a resumed session counts at once;
    a connect event with a bad identity or payload is dropped with a reason code."""
    from typing import cast

    events = SecurityEvents("test.presence")
    channel = MqttDeviceChannel(cast(aiomqtt.Client, object()), events=events, presence_settle=0.2)
    triggered: list[str] = []
    channel.on_online = triggered.append

    assert channel.dispatch(_presence("meter-1"))
    announced = {"v": 1, "id": "online-1", "type": "online", "serial_in_use": "1f"}
    assert channel.dispatch(aiomqtt.Message("devices/meter-1/rotation/response", json.dumps(announced).encode(),
                                            1, False, 2, None))
    assert channel.dispatch(_presence("meter-2", present=True))
    assert triggered == ["meter-1", "meter-2"]
    assert channel.dispatch(_presence("meter-3"))
    assert channel.dispatch(_presence("meter-3"))  # reconnected within the settle time: still one trigger
    assert triggered == ["meter-1", "meter-2"]
    await asyncio.sleep(0.4)
    assert triggered == ["meter-1", "meter-2", "meter-3"]

    for bad in (_presence("-leading-dash"), _presence("meter-4", topic_device="meter-5"),
                aiomqtt.Message("$SYS/broker/clients/meter-4/connected", b"{not json", 1, False, 3, None),
                aiomqtt.Message("$SYS/broker/clients/meter-4/connected", b"x" * 2048, 1, False, 4, None)):
        assert channel.dispatch(bad)
    assert events.count("rotation.response_dropped", "malformed") == 4
    dropped = [e for e in _logs if e["event"] == "rotation.response_dropped"]
    assert {e["source"] for e in dropped} == {"broker"} and all(e["detail"] for e in dropped)
    assert channel.dispatch(_presence("meter-6"))
    channel.forget_presence()  # the session ended: what was still settling starts nothing
    await asyncio.sleep(0.4)
    assert triggered == ["meter-1", "meter-2", "meter-3"]
    sources = [(e["device"], e["source"]) for e in _logs if e["event"] == "device.online"]
    assert sources == [("meter-1", "broker"), ("meter-1", "device"), ("meter-2", "broker"), ("meter-3", "broker"),
                       ("meter-3", "broker"), ("meter-6", "broker")]


async def test_without_the_connect_event_grant_the_agent_runs_and_says_so(
    start_broker: StartBroker, pki: DevPki, tmp_path: Path, _logs: list[MutableMapping[str, Any]],
) -> None:
    """An ACL from before the connect events: renewals still work (on ``type: online`` and backoff);
    a warning names the missing grant."""
    acl = tmp_path / "acl.yaml"
    replace_file(acl, ROTATION_ACL.replace("    - allow subscribe $SYS/broker/clients/+/connected\n", ""))
    broker = start_broker(acl=acl)
    client = aiomqtt.Client("127.0.0.1", broker.port, identifier="gateway-agent", tls_context=_agent_tls(pki),
                            protocol=aiomqtt.ProtocolVersion.V311, clean_session=True)
    try:
        async with client, MqttDeviceChannel(client, timeout=1) as channel:
            assert not channel.presence
        (warning,) = [e for e in _logs if e["event"] == "rotation.presence_unavailable"]
        assert warning["reason"] == "subscribe_refused" and "$SYS/broker/clients/#" in warning["hint"]
    finally:
        client._client._reset_sockets()


async def test_the_agent_refuses_to_start_without_its_acl_grant(
    start_broker: StartBroker, pki: DevPki, tmp_path: Path
) -> None:
    acl = tmp_path / "acl.yaml"
    replace_file(acl, ROTATION_ACL.replace("    - allow subscribe devices/+/rotation/response\n", ""))
    broker = start_broker(acl=acl)
    client = aiomqtt.Client("127.0.0.1", broker.port, identifier="gateway-agent", tls_context=_agent_tls(pki),
                            protocol=aiomqtt.ProtocolVersion.V311, clean_session=True)
    try:
        async with client:
            with pytest.raises(ConfigError, match="refused the subscription") as refused:
                async with MqttDeviceChannel(client, timeout=1):
                    pass
            assert "rotation/response" in refused.value.hint
    finally:
        client._client._reset_sockets()
