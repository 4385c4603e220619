"""No message lost: C-client bursts that disconnect at once, and wildcard grants with deny exceptions."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from tests.engine.conftest import Engine
from tests.support.mosquitto import client_args, needs_clients
from tests.support.raw import PUBLISH, RawClient, ack_packet

pytestmark = pytest.mark.integration


def drain(client: RawClient, expected: int, *, idle: float = 3.0, limit: float = 30.0) -> list[bytes]:
    """Read PUBLISHes (acking QoS 1) until ``expected`` arrived or none came for ``idle`` seconds."""
    payloads: list[bytes] = []
    deadline = time.monotonic() + limit
    while len(payloads) < expected and time.monotonic() < deadline:
        try:
            got = client.read(timeout=idle)
        except TimeoutError:
            break
        if got.kind == PUBLISH:
            payloads.append(got.payload)
            if got.qos == 1:
                client.send(ack_packet(4, got.packet_id))
    return payloads


@needs_clients
@pytest.mark.parametrize("qos", [0, 1])
def test_mosquitto_pub_burst_then_disconnect_is_delivered_whole(engine: Engine, qos: int) -> None:
    """``mosquitto_pub -l``: 5,000 lines of 507 bytes as fast as the link allows, then DISCONNECT at EOF (a sleepy
    sensor's pattern). Every message that reached the broker before the DISCONNECT is delivered."""
    count = 5000
    broker = engine.start()
    sub = engine.raw(broker.port, "sensor-02", timeout=10)
    assert sub.connect("sensor-02").body[1] == 0
    assert sub.subscribe([("lab/burst", qos)]) == [qos]
    lines = "".join(f"m{n:05d} {'x' * 500}\n" for n in range(count))  # 507-byte samples
    # the subscriber reads at full speed while the burst runs (a reader that stopped reading is a
    # different case: its queue is bounded, see test_limits.py)
    received: list[list[bytes]] = []
    reader = threading.Thread(target=lambda: received.append(drain(sub, count)))
    reader.start()
    pub = subprocess.run(
        client_args("mosquitto_pub", broker.port, engine.pki.chain, engine.pki.device("sensor-01"), "sensor-01",
                    "-t", "lab/burst", "-q", str(qos), "-l"),
        input=lines, capture_output=True, text=True, timeout=60, check=False,
    )
    reader.join(60)
    assert pub.returncode == 0, pub.stderr
    payloads = received[0]
    missing = count - len(set(payloads))
    assert missing == 0, f"{missing} of {count} QoS {qos} messages never reached the subscriber"
    assert len(payloads) == count, f"{len(payloads) - count} duplicates"
    if qos == 1:
        assert payloads == sorted(payloads), "QoS 1 from one publisher must arrive in order (MQTT 4.6)"


def test_wildcard_subscription_with_a_deny_exception_is_granted_and_withholds_the_denied(engine: Engine) -> None:
    """``allow subscribe sites/{site}/#`` + ``deny subscribe sites/{site}/admin/#`` (the operator role):
    ``sites/plant-a/#`` is granted; the admin messages are never delivered, live or retained."""
    broker = engine.start()
    pub = engine.raw(broker.port, "sensor-02")
    assert pub.connect("sensor-02").body[1] == 0
    pub.publish("sites/plant-a/admin/retained", b"admin retained", qos=1, packet_id=1, retain=True)
    pub.publish("sites/plant-a/line-1/retained", b"line retained", qos=1, packet_id=2, retain=True)
    operator = engine.raw(broker.port, "alice")
    assert operator.connect("alice").body[1] == 0
    # the refused filters first: RawClient.subscribe skips PUBLISHes while it waits for a SUBACK, and the
    # retained messages of a granted filter follow its SUBACK at once
    assert operator.subscribe([("sites/plant-a/admin/#", 1)], packet_id=2) == [0x80]  # the exception itself
    assert operator.subscribe([("sites/plant-b/#", 1)], packet_id=3) == [0x80]  # not its site
    assert operator.subscribe([("sites/plant-a/#", 1)]) == [1]
    pub.publish("sites/plant-a/admin/reset", b"admin live", qos=1, packet_id=3)
    pub.publish("sites/plant-a/line-1/temp", b"21.5", qos=1, packet_id=4)
    got = drain(operator, 3, idle=1.0)
    assert sorted(got) == [b"21.5", b"line retained"]


def test_subscription_cap_refuses_with_a_reason_and_others_are_unaffected(engine: Engine) -> None:
    """``max_subscriptions_per_client`` (default 1000): 1,500 filters from one device, 500 refused (0x80)
    with ``subscribe.rejected too_many_subscriptions``; another pair keeps its delivery."""
    broker = engine.start()
    greedy = engine.raw(broker.port, "sensor-01", timeout=20)
    assert greedy.connect("sensor-01").body[1] == 0
    codes: list[int] = []
    for batch in range(15):
        filters = [(f"lab/greedy/{batch}/{n}/#", 0) for n in range(100)]
        codes += greedy.subscribe(filters, packet_id=batch + 1)
    assert codes.count(0) == 1000
    assert codes[1000:] == [0x80] * 500
    broker.wait_event("subscribe.rejected", "too_many_subscriptions")
    # re-subscribing an existing filter replaces it and is not counted again
    assert greedy.subscribe([("lab/greedy/0/0/#", 1)], packet_id=99) == [1]
    sub = engine.raw(broker.port, "pump-17")
    assert sub.connect("pump-17").body[1] == 0
    assert sub.subscribe([("devices/+/telemetry/#", 1)]) == [1]
    pub = engine.raw(broker.port, "pump-18")
    assert pub.connect("pump-18").body[1] == 0
    started = time.monotonic()
    for n in range(300):
        pub.publish(f"devices/pump-18/telemetry/t{n}", b"x", qos=1, packet_id=n + 1)
    assert len(drain(sub, 300, idle=2.0)) == 300
    assert time.monotonic() - started < 10
