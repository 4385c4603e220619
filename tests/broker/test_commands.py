"""Signed commands through the real broker: every rejection reason, skew edges, restarts,
rejection notices, and arbitrary bytes on a command topic."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_client.commands import DeviceCommandVerifier
from edge_core.clock import ManualClock
from edge_core.envelope import sign_command
from edge_core.operators import EnvelopePolicy, OperatorKeys, parse_operators
from edge_core.registry import parse_registry
from gateway_agent.commanding import BrokerEndpoint, send_command
from tests.broker.acl_fixture import TEST_ACL, write_acl
from tests.conftest import StartBroker
from tests.support.broker import BrokerThread
from tests.support.mqtt import Device
from tests.support.pki import Credential, DevPki

pytestmark = pytest.mark.integration

COMMAND_ACL = TEST_ACL + """\
  alice:
    - allow publish devices/+/cmd/#
    - allow subscribe operators/{device}/cmd-rejected
    - allow subscribe operators/{device}/cmd-accepted
"""
TOPIC = "devices/pump-17/cmd/valve"


@pytest.fixture
def clock() -> ManualClock:
    # whole seconds: JWT times are whole seconds, and the skew edges are tested to the second
    return ManualClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def start_command_broker(start_broker: StartBroker, tmp_path: Path, pki: DevPki,
                         clock: ManualClock) -> Iterator[object]:
    def start() -> BrokerThread:
        broker = start_broker(acl=write_acl(tmp_path, COMMAND_ACL), clock=clock,
                              extra=f"commands:\n  operators: {pki.root / 'operators.yaml'}\n")
        # the replay cache refuses commands issued before start + skew (no replay window after a restart)
        clock.advance(timedelta(seconds=31))
        return broker
    yield start


@pytest.fixture
def broker(start_command_broker: object) -> BrokerThread:
    return start_command_broker()  # type: ignore[operator, no-any-return]


@pytest.fixture
def alice_key(pki: DevPki) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key((pki.root / "operators" / "alice-signing.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def alice(broker: BrokerThread, pki: DevPki) -> Device:
    cred = Credential(pki.root / "operators" / "alice.crt", pki.root / "operators" / "alice.key")
    dev = Device(broker.port, pki.chain, cred, "alice")
    assert dev.connect() == 0
    assert dev.subscribe("operators/alice/cmd-rejected") == [1]
    return dev


def pump(broker: BrokerThread, pki: DevPki) -> Device:
    dev = Device(broker.port, pki.chain, pki.device("pump-17"), "pump-17")
    assert dev.connect() == 0
    assert dev.subscribe("devices/pump-17/cmd/#") == [1]
    return dev


def sign(key: ec.EllipticCurvePrivateKey, clock: ManualClock, *, device: str = "pump-17", ttl: int = 30,
         shift: int = 0, **kw: object) -> bytes:
    return sign_command(key, issuer=kw.pop("issuer", "alice"), device=device,  # type: ignore[arg-type]
                        body=kw.pop("body", {"op": "open"}), ttl=timedelta(seconds=ttl),  # type: ignore[arg-type]
                        now=clock.now() + timedelta(seconds=shift), **kw)  # type: ignore[arg-type]


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def device_verifier(pki: DevPki, clock: ManualClock) -> DeviceCommandVerifier:
    config = parse_operators((pki.root / "operators.yaml").read_text(), source="operators.yaml")
    registry = parse_registry(pki.ca.registry_path.read_bytes())
    entry = registry.get("pump-17")
    assert entry is not None
    verifier = DeviceCommandVerifier("pump-17", OperatorKeys.bind(config, registry), config.policy, clock,
                                     profile=entry)
    return verifier


def test_signed_command_is_delivered_and_verified_by_the_device(
    broker: BrokerThread, pki: DevPki, clock: ManualClock, alice_key: ec.EllipticCurvePrivateKey
) -> None:
    device = pump(broker, pki)
    verifier = device_verifier(pki, clock)
    clock.advance(timedelta(seconds=31))  # the device's own replay cache also has a boot watermark
    result = send_command(
        BrokerEndpoint("127.0.0.1", broker.port, pki.chain, pki.root / "operators" / "alice.crt",
                       pki.root / "operators" / "alice.key"),
        operator="alice", signing_key=alice_key, device="pump-17", body={"op": "open"},
        ttl=timedelta(seconds=30), subtopic="valve", clock=clock, wait=0.5,
    )
    assert result.ok, result
    got = device.expect()
    assert got.topic == TOPIC
    command = verifier.verify(got.payload, topic=got.topic)
    assert dict(command.body) == {"op": "open"} and command.issuer == "alice"
    accepted = broker.wait_event("command.accepted")[0]
    assert accepted["jti"] == result.jti and accepted["operator"] == "alice"
    device.close()


def _none_alg(key: ec.EllipticCurvePrivateKey, clock: ManualClock) -> bytes:
    _header, claims, _ = sign(key, clock).split(b".")
    forged_header = _b64(json.dumps({"alg": "none", "typ": "edge-cmd+jwt", "kid": "alice"}).encode())
    return forged_header + b"." + claims + b"."


def _tampered(key: ec.EllipticCurvePrivateKey, clock: ManualClock) -> bytes:
    header, claims, signature = sign(key, clock).split(b".")
    flipped = bytearray(base64.urlsafe_b64decode(signature + b"=" * (-len(signature) % 4)))
    flipped[5] ^= 0x01
    return header + b"." + claims + b"." + _b64(bytes(flipped))


CASES = {
    "not_envelope": (lambda k, c: b"open the valve please", False),
    "bad_algorithm": (_none_alg, False),
    "bad_signature": (_tampered, False),
    "unknown_issuer": (lambda k, c: sign(k, c, issuer="mallory"), False),
    "issuer_not_authorized": (lambda k, c: sign(k, c, device="gateway-agent"), True),
    "expired": (lambda k, c: sign(k, c, ttl=10, shift=-100), True),
    "issued_in_future": (lambda k, c: sign(k, c, shift=120), True),
    "ttl_too_long": (lambda k, c: sign(k, c, ttl=3600), True),
    "audience_mismatch": (lambda k, c: sign(k, c, device="pump-18"), True),
    "oversized": (lambda k, c: sign(k, c, body={"blob": "x" * 5000}), False),
}
TOPICS = {"issuer_not_authorized": "devices/gateway-agent/cmd/valve"}


@pytest.mark.parametrize("reason", sorted(CASES))
def test_each_rejection_reason_drops_the_command(
    broker: BrokerThread, pki: DevPki, clock: ManualClock, alice_key: ec.EllipticCurvePrivateKey, reason: str
) -> None:
    make, notice_expected = CASES[reason]
    device = pump(broker, pki)
    operator = alice(broker, pki)
    operator.publish(TOPICS.get(reason, TOPIC), make(alice_key, clock))
    event = broker.wait_event("command.rejected", reason)[0]
    assert event["sender"] == "alice"
    device.expect_none()
    if notice_expected:
        notice = json.loads(operator.expect().payload)
        assert notice["reason"] == reason and notice["jti"] == event["jti"]
    else:  # no signature, no notice: a forger gets no oracle
        operator.expect_none()
    assert broker.events.count("command.rejected", reason) == 1
    device.close()
    operator.close()


def test_replayed_command_is_refused(
    broker: BrokerThread, pki: DevPki, clock: ManualClock, alice_key: ec.EllipticCurvePrivateKey
) -> None:
    device = pump(broker, pki)
    operator = alice(broker, pki)
    token = sign(alice_key, clock)
    operator.publish(TOPIC, token)
    assert device.expect().payload == token
    operator.publish(TOPIC, token)
    broker.wait_event("command.rejected", "replayed")
    assert json.loads(operator.expect().payload)["reason"] == "replayed"
    device.expect_none()
    device.close()
    operator.close()


def test_retained_command_is_refused(
    broker: BrokerThread, pki: DevPki, clock: ManualClock, alice_key: ec.EllipticCurvePrivateKey
) -> None:
    operator = alice(broker, pki)
    operator.publish(TOPIC, sign(alice_key, clock), retain=True)
    broker.wait_event("command.rejected", "retained_command")
    late = pump(broker, pki)  # subscribes after: nothing retained may replay to it
    late.expect_none()
    late.close()
    operator.close()


def test_a_device_cannot_command_another_device(broker: BrokerThread, pki: DevPki, clock: ManualClock,
                                                alice_key: ec.EllipticCurvePrivateKey) -> None:
    device = pump(broker, pki)
    other = Device(broker.port, pki.chain, pki.device("pump-18"), "pump-18")
    assert other.connect() == 0
    other.publish(TOPIC, sign(alice_key, clock))  # even a validly signed envelope
    broker.wait_event("acl.denied", "no_grant")
    device.expect_none()
    assert broker.events.count("command.accepted") == 0
    device.close()
    other.close()


@pytest.mark.parametrize(("shift", "ttl", "reason"), [
    (30, 30, None),                 # iat exactly at the allowed skew ahead
    (31, 30, "issued_in_future"),   # one second past it
    (-60, 30, None),                # exp 30 s ago: exactly at the skew
    (-61, 30, "expired"),           # one second past it
])
def test_clock_skew_at_both_edges(broker: BrokerThread, pki: DevPki, clock: ManualClock,
                                  alice_key: ec.EllipticCurvePrivateKey, shift: int, ttl: int,
                                  reason: str | None) -> None:
    clock.advance(timedelta(seconds=120))  # so a token from 60 s ago postdates the restart watermark
    device = pump(broker, pki)
    operator = alice(broker, pki)
    token = sign(alice_key, clock, shift=shift, ttl=ttl)
    operator.publish(TOPIC, token)
    if reason is None:
        assert device.expect().payload == token
    else:
        broker.wait_event("command.rejected", reason)
        device.expect_none()
    device.close()
    operator.close()


def test_replay_after_a_broker_restart_is_refused(
    start_command_broker: object, pki: DevPki, clock: ManualClock, alice_key: ec.EllipticCurvePrivateKey
) -> None:
    first = start_command_broker()  # type: ignore[operator]
    device = pump(first, pki)
    operator = alice(first, pki)
    token = sign(alice_key, clock, ttl=300)
    operator.publish(TOPIC, token)
    assert device.expect().payload == token
    device.close()
    operator.close()
    first.stop()

    second = start_command_broker()  # type: ignore[operator]  # fresh process state, empty replay cache
    device = pump(second, pki)
    operator = alice(second, pki)
    operator.publish(TOPIC, token)  # still within its TTL
    second.wait_event("command.rejected", "issued_before_restart")
    device.expect_none()
    fresh = sign(alice_key, clock)
    operator.publish(TOPIC, fresh)
    assert device.expect().payload == fresh
    device.close()
    operator.close()


def test_arbitrary_bytes_on_a_command_topic_never_crash_and_are_never_delivered(
    broker: BrokerThread, pki: DevPki
) -> None:
    device = pump(broker, pki)
    operator = alice(broker, pki)
    sent = 0

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.binary(max_size=5000) | st.text(max_size=300).map(str.encode))
    def publish_garbage(payload: bytes) -> None:
        nonlocal sent
        operator.publish(TOPIC, payload, qos=0)
        sent += 1

    publish_garbage()
    broker.wait_event("command.rejected", count=sent, timeout=20)
    device.expect_none()
    assert broker.events.count("command.accepted") == 0
    # the broker still serves: a fresh connection and a PINGREQ round trip
    probe = Device(broker.port, pki.chain, pki.device("sensor-01"), "sensor-01")
    assert probe.connect() == 0
    probe.close()
    device.close()
    operator.close()


def test_exception_inside_the_guard_denies_and_is_logged(
    broker: BrokerThread, pki: DevPki, clock: ManualClock, alice_key: ec.EllipticCurvePrivateKey,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    import broker_plugins.commands as guard

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("verifier bug")

    monkeypatch.setattr(guard, "verify_envelope", explode)
    device = pump(broker, pki)
    operator = alice(broker, pki)
    operator.publish(TOPIC, sign(alice_key, clock))
    event = broker.wait_event("publish.rejected", "plugin_error")[0]
    assert "verifier bug" in event["error"]
    device.expect_none()
    device.close()
    operator.close()


def test_device_refuses_a_command_injected_past_the_broker(pki: DevPki, clock: ManualClock,
                                                           alice_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = device_verifier(pki, clock)
    clock.advance(timedelta(seconds=31))
    token = sign(alice_key, clock)
    verifier.verify(token, topic=TOPIC)
    from edge_core.envelope import CommandRefused
    with pytest.raises(CommandRefused) as replay:
        verifier.verify(token, topic=TOPIC)
    assert replay.value.reason == "replayed"
    with pytest.raises(CommandRefused) as forged:
        verifier.verify(_tampered(alice_key, clock), topic=TOPIC)
    assert forged.value.reason == "bad_signature"
    assert EnvelopePolicy().is_command_topic(TOPIC)
