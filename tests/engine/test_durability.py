"""A PUBACK means stored: persistent sessions, their queues and retained messages survive a restart
and a crash (SIGKILL of ``edge-broker run``)."""

from __future__ import annotations

import pytest

from tests.engine.conftest import Engine
from tests.support.raw import PUBACK, PUBLISH, ack_packet

pytestmark = pytest.mark.integration

QUEUED = 50


def _subscribe_persistent_and_leave(engine: Engine, port: int) -> None:
    sub = engine.raw(port, "pump-17")
    assert sub.connect("pump-17", clean=False).body[1] == 0
    assert sub.subscribe([("devices/pump-17/cmd/#", 1)]) == [1]
    sub.close()


def _publish_while_offline(engine: Engine, port: int) -> None:
    pub = engine.raw(port, "sensor-02")
    assert pub.connect("sensor-02").body[1] == 0
    for n in range(QUEUED):  # each one PUBACKed, so each one stored
        pub.publish(f"devices/pump-17/cmd/{n}", f"queued {n}".encode(), qos=1, packet_id=n + 1)
    pub.publish("lab/retained", b"kept across restarts", qos=1, packet_id=QUEUED + 1, retain=True)
    pub.drop()


def _expect_everything_back(engine: Engine, port: int) -> None:
    back = engine.raw(port, "pump-17")
    assert back.connect("pump-17", clean=False).body == b"\x01\x00", "persistent session lost"
    got: list[bytes] = []
    for _ in range(QUEUED):
        packet = back.read_until(PUBLISH, timeout=3)
        got.append(packet.payload)
        back.send(ack_packet(PUBACK, packet.packet_id))
    assert got == [f"queued {n}".encode() for n in range(QUEUED)]
    # the subscription came back too: a new command reaches the resumed session
    pub = engine.raw(port, "sensor-02")
    assert pub.connect("sensor-02").body[1] == 0
    pub.publish("devices/pump-17/cmd/after", b"after restart", qos=1, packet_id=1)
    assert back.read_until(PUBLISH, timeout=3).payload == b"after restart"
    fresh = engine.raw(port, "sensor-01")
    assert fresh.connect("sensor-01").body[1] == 0
    assert fresh.subscribe([("lab/#", 0)]) == [0]
    retained = fresh.read_until(PUBLISH, timeout=3)
    assert (retained.topic, retained.payload, retained.retain) == ("lab/retained", b"kept across restarts", True)


@pytest.mark.parametrize("synchronous", ["full", "normal"])
def test_puback_for_an_offline_session_survives_a_restart(engine: Engine, synchronous: str) -> None:
    settings = engine.settings(persistence=synchronous)
    first = engine.start(settings)
    _subscribe_persistent_and_leave(engine, first.port)
    _publish_while_offline(engine, first.port)
    first.stop()
    second = engine.start(settings)
    _expect_everything_back(engine, second.port)


def test_puback_for_an_offline_session_survives_a_crash(engine: Engine) -> None:
    broker = engine.process(persistence="full")
    broker.start()
    _subscribe_persistent_and_leave(engine, broker.port)
    _publish_while_offline(engine, broker.port)
    broker.kill()  # SIGKILL right after the last PUBACK: no shutdown code runs
    broker.start()
    _expect_everything_back(engine, broker.port)


def test_unknown_persistence_mode_is_a_config_error(engine: Engine) -> None:
    from broker_plugins.settings import load_settings
    from edge_core.errors import ConfigError

    with pytest.raises(ConfigError, match="synchronous"):
        load_settings(engine.settings(persistence="sometimes"))
