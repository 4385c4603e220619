"""Slow, silent and greedy clients are cut off: real sockets against the real listener."""

from __future__ import annotations

import socket
import time

import pytest

from tests.conftest import StartBroker
from tests.support.pki import DevPki
from tests.support.raw import closed_by_peer, connect_packet, publish_packet, recv_exactly, tls_socket

pytestmark = pytest.mark.integration


def test_silent_tcp_client_is_cut_at_the_tls_handshake_timeout(start_broker: StartBroker, pki: DevPki) -> None:
    broker = start_broker(limits={"tls_handshake_timeout": 0.3})
    with socket.create_connection(("127.0.0.1", broker.port)) as sock:
        started = time.monotonic()
        assert closed_by_peer(sock, timeout=5)
        assert time.monotonic() - started < 3
    broker.wait_event("tls.rejected", "tls_handshake_timeout")


def test_client_that_never_sends_connect_is_cut(start_broker: StartBroker, pki: DevPki) -> None:
    broker = start_broker(limits={"connect_timeout": 0.3})
    with tls_socket(broker.port, pki.chain, pki.device("pump-17")) as sock:
        assert closed_by_peer(sock, timeout=5)
    broker.wait_event("conn.rejected", "connect_timeout")
    assert broker.events.count("auth.accepted") == 0


def test_connections_over_the_cap_are_refused_at_once(start_broker: StartBroker, pki: DevPki) -> None:
    broker = start_broker(limits={"max_connections": 2, "connect_timeout": 10, "tls_handshake_timeout": 10})
    held = [socket.create_connection(("127.0.0.1", broker.port)) for _ in range(2)]
    try:
        broker.sync(lambda: None)  # let the broker accept both
        deadline = time.monotonic() + 5
        while broker.sync(lambda: broker.edge.listener.active) < 2 and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", broker.port)) as third:
            assert closed_by_peer(third, timeout=2)
        broker.wait_event("conn.rejected", "max_connections")
    finally:
        for sock in held:
            sock.close()
    # capacity comes back once the held connections are gone
    deadline = time.monotonic() + 5
    while broker.sync(lambda: broker.edge.listener.active) > 0 and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.01)
    assert broker.sync(lambda: broker.edge.listener.active) == 0  # type: ignore[union-attr]


def test_oversized_packet_closes_the_connection_before_it_is_buffered(
    start_broker: StartBroker, pki: DevPki
) -> None:
    broker = start_broker(limits={"max_packet_size": 1024})
    with tls_socket(broker.port, pki.chain, pki.device("pump-17")) as sock:
        sock.sendall(connect_packet("pump-17"))
        assert recv_exactly(sock, 4)[3] == 0
        # announce a 10 MB PUBLISH but send only its header and topic: the guard must act on the header
        header = publish_packet("t", b"")[:1]
        sock.sendall(header + bytes([0x80, 0xAD, 0xE2, 0x04]))  # remaining length 10,000,000
        assert closed_by_peer(sock, timeout=5)
    event = broker.wait_event("conn.rejected", "packet_too_large")[0]
    assert "exceeds the 1024-byte limit" in event["detail"]


def test_oversized_connect_is_refused(start_broker: StartBroker, pki: DevPki) -> None:
    broker = start_broker(limits={"max_packet_size": 512})
    with tls_socket(broker.port, pki.chain, pki.device("pump-17")) as sock:
        sock.sendall(connect_packet("pump-17" + "x" * 600))
        assert closed_by_peer(sock, timeout=5)
    broker.wait_event("conn.rejected", "packet_too_large")
    assert broker.events.count("auth.accepted") == 0


def test_packet_at_the_limit_is_accepted(start_broker: StartBroker, pki: DevPki) -> None:
    broker = start_broker(limits={"max_packet_size": 1024})
    with tls_socket(broker.port, pki.chain, pki.device("pump-17")) as sock:
        sock.sendall(connect_packet("pump-17"))
        assert recv_exactly(sock, 4)[3] == 0
        packet = publish_packet("plant/x", b"")
        payload = b"p" * (1024 - len(packet) - 1)  # one more length byte once the body passes 127
        packet = publish_packet("plant/x", payload)
        assert len(packet) == 1024
        sock.sendall(packet)
        sock.sendall(b"\xc0\x00")  # PINGREQ: still served after the full-size packet
        assert recv_exactly(sock, 2) == b"\xd0\x00"
    assert broker.events.count("conn.rejected", "packet_too_large") == 0
