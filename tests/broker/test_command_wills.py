# ruff: noqa: F811 - pytest fixtures imported from test_commands are parameters here
"""A will that carries a signed command is verified once, when it fires.

It used to be verified at CONNECT too, which recorded its nonce as seen, so the broker
refused it as ``replayed`` when it fired.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edge_core.clock import ManualClock
from tests.broker.test_commands import (  # noqa: F401 - fixtures
    TOPIC,
    alice,
    alice_key,
    broker,
    clock,
    pump,
    sign,
    start_command_broker,
)
from tests.support.broker import BrokerThread
from tests.support.mqtt import Device
from tests.support.pki import Credential, DevPki

pytestmark = pytest.mark.integration


def _alice_with_will(broker: BrokerThread, pki: DevPki, payload: bytes) -> Device:
    cred = Credential(pki.root / "operators" / "alice.crt", pki.root / "operators" / "alice.key")
    return Device(broker.port, pki.chain, cred, "alice").will(TOPIC, payload)


def test_a_signed_command_in_a_will_is_delivered_when_it_fires(
    broker: BrokerThread, pki: DevPki, clock: ManualClock, alice_key: ec.EllipticCurvePrivateKey
) -> None:
    device = pump(broker, pki)
    will = _alice_with_will(broker, pki, sign(alice_key, clock, ttl=120))
    assert will.connect() == 0
    assert not broker.events.recent("command.accepted"), "the will's command was consumed at CONNECT"
    clock.advance(timedelta(seconds=1))
    will.drop()
    got = device.expect(timeout=5)
    assert got.topic == TOPIC
    accepted = broker.wait_event("command.accepted")
    assert len(accepted) == 1 and accepted[0]["operator"] == "alice"
    assert not [e for e in broker.events.recent("command.rejected") if e.get("reason") == "replayed"]
    device.close()


def test_a_forged_command_in_a_will_is_refused_when_it_fires(
    broker: BrokerThread, pki: DevPki, clock: ManualClock
) -> None:
    device = pump(broker, pki)
    forger = ec.generate_private_key(ec.SECP256R1())
    will = _alice_with_will(broker, pki, sign(forger, clock, ttl=120))
    assert will.connect() == 0  # the ACL allows the topic; the envelope is judged when it fires
    will.drop()
    broker.wait_event("command.rejected", "bad_signature")
    device.expect_none(timeout=0.5)
    observer = alice(broker, pki)
    observer.close()
    device.close()
