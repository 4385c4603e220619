"""Demo step: signed firmware with release keys in SoftHSM2, a staged rollout, a forgery and a rollback.

Called once from ``demo/demo.py`` while the broker and the agent run. Every step uses the
real programs: ``gateway-agent firmware keygen|root|sign|verify|publish`` against a SoftHSM2
token created under ``var/softhsm``, the hardened broker's firmware guard, and two reference
devices (``device_client.firmware``) that verify, download, install A/B and confirm.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography.hazmat.primitives.asymmetric import ec

from device_client.client import DeviceClient, DeviceConfig
from device_client.firmware import DeviceFirmware, HttpImageSource, serve_offers
from edge_core.clock import SystemClock
from edge_core.files import atomic_write_bytes, atomic_write_text
from edge_core.firmware import MANIFEST_TYPE, OFFER_TOPIC, SoftwareSigner, make_manifest, make_offer, sign_envelope
from edge_core.registry import DeviceEntry, Registry, dump_registry, parse_registry
from gateway_agent.pki import FileCA

ROOT = Path(__file__).resolve().parent.parent
CERTS = ROOT / "certs-dev"
VAR = ROOT / "var"
DEVICES = ("device-001", "device-002")
CLASS = "pump-ctl"
PIN = "20261201"  # the demo token's PIN, in the environment as production would have it


def _token() -> None:
    base = VAR / "softhsm"
    (base / "tokens").mkdir(parents=True, exist_ok=True)
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    os.environ["FIRMWARE_TOKEN_PIN"] = PIN
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "release", "--so-pin", "55667788",
                    "--pin", PIN], check=True, capture_output=True)


def _settings() -> Path:
    text = (ROOT / "configs" / "firmware.yaml").read_text()
    for old, new in (("canary_percent: 10 ", "canary_percent: 50 "), ("rate_per_second: 2 ", "rate_per_second: 5 "),
                     ("report_timeout: 600 ", "report_timeout: 30  ")):
        assert old in text, old
        text = text.replace(old, new)
    path = VAR / "demo-firmware.yaml"  # var/ and configs/ are siblings: relative paths still hold
    atomic_write_text(path, text)
    return path


def _enrol() -> None:
    """The two pumps get a firmware class; the release publisher gets its own identity (role gateway)."""
    issued = FileCA(CERTS).issue_device("firmware-release")
    registry = parse_registry((CERTS / "registry.yaml").read_bytes())
    devices = dict(registry.devices)
    for device in DEVICES:
        e = devices[device]
        devices[device] = DeviceEntry(device_id=device, pins=e.pins, roles=e.roles,
                                      attributes={**e.attributes, "firmware_class": CLASS})
    devices["firmware-release"] = DeviceEntry(device_id="firmware-release", pins=(issued.pin,),
                                              roles=frozenset({"gateway"}), attributes={"site": "plant-a"})
    atomic_write_text(CERTS / "registry.yaml", dump_registry(Registry(devices=devices)))


def _config(name: str) -> DeviceConfig:
    return DeviceConfig(device_id=name, host="127.0.0.1", port=8883, ca=CERTS / "ca-chain.pem",
                        cert=CERTS / "devices" / f"{name}.crt", key=CERTS / "devices" / f"{name}.key")


def _images(name: str, url: str) -> HttpImageSource:
    """The image over HTTPS with the device's own certificate (the image server requires one)."""
    return HttpImageSource(url, _config(name).tls_context())


async def _device(name: str, firmware: DeviceFirmware, log: Callable[[str], None]) -> None:
    def self_test(fw: DeviceFirmware, slot: str) -> bool:
        log(f"{name}: rebooted into slot {slot} (trial boot), self-test passed")
        return True

    async with DeviceClient(_config(name)) as client:
        await serve_offers(client.mqtt, firmware, source_for=lambda offer: _images(name, str(offer.url)),
                           self_test=self_test)


async def _publish_raw(offer: bytes, device: str) -> None:
    """Publish an offer as the release publisher would, without the release tool's own checks."""
    async with DeviceClient(_config("firmware-release")) as client:
        await client.publish(OFFER_TOPIC.format(device=device), offer)


async def firmware_section(*, run: Callable[..., str], say: Callable[[str], None], step: Callable[[str], None],
                           wait_for_refusal: Callable[..., dict[str, Any]], count: Callable[[str], int]) -> None:
    step("6b. Signed firmware (T3): release keys in SoftHSM2, staged rollout to two devices, a forgery and a rollback")
    _token()
    cfg = str(_settings())
    keys = run("gateway-agent", "firmware", "keygen", "-c", cfg, "release-1", "release-2", "release-3", "root-1")
    say(f"SoftHSM2 token 'release': {len(keys.strip().splitlines())} P-256 keys generated on the token "
        "(sensitive, never extractable)")
    say(run("gateway-agent", "firmware", "root", "-c", cfg, "--version", "1", "--release-keys", "release-1",
            "release-2", "release-3", "--release-threshold", "2").strip())
    _enrol()
    await asyncio.sleep(1.0)  # the broker re-reads the registry every 0.5 s
    factory = b"pump firmware 1.0 " * 4096
    pinned = (VAR / "firmware" / "roots" / "1.root.json").read_bytes()
    updaters = {}
    for device in DEVICES:
        DeviceFirmware.provision(VAR / "devices" / device, pinned_root=pinned, image=factory, version=1)
        updaters[device] = DeviceFirmware(device, CLASS, VAR / "devices" / device, SystemClock())
    say(f"{' and '.join(DEVICES)}: class {CLASS}, v1 in slot a, root v1 pinned at the factory")

    image = VAR / "firmware" / "pump-ctl-2.0.bin"
    atomic_write_bytes(image, hashlib.shake_256(b"pump firmware 2.0").digest(512 * 1024))
    manifest = VAR / "firmware" / "pump-ctl-2.0.manifest.json"
    say(run("gateway-agent", "firmware", "sign", "-c", cfg, "--image", str(image), "--class", CLASS, "--version",
            "2", "--out", str(manifest)).strip().splitlines()[-1])
    say(run("gateway-agent", "firmware", "verify", "-c", cfg, "--manifest", str(manifest), "--image",
            str(image)).strip().splitlines()[-1])

    tasks = [asyncio.create_task(_device(d, updaters[d], say)) for d in DEVICES]
    try:
        await asyncio.sleep(1.0)  # both devices subscribed
        published = await asyncio.to_thread(run, "gateway-agent", "firmware", "publish", "-c", cfg, "--manifest",
                                            str(manifest), "--image", str(image))
        for line in published.strip().splitlines():
            if not line.startswith("{"):  # the tool's own lines, not its JSON log
                say(f"publish: {line}")
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task
    for device in DEVICES:
        fw = DeviceFirmware(device, CLASS, VAR / "devices" / device, SystemClock())
        say(f"{device}: running v{fw.version} from slot {fw.active_slot} (anti-rollback counter {fw.version})")

    # a forged image: signed with an attacker's own key, offered with a stolen publisher identity
    before = count("firmware.rejected")
    mallory = SoftwareSigner(ec.generate_private_key(ec.SECP256R1()))
    evil = b"pump firmware 2.1 with a backdoor"
    now = SystemClock().now()
    forged = make_offer(sign_envelope(MANIFEST_TYPE, make_manifest(
        device_class=CLASS, version=3, image_sha256=hashlib.sha256(evil).hexdigest(), size=len(evil),
        not_before=now, expires=now.replace(year=now.year + 1)), [mallory, mallory]))
    await _publish_raw(forged, "device-001")
    event = await asyncio.to_thread(wait_for_refusal, "firmware.rejected", before)
    say(f"forged image (attacker's own key) offered to device-001 -> firmware.rejected reason={event['reason']}")
    direct = updaters["device-001"].take_offer(forged, lambda _: _images("device-001", "https://127.0.0.1:9/"))
    say(f"the same offer handed to device-001 past the broker: {direct['state']} reason={direct['reason']}")

    # a rollback: a genuinely signed manifest for the old version 1
    old = VAR / "firmware" / "pump-ctl-1.0.bin"
    atomic_write_bytes(old, factory)
    old_manifest = VAR / "firmware" / "pump-ctl-1.0.manifest.json"
    run("gateway-agent", "firmware", "sign", "-c", cfg, "--image", str(old), "--class", CLASS, "--version", "1",
        "--out", str(old_manifest))
    rollback = make_offer(old_manifest.read_bytes(), url="https://127.0.0.1:8470/firmware/" +
                          hashlib.sha256(factory).hexdigest())
    before = count("firmware.rejected")
    await _publish_raw(rollback, "device-002")
    event = await asyncio.to_thread(wait_for_refusal, "firmware.rejected", before)
    say(f"genuine v1 manifest offered again (a downgrade) -> firmware.rejected reason={event['reason']}")
    direct = updaters["device-002"].take_offer(rollback, lambda _: _images("device-002", "https://127.0.0.1:9/"))
    say(f"the same offer handed to device-002 past the broker: {direct['state']} reason={direct['reason']}")
