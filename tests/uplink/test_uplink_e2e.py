"""The uplink end to end: our broker -> the uplink process -> a real mosquitto "cloud", and back down."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from edge_core.clock import ManualClock
from edge_core.envelope import sign_command
from gateway_agent.cli import main
from gateway_agent.commanding import load_signing_key
from gateway_agent.pki import new_key
from gateway_agent.uplink_devcloud import MosquittoCloud
from tests.support.broker import BrokerThread
from tests.support.mqtt import Device
from tests.support.pki import DevPki
from tests.uplink.conftest import CloudClient, UplinkProcess, free_port, needs_mosquitto, write_uplink_config

pytestmark = [pytest.mark.integration, needs_mosquitto]

INFLIGHT = 16
TOPIC = "sites/plant-a/gateways/gw-01/devices/sensor-01/telemetry/seq"


def _publish(device: Device, start: int, stop: int) -> None:
    for n in range(start, stop):
        device.publish("devices/sensor-01/telemetry/seq", str(n).encode(), qos=1)


def _numbers(received: list[tuple[str, bytes]]) -> list[int]:
    assert {topic for topic, _ in received} <= {TOPIC}, {topic for topic, _ in received}
    return [int(payload) for _, payload in received]


def test_outage_restart_and_crash_lose_nothing_and_keep_order(
    local_broker: BrokerThread, cloud: MosquittoCloud, pki: DevPki, tmp_path: Path,
    uplink_process: Callable[[Path, int], UplinkProcess], cloud_client: Callable[..., CloudClient],
) -> None:
    app = cloud_client("cloud-app")
    app.subscribe("sites/#")
    port = free_port()
    uplink = uplink_process(write_uplink_config(tmp_path, local_port=local_broker.port, cloud=cloud, pki=pki,
                                                status_port=port, inflight=INFLIGHT), port).start()
    uplink.wait(lambda s: s["cloud"]["connected"] and s["local"]["connected"], what="both sessions up")
    device = Device(local_broker.port, pki.chain, pki.device("sensor-01"), "sensor-01")
    assert device.connect() == 0
    try:
        _publish(device, 0, 100)                                     # cloud up
        uplink.wait(lambda s: s["forwarded"] >= 100, what="100 forwarded")

        cloud.stop()                                                 # the cloud goes away
        uplink.wait(lambda s: not s["cloud"]["connected"], what="cloud down noticed")
        _publish(device, 100, 300)
        uplink.wait(lambda s: s["queue"]["depth"] == 200, what="200 queued")

        uplink.stop()                                                # clean restart mid-outage
        _publish(device, 300, 350)                                   # the broker holds these for the session
        uplink.start()
        uplink.wait(lambda s: s["queue"]["depth"] == 250, what="250 queued after restart")

        uplink.stop(kill=True)                                       # crash (kill -9) mid-outage
        # published while the uplink is dead: the broker keeps them for the persistent session (queued,
        # or in flight on the dead connection and resent on resume), and they arrive after the restart
        _publish(device, 350, 400)
        uplink.start()
        status = uplink.wait(lambda s: s["queue"]["depth"] == 300, what="300 queued after kill -9")
        assert status["queue"]["oldest_age_s"] > 0

        cloud.start()                                                # the cloud is back
        uplink.wait(lambda s: s["queue"]["depth"] == 0, what="queue drained", timeout=30)
        _publish(device, 400, 450)                                   # and live traffic again
        received = _numbers(app.collect(450 + 4 * INFLIGHT, timeout=15))
    finally:
        device.close()

    first_seen: list[int] = []
    seen: set[int] = set()
    for n in received:
        if n not in seen:
            seen.add(n)
            first_seen.append(n)
    assert first_seen == list(range(450)), "every message, in order"
    duplicates = len(received) - len(first_seen)
    assert duplicates <= 3 * INFLIGHT, f"{duplicates} duplicates, more than the in-flight window per reconnect"
    metrics = uplink.metrics()
    assert "gateway_agent_uplink_queue_depth 0.0" in metrics
    assert "gateway_agent_uplink_forwarded_total" in metrics


def _persisted_since(cloud: MosquittoCloud, moment: float) -> bool:
    """The cloud saved its state (sessions, subscriptions) after ``moment``: a SIGKILL keeps them."""
    db = cloud.dir / "mosquitto.db"
    return db.exists() and db.stat().st_mtime > moment


def test_cloud_killed_with_messages_in_flight_loses_nothing_and_counts_its_duplicates(
    local_broker: BrokerThread, cloud: MosquittoCloud, pki: DevPki, tmp_path: Path,
    uplink_process: Callable[[Path, int], UplinkProcess], cloud_client: Callable[..., CloudClient],
) -> None:
    """A steady publisher; the cloud hangs mid-stream with a full window unacknowledged, is killed, comes back.

    Each message leaves the queue only on its PUBACK, so every one arrives, in order; what was in
    flight is sent again, counted as ``resent``, never more than the window.
    """
    total = 600
    app = cloud_client("cloud-app")                                  # persistent QoS 1 subscriber in the cloud
    app.subscribe("sites/#")
    subscribed = time.time()
    port = free_port()
    uplink = uplink_process(write_uplink_config(tmp_path, local_port=local_broker.port, cloud=cloud, pki=pki,
                                                status_port=port, inflight=INFLIGHT), port).start()
    uplink.wait(lambda s: s["cloud"]["connected"] and s["local"]["connected"], what="both sessions up")
    uplink.wait(lambda s: _persisted_since(cloud, subscribed), what="the cloud saved the subscription")
    device = Device(local_broker.port, pki.chain, pki.device("sensor-01"), "sensor-01")
    assert device.connect() == 0

    def steady() -> None:
        for n in range(total):
            device.publish("devices/sensor-01/telemetry/seq", str(n).encode(), qos=1)
            time.sleep(0.002)

    publisher = threading.Thread(target=steady, name="steady-publisher")
    publisher.start()
    try:
        received = app.collect(150, timeout=20)                     # mid-stream
        assert cloud.proc is not None
        os.kill(cloud.proc.pid, signal.SIGSTOP)                     # the cloud hangs: no PUBACK comes back
        uplink.wait(lambda s: s["queue"]["depth"] >= 2 * INFLIGHT, what="a full window in flight")
        cloud.stop(kill=True)                                        # and dies (SIGKILL)
        down = uplink.wait(lambda s: not s["cloud"]["connected"], what="cloud down noticed")
        assert down["resent"] == 0
        uplink.wait(lambda s: s["queue"]["depth"] >= down["queue"]["depth"] + 20, what="more queued while down")
        cloud.start()
        publisher.join(60)
        assert not publisher.is_alive()
        status = uplink.wait(lambda s: s["received"] == total and s["queue"]["depth"] == 0, what="queue drained",
                             timeout=30)
        deadline = time.monotonic() + 15
        while set(_numbers(received)) != set(range(total)) and time.monotonic() < deadline:
            received += app.collect(total, timeout=0.5)
        received += app.collect(total, timeout=0.5)                 # late copies, if any
    finally:
        publisher.join(60)
        device.close()

    numbers = _numbers(received)
    first_seen = list(dict.fromkeys(numbers))
    assert first_seen == list(range(total)), "every message, in order"
    # copies the uplink sent twice: those the cloud broker did not itself send again (DUP) to its subscriber
    fresh = Counter(numbers) - Counter(_numbers(app.redelivered))
    seen_twice = sum(n - 1 for n in fresh.values() if n > 1)
    assert status["forwarded"] == total
    assert status["resent"] == INFLIGHT, "the whole window was in flight when the cloud died"
    assert seen_twice <= status["resent"] <= INFLIGHT, (seen_twice, status["resent"])
    assert f"gateway_agent_uplink_resent_total {float(INFLIGHT)}" in uplink.metrics()


def test_forged_downlink_command_is_refused_by_the_broker(
    local_broker: BrokerThread, cloud: MosquittoCloud, pki: DevPki, tmp_path: Path, broker_clock: ManualClock,
    uplink_process: Callable[[Path, int], UplinkProcess], cloud_client: Callable[..., CloudClient],
) -> None:
    port = free_port()
    uplink = uplink_process(write_uplink_config(tmp_path, local_port=local_broker.port, cloud=cloud, pki=pki,
                                                status_port=port), port).start()
    uplink.wait(lambda s: s["cloud"]["connected"] and s["local"]["connected"], what="both sessions up")
    device = Device(local_broker.port, pki.chain, pki.device("sensor-01"), "sensor-01")
    assert device.connect() == 0
    assert device.subscribe("devices/sensor-01/cmd/#") == [1]
    operator = cloud_client("cloud-operator", persistent=False)
    cmd_topic = "sites/plant-a/gateways/gw-01/devices/sensor-01/cmd/valve"
    try:
        # forged: a well-formed envelope naming operator alice, signed with a key that is not hers
        forged = sign_command(new_key(), issuer="alice", kid="alice", device="sensor-01",
                              body={"op": "open"}, ttl=timedelta(seconds=30), now=broker_clock.now())
        operator.publish(cmd_topic, forged)
        event = local_broker.wait_event("command.rejected", timeout=10)[-1]
        assert event["reason"] in {"bad_signature", "unknown_issuer"}
        assert event["device"] == "sensor-01"
        assert event["sender"] == "gateway-uplink"
        device.expect_none(0.5)

        # not a command topic of the downlink rules: the cloud broker's ACL refuses it for the operator,
        # and the uplink has no subscription for it anyway
        operator.publish("sites/plant-a/gateways/gw-01/devices/sensor-01/telemetry/x", b"spoof")

        # the real thing: alice's envelope, signed in the cloud, goes through
        genuine = sign_command(load_signing_key(pki.root / "operators" / "alice-signing.key"), issuer="alice",
                               kid="alice", device="sensor-01", body={"op": "open"}, ttl=timedelta(seconds=30),
                               now=broker_clock.now())
        operator.publish(cmd_topic, genuine)
        got = device.expect(10)
        assert got.topic == "devices/sensor-01/cmd/valve"
        assert got.payload == genuine
        local_broker.wait_event("command.accepted", timeout=5)
        status = uplink.wait(lambda s: s["downlink"]["forwarded"] >= 2, what="two downlink messages")
        assert status["downlink"]["refused"] == {}
        assert main(["uplink", "status", "-c", str(uplink.config)]) == 0
    finally:
        device.close()

