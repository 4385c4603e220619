"""A staged rollout through the real broker: real TLS, real device clients, the image over HTTPS (mTLS).

The publisher offers canaries first; devices verify, download (resuming with Range),
install A/B, trial-boot and report. Failure reports halt the rollout before anyone else
is offered the release.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest

from device_client.firmware import DeviceFirmware, HttpImageSource, serve_offers
from edge_core.clock import Clock, ManualClock, SystemClock
from edge_core.events import SecurityEvents
from edge_core.firmware_rollout import RolloutPolicy
from edge_core.registry import DeviceEntry, Registry, dump_registry, parse_registry
from edge_runtime.tls import client_tls_context
from gateway_agent.firmware_publish import PublishResult, publish_release
from gateway_agent.firmware_settings import PublishSettings
from tests.broker.acl_fixture import TEST_ACL, write_acl
from tests.conftest import StartBroker
from tests.firmware.release import Release
from tests.support.broker import BrokerThread
from tests.support.mqtt import tls_context
from tests.support.pki import DevPki

pytestmark = pytest.mark.integration

ACL = TEST_ACL.replace("everyone:\n", "everyone:\n  - allow subscribe devices/{device}/firmware/+\n"
                       "  - allow publish devices/{device}/firmware/report\n") + """\
  sensor-01:
    - allow publish devices/+/firmware/offer
    - allow subscribe devices/+/firmware/report
"""
DEVICES = ("pump-17", "pump-18", "sensor-02")
OLD = b"factory " * 1000
NEW = bytes(range(256)) * 2000


@pytest.fixture
def broker(start_broker: StartBroker, tmp_path: Path, registry_file: Path) -> tuple[BrokerThread, Release]:
    registry = parse_registry(registry_file.read_bytes())
    devices = dict(registry.devices)
    for device in DEVICES:
        e = devices[device]
        devices[device] = DeviceEntry(device_id=device, pins=e.pins, roles=e.roles,
                                      attributes={**e.attributes, "firmware_class": "pump-ctl"})
    registry_file.write_text(dump_registry(Registry(devices=devices)))
    release = Release(now=datetime.now(UTC))
    (tmp_path / "root.json").write_bytes(release.chain[0])
    b = start_broker(acl=write_acl(tmp_path, ACL),
                     extra=f"firmware:\n  root: {tmp_path / 'root.json'}\n  state: {tmp_path / 'state.json'}\n")
    return b, release


def publish_settings(b: BrokerThread, pki: DevPki, tmp_path: Path, registry: Path, policy: RolloutPolicy
                     ) -> PublishSettings:
    cred = pki.device("sensor-01")
    return PublishSettings(host="127.0.0.1", port=b.port, ca=pki.chain, cert=cred.cert, key=cred.key,
                           client_id="sensor-01", registry=registry, class_attribute="firmware_class",
                           images_dir=tmp_path / "images", http_bind=("127.0.0.1", 0),
                           public_url="https://127.0.0.1:0", http_cert=pki.root / "broker.crt",
                           http_key=pki.root / "broker.key", http_client_ca=pki.chain, rollout=policy)


async def run_devices(b: BrokerThread, pki: DevPki, tmp_path: Path, release: Release, *, healthy: bool,
                      offers: dict[str, int], pinned: bytes | None = None) -> list[asyncio.Task[None]]:
    tasks = []
    for device in DEVICES:
        DeviceFirmware.provision(tmp_path / device, pinned_root=pinned or release.chain[0], image=OLD, version=1)
        fw = DeviceFirmware(device, "pump-ctl", tmp_path / device, SystemClock())
        client = aiomqtt.Client("127.0.0.1", b.port, identifier=device,
                                tls_context=tls_context(pki.chain, pki.device(device)),
                                protocol=aiomqtt.ProtocolVersion.V311)

        def self_test(firmware: DeviceFirmware, slot: str, name: str = device) -> bool:
            offers[name] = offers.get(name, 0) + 1
            return healthy and firmware.slot_image(slot) == NEW

        cred = pki.device(device)
        images_tls = client_tls_context(pki.chain, cred.cert, cred.key)

        async def device_main(client: aiomqtt.Client = client, fw: DeviceFirmware = fw,
                              self_test: Callable[[DeviceFirmware, str], bool] = self_test,
                              tls: ssl.SSLContext = images_tls) -> None:
            async with client:  # the image is fetched with the device's own certificate (mTLS)
                await serve_offers(client, fw, source_for=lambda offer: HttpImageSource(str(offer.url), tls),
                                   self_test=self_test)
        tasks.append(asyncio.create_task(device_main()))
    await asyncio.sleep(0.5)  # subscribed
    return tasks


async def stop(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await task


async def rollout(b: BrokerThread, pki: DevPki, tmp_path: Path, registry: Path, release: Release, *,
                  healthy: bool, policy: RolloutPolicy, events: SecurityEvents, clock: Clock | None = None,
                  pinned: bytes | None = None, deadline: float = 60) -> tuple[PublishResult, dict[str, int]]:
    """Three devices run the reference updater; the publisher rolls release v2 out to them."""
    image = tmp_path / "fw.bin"
    image.write_bytes(NEW)
    offers: dict[str, int] = {}
    tasks = await run_devices(b, pki, tmp_path, release, healthy=healthy, offers=offers, pinned=pinned)
    try:
        result = await asyncio.wait_for(publish_release(
            publish_settings(b, pki, tmp_path, registry, policy), chain=release.chain,
            manifest_envelope=release.manifest(NEW, version=2), image=image, clock=clock or SystemClock(),
            events=events), deadline)
        await asyncio.sleep(0.5)  # anything still in flight arrives (nothing may, after a halt)
    finally:
        await stop(tasks)
    return result, offers


async def test_staged_rollout_reaches_every_device(broker: tuple[BrokerThread, Release], pki: DevPki,
                                                   tmp_path: Path, registry_file: Path) -> None:
    b, release = broker
    events = SecurityEvents("test")
    result, _ = await rollout(b, pki, tmp_path, registry_file, release, healthy=True, events=events,
                              policy=RolloutPolicy(canary_percent=30, rate_per_second=5,
                                                   report_timeout=timedelta(seconds=20)))
    assert result.summary["phase"] == "done" and result.summary["confirmed"] == sorted(DEVICES)
    for device in DEVICES:
        fw = DeviceFirmware(device, "pump-ctl", tmp_path / device, SystemClock())
        assert fw.version == 2 and fw.active_slot == "b" and fw.slot_image("b") == NEW
    # the canary confirmed before anyone else was offered the release
    (canary,) = result.summary["canaries"]  # type: ignore[misc]
    log = events.recent()
    confirmed = next(i for i, e in enumerate(log) if e["event"] == "firmware.report" and e["device"] == canary
                     and e["state"] == "confirmed")
    others = [i for i, e in enumerate(log) if e["event"] == "firmware.offered" and e["device"] != canary]
    assert len(others) == 2 and confirmed < min(others)
    assert b.events.count("firmware.accepted") == 3


async def test_failure_reports_halt_the_rollout(broker: tuple[BrokerThread, Release], pki: DevPki,
                                                tmp_path: Path, registry_file: Path) -> None:
    b, release = broker
    result, offers = await rollout(b, pki, tmp_path, registry_file, release, healthy=False,
                                   events=SecurityEvents("test"),
                                   policy=RolloutPolicy(canary_percent=30, rate_per_second=5))
    assert result.halted
    (canary,) = result.summary["canaries"]  # type: ignore[misc]
    assert list(result.summary["failed"]) == [canary]  # type: ignore[call-overload]
    assert "rolled_back:self_test_failed" in str(result.summary["halted"])
    assert offers == {canary: 1}
    for device in DEVICES:
        fw = DeviceFirmware(device, "pump-ctl", tmp_path / device, SystemClock())
        assert fw.version == 1 and fw.boot() == "a"  # the canary rolled back; the others never changed
    assert b.events.count("firmware.accepted") == 1


async def test_refusal_before_the_signatures_halts_at_once(broker: tuple[BrokerThread, Release], pki: DevPki,
                                                           tmp_path: Path, registry_file: Path) -> None:
    """A canary that trusts other release keys refuses with ``unknown_key``, before any signature verified,
    so its report carries no version: it names the offer instead, and the rollout halts on it. The clock
    never moves, so ``report_timeout`` cannot be what halts it."""
    b, release = broker
    events = SecurityEvents("test")
    result, offers = await rollout(b, pki, tmp_path, registry_file, release, healthy=True, events=events,
                                   clock=ManualClock(datetime.now(UTC)), pinned=Release(now=release.now).chain[0],
                                   policy=RolloutPolicy(canary_percent=30, rate_per_second=5), deadline=20)
    assert result.halted
    (canary,) = result.summary["canaries"]  # type: ignore[misc]
    assert result.summary["failed"] == {canary: "refused:unknown_key"}
    assert result.summary["offered"] == 1 and offers == {}  # nobody else was offered it, nothing installed
    (report,) = [e for e in events.recent() if e["event"] == "firmware.report"]
    assert report["device"] == canary and report["reason"] == "unknown_key" and report["version"] is None


async def test_a_halted_rollout_is_exit_1_from_the_command_line(
        broker: tuple[BrokerThread, Release], pki: DevPki, tmp_path: Path, registry_file: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``firmware publish`` says no (exit 1, as in the one exit-code table) when failure reports halt it."""
    from gateway_agent.cli import main

    b, release = broker
    (tmp_path / "roots").mkdir()
    (tmp_path / "roots" / "1.root.json").write_bytes(release.chain[0])
    manifest, image = tmp_path / "m.json", tmp_path / "fw.bin"
    manifest.write_bytes(release.manifest(NEW, version=2))
    image.write_bytes(NEW)
    cred = pki.device("sensor-01")
    settings = tmp_path / "firmware.yaml"
    settings.write_text(
        "keys:\n  unsafe_file_keys: {r1: r1.pem}\n  release: [r1]\n  root: [r1]\nroots_dir: roots\n"
        f"publish:\n  broker: {{host: 127.0.0.1, port: {b.port}, ca: {pki.chain}, cert: {cred.cert}, "
        f"key: {cred.key}, client_id: sensor-01}}\n  registry: {registry_file}\n  images_dir: images\n"
        f"  http: {{bind: '127.0.0.1:0', public_url: 'https://127.0.0.1:0', cert: {pki.root / 'broker.crt'}, "
        f"key: {pki.root / 'broker.key'}, client_ca: {pki.chain}}}\n"
        "  canary_percent: 30\n  rate_per_second: 5\n  max_failures: 0\n  report_timeout: 20\n")
    offers: dict[str, int] = {}
    tasks = await run_devices(b, pki, tmp_path, release, healthy=False, offers=offers)
    try:
        code = await asyncio.wait_for(asyncio.to_thread(
            main, ["firmware", "publish", "-c", str(settings), "--manifest", str(manifest), "--image", str(image)]),
            60)
    finally:
        await stop(tasks)
    out = capsys.readouterr().out
    assert code == 1, out
    assert "halted:" in out and "rolled_back:self_test_failed" in out
    assert len(offers) == 1  # the canary only
