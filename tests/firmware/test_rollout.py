"""The staged rollout: canaries first, rate limit, halt on failure reports, timeouts."""

from __future__ import annotations

from datetime import timedelta

import pytest

from edge_core.firmware_rollout import Rollout, RolloutPolicy
from tests.firmware.release import NOW

DEVICES = [f"pump-{i:02d}" for i in range(20)]


def test_canaries_first_then_everyone_at_the_rate() -> None:
    rollout = Rollout(DEVICES, RolloutPolicy(canary_percent=10, rate_per_second=5), release_id="r1", now=NOW)
    assert len(rollout.canaries) == 2
    first = rollout.due(NOW + timedelta(seconds=10))
    assert sorted(first) == sorted(rollout.canaries)  # only canaries, whatever the tokens allow
    assert rollout.due(NOW + timedelta(seconds=20)) == []  # waiting for the canaries
    for device in first:
        rollout.report(device, "installed", NOW + timedelta(seconds=21))
        rollout.report(device, "confirmed", NOW + timedelta(seconds=22))
    assert rollout.phase == "main"
    batch = rollout.due(NOW + timedelta(seconds=23))
    assert len(batch) == 5  # the bucket holds at most one second of the rate
    batch += rollout.due(NOW + timedelta(seconds=23, milliseconds=400))
    assert len(batch) == 7  # then 5 per second
    t = NOW + timedelta(seconds=23, milliseconds=400)
    while not rollout.finished:
        for device in batch:
            rollout.report(device, "confirmed", t)
        t += timedelta(seconds=1)
        batch = rollout.due(t)
        assert len(batch) <= 5
    assert set(rollout.offered) == set(DEVICES) and rollout.phase == "done"
    assert t - NOW >= timedelta(seconds=25)


def test_canary_failure_halts_before_anyone_else_is_offered() -> None:
    rollout = Rollout(DEVICES, RolloutPolicy(canary_percent=10), release_id="r1", now=NOW)
    canaries = rollout.due(NOW + timedelta(seconds=5))
    rollout.report(canaries[0], "rolled_back", NOW, reason="self_test_failed")
    assert rollout.phase == "halted" and "self_test_failed" in (rollout.halted or "")
    rollout.report(canaries[1], "confirmed", NOW)
    assert rollout.due(NOW + timedelta(hours=1)) == []
    assert set(rollout.offered) == set(canaries)


def test_failures_in_the_main_wave_halt_at_the_threshold() -> None:
    rollout = Rollout(DEVICES, RolloutPolicy(canary_percent=5, rate_per_second=100, max_failures=1),
                      release_id="r2", now=NOW)
    (canary,) = rollout.due(NOW)
    rollout.report(canary, "confirmed", NOW)
    wave = rollout.due(NOW + timedelta(seconds=1))
    rollout.report(wave[0], "failed", NOW, reason="digest_mismatch")
    assert rollout.phase == "main"  # one failure is tolerated
    rollout.report(wave[1], "refused", NOW, reason="rolled_back")
    assert rollout.phase == "halted"
    assert rollout.due(NOW + timedelta(seconds=10)) == []


def test_silent_device_times_out_as_a_failure() -> None:
    rollout = Rollout(DEVICES[:3], RolloutPolicy(canary_percent=34, report_timeout=timedelta(minutes=5)),
                      release_id="r3", now=NOW)
    canaries = rollout.due(NOW)
    rollout.report(canaries[0], "downloading", NOW + timedelta(minutes=4))  # progress resets the timer
    rollout.tick(NOW + timedelta(minutes=8))
    assert rollout.phase == "canary"
    rollout.tick(NOW + timedelta(minutes=10))
    assert rollout.phase == "halted" and "timeout" in (rollout.halted or "")


def test_reports_from_devices_never_offered_are_ignored() -> None:
    rollout = Rollout(DEVICES, RolloutPolicy(), release_id="r4", now=NOW)
    rollout.report("pump-99", "failed", NOW)
    rollout.report(DEVICES[0], "failed", NOW)  # not offered yet
    assert rollout.phase == "canary" and not rollout.failed


def test_canary_choice_is_stable_per_release() -> None:
    a = Rollout(DEVICES, RolloutPolicy(canary_percent=20), release_id="r5", now=NOW).canaries
    assert a == Rollout(list(reversed(DEVICES)), RolloutPolicy(canary_percent=20), release_id="r5", now=NOW).canaries
    assert a != Rollout(DEVICES, RolloutPolicy(canary_percent=20), release_id="r6", now=NOW).canaries


@pytest.mark.parametrize("bad", [{"canary_percent": 0}, {"rate_per_second": 0}, {"max_failures": -1}])
def test_policy_bounds(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RolloutPolicy(**bad)  # type: ignore[arg-type]
