"""One client cannot hurt the others: bounded queues, write timeouts, topic and retained limits,
bounded decision caches, and a loop that keeps turning while 100,000 retained messages go out."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest

from tests.engine.conftest import Engine
from tests.support.raw import PUBACK, PUBLISH, RawClient, ack_packet, publish_packet, subscribe_packet

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def flood(client: RawClient, topics: Iterable[str], payload: bytes, *, batch: int = 500) -> None:
    """QoS 0 PUBLISHes written in batches, then one QoS 1 round trip: the broker has handled them all
    (packets of one connection are processed in order)."""
    chunk: list[bytes] = []
    for topic in topics:
        chunk.append(publish_packet(topic, payload))
        if len(chunk) == batch:
            client.send(b"".join(chunk))
            chunk.clear()
    if chunk:
        client.send(b"".join(chunk))
    client.publish("lab/sync", b"", qos=1, packet_id=65000)


def stalled_subscriber(engine: Engine, port: int, topic_filter: str) -> RawClient:
    """Subscribes, then never reads again; a 4 KiB receive window makes the stall bite at once."""
    client = engine.raw(port, "sensor-02", rcvbuf=4096)
    assert client.connect("sensor-02").body[1] == 0
    assert client.subscribe([(topic_filter, 0)]) == [0]
    return client


def test_stalled_reader_keeps_broker_memory_bounded(engine: Engine) -> None:
    """30 MiB published to a subscriber that stopped reading: the broker holds at most its outbound
    queue (here 1,000 messages / 1 MiB), drops QoS 0 with ``delivery.dropped queue_full``.
    The broker runs as its own process so its RSS is its own."""
    broker = engine.process(limits={"outbound_queue_messages": 1000, "outbound_queue_bytes": MIB,
                                    "write_timeout": 60}).start()
    stalled_subscriber(engine, broker.port, "lab/flood")
    pub = engine.raw(broker.port, "sensor-01", timeout=30)
    assert pub.connect("sensor-01").body[1] == 0
    payload = b"p" * 1024
    flood(pub, ("lab/flood" for _ in range(2000)), payload)  # warm-up: buffers and queues at their size
    before = broker.rss_bytes()
    flood(pub, ("lab/flood" for _ in range(30_000)), payload)
    grown = broker.rss_bytes() - before
    assert grown < 12 * MIB, f"broker grew by {grown / MIB:.1f} MiB for a reader that stopped reading"
    broker.wait_event("delivery.dropped", "queue_full")


def test_stalled_reader_is_aborted_after_the_write_timeout_and_others_keep_flowing(engine: Engine) -> None:
    broker = engine.start(limits={"write_timeout": 1.0})
    stalled = stalled_subscriber(engine, broker.port, "lab/flood")
    healthy = engine.raw(broker.port, "pump-17")
    assert healthy.connect("pump-17").body[1] == 0
    assert healthy.subscribe([("lab/other", 0)]) == [0]
    pub = engine.raw(broker.port, "sensor-01", timeout=30)
    assert pub.connect("sensor-01").body[1] == 0
    started = time.monotonic()
    payload = b"p" * 1024
    while broker.events.count("session.cut", "write_timeout") == 0:
        assert time.monotonic() - started < 6.0, "stalled reader not cut within 6 s (write_timeout 1 s)"
        pub.send(b"".join(publish_packet("lab/flood", payload) for _ in range(200)))
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    assert elapsed >= 1.0, f"cut after {elapsed:.2f}s, before the write timeout"
    event = broker.wait_event("session.cut", "write_timeout")[0]
    assert event.get("device") == "sensor-02"
    assert stalled.closed_by_peer(timeout=3)
    pub.publish("lab/other", b"still served", qos=1, packet_id=2)
    assert healthy.read_until(PUBLISH, timeout=2).payload == b"still served"


@pytest.mark.parametrize(("topic", "reason"), [
    ("lab/" + "a" * 1021, "topic_too_long"),  # 1,025 bytes, over the default max_topic_length 1024
    ("lab/" + "/".join(["l"] * 32), "topic_too_deep"),  # 33 levels, over the default max_topic_levels 32
], ids=["too_long", "too_deep"])
def test_topic_over_the_limits_is_refused(engine: Engine, topic: str, reason: str) -> None:
    broker = engine.start()
    watcher = engine.raw(broker.port, "sensor-02")
    assert watcher.connect("sensor-02").body[1] == 0
    assert watcher.subscribe([("lab/#", 0)]) == [0]
    client = engine.raw(broker.port, "sensor-01")
    assert client.connect("sensor-01").body[1] == 0
    assert client.subscribe([(topic, 0)]) == [0x80]
    broker.wait_event("subscribe.rejected", reason)
    client.send(publish_packet(topic, publish_packet("lab/smuggled", b"inside"), qos=0))
    broker.wait_event("publish.rejected", reason)
    client.publish("lab/after", b"after", qos=1, packet_id=2)  # if the connection stays, it stays in sync
    got = watcher.read_until(PUBLISH, timeout=2)
    assert (got.topic, got.payload) == ("lab/after", b"after")


def test_topic_at_the_limits_is_accepted(engine: Engine) -> None:
    """Guard for the limits above: exactly 1,024 bytes and exactly 32 levels pass."""
    broker = engine.start()
    watcher = engine.raw(broker.port, "sensor-02")
    assert watcher.connect("sensor-02").body[1] == 0
    longest, deepest = "lab/" + "a" * 1020, "lab/" + "/".join(["l"] * 31)
    assert len(longest.encode()) == 1024 and deepest.count("/") == 31
    assert watcher.subscribe([(longest, 0), (deepest, 0)]) == [0, 0]
    client = engine.raw(broker.port, "sensor-01")
    assert client.connect("sensor-01").body[1] == 0
    client.publish(longest, b"long", qos=1, packet_id=1)
    client.publish(deepest, b"deep", qos=1, packet_id=2)
    assert [watcher.read_until(PUBLISH).payload for _ in range(2)] == [b"long", b"deep"]


def test_retained_limits_per_device_and_in_total(engine: Engine) -> None:
    broker = engine.start(limits={"max_retained_per_device": 3, "max_retained_total": 5})
    first = engine.raw(broker.port, "sensor-01")
    assert first.connect("sensor-01").body[1] == 0
    for n in (1, 2, 3):
        first.publish(f"lab/r/{n}", f"r{n}".encode(), qos=1, packet_id=n, retain=True)
    first.publish("lab/r/4", b"r4", qos=1, packet_id=4, retain=True)
    event = broker.wait_event("publish.rejected", "retained_limit")[0]
    assert event.get("device") == "sensor-01"
    first.publish("lab/r/1", b"r1 updated", qos=1, packet_id=5, retain=True)  # replacing is not adding
    first.publish("lab/r/2", b"", qos=1, packet_id=6, retain=True)  # clearing frees a slot
    first.publish("lab/r/4", b"r4", qos=1, packet_id=7, retain=True)
    second = engine.raw(broker.port, "sensor-02")
    assert second.connect("sensor-02").body[1] == 0
    second.publish("lab/s/1", b"s1", qos=1, packet_id=1, retain=True)
    second.publish("lab/s/2", b"s2", qos=1, packet_id=2, retain=True)
    second.publish("lab/s/3", b"s3", qos=1, packet_id=3, retain=True)  # the sixth in total
    broker.wait_count("publish.rejected", "retained_limit", 2)
    reader = engine.raw(broker.port, "pump-17")
    assert reader.connect("pump-17").body[1] == 0
    assert reader.subscribe([("lab/#", 0)]) == [0]
    retained: dict[str, bytes] = {}
    while True:
        try:
            got = reader.read(timeout=1.0)
        except TimeoutError:
            break
        if got.kind == PUBLISH and got.retain:
            retained[got.topic] = got.payload
    assert retained == {"lab/r/1": b"r1 updated", "lab/r/3": b"r3", "lab/r/4": b"r4", "lab/s/1": b"s1",
                        "lab/s/2": b"s2"}


def test_decision_cache_is_bounded_by_bytes(engine: Engine) -> None:
    """20,000 distinct 1,000-byte topics published and delivered: the ACL decision cache stays within
    ``decision_cache_bytes`` (1 MiB here) instead of keeping every topic (broker in its own process)."""
    broker = engine.process(limits={"decision_cache_bytes": MIB}).start()
    sub = engine.raw(broker.port, "sensor-02", timeout=30)
    assert sub.connect("sensor-02").body[1] == 0
    assert sub.subscribe([("lab/#", 0)]) == [0]
    counted = sub.count_publishes_in_background()
    pub = engine.raw(broker.port, "sensor-01", timeout=30)
    assert pub.connect("sensor-01").body[1] == 0
    flood(pub, (f"lab/w/{n}/" + "t" * 980 for n in range(1000)), b"x", batch=100)
    before = broker.rss_bytes()
    flood(pub, (f"lab/c/{n:05d}/" + "t" * 980 for n in range(20_000)), b"x", batch=100)
    grown = broker.rss_bytes() - before
    assert grown < 12 * MIB, f"broker grew by {grown / MIB:.1f} MiB for 20 MB of distinct topics"
    assert counted.join(10) > 0


def test_wildcard_subscribe_over_100k_retained_does_not_stall_the_loop(engine: Engine) -> None:
    """Retained messages are matched through the router and sent in batches that yield: with 100,000
    retained, no wildcard SUBSCRIBE stalls the broker's loop for more than 200 ms at a time."""
    count = 100_000
    broker = engine.start(limits={"max_retained_per_device": count, "max_retained_total": count})
    pub = engine.raw(broker.port, "sensor-01", timeout=60)
    assert pub.connect("sensor-01").body[1] == 0
    chunk: list[bytes] = []
    for n in range(count):
        chunk.append(publish_packet(f"lab/ret/{n % 100}/{n}", b"v", retain=True))
        if len(chunk) == 1000:
            pub.send(b"".join(chunk))
            chunk.clear()
    pub.publish("lab/sync", b"", qos=1, packet_id=1)
    probe = broker.lag_probe()
    bystander = engine.raw(broker.port, "pump-18")
    assert bystander.connect("pump-18").body[1] == 0
    subscribers = []
    for name, topic_filter in (("sensor-02", "lab/#"), ("pump-17", "lab/ret/+/#")):
        sub = engine.raw(broker.port, name, timeout=10)
        assert sub.connect(name).body[1] == 0
        started = time.monotonic()
        sub.send(subscribe_packet(1, topic_filter, 0))  # no wait for the SUBACK: retained follow it
        subscribers.append(sub.count_publishes_in_background(idle=2.0))
        # meanwhile, another device is served at once
        ping_started = time.monotonic()
        assert bystander.ping(timeout=1.0)
        assert time.monotonic() - ping_started < 0.5
        assert time.monotonic() - started < 5
    received = sum(counted.join(30) for counted in subscribers)
    broker.stop_probe(probe)
    assert probe.samples > 10
    assert received > 0
    assert probe.max_stall < 0.2, f"event loop stalled for {probe.max_stall * 1000:.0f} ms"


def test_qos0_is_dropped_before_qos1_when_the_outbound_queue_is_full(engine: Engine) -> None:
    """A full outbound queue sheds QoS 0 first: QoS 1 published behind 10,000 QoS 0 (10 MiB, more than
    the socket buffers hold) all arrive once the reader reads again."""
    broker = engine.start(limits={"outbound_queue_messages": 100, "write_timeout": 60})
    reader = engine.raw(broker.port, "sensor-02", rcvbuf=4096, timeout=10)
    assert reader.connect("sensor-02").body[1] == 0
    assert reader.subscribe([("lab/mixed/#", 1)]) == [1]
    pub = engine.raw(broker.port, "sensor-01", timeout=30)
    assert pub.connect("sensor-01").body[1] == 0
    pub.send(b"".join(publish_packet("lab/mixed/q0", b"z" * 1024) for _ in range(10_000)))
    for n in range(20):
        pub.publish("lab/mixed/q1", f"important {n}".encode(), qos=1, packet_id=n + 1)
    broker.wait_event("delivery.dropped", "queue_full")
    important: list[bytes] = []
    while True:
        try:
            got = reader.read(timeout=2.0)
        except TimeoutError:
            break
        if got.kind == PUBLISH and got.qos == 1:
            important.append(got.payload)
            reader.send(ack_packet(PUBACK, got.packet_id))
    assert important == [f"important {n}".encode() for n in range(20)]


def test_unacknowledged_deliveries_never_exceed_max_inflight(engine: Engine) -> None:
    """``max_inflight`` (here 10): a subscriber that does not PUBACK gets 10 QoS 1 messages, then the
    rest one for each acknowledgement, in order."""
    broker = engine.start(limits={"max_inflight": 10})
    sub = engine.raw(broker.port, "sensor-02")
    assert sub.connect("sensor-02").body[1] == 0
    assert sub.subscribe([("lab/window", 1)]) == [1]
    pub = engine.raw(broker.port, "sensor-01")
    assert pub.connect("sensor-01").body[1] == 0
    for n in range(30):
        pub.publish("lab/window", f"{n:02d}".encode(), qos=1, packet_id=n + 1)
    first = [sub.read_until(PUBLISH, timeout=2) for _ in range(10)]
    with pytest.raises(TimeoutError):
        sub.read(timeout=0.7)  # the window is full
    got = [p.payload for p in first]
    for packet in first:
        sub.send(ack_packet(PUBACK, packet.packet_id))
    while len(got) < 30:
        packet = sub.read_until(PUBLISH, timeout=2)
        got.append(packet.payload)
        sub.send(ack_packet(PUBACK, packet.packet_id))
    assert got == [f"{n:02d}".encode() for n in range(30)]
