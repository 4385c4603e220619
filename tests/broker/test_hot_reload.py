"""Registry and ACL changes take effect within 2 seconds, all-or-nothing, without a restart."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edge_core.registry import dump_registry, parse_registry
from tests.broker.acl_fixture import TEST_ACL, replace_file, write_acl
from tests.conftest import StartBroker
from tests.support.broker import BrokerThread, write_settings
from tests.support.mqtt import Device
from tests.support.pki import DevPki

pytestmark = pytest.mark.integration


def _without_device(registry_file: Path, device: str) -> str:
    registry = parse_registry(registry_file.read_bytes())
    devices = {k: v for k, v in registry.devices.items() if k != device}
    return dump_registry(type(registry)(devices=devices))


def test_removing_a_device_cuts_its_live_session_within_2s(
    start_broker: StartBroker, pki: DevPki, registry_file: Path, tmp_path: Path
) -> None:
    broker = start_broker(acl=write_acl(tmp_path))
    pump = Device(broker.port, pki.chain, pki.device("pump-17"), "pump-17").will("devices/pump-17/status", b"bye")
    assert pump.connect() == 0
    started = time.monotonic()
    replace_file(registry_file, _without_device(registry_file, "pump-17"))
    assert pump.disconnected.wait(2.0)
    assert time.monotonic() - started < 2.0
    cut = broker.wait_event("session.cut", "unknown_device")[0]
    assert cut["device"] == "pump-17"
    broker.wait_event("will.suppressed")  # a cut device's will is not published
    assert Device(broker.port, pki.chain, pki.device("pump-17"), "pump-17").connect() == 5


def test_broken_registry_is_refused_with_file_line_and_the_last_good_stays(
    start_broker: StartBroker, pki: DevPki, registry_file: Path, tmp_path: Path
) -> None:
    broker = start_broker(acl=write_acl(tmp_path))
    good = registry_file.read_text()
    replace_file(registry_file, good.replace("pins:", "pinz:", 1))
    failed = broker.wait_event("config.reload_failed", "invalid", timeout=2.0)[0]
    assert failed["file"] == str(registry_file)
    assert failed["line"] == 5 and "missing required key 'pins'" in failed["detail"]
    pump = Device(broker.port, pki.chain, pki.device("pump-17"), "pump-17")
    assert pump.connect() == 0
    pump.close()


def test_acl_change_removes_live_subscriptions_it_no_longer_allows(
    start_broker: StartBroker, pki: DevPki, tmp_path: Path
) -> None:
    acl = write_acl(tmp_path)
    broker = start_broker(acl=acl)
    pump = Device(broker.port, pki.chain, pki.device("pump-17"), "pump-17")
    assert pump.connect() == 0
    assert pump.subscribe("devices/pump-17/cmd/#") == [1]
    assert pump.subscribe("sites/plant-a/broadcast") == [1]
    started = time.monotonic()
    replace_file(acl, TEST_ACL.replace("    - allow subscribe devices/{device}/cmd/#\n", ""))
    removed = broker.wait_event("subscription.removed", "acl_reload", timeout=2.0)
    assert time.monotonic() - started < 2.0
    assert [(e["device"], e["filter"]) for e in removed] == [("pump-17", "devices/pump-17/cmd/#")]
    commander = Device(broker.port, pki.chain, pki.device("sensor-02"), "sensor-02")
    assert commander.connect() == 0
    commander.publish("devices/pump-17/cmd/x", b"no longer delivered")
    commander.publish("sites/plant-a/broadcast", b"still delivered")
    assert pump.expect().payload == b"still delivered"
    pump.expect_none()
    pump.close()
    commander.close()


def test_broken_acl_is_refused_and_the_last_good_policy_stays(
    start_broker: StartBroker, pki: DevPki, tmp_path: Path
) -> None:
    acl = write_acl(tmp_path)
    broker = start_broker(acl=acl)
    replace_file(acl, TEST_ACL + "  pump-18:\n    - allow publish devices/{nosuchvar}/x\n")
    failed = broker.wait_event("config.reload_failed", "invalid", timeout=2.0)[0]
    assert failed["file"] == str(acl)
    assert failed["line"] == len(TEST_ACL.splitlines()) + 2  # the line of the bad rule
    assert "nosuchvar" in failed["detail"]
    pump = Device(broker.port, pki.chain, pki.device("pump-17"), "pump-17")
    assert pump.connect() == 0
    assert pump.subscribe("devices/pump-17/cmd/#") == [1]
    pump.close()


def test_reload_entry_point_applies_every_changed_file_at_once(
    request: pytest.FixtureRequest, pki: DevPki, registry_file: Path, tmp_path: Path
) -> None:
    """``EdgeBroker.reload()`` (what a SIGHUP handler calls) re-reads every concern's file now."""
    settings = write_settings(tmp_path, registry=registry_file, chain=pki.chain, server_dir=pki.root,
                              acl=write_acl(tmp_path))
    settings.write_text(settings.read_text().replace("reload_interval: 0.1", "reload_interval: 2.0"))
    broker = BrokerThread(settings).start()
    request.addfinalizer(broker.stop)
    assert broker.edge is not None
    edge = broker.edge
    assert broker.call(edge.reload) == {"registry": False, "acl": False}
    pump = Device(broker.port, pki.chain, pki.device("pump-17"), "pump-17")
    assert pump.connect() == 0
    assert pump.subscribe("devices/+/status") == [1]
    replace_file(tmp_path / "acl.yaml", TEST_ACL.replace("    - allow subscribe devices/+/status\n", ""))
    replace_file(registry_file, _without_device(registry_file, "sensor-02"))
    assert broker.call(edge.reload) == {"registry": True, "acl": True}
    assert broker.events.count("subscription.removed", "acl_reload") == 1
    assert broker.events.count("config.reloaded") == 2
    assert broker.call(edge.reload) == {"registry": False, "acl": False}  # unchanged files are not reloaded
    pump.close()
