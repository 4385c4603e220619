"""Certificate renewal: the workflow of design notes 13.3, run against small interfaces.

The orchestrator only translates between the lifecycle decisions (``edge_core.lifecycle``), the
inventory (``gateway_agent.inventory``), a device channel and a CA. Per device::

    1. ask the device for a CSR for a fresh key (over its mTLS session), with a nonce;
       check proof of possession, identity, key type, freshness; the CA issues   RENEWAL_REQUESTED
    2. push the new certificate; the device stores it next to the old one        RENEWAL_ISSUED
    3. the device tests the new certificate against the test endpoint            RENEWAL_TESTING
    4. on success the device switches and reports the serial it now uses         SWITCHING
    5. both pins stay valid for the overlap (7 days), then the old certificate
       is revoked and flows into the next CRL                                     OVERLAP -> IDLE
    6. offline: retry with exponential backoff and jitter; failed test: rollback
       (the unused certificate is revoked); keeps failing: alarm long before expiry

Every step stores its ``Step`` (state + transitions, one transaction) and emits one security
event: ``renewal.started``, ``renewal.csr_rejected``, ``renewal.issued``, ``renewal.failed``,
``renewal.rolled_back``, ``renewal.switch_unconfirmed``, ``renewal.switched``,
``renewal.completed``, ``renewal.alarm``, ``cert.revoked``, ``cert.expiring``, ``cert.expired``,
``lifecycle.scan``. At most ``concurrency`` devices renew at once.

Device channel timeouts become ``FetchError("device_timeout")`` in exactly one place (``_call``).
Inventory calls are synchronous and short (SQLite, one transaction each), so they run on the
event loop thread; that also serialises the writes of concurrent renewals.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol, TypeVar

from cryptography.hazmat.primitives import serialization

from edge_core.clock import Clock, as_utc
from edge_core.csr import CheckedCsr, check_csr
from edge_core.errors import CredentialError, EdgeSecurityError, FetchError, StateError
from edge_core.events import SecurityEvents
from edge_core.expiry_scan import Alarm, check_alarms, plan_renewals, renewal_due, scan_expiring
from edge_core.identity import IdentityPolicy, check_identity
from edge_core.lifecycle import (
    IN_PROGRESS,
    CertRef,
    CertState,
    DeviceLifecycle,
    RenewalPolicy,
    RenewalState,
    Step,
    begin_renewal,
    begin_switch,
    begin_test,
    candidate_issued,
    end_overlap,
    fail_renewal,
    refresh,
    switch_unconfirmed,
    switched,
)
from gateway_agent.crl_issue import REVOCATION_REASONS, RevocationStore
from gateway_agent.crl_issue import revoke as crl_revoke
from gateway_agent.inventory import ImportReport, Inventory, apply_revocations, unlisted_revocations
from gateway_agent.pki import FileCA, IssuingCA, issue_leaf, registry_refusal

__all__ = [
    "CertificateAuthorityBackend",
    "DeviceChannel",
    "FileCABackend",
    "IssuedCertificate",
    "RenewalClaims",
    "RenewalOrchestrator",
    "RenewalOutcome",
    "ScanReport",
    "TestResult",
]

T = TypeVar("T")
CRL_REASON_SUPERSEDED = "superseded"


@dataclass(frozen=True)
class TestResult:
    """What the device saw when it tried the new certificate against the test endpoint."""

    __test__ = False  # not a pytest test class

    ok: bool
    detail: str = ""


class DeviceChannel(Protocol):
    """Talks to one device over its existing mTLS session (the agent wires it over MQTT).

    Transport problems raise ``FetchError`` (``device_offline``, ``device_timeout``, ...).
    The device contract: it never switches certificates except in ``request_switch``, and a
    failed test leaves it on the old certificate.
    """

    async def request_csr(self, device_id: str, nonce: str) -> bytes:
        """Generate a fresh EC P-256 key and return a PEM CSR carrying ``nonce`` as challengePassword."""
        ...

    async def push_certificate(self, device_id: str, cert_pem: bytes, chain_pem: bytes) -> None:
        """Store the new certificate alongside the old one (do not use it yet)."""
        ...

    async def request_test(self, device_id: str, serial: int) -> TestResult:
        """Connect to the test endpoint with certificate ``serial`` and report the result."""
        ...

    async def request_switch(self, device_id: str, serial: int) -> int:
        """Switch to certificate ``serial`` if not done yet; return the serial now in use.

        Idempotent: asked again after a lost report, the device just reports its serial.
        """
        ...


@dataclass(frozen=True)
class IssuedCertificate:
    cert_pem: bytes
    chain_pem: bytes
    ref: CertRef


class CertificateAuthorityBackend(Protocol):
    """The CA as the orchestrator sees it. Errors: ``CredentialError`` (refused), ``FetchError``."""

    async def issue(self, csr: CheckedCsr, identity: str, lifetime: timedelta) -> IssuedCertificate: ...

    async def revoke(self, serial: int, reason: str) -> None:
        """Revoke ``serial`` with an RFC 5280 reason (``x509.ReasonFlags`` member name, e.g.
        ``superseded``); must be idempotent (a retried step revokes again)."""
        ...

    async def revoked_serials(self) -> Mapping[int, str]:
        """Every serial the CA has revoked, with its reason: the inventory is fed from it."""
        ...


class FileCABackend:
    """``CertificateAuthorityBackend`` over the development CA on disk (``gateway_agent.pki.FileCA``).

    The certificate is issued for the CSR's public key, with the identity the orchestrator
    checked, never with names copied from the CSR. Revocations go into the CA's revocation store
    (``gateway_agent.crl_issue.revoke``, ``revoked.json``), so the next ``issue_crl`` lists them;
    ``revoked`` keeps this process's revocations for inspection.

    A step-ca adapter would look like this (sketch, not implemented here)::

        class StepCABackend:
            # POST {ca_url}/1.0/sign  {"csr": <PEM>, "ott": <one-time token>,
            #                          "notAfter": "<lifetime>"}
            #   ott: a JWT signed by a JWK provisioner key the agent holds, with
            #        sub=<identity>, sans=["urn:device:<identity>"], aud={ca_url}/1.0/sign,
            #        a fresh jti and 5-minute exp;
            #   response: {"crt": <PEM>, "ca": <PEM>, "certChain": [...]}
            # POST {ca_url}/1.0/revoke {"serial": "<decimal>", "reasonCode": 4 (superseded),
            #                           "reason": <text>, "ott": <token with sub=<serial>>}
            #   passive revocation: step-ca lists it in its CRL.
            # Use an HTTP client with the CA's root pinned, a timeout and a response size cap,
            # and map HTTP 4xx to CredentialError and transport errors to FetchError.
    """

    def __init__(self, ca: FileCA, *, clock: Clock, registry: Path | None = None) -> None:
        self._ca = ca
        self._issuing: IssuingCA = ca.issuing()
        self._chain = ca.chain_path.read_bytes()
        self._clock = clock
        self._registry = registry
        self.revoked: dict[int, str] = {}

    def _refusal(self, identity: str) -> CredentialError | None:
        refusal = self._ca.issuance_refusal(identity)
        if refusal is not None or self._registry is None:
            return refusal
        return registry_refusal(self._registry, identity, unknown_refused=True)

    async def issue(self, csr: CheckedCsr, identity: str, lifetime: timedelta) -> IssuedCertificate:
        """Issue for a checked CSR; refuses a revoked (``device_revoked``), unregistered
        (``device_unknown``) or disabled (``device_disabled``) device."""
        check_identity(identity)
        refusal = self._refusal(identity)
        if refusal is not None:
            raise refusal
        issued = issue_leaf(self._issuing, identity=identity, now=self._clock.now(), lifetime=lifetime,
                            public_key=csr.public_key)
        self._ca.record_issued(issued.cert)
        pem = issued.cert.public_bytes(serialization.Encoding.PEM)
        return IssuedCertificate(pem, self._chain, CertRef.from_certificate(issued.cert, CertState.ISSUED))

    async def revoke(self, serial: int, reason: str) -> None:
        crl_revoke(self._ca, serial, reason)  # idempotent: an existing entry is kept
        self.revoked.setdefault(serial, reason)

    async def revoked_serials(self) -> Mapping[int, str]:
        return {e.serial: e.reason for e in RevocationStore(self._ca).entries()}


class RenewalClaims(Protocol):
    """Per-device renewal claims shared by every agent on one inventory (``gateway_agent.leadership``).

    ``claim`` answers False when another agent holds the device; it may raise ``FetchError``.
    ``holds`` is asked before every device call and CA action, without I/O: an agent whose lease
    ran out (it was frozen, say) must not touch the device again, even before the database
    refuses its next write.
    """

    def claim(self, device_id: str) -> bool: ...

    def holds(self, device_id: str) -> bool: ...

    def release(self, device_id: str) -> None: ...


@dataclass(frozen=True)
class RenewalOutcome:
    device_id: str
    result: str  # switched, failed, rolled_back, csr_rejected, switch_unconfirmed, skipped, busy, refused, error
    detail: str = ""


@dataclass(frozen=True)
class ScanReport:
    now: datetime
    expiring: int  # certificates expiring within the policy's renew_before window
    state_changes: int
    overlaps_ended: int
    alarms: tuple[Alarm, ...]
    outcomes: tuple[RenewalOutcome, ...] = field(default=())

    def count(self, result: str) -> int:
        return sum(1 for o in self.outcomes if o.result == result)


class RenewalOrchestrator:
    """Runs renewals for the fleet with bounded concurrency. One instance per agent process."""

    def __init__(
        self,
        inventory: Inventory,
        channel: DeviceChannel,
        ca: CertificateAuthorityBackend,
        *,
        clock: Clock,
        events: SecurityEvents | None = None,
        policy: RenewalPolicy | None = None,
        identity_policy: IdentityPolicy | None = None,
        concurrency: int = 8,
        step_timeout: timedelta = timedelta(seconds=30),
        lifetime: timedelta | None = None,
        rand: Callable[[], float] | None = None,
        on_pins_changed: Callable[[str], None] | None = None,
        claims: RenewalClaims | None = None,
        reconcile: Callable[[datetime], ImportReport] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.inventory = inventory
        self.channel = channel
        self.ca = ca
        self.clock = clock
        self.events = events or SecurityEvents("gateway_agent.renewal")
        self.policy = policy or RenewalPolicy()
        self.identity_policy = identity_policy or IdentityPolicy()
        self.concurrency = concurrency
        self.step_timeout = step_timeout
        self.lifetime = lifetime  # None: same lifetime as the certificate being replaced
        self._rand = rand or secrets.SystemRandom().random
        self._on_pins_changed = on_pins_changed
        self.claims = claims  # None: this process is the inventory's only writer (SQLite)
        self._reconcile = reconcile
        self._semaphore = asyncio.Semaphore(concurrency)
        self._active: set[str] = set()
        self.in_flight = 0
        self.max_in_flight = 0

    # ------------------------------------------------------------------ public

    async def renew(self, device_id: str, *, ignore_backoff: bool = False, force: bool = False) -> RenewalOutcome:
        """Renew one device if it is due, or now with ``force`` (bounded by the shared semaphore).

        ``force`` is the operator's "renew now" (say, a key may have been exposed): it starts a
        renewal for an idle device with a valid certificate before its renewal window opens.
        """
        if device_id in self._active:
            return RenewalOutcome(device_id, "busy", "a renewal is already running")
        self._active.add(device_id)
        try:
            async with self._semaphore:
                busy = self._claim(device_id)
                if busy is not None:
                    return busy
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    return await self._guarded(device_id, ignore_backoff, force)
                finally:
                    self.in_flight -= 1
                    self._release(device_id)
        finally:
            self._active.discard(device_id)

    async def renew_many(self, device_ids: Iterable[str]) -> list[RenewalOutcome]:
        tasks = [asyncio.ensure_future(self.renew(d)) for d in device_ids]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            # One renewal failed outside its own handling, or we are cancelled (leadership lost):
            # none of the batch goes on alone, unobserved, writing after its caller has left.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def device_online(self, device_id: str) -> RenewalOutcome | None:
        """Hook for "device connected": a device that was away retries now instead of after backoff."""
        device = self.inventory.get(device_id)
        if device is None or renewal_due(device, self.clock.now(), self.policy, ignore_backoff=True) is None:
            return None
        return await self.renew(device_id, ignore_backoff=True)

    async def recover(self) -> int:
        """Fail renewals a crashed run left half-done (not SWITCHING: those are resumed instead)."""
        count = 0
        for device in self.inventory.in_progress():
            if device.device_id in self._active or device.renewal is RenewalState.SWITCHING:
                continue
            if self._claim(device.device_id) is not None:
                continue  # another agent is renewing it right now
            try:
                fresh = self.inventory.get(device.device_id)  # as of the claim, not as of the listing
                if fresh is not None and fresh.renewal in IN_PROGRESS and fresh.renewal is not RenewalState.SWITCHING:
                    await self._fail(fresh, "interrupted")
                    count += 1
            finally:
                self._release(device.device_id)
        return count

    async def daily_scan(self, now: datetime | None = None) -> ScanReport:
        """The daily job: expiry query, state refresh, overlap ends, alarms, renewals."""
        now = as_utc(now) if now is not None else self.clock.now()
        await self.recover()
        self.reconcile(now)
        await self.sync_revocations(now)
        window = self.inventory.expiring_devices(now + self.policy.renew_before)
        changes = 0
        devices: list[DeviceLifecycle] = []
        for found in window:
            step = refresh(found, now=now, policy=self.policy)
            device = found
            if step.transitions:
                device = self._store(step)
                changes += len(step.transitions)
                for t in step.transitions:
                    if t.subject == "cert" and t.to_state in (CertState.EXPIRING, CertState.EXPIRED):
                        self.events.emit(f"cert.{t.to_state}", device=t.device_id, serial=f"{t.serial:x}",
                                         level="warning" if t.to_state == CertState.EXPIRED else "info")
            devices.append(device)
        seen = {d.device_id for d in devices}
        devices.extend(d for d in self.inventory.forced_pending() if d.device_id not in seen)
        ended = await self.end_due_overlaps(now)
        rows = scan_expiring(devices, now, self.policy.renew_before)
        plans = plan_renewals(devices, now, self.policy)
        outcomes = await self.renew_many(p.device_id for p in plans)
        # Alarms look at the state after today's attempts: a device renewed a moment ago is fine.
        after = self.inventory.expiring_devices(now + self.policy.renew_before) if plans else devices
        alarms = tuple(check_alarms(after, now, self.policy))
        for alarm in alarms:
            self.events.emit("renewal.alarm", alarm.reason, level="error", device=alarm.device_id,
                             days_left=alarm.days_left, attempts=alarm.attempts, last_error=alarm.last_error)
        self.events.emit("lifecycle.scan", devices=len(rows), state_changes=changes, overlaps_ended=ended,
                         renewals=len(plans), switched=sum(1 for o in outcomes if o.result == "switched"),
                         alarms=len(alarms))
        return ScanReport(now, len(rows), changes, ended, alarms, tuple(outcomes))

    def reconcile(self, now: datetime) -> ImportReport | None:
        """Enrol registry devices the inventory does not know yet (added after the first start)."""
        if self._reconcile is None:
            return None
        try:
            report = self._reconcile(now)
        except StateError as exc:
            if exc.reason != "device_exists":
                raise
            # Another writer (``devices add``, an HA agent's first import) enrolled one of them
            # meanwhile; the enrolment was all-or-nothing, so the next scan simply tries again.
            self.events.emit("lifecycle.reconcile_retry", exc.reason, level="warning", detail=str(exc))
            return None
        for device_id in report.enrolled:
            self.events.emit("lifecycle.enrolled", "reconcile", device=device_id)
        for device_id, why in report.skipped:
            if why == "no_certificate":
                self.events.emit("lifecycle.unenrolled", why, level="error", device=device_id,
                                 detail="in the registry but no certificate of it is known; it will expire unseen")
        if report.enrolled:
            self._pins_changed(report.enrolled[0])
        return report

    async def sync_revocations(self, now: datetime | None = None,
                               revoked: Mapping[int, str] | AbstractSet[int] | None = None) -> list[str]:
        """Feed the CA's revocations (or an accepted CRL's serials) into the inventory.

        With the CA's own list (``revoked`` None: the daily scan), the other direction too: a
        device revoked by its current certificate is REVOKED whole in the inventory, its retiring
        and candidate certificates included; those go to the CA as well, so the next CRL (which
        every broker and the MCU validation service read) says what the inventory says.
        """
        now = as_utc(now) if now is not None else self.clock.now()
        serials = revoked if revoked is not None else await self.ca.revoked_serials()
        changed = apply_revocations(self.inventory, serials, now=now)
        for device_id in changed:
            self.events.emit("cert.revoked", "ca_revoked", device=device_id)
        if revoked is None and isinstance(serials, Mapping):
            await self._revoke_what_the_ca_lacks(serials, now)
        if changed:
            self._pins_changed(changed[0])
        return changed

    async def _revoke_what_the_ca_lacks(self, ca_list: Mapping[int, str], now: datetime) -> None:
        """Revoke at the CA every unexpired certificate the inventory holds REVOKED and the CA does not."""
        for cert in unlisted_revocations(self.inventory, ca_list, now=now):
            reason = _crl_reason(cert.revoke_reason)
            await self.ca.revoke(cert.serial, reason)
            self.events.emit("cert.revoked", "inventory_revoked", device=cert.device_id, serial=f"{cert.serial:x}",
                             crl_reason=reason, detail=(cert.revoke_reason or "")[:120])

    async def retry_forced(self, now: datetime | None = None) -> list[RenewalOutcome]:
        """Retry operators' renewals whose backoff has passed (cheap; the runner calls it often)."""
        now = as_utc(now) if now is not None else self.clock.now()
        due = [d.device_id for d in self.inventory.forced_pending()
               if renewal_due(d, now, self.policy) is not None]
        return await self.renew_many(due)

    async def end_due_overlaps(self, now: datetime | None = None) -> int:
        """Revoke the old certificate of every device whose overlap has ended (cheap; run often)."""
        now = as_utc(now) if now is not None else self.clock.now()
        ended = 0
        for device in self.inventory.overlap_due(now):
            if await self._end_overlap(device, now):
                ended += 1
        return ended

    # ------------------------------------------------------------------ workflow

    async def _guarded(self, device_id: str, ignore_backoff: bool, force: bool = False) -> RenewalOutcome:
        try:
            return await self._run(device_id, ignore_backoff, force)
        except (EdgeSecurityError, OSError) as exc:
            # Inventory or CA trouble outside the per-step handling: the device keeps its state
            # (recover() or the next scan picks it up); the operator sees why.
            reason = _reason(exc)
            self.events.emit("renewal.error", reason, level="error", device=device_id, detail=str(exc))
            return RenewalOutcome(device_id, "error", f"{reason}: {exc}")

    async def _run(self, device_id: str, ignore_backoff: bool, force: bool = False) -> RenewalOutcome:
        device = self.inventory.get(device_id)
        if device is None:
            return RenewalOutcome(device_id, "skipped", "not in inventory")
        now = self.clock.now()
        revoked = await self.ca.revoked_serials()
        if device.current.serial in revoked:  # the inventory may not have heard yet: tell it, renew nothing
            await self.sync_revocations(now, {device.current.serial: revoked[device.current.serial]})
            self.events.emit("renewal.refused", "device_revoked", level="warning", device=device_id,
                             serial=f"{device.current.serial:x}")
            return RenewalOutcome(device_id, "refused", "device_revoked")
        reason = renewal_due(device, now, self.policy, ignore_backoff=ignore_backoff)
        if (reason is None and force and device.renewal is RenewalState.IDLE
                and device.current.state in (CertState.ACTIVE, CertState.EXPIRING) and now < device.current.not_after):
            reason = "forced"
        if reason is None:
            return RenewalOutcome(device_id, "skipped", "not due")
        if reason == "resume":
            return await self._confirm_switch(device)
        device = self._store_held(begin_renewal(device, now=now, cause=reason))
        days_left = (device.current.not_after - now) // timedelta(days=1)
        self.events.emit("renewal.started", reason, device=device_id, attempt=device.attempts + 1,
                         days_left=days_left, serial=f"{device.current.serial:x}")

        nonce = secrets.token_urlsafe(16)
        try:
            csr_pem = await self._call(self.channel.request_csr(device_id, nonce), device_id, "request_csr")
        except EdgeSecurityError as exc:
            return await self._fail(device, _reason(exc))
        try:
            checked = check_csr(csr_pem, device_id, self.identity_policy, nonce=nonce,
                                forbidden_pins=device.pins())
        except CredentialError as exc:
            self.events.emit("renewal.csr_rejected", exc.reason, level="warning", device=device_id)
            return await self._fail(device, f"csr_rejected:{exc.reason}", result="csr_rejected")
        self._ensure_held(device_id)
        try:
            issued = await self.ca.issue(checked, device_id, self.lifetime or device.current.lifetime)
        except (CredentialError, FetchError) as exc:
            return await self._fail(device, f"ca_refused:{exc.reason}")
        device = self._store_held(candidate_issued(device, issued.ref, now=self.clock.now()))
        self._pins_changed(device_id)
        self.events.emit("renewal.issued", device=device_id, serial=f"{issued.ref.serial:x}",
                         not_after=issued.ref.not_after.isoformat())

        try:
            await self._call(self.channel.push_certificate(device_id, issued.cert_pem, issued.chain_pem),
                             device_id, "push_certificate")
        except EdgeSecurityError as exc:
            return await self._fail(device, _reason(exc))
        device = self._store_held(begin_test(device, now=self.clock.now()))
        try:
            result = await self._call(self.channel.request_test(device_id, issued.ref.serial),
                                      device_id, "request_test")
        except EdgeSecurityError as exc:
            return await self._fail(device, _reason(exc))
        if not result.ok:
            return await self._fail(device, f"test_failed:{result.detail or 'unspecified'}", rolled_back=True)
        device = self._store_held(begin_switch(device, now=self.clock.now()))
        return await self._confirm_switch(device)

    async def _confirm_switch(self, device: DeviceLifecycle) -> RenewalOutcome:
        candidate = device.candidate
        if candidate is None:  # guarded by DeviceLifecycle's invariants
            raise StateError("illegal_transition", f"device {device.device_id}: switching without candidate")
        device_id = device.device_id
        try:
            serial = await self._call(self.channel.request_switch(device_id, candidate.serial),
                                      device_id, "request_switch")
        except EdgeSecurityError as exc:
            return self._unconfirmed(device, _reason(exc))
        if serial == device.current.serial:
            return await self._fail(device, "device_kept_old_certificate", rolled_back=True)
        if serial != candidate.serial:
            return self._unconfirmed(device, f"unknown_serial:{serial:x}")
        old = device.current
        device = self._store_held(switched(device, serial, now=self.clock.now(), policy=self.policy))
        self._pins_changed(device_id)
        self.events.emit("renewal.switched", device=device_id, serial=f"{serial:x}",
                         old_serial=f"{old.serial:x}",
                         overlap_until=device.overlap_until.isoformat() if device.overlap_until else None)
        return RenewalOutcome(device_id, "switched", f"{serial:x}")

    def _unconfirmed(self, device: DeviceLifecycle, error: str) -> RenewalOutcome:
        device = self._store_held(switch_unconfirmed(device, now=self.clock.now(), error=error, policy=self.policy,
                                                rand=self._rand()))
        self.events.emit("renewal.switch_unconfirmed", error, level="warning", device=device.device_id,
                         attempts=device.attempts,
                         retry_at=device.next_attempt_at.isoformat() if device.next_attempt_at else None)
        return RenewalOutcome(device.device_id, "switch_unconfirmed", error)

    async def _fail(self, device: DeviceLifecycle, error: str, *, rolled_back: bool = False,
                    result: str | None = None) -> RenewalOutcome:
        step = fail_renewal(device, now=self.clock.now(), error=error, policy=self.policy, rand=self._rand(),
                            rolled_back=rolled_back)
        await self._revoke(step)
        device = self._store_held(step)
        if step.revoke:
            self._pins_changed(device.device_id)
        retry_at = device.next_attempt_at.isoformat() if device.next_attempt_at else None
        if rolled_back:
            self.events.emit("renewal.rolled_back", error, level="warning", device=device.device_id,
                             attempts=device.attempts, retry_at=retry_at)
            return RenewalOutcome(device.device_id, result or "rolled_back", error)
        self.events.emit("renewal.failed", error, level="warning", device=device.device_id,
                         attempts=device.attempts, retry_at=retry_at)
        return RenewalOutcome(device.device_id, result or "failed", error)

    async def _end_overlap(self, device: DeviceLifecycle, now: datetime) -> bool:
        step = end_overlap(device, now=now)
        try:
            await self._revoke(step)
        except (CredentialError, FetchError) as exc:
            self.events.emit("renewal.error", exc.reason, level="error", device=device.device_id,
                             detail=f"revoking the retiring certificate failed; retried next scan: {exc}")
            return False
        self._store(step)
        self._pins_changed(device.device_id)
        self.events.emit("renewal.completed", device=device.device_id, serial=f"{device.current.serial:x}")
        return True

    # ------------------------------------------------------------------ plumbing

    async def _revoke(self, step: Step) -> None:
        """Revoke at the CA before the inventory says so: a revocation may repeat, never go missing.

        Renewal only ever revokes certificates that a newer one replaces (the old one after the
        overlap, an unused candidate), so the CRL reason is ``superseded``; the inventory and
        the event keep the precise cause.
        """
        if step.revoke:
            self._ensure_held(step.after.device_id)
        for cert in step.revoke:
            cause = next((t.cause for t in step.transitions if t.serial == cert.serial), "superseded")
            await self.ca.revoke(cert.serial, CRL_REASON_SUPERSEDED)
            self.events.emit("cert.revoked", cause, device=step.after.device_id, serial=f"{cert.serial:x}",
                             crl_reason=CRL_REASON_SUPERSEDED)

    def _claim(self, device_id: str) -> RenewalOutcome | None:
        """Take the shared per-device claim; an outcome if the device is busy elsewhere (or unknown)."""
        if self.claims is None:
            return None
        try:
            if self.claims.claim(device_id):
                return None
        except (EdgeSecurityError, OSError) as exc:
            self.events.emit("renewal.error", _reason(exc), level="error", device=device_id, detail=str(exc))
            return RenewalOutcome(device_id, "error", f"claim: {exc}")
        return RenewalOutcome(device_id, "busy", "another agent holds the renewal claim")

    def _ensure_held(self, device_id: str) -> None:
        if self.claims is not None and not self.claims.holds(device_id):
            raise StateError("not_leader", f"device {device_id}: this agent no longer holds its renewal claim")

    def _release(self, device_id: str) -> None:
        if self.claims is None:
            return
        try:
            self.claims.release(device_id)
        except (EdgeSecurityError, OSError) as exc:  # the claim expires with the lease anyway
            self.events.emit("renewal.error", _reason(exc), level="warning", device=device_id,
                             detail=f"releasing the claim failed: {exc}")

    def _store(self, step: Step) -> DeviceLifecycle:
        return self.inventory.apply(step)

    def _store_held(self, step: Step) -> DeviceLifecycle:
        """A step of a renewal under its claim. Checked here as well as by the inventory's fence:
        an agent that wakes from a freeze with a step in hand refuses it before the database does."""
        self._ensure_held(step.after.device_id)
        return self.inventory.apply(step)

    def _pins_changed(self, device_id: str) -> None:
        if self._on_pins_changed is not None:
            self._on_pins_changed(device_id)

    async def _call(self, awaitable: Awaitable[T], device_id: str, what: str) -> T:
        """The one place a device step's timeout becomes an error."""
        try:
            self._ensure_held(device_id)
        except StateError:
            if isinstance(awaitable, Coroutine):
                awaitable.close()  # never started: no device is asked anything
            raise
        try:
            async with asyncio.timeout(self.step_timeout.total_seconds()):
                return await awaitable
        except TimeoutError as exc:
            raise FetchError("device_timeout", f"device {device_id}: {what} took longer than "
                             f"{self.step_timeout.total_seconds():g}s") from exc
        except OSError as exc:
            raise FetchError("device_unreachable", f"device {device_id}: {what}: {exc}") from exc


def _crl_reason(cause: str | None) -> str:
    """The CRL reason for an inventory revocation cause: ``ca_revoked:<reason>`` carries the CA's
    reason for the device's current certificate, which its other certificates share."""
    name = (cause or "").removeprefix("ca_revoked:")
    return name if name in REVOCATION_REASONS else "unspecified"


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return reason if isinstance(reason, str) else type(exc).__name__
