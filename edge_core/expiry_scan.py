"""The daily expiry scan: which certificates expire, which devices are due for renewal, who alarms.

Pure decisions over ``edge_core.lifecycle.DeviceLifecycle`` values and a ``RenewalPolicy``;
no I/O. The inventory answers the query, the renewal orchestrator acts on the plans and
emits the alarms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from edge_core.clock import as_utc
from edge_core.lifecycle import (
    RENEWABLE_CERT,
    RETRYABLE,
    CertRef,
    CertState,
    DeviceLifecycle,
    RenewalPolicy,
    RenewalState,
    renewal_lead,
)

__all__ = [
    "Alarm",
    "ExpiryRow",
    "RenewalPlan",
    "alarm_lead",
    "check_alarms",
    "overlaps_ended",
    "plan_renewals",
    "renewal_due",
    "scan_expiring",
]

_R = RenewalState
_DAY = timedelta(days=1)


@dataclass(frozen=True)
class ExpiryRow:
    """One row of the daily expiry query."""

    device_id: str
    serial: int
    not_after: datetime
    days_left: int  # whole days, rounded down; negative once expired
    cert_state: CertState
    renewal: RenewalState

    def as_dict(self) -> dict[str, object]:
        return {
            "device_id": self.device_id,
            "serial": f"{self.serial:x}",
            "not_after": self.not_after.isoformat(),
            "days_left": self.days_left,
            "cert_state": self.cert_state.value,
            "renewal": self.renewal.value,
        }


@dataclass(frozen=True)
class RenewalPlan:
    device_id: str
    reason: str  # "due" (first attempt), "retry" or "resume" (switch report missing)
    not_after: datetime
    days_left: int
    attempt: int


@dataclass(frozen=True)
class Alarm:
    device_id: str
    reason: str  # "cert_expired", "renewal_overdue", "renewal_failing"
    days_left: int
    attempts: int
    last_error: str | None


def _days_left(not_after: datetime, now: datetime) -> int:
    return math.floor((not_after - now) / _DAY)


def alarm_lead(cert: CertRef, policy: RenewalPolicy) -> timedelta:
    """How long before expiry an unrenewed device raises an alarm."""
    return min(policy.alarm_before, cert.lifetime * policy.alarm_fraction)


def scan_expiring(devices: Iterable[DeviceLifecycle], now: datetime,
                  within: timedelta = timedelta(days=90)) -> list[ExpiryRow]:
    """The design's daily query, soonest first: certificates expiring before ``now + within``.

    Already expired certificates are included (negative ``days_left``); revoked ones are not.
    """
    now = as_utc(now)
    horizon = now + within
    rows = [
        ExpiryRow(d.device_id, d.current.serial, d.current.not_after, _days_left(d.current.not_after, now),
                  d.current.state, d.renewal)
        for d in devices
        if d.current.state is not CertState.REVOKED and d.current.not_after < horizon
    ]
    rows.sort(key=lambda r: (r.not_after, r.device_id))
    return rows


def renewal_due(device: DeviceLifecycle, now: datetime, policy: RenewalPolicy, *,
                ignore_backoff: bool = False) -> str | None:
    """``"due"``, ``"retry"`` or ``"resume"`` (a switch report is missing) if renewal should run now.

    ``ignore_backoff`` is for a device that just came back online: no point waiting out a backoff
    that only existed because it was away.
    """
    now = as_utc(now)
    waited = ignore_backoff or device.next_attempt_at is None or device.next_attempt_at <= now
    if device.renewal is _R.SWITCHING:
        # A lost switch report: ask again which certificate the device uses, even if the old one
        # has expired meanwhile (the device may well be on the new one).
        return "resume" if waited else None
    cert = device.current
    if cert.state not in RENEWABLE_CERT or now >= cert.not_after:
        return None  # expired or revoked: needs re-enrolment, see check_alarms
    if device.forced and device.renewal in RETRYABLE:
        return "retry" if waited else None  # an operator's renewal is retried until it switches
    if cert.not_after - now > renewal_lead(cert, policy):
        return None
    if device.renewal is _R.IDLE:
        return "due"
    if device.renewal in RETRYABLE and waited:
        return "retry"
    return None


def plan_renewals(devices: Iterable[DeviceLifecycle], now: datetime,
                  policy: RenewalPolicy) -> list[RenewalPlan]:
    """Which devices to start renewing now, most urgent first."""
    now = as_utc(now)
    plans = []
    for device in devices:
        reason = renewal_due(device, now, policy)
        if reason is not None:
            plans.append(RenewalPlan(device.device_id, reason, device.current.not_after,
                                     _days_left(device.current.not_after, now), device.attempts + 1))
    plans.sort(key=lambda p: (p.not_after, p.device_id))
    return plans


def check_alarms(devices: Iterable[DeviceLifecycle], now: datetime, policy: RenewalPolicy) -> list[Alarm]:
    """Devices a human must look at, long before they drop off the network.

    - ``cert_expired``: the current certificate has expired (the device is offline for good);
    - ``renewal_overdue``: less than ``alarm_lead`` left and still not renewed;
    - ``renewal_failing``: ``alarm_after_failures`` consecutive failed attempts, whatever time is left.
    """
    now = as_utc(now)
    alarms = []
    for d in devices:
        cert = d.current
        if cert.state is CertState.REVOKED:
            continue
        days = _days_left(cert.not_after, now)
        if now >= cert.not_after:
            reason = "cert_expired"
        elif cert.not_after - now <= alarm_lead(cert, policy):
            reason = "renewal_overdue"
        elif d.attempts >= policy.alarm_after_failures:
            reason = "renewal_failing"
        else:
            continue
        alarms.append(Alarm(d.device_id, reason, days, d.attempts, d.last_error))
    alarms.sort(key=lambda a: (a.days_left, a.device_id))
    return alarms


def overlaps_ended(devices: Iterable[DeviceLifecycle], now: datetime) -> list[str]:
    """Devices whose overlap is over: their retiring certificate is to be revoked now."""
    now = as_utc(now)
    return sorted(d.device_id for d in devices
                  if d.renewal is _R.OVERLAP and d.overlap_until is not None and d.overlap_until <= now)
