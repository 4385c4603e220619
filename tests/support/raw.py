"""Raw MQTT over TLS for protocol-edge tests: no client library in the way."""

from __future__ import annotations

import socket
import ssl
import struct
from pathlib import Path

from tests.support.mqtt import tls_context
from tests.support.pki import Credential


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


def connect_packet(client_id: str, *, clean: bool = True, keepalive: int = 30) -> bytes:
    flags = 0x02 if clean else 0x00
    body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + _string(client_id)
    return bytes([0x10]) + remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes) -> bytes:
    body = _string(topic) + payload
    return bytes([0x30]) + remaining_length(len(body)) + body


def subscribe_packet(packet_id: int, topic_filter: str, qos: int = 0) -> bytes:
    body = struct.pack("!H", packet_id) + _string(topic_filter) + bytes([qos])
    return bytes([0x82]) + remaining_length(len(body)) + body


def tls_socket(port: int, chain: Path, cred: Credential | None, *,
               max_version: ssl.TLSVersion | None = None, timeout: float = 5.0) -> ssl.SSLSocket:
    ctx = tls_context(chain, cred, max_version=max_version)
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
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


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closes the connection within ``timeout`` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except (ssl.SSLError, OSError):
        return True
