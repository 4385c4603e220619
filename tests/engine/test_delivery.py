"""No message lost: C-client bursts that disconnect at once, and wildcard grants with deny exceptions."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from tests.engine.conftest import Engine
from tests.support.mosquitto import client_args, needs_clients
from tests.support.raw import PUBLISH, RawClient, ack_packet, publish_packet, subscribe_packet

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


def _retain_many(client: RawClient, topics: list[str], payload: bytes) -> None:
    """Store one retained message per topic (QoS 0 in chunks, then a QoS 1 publish as a barrier)."""
    for start in range(0, len(topics), 500):
        client.send(b"".join(publish_packet(t, payload, retain=True) for t in topics[start:start + 500]))
    client.publish("lab/sync", b"", qos=1, packet_id=1)


def test_retained_delivery_survives_retained_changes_in_the_same_branch(engine: Engine) -> None:
    """A wildcard SUBSCRIBE over 4,000 retained messages (4 MB, sent in batches that yield while the slow
    reader catches up) while another device sets and clears retained messages in that very branch: every
    retained message that existed throughout arrives, once, and the delivery is not abandoned."""
    count = 4000
    broker = engine.start(limits={"max_retained_per_device": 2 * count, "max_retained_total": 3 * count})
    owner = engine.raw(broker.port, "sensor-01", timeout=30)
    assert owner.connect("sensor-01").body[1] == 0
    stable = [f"lab/keep/{n:05d}" for n in range(count)]
    _retain_many(owner, stable, b"s" * 1000)
    churner = engine.raw(broker.port, "sensor-02", timeout=30)
    assert churner.connect("sensor-02").body[1] == 0
    stop = threading.Event()
    churned = 0

    def churn() -> None:  # new siblings appear and vanish next to the subscriber's retained messages
        nonlocal churned
        while not stop.is_set():
            packet_id = churned % 60000 + 1
            churner.publish(f"lab/keep/churn-{churned % 20}", b"" if churned % 40 >= 20 else b"c", qos=1,
                            packet_id=packet_id, retain=True)
            churned += 1

    churning = threading.Thread(target=churn, daemon=True)
    churning.start()
    try:
        time.sleep(0.2)
        sub = engine.raw(broker.port, "pump-17", timeout=10, rcvbuf=4096)
        assert sub.connect("pump-17").body[1] == 0
        sub.send(subscribe_packet(1, "lab/keep/#", 0))
        time.sleep(1.0)  # a slow reader: the broker's transport fills, retained batches wait and resume
        retained: list[str] = []
        churn_until = time.monotonic() + 10  # then the live messages stop too, and the reader runs dry
        while True:
            if time.monotonic() > churn_until or len(retained) >= count + 20:
                stop.set()
            try:
                got = sub.read(timeout=2.0)
            except TimeoutError:
                break
            if got.kind == PUBLISH and got.retain:
                retained.append(got.topic)
    finally:
        stop.set()
        churning.join(10)
    assert churned > 20, "the other device changed nothing while the retained messages went out"
    kept = [t for t in retained if not t.startswith("lab/keep/churn-")]
    assert len(kept) == len(set(kept)), "a retained message was sent twice"
    missing = set(stable) - set(kept)
    assert not missing, f"{len(missing)} of {count} retained messages never arrived"
    assert broker.events.count("retained.abandoned") == 0


def test_abandoned_retained_delivery_is_an_event(engine: Engine) -> None:
    """A subscriber that stops reading while its retained messages go out: the delivery stops and says
    so (``retained.abandoned``, with how many were sent), once the write timeout passes."""
    count = 4000
    broker = engine.start(limits={"max_retained_per_device": count, "write_timeout": 1.0})
    owner = engine.raw(broker.port, "sensor-01", timeout=30)
    assert owner.connect("sensor-01").body[1] == 0
    _retain_many(owner, [f"lab/keep/{n:05d}" for n in range(count)], b"s" * 1000)
    sub = engine.raw(broker.port, "pump-17", timeout=10, rcvbuf=4096)
    assert sub.connect("pump-17").body[1] == 0
    sub.send(subscribe_packet(1, "lab/keep/#", 0))  # and never read again
    event = broker.wait_event("retained.abandoned", timeout=10)[0]
    assert event["reason"] in ("write_timeout", "connection_closed")
    assert event["device"] == "pump-17" and event["filter"] == "lab/keep/#"
    assert 0 < event["sent"] < count
