"""Staged firmware rollout: canaries first, then everyone, rate-limited, halted by failure reports.

A plain state machine (no I/O, the clock is handed in) that the publisher drives:

- ``due(now)`` lists the devices to offer the release to now. It never exceeds the rate
  (a token bucket of ``rate_per_second``), offers only canaries until every canary has
  confirmed, and offers nothing once halted.
- ``report(device, state, now)`` takes a device's report (``confirmed`` is success;
  ``failed``, ``refused`` and ``rolled_back`` are failures; anything else is progress).
- ``tick(now)`` counts a device that never answered within ``report_timeout`` as a failure.

More than ``max_failures`` failures halt the rollout (``halted``, with the reason): devices
already updated keep the new firmware, nobody else is offered it.

The canaries are the first ``canary_percent`` of the devices in the order of
SHA-256(release id, device id): stable for one release, different across releases, and not
chosen by whoever names the devices.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

__all__ = ["FAILURE_STATES", "Rollout", "RolloutPolicy"]

FAILURE_STATES = frozenset({"failed", "refused", "rolled_back"})
Phase = Literal["canary", "main", "done", "halted"]


@dataclass(frozen=True)
class RolloutPolicy:
    canary_percent: float = 10.0
    rate_per_second: float = 2.0
    max_failures: int = 0
    report_timeout: timedelta = timedelta(minutes=10)

    def __post_init__(self) -> None:
        if not 0 < self.canary_percent <= 100:
            raise ValueError("canary_percent must be in (0, 100]")
        if not 0 < self.rate_per_second <= 1000:
            raise ValueError("rate_per_second must be in (0, 1000]")
        if self.max_failures < 0:
            raise ValueError("max_failures must be >= 0")
        if self.report_timeout <= timedelta(0):
            raise ValueError("report_timeout must be positive")


class Rollout:
    def __init__(self, devices: Sequence[str], policy: RolloutPolicy, *, release_id: str, now: datetime) -> None:
        if not devices:
            raise ValueError("a rollout needs at least one device")
        if len(set(devices)) != len(devices):
            raise ValueError("a device is listed twice")
        self.policy = policy
        order = sorted(devices, key=lambda d: hashlib.sha256(f"{release_id}\x00{d}".encode()).digest())
        n_canary = max(1, math.ceil(len(order) * policy.canary_percent / 100))
        self.canaries = tuple(order[:n_canary])
        self._queue = list(order)
        self.offered: dict[str, datetime] = {}
        self.succeeded: set[str] = set()
        self.failed: dict[str, str] = {}
        self.halted: str | None = None
        self._tokens = 1.0
        self._last = now

    @property
    def phase(self) -> Phase:
        if self.halted is not None:
            return "halted"
        if not self._queue and not self._waiting():
            return "done"
        if any(c not in self.succeeded and c not in self.failed for c in self.canaries):
            return "canary"
        return "main"

    def _waiting(self) -> list[str]:
        return [d for d in self.offered if d not in self.succeeded and d not in self.failed]

    def due(self, now: datetime) -> list[str]:
        self.tick(now)
        elapsed = max(0.0, (now - self._last).total_seconds())
        self._last = max(self._last, now)
        burst = max(1.0, self.policy.rate_per_second)
        self._tokens = min(burst, self._tokens + elapsed * self.policy.rate_per_second)
        phase = self.phase
        if phase in ("halted", "done"):
            return []
        allowed = set(self.canaries) if phase == "canary" else None
        out = []
        for device in list(self._queue):
            if self._tokens < 1:
                break
            if allowed is not None and device not in allowed:
                continue
            self._queue.remove(device)
            self.offered[device] = now
            self._tokens -= 1
            out.append(device)
        return out

    def report(self, device: str, state: str, now: datetime, reason: str | None = None) -> None:
        if device not in self.offered or device in self.succeeded or device in self.failed:
            return  # a report for a device we did not offer this release to, or a late duplicate
        if state == "confirmed":
            self.succeeded.add(device)
        elif state in FAILURE_STATES:
            self._fail(device, f"{state}:{reason or 'unknown'}")
        else:
            self.offered[device] = now  # progress: the device is alive, its timeout starts again

    def tick(self, now: datetime) -> None:
        for device in self._waiting():
            if now - self.offered[device] > self.policy.report_timeout:
                self._fail(device, "timeout")

    def _fail(self, device: str, why: str) -> None:
        self.failed[device] = why
        if self.halted is None and len(self.failed) > self.policy.max_failures:
            self.halted = f"{len(self.failed)} failure(s) > max_failures {self.policy.max_failures}; " \
                          f"last {device}: {why}"

    @property
    def finished(self) -> bool:
        return self.phase in ("done", "halted")

    def summary(self) -> dict[str, object]:
        return {"phase": self.phase, "canaries": list(self.canaries), "offered": len(self.offered),
                "confirmed": sorted(self.succeeded), "failed": dict(sorted(self.failed.items())),
                "not_offered": len(self._queue), "halted": self.halted}
