"""Certificate lifecycle decisions: states, transitions, expiry scans, renewal plans, CSR checks.

This module holds no I/O: no database, no network, no event loop. It decides; the inventory
(``gateway_agent.inventory``) stores what it decides and the renewal orchestrator
(``gateway_agent.renewal``) talks to devices and the CA.

Two small state machines describe a device (design notes 13.3):

- ``CertState`` is the life of one certificate::

      ISSUED -> ACTIVE -> EXPIRING (30 days left) -> EXPIRED -> REVOKED

  Any state but REVOKED may also go straight to REVOKED (compromise, superseded).

- ``RenewalState`` is the rotation workflow around the device's current certificate::

      IDLE -> RENEWAL_REQUESTED -> RENEWAL_ISSUED -> RENEWAL_TESTING -> SWITCHING -> OVERLAP -> IDLE
                   |                    |                 |   |            |  ^ (switch not yet
                   v                    v                 v   |            |  |  confirmed: retry)
               RENEWAL_FAILED <---------+-----------------+   +--> ROLLED_BACK
                   |                                                 |
                   +-> RENEWAL_REQUESTED (retry after backoff) <-----+

  SWITCHING exists because the switch is the one step whose outcome can be unknown: if the
  device's report is lost, it may already use the new certificate. So the candidate is never
  revoked there; the orchestrator keeps both pins and asks again until the device reports which
  serial it uses (candidate: OVERLAP; old one: ROLLED_BACK).

Every change is a ``Transition`` record (device, subject, serial, from, to, time, cause) so
the inventory can store the state change and its history in one transaction. Each operation
below is a pure function ``(device, ...) -> Step``; a ``Step`` carries the new device state,
the transitions that got there and the certificates the CA must revoke. Illegal moves raise
``StateError("illegal_transition", ...)``.

Who holds which certificate:

- ``current``: the certificate the device authenticates with (its pin is always exported);
- ``candidate``: a freshly issued certificate pushed to the device and under test
  (RENEWAL_ISSUED, RENEWAL_TESTING; pinned too so that the test connection succeeds);
- ``retiring``: the old certificate during OVERLAP, pinned until ``overlap_until`` so the
  device can still fall back to it; revoked when the overlap ends.

At most two pins are ever exported, matching ``edge_core.registry.MAX_ACTIVE_PINS``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AttributeOID

from edge_core.clock import as_utc
from edge_core.errors import ConfigError, CredentialError, StateError
from edge_core.identity import IdentityPolicy, check_identity, spki_pin, spki_pin_of_key

__all__ = [
    "CERT_TRANSITIONS",
    "IN_PROGRESS",
    "MAX_CSR_BYTES",
    "RENEWAL_TRANSITIONS",
    "Alarm",
    "CertRef",
    "CertState",
    "CheckedCsr",
    "DeviceLifecycle",
    "ExpiryRow",
    "RenewalPlan",
    "RenewalPolicy",
    "RenewalState",
    "Step",
    "Transition",
    "alarm_lead",
    "backoff_delay",
    "begin_renewal",
    "begin_switch",
    "begin_test",
    "candidate_issued",
    "check_alarms",
    "check_csr",
    "end_overlap",
    "enroll",
    "expiring_lead",
    "fail_renewal",
    "overlaps_ended",
    "plan_renewals",
    "refresh",
    "renewal_due",
    "renewal_lead",
    "revoke_certificate",
    "revoke_device",
    "scan_expiring",
    "switch_unconfirmed",
    "switched",
]


class CertState(enum.StrEnum):
    ISSUED = "issued"
    ACTIVE = "active"
    EXPIRING = "expiring"
    EXPIRED = "expired"
    REVOKED = "revoked"


class RenewalState(enum.StrEnum):
    IDLE = "idle"
    REQUESTED = "renewal_requested"  # CSR asked of the device
    ISSUED = "renewal_issued"  # CA issued, certificate pushed; device stores it next to the old one
    TESTING = "renewal_testing"  # device tries the new certificate against the test endpoint
    SWITCHING = "renewal_switching"  # test passed, switch asked; waiting for the device to report
    OVERLAP = "overlap"  # device switched; old and new pins both valid until overlap_until
    FAILED = "renewal_failed"  # offline, CSR refused, CA error: retry after backoff
    ROLLED_BACK = "rolled_back"  # new certificate failed its test; device kept the old one


CERT_TRANSITIONS: Mapping[CertState, frozenset[CertState]] = {
    CertState.ISSUED: frozenset({CertState.ACTIVE, CertState.EXPIRED, CertState.REVOKED}),
    CertState.ACTIVE: frozenset({CertState.EXPIRING, CertState.EXPIRED, CertState.REVOKED}),
    CertState.EXPIRING: frozenset({CertState.EXPIRED, CertState.REVOKED}),
    CertState.EXPIRED: frozenset({CertState.REVOKED}),
    CertState.REVOKED: frozenset(),
}

_R = RenewalState
RENEWAL_TRANSITIONS: Mapping[RenewalState, frozenset[RenewalState]] = {
    _R.IDLE: frozenset({_R.REQUESTED}),
    _R.REQUESTED: frozenset({_R.ISSUED, _R.FAILED}),
    _R.ISSUED: frozenset({_R.TESTING, _R.FAILED}),
    _R.TESTING: frozenset({_R.SWITCHING, _R.ROLLED_BACK, _R.FAILED}),
    # SWITCHING -> SWITCHING records a switch report that did not arrive (retried after backoff);
    # SWITCHING -> FAILED only when the device is revoked meanwhile (revoke_device).
    _R.SWITCHING: frozenset({_R.SWITCHING, _R.OVERLAP, _R.ROLLED_BACK, _R.FAILED}),
    _R.OVERLAP: frozenset({_R.IDLE}),
    _R.FAILED: frozenset({_R.REQUESTED, _R.IDLE}),
    _R.ROLLED_BACK: frozenset({_R.REQUESTED, _R.IDLE}),
}

IN_PROGRESS = frozenset({_R.REQUESTED, _R.ISSUED, _R.TESTING, _R.SWITCHING})
_RETRYABLE = frozenset({_R.FAILED, _R.ROLLED_BACK})
_RENEWABLE_CERT = frozenset({CertState.ISSUED, CertState.ACTIVE, CertState.EXPIRING})
MAX_CSR_BYTES = 8 * 1024
_DAY = timedelta(days=1)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class CertRef:
    """One certificate as the lifecycle sees it: no key, no DER, just what decisions need."""

    serial: int
    pin: str
    not_before: datetime
    not_after: datetime
    state: CertState = CertState.ISSUED

    def __post_init__(self) -> None:
        object.__setattr__(self, "not_before", as_utc(self.not_before))
        object.__setattr__(self, "not_after", as_utc(self.not_after))
        if self.serial <= 0:
            raise ValueError(f"certificate serial must be positive, not {self.serial}")
        if self.not_after <= self.not_before:
            raise ValueError(f"certificate {self.serial:x}: not_after must be after not_before")

    @property
    def lifetime(self) -> timedelta:
        return self.not_after - self.not_before

    def valid_at(self, now: datetime) -> bool:
        return self.state is not CertState.REVOKED and self.not_before <= now < self.not_after

    @classmethod
    def from_certificate(cls, cert: x509.Certificate, state: CertState = CertState.ISSUED) -> CertRef:
        return cls(
            serial=cert.serial_number,
            pin=spki_pin(cert),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            state=state,
        )


@dataclass(frozen=True)
class DeviceLifecycle:
    """Everything the lifecycle knows about one device. ``version`` guards concurrent writers."""

    device_id: str
    current: CertRef
    renewal: RenewalState = RenewalState.IDLE
    renewal_since: datetime | None = None
    candidate: CertRef | None = None
    retiring: CertRef | None = None
    attempts: int = 0  # failed attempts since the last successful switch
    next_attempt_at: datetime | None = None
    overlap_until: datetime | None = None
    last_error: str | None = None
    version: int = 0
    forced: bool = False  # an operator asked for this renewal: retried with backoff until it switches

    def __post_init__(self) -> None:
        check_identity(self.device_id)
        for name in ("renewal_since", "next_attempt_at", "overlap_until"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, as_utc(value))
        has_candidate = self.renewal in (_R.ISSUED, _R.TESTING, _R.SWITCHING)
        if (self.candidate is not None) != has_candidate:
            raise ValueError(f"device {self.device_id}: a candidate certificate exists only in "
                             f"renewal_issued/testing/switching, not {self.renewal}")
        in_overlap = self.renewal is _R.OVERLAP
        if (self.retiring is not None) != in_overlap or (self.overlap_until is not None) != in_overlap:
            raise ValueError(f"device {self.device_id}: retiring certificate and overlap_until "
                             f"exist only in overlap, not {self.renewal}")
        serials = [c.serial for c in (self.current, self.candidate, self.retiring) if c is not None]
        if len(set(serials)) != len(serials):
            raise ValueError(f"device {self.device_id}: the same serial is held twice")
        if self.attempts < 0:
            raise ValueError(f"device {self.device_id}: attempts must not be negative")

    def pins(self) -> tuple[str, ...]:
        """The pins the broker must accept now: current plus candidate or retiring (max two)."""
        pins = [self.current.pin]
        for extra in (self.candidate, self.retiring):
            if extra is not None and extra.state is not CertState.REVOKED and extra.pin not in pins:
                pins.append(extra.pin)
        return tuple(pins)


@dataclass(frozen=True)
class Transition:
    """One recorded state change. ``subject`` is ``"renewal"`` or ``"cert"`` (then ``serial`` is set)."""

    device_id: str
    subject: str
    serial: int | None
    from_state: str | None  # None: the certificate is new
    to_state: str
    at: datetime
    cause: str


@dataclass(frozen=True)
class Step:
    """The result of a lifecycle operation: store ``after`` and ``transitions`` in one transaction,
    after the CA has revoked every certificate in ``revoke``."""

    before: DeviceLifecycle | None
    after: DeviceLifecycle
    transitions: tuple[Transition, ...]
    revoke: tuple[CertRef, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.transitions) or self.before != self.after


@dataclass(frozen=True)
class RenewalPolicy:
    """When to renew, how to retry and when to wake a human.

    A certificate is renewed ``renewal_lead`` before it expires: ``renew_before`` (90 days, the
    design's figure) but never more than ``renew_fraction`` of its lifetime, so 30-day
    certificates renew with 10 days left instead of continuously. The alarm lead works the same
    way (30 days, at most a sixth of the lifetime), leaving most of the renewal window for retries.
    """

    renew_before: timedelta = timedelta(days=90)
    renew_fraction: float = 1 / 3
    expiring_within: timedelta = timedelta(days=30)
    overlap: timedelta = timedelta(days=7)
    backoff_base: timedelta = timedelta(minutes=30)
    backoff_max: timedelta = timedelta(hours=12)
    jitter: float = 0.25
    alarm_before: timedelta = timedelta(days=30)
    alarm_fraction: float = 1 / 6
    alarm_after_failures: int = 5

    def __post_init__(self) -> None:
        for name in ("renew_before", "expiring_within", "overlap", "backoff_base", "backoff_max",
                     "alarm_before"):
            if getattr(self, name) <= timedelta(0):
                raise ConfigError(f"renewal policy: {name} must be positive")
        if not 0 < self.renew_fraction < 1 or not 0 < self.alarm_fraction < 1:
            raise ConfigError("renewal policy: renew_fraction and alarm_fraction must be between 0 and 1")
        if self.alarm_fraction >= self.renew_fraction or self.alarm_before > self.renew_before:
            raise ConfigError("renewal policy: the alarm must come after renewal starts",
                              hint="lower alarm_before/alarm_fraction below renew_before/renew_fraction")
        if not 0 <= self.jitter < 1:
            raise ConfigError("renewal policy: jitter must be in [0, 1)")
        if self.backoff_max < self.backoff_base:
            raise ConfigError("renewal policy: backoff_max must be >= backoff_base")
        if self.alarm_after_failures < 1:
            raise ConfigError("renewal policy: alarm_after_failures must be at least 1")


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


# --------------------------------------------------------------------------- transitions


def _check_cert(device_id: str, cert: CertRef, to: CertState) -> None:
    if to not in CERT_TRANSITIONS[cert.state]:
        raise StateError(
            "illegal_transition",
            f"device {device_id}: certificate {cert.serial:x} cannot go from {cert.state} to {to}",
        )


@dataclass
class _Builder:
    """Collects the transitions of one step while checking each against the tables."""

    device: DeviceLifecycle
    now: datetime
    cause: str
    records: list[Transition] = field(default_factory=list)
    state: RenewalState | None = None  # renewal state after the transitions so far

    def renewal(self, to: RenewalState) -> None:
        source = self.state or self.device.renewal
        if to not in RENEWAL_TRANSITIONS[source]:
            raise StateError(
                "illegal_transition",
                f"device {self.device.device_id}: renewal cannot go from {source} to {to}",
            )
        self.records.append(Transition(self.device.device_id, "renewal", None, source.value,
                                       to.value, self.now, self.cause))
        self.state = to

    def cert(self, cert: CertRef, to: CertState) -> CertRef:
        _check_cert(self.device.device_id, cert, to)
        self.records.append(Transition(self.device.device_id, "cert", cert.serial, cert.state.value,
                                       to.value, self.now, self.cause))
        return replace(cert, state=to)

    def new_cert(self, cert: CertRef) -> None:
        self.records.append(Transition(self.device.device_id, "cert", cert.serial, None,
                                       cert.state.value, self.now, self.cause))


def _time_state(cert: CertRef, now: datetime, policy: RenewalPolicy) -> CertState:
    """Where time alone puts a certificate: EXPIRED, EXPIRING or unchanged."""
    if cert.state is CertState.REVOKED:
        return cert.state
    if now >= cert.not_after:
        return CertState.EXPIRED
    if cert.state is CertState.ACTIVE and cert.not_after - now <= expiring_lead(cert, policy):
        return CertState.EXPIRING
    return cert.state


def enroll(device_id: str, cert: CertRef, *, now: datetime, cause: str, retiring: CertRef | None = None,
           overlap_until: datetime | None = None) -> Step:
    """A device enters the inventory with ``cert`` (state as given, normally ACTIVE).

    A device caught mid-rotation also brings the certificate it is moving away from:
    ``retiring``, pinned until ``overlap_until`` and then revoked like any overlap's end.
    """
    now = as_utc(now)
    if (retiring is None) != (overlap_until is None):
        raise ValueError("retiring and overlap_until go together")
    device = DeviceLifecycle(device_id=device_id, current=cert, renewal_since=now,
                             renewal=_R.IDLE if retiring is None else _R.OVERLAP,
                             retiring=retiring, overlap_until=overlap_until)
    records = [Transition(device_id, "cert", c.serial, None, c.state.value, now, cause)
               for c in (cert, retiring) if c is not None]
    return Step(before=None, after=device, transitions=tuple(records))


def refresh(device: DeviceLifecycle, *, now: datetime, policy: RenewalPolicy,
            cause: str = "time") -> Step:
    """Move current and retiring certificates along with time (to EXPIRING / EXPIRED)."""
    b = _Builder(device, as_utc(now), cause)
    current = device.current
    target = _time_state(current, b.now, policy)
    if target is not current.state:
        current = b.cert(current, target)
    retiring = device.retiring
    if retiring is not None and b.now >= retiring.not_after and retiring.state is not CertState.EXPIRED:
        retiring = b.cert(retiring, CertState.EXPIRED)
    after = replace(device, current=current, retiring=retiring)
    return Step(device, after, tuple(b.records))


def begin_renewal(device: DeviceLifecycle, *, now: datetime, cause: str) -> Step:
    """IDLE / FAILED / ROLLED_BACK -> RENEWAL_REQUESTED: the CSR is about to be asked for."""
    b = _Builder(device, as_utc(now), cause)
    if device.current.state not in _RENEWABLE_CERT or b.now >= device.current.not_after:
        raise StateError(
            "not_renewable",
            f"device {device.device_id}: certificate {device.current.serial:x} is {device.current.state}; "
            "an expired or revoked device must be re-enrolled, it cannot renew over its own session",
        )
    b.renewal(_R.REQUESTED)
    after = replace(device, renewal=_R.REQUESTED, renewal_since=b.now, next_attempt_at=None,
                    forced=device.forced or cause == "forced")
    return Step(device, after, tuple(b.records))


def candidate_issued(device: DeviceLifecycle, cert: CertRef, *, now: datetime,
                     cause: str = "ca_issued") -> Step:
    """RENEWAL_REQUESTED -> RENEWAL_ISSUED with the CA's new certificate as candidate."""
    b = _Builder(device, as_utc(now), cause)
    b.renewal(_R.ISSUED)
    if cert.state is not CertState.ISSUED:
        raise StateError("illegal_transition", f"device {device.device_id}: a candidate starts ISSUED")
    if cert.serial == device.current.serial or cert.pin == device.current.pin:
        raise StateError("key_reused",
                         f"device {device.device_id}: the candidate must have a new key and serial")
    b.new_cert(cert)
    after = replace(device, renewal=_R.ISSUED, renewal_since=b.now, candidate=cert)
    return Step(device, after, tuple(b.records))


def begin_test(device: DeviceLifecycle, *, now: datetime, cause: str = "test_requested") -> Step:
    """RENEWAL_ISSUED -> RENEWAL_TESTING: the device has stored the candidate and tries it."""
    b = _Builder(device, as_utc(now), cause)
    b.renewal(_R.TESTING)
    return Step(device, replace(device, renewal=_R.TESTING, renewal_since=b.now), tuple(b.records))


def begin_switch(device: DeviceLifecycle, *, now: datetime, cause: str = "test_passed") -> Step:
    """RENEWAL_TESTING -> SWITCHING: the test passed; from here the candidate is never revoked
    until the device has said which certificate it uses."""
    b = _Builder(device, as_utc(now), cause)
    b.renewal(_R.SWITCHING)
    return Step(device, replace(device, renewal=_R.SWITCHING, renewal_since=b.now), tuple(b.records))


def switch_unconfirmed(device: DeviceLifecycle, *, now: datetime, error: str, policy: RenewalPolicy,
                       rand: float) -> Step:
    """SWITCHING -> SWITCHING: no switch report (device offline, timeout). Both pins stay valid;
    ask again after backoff."""
    b = _Builder(device, as_utc(now), error)
    if device.renewal is not _R.SWITCHING:
        raise StateError("illegal_transition", f"device {device.device_id}: renewal cannot go "
                         f"from {device.renewal} to {_R.SWITCHING}")
    b.renewal(_R.SWITCHING)
    attempts = device.attempts + 1
    after = replace(device, attempts=attempts, next_attempt_at=b.now + backoff_delay(attempts, policy, rand),
                    last_error=error)
    return Step(device, after, tuple(b.records))


def switched(device: DeviceLifecycle, reported_serial: int, *, now: datetime, policy: RenewalPolicy,
             cause: str = "device_switched") -> Step:
    """RENEWAL_SWITCHING -> OVERLAP: the device reports it now uses the candidate.

    The candidate becomes ``current`` (ACTIVE); the old certificate becomes ``retiring`` and
    stays pinned for ``policy.overlap``.
    """
    b = _Builder(device, as_utc(now), cause)
    candidate = device.candidate
    if candidate is None or reported_serial != candidate.serial:
        raise StateError(
            "serial_mismatch",
            f"device {device.device_id}: reported serial {reported_serial:x} is not the candidate "
            f"{candidate.serial if candidate else 0:x}",
        )
    b.renewal(_R.OVERLAP)
    new_current = b.cert(candidate, CertState.ACTIVE)
    after = replace(
        device, renewal=_R.OVERLAP, renewal_since=b.now, current=new_current, candidate=None,
        retiring=device.current, overlap_until=b.now + policy.overlap, attempts=0,
        next_attempt_at=None, last_error=None, forced=False,
    )
    return Step(device, after, tuple(b.records))


def fail_renewal(device: DeviceLifecycle, *, now: datetime, error: str, policy: RenewalPolicy,
                 rand: float, rolled_back: bool = False) -> Step:
    """An in-progress renewal failed: RENEWAL_FAILED, or ROLLED_BACK after a failed test.

    The candidate (if any) was never used, so it is revoked. ``attempts`` grows and the next
    attempt waits ``backoff_delay``; ``rand`` in [0, 1) drives the jitter so the decision stays pure.
    """
    b = _Builder(device, as_utc(now), error)
    if device.renewal is _R.SWITCHING and not rolled_back:
        raise StateError("switch_unconfirmed", f"device {device.device_id}: the device may already use "
                         "the candidate; use switch_unconfirmed until it reports its serial")
    to = _R.ROLLED_BACK if rolled_back else _R.FAILED
    b.renewal(to)
    revoke: tuple[CertRef, ...] = ()
    if device.candidate is not None:
        revoke = (b.cert(device.candidate, CertState.REVOKED),)
    attempts = device.attempts + 1
    after = replace(
        device, renewal=to, renewal_since=b.now, candidate=None, attempts=attempts,
        next_attempt_at=b.now + backoff_delay(attempts, policy, rand), last_error=error,
    )
    return Step(device, after, tuple(b.records), revoke)


def end_overlap(device: DeviceLifecycle, *, now: datetime, cause: str = "overlap_ended") -> Step:
    """OVERLAP -> IDLE once ``overlap_until`` has passed; the retiring certificate is revoked."""
    b = _Builder(device, as_utc(now), cause)
    if device.overlap_until is None or device.retiring is None:
        raise StateError("illegal_transition",
                         f"device {device.device_id}: renewal cannot go from {device.renewal} to {_R.IDLE}")
    if b.now < device.overlap_until:
        raise StateError("overlap_not_over", f"device {device.device_id}: overlap lasts until "
                         f"{device.overlap_until.isoformat()}, now is {b.now.isoformat()}")
    b.renewal(_R.IDLE)
    revoked = b.cert(device.retiring, CertState.REVOKED)
    after = replace(device, renewal=_R.IDLE, renewal_since=b.now, retiring=None, overlap_until=None)
    return Step(device, after, tuple(b.records), (revoked,))


def revoke_device(device: DeviceLifecycle, *, now: datetime, cause: str) -> Step:
    """Revoke every certificate the device holds (compromise, decommissioning) and stop renewing."""
    b = _Builder(device, as_utc(now), cause)
    revoke: list[CertRef] = []
    if device.renewal in IN_PROGRESS:
        b.renewal(_R.FAILED)
    if (b.state or device.renewal) is not _R.IDLE:
        b.renewal(_R.IDLE)
    for cert in (device.candidate, device.retiring):
        if cert is not None and cert.state is not CertState.REVOKED:
            revoke.append(b.cert(cert, CertState.REVOKED))
    current = device.current
    if current.state is not CertState.REVOKED:
        current = b.cert(current, CertState.REVOKED)
        revoke.append(current)
    after = replace(device, renewal=_R.IDLE, renewal_since=b.now, current=current, candidate=None,
                    retiring=None, overlap_until=None, next_attempt_at=None, forced=False)
    return Step(device, after, tuple(b.records), tuple(revoke))


def revoke_certificate(device: DeviceLifecycle, serial: int, *, now: datetime, cause: str) -> Step:
    """The CA revoked ``serial`` (its revocation store, or an accepted CRL): record it.

    The current certificate revoked means the device is revoked (``revoke_device``: nothing
    of it is renewed again). A revoked candidate ends the renewal as failed; a revoked
    retiring certificate ends the overlap early. A serial the device does not hold gives
    an empty step.
    """
    now = as_utc(now)
    if serial == device.current.serial:
        return revoke_device(device, now=now, cause=cause)
    b = _Builder(device, now, cause)
    if device.candidate is not None and device.candidate.serial == serial:
        revoked = b.cert(device.candidate, CertState.REVOKED)
        to = _R.FAILED
        b.renewal(to)
        after = replace(device, renewal=to, renewal_since=now, candidate=None, last_error=cause)
        return Step(device, after, tuple(b.records), (revoked,))
    if device.retiring is not None and device.retiring.serial == serial:
        if device.retiring.state is CertState.REVOKED:
            return Step(device, device, ())
        revoked = b.cert(device.retiring, CertState.REVOKED)
        b.renewal(_R.IDLE)
        after = replace(device, renewal=_R.IDLE, renewal_since=now, retiring=None, overlap_until=None)
        return Step(device, after, tuple(b.records), (revoked,))
    return Step(device, device, ())


# --------------------------------------------------------------------------- decisions


def _days_left(not_after: datetime, now: datetime) -> int:
    return math.floor((not_after - now) / _DAY)


def renewal_lead(cert: CertRef, policy: RenewalPolicy) -> timedelta:
    """How long before expiry renewal starts: 90 days, at most a third of the lifetime."""
    return min(policy.renew_before, cert.lifetime * policy.renew_fraction)


def expiring_lead(cert: CertRef, policy: RenewalPolicy) -> timedelta:
    """How long before expiry a certificate counts as EXPIRING: 30 days, at most its renewal lead.

    Scaled like ``renewal_lead``, so a 30-day certificate is EXPIRING for its last 10 days,
    not from the day it was issued.
    """
    return min(policy.expiring_within, renewal_lead(cert, policy))


def alarm_lead(cert: CertRef, policy: RenewalPolicy) -> timedelta:
    """How long before expiry an unrenewed device raises an alarm."""
    return min(policy.alarm_before, cert.lifetime * policy.alarm_fraction)


def backoff_delay(attempts: int, policy: RenewalPolicy, rand: float) -> timedelta:
    """Exponential backoff with jitter: base * 2**(attempts-1), capped, then +/- ``jitter``."""
    if not 0 <= rand < 1:
        raise ValueError("rand must be in [0, 1)")
    exponent = min(max(attempts - 1, 0), 32)  # 2**32 * base is far past any cap
    capped = min(policy.backoff_base * (1 << exponent), policy.backoff_max)
    return capped * (1 - policy.jitter + 2 * policy.jitter * rand)


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
    if cert.state not in _RENEWABLE_CERT or now >= cert.not_after:
        return None  # expired or revoked: needs re-enrolment, see check_alarms
    if device.forced and device.renewal in _RETRYABLE:
        return "retry" if waited else None  # an operator's renewal is retried until it switches
    if cert.not_after - now > renewal_lead(cert, policy):
        return None
    if device.renewal is _R.IDLE:
        return "due"
    if device.renewal in _RETRYABLE and waited:
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


# --------------------------------------------------------------------------- CSR


@dataclass(frozen=True)
class CheckedCsr:
    """A CSR that passed ``check_csr``: the identity it names and the key to certify."""

    identity: str
    public_key: ec.EllipticCurvePublicKey
    pin: str


_CSR_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


def check_csr(
    csr_pem: bytes,
    expected_identity: str,
    policy: IdentityPolicy,
    *,
    nonce: str | None = None,
    forbidden_pins: Sequence[str] = (),
) -> CheckedCsr:
    """Check a device's CSR before the CA sees it; raises ``CredentialError`` with a reason code.

    - ``csr_too_large`` / ``csr_unparseable``: not a PEM CSR of sane size;
    - ``csr_signature_invalid``: no proof of possession of the private key;
    - ``csr_key_type``: not an EC P-256 key; ``csr_hash``: signed with a weak hash;
    - ``identity_missing`` / ``identity_ambiguous`` / ``identity_invalid`` / ``csr_identity_mismatch``:
      the CSR does not name exactly ``expected_identity`` under ``policy``;
    - ``csr_nonce_mismatch``: the challengePassword attribute is not the nonce we asked with (replay);
    - ``csr_key_reused``: the key is one the device already has (renewal requires a fresh key).
    """
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CredentialError("csr_too_large", f"CSR from {expected_identity} is {len(csr_pem)} bytes; "
                              f"at most {MAX_CSR_BYTES} allowed")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise CredentialError("csr_unparseable",
                              f"CSR from {expected_identity} is not a PEM CSR: {exc}") from exc
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CredentialError("csr_key_type", f"CSR from {expected_identity} must carry an EC P-256 key",
                              hint="generate the key with SECP256R1 (prime256v1)")
    algorithm = csr.signature_hash_algorithm
    if not isinstance(algorithm, _CSR_HASHES):
        raise CredentialError("csr_hash",
                              f"CSR from {expected_identity} is not signed with SHA-256 or stronger")
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, ValueError) as exc:  # defensive: some backends raise
        raise CredentialError("csr_signature_invalid", f"CSR from {expected_identity}: {exc}") from exc
    if not valid:
        raise CredentialError("csr_signature_invalid",
                              f"CSR from {expected_identity} is not signed by its own key "
                              "(no proof of possession)")
    identity = policy.extract(csr)
    if identity != expected_identity:
        raise CredentialError("csr_identity_mismatch",
                              f"CSR names {identity!r} but was requested from {expected_identity!r}")
    if nonce is not None:
        try:
            raw = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD).value
        except x509.AttributeNotFound:
            raw = b""
        if raw != nonce.encode("utf-8"):
            raise CredentialError("csr_nonce_mismatch",
                                  f"CSR from {expected_identity} does not carry the nonce it was asked with")
    pin = spki_pin_of_key(key)
    if pin in forbidden_pins:
        raise CredentialError("csr_key_reused", f"CSR from {expected_identity} reuses a key it already holds",
                              hint="the device must generate a fresh key for every renewal")
    return CheckedCsr(identity=identity, public_key=key, pin=pin)
