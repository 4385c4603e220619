"""The topic ACL on every path, with real clients: publish, subscribe, delivery, `$` topics."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.broker.acl_fixture import write_acl
from tests.conftest import StartBroker
from tests.support.broker import BrokerThread
from tests.support.mqtt import Device
from tests.support.pki import Credential, DevPki

pytestmark = pytest.mark.integration
SUB_FAILURE = 0x80


@pytest.fixture
def broker(start_broker: StartBroker, tmp_path: Path) -> BrokerThread:
    return start_broker(acl=write_acl(tmp_path))


def device(broker: BrokerThread, pki: DevPki, name: str, **kw: object) -> Device:
    dev = Device(broker.port, pki.chain, pki.device(name), name, **kw)  # type: ignore[arg-type]
    assert dev.connect() == 0
    return dev


def test_publish_outside_the_device_scope_is_dropped_and_logged(broker: BrokerThread, pki: DevPki) -> None:
    pump = device(broker, pki, "pump-17")
    assert pump.subscribe("devices/pump-17/cmd/#") == [1]
    other = device(broker, pki, "pump-18")
    other.publish("devices/pump-17/cmd/stop", b"forged by pump-18")   # pump-18 may not command pump-17
    event = broker.wait_event("acl.denied", "no_grant")[0]
    assert event["device"] == "pump-18" and event["action"] == "publish"
    pump.expect_none()
    pump.close()
    other.close()


def test_wildcard_subscription_wider_than_the_grant_is_refused_not_filtered(
    broker: BrokerThread, pki: DevPki
) -> None:
    pump = device(broker, pki, "pump-17")
    assert pump.subscribe("#") == [SUB_FAILURE]
    assert pump.subscribe("devices/+/cmd/#") == [SUB_FAILURE]
    assert pump.subscribe("devices/pump-17/cmd/#") == [1]
    assert pump.subscribe("devices/pump-17/cmd/valve/+") == [1]
    denied = broker.wait_event("acl.denied", "no_grant", count=2)
    assert {e["topic"] for e in denied} >= {"#", "devices/+/cmd/#"}
    pump.close()


def test_malformed_filters_close_the_connection_with_an_event(broker: BrokerThread, pki: DevPki) -> None:
    """Raw SUBSCRIBE/UNSUBSCRIBE packets (paho would refuse to send these filters at all): a malformed
    filter is a protocol violation (MQTT 3.1.1, 4.8), so the connection closes; no SUBACK 0x80."""
    from tests.support.raw import (
        closed_by_peer,
        connect_packet,
        recv_exactly,
        subscribe_packet,
        tls_socket,
        unsubscribe_packet,
    )

    bad = ["devices/pump-17/cmd/#/x", "devices/pump-17/cmd+"]
    packets = [subscribe_packet(1, f) for f in bad] + [unsubscribe_packet(1, [f]) for f in bad]
    for data in packets:
        with tls_socket(broker.port, pki.chain, pki.device("pump-17")) as sock:
            sock.sendall(connect_packet("pump-17"))
            assert recv_exactly(sock, 4)[3] == 0
            sock.sendall(data)
            assert closed_by_peer(sock, timeout=2), f"connection stayed open after {data!r}"
    events = broker.wait_event("mqtt.protocol_violation", "invalid_topic_filter", count=4)
    assert all(e["device"] == "pump-17" for e in events)
    assert sum(f in e["detail"] for e in events for f in bad) == 4
    assert broker.events.count("subscribe.rejected") == 0


def test_dollar_topics_are_not_reached_by_leading_wildcards(broker: BrokerThread, pki: DevPki) -> None:
    pump = device(broker, pki, "pump-17")
    assert pump.subscribe("$SYS/#") == [SUB_FAILURE]
    assert pump.subscribe("+/broker/uptime") == [SUB_FAILURE]
    pump.close()


SHIPPED_ACL = Path(__file__).resolve().parents[2] / "configs" / "acl.yaml"


def test_only_the_gateway_role_reads_the_connect_events(start_broker: StartBroker, pki: DevPki,
                                                       tmp_path: Path) -> None:
    """The shipped ACL: the agent (role gateway) reads ``$SYS/broker/clients/<id>/connected``; a device
    reads no connect event, not even its own (it would learn when the others come and go)."""
    broker = start_broker(acl=write_acl(tmp_path, SHIPPED_ACL.read_text()))
    sensor = device(broker, pki, "sensor-01")
    for topic_filter in ("$SYS/broker/clients/#", "$SYS/broker/clients/+/connected",
                         "$SYS/broker/clients/sensor-01/connected", "$SYS/#"):
        assert sensor.subscribe(topic_filter) == [SUB_FAILURE], topic_filter
    agent = Device(broker.port, pki.chain, Credential(pki.root / "agent" / "gateway-agent.crt",
                                                      pki.root / "agent" / "gateway-agent.key"), "gateway-agent")
    assert agent.connect() == 0
    assert agent.subscribe("$SYS/broker/clients/+/connected") == [1]
    pump = device(broker, pki, "pump-18")
    got = agent.expect()
    assert (got.topic, got.qos, got.retain) == ("$SYS/broker/clients/pump-18/connected", 1, False)
    sensor.expect_none()
    for client in (sensor, agent, pump):
        client.close()


def test_allowed_flow_end_to_end(broker: BrokerThread, pki: DevPki) -> None:
    a = device(broker, pki, "sensor-01")
    b = device(broker, pki, "sensor-02")
    assert a.subscribe("sites/plant-a/broadcast") == [1]
    b.publish("sites/plant-a/broadcast", b"shift change")
    got = a.expect()
    assert (got.topic, got.payload) == ("sites/plant-a/broadcast", b"shift change")
    a.close()
    b.close()


mosquitto = pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients not installed")


def _mosq(tool: str, pki: DevPki, name: str, client_id: str, port: int, *args: str) -> list[str]:
    cred = pki.device(name)
    return [tool, "-h", "127.0.0.1", "-p", str(port), "--cafile", str(pki.chain), "--cert", str(cred.cert),
            "--key", str(cred.key), "--tls-version", "tlsv1.3", "-i", client_id, "-V", "mqttv311", *args]


@mosquitto
def test_mosquitto_clients_interoperate(broker: BrokerThread, pki: DevPki) -> None:
    """Debian's mosquitto_sub/mosquitto_pub: clients nobody on this project wrote."""
    sub = subprocess.Popen(
        _mosq("mosquitto_sub", pki, "pump-17", "pump-17", broker.port, "-t", "devices/pump-17/cmd/#", "-C", "1",
              "-W", "10", "-q", "1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    broker.wait_event("subscription.granted")
    pub = subprocess.run(
        _mosq("mosquitto_pub", pki, "sensor-02", "sensor-02", broker.port, "-t", "devices/pump-17/cmd/start",
              "-m", "go", "-q", "1"),
        capture_output=True, text=True, timeout=10, check=False,
    )
    assert pub.returncode == 0, pub.stderr
    out, err = sub.communicate(timeout=15)
    assert sub.returncode == 0, err
    assert out.strip() == "go"


@mosquitto
def test_mosquitto_client_with_spoofed_client_id_is_refused(broker: BrokerThread, pki: DevPki) -> None:
    result = subprocess.run(
        _mosq("mosquitto_pub", pki, "sensor-02", "pump-17", broker.port, "-t", "devices/pump-17/status",
              "-m", "x"),
        capture_output=True, text=True, timeout=10, check=False,
    )
    assert result.returncode != 0
    assert "identifier rejected" in (result.stderr + result.stdout).lower()
    broker.wait_event("auth.rejected", "client_id_mismatch")
