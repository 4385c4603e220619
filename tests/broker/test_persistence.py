"""Persistent sessions, queued QoS 1/2 messages and retained messages survive restarts and crashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.broker.acl_fixture import write_acl
from tests.support.broker import BrokerProcess, BrokerThread, free_port, write_settings
from tests.support.pki import DevPki
from tests.support.raw import PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, RawClient, ack_packet

pytestmark = pytest.mark.integration

CMD = "devices/pump-17/cmd/valve"


def settings(tmp_path: Path, pki: DevPki, registry: Path, *, port: int = 0, sync: str = "full") -> Path:
    return write_settings(tmp_path, registry=registry, chain=pki.chain, server_dir=pki.root,
                          acl=write_acl(tmp_path), bind=f"127.0.0.1:{port}",
                          extra=f"persistence:\n  path: {tmp_path / 'broker.db'}\n  synchronous: {sync}\n")


def client(port: int, pki: DevPki, name: str) -> RawClient:
    return RawClient(port, pki.chain, pki.device(name))


def offline_subscriber(port: int, pki: DevPki) -> None:
    with client(port, pki, "pump-17") as owner:
        assert owner.connect("pump-17", clean=False).body == b"\x00\x00"
        assert owner.subscribe([("devices/pump-17/cmd/#", 1)]) == [1]
        owner.close()


def publish_acked(port: int, pki: DevPki, payloads: list[bytes], *, retained: bytes | None = None) -> None:
    with client(port, pki, "sensor-02") as commander:
        commander.connect("sensor-02")
        for index, payload in enumerate(payloads, start=1):
            commander.publish(CMD, payload, qos=1, packet_id=index)  # returns once PUBACKed
        if retained is not None:
            commander.publish("devices/sensor-02/status", retained, qos=1, packet_id=999, retain=True)
        commander.close()


def resume_and_read(port: int, pki: DevPki, n: int) -> list[bytes]:
    got = []
    with client(port, pki, "pump-17") as back:
        assert back.connect("pump-17", clean=False).body == b"\x01\x00"  # session present
        for _ in range(n):
            packet = back.read_until(PUBLISH)
            got.append(packet.payload)
            back.send(ack_packet(PUBACK, packet.packet_id))
        back.close()
    return got


def test_queued_messages_subscriptions_and_retained_survive_a_restart(
    tmp_path: Path, pki: DevPki, registry_file: Path
) -> None:
    path = settings(tmp_path, pki, registry_file)
    with BrokerThread(path) as broker:
        offline_subscriber(broker.port, pki)
        publish_acked(broker.port, pki, [b"one", b"two", b"three"], retained=b"online")
    with BrokerThread(path) as broker:
        broker.wait_event("store.restored")
        assert resume_and_read(broker.port, pki, 3) == [b"one", b"two", b"three"]
        with client(broker.port, pki, "pump-17") as watcher:
            watcher.connect("pump-17")
            assert watcher.subscribe([("devices/+/status", 1)]) == [1]
            retained = watcher.read_until(PUBLISH)
            assert (retained.topic, retained.payload, retained.retain) == ("devices/sensor-02/status", b"online",
                                                                           True)
        # the clean CONNECT above replaced the persistent session: nothing is left to resume
    with BrokerThread(path) as broker, client(broker.port, pki, "pump-17") as again:
        assert again.connect("pump-17", clean=False).body == b"\x00\x00"


@pytest.mark.parametrize("sync", ["full", "normal"])
def test_acknowledged_messages_survive_sigkill(tmp_path: Path, pki: DevPki, registry_file: Path, sync: str) -> None:
    port = free_port()
    path = settings(tmp_path, pki, registry_file, port=port, sync=sync)
    proc = BrokerProcess(path, port, log=tmp_path / "broker.log").start()
    try:
        offline_subscriber(port, pki)
        payloads = [f"cmd-{i}".encode() for i in range(200)]
        publish_acked(port, pki, payloads)
        proc.kill()  # no shutdown code runs
        proc = BrokerProcess(path, port, log=tmp_path / "broker.log").start()
        assert resume_and_read(port, pki, 200) == payloads
    finally:
        proc.stop()


def test_inflight_qos2_resumes_with_pubrel_after_a_restart(tmp_path: Path, pki: DevPki, registry_file: Path) -> None:
    path = settings(tmp_path, pki, registry_file)
    with BrokerThread(path) as broker, client(broker.port, pki, "pump-17") as owner:
        owner.connect("pump-17", clean=False)
        assert owner.subscribe([("devices/pump-17/cmd/#", 2)]) == [2]
        with client(broker.port, pki, "sensor-02") as commander:
            commander.connect("sensor-02")
            commander.publish(CMD, b"exactly once", qos=2, packet_id=5)
            commander.close()
        first = owner.read_until(PUBLISH)
        assert first.qos == 2 and first.payload == b"exactly once"
        owner.send(ack_packet(PUBREC, first.packet_id))
        assert owner.read_until(PUBREL).packet_id == first.packet_id
        owner.drop()  # gone before PUBCOMP
    with BrokerThread(path) as broker, client(broker.port, pki, "pump-17") as back:
        assert back.connect("pump-17", clean=False).body == b"\x01\x00"
        # past PUBREC the message is not sent again: only its PUBREL is
        assert back.read_until(PUBREL).packet_id == first.packet_id
        back.send(ack_packet(PUBCOMP, first.packet_id))
        assert back.ping()
