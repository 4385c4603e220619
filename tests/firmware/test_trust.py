"""The broker's trusted firmware state: forward-only root and floors, persistence, the offer cache."""

from __future__ import annotations

from datetime import timedelta

import pytest

from edge_core import firmware_trust
from edge_core.errors import ConfigError
from edge_core.firmware import FirmwareRefused, VersionFloor, make_offer
from edge_core.firmware_trust import FirmwareTrust
from tests.firmware.release import CLASS, NOW, Release, signer

IMAGE = b"image" * 1000


def test_accepting_moves_floor_and_root_forward_and_survives_restore() -> None:
    release = Release()
    trust = FirmwareTrust(release.pinned_root())
    _, changed = trust.check(release.offer(IMAGE, version=4), device_class=CLASS, now=NOW)
    assert changed and trust.floor(CLASS).version == 4
    assert trust.check(release.offer(IMAGE, version=4), device_class=CLASS, now=NOW)[1] is False
    release.rotate([signer(), signer()])
    _, changed = trust.check(release.offer(IMAGE, version=5), device_class=CLASS, now=NOW)
    assert changed and trust.root.version == 2
    restored = FirmwareTrust.restore(release.chain[0], trust.to_json())
    assert restored.root.version == 2 and restored.floor(CLASS) == VersionFloor(5, trust.floor(CLASS).sha256)
    with pytest.raises(FirmwareRefused) as info:
        restored.check(release.offer(IMAGE, version=4), device_class=CLASS, now=NOW)
    assert info.value.reason == "rolled_back"


def test_corrupt_state_is_a_config_error_not_a_fresh_start() -> None:
    release = Release()
    with pytest.raises(ConfigError, match="unreadable"):
        FirmwareTrust.restore(release.chain[0], b'{"root": 1}')


def test_same_offer_bytes_are_authenticated_once(monkeypatch: pytest.MonkeyPatch) -> None:
    release = Release()
    trust = FirmwareTrust(release.pinned_root())
    calls = []
    real = firmware_trust.authenticate_offer
    monkeypatch.setattr(firmware_trust, "authenticate_offer", lambda *a, **k: calls.append(1) or real(*a, **k))
    offer = release.offer(IMAGE, version=2)
    for _ in range(5):
        trust.check(offer, device_class=CLASS, now=NOW)
    assert len(calls) == 1
    # class, time and floor are still decided for every message
    with pytest.raises(FirmwareRefused, match="class"):
        trust.check(offer, device_class="valve-ctl", now=NOW)
    with pytest.raises(FirmwareRefused) as info:
        trust.check(offer, device_class=CLASS, now=NOW + timedelta(days=60))
    assert info.value.reason == "expired"
    trust.check(release.offer(IMAGE, version=3), device_class=CLASS, now=NOW)
    with pytest.raises(FirmwareRefused) as info:
        trust.check(offer, device_class=CLASS, now=NOW)
    assert info.value.reason == "rolled_back"


def test_a_rotation_empties_the_cache_so_retired_keys_stop_at_once() -> None:
    release = Release()
    trust = FirmwareTrust(release.pinned_root())
    old_keys = release.release_keys
    v3_old_keys = make_offer(release.manifest(IMAGE, version=3))
    trust.check(v3_old_keys, device_class=CLASS, now=NOW)  # authenticated and cached under root v1
    release.rotate([signer(), signer()])  # the old release keys are retired (one was stolen)
    trust.check(release.offer(IMAGE, version=3), device_class=CLASS, now=NOW)  # carries root v2
    assert trust.root.version == 2
    with pytest.raises(FirmwareRefused) as info:
        trust.check(v3_old_keys, device_class=CLASS, now=NOW)
    assert info.value.reason == "unknown_key"
    assert old_keys != release.release_keys
