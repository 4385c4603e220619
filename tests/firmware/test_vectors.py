"""Every published firmware vector through both verifiers: the broker's trusted state and the device's."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from device_client.firmware import BytesSource, DeviceFirmware
from edge_core.clock import ManualClock
from edge_core.firmware import (
    IMAGE_REASONS,
    REASONS,
    FirmwarePolicy,
    FirmwareRefused,
    ImageCheck,
    VersionFloor,
    canonical_json,
    parse_root_document,
)
from edge_core.firmware_trust import FirmwareTrust

VECTORS_DIR = Path(__file__).resolve().parents[1] / "vectors"
VECTORS = json.loads((VECTORS_DIR / "firmware_vectors.json").read_text("utf-8"))
CASES = VECTORS["cases"]
NOW = datetime.fromtimestamp(VECTORS["now_unix"], UTC)
POLICY = FirmwarePolicy(max_offer_size=VECTORS["max_offer_size"],
                        max_skew=timedelta(seconds=VECTORS["max_skew_seconds"]))
PINNED = canonical_json(VECTORS["pinned_root"])
CLASS = VECTORS["device_class"]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_firmware_vectors", VECTORS_DIR / "make_firmware_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stream(check: ImageCheck, image: bytes) -> str:
    try:
        for i in range(0, len(image), 97):
            check.update(image[i:i + 97])
        check.finish()
    except FirmwareRefused as exc:
        return exc.reason
    return "ok"


def test_vector_file_header_is_consistent() -> None:
    assert datetime.fromisoformat(VECTORS["now"]) == NOW
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names))
    # every reason code is published, and nothing else
    assert {c["expect"] for c in CASES} == {"ok", *REASONS}
    assert {c["expect_image"] for c in CASES if "expect_image" in c} == {"ok", *IMAGE_REASONS}


def test_vector_file_is_what_the_generator_writes() -> None:
    assert _generator().render() == (VECTORS_DIR / "firmware_vectors.json").read_text("utf-8")


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_vector_broker_verifier(case: dict[str, Any]) -> None:
    floor_image = bytes.fromhex(case["floor"]["image_hex"])
    floor = VersionFloor(case["floor"]["version"], hashlib.sha256(floor_image).hexdigest())
    trust = FirmwareTrust(parse_root_document(PINNED), {CLASS: floor}, policy=POLICY)
    try:
        offer, _ = trust.check(case["offer"].encode("utf-8"), device_class=CLASS, now=NOW)
    except FirmwareRefused as exc:
        assert exc.reason == case["expect"], case["description"]
        return
    assert case["expect"] == "ok", case["description"]
    if "image_hex" in case:
        assert _stream(ImageCheck(offer.manifest), bytes.fromhex(case["image_hex"])) == case["expect_image"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_vector_device_verifier(case: dict[str, Any], tmp_path: Path) -> None:
    DeviceFirmware.provision(tmp_path, pinned_root=PINNED, image=bytes.fromhex(case["floor"]["image_hex"]),
                             version=case["floor"]["version"])
    device = DeviceFirmware("pump-17", CLASS, tmp_path, ManualClock(NOW), policy=POLICY)
    try:
        offer = device.verify(case["offer"].encode("utf-8"))
    except FirmwareRefused as exc:
        assert exc.reason == case["expect"], case["description"]
        return
    assert case["expect"] == "ok", case["description"]
    if "image_hex" in case:
        try:
            device.download(offer, BytesSource(bytes.fromhex(case["image_hex"]), chunk=97))
            got = "ok"
        except FirmwareRefused as exc:
            got = exc.reason
        assert got == case["expect_image"]
