"""The device re-verifies every command: forged or replayed commands past the broker die here."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from device_client import DeviceCommandVerifier
from edge_core.clock import ManualClock
from edge_core.envelope import CommandRefused, sign_command, verify_envelope
from edge_core.events import SecurityEvents
from edge_core.operators import DeviceProfile, EnvelopePolicy, Grant, Operator, OperatorKey, OperatorKeys
from edge_core.replay import MemoryReplayCache

BOOT = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
DEVICE = "pump-17"
POLICY = EnvelopePolicy()
ALICE = ec.generate_private_key(ec.SECP256R1())
CAROL = ec.generate_private_key(ec.SECP256R1())
MALLORY = ec.generate_private_key(ec.SECP256R1())
KEYS = OperatorKeys(operators={
    "alice": Operator("alice", (OperatorKey("alice", "alice", ALICE.public_key()),),
                      (Grant(devices=frozenset({DEVICE})),)),
    "carol": Operator("carol", (OperatorKey("carol", "carol", CAROL.public_key()),),
                      (Grant(roles=frozenset({"pump"})),)),
})


def sign(now: datetime, *, key: ec.EllipticCurvePrivateKey = ALICE, issuer: str = "alice",
         device: str = DEVICE, ttl: int = 60, jti: str | None = None) -> bytes:
    return sign_command(key, issuer=issuer, device=device, body={"name": "open"}, ttl=timedelta(seconds=ttl),
                        now=now, jti=jti)


def booted(
    after: timedelta = timedelta(minutes=5), **kw: object
) -> tuple[DeviceCommandVerifier, ManualClock]:
    clock = ManualClock(BOOT)
    verifier = DeviceCommandVerifier(DEVICE, KEYS, POLICY, clock, **kw)  # type: ignore[arg-type]
    clock.advance(after)
    return verifier, clock


def refused(verifier: DeviceCommandVerifier, token: bytes, topic: str | None = None) -> str:
    with pytest.raises(CommandRefused) as info:
        verifier.verify(token, topic=topic)
    return info.value.reason


def test_accepts_a_fresh_command_on_its_topic() -> None:
    verifier, clock = booted()
    command = verifier.verify(sign(clock.now()), topic="devices/pump-17/cmd/open")
    assert command.device == DEVICE and command.issuer == "alice" and dict(command.body) == {"name": "open"}


def test_forged_command_injected_past_the_broker_is_refused() -> None:
    verifier, clock = booted()
    forged = sign_command(MALLORY, issuer="alice", device=DEVICE, body={"name": "open"},
                          ttl=timedelta(seconds=60), now=clock.now(), kid="alice")
    assert refused(verifier, forged) == "bad_signature"


def test_replay_the_broker_accepted_is_refused_by_the_device_cache() -> None:
    verifier, clock = booted()
    token = sign(clock.now())
    broker_cache = MemoryReplayCache(100, started_at=BOOT)
    verify_envelope(token, topic_device=DEVICE, keys=KEYS, policy=POLICY, now=clock.now(),
                    replay=broker_cache)
    verifier.verify(token)
    clock.advance(timedelta(seconds=20))
    # injected straight to the device, e.g. by a compromised link: the device still refuses
    assert refused(verifier, token) == "replayed"


def test_command_for_another_device_is_refused() -> None:
    verifier, clock = booted()
    assert refused(verifier, sign(clock.now(), device="valve-3")) == "audience_mismatch"


@pytest.mark.parametrize("topic", ["devices/valve-3/cmd", "devices/pump-17/telemetry", "devices/+/cmd"])
def test_wrong_topic_is_refused_before_parsing(topic: str) -> None:
    verifier, _ = booted()
    assert refused(verifier, b"garbage", topic=topic) == "audience_mismatch"


def test_freshness_by_the_device_clock() -> None:
    verifier, clock = booted()
    token = sign(clock.now(), ttl=60)
    clock.advance(timedelta(seconds=91))
    assert refused(verifier, token) == "expired"
    assert refused(verifier, sign(clock.now() + timedelta(seconds=31))) == "issued_in_future"


def test_exp_edge_on_the_device() -> None:
    verifier, clock = booted()
    issued = clock.now()
    clock.advance(timedelta(seconds=90))
    assert verifier.verify(sign(issued, ttl=60)).jti
    clock.advance(timedelta(seconds=1))
    assert refused(verifier, sign(issued, ttl=60)) == "expired"


def test_commands_issued_before_boot_are_refused() -> None:
    verifier, clock = booted(after=timedelta(seconds=0))
    assert refused(verifier, sign(BOOT - timedelta(seconds=10))) == "issued_before_restart"
    assert refused(verifier, sign(BOOT + timedelta(seconds=29))) == "issued_before_restart"
    clock.advance(timedelta(seconds=30))
    assert verifier.verify(sign(BOOT + timedelta(seconds=30))).jti


def test_profile_binds_role_grants() -> None:
    verifier, clock = booted()
    assert refused(verifier, sign(clock.now(), key=CAROL, issuer="carol")) == "issuer_not_authorized"
    with_profile, clock2 = booted(profile=DeviceProfile(DEVICE, roles=frozenset({"pump"})))
    assert with_profile.verify(sign(clock2.now(), key=CAROL, issuer="carol")).issuer == "carol"


def test_profile_for_another_device_is_a_mistake() -> None:
    with pytest.raises(ValueError, match="profile"):
        DeviceCommandVerifier(DEVICE, KEYS, POLICY, ManualClock(BOOT), profile=DeviceProfile("valve-3"))


def test_own_replay_cache_fails_closed_when_full() -> None:
    clock = ManualClock(BOOT)
    verifier = DeviceCommandVerifier(DEVICE, KEYS, POLICY, clock, MemoryReplayCache(1, started_at=BOOT))
    clock.advance(timedelta(minutes=1))
    verifier.verify(sign(clock.now()))
    assert refused(verifier, sign(clock.now())) == "replay_cache_full"


def test_every_decision_is_an_event_with_its_reason() -> None:
    events = SecurityEvents("device_client")
    verifier, clock = booted(events=events)
    token = sign(clock.now(), jti="D" * 22)
    with capture_logs() as logs:
        verifier.verify(token)
        with pytest.raises(CommandRefused):
            verifier.verify(token)
    assert [(e["event"], e.get("reason")) for e in logs] == [("command.accepted", None),
                                                             ("command.rejected", "replayed")]
    assert logs[1]["operator"] == "alice" and logs[1]["jti"] == "D" * 22 and logs[1]["device"] == DEVICE
    assert events.count("command.rejected", "replayed") == 1
    assert events.count("command.accepted") == 1
