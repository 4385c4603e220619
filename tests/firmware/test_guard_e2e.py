"""The firmware guard in the real broker: real TLS, real clients, every forgery dropped with its reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edge_core.clock import ManualClock
from edge_core.firmware import make_offer
from edge_core.registry import DeviceEntry, Registry, dump_registry, parse_registry
from tests.broker.acl_fixture import TEST_ACL, write_acl
from tests.conftest import StartBroker
from tests.firmware.release import Release, signer
from tests.support.broker import BrokerThread
from tests.support.mqtt import Device
from tests.support.pki import DevPki

pytestmark = pytest.mark.integration

FIRMWARE_ACL = TEST_ACL.replace("everyone:\n", "everyone:\n  - allow subscribe devices/{device}/firmware/+\n"
                                "  - allow publish devices/{device}/firmware/report\n") + """\
  sensor-01:
    - allow publish devices/+/firmware/offer
"""
IMAGE = b"\x7fELF pump controller 2.0 " * 400
TOPIC = "devices/pump-17/firmware/offer"
NOW = datetime.now(UTC).replace(microsecond=0)  # device certificates are valid around the real time


def with_classes(registry_file: Path) -> None:
    registry = parse_registry(registry_file.read_bytes())
    devices = dict(registry.devices)
    for device, device_class in (("pump-17", "pump-ctl"), ("pump-18", "valve-ctl")):
        e = devices[device]
        devices[device] = DeviceEntry(device_id=device, pins=e.pins, roles=e.roles,
                                      attributes={**e.attributes, "firmware_class": device_class})
    registry_file.write_text(dump_registry(Registry(devices=devices)))


@pytest.fixture
def release(tmp_path: Path) -> Release:
    rel = Release(now=NOW)
    (tmp_path / "root.json").write_bytes(rel.chain[0])
    return rel


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


@pytest.fixture
def start(start_broker: StartBroker, tmp_path: Path, registry_file: Path, release: Release,  # type: ignore[no-untyped-def]
          clock: ManualClock):
    with_classes(registry_file)

    def go() -> BrokerThread:
        return start_broker(acl=write_acl(tmp_path, FIRMWARE_ACL), clock=clock,
                            extra=f"firmware:\n  root: {tmp_path / 'root.json'}\n"
                                  f"  state: {tmp_path / 'fw-state.json'}\n")
    return go


def connect(broker: BrokerThread, pki: DevPki, identity: str) -> Device:
    client = Device(broker.port, pki.chain, pki.device(identity), identity)
    assert client.connect() == 0
    return client


def test_valid_offer_is_forwarded_and_every_forgery_dropped(start, pki: DevPki, release: Release) -> None:  # type: ignore[no-untyped-def]
    broker = start()
    pump, publisher = connect(broker, pki, "pump-17"), connect(broker, pki, "sensor-01")
    try:
        assert pump.subscribe("devices/pump-17/firmware/+") == [1]
        good = release.offer(IMAGE, version=3, url="http://127.0.0.1:9/fw")
        publisher.publish(TOPIC, good)
        assert pump.expect().payload == good
        broker.wait_event("firmware.accepted")
        forgeries = {
            "unsigned": make_offer(release.manifest(IMAGE, version=4, signed_by=[])),
            "unknown_key": make_offer(release.manifest(IMAGE, version=4, signed_by=[signer(), signer()])),
            "below_threshold": make_offer(release.manifest(IMAGE, version=4, signed_by=release.release_keys[:1])),
            "wrong_class": release.offer(IMAGE, version=4, device_class="valve-ctl"),
            "expired": release.offer(IMAGE, version=4, not_before=NOW - timedelta(days=9),
                                     expires=NOW - timedelta(days=1)),
            "rolled_back": release.offer(IMAGE, version=2),
            "version_conflict": release.offer(IMAGE + b"!", version=3),
            "malformed": b"\x00\xffnot json",
        }
        for reason, payload in forgeries.items():
            publisher.publish(TOPIC, payload)
            broker.wait_event("firmware.rejected", reason)
        publisher.publish(TOPIC, good, retain=True)
        broker.wait_event("firmware.rejected", "retained_offer")
        pump.expect_none(0.5)
        # the same genuine offer again (the next device of a staged rollout) still passes
        publisher.publish(TOPIC, good)
        assert pump.expect().payload == good
    finally:
        pump.close()
        publisher.close()


def test_device_without_class_gets_no_offer(start, pki: DevPki, release: Release) -> None:  # type: ignore[no-untyped-def]
    broker = start()
    publisher = connect(broker, pki, "sensor-01")
    try:
        publisher.publish("devices/sensor-02/firmware/offer", release.offer(IMAGE))
        broker.wait_event("firmware.rejected", "no_device_class")
    finally:
        publisher.close()


def test_rollback_floor_survives_a_broker_restart(start, pki: DevPki, release: Release, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broker = start()
    publisher = connect(broker, pki, "sensor-01")
    release.rotate([signer(), signer()])  # the offer carries root v2: the broker moves forward too
    publisher.publish(TOPIC, release.offer(IMAGE, version=5))
    broker.wait_event("firmware.accepted")
    publisher.close()
    broker.stop()
    assert (tmp_path / "fw-state.json").stat().st_mode & 0o777 == 0o600
    broker = start()
    publisher = connect(broker, pki, "sensor-01")
    try:
        assert [e["root_version"] for e in broker.events.recent("firmware.trust_loaded")] == [2]
        publisher.publish(TOPIC, make_offer(release.manifest(IMAGE, version=4)))
        broker.wait_event("firmware.rejected", "rolled_back")
    finally:
        publisher.close()


def test_unusable_trust_refuses_every_offer(start, pki: DevPki, release: Release, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "fw-state.json").write_text("{not json")
    broker = start()
    publisher = connect(broker, pki, "sensor-01")
    try:
        assert broker.events.count("firmware.config_error", "unusable_trust") == 1
        publisher.publish(TOPIC, release.offer(IMAGE))
        broker.wait_event("firmware.rejected", "no_firmware_trust")
    finally:
        publisher.close()


def test_offers_from_mosquitto_clients(start, pki: DevPki, release: Release, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Debian's mosquitto_pub/mosquitto_sub, clients nobody on this project wrote, on both ends."""
    import subprocess

    def mosq(tool: str, identity: str, *args: str) -> list[str]:
        cred = pki.device(identity)
        return [tool, "-h", "127.0.0.1", "-p", str(broker.port), "--cafile", str(pki.chain), "--cert",
                str(cred.cert), "--key", str(cred.key), "--tls-version", "tlsv1.3", "-i", identity, "-V",
                "mqttv311", "-q", "1", *args]

    broker = start()
    good, forged = tmp_path / "good.json", tmp_path / "forged.json"
    good.write_bytes(release.offer(IMAGE, version=6))
    forged.write_bytes(make_offer(release.manifest(IMAGE, version=7, signed_by=[signer(), signer()])))
    sub = subprocess.Popen(mosq("mosquitto_sub", "pump-17", "-t", TOPIC, "-C", "1", "-W", "10"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        broker.wait_event("subscription.granted")
        subprocess.run(mosq("mosquitto_pub", "sensor-01", "-t", TOPIC, "-f", str(forged)), check=True, timeout=10)
        broker.wait_event("firmware.rejected", "unknown_key")
        subprocess.run(mosq("mosquitto_pub", "sensor-01", "-t", TOPIC, "-f", str(good)), check=True, timeout=10)
        out, err = sub.communicate(timeout=15)
    finally:
        sub.kill()
        sub.wait()
    assert out.rstrip(b"\n") == good.read_bytes(), err  # only the genuine offer, byte for byte


def test_a_root_installed_after_start_is_picked_up(start, pki: DevPki, release: Release, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                    clock: ManualClock) -> None:
    (tmp_path / "root.json").unlink()
    broker = start()
    publisher = connect(broker, pki, "sensor-01")
    try:
        publisher.publish(TOPIC, release.offer(IMAGE))
        broker.wait_event("firmware.rejected", "no_firmware_trust")
        (tmp_path / "root.json").write_bytes(release.chain[0])
        publisher.publish(TOPIC, release.offer(IMAGE))  # within a second: no new attempt yet
        broker.wait_event("firmware.rejected", "no_firmware_trust", count=2)
        assert broker.events.count("firmware.config_error") == 1
        clock.advance(timedelta(seconds=1))
        publisher.publish(TOPIC, release.offer(IMAGE))
        broker.wait_event("firmware.accepted")
    finally:
        publisher.close()
