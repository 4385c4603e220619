"""Raw MQTT over TLS for protocol-edge tests: no client library in the way.

Packet builders take ``str | bytes`` for every string field, so a test can send exactly
the bytes it means (ill-formed UTF-8, U+0000, wildcards in a topic name), and ``flags``
overrides the low nibble of the fixed header (reserved flags). ``RawClient`` wraps one
TLS connection and reads whole packets.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.mqtt import tls_context
from tests.support.pki import Credential

CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 2, 3, 4, 5, 6, 7
SUBACK, UNSUBACK, PINGRESP = 9, 11, 13
PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


def _string(value: str | bytes) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([(kind << 4) | flags]) + remaining_length(len(body)) + body


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


def connect_packet(client_id: str | bytes, *, clean: bool = True, keepalive: int = 30, level: int = 4,
                   protocol: str = "MQTT", will: Will | None = None, properties: bool | None = None) -> bytes:
    """CONNECT; ``level=5`` adds the (empty) MQTT 5 property fields, ``protocol="MQIsdp", level=3`` is 3.1."""
    flags = 0x02 if clean else 0x00
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    with_props = level == 5 if properties is None else properties
    body = _string(protocol) + bytes([level, flags]) + struct.pack("!H", keepalive)
    if with_props:
        body += b"\x00"
    body += _string(client_id)
    if will is not None:
        body += (b"\x00" if with_props else b"") + _string(will.topic) + _string(will.payload)
    return packet(1, 0, body)


def publish_packet(topic: str | bytes, payload: bytes, *, qos: int = 0, packet_id: int = 1, retain: bool = False,
                   dup: bool = False, flags: int | None = None) -> bytes:
    if flags is None:
        flags = (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    body = _string(topic) + (struct.pack("!H", packet_id) if (flags >> 1) & 3 else b"") + payload
    return packet(3, flags, body)


def subscribe_packet(packet_id: int, topic_filter: str | bytes, qos: int = 0) -> bytes:
    return subscribe_many(packet_id, [(topic_filter, qos)])


def subscribe_many(packet_id: int, filters: Iterable[tuple[str | bytes, int]], *, flags: int = 0x02) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(_string(f) + bytes([q]) for f, q in filters)
    return packet(8, flags, body)


def unsubscribe_packet(packet_id: int, filters: Iterable[str | bytes], *, flags: int = 0x02) -> bytes:
    return packet(10, flags, struct.pack("!H", packet_id) + b"".join(_string(f) for f in filters))


def ack_packet(kind: int, packet_id: int) -> bytes:
    """PUBACK, PUBREC, PUBREL (flags 0x02 as the spec requires) or PUBCOMP."""
    return packet(kind, 0x02 if kind == PUBREL else 0, struct.pack("!H", packet_id))


@dataclass(frozen=True)
class Packet:
    first: int
    body: bytes

    @property
    def kind(self) -> int:
        return self.first >> 4

    @property
    def qos(self) -> int:
        return (self.first >> 1) & 3

    @property
    def dup(self) -> bool:
        return bool(self.first & 0x08)

    @property
    def retain(self) -> bool:
        return bool(self.first & 0x01)

    @property
    def topic(self) -> str:
        assert self.kind == PUBLISH
        (n,) = struct.unpack("!H", self.body[:2])
        return self.body[2:2 + n].decode("utf-8")

    @property
    def packet_id(self) -> int:
        if self.kind == PUBLISH:
            (n,) = struct.unpack("!H", self.body[:2])
            return int(struct.unpack("!H", self.body[2 + n:4 + n])[0])
        return int(struct.unpack("!H", self.body[:2])[0])

    @property
    def payload(self) -> bytes:
        assert self.kind == PUBLISH
        (n,) = struct.unpack("!H", self.body[:2])
        return self.body[2 + n + (2 if self.qos else 0):]


def tls_socket(port: int, chain: Path, cred: Credential | None, *,
               max_version: ssl.TLSVersion | None = None, timeout: float = 5.0,
               rcvbuf: int | None = None) -> ssl.SSLSocket:
    ctx = tls_context(chain, cred, max_version=max_version)
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:  # before connect, so the window is small from the start
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(timeout)
        raw.connect(("127.0.0.1", port))
        return ctx.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise


def try_connect(port: int, chain: Path, cred: Credential | None, client_id: str, *,
                max_version: ssl.TLSVersion | None = None) -> int | None:
    """TLS handshake + CONNECT; the CONNACK return code, or None if TLS or the connection failed."""
    try:
        sock = tls_socket(port, chain, cred, max_version=max_version)
    except (ssl.SSLError, OSError):
        return None
    with sock:
        try:
            sock.sendall(connect_packet(client_id))
            data = recv_exactly(sock, 4)
        except (ssl.SSLError, OSError, EOFError):
            return None
        return data[3] if data[0] == 0x20 else None


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return buf


def read_packet(sock: socket.socket) -> Packet:
    """One whole packet; EOFError when the peer closed the connection."""
    first = recv_exactly(sock, 1)[0]
    length, multiplier = 0, 1
    for _ in range(4):
        byte = recv_exactly(sock, 1)[0]
        length += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            break
        multiplier *= 128
    return Packet(first, recv_exactly(sock, length) if length else b"")


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closes the connection within ``timeout`` seconds (bytes it sends first are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        sock.settimeout(remaining)
        try:
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            return False
        except (ssl.SSLError, OSError):
            return True


@dataclass
class PublishCount:
    thread: threading.Thread
    received: int = 0

    def join(self, timeout: float) -> int:
        self.thread.join(timeout)
        return self.received


class RawClient:
    """One MQTT connection over TLS 1.3 with a client certificate, driven packet by packet."""

    def __init__(self, port: int, chain: Path, cred: Credential | None, *, timeout: float = 5.0,
                 rcvbuf: int | None = None) -> None:
        self.sock = tls_socket(port, chain, cred, timeout=timeout, rcvbuf=rcvbuf)
        self.timeout = timeout

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def connect(self, client_id: str | bytes, **kwargs: object) -> Packet:
        """Send CONNECT and return the CONNACK (its body is ``session_present, return_code``)."""
        self.send(connect_packet(client_id, **kwargs))  # type: ignore[arg-type]
        ack = self.read()
        assert ack.kind == CONNACK, f"expected CONNACK, got type {ack.kind}"
        return ack

    def read(self, timeout: float | None = None) -> Packet:
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        return read_packet(self.sock)

    def read_until(self, kind: int, timeout: float | None = None) -> Packet:
        """Skip packets until one of ``kind`` arrives."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            got = self.read(max(0.01, deadline - time.monotonic()))
            if got.kind == kind:
                return got

    def subscribe(self, filters: Sequence[tuple[str | bytes, int]], packet_id: int = 1) -> list[int]:
        """SUBSCRIBE and the SUBACK's return codes (PUBLISHes that arrive first are skipped)."""
        self.send(subscribe_many(packet_id, filters))
        ack = self.read_until(SUBACK)
        assert ack.packet_id == packet_id
        return list(ack.body[2:])

    def publish(self, topic: str | bytes, payload: bytes, *, qos: int = 0, packet_id: int = 1,
                retain: bool = False) -> None:
        """PUBLISH; for QoS 1 wait for the PUBACK, for QoS 2 run PUBREC/PUBREL/PUBCOMP."""
        self.send(publish_packet(topic, payload, qos=qos, packet_id=packet_id, retain=retain))
        if qos == 1:
            assert self.read_until(PUBACK).packet_id == packet_id
        elif qos == 2:
            assert self.read_until(PUBREC).packet_id == packet_id
            self.send(ack_packet(PUBREL, packet_id))
            assert self.read_until(PUBCOMP).packet_id == packet_id

    def count_publishes_in_background(self, *, idle: float = 3.0) -> PublishCount:
        """Read and count PUBLISHes on a thread (acking QoS 1) until none came for ``idle`` seconds."""
        counter = PublishCount(threading.Thread(target=lambda: None))

        def run() -> None:
            while True:
                try:
                    got = self.read(timeout=idle)
                except (TimeoutError, OSError, EOFError):
                    return
                if got.kind == PUBLISH:
                    counter.received += 1
                    if got.qos == 1:
                        self.send(ack_packet(PUBACK, got.packet_id))

        counter.thread = threading.Thread(target=run, daemon=True)
        counter.thread.start()
        return counter

    def ping(self, timeout: float | None = None) -> bool:
        """PINGREQ answered by PINGRESP (other packets in between are skipped); False if the link died."""
        try:
            self.send(PINGREQ)
            self.read_until(PINGRESP, timeout)
        except (EOFError, OSError, ssl.SSLError):
            return False
        return True

    def closed_by_peer(self, timeout: float) -> bool:
        return closed_by_peer(self.sock, timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            self.sock.sendall(DISCONNECT)
        self.drop()

    def drop(self) -> None:
        """Vanish without DISCONNECT."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.drop()
