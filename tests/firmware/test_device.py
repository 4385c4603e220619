"""The reference device: anti-rollback, streamed hashing, A/B install, power loss, roll back."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_client.firmware import BytesSource, DeviceFirmware
from edge_core.clock import ManualClock
from edge_core.errors import FetchError
from edge_core.firmware import FirmwareRefused
from tests.firmware.release import CLASS, NOW, Release, signer

OLD = b"factory image " * 1000
NEW = bytes(range(256)) * 1200  # 300 KiB: several sync points


def device(tmp_path: Path, release: Release) -> DeviceFirmware:
    DeviceFirmware.provision(tmp_path / "flash", pinned_root=release.chain[0], image=OLD, version=1)
    return DeviceFirmware("pump-17", CLASS, tmp_path / "flash", ManualClock(NOW))


def reboot(fw: DeviceFirmware) -> DeviceFirmware:
    """Power cycle: a new process reads the same flash."""
    return DeviceFirmware(fw.device_id, fw.device_class, fw.storage, fw.clock)


def test_update_installs_into_the_inactive_slot_then_confirms(tmp_path: Path) -> None:
    release = Release()
    fw = device(tmp_path, release)
    report = fw.take_offer(release.offer(NEW, version=2), lambda _: BytesSource(NEW))
    assert report == {"state": "installed", "version": 2, "slot": "b"}
    assert fw.active_slot == "a" and fw.version == 1  # nothing changes before the trial boot
    fw = reboot(fw)
    assert fw.boot() == "b"
    assert fw.confirm() == 2
    assert fw.active_slot == "b" and fw.slot_image("b") == NEW and fw.boot() == "b"
    # the same offer again is already current; an older one is a rollback
    assert fw.take_offer(release.offer(NEW, version=2), lambda _: BytesSource(NEW))["state"] == "confirmed"
    assert fw.take_offer(release.offer(OLD, version=1), lambda _: BytesSource(OLD)) == \
        {"state": "refused", "reason": "rolled_back", "version": 1}


def test_unconfirmed_trial_boot_rolls_back(tmp_path: Path) -> None:
    release = Release()
    fw = device(tmp_path, release)
    fw.take_offer(release.offer(NEW, version=2), lambda _: BytesSource(NEW))
    assert fw.boot() == "b"        # trial boot: the new firmware hangs before confirming
    fw = reboot(fw)
    assert fw.boot() == "a"        # watchdog reset: the bootloader goes back to the old slot
    assert fw.version == 1 and fw.pending_version is None
    assert fw.events.count("firmware.rolled_back", "trial_not_confirmed") == 1


def test_failed_self_test_rolls_back_and_counter_stays(tmp_path: Path) -> None:
    release = Release()
    fw = device(tmp_path, release)
    fw.take_offer(release.offer(NEW, version=2), lambda _: BytesSource(NEW))
    fw.boot()
    fw.fail_trial()
    assert fw.boot() == "a" and fw.version == 1
    with pytest.raises(RuntimeError, match="nothing to confirm"):
        fw.confirm()


def test_corrupted_slot_is_never_booted(tmp_path: Path) -> None:
    release = Release()
    fw = device(tmp_path, release)
    fw.take_offer(release.offer(NEW, version=2), lambda _: BytesSource(NEW))
    (fw.storage / "slots" / "b.img").write_bytes(NEW[:-1] + b"\x00")  # flash bit rot before reboot
    assert fw.boot() == "a"
    assert fw.events.count("firmware.rolled_back", "slot_corrupt") == 1


def cut_power_mid_download(fw: DeviceFirmware, offer: bytes, after: int) -> Path:
    """The link (or the power) dies after ``after`` bytes; returns the partial file left on flash."""
    with pytest.raises(FetchError):
        fw.download(fw.verify(offer), BytesSource(NEW, fail_after=after))
    return fw.storage / "download" / "image.part"


def test_power_loss_mid_download_resumes(tmp_path: Path) -> None:
    release = Release()
    offer = release.offer(NEW, version=2)
    fw = device(tmp_path, release)
    kept = cut_power_mid_download(fw, offer, 150_000).stat().st_size
    assert 0 < kept <= 150_000
    fw = reboot(fw)
    served: list[int] = []

    class Recording(BytesSource):
        def read_from(self, offset: int):  # type: ignore[no-untyped-def]
            served.append(offset)
            return super().read_from(offset)

    report = fw.take_offer(offer, lambda _: Recording(NEW))
    assert report["state"] == "installed" and served == [kept]
    assert fw.events.count("firmware.download_resumed") == 1
    assert reboot(fw).boot() == "b"


def test_torn_tail_after_power_loss_restarts_from_zero(tmp_path: Path) -> None:
    release = Release()
    offer = release.offer(NEW, version=2)
    fw = device(tmp_path, release)
    part = cut_power_mid_download(fw, offer, 100_000)
    part.write_bytes(part.read_bytes()[:-10] + b"\xff" * 10)  # the last page was half written
    fw = reboot(fw)
    assert fw.take_offer(offer, lambda _: BytesSource(NEW))["state"] == "installed"
    assert fw.events.count("firmware.download_restarted") == 1


def test_forged_image_and_truncated_image_are_refused(tmp_path: Path) -> None:
    release = Release()
    fw = device(tmp_path, release)
    forged = NEW[:-1] + b"\x01"
    assert fw.take_offer(release.offer(NEW, version=2), lambda _: BytesSource(forged)) == \
        {"state": "failed", "reason": "digest_mismatch", "version": 2}
    assert fw.take_offer(release.offer(NEW, version=2), lambda _: BytesSource(NEW[:-5])) == \
        {"state": "failed", "reason": "truncated", "version": 2}
    assert fw.take_offer(release.offer(NEW, version=2), lambda _: BytesSource(NEW + b"x")) == \
        {"state": "failed", "reason": "image_too_long", "version": 2}
    assert fw.version == 1 and fw.pending_version is None
    assert not (fw.storage / "slots" / "b.img").exists()


def test_rotated_root_is_persisted_and_old_keys_stop_working(tmp_path: Path) -> None:
    release = Release()
    fw = device(tmp_path, release)
    old_keys = release.release_keys
    release.rotate([signer(), signer(), signer()])
    assert fw.take_offer(release.offer(NEW, version=2), lambda _: BytesSource(NEW))["state"] == "installed"
    fw = reboot(fw)
    assert fw.root.version == 2
    from edge_core.firmware import make_offer
    stolen = make_offer(release.manifest(NEW, version=3, signed_by=old_keys))
    with pytest.raises(FirmwareRefused) as info:
        fw.verify(stolen)
    assert info.value.reason == "unknown_key"


def test_wrong_class_and_expired_offers(tmp_path: Path) -> None:
    release = Release()
    fw = device(tmp_path, release)
    assert fw.take_offer(release.offer(NEW, device_class="valve-ctl"), lambda _: BytesSource(NEW))["reason"] \
        == "wrong_class"
    fw.clock.advance(NOW - NOW.replace(month=1))  # type: ignore[attr-defined]
    assert fw.take_offer(release.offer(NEW), lambda _: BytesSource(NEW))["reason"] == "expired"


def test_an_overlong_partial_file_is_discarded(tmp_path: Path) -> None:
    release = Release()
    offer = release.offer(NEW, version=2)
    fw = device(tmp_path, release)
    part = cut_power_mid_download(fw, offer, 10_000)
    part.write_bytes(b"\x00" * (len(NEW) + 1))  # flash garbage longer than the image
    assert reboot(fw).take_offer(offer, lambda _: BytesSource(NEW))["state"] == "installed"


def test_power_loss_during_install_keeps_the_old_firmware(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Power dies after the slot is written but before the pending trial is recorded."""
    import device_client.firmware as module

    release = Release()
    offer = release.offer(NEW, version=2)
    fw = device(tmp_path, release)
    verified = fw.verify(offer)
    part = fw.download(verified, BytesSource(NEW))
    real = module.atomic_write_bytes

    def dies_at_state(path: Path, data: bytes, **kw: int) -> None:
        if Path(path).name == "state.json":
            raise OSError("power lost")
        real(path, data, **kw)

    monkeypatch.setattr(module, "atomic_write_bytes", dies_at_state)
    with pytest.raises(OSError, match="power lost"):
        fw.install(verified, part)
    monkeypatch.setattr(module, "atomic_write_bytes", real)
    fw = reboot(fw)
    assert fw.boot() == "a" and fw.version == 1 and fw.pending_version is None
    assert fw.take_offer(offer, lambda _: BytesSource(NEW))["state"] == "installed"  # the offer simply runs again
    assert reboot(fw).boot() == "b"
