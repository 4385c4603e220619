"""Certificate lifecycle: the state model of a device's certificates and every legal transition.

This module holds no I/O: no database, no network, no event loop. It decides; the inventory
(``gateway_agent.inventory``) stores what it decides and the renewal orchestrator
(``gateway_agent.renewal``) talks to devices and the CA. Which devices the daily scan finds
expiring, due or alarming is ``edge_core.expiry_scan``'s; a device's CSR is checked by
``edge_core.csr``. ``RenewalPolicy`` holds the timings both use.

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
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from cryptography import x509

from edge_core.clock import as_utc
from edge_core.errors import ConfigError, StateError
from edge_core.identity import check_identity, spki_pin

__all__ = [
    "CERT_TRANSITIONS",
    "IN_PROGRESS",
    "RENEWABLE_CERT",
    "RENEWAL_TRANSITIONS",
    "RETRYABLE",
    "CertRef",
    "CertState",
    "DeviceLifecycle",
    "RenewalPolicy",
    "RenewalState",
    "Step",
    "Transition",
    "backoff_delay",
    "begin_renewal",
    "begin_switch",
    "begin_test",
    "candidate_issued",
    "end_overlap",
    "enroll",
    "expiring_lead",
    "fail_renewal",
    "refresh",
    "renewal_lead",
    "revoke_certificate",
    "revoke_device",
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
#: renewal states after which a new attempt may start (after backoff)
RETRYABLE = frozenset({_R.FAILED, _R.ROLLED_BACK})
#: certificate states that can still be renewed (not expired, not revoked)
RENEWABLE_CERT = frozenset({CertState.ISSUED, CertState.ACTIVE, CertState.EXPIRING})


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
    if device.current.state not in RENEWABLE_CERT or b.now >= device.current.not_after:
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


# --------------------------------------------------------------------------- timing


def renewal_lead(cert: CertRef, policy: RenewalPolicy) -> timedelta:
    """How long before expiry renewal starts: 90 days, at most a third of the lifetime."""
    return min(policy.renew_before, cert.lifetime * policy.renew_fraction)


def expiring_lead(cert: CertRef, policy: RenewalPolicy) -> timedelta:
    """How long before expiry a certificate counts as EXPIRING: 30 days, at most its renewal lead.

    Scaled like ``renewal_lead``, so a 30-day certificate is EXPIRING for its last 10 days,
    not from the day it was issued.
    """
    return min(policy.expiring_within, renewal_lead(cert, policy))


def backoff_delay(attempts: int, policy: RenewalPolicy, rand: float) -> timedelta:
    """Exponential backoff with jitter: base * 2**(attempts-1), capped, then +/- ``jitter``."""
    if not 0 <= rand < 1:
        raise ValueError("rand must be in [0, 1)")
    exponent = min(max(attempts - 1, 0), 32)  # 2**32 * base is far past any cap
    capped = min(policy.backoff_base * (1 << exponent), policy.backoff_max)
    return capped * (1 - policy.jitter + 2 * policy.jitter * rand)
