"""The uplink service in-process against our real broker, with the cloud unreachable: bounds, alarms, reload."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from edge_core.clock import ManualClock
from edge_core.events import SecurityEvents
from edge_core.uplink_rules import load_uplink_config
from gateway_agent.uplink import UplinkService
from gateway_agent.uplink_devcloud import CloudPki, MosquittoCloud
from tests.support.broker import BrokerThread
from tests.support.mqtt import Device
from tests.support.pki import DevPki
from tests.uplink.conftest import CloudClient, free_port, needs_mosquitto, write_uplink_config

pytestmark = [pytest.mark.integration, needs_mosquitto]


async def _until(predicate: object, limit_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit_s
    while not predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.05)


async def test_full_queue_drops_oldest_with_an_alarm_and_reload_is_all_or_nothing(
    local_broker: BrokerThread, cloud: MosquittoCloud, pki: DevPki, tmp_path: Path,
) -> None:
    cloud.stop()  # unreachable for the whole test
    path = write_uplink_config(tmp_path, local_port=local_broker.port, cloud=cloud, pki=pki,
                               status_port=free_port(), max_bytes=20 * 74)
    events = SecurityEvents("uplink-test")
    service = UplinkService(load_uplink_config(path), events=events)
    task = asyncio.create_task(service.run())
    device = Device(local_broker.port, pki.chain, pki.device("sensor-02"), "sensor-02")
    try:
        await _until(lambda: service.local_up)
        assert await asyncio.to_thread(device.connect) == 0
        for n in range(30):  # each message: 60-byte cloud topic + 14-byte payload = 74 bytes
            await asyncio.to_thread(device.publish, "devices/sensor-02/telemetry/seq", f"{n:014d}".encode())
        await _until(lambda: service.counters.received == 30)
        assert service.queue is not None
        kept = [int(m.payload) for m in service.queue.peek(0, 100)]
        assert kept == list(range(10, 30))  # drop_oldest: the newest 20 survive
        assert service.status()["dropped"] == {"drop_oldest": 10}
        assert events.count("uplink.queue_alarm", "high_watermark") == 1
        assert events.count("uplink.queue_overflow", "drop_oldest") >= 1
        assert service.gauges()["uplink_queue_depth"] == 20
        assert events.count("uplink.cloud_unreachable") >= 1
        assert not service.cloud_up

        # a broken file: refused with file and line, the running rules stay
        good = path.read_text()
        path.write_text(good.replace("to: devices/{1}/cmd/{2}", "to: devices/{1}/cmd/{3}"))
        before = service.config
        assert service.reload() is False
        failed = events.recent("uplink.reload_failed")[-1]
        assert failed["file"] == str(path) and failed["line"] == good.splitlines().index(
            "    to: devices/{1}/cmd/{2}") + 1
        assert service.config is before
        # a good one: swapped in whole, the sessions restart, the queue is kept
        path.write_text(good.replace("gateways/{gateway}/devices/{1}/telemetry/{#}",
                                     "gateways/{gateway}/v2/devices/{1}/telemetry/{#}"))
        assert service.reload() is True
        await _until(lambda: service.counters.local_connects >= 2)
        # the persistent session still held the old filters: the ones no rule wants are dropped
        path.write_text(path.read_text().replace("  - from: operators/+/cmd-rejected\n    to: sites/{site}/gateways/"
                                                 "{gateway}/operators/{1}/cmd-rejected\n", ""))
        assert service.reload() is True
        await _until(lambda: events.count("uplink.unsubscribed", "rules_changed") == 1)
        assert events.recent("uplink.unsubscribed")[-1]["filters"] == ["operators/+/cmd-rejected"]
        moved = service.config.cloud_topic("devices/a/telemetry/x")
        assert moved == "sites/plant-a/gateways/gw-01/v2/devices/a/telemetry/x"
        assert service.queue.stats().depth == 20
    finally:
        await asyncio.to_thread(device.close)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await service.close()


async def _ack_after_disk(service: UplinkService, publish: object) -> None:
    """The disk write fails: no PUBACK goes out, so the broker still owes the message; it arrives later."""
    task = asyncio.create_task(service.run())
    try:
        await _until(lambda: service.local_up)
        assert service.queue is not None
        real_put = service.queue.put_many
        failures: list[int] = []

        def disk_full(items: list[tuple[str, bytes, int]], **_kw: object) -> object:
            failures.append(len(items))
            raise OSError(28, "No space left on device")

        service.queue.put_many = disk_full  # type: ignore[method-assign]
        await asyncio.to_thread(publish)  # type: ignore[arg-type]
        with pytest.raises(OSError):
            await asyncio.wait_for(task, 10)  # the service fails (the daemon's supervisor restarts it)
        assert failures == [1]
        service.queue.put_many = real_put  # type: ignore[method-assign]
        task = asyncio.create_task(service.run())  # what the supervisor does
        await _until(lambda: service.queue is not None and service.queue.stats().depth == 1)
        assert [m.payload for m in service.queue.peek(0, 10)] == [b"precious"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await service.close()


async def test_ack_only_after_disk_against_a_conformant_local_broker(
    cloud: MosquittoCloud, cloud_pki: CloudPki, pki: DevPki, tmp_path: Path,
) -> None:
    """A mosquitto standing in for the local broker: it re-sends the unacknowledged QoS 1 message (MQTT 3.1.1 4.4)."""
    cloud.stop()
    local = MosquittoCloud(cloud_pki, tmp_path / "local-mosquitto")
    local.acl.write_text("user gw-01\ntopic read devices/#\n\nuser cloud-app\ntopic write devices/#\n")
    local.start()
    try:
        path = write_uplink_config(tmp_path, local_port=local.port, cloud=cloud, pki=pki, status_port=free_port())
        text = path.read_text()
        cred = tmp_path / "uplink-cred"
        text = (text.replace(f"ca: {pki.chain}", f"ca: {cloud_pki.ca}")
                .replace(str(cred / "gateway-uplink.crt"), str(cloud_pki.cert("gw-01")))
                .replace(str(cred / "gateway-uplink.key"), str(cloud_pki.key("gw-01"))))
        path.write_text(text)
        service = UplinkService(load_uplink_config(path), events=SecurityEvents("uplink-test"))
        device = CloudClient(local, "cloud-app", persistent=False)
        try:
            await _ack_after_disk(service, lambda: device.publish("devices/sensor-02/telemetry/x", b"precious"))
        finally:
            device.close()
    finally:
        local.stop()


async def test_ack_only_after_disk_against_our_broker(
    local_broker: BrokerThread, cloud: MosquittoCloud, pki: DevPki, tmp_path: Path,
) -> None:
    cloud.stop()
    path = write_uplink_config(tmp_path, local_port=local_broker.port, cloud=cloud, pki=pki, status_port=free_port())
    service = UplinkService(load_uplink_config(path), events=SecurityEvents("uplink-test"))
    device = Device(local_broker.port, pki.chain, pki.device("sensor-02"), "sensor-02")
    assert device.connect() == 0
    try:
        await _ack_after_disk(service, lambda: device.publish("devices/sensor-02/telemetry/x", b"precious"))
    finally:
        await asyncio.to_thread(device.close)


async def test_a_cloud_with_the_wrong_certificate_gets_nothing(
    local_broker: BrokerThread, cloud: MosquittoCloud, pki: DevPki, tmp_path: Path,
) -> None:
    """A man in the middle (a broker our cloud CA did not sign): no connection, messages stay queued."""
    path = write_uplink_config(tmp_path, local_port=local_broker.port, cloud=cloud, pki=pki, status_port=free_port())
    path.write_text(path.read_text().replace(f"ca: {cloud.pki.ca}", f"ca: {pki.chain}"))  # trust the wrong CA
    events = SecurityEvents("uplink-test")
    service = UplinkService(load_uplink_config(path), events=events)
    device = Device(local_broker.port, pki.chain, pki.device("sensor-02"), "sensor-02")
    task = asyncio.create_task(service.run())
    try:
        await _until(lambda: service.local_up and events.count("uplink.cloud_unreachable") >= 2)
        assert await asyncio.to_thread(device.connect) == 0
        await asyncio.to_thread(device.publish, "devices/sensor-02/telemetry/x", b"secret")
        await _until(lambda: service.queue is not None and service.queue.stats().depth == 1)
        assert not service.cloud_up and service.counters.forwarded == 0
        detail = events.recent("uplink.cloud_unreachable")[-1]["detail"]
        assert "CERTIFICATE_VERIFY_FAILED" in detail or "certificate verify failed" in detail, detail
    finally:
        await asyncio.to_thread(device.close)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await service.close()


async def test_nothing_older_than_max_age_goes_out_after_a_reconnect(
    local_broker: BrokerThread, cloud: MosquittoCloud, pki: DevPki, tmp_path: Path,
    cloud_client: Callable[..., CloudClient],
) -> None:
    """Messages that aged past max_age during an outage are dropped when the cloud returns, with no new traffic."""
    app = await asyncio.to_thread(cloud_client, "cloud-app")
    await asyncio.to_thread(app.subscribe, "sites/#")
    cloud.stop()  # the persistent subscriber's session is kept; messages for it queue while it reconnects
    clock = ManualClock()
    path = write_uplink_config(tmp_path, local_port=local_broker.port, cloud=cloud, pki=pki,
                               status_port=free_port(), extra_queue="  max_age: 60\n")
    events = SecurityEvents("uplink-test")
    service = UplinkService(load_uplink_config(path), events=events, clock=lambda: clock.now().timestamp())
    task = asyncio.create_task(service.run())
    device = Device(local_broker.port, pki.chain, pki.device("sensor-02"), "sensor-02")
    try:
        await _until(lambda: service.local_up)
        assert await asyncio.to_thread(device.connect) == 0
        for n in range(5):
            await asyncio.to_thread(device.publish, "devices/sensor-02/telemetry/seq", f"old-{n}".encode())
        await _until(lambda: service.queue is not None and service.queue.stats().depth == 5)
        clock.advance(timedelta(seconds=61))  # the outage outlasts max_age; no local traffic since

        await asyncio.to_thread(cloud.start)
        await _until(lambda: service.cloud_up and service.queue is not None and service.queue.stats().depth == 0)
        assert service.counters.dropped == {"expired": 5}
        assert service.counters.forwarded == 0
        assert events.count("uplink.dropped", "expired") == 1
        await asyncio.to_thread(device.publish, "devices/sensor-02/telemetry/seq", b"fresh")
        got = await asyncio.to_thread(app.collect, 6, 5.0)
        assert [payload for _, payload in got] == [b"fresh"]
    finally:
        await asyncio.to_thread(device.close)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await service.close()
