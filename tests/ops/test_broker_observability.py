"""The broker's /readyz, /metrics and $SYS topics, on a real broker with real clients."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker_plugins.sys_topics import SYS_TOPICS, SysTopicPublisher
from edge_core.clock import ManualClock
from gateway_agent.pki import FileCA
from tests.broker.acl_fixture import TEST_ACL, write_acl
from tests.broker.test_revocation import publish_crl, revocation_settings
from tests.conftest import StartBroker
from tests.support.broker import BrokerThread
from tests.support.mqtt import Device
from tests.support.pki import DevPki

pytestmark = pytest.mark.integration


def get(broker: BrokerThread, path: str) -> tuple[int, bytes]:
    assert broker.edge is not None and broker.edge.status_server is not None
    url = f"http://127.0.0.1:{broker.edge.status_server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def ca(tmp_path: Path, pki: DevPki) -> FileCA:
    return pki.private_ca(tmp_path / "ca")


def test_readyz_flips_when_the_crl_goes_stale_under_fail_closed(start_broker: StartBroker, pki: DevPki,
                                                                ca: FileCA, tmp_path: Path) -> None:
    crl = tmp_path / "crl.pem"
    publish_crl(ca, crl, validity=timedelta(days=1))
    clock = ManualClock()
    broker = start_broker(acl=write_acl(tmp_path), extra=revocation_settings(crl, pki, "fail_closed"), clock=clock)
    code, body = get(broker, "/readyz")
    assert code == 200, body
    assert json.loads(body)["checks"] == {"listeners": {"ok": True}, "crl": {"ok": True}}
    clock.advance(timedelta(days=2))  # past nextUpdate: fail_closed refuses this issuer's devices
    broker.wait_event("crl.alarm", "stale_past_next_update")
    code, body = get(broker, "/readyz")
    assert code == 503
    detail = json.loads(body)["checks"]["crl"]["detail"]
    assert "stale_past_next_update" in detail and "fail_closed" in detail
    assert get(broker, "/healthz") == (200, b"ok\n")  # alive, just not ready
    families = {f.name: f for f in text_string_to_metric_families(get(broker, "/metrics")[1].decode())}
    assert [s.value for s in families["edge_broker_crl_fresh"].samples] == [0.0]
    publish_crl(FileCA(ca.dir, clock=clock), crl)  # a fresh CRL on the same clock ends it
    broker.wait_event("crl.recovered", "fresh")
    assert get(broker, "/readyz")[0] == 200


def test_fail_open_alarm_stays_ready_with_a_stale_crl(start_broker: StartBroker, pki: DevPki, ca: FileCA,
                                                      tmp_path: Path) -> None:
    crl = tmp_path / "crl.pem"
    publish_crl(ca, crl, validity=timedelta(days=1))
    clock = ManualClock()
    broker = start_broker(acl=write_acl(tmp_path), extra=revocation_settings(crl, pki), clock=clock)
    clock.advance(timedelta(days=2))
    broker.wait_event("crl.alarm", "stale_past_next_update")
    assert get(broker, "/readyz")[0] == 200  # the policy admits; the alarm is the signal


def test_metrics_from_a_live_broker(start_broker: StartBroker, pki: DevPki, ca: FileCA, tmp_path: Path) -> None:
    crl = tmp_path / "crl.pem"
    publish_crl(ca, crl)
    broker = start_broker(acl=write_acl(tmp_path), extra=revocation_settings(crl, pki))
    pump = Device(broker.port, pki.chain, pki.device("pump-17"), "pump-17")
    assert pump.connect() == 0
    spoof = Device(broker.port, pki.chain, pki.device("pump-18"), "pump-17")
    assert spoof.connect() == 2
    broker.wait_event("auth.rejected", "client_id_mismatch")
    code, body = get(broker, "/metrics")
    assert code == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    events = {(s.labels["event"], s.labels["reason"]): s.value for s in families["edge_broker_events"].samples
              if s.name.endswith("_total")}
    assert events[("auth.rejected", "client_id_mismatch")] == 1
    assert {s.labels["state"]: s.value for s in families["edge_broker_sessions"].samples}["connected"] == 1
    assert {s.labels["listener"]: s.value for s in families["edge_broker_connections"].samples}["devices"] >= 1
    (next_update,) = families["edge_broker_crl_next_update_timestamp_seconds"].samples
    assert next_update.value > 0 and next_update.labels["issuer"]
    assert "offline" in {s.labels["queue"] for s in families["edge_broker_queue_depth"].samples}
    assert "process_resident_memory_bytes" in body.decode()
    if shutil.which("promtool"):  # Debian's prometheus package (scripts/system-packages.sh installs it)
        lint = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30,
                              check=False)
        assert lint.returncode == 0, lint.stdout + lint.stderr
    pump.close()


SYS_ACL = TEST_ACL.replace("  sensor-02:\n", "  sensor-02:\n    - allow subscribe $SYS/broker/clients/#\n")


def test_sys_topics_reach_only_an_explicit_grant(start_broker: StartBroker, pki: DevPki, tmp_path: Path) -> None:
    broker = start_broker(acl=write_acl(tmp_path, SYS_ACL))
    watcher = Device(broker.port, pki.chain, pki.device("sensor-02"), "sensor-02")
    assert watcher.connect() == 0
    assert watcher.subscribe("$SYS/broker/clients/connected") == [1]
    other = Device(broker.port, pki.chain, pki.device("pump-17"), "pump-17")
    assert other.connect() == 0
    assert other.subscribe("$SYS/broker/clients/connected") == [0x80]  # no grant, no $SYS
    assert other.subscribe("#") == [0x80]
    assert broker.edge is not None
    published = broker.call(broker.edge.sys_topics.publish_once)
    assert "$SYS/broker/clients/connected" in published and "$SYS/broker/version" in published
    got = watcher.expect()
    assert (got.topic, got.payload, got.retain) == ("$SYS/broker/clients/connected", b"2", False)
    watcher.expect_none()  # the version topic is not granted to it
    other.expect_none()
    watcher.close()
    other.close()
    # a wider grant gets every clients/ value of the next round
    late = Device(broker.port, pki.chain, pki.device("sensor-02"), "sensor-02")
    assert late.connect() == 0
    assert late.subscribe("$SYS/broker/clients/#") == [1]
    broker.call(broker.edge.sys_topics.publish_once)
    topics = {late.expect().topic for _ in range(4)}
    assert topics == {"$SYS/broker/clients/connected", "$SYS/broker/clients/disconnected",
                      "$SYS/broker/clients/total", "$SYS/broker/clients/maximum"}
    late.close()


def test_dropped_messages_are_counted_exactly(start_broker: StartBroker, pki: DevPki, tmp_path: Path) -> None:
    """An offline persistent session with room for 100 messages gets 1,600 QoS 1 messages: exactly 1,500
    are dropped. ``$SYS/broker/publish/messages/dropped`` and the metric say 1500, though the
    ``delivery.dropped`` events are rate-limited (one per overflow episode, then every 1,000 drops)."""
    from tests.support.raw import PUBACK, RawClient, publish_packet

    acl = SYS_ACL.replace("    - allow subscribe $SYS/broker/clients/#\n",
                          "    - allow subscribe $SYS/broker/publish/#\n")
    broker = start_broker(acl=write_acl(tmp_path, acl), limits={"outbound_queue_messages": 100})
    away = Device(broker.port, pki.chain, pki.device("pump-17"), "pump-17", clean_session=False)
    assert away.connect() == 0
    assert away.subscribe("devices/+/status") == [1]
    away.close()
    watcher = Device(broker.port, pki.chain, pki.device("sensor-02"), "sensor-02")
    assert watcher.connect() == 0
    assert watcher.subscribe("$SYS/broker/publish/messages/dropped") == [1]
    with RawClient(broker.port, pki.chain, pki.device("sensor-01"), timeout=30) as pub:
        assert pub.connect("sensor-01").body[1] == 0
        pub.send(b"".join(publish_packet("devices/sensor-01/status", b"%d" % n, qos=1, packet_id=n)
                          for n in range(1, 1601)))
        while pub.read_until(PUBACK).packet_id != 1600:
            pass
    assert broker.events.count("delivery.dropped") == 2  # streak 1 and 1000: the events undercount
    assert broker.edge is not None
    broker.call(broker.edge.sys_topics.publish_once)
    got = watcher.expect()
    assert (got.topic, got.payload) == ("$SYS/broker/publish/messages/dropped", b"1500")
    families = {f.name: f for f in text_string_to_metric_families(get(broker, "/metrics")[1].decode())}
    assert [s.value for s in families["edge_broker_messages_dropped"].samples] == [1500.0]
    watcher.close()


async def test_sys_publisher_sends_every_value_in_mosquitto_names() -> None:
    sent: list[tuple[str, bytes]] = []
    values: dict[str, int | str] = {"clients_connected": 3, "uptime": "10 seconds", "publish_dropped": 0}

    async def publish(topic: str, payload: bytes) -> None:
        sent.append((topic, payload))

    publisher = SysTopicPublisher(lambda: values, publish, interval=0.01)
    await publisher.publish_once()
    assert dict(sent) == {"$SYS/broker/clients/connected": b"3", "$SYS/broker/uptime": b"10 seconds",
                          "$SYS/broker/publish/messages/dropped": b"0", "$SYS/broker/clients/maximum": b"3"}
    sent.clear()
    values["clients_connected"] = 1
    await publisher.publish_once()
    assert dict(sent)["$SYS/broker/clients/connected"] == b"1"
    assert dict(sent)["$SYS/broker/clients/maximum"] == b"3"  # the most seen since start
    assert set(SYS_TOPICS.values()) >= {"$SYS/broker/clients/connected", "$SYS/broker/uptime"}
    task = asyncio.create_task(publisher.run())
    await asyncio.sleep(0.05)
    task.cancel()


def test_readyz_flips_while_the_session_store_cannot_write(start_broker: StartBroker, pki: DevPki,
                                                           tmp_path: Path) -> None:
    """PUBACK means stored: a broker whose store cannot commit is no place to send devices."""
    db = tmp_path / "broker.db"
    broker = start_broker(acl=write_acl(tmp_path), extra=f"persistence:\n  path: {db}\n  synchronous: full\n")
    code, body = get(broker, "/readyz")
    assert code == 200 and json.loads(body)["checks"]["store"] == {"ok": True}
    pump = Device(broker.port, pki.chain, pki.device("pump-17"), "pump-17")
    assert pump.connect() == 0
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")  # another process holds the database: commits time out
        pump.publish("devices/pump-17/status", b"online", qos=1, retain=True)
        broker.wait_event("store.write_failed", timeout=15)
        code, body = get(broker, "/readyz")
        assert code == 503
        assert "session store" in json.loads(body)["checks"]["store"]["detail"]
    finally:
        other.execute("ROLLBACK")
        other.close()
    pump = Device(broker.port, pki.chain, pki.device("pump-17"), "pump-17")
    assert pump.connect() == 0
    pump.publish("devices/pump-17/status", b"online again", qos=1, retain=True)
    deadline = time.monotonic() + 10
    while get(broker, "/readyz")[0] != 200:  # the next commit succeeds: ready again
        assert time.monotonic() < deadline, "still not ready after a successful write"
        time.sleep(0.05)
    pump.close()
