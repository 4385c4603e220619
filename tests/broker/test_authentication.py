"""Who may connect: real TLS 1.3 on loopback, the real broker, real paho clients."""

from __future__ import annotations

import ssl
import time
from datetime import timedelta
from pathlib import Path

import pytest

from broker_plugins.registry import EXPIRY_SWEEP_S
from edge_core.clock import ManualClock
from tests.broker.acl_fixture import write_acl
from tests.conftest import StartBroker
from tests.support.mqtt import Device
from tests.support.pki import DevPki
from tests.support.raw import connect_packet, recv_exactly, tls_socket, try_connect

pytestmark = pytest.mark.integration

ACCEPTED, IDENTIFIER_REJECTED, NOT_AUTHORIZED = 0, 2, 5


def test_valid_pinned_device_connects(start_broker: StartBroker, pki: DevPki) -> None:
    broker = start_broker()
    dev = Device(broker.port, pki.chain, pki.device("pump-17"), "pump-17")
    assert dev.connect() == ACCEPTED
    accepted = broker.wait_event("auth.accepted")
    assert accepted[0]["device"] == "pump-17"
    dev.close()


def test_no_client_certificate_is_refused_at_tls(start_broker: StartBroker, pki: DevPki) -> None:
    broker = start_broker()
    assert try_connect(broker.port, pki.chain, None, "pump-17") is None
    broker.wait_event("tls.rejected", "no_client_cert")
    assert broker.events.count("auth.accepted") == 0


def test_certificate_from_another_ca_is_refused(start_broker: StartBroker, pki: DevPki) -> None:
    broker = start_broker()
    rogue = pki.foreign("rogue-pump-17", "pump-17")
    assert try_connect(broker.port, pki.chain, rogue, "pump-17") is None
    broker.wait_event("tls.rejected", "unknown_ca")


def test_expired_certificate_is_refused(start_broker: StartBroker, pki: DevPki) -> None:
    broker = start_broker()
    cred = pki.expired("expired-pump-17", "pump-17", same_key_as="pump-17")
    assert try_connect(broker.port, pki.chain, cred, "pump-17") is None
    broker.wait_event("tls.rejected", "cert_expired")


def test_not_yet_valid_certificate_is_refused(start_broker: StartBroker, pki: DevPki) -> None:
    broker = start_broker()
    cred = pki.not_yet_valid("future-pump-17", "pump-17", same_key_as="pump-17")
    assert try_connect(broker.port, pki.chain, cred, "pump-17") is None
    broker.wait_event("tls.rejected", "cert_not_yet_valid")


def test_expiry_is_also_checked_by_the_broker_clock(start_broker: StartBroker, pki: DevPki) -> None:
    """Time travel: OpenSSL uses the wall clock; our admission uses the injected clock too."""
    clock = ManualClock()
    broker = start_broker(clock=clock)
    dev = Device(broker.port, pki.chain, pki.device("pump-17"), "pump-17")
    clock.advance(timedelta(days=31))  # dev certificates live 30 days
    assert dev.connect() == NOT_AUTHORIZED
    broker.wait_event("auth.rejected", "cert_expired")


def test_a_remembered_admission_still_expires_with_the_certificate(start_broker: StartBroker, pki: DevPki) -> None:
    """Admissions are cached by certificate digest for connect rate; the validity is checked on every hit."""
    clock = ManualClock()
    broker = start_broker(clock=clock)
    assert try_connect(broker.port, pki.chain, pki.device("pump-17"), "pump-17") == ACCEPTED
    assert try_connect(broker.port, pki.chain, pki.device("pump-17"), "pump-17") == ACCEPTED
    assert try_connect(broker.port, pki.chain, pki.device("pump-17"), "pump-18") == IDENTIFIER_REJECTED
    clock.advance(timedelta(days=31))
    assert try_connect(broker.port, pki.chain, pki.device("pump-17"), "pump-17") == NOT_AUTHORIZED
    broker.wait_event("auth.rejected", "cert_expired")


def test_a_live_session_is_cut_when_its_certificate_expires(start_broker: StartBroker, pki: DevPki,
                                                             tmp_path: Path) -> None:
    """No reload needed: the clock alone ends a session whose certificate has expired since it
    connected, with no will (the device was refused), and its persistent state stays for the
    renewed certificate."""
    clock = ManualClock()
    broker = start_broker(clock=clock, acl=write_acl(tmp_path))
    pump = Device(broker.port, pki.chain, pki.device("pump-17"), "pump-17").will("devices/pump-17/status", b"bye")
    assert pump.connect() == ACCEPTED
    clock.advance(timedelta(days=29))  # still valid: the sweep leaves it alone
    time.sleep(EXPIRY_SWEEP_S * 1.5)
    assert not pump.disconnected.is_set()
    clock.advance(timedelta(days=2))  # dev certificates live 30 days
    assert pump.disconnected.wait(EXPIRY_SWEEP_S * 3)
    cut = broker.wait_event("session.cut", "cert_expired")[0]
    assert cut["device"] == "pump-17" and cut["source"] == "clock"
    broker.wait_event("will.suppressed")


def test_same_device_id_with_new_unpinned_key_is_refused(start_broker: StartBroker, pki: DevPki) -> None:
    broker = start_broker()
    cred = pki.issue("unpinned-pump-17", "pump-17")  # right CA, right identity, a key nobody pinned
    assert Device(broker.port, pki.chain, cred, "pump-17").connect() == NOT_AUTHORIZED
    event = broker.wait_event("auth.rejected", "pin_mismatch")[0]
    assert event["device"] == "pump-17"


def test_client_id_differing_from_certificate_identity_is_refused(start_broker: StartBroker, pki: DevPki) -> None:
    broker = start_broker()
    dev = Device(broker.port, pki.chain, pki.device("pump-18"), "pump-17")
    assert dev.connect() == IDENTIFIER_REJECTED
    event = broker.wait_event("auth.rejected", "client_id_mismatch")[0]
    assert event["device"] == "pump-18" and event["client_id"] == "pump-17"


def test_empty_client_id_with_clean_session_gets_the_certificate_identity(
    start_broker: StartBroker, pki: DevPki
) -> None:
    broker = start_broker()
    assert try_connect(broker.port, pki.chain, pki.device("pump-17"), "") == 0
    assert broker.wait_event("auth.accepted")[0]["device"] == "pump-17"


def test_empty_client_id_without_clean_session_is_refused(start_broker: StartBroker, pki: DevPki) -> None:
    broker = start_broker()
    with tls_socket(broker.port, pki.chain, pki.device("pump-17")) as sock:
        sock.sendall(connect_packet("", clean=False))
        assert recv_exactly(sock, 4) == b"\x20\x02\x00\x02"  # CONNACK identifier rejected
    broker.wait_event("conn.rejected", "empty_client_id")
    assert broker.events.count("auth.accepted") == 0


def test_username_is_never_the_identity(start_broker: StartBroker, pki: DevPki) -> None:
    broker = start_broker()
    dev = Device(broker.port, pki.chain, pki.device("pump-18"), "pump-17")
    dev.client.username_pw_set("pump-17", "irrelevant")
    assert dev.connect() == IDENTIFIER_REJECTED


def test_device_missing_from_registry_is_refused(start_broker: StartBroker, pki: DevPki) -> None:
    broker = start_broker()
    cred = pki.issue("stranger", "valve-99")
    assert Device(broker.port, pki.chain, cred, "valve-99").connect() == NOT_AUTHORIZED
    broker.wait_event("auth.rejected", "unknown_device")


@pytest.mark.parametrize("identity", ["pump+1", "pump#1", "site/pump", "pump\x00x"])
def test_identity_that_could_widen_a_topic_filter_is_refused(
    start_broker: StartBroker, pki: DevPki, identity: str
) -> None:
    broker = start_broker()
    cred = pki.issue(f"bad-{ord(identity[4])}", identity)
    assert Device(broker.port, pki.chain, cred, "pump-17").connect() == NOT_AUTHORIZED
    broker.wait_event("auth.rejected", "identity_invalid")


def test_certificate_without_identity_is_refused(start_broker: StartBroker, pki: DevPki) -> None:
    broker = start_broker()
    cred = pki.issue("no-san", "pump-17", uri_prefix=None)
    assert Device(broker.port, pki.chain, cred, "pump-17").connect() == NOT_AUTHORIZED
    broker.wait_event("auth.rejected", "identity_missing")


def test_tls12_only_client_is_refused(start_broker: StartBroker, pki: DevPki) -> None:
    broker = start_broker()
    assert try_connect(broker.port, pki.chain, pki.device("pump-17"), "pump-17",
                       max_version=ssl.TLSVersion.TLSv1_2) is None
    broker.wait_event("tls.rejected", "tls_version")


def test_listener_under_uvloop_handles_every_handshake(start_broker: StartBroker, pki: DevPki) -> None:
    """`edge-broker run` uses uvloop; its transports differ from asyncio's (a ClientHello
    read before a TLS upgrade once made every other handshake hang)."""
    broker = start_broker(uvloop=True, limits={"tls_handshake_timeout": 2})
    for _ in range(6):
        assert try_connect(broker.port, pki.chain, pki.device("pump-17"), "pump-17") == 0
    assert try_connect(broker.port, pki.chain, None, "pump-17") is None
    broker.wait_event("tls.rejected", "no_client_cert")
    assert broker.events.count("auth.accepted") == 6
    assert broker.events.count("tls.rejected", "tls_handshake_timeout") == 0


def test_cert_test_endpoint_checks_a_certificate_and_opens_no_session(
    start_broker: StartBroker, pki: DevPki
) -> None:
    broker = start_broker(extra="cert_test_listener:\n  bind: 127.0.0.1:0\n")
    assert broker.edge is not None and broker.edge.cert_test_listener is not None
    port = broker.edge.cert_test_listener.port
    assert try_connect(port, pki.chain, pki.device("pump-17"), "pump-17") == ACCEPTED
    passed = broker.wait_event("cert_test.passed")[0]
    assert passed["device"] == "pump-17"
    unpinned = pki.issue("unpinned-test-17", "pump-17")
    assert try_connect(port, pki.chain, unpinned, "pump-17") == NOT_AUTHORIZED
    broker.wait_event("cert_test.failed", "pin_mismatch")
    assert broker.sync(lambda: len(broker.edge.broker.engine.sessions)) == 0  # type: ignore[union-attr]
