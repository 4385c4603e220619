"""The engine's codec: framing and strict MQTT 3.1.1 decoding, and encoding round trips."""

from __future__ import annotations

import pytest

from broker_plugins.engine import codec
from broker_plugins.engine.codec import Connect, PacketId, ProtocolError, Publish, Subscribe, Unsubscribe
from tests.support.raw import connect_packet, publish_packet, remaining_length, subscribe_packet


def frame(data: bytes, max_size: int = 1 << 20) -> tuple[int, bytes]:
    found = codec.next_frame(data, 0, max_size)
    assert found is not None
    first, start, end = found
    assert end == len(data)
    return first, data[start:end]


def decode(data: bytes) -> codec.Packet:
    return codec.decode(*frame(data))


def reason(data: bytes) -> str:
    with pytest.raises(ProtocolError) as caught:
        decode(data)
    return caught.value.reason


def test_incomplete_frames_wait_for_more_bytes() -> None:
    packet = publish_packet("a/b", b"x" * 300)
    for cut in range(len(packet)):
        assert codec.next_frame(packet[:cut], 0, 1 << 20) is None
    assert codec.next_frame(packet, 0, 1 << 20) is not None


def test_two_packets_in_one_buffer() -> None:
    data = publish_packet("a", b"1") + publish_packet("b", b"2")
    first = codec.next_frame(data, 0, 1024)
    assert first is not None
    second = codec.next_frame(data, first[2], 1024)
    assert second is not None and second[2] == len(data)


def test_too_large_is_refused_from_the_header_alone() -> None:
    header = bytes([0x30]) + remaining_length(10_000_000)
    with pytest.raises(ProtocolError) as caught:
        codec.next_frame(header, 0, 1024)
    assert caught.value.reason == "packet_too_large"


def test_five_length_bytes_are_malformed() -> None:
    with pytest.raises(ProtocolError) as caught:
        codec.next_frame(b"\x30\xff\xff\xff\xff\x01", 0, 1 << 30)
    assert caught.value.reason == "malformed_packet"


def test_connect_decodes() -> None:
    packet = decode(connect_packet("pump-17", clean=False, keepalive=7))
    assert isinstance(packet, Connect)
    assert (packet.protocol, packet.level, packet.client_id, packet.clean, packet.keep_alive) == (
        "MQTT", 4, "pump-17", False, 7)


def test_connect_of_another_protocol_level_is_left_to_the_caller() -> None:
    body = b"\x00\x04MQTT\x05\x02\x00\x1e\x00"  # MQTT 5: properties would follow
    packet = decode(bytes([0x10, len(body)]) + body)
    assert isinstance(packet, Connect) and packet.level == 5


def test_connect_reserved_flag() -> None:
    body = b"\x00\x04MQTT\x04\x03\x00\x1e\x00\x01a"
    assert reason(bytes([0x10, len(body)]) + body) == "reserved_flags"


def test_connect_will_qos_without_will_flag() -> None:
    body = b"\x00\x04MQTT\x04\x0a\x00\x1e\x00\x01a"
    assert reason(bytes([0x10, len(body)]) + body) == "reserved_flags"


def test_connect_trailing_bytes() -> None:
    body = b"\x00\x04MQTT\x04\x02\x00\x1e\x00\x01aXX"
    assert reason(bytes([0x10, len(body)]) + body) == "malformed_packet"


@pytest.mark.parametrize(("topic", "code"), [
    (b"a/+", "wildcard_in_topic"), (b"#", "wildcard_in_topic"), (b"a\xc3", "invalid_utf8"),
    (b"\xed\xa0\x80", "invalid_utf8"), (b"a\x00", "null_character"), (b"", "empty_topic"),
])
def test_bad_topic_names(topic: bytes, code: str) -> None:
    body = len(topic).to_bytes(2, "big") + topic + b"payload"
    assert reason(bytes([0x30]) + remaining_length(len(body)) + body) == code


def test_publish_qos3_and_dup_on_qos0() -> None:
    body = b"\x00\x01a\x00\x01"
    assert reason(bytes([0x36, len(body)]) + body) == "bad_qos"
    assert reason(bytes([0x38, len(body)]) + body) == "reserved_flags"


def test_publish_packet_id_zero() -> None:
    body = b"\x00\x01a\x00\x00"
    assert reason(bytes([0x32, len(body)]) + body) == "bad_packet_id"


def test_publish_round_trip() -> None:
    data = codec.encode_publish("plant/ü", b"\x00\x01payload", 1, True, packet_id=513, dup=True)
    packet = decode(data)
    assert isinstance(packet, Publish)
    assert (packet.topic, packet.payload, packet.qos, packet.retain, packet.dup, packet.packet_id) == (
        "plant/ü", b"\x00\x01payload", 1, True, True, 513)


def test_subscribe_and_unsubscribe() -> None:
    packet = decode(subscribe_packet(9, "a/#", 2))
    assert isinstance(packet, Subscribe) and packet.packet_id == 9 and packet.requests == [("a/#", 2)]
    assert reason(bytes([0x82, 2, 0, 1])) == "empty_subscribe"
    assert reason(bytes([0xA2, 2, 0, 1])) == "empty_unsubscribe"
    unsub = decode(bytes([0xA2, 5, 0, 3, 0, 1, 0x61]))
    assert isinstance(unsub, Unsubscribe) and unsub.filters == ["a"]
    assert reason(bytes([0x82, 6, 0, 1, 0, 1, 0x61, 4])) == "reserved_flags"  # options byte above QoS bits


def test_ack_packets() -> None:
    for kind in (codec.PUBACK, codec.PUBREC, codec.PUBREL, codec.PUBCOMP):
        packet = decode(codec.encode_packet_id(kind, 77))
        assert isinstance(packet, PacketId) and (packet.kind, packet.packet_id) == (kind, 77)
    assert reason(b"\x60\x02\x00\x01") == "reserved_flags"  # PUBREL must carry flags 0x2
    assert reason(b"\x40\x03\x00\x01\x00") == "malformed_packet"


def test_server_only_and_reserved_types() -> None:
    assert reason(b"\x20\x02\x00\x00") == "unexpected_packet"
    assert reason(b"\x00\x00") == "reserved_type"
    assert reason(b"\xf0\x00") == "reserved_type"


def test_suback_and_connack_encoding() -> None:
    assert codec.encode_connack(True, 0) == b"\x20\x02\x01\x00"
    assert codec.encode_suback(5, [0, 1, 0x80]) == b"\x90\x05\x00\x05\x00\x01\x80"
