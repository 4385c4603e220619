"""Every MUST of MQTT 3.1.1 that concerns a server: a violation closes the connection, with an event.

Packets are written byte by byte as a hostile or broken client would; each case names the
spec rule it breaks and the reason code the broker must log (``mqtt.protocol_violation``).
"""

from __future__ import annotations

import pytest

from tests.engine.conftest import Engine
from tests.support.raw import (
    CONNACK,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREL,
    ack_packet,
    connect_packet,
    packet,
    publish_packet,
    subscribe_many,
    unsubscribe_packet,
)

pytestmark = pytest.mark.integration

VIOLATIONS = [
    # MQTT-3.3.2-2: a topic name must not contain wildcards
    ("publish_plus", publish_packet("lab/+/x", b"p"), "wildcard_in_topic"),
    ("publish_hash", publish_packet("lab/#", b"p"), "wildcard_in_topic"),
    # MQTT-1.5.3-1: ill-formed UTF-8 (a lone continuation byte; a UTF-16 surrogate)
    ("publish_bad_utf8", publish_packet(b"lab/\xc3\x28", b"p"), "invalid_utf8"),
    ("publish_surrogate", publish_packet(b"lab/\xed\xa0\x80", b"p"), "invalid_utf8"),
    ("subscribe_bad_utf8", subscribe_many(1, [(b"lab/\xff", 0)]), "invalid_utf8"),
    # MQTT-1.5.3-2: U+0000 in a string
    ("publish_nul", publish_packet(b"lab/a\x00b", b"p"), "null_character"),
    ("subscribe_nul", subscribe_many(1, [(b"lab/\x00", 0)]), "null_character"),
    # MQTT-3.3.1-4: QoS 3 in a PUBLISH; MQTT-3-8.3-4: QoS 3 requested in a SUBSCRIBE
    ("publish_qos3", publish_packet("lab/x", b"p", flags=0x06), "bad_qos"),
    ("subscribe_qos3", subscribe_many(1, [("lab/x", 3)]), "bad_qos"),
    # MQTT-2.2.2-2: reserved fixed-header flags
    ("subscribe_flags", subscribe_many(1, [("lab/x", 0)], flags=0x00), "reserved_flags"),
    ("unsubscribe_flags", unsubscribe_packet(1, ["lab/x"], flags=0x00), "reserved_flags"),
    ("pubrel_flags", packet(PUBREL, 0x00, b"\x00\x01"), "reserved_flags"),
    ("pingreq_flags", b"\xc1\x00", "reserved_flags"),
    # MQTT-2.2.1: packet types 0 and 15 are reserved
    ("type_0", packet(0, 0, b""), "reserved_type"),
    ("type_15", packet(15, 0, b""), "reserved_type"),
    # MQTT-4.7.1-2/-3: '#' alone and last, '+' alone in its level (4.8: a violation closes the connection)
    ("subscribe_hash_inside", subscribe_many(1, [("lab/#/b", 0)]), "invalid_topic_filter"),
    ("subscribe_plus_glued", subscribe_many(1, [("lab+/b", 0)]), "invalid_topic_filter"),
    ("subscribe_hash_glued", subscribe_many(1, [("lab/x#", 0)]), "invalid_topic_filter"),
    ("subscribe_one_bad_of_two", subscribe_many(1, [("lab/x", 0), ("lab/+x", 0)]), "invalid_topic_filter"),
    ("unsubscribe_hash_inside", unsubscribe_packet(1, ["lab/#/b"]), "invalid_topic_filter"),
    ("unsubscribe_plus_glued", unsubscribe_packet(1, ["lab+/b"]), "invalid_topic_filter"),
    # MQTT-4.7.3-1: a filter is at least one character; MQTT-1.5.3-1/-2 for UNSUBSCRIBE filters too
    ("subscribe_empty_filter", subscribe_many(1, [("", 0)]), "empty_topic"),
    ("unsubscribe_empty_filter", unsubscribe_packet(1, [""]), "empty_topic"),
    ("unsubscribe_nul", unsubscribe_packet(1, [b"lab/\x00"]), "null_character"),
    ("unsubscribe_bad_utf8", unsubscribe_packet(1, [b"lab/\xc3\x28"]), "invalid_utf8"),
    # MQTT-3.8.3-3 / MQTT-3.10.3-2: at least one filter
    ("empty_subscribe", subscribe_many(1, []), "empty_subscribe"),
    ("empty_unsubscribe", unsubscribe_packet(1, []), "empty_unsubscribe"),
    # MQTT-3.1.0-2: a second CONNECT is a violation
    ("second_connect", connect_packet("sensor-01"), "second_connect"),
    # a topic length field longer than the packet
    ("publish_truncated", packet(3, 0, b"\x00\x10lab"), "malformed_packet"),
]


@pytest.mark.parametrize(("data", "reason"), [(d, r) for _, d, r in VIOLATIONS], ids=[c for c, _, _ in VIOLATIONS])
def test_protocol_violation_closes_the_connection(engine: Engine, data: bytes, reason: str) -> None:
    broker = engine.start()
    client = engine.raw(broker.port, "sensor-01")
    assert client.connect("sensor-01").body == b"\x00\x00"
    client.send(data)
    assert client.closed_by_peer(timeout=2), f"connection stayed open after {reason}"
    event = broker.wait_event("mqtt.protocol_violation", reason)[0]
    assert event.get("device", event.get("client_id")) == "sensor-01" or "peer" in event


def test_refused_publish_payload_is_never_parsed_as_a_packet(engine: Engine) -> None:
    """A PUBLISH the ACL refuses is skipped whole: a packet hidden in its payload must not run."""
    broker = engine.start()
    watcher = engine.raw(broker.port, "sensor-02")
    assert watcher.connect("sensor-02").body[1] == 0
    assert watcher.subscribe([("lab/#", 0)]) == [0]
    smuggled = publish_packet("lab/smuggled", b"from inside a payload")
    client = engine.raw(broker.port, "sensor-01")
    assert client.connect("sensor-01").body[1] == 0
    for topic in ("devices/pump-17/telemetry/x", "$SYS/broker/x"):  # denied by the ACL; a $ topic
        client.send(publish_packet(topic, smuggled, qos=1, packet_id=7))
        assert client.read_until(PUBACK).packet_id == 7  # 3.1.1 has no refusal code: acked and dropped
    client.send(publish_packet("lab/after", b"real", qos=0))
    got = watcher.read_until(PUBLISH)
    assert (got.topic, got.payload) == ("lab/after", b"real")
    assert client.ping()
    with pytest.raises(TimeoutError):
        watcher.read(timeout=0.5)


def test_pubrel_for_an_unknown_packet_id_gets_pubcomp(engine: Engine) -> None:
    """MQTT-4.3.3: the receiver answers PUBREL with PUBCOMP, even for an id it no longer holds."""
    broker = engine.start()
    client = engine.raw(broker.port, "sensor-01")
    assert client.connect("sensor-01").body[1] == 0
    client.send(ack_packet(PUBREL, 4242))
    got = client.read(timeout=2)
    assert (got.kind, got.packet_id) == (PUBCOMP, 4242)
    assert client.ping()


@pytest.mark.parametrize(("protocol", "level"), [("MQTT", 5), ("MQIsdp", 3), ("MQTT", 6)],
                         ids=["mqtt5", "mqtt31", "level6"])
def test_unsupported_protocol_level_gets_connack_1_then_close(engine: Engine, protocol: str, level: int) -> None:
    """MQTT-3.1.2-2: CONNACK 0x01 (unacceptable protocol version), then close; no retry loop for the client."""
    broker = engine.start()
    client = engine.raw(broker.port, "sensor-01")
    client.send(connect_packet("sensor-01", protocol=protocol, level=level))
    ack = client.read(timeout=3)
    assert (ack.kind, ack.body) == (CONNACK, b"\x00\x01")
    assert client.closed_by_peer(timeout=3)
    broker.wait_event("conn.rejected", "unsupported_protocol")
    assert broker.events.count("auth.accepted") == 0


def test_refused_dollar_publish_does_not_leave_the_persistent_session_stuck(engine: Engine) -> None:
    """After a refused ``$`` publish, every later persistent CONNECT of that device is answered at once."""
    broker = engine.start()
    for round_no in range(3):
        client = engine.raw(broker.port, "sensor-01", timeout=2)
        ack = client.connect("sensor-01", clean=False)
        assert ack.body[1] == 0, f"round {round_no}: CONNACK {ack.body!r}"
        assert ack.body[0] == (1 if round_no else 0)  # session present from the second round on
        client.send(publish_packet("$SYS/broker/uptime", b"forged", qos=1, packet_id=3))
        client.send(publish_packet("$internal/x", b"forged", qos=0))
        assert client.ping(timeout=2)
        client.close()
    final = engine.raw(broker.port, "sensor-01", timeout=2)
    assert final.connect("sensor-01", clean=True).body[1] == 0


def test_zero_length_client_id_with_clean_session_gets_the_certificate_identity(engine: Engine) -> None:
    """MQTT-3.1.3-6: the server assigns the id; here it is the identity in the certificate, so the ACL applies."""
    broker = engine.start()
    watcher = engine.raw(broker.port, "pump-17")
    assert watcher.connect("pump-17").body[1] == 0
    assert watcher.subscribe([("devices/+/status", 1)]) == [1]
    anonymous_id = engine.raw(broker.port, "sensor-01")
    assert anonymous_id.connect("", clean=True).body == b"\x00\x00"
    anonymous_id.publish("devices/sensor-01/status", b"online", qos=1)
    anonymous_id.publish("devices/pump-18/status", b"spoofed", qos=1)  # not its own: refused
    got = watcher.read_until(PUBLISH)
    assert (got.topic, got.payload) == ("devices/sensor-01/status", b"online")
    with pytest.raises(TimeoutError):
        watcher.read(timeout=0.5)


def test_zero_length_client_id_without_clean_session_is_refused(engine: Engine) -> None:
    """MQTT-3.1.3-8: CONNACK 0x02 (guards the rule above against widening)."""
    broker = engine.start()
    client = engine.raw(broker.port, "sensor-01")
    assert client.connect("", clean=False).body == b"\x00\x02"
    assert client.closed_by_peer(timeout=3)


def test_connection_survives_valid_traffic(engine: Engine) -> None:
    """Guard for the cases above: the same packets, well formed, keep the connection open."""
    broker = engine.start()
    client = engine.raw(broker.port, "sensor-01")
    assert client.connect("sensor-01").body[1] == 0
    assert client.subscribe([("lab/x", 1), ("lab/y/#", 0)]) == [1, 0]
    client.publish("lab/é/x", b"utf-8 topic", qos=1)
    client.send(unsubscribe_packet(2, ["lab/x"]))
    assert client.read_until(11).packet_id == 2  # UNSUBACK
    assert client.ping()
    assert broker.events.count("mqtt.protocol_violation") == 0
