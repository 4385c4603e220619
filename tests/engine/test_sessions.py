"""Sessions and QoS seen from the wire: keep-alive, wills, resends on resume, takeovers, clean flags."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

from tests.engine.conftest import ENGINE_ACL, Engine
from tests.support.raw import (
    CONNACK,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    Packet,
    RawClient,
    Will,
    ack_packet,
    connect_packet,
    publish_packet,
)

pytestmark = pytest.mark.integration

# A timer set for 7.5 s fires a little after it: this much scheduling slack, no more.
TIMER_SLACK = 0.25
# ... and may start up to this much before our own measurement (CONNECT received -> CONNACK read here).
EARLY_SLACK = 0.5


def test_silent_client_is_cut_at_one_and_a_half_keepalive_and_its_will_fires(engine: Engine) -> None:
    """MQTT-3.1.2-24: no packet for 1.5 x keep-alive (5 s) means disconnect, and the will is published."""
    broker = engine.start()
    watcher = engine.raw(broker.port, "pump-17", timeout=10)
    assert watcher.connect("pump-17", keepalive=60).body[1] == 0
    assert watcher.subscribe([("devices/+/status", 1)]) == [1]
    silent = engine.raw(broker.port, "sensor-01", timeout=10)
    ack = silent.connect("sensor-01", keepalive=5, will=Will("devices/sensor-01/status", b"offline", qos=1))
    assert ack.body[1] == 0
    last_packet = time.monotonic()
    assert silent.closed_by_peer(timeout=10), "still connected 10 s after the last packet (keep-alive 5 s)"
    elapsed = time.monotonic() - last_packet
    # the broker's clock starts at the CONNECT it received, ours at the CONNACK: a cut well before 7.5 s
    # (at 1 x keep-alive, 5 s) is too early, one after it too late
    assert 7.5 - EARLY_SLACK <= elapsed <= 7.5 + TIMER_SLACK, f"cut after {elapsed:.2f}s, expected at 7.5 s (1.5 x 5 s)"
    will = watcher.read_until(PUBLISH, timeout=1.0)
    assert (will.topic, will.payload) == ("devices/sensor-01/status", b"offline")
    assert time.monotonic() - last_packet <= 7.5 + TIMER_SLACK + 1.0
    broker.wait_event("session.keepalive_timeout", timeout=1.0)


def test_pingreq_within_the_keepalive_keeps_the_connection(engine: Engine) -> None:
    """Guard for the test above: a client that pings in time is never cut (keep-alive 2 s, pings every 1 s)."""
    broker = engine.start()
    client = engine.raw(broker.port, "sensor-01")
    assert client.connect("sensor-01", keepalive=2).body[1] == 0
    for _ in range(5):
        time.sleep(1.0)
        assert client.ping(timeout=1.0)
    assert broker.events.count("session.keepalive_timeout") == 0


def _persistent_subscriber(engine: Engine, port: int, name: str, topic_filter: str, qos: int) -> RawClient:
    client = engine.raw(port, name)
    assert client.connect(name, clean=False).body[1] == 0
    assert client.subscribe([(topic_filter, qos)]) == [qos]
    return client


def test_unacknowledged_qos1_and_qos2_are_resent_on_resume(engine: Engine) -> None:
    """MQTT-4.4.0-1: on resume with clean session 0 the server resends unacknowledged PUBLISH (DUP set)
    and PUBREL packets, with their original packet ids."""
    broker = engine.start()
    sub = _persistent_subscriber(engine, broker.port, "pump-17", "devices/pump-17/cmd/#", 2)
    pub = engine.raw(broker.port, "sensor-02")
    assert pub.connect("sensor-02").body[1] == 0
    pub.publish("devices/pump-17/cmd/a", b"qos1-unacked", qos=1, packet_id=1)
    pub.publish("devices/pump-17/cmd/b", b"qos2-unreceived", qos=2, packet_id=2)
    pub.publish("devices/pump-17/cmd/c", b"qos2-pubrec-sent", qos=2, packet_id=3)
    first = [sub.read_until(PUBLISH) for _ in range(3)]
    assert [p.payload for p in first] == [b"qos1-unacked", b"qos2-unreceived", b"qos2-pubrec-sent"]
    ids = {p.payload: p.packet_id for p in first}
    sub.send(ack_packet(PUBREC, ids[b"qos2-pubrec-sent"]))  # the broker now owes a PUBREL for this one
    assert sub.read_until(PUBREL).packet_id == ids[b"qos2-pubrec-sent"]
    sub.drop()  # power loss: nothing else acknowledged

    back = engine.raw(broker.port, "pump-17")
    ack = back.connect("pump-17", clean=False)
    assert ack.body == b"\x01\x00"  # session present
    resent: list[Packet] = []
    deadline = time.monotonic() + 3
    while len(resent) < 3 and time.monotonic() < deadline:
        resent.append(back.read(timeout=max(0.01, deadline - time.monotonic())))
    publishes = {p.payload: p for p in resent if p.kind == PUBLISH}
    assert set(publishes) == {b"qos1-unacked", b"qos2-unreceived"}, resent
    for payload, packet in publishes.items():
        assert packet.dup, f"{payload!r} resent without DUP"
        assert packet.packet_id == ids[payload]
    assert [p.packet_id for p in resent if p.kind == PUBREL] == [ids[b"qos2-pubrec-sent"]]
    back.send(ack_packet(PUBACK, ids[b"qos1-unacked"]))
    back.send(ack_packet(PUBREC, ids[b"qos2-unreceived"]))
    assert back.read_until(PUBREL).packet_id == ids[b"qos2-unreceived"]
    back.send(ack_packet(PUBCOMP, ids[b"qos2-unreceived"]))
    back.send(ack_packet(PUBCOMP, ids[b"qos2-pubrec-sent"]))
    assert back.ping()
    back.drop()
    # everything acknowledged: a second resume resends nothing
    again = engine.raw(broker.port, "pump-17")
    assert again.connect("pump-17", clean=False).body == b"\x01\x00"
    with pytest.raises(TimeoutError):
        again.read(timeout=0.7)


def test_inbound_qos2_completes_across_a_reconnect_exactly_once(engine: Engine) -> None:
    """A publisher that got PUBREC, lost its link and sends PUBREL on resume gets PUBCOMP; one delivery."""
    broker = engine.start()
    sub = engine.raw(broker.port, "pump-17")
    assert sub.connect("pump-17").body[1] == 0
    assert sub.subscribe([("devices/pump-17/cmd/#", 2)]) == [2]
    pub = engine.raw(broker.port, "sensor-02")
    assert pub.connect("sensor-02", clean=False).body[1] == 0
    pub.send(publish_packet("devices/pump-17/cmd/once", b"exactly once", qos=2, packet_id=9))
    assert pub.read_until(PUBREC).packet_id == 9
    pub.send(publish_packet("devices/pump-17/cmd/once", b"exactly once", qos=2, packet_id=9, dup=True))
    assert pub.read_until(PUBREC).packet_id == 9
    pub.drop()
    again = engine.raw(broker.port, "sensor-02")
    assert again.connect("sensor-02", clean=False).body == b"\x01\x00"
    again.send(ack_packet(PUBREL, 9))
    assert again.read_until(PUBCOMP).packet_id == 9
    deliveries = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        try:
            got = sub.read(timeout=max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            break
        if got.kind == PUBLISH:
            deliveries.append(got.payload)
            sub.send(ack_packet(PUBREC, got.packet_id))
        elif got.kind == PUBREL:
            sub.send(ack_packet(PUBCOMP, got.packet_id))
    assert deliveries == [b"exactly once"]


@pytest.mark.parametrize("goodbye", ["disconnect", "drop"])
def test_clean_then_persistent_quick_reconnect_keeps_queued_messages(engine: Engine, goodbye: str) -> None:
    """The clean flag is taken from each CONNECT: clean, then at once persistent, then offline, must queue."""
    broker = engine.start()
    first = engine.raw(broker.port, "pump-17")
    assert first.connect("pump-17", clean=True).body[1] == 0
    first.close() if goodbye == "disconnect" else first.drop()
    persistent = engine.raw(broker.port, "pump-17")  # no pause: the quick reconnect
    assert persistent.connect("pump-17", clean=False).body == b"\x00\x00"
    assert persistent.subscribe([("devices/pump-17/cmd/#", 1)]) == [1]
    persistent.close()
    pub = engine.raw(broker.port, "sensor-02")
    assert pub.connect("sensor-02").body[1] == 0
    for n in range(3):
        pub.publish(f"devices/pump-17/cmd/{n}", f"queued {n}".encode(), qos=1, packet_id=n + 1)
    back = engine.raw(broker.port, "pump-17")
    assert back.connect("pump-17", clean=False).body == b"\x01\x00"
    got = []
    for _ in range(3):
        packet = back.read_until(PUBLISH, timeout=3)
        got.append(packet.payload)
        back.send(ack_packet(PUBACK, packet.packet_id))
    assert got == [b"queued 0", b"queued 1", b"queued 2"]


def _connack_times(clients: list[RawClient], timeout: float) -> list[float | None]:
    """When each client got its CONNACK 0 (monotonic), or None (refused, closed, or nothing in time)."""
    times: list[float | None] = [None] * len(clients)

    def wait(n: int) -> None:
        with contextlib.suppress(EOFError, OSError, TimeoutError, AssertionError):
            ack = clients[n].read_until(CONNACK, timeout=timeout)
            if ack.body[1] == 0:
                times[n] = time.monotonic()

    threads = [threading.Thread(target=wait, args=(n,)) for n in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 1)
    return times


RACERS = 4


@pytest.mark.parametrize("gap", [0.0, 0.05], ids=["simultaneous", "50ms_apart"])
def test_racing_takeovers_of_one_identity_the_newest_wins_within_a_second(engine: Engine, gap: float) -> None:
    """A live session, then four new connections of the same identity whose CONNECTs race: within 1 s
    exactly one of them is connected (the latest sender when they are 50 ms apart); the others and the
    first session are closed; nothing hangs."""
    broker = engine.start()
    for round_no in range(8):
        live = engine.raw(broker.port, "pump-17", timeout=2)
        assert live.connect("pump-17", clean=False).body[1] == 0
        racers = [engine.raw(broker.port, "pump-17", timeout=2) for _ in range(RACERS)]
        started = time.monotonic()
        for racer in racers:
            racer.send(connect_packet("pump-17", clean=False))
            if gap:
                time.sleep(gap)
        accepted = _connack_times(racers, timeout=1.0)
        assert any(t is not None for t in accepted), f"round {round_no}: no racer connected within 1 s"
        assert max(t for t in accepted if t is not None) - started < 1.0
        alive = [n for n, racer in enumerate(racers) if accepted[n] is not None and racer.ping(timeout=1.0)]
        assert len(alive) == 1, f"round {round_no}: {len(alive)} racers connected, expected exactly one"
        winner = alive[0]
        if gap:
            assert winner == RACERS - 1, f"round {round_no}: racer {winner} won, not the newest"
        for n, racer in enumerate(racers):
            if n != winner:
                assert racer.closed_by_peer(timeout=1.0), f"round {round_no}: racer {n} is still connected"
        assert live.closed_by_peer(timeout=1.0), f"round {round_no}: the first connection was not taken over"
        assert racers[winner].ping(timeout=1.0), f"round {round_no}: the winner lost its session"
        racers[winner].close()
    final = engine.raw(broker.port, "pump-17", timeout=2)
    assert final.connect("pump-17", clean=False).body == b"\x01\x00"


def test_sigterm_fires_no_will_but_a_dropped_device_still_does(engine: Engine) -> None:
    """A planned shutdown (SIGTERM to ``edge-broker run``) is not the devices going away: their wills are
    withheld (one ``will.suppressed reason=broker_shutdown`` with the count), so a persistent subscriber
    finds no "offline" after the restart. A device that drops its TCP connection without DISCONNECT
    before that still has its will published."""
    broker = engine.process(persistence="full").start()
    observer = engine.raw(broker.port, "pump-17")
    assert observer.connect("pump-17", clean=False).body[1] == 0
    assert observer.subscribe([("devices/+/status", 1)]) == [1]
    dropped = engine.raw(broker.port, "pump-18")
    assert dropped.connect("pump-18", will=Will("devices/pump-18/status", b"gone", qos=1)).body[1] == 0
    device = engine.raw(broker.port, "sensor-01")
    assert device.connect("sensor-01", keepalive=60, will=Will("devices/sensor-01/status", b"offline",
                                                               qos=1)).body[1] == 0
    dropped.drop()  # vanishes without DISCONNECT: its will is published
    will = observer.read_until(PUBLISH, timeout=5)
    assert (will.topic, will.payload) == ("devices/pump-18/status", b"gone")
    observer.send(ack_packet(PUBACK, will.packet_id))
    assert observer.ping(timeout=2)  # the PUBACK was handled: nothing of pump-18's will is left in flight
    broker.stop()  # SIGTERM
    assert broker.proc is not None and broker.proc.returncode == 0
    withheld = broker.events("will.suppressed", "broker_shutdown")
    assert [e.get("withheld") for e in withheld] == [1], withheld
    broker.start()
    back = engine.raw(broker.port, "pump-17")
    assert back.connect("pump-17", clean=False).body == b"\x01\x00", "persistent session lost"
    got: list[tuple[str, bytes]] = []
    with contextlib.suppress(TimeoutError):
        while True:
            packet = back.read_until(PUBLISH, timeout=2)
            got.append((packet.topic, packet.payload))
            back.send(ack_packet(PUBACK, packet.packet_id))
    assert ("devices/sensor-01/status", b"offline") not in got, "a planned shutdown published a will"
    # the subscription is intact: a device that now vanishes is announced
    again = engine.raw(broker.port, "sensor-01")
    assert again.connect("sensor-01", will=Will("devices/sensor-01/status", b"offline", qos=1)).body[1] == 0
    again.drop()
    will = back.read_until(PUBLISH, timeout=5)
    assert (will.topic, will.payload) == ("devices/sensor-01/status", b"offline")


def test_each_admitted_session_is_announced_on_its_connected_topic(engine: Engine) -> None:
    """The connect event: after CONNACK 0 the broker publishes ``$SYS/broker/clients/<id>/connected``
    (QoS 1, not retained; identity, certificate serial, time, the session-present flag) to a subscriber
    with an explicit ``$SYS`` grant. A refused CONNECT announces nothing."""
    engine.acl.write_text(ENGINE_ACL + "devices:\n  pump-17:\n    - allow subscribe $SYS/broker/clients/#\n")
    broker = engine.start()
    watcher = engine.raw(broker.port, "pump-17")
    assert watcher.connect("pump-17").body[1] == 0
    assert watcher.subscribe([("$SYS/broker/clients/+/connected", 1)]) == [1]
    spoof = engine.raw(broker.port, "pump-18")
    assert spoof.connect("sensor-01").body[1] == 2  # another identity's client id: refused, not announced
    before = datetime.now(UTC)
    first = engine.raw(broker.port, "sensor-02")
    assert first.connect("sensor-02", clean=False).body == b"\x00\x00"
    first.close()
    again = engine.raw(broker.port, "sensor-02")
    assert again.connect("sensor-02", clean=False).body == b"\x01\x00"
    serial = x509.load_pem_x509_certificate(engine.pki.device("sensor-02").cert.read_bytes()).serial_number
    announced = []
    for _ in range(2):
        event = watcher.read_until(PUBLISH, timeout=5)
        assert (event.topic, event.qos, event.retain) == ("$SYS/broker/clients/sensor-02/connected", 1, False)
        watcher.send(ack_packet(PUBACK, event.packet_id))
        announced.append(json.loads(event.payload))
    assert [a["session_present"] for a in announced] == [False, True]
    for body in announced:
        assert set(body) == {"device", "serial", "at", "session_present"}
        assert (body["device"], body["serial"]) == ("sensor-02", f"{serial:x}")
        at = datetime.fromisoformat(body["at"])
        assert at.utcoffset() == timedelta(0) and before - timedelta(seconds=1) <= at <= datetime.now(UTC)
    assert watcher.ping(timeout=1.0)
    with pytest.raises(TimeoutError):
        watcher.read_until(PUBLISH, timeout=0.3)  # nothing for the refused spoof
