"""amqtt's gaps, closed: refused CONNECTs change nothing, no cross-identity takeover,
wills pass the publish checks, retained and queued messages pass the receive check."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.broker.acl_fixture import TEST_ACL, replace_file, write_acl
from tests.conftest import StartBroker
from tests.support.broker import BrokerThread
from tests.support.mqtt import Device
from tests.support.pki import DevPki

pytestmark = pytest.mark.integration

NOT_AUTHORIZED, IDENTIFIER_REJECTED = 5, 2
SUB_FAILURE = 0x80


@pytest.fixture
def broker(start_broker: StartBroker, tmp_path: Path) -> BrokerThread:
    return start_broker(acl=write_acl(tmp_path))


def device(broker: BrokerThread, pki: DevPki, name: str, client_id: str | None = None, **kw: object) -> Device:
    return Device(broker.port, pki.chain, pki.device(name), client_id or name, **kw)  # type: ignore[arg-type]


def session_state(broker: BrokerThread, client_id: str) -> dict[str, object]:
    def read() -> dict[str, object]:
        assert broker.edge is not None and broker.edge.broker is not None
        engine = broker.edge.broker.engine
        session = engine.sessions.get(client_id)
        if session is None:
            return {"exists": False}
        return {
            "exists": True,
            "state": "connected" if session.connected else "disconnected",
            "subscriptions": sorted(session.subscriptions.items()),
            "will_topic": session.will.topic if session.will else None,
            "queued": len(session.queue) + len(session.inflight),
            "identity": session.attributes["edge.admitted"].identity,
        }
    return broker.sync(read)


def wait_queued(broker: BrokerThread, client_id: str, n: int) -> None:
    """PUBACK to the publisher comes before the broadcast queue reaches the offline session."""
    deadline = time.monotonic() + 5
    while session_state(broker, client_id)["queued"] != n:
        assert time.monotonic() < deadline, f"{client_id} never had {n} queued messages"
        time.sleep(0.01)


def test_refused_connects_change_nothing_for_an_offline_persistent_session(
    broker: BrokerThread, pki: DevPki
) -> None:
    owner = device(broker, pki, "pump-17", clean_session=False).will("devices/pump-17/status", b"offline")
    assert owner.connect() == 0
    assert owner.subscribe("devices/pump-17/cmd/#", qos=1) == [1]
    owner.close()  # clean DISCONNECT: session kept, will discarded by the client's goodbye
    commander = device(broker, pki, "sensor-02")
    assert commander.connect() == 0
    commander.publish("devices/pump-17/cmd/valve", b"open", qos=1)
    wait_queued(broker, "pump-17", 1)
    before = session_state(broker, "pump-17")
    assert before["state"] == "disconnected"

    # another identity claims the client id, with a clean session
    assert device(broker, pki, "pump-18", "pump-17").connect() == IDENTIFIER_REJECTED
    # the right identity with a key nobody pinned (a stolen name), clean session
    stolen = Device(broker.port, pki.chain, pki.issue("stolen-17", "pump-17"), "pump-17")
    assert stolen.connect() == NOT_AUTHORIZED
    broker.wait_event("auth.rejected", "pin_mismatch")

    assert session_state(broker, "pump-17") == before
    back = device(broker, pki, "pump-17", clean_session=False)
    assert back.connect() == 0
    got = back.expect()
    assert (got.topic, got.payload) == ("devices/pump-17/cmd/valve", b"open")
    back.close()
    commander.close()


def test_refused_connect_leaves_a_live_session_and_its_will_alone(broker: BrokerThread, pki: DevPki) -> None:
    owner = device(broker, pki, "pump-17").will("devices/pump-17/status", b"pump-17 lost")
    assert owner.connect() == 0
    assert owner.subscribe("devices/pump-17/cmd/#") == [1]
    before = session_state(broker, "pump-17")

    assert device(broker, pki, "pump-18", "pump-17").connect() == IDENTIFIER_REJECTED
    assert session_state(broker, "pump-17") == before

    commander = device(broker, pki, "sensor-02")
    assert commander.connect() == 0
    commander.publish("devices/pump-17/cmd/x", b"still mine")
    assert owner.expect().payload == b"still mine"
    assert not owner.disconnected.is_set()
    owner.close()
    commander.close()


def test_same_identity_takes_over_its_own_session(broker: BrokerThread, pki: DevPki) -> None:
    first = device(broker, pki, "pump-17", clean_session=False)
    assert first.connect() == 0
    assert first.subscribe("devices/pump-17/cmd/#") == [1]
    second = device(broker, pki, "pump-17", clean_session=False)
    assert second.connect() == 0
    assert first.disconnected.wait(5)
    broker.wait_event("session.takeover", "session_resumed")
    state = session_state(broker, "pump-17")
    assert state["state"] == "connected"
    assert state["subscriptions"] == [("devices/pump-17/cmd/#", 1)]
    commander = device(broker, pki, "sensor-02")
    assert commander.connect() == 0
    commander.publish("devices/pump-17/cmd/y", b"to the new connection")
    assert second.expect().payload == b"to the new connection"
    second.close()
    commander.close()


def test_will_on_a_topic_the_device_may_not_publish_refuses_the_connect(broker: BrokerThread, pki: DevPki) -> None:
    sneaky = device(broker, pki, "pump-18").will("devices/pump-17/status", b"pump-17 is dead (lie)")
    assert sneaky.connect() == NOT_AUTHORIZED
    broker.wait_event("will.rejected", "publish_denied")
    broker.wait_event("acl.denied", "no_grant")


def test_allowed_will_is_delivered_to_allowed_subscribers(broker: BrokerThread, pki: DevPki) -> None:
    watcher = device(broker, pki, "pump-17")
    assert watcher.connect() == 0
    assert watcher.subscribe("devices/+/status") == [1]
    dying = device(broker, pki, "pump-18").will("devices/pump-18/status", b"pump-18 lost")
    assert dying.connect() == 0
    dying.drop()
    got = watcher.expect()
    assert (got.topic, got.payload) == ("devices/pump-18/status", b"pump-18 lost")
    watcher.close()


def test_will_is_checked_again_when_it_fires(broker: BrokerThread, pki: DevPki, tmp_path: Path) -> None:
    watcher = device(broker, pki, "pump-17")
    assert watcher.connect() == 0
    assert watcher.subscribe("devices/+/status") == [1]
    dying = device(broker, pki, "pump-18").will("devices/pump-18/status", b"pump-18 lost")
    assert dying.connect() == 0
    # the admin withdraws status publishing before the device vanishes
    replace_file(tmp_path / "acl.yaml", TEST_ACL.replace("  - allow publish devices/{device}/status\n",
                                                         "  - allow publish devices/{device}/heartbeat\n"))
    broker.wait_event("config.reloaded", "acl")
    dying.drop()
    broker.wait_event("will.rejected", "publish_denied")
    watcher.expect_none()
    watcher.close()


def test_retained_messages_reach_only_allowed_receivers(broker: BrokerThread, pki: DevPki) -> None:
    publisher = device(broker, pki, "sensor-02")
    assert publisher.connect() == 0
    publisher.publish("devices/sensor-02/status", b"retained status", retain=True)
    # pump-18 keeps a persistent session; amqtt 0.12.1 sends a resuming session the retained
    # messages of *every* subscription filter in the broker, including pump-17's below.
    bystander = device(broker, pki, "pump-18", clean_session=False)
    assert bystander.connect() == 0
    bystander.close()
    allowed = device(broker, pki, "pump-17")
    assert allowed.connect() == 0
    assert allowed.subscribe("devices/+/status") == [1]
    got = allowed.expect()
    assert (got.topic, got.payload, got.retain) == ("devices/sensor-02/status", b"retained status", True)

    resumed = device(broker, pki, "pump-18", clean_session=False)
    assert resumed.connect() == 0
    resumed.expect_none(1.0)
    assert resumed.subscribe("devices/+/status") == [SUB_FAILURE]
    resumed.expect_none(0.5)
    allowed.close()
    resumed.close()
    publisher.close()


def test_queued_messages_are_checked_again_at_delivery(broker: BrokerThread, pki: DevPki, tmp_path: Path) -> None:
    owner = device(broker, pki, "pump-17", clean_session=False)
    assert owner.connect() == 0
    assert owner.subscribe("devices/pump-17/cmd/#", qos=1) == [1]
    owner.close()
    commander = device(broker, pki, "sensor-02")
    assert commander.connect() == 0
    commander.publish("devices/pump-17/cmd/valve", b"queued while offline", qos=1)
    wait_queued(broker, "pump-17", 1)
    # policy changes while the device is offline: it may no longer receive commands
    replace_file(tmp_path / "acl.yaml", TEST_ACL.replace("    - allow subscribe devices/{device}/cmd/#\n", ""))
    broker.wait_event("config.reloaded", "acl")
    back = device(broker, pki, "pump-17", clean_session=False)
    assert back.connect() == 0
    back.expect_none(1.0)
    broker.wait_event("acl.denied", "no_grant")
    back.close()
    commander.close()
