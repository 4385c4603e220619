"""MQTT 3.1.1 packets: strict decoding of whole framed packets, and encoding. Pure, no I/O.

``next_frame`` finds one whole packet in a receive buffer (or says more bytes are needed);
``decode`` turns its body into a packet object. Every rule of the specification that a
server MUST enforce raises ``ProtocolError`` with a stable reason code, and the caller
closes the connection. The codes are the ``reason`` of ``mqtt.protocol_violation`` events:

========================  ======================================================================
``malformed_packet``      lengths or strings run past the packet, missing fields, trailing bytes
``packet_too_large``      the remaining length announces more than the configured maximum
``reserved_type``         packet type 0 or 15
``reserved_flags``        fixed-header flags other than the ones the type defines; CONNECT
                          reserved bit; will flags without the will flag; password without user
``bad_qos``               QoS 3 (PUBLISH, will, SUBSCRIBE), or a SUBSCRIBE option byte > 2
``invalid_utf8``          a string that is not well-formed UTF-8 (surrogates included)
``null_character``        U+0000 in a string
``wildcard_in_topic``     ``+`` or ``#`` in a PUBLISH or will topic name
``empty_topic``           a zero-length topic name or filter
``invalid_topic_filter``  a SUBSCRIBE or UNSUBSCRIBE filter with ``#`` not alone in the last
                          level or ``+`` not alone in its level (``a/#/b``, ``a+/b``)
``empty_subscribe``       a SUBSCRIBE without any filter
``empty_unsubscribe``     an UNSUBSCRIBE without any filter
``bad_packet_id``         packet identifier 0 where one is required
``unexpected_packet``     a packet only a server sends (CONNACK, SUBACK, ...) or PINGRESP
========================  ======================================================================

The protocol name and level are decoded but not judged here: an unknown level must be
answered with CONNACK 0x01 before closing, which is the connection's job.
"""

from __future__ import annotations

from typing import Final

from edge_core.topics import topic_filter_problem

__all__ = [
    "CONNECT", "DISCONNECT", "PINGREQ", "PUBACK", "PUBCOMP", "PUBLISH", "PUBREC", "PUBREL", "SUBSCRIBE",
    "UNSUBSCRIBE",
    "Connect", "PacketId", "ProtocolError", "Publish", "Subscribe", "Unsubscribe", "Will",
    "decode", "encode_connack", "encode_packet_id", "encode_publish", "encode_suback", "next_frame",
    "publish_prefix",
]

CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
PUBREC: Final = 5
PUBREL: Final = 6
PUBCOMP: Final = 7
SUBSCRIBE: Final = 8
SUBACK: Final = 9
UNSUBSCRIBE: Final = 10
UNSUBACK: Final = 11
PINGREQ: Final = 12
PINGRESP: Final = 13
DISCONNECT: Final = 14

#: Fixed-header flags each packet type must carry (PUBLISH flags are free, checked separately).
_REQUIRED_FLAGS: Final = {CONNECT: 0, PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0, SUBSCRIBE: 2,
                          UNSUBSCRIBE: 2, PINGREQ: 0, DISCONNECT: 0,
                          CONNACK: 0, SUBACK: 0, UNSUBACK: 0, PINGRESP: 0}
_SERVER_ONLY: Final = frozenset({CONNACK, SUBACK, UNSUBACK, PINGRESP})

PINGRESP_BYTES: Final = b"\xd0\x00"


class ProtocolError(Exception):
    """The peer broke MQTT 3.1.1; ``reason`` is a stable code, the text says what was seen."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Will:
    __slots__ = ("payload", "qos", "retain", "topic")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain


class Connect:
    __slots__ = ("clean", "client_id", "keep_alive", "level", "password", "protocol", "username", "will")

    def __init__(self, protocol: str, level: int, clean: bool, keep_alive: int, client_id: str,
                 will: Will | None, username: str | None, password: bytes | None) -> None:
        self.protocol = protocol
        self.level = level
        self.clean = clean
        self.keep_alive = keep_alive
        self.client_id = client_id
        self.will = will
        self.username = username
        self.password = password


class Publish:
    __slots__ = ("dup", "packet_id", "payload", "qos", "retain", "topic")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool, dup: bool, packet_id: int) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.packet_id = packet_id


class PacketId:
    """PUBACK, PUBREC, PUBREL, PUBCOMP: a type and a packet identifier."""

    __slots__ = ("kind", "packet_id")

    def __init__(self, kind: int, packet_id: int) -> None:
        self.kind = kind
        self.packet_id = packet_id


class Subscribe:
    __slots__ = ("packet_id", "requests")

    def __init__(self, packet_id: int, requests: list[tuple[str, int]]) -> None:
        self.packet_id = packet_id
        self.requests = requests


class Unsubscribe:
    __slots__ = ("filters", "packet_id")

    def __init__(self, packet_id: int, filters: list[str]) -> None:
        self.packet_id = packet_id
        self.filters = filters


Packet = Connect | Publish | PacketId | Subscribe | Unsubscribe | int  # int: PINGREQ / DISCONNECT


# -- framing -------------------------------------------------------------------------------


def next_frame(buf: bytes | bytearray, start: int, max_size: int) -> tuple[int, int, int] | None:
    """The whole packet at ``buf[start:]``: (first byte, body start, body end), or None if incomplete.

    Raises ``ProtocolError`` as soon as the header shows the packet is malformed or too
    large, before any of its body is buffered.
    """
    end = len(buf)
    if end - start < 2:
        return None
    length = 0
    multiplier = 1
    pos = start + 1
    while True:
        if pos >= end:
            return None
        byte = buf[pos]
        length += (byte & 0x7F) * multiplier
        pos += 1
        if not byte & 0x80:
            break
        multiplier *= 128
        if pos - start > 4:
            raise ProtocolError("malformed_packet", "remaining length uses more than 4 bytes")
    size = pos - start + length
    if size > max_size:
        raise ProtocolError("packet_too_large", f"packet of {size} bytes exceeds the {max_size}-byte limit")
    if end - pos < length:
        return None
    return buf[start], pos, pos + length


# -- decoding ------------------------------------------------------------------------------


def _text(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("invalid_utf8", f"string is not well-formed UTF-8 at byte {exc.start}") from exc
    if "\x00" in text:
        raise ProtocolError("null_character", "string contains U+0000")
    return text


def _string(body: bytes, pos: int, what: str) -> tuple[str, int]:
    raw, pos = _binary(body, pos, what)
    return _text(raw), pos


def _binary(body: bytes, pos: int, what: str) -> tuple[bytes, int]:
    if pos + 2 > len(body):
        raise ProtocolError("malformed_packet", f"{what}: length runs past the packet")
    n = (body[pos] << 8) | body[pos + 1]
    pos += 2
    if pos + n > len(body):
        raise ProtocolError("malformed_packet", f"{what}: {n} bytes announced, {len(body) - pos} left")
    return body[pos:pos + n], pos + n


def _topic_name(topic: str, what: str) -> str:
    if not topic:
        raise ProtocolError("empty_topic", f"{what} is empty")
    if "+" in topic or "#" in topic:
        raise ProtocolError("wildcard_in_topic", f"{what} {topic[:80]!r} contains a wildcard")
    return topic


def _topic_filter(topic_filter: str, what: str) -> None:
    """MQTT-4.7.1-2/-3: a filter's wildcards occupy whole levels, ``#`` only the last (MQTT-4.7.3-1: not empty)."""
    if not topic_filter:
        raise ProtocolError("empty_topic", f"{what} with an empty topic filter")
    problem = topic_filter_problem(topic_filter)
    if problem is not None:
        raise ProtocolError("invalid_topic_filter", f"{what} topic filter {topic_filter[:80]!r}: {problem}")


def decode(first: int, body: bytes) -> Packet:
    """Decode one packet (fixed-header byte ``first``, body bytes) or raise ``ProtocolError``."""
    kind = first >> 4
    flags = first & 0x0F
    if kind == PUBLISH:
        return _publish(flags, body)
    if kind in (0, 15):
        raise ProtocolError("reserved_type", f"packet type {kind} is reserved")
    if flags != _REQUIRED_FLAGS[kind]:
        raise ProtocolError("reserved_flags", f"packet type {kind} with flags {flags:#x}")
    if kind in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        if len(body) != 2:
            raise ProtocolError("malformed_packet", f"packet type {kind} must be 2 bytes, not {len(body)}")
        return PacketId(kind, (body[0] << 8) | body[1])
    if kind in (PINGREQ, DISCONNECT):
        if body:
            raise ProtocolError("malformed_packet", f"packet type {kind} must be empty")
        return kind
    if kind == SUBSCRIBE:
        return _subscribe(body)
    if kind == UNSUBSCRIBE:
        return _unsubscribe(body)
    if kind == CONNECT:
        return _connect(body)
    raise ProtocolError("unexpected_packet", f"packet type {kind} is sent by servers only")


def _publish(flags: int, body: bytes) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise ProtocolError("bad_qos", "PUBLISH with QoS 3")
    dup = bool(flags & 0x08)
    if dup and qos == 0:
        raise ProtocolError("reserved_flags", "DUP set on a QoS 0 PUBLISH")
    if len(body) < 2:
        raise ProtocolError("malformed_packet", "PUBLISH without a topic")
    n = (body[0] << 8) | body[1]
    pos = 2 + n
    if pos > len(body):
        raise ProtocolError("malformed_packet", f"topic of {n} bytes runs past the packet")
    raw = body[2:pos]
    if raw.isascii():  # the common case: one C-level scan instead of a decode
        if b"\x00" in raw:
            raise ProtocolError("null_character", "topic contains U+0000")
        topic = raw.decode("ascii")
    else:
        topic = _text(raw)
    _topic_name(topic, "topic name")
    packet_id = 0
    if qos:
        if pos + 2 > len(body):
            raise ProtocolError("malformed_packet", "PUBLISH without a packet identifier")
        packet_id = (body[pos] << 8) | body[pos + 1]
        if packet_id == 0:
            raise ProtocolError("bad_packet_id", "PUBLISH with packet identifier 0")
        pos += 2
    return Publish(topic, body[pos:], qos, bool(flags & 0x01), dup, packet_id)


def _packet_id(body: bytes, what: str) -> int:
    if len(body) < 2:
        raise ProtocolError("malformed_packet", f"{what} without a packet identifier")
    packet_id = (body[0] << 8) | body[1]
    if packet_id == 0:
        raise ProtocolError("bad_packet_id", f"{what} with packet identifier 0")
    return packet_id


def _subscribe(body: bytes) -> Subscribe:
    packet_id = _packet_id(body, "SUBSCRIBE")
    pos = 2
    requests: list[tuple[str, int]] = []
    while pos < len(body):
        topic_filter, pos = _string(body, pos, "SUBSCRIBE topic filter")
        if pos >= len(body):
            raise ProtocolError("malformed_packet", "SUBSCRIBE filter without its options byte")
        options = body[pos]
        pos += 1
        if options > 3:
            raise ProtocolError("reserved_flags", f"SUBSCRIBE options byte {options:#x}")
        if options == 3:
            raise ProtocolError("bad_qos", "SUBSCRIBE with QoS 3")
        _topic_filter(topic_filter, "SUBSCRIBE")
        requests.append((topic_filter, options))
    if not requests:
        raise ProtocolError("empty_subscribe", "SUBSCRIBE without any topic filter")
    return Subscribe(packet_id, requests)


def _unsubscribe(body: bytes) -> Unsubscribe:
    packet_id = _packet_id(body, "UNSUBSCRIBE")
    pos = 2
    filters: list[str] = []
    while pos < len(body):
        topic_filter, pos = _string(body, pos, "UNSUBSCRIBE topic filter")
        _topic_filter(topic_filter, "UNSUBSCRIBE")
        filters.append(topic_filter)
    if not filters:
        raise ProtocolError("empty_unsubscribe", "UNSUBSCRIBE without any topic filter")
    return Unsubscribe(packet_id, filters)


def _connect(body: bytes) -> Connect:
    protocol, pos = _string(body, 0, "protocol name")
    if pos + 4 > len(body):
        raise ProtocolError("malformed_packet", "CONNECT variable header is cut short")
    level = body[pos]
    flags = body[pos + 1]
    keep_alive = (body[pos + 2] << 8) | body[pos + 3]
    pos += 4
    if protocol != "MQTT" or level != 4:
        # MQTT 3.1 ("MQIsdp", 3) or 5 (level 5): decided by the caller, which answers CONNACK 0x01
        return Connect(protocol, level, True, keep_alive, "", None, None, None)
    if flags & 0x01:
        raise ProtocolError("reserved_flags", "CONNECT reserved flag is set")
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    if not will_flag and (will_qos or will_retain):
        raise ProtocolError("reserved_flags", "will QoS or retain set without the will flag")
    if will_qos == 3:
        raise ProtocolError("bad_qos", "will QoS 3")
    has_user = bool(flags & 0x80)
    has_password = bool(flags & 0x40)
    if has_password and not has_user:
        raise ProtocolError("reserved_flags", "password flag without the user name flag")
    client_id, pos = _string(body, pos, "client identifier")
    will = None
    if will_flag:
        topic, pos = _string(body, pos, "will topic")
        _topic_name(topic, "will topic")
        payload, pos = _binary(body, pos, "will message")
        will = Will(topic, payload, will_qos, will_retain)
    username = password = None
    if has_user:
        username, pos = _string(body, pos, "user name")
    if has_password:
        password, pos = _binary(body, pos, "password")
    if pos != len(body):
        raise ProtocolError("malformed_packet", f"{len(body) - pos} bytes after the CONNECT payload")
    return Connect(protocol, level, bool(flags & 0x02), keep_alive, client_id, will, username, password)


# -- encoding ------------------------------------------------------------------------------


def _length(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_connack(session_present: bool, code: int) -> bytes:
    return bytes((0x20, 2, 1 if session_present else 0, code))


def encode_packet_id(kind: int, packet_id: int) -> bytes:
    """PUBACK, PUBREC, PUBREL (flags 0x2), PUBCOMP, UNSUBACK."""
    return bytes(((kind << 4) | (2 if kind == PUBREL else 0), 2, packet_id >> 8, packet_id & 0xFF))


def encode_suback(packet_id: int, codes: list[int]) -> bytes:
    return bytes((0x90,)) + _length(2 + len(codes)) + bytes((packet_id >> 8, packet_id & 0xFF, *codes))


def publish_prefix(topic: bytes, payload_len: int, qos: int, retain: bool, dup: bool = False) -> bytes:
    """Fixed header and topic of a PUBLISH; for QoS > 0 the 2-byte packet id follows it."""
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    remaining = 2 + len(topic) + (2 if qos else 0) + payload_len
    return bytes((first,)) + _length(remaining) + len(topic).to_bytes(2, "big") + topic


def encode_publish(topic: str, payload: bytes, qos: int, retain: bool, packet_id: int = 0,
                   dup: bool = False) -> bytes:
    prefix = publish_prefix(topic.encode("utf-8"), len(payload), qos, retain, dup)
    if qos:
        return prefix + packet_id.to_bytes(2, "big") + payload
    return prefix + payload
