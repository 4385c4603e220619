"""Lifecycle decisions: transition tables, steps, scans, plans, alarms, backoff, CSR checks."""

from __future__ import annotations

import hashlib
import itertools
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AttributeOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from edge_core.csr import check_csr
from edge_core.errors import ConfigError, CredentialError, StateError
from edge_core.expiry_scan import (
    alarm_lead,
    check_alarms,
    overlaps_ended,
    plan_renewals,
    renewal_due,
    scan_expiring,
)
from edge_core.identity import IdentityPolicy
from edge_core.lifecycle import (
    CERT_TRANSITIONS,
    RENEWAL_TRANSITIONS,
    CertRef,
    CertState,
    DeviceLifecycle,
    RenewalPolicy,
    RenewalState,
    backoff_delay,
    begin_renewal,
    begin_switch,
    begin_test,
    candidate_issued,
    end_overlap,
    enroll,
    fail_renewal,
    refresh,
    renewal_lead,
    revoke_device,
    switch_unconfirmed,
    switched,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
POLICY = RenewalPolicy()
_serials = itertools.count(0x1000)


def pin(n: int) -> str:
    return "sha256:" + hashlib.sha256(str(n).encode()).hexdigest()


def cert(days_left: float, *, lifetime_days: int = 365, now: datetime = T0,
         state: CertState = CertState.ACTIVE) -> CertRef:
    serial = next(_serials)
    not_after = now + timedelta(days=days_left)
    return CertRef(serial, pin(serial), not_after - timedelta(days=lifetime_days), not_after, state)


def device(days_left: float, device_id: str = "pump-1", **kwargs: object) -> DeviceLifecycle:
    return enroll(device_id, cert(days_left, **kwargs), now=T0, cause="test").after  # type: ignore[arg-type]


def through_switch(dev: DeviceLifecycle, now: datetime = T0) -> tuple[DeviceLifecycle, CertRef]:
    dev = begin_renewal(dev, now=now, cause="due").after
    new = cert(365, now=now, state=CertState.ISSUED)
    dev = candidate_issued(dev, new, now=now).after
    dev = begin_test(dev, now=now).after
    dev = begin_switch(dev, now=now).after
    return dev, new


# --------------------------------------------------------------------------- tables


def test_tables_cover_every_state() -> None:
    assert set(CERT_TRANSITIONS) == set(CertState)
    assert set(RENEWAL_TRANSITIONS) == set(RenewalState)
    assert CERT_TRANSITIONS[CertState.REVOKED] == frozenset()


def test_design_chain_is_legal() -> None:
    chain = [CertState.ISSUED, CertState.ACTIVE, CertState.EXPIRING, CertState.EXPIRED, CertState.REVOKED]
    for src, dst in itertools.pairwise(chain):
        assert dst in CERT_TRANSITIONS[src]


def test_certificates_never_move_backwards() -> None:
    order = {s: i for i, s in enumerate(CertState)}
    for src, targets in CERT_TRANSITIONS.items():
        assert all(order[dst] > order[src] for dst in targets), src


@pytest.mark.parametrize("src", list(RenewalState))
def test_illegal_renewal_moves_raise(src: RenewalState) -> None:
    base = device(60)
    if src is RenewalState.IDLE:
        dev = base
    elif src is RenewalState.REQUESTED:
        dev = begin_renewal(base, now=T0, cause="t").after
    else:
        dev = begin_renewal(base, now=T0, cause="t").after
        if src is RenewalState.FAILED:
            dev = fail_renewal(dev, now=T0, error="x", policy=POLICY, rand=0.5).after
        else:
            dev = candidate_issued(dev, cert(365, state=CertState.ISSUED), now=T0).after
            if src is RenewalState.ROLLED_BACK:
                dev = begin_test(dev, now=T0).after
                dev = fail_renewal(dev, now=T0, error="x", policy=POLICY, rand=0.5, rolled_back=True).after
            elif src in (RenewalState.TESTING, RenewalState.SWITCHING, RenewalState.OVERLAP):
                dev = begin_test(dev, now=T0).after
                if src is not RenewalState.TESTING:
                    dev = begin_switch(dev, now=T0).after
                if src is RenewalState.OVERLAP:
                    dev = switched(dev, dev.candidate.serial, now=T0, policy=POLICY).after  # type: ignore[union-attr]
    assert dev.renewal is src
    if RenewalState.REQUESTED not in RENEWAL_TRANSITIONS[src]:
        with pytest.raises(StateError) as err:
            begin_renewal(dev, now=T0, cause="t")
        assert err.value.reason == "illegal_transition"
        assert f"from {src} to renewal_requested" in str(err.value)
    if RenewalState.TESTING not in RENEWAL_TRANSITIONS[src]:
        with pytest.raises(StateError) as err2:
            begin_test(dev, now=T0)
        assert err2.value.reason == "illegal_transition"


def test_revoked_certificate_cannot_be_revoked_twice() -> None:
    dev = revoke_device(device(60), now=T0, cause="compromised").after
    with pytest.raises(StateError) as err:
        begin_renewal(dev, now=T0, cause="due")
    assert err.value.reason == "not_renewable"


# --------------------------------------------------------------------------- steps


def test_enroll_records_the_new_certificate() -> None:
    c = cert(100)
    step = enroll("pump-1", c, now=T0, cause="import")
    assert step.before is None
    (t,) = step.transitions
    assert (t.subject, t.serial, t.from_state, t.to_state) == ("cert", c.serial, None, "active")
    assert t.cause == "import"


def test_happy_path_records_every_transition_and_keeps_two_pins() -> None:
    dev = device(80)
    old = dev.current
    dev, new = through_switch(dev)
    assert dev.pins() == (old.pin, new.pin)
    step = switched(dev, new.serial, now=T0 + timedelta(hours=1), policy=POLICY)
    after = step.after
    assert after.renewal is RenewalState.OVERLAP
    assert after.current.serial == new.serial and after.current.state is CertState.ACTIVE
    assert after.retiring == old
    assert after.pins() == (new.pin, old.pin)
    assert after.overlap_until == T0 + timedelta(hours=1) + POLICY.overlap
    assert [(t.subject, t.from_state, t.to_state) for t in step.transitions] == [
        ("renewal", "renewal_switching", "overlap"),
        ("cert", "issued", "active"),
    ]
    assert all(t.at == T0 + timedelta(hours=1) and t.cause == "device_switched" for t in step.transitions)

    with pytest.raises(StateError) as err:
        end_overlap(after, now=T0 + timedelta(days=6))
    assert err.value.reason == "overlap_not_over"
    done = end_overlap(after, now=T0 + timedelta(days=7, hours=1))
    assert done.after.renewal is RenewalState.IDLE and done.after.retiring is None
    assert done.after.pins() == (new.pin,)
    assert [c.serial for c in done.revoke] == [old.serial]
    assert done.revoke[0].state is CertState.REVOKED


def test_switch_with_wrong_serial_is_refused() -> None:
    dev, new = through_switch(device(80))
    with pytest.raises(StateError) as err:
        switched(dev, new.serial + 1, now=T0, policy=POLICY)
    assert err.value.reason == "serial_mismatch"


def test_candidate_must_have_a_new_key() -> None:
    dev = begin_renewal(device(80), now=T0, cause="due").after
    same_key = CertRef(next(_serials), dev.current.pin, T0, T0 + 365 * DAY)
    with pytest.raises(StateError) as err:
        candidate_issued(dev, same_key, now=T0)
    assert err.value.reason == "key_reused"


def test_failed_test_rolls_back_and_revokes_the_unused_candidate() -> None:
    dev = begin_renewal(device(80), now=T0, cause="due").after
    new = cert(365, state=CertState.ISSUED)
    dev = begin_test(candidate_issued(dev, new, now=T0).after, now=T0).after
    step = fail_renewal(dev, now=T0, error="test_failed:tls", policy=POLICY, rand=0.5, rolled_back=True)
    assert step.after.renewal is RenewalState.ROLLED_BACK
    assert step.after.candidate is None and step.after.attempts == 1
    assert step.after.last_error == "test_failed:tls"
    assert [c.serial for c in step.revoke] == [new.serial]
    assert step.after.next_attempt_at == T0 + POLICY.backoff_base


def test_switching_never_fails_without_a_report() -> None:
    dev, new = through_switch(device(80))
    with pytest.raises(StateError) as err:
        fail_renewal(dev, now=T0, error="device_offline", policy=POLICY, rand=0.5)
    assert err.value.reason == "switch_unconfirmed"
    step = switch_unconfirmed(dev, now=T0, error="device_offline", policy=POLICY, rand=0.5)
    assert step.after.renewal is RenewalState.SWITCHING
    assert step.after.candidate == new and step.revoke == ()
    assert step.after.pins() == (dev.current.pin, new.pin)
    assert step.transitions[0].from_state == step.transitions[0].to_state == "renewal_switching"
    assert renewal_due(step.after, T0, POLICY) is None
    assert renewal_due(step.after, step.after.next_attempt_at, POLICY) == "resume"  # type: ignore[arg-type]


def test_switch_unconfirmed_only_from_switching() -> None:
    dev = begin_test(candidate_issued(begin_renewal(device(80), now=T0, cause="d").after,
                                      cert(365, state=CertState.ISSUED), now=T0).after, now=T0).after
    with pytest.raises(StateError) as err:
        switch_unconfirmed(dev, now=T0, error="x", policy=POLICY, rand=0.1)
    assert err.value.reason == "illegal_transition"


def test_revoke_device_revokes_everything_it_holds() -> None:
    dev, new = through_switch(device(80))
    step = revoke_device(dev, now=T0, cause="compromised")
    assert {c.serial for c in step.revoke} == {dev.current.serial, new.serial}
    assert step.after.current.state is CertState.REVOKED
    assert step.after.renewal is RenewalState.IDLE
    assert [t.to_state for t in step.transitions if t.subject == "renewal"] == ["renewal_failed", "idle"]


def test_refresh_moves_with_time() -> None:
    dev = device(40)
    assert refresh(dev, now=T0, policy=POLICY).transitions == ()
    step = refresh(dev, now=T0 + 10 * DAY, policy=POLICY)
    assert step.after.current.state is CertState.EXPIRING
    step2 = refresh(step.after, now=T0 + 41 * DAY, policy=POLICY)
    assert step2.after.current.state is CertState.EXPIRED
    assert [(t.from_state, t.to_state) for t in step2.transitions] == [("expiring", "expired")]


def test_lifecycle_invariants_are_enforced() -> None:
    c = cert(100)
    with pytest.raises(ValueError, match="candidate"):
        DeviceLifecycle("pump-1", c, candidate=cert(300))
    with pytest.raises(ValueError, match="overlap"):
        DeviceLifecycle("pump-1", c, renewal=RenewalState.OVERLAP)
    with pytest.raises(ValueError, match="naive"):
        CertRef(5, pin(5), datetime(2025, 1, 1), datetime(2026, 1, 1))
    with pytest.raises(CredentialError):
        DeviceLifecycle("pump/+", c)


# --------------------------------------------------------------------------- decisions


def test_scan_expiring_is_soonest_first_with_days_left() -> None:
    devices = [device(80, "a"), device(5.5, "b"), device(200, "c"), device(-2, "d"), device(30, "e")]
    revoked = revoke_device(device(1, "f"), now=T0, cause="x").after
    rows = scan_expiring([*devices, revoked], T0, within=90 * DAY)
    assert [r.device_id for r in rows] == ["d", "b", "e", "a"]
    assert [r.days_left for r in rows] == [-2, 5, 30, 80]


def test_plan_renews_within_lead_most_urgent_first() -> None:
    devices = [device(95, "far"), device(89, "due"), device(10, "urgent"), device(-1, "expired")]
    plans = plan_renewals(devices, T0, POLICY)
    assert [(p.device_id, p.reason, p.attempt) for p in plans] == [("urgent", "due", 1), ("due", "due", 1)]


def test_short_lived_certificates_renew_at_a_third_of_their_life() -> None:
    short = device(11, "short", lifetime_days=30)
    assert renewal_lead(short.current, POLICY) == 10 * DAY
    assert alarm_lead(short.current, POLICY) == 5 * DAY
    assert plan_renewals([short], T0, POLICY) == []
    assert [p.device_id for p in plan_renewals([short], T0 + 1 * DAY, POLICY)] == ["short"]
    custom = RenewalPolicy(renew_before=timedelta(days=20), renew_fraction=0.5,
                           alarm_before=timedelta(days=10))
    assert renewal_lead(short.current, custom) == 15 * DAY


def test_failed_device_waits_for_backoff_unless_it_came_back() -> None:
    dev = begin_renewal(device(60), now=T0, cause="due").after
    dev = fail_renewal(dev, now=T0, error="device_offline", policy=POLICY, rand=0.0).after
    assert dev.next_attempt_at == T0 + POLICY.backoff_base * (1 - POLICY.jitter)
    assert plan_renewals([dev], T0 + timedelta(minutes=1), POLICY) == []
    assert renewal_due(dev, T0 + timedelta(minutes=1), POLICY, ignore_backoff=True) == "retry"
    assert dev.next_attempt_at is not None
    (plan,) = plan_renewals([dev], dev.next_attempt_at, POLICY)
    assert (plan.reason, plan.attempt) == ("retry", 2)


def test_in_progress_and_overlap_are_not_planned() -> None:
    requested = begin_renewal(device(60, "a"), now=T0, cause="due").after
    overlap, new = through_switch(device(60, "b"))
    overlap = switched(overlap, new.serial, now=T0, policy=POLICY).after
    assert plan_renewals([requested, overlap], T0, POLICY) == []
    assert overlaps_ended([requested, overlap], T0 + 6 * DAY) == []
    assert overlaps_ended([requested, overlap], T0 + 7 * DAY) == ["b"]


def test_alarms_come_long_before_expiry() -> None:
    quiet = device(60, "quiet")
    failing = device(70, "failing")
    for _ in range(POLICY.alarm_after_failures):
        failing = begin_renewal(failing, now=T0, cause="retry").after
        failing = fail_renewal(failing, now=T0, error="device_offline", policy=POLICY, rand=0.5).after
    overdue = device(29, "overdue")
    expired = device(-1, "expired")
    alarms = check_alarms([quiet, failing, overdue, expired], T0, POLICY)
    assert [(a.device_id, a.reason) for a in alarms] == [
        ("expired", "cert_expired"), ("overdue", "renewal_overdue"), ("failing", "renewal_failing"),
    ]
    assert alarms[2].last_error == "device_offline" and alarms[2].attempts == 5
    renewed, new = through_switch(device(29, "renewed"))
    renewed = switched(renewed, new.serial, now=T0, policy=POLICY).after
    assert check_alarms([renewed], T0, POLICY) == []


@given(attempts=st.integers(min_value=1, max_value=200), rand=st.floats(min_value=0, max_value=0.999999))
def test_backoff_grows_and_stays_bounded(attempts: int, rand: float) -> None:
    delay = backoff_delay(attempts, POLICY, rand)
    assert POLICY.backoff_base * (1 - POLICY.jitter) <= delay <= POLICY.backoff_max * (1 + POLICY.jitter)
    if attempts > 1:
        assert backoff_delay(attempts, POLICY, 0.0) >= backoff_delay(attempts - 1, POLICY, 0.0)


def test_backoff_rejects_bad_random() -> None:
    with pytest.raises(ValueError, match="rand"):
        backoff_delay(1, POLICY, 1.0)


@pytest.mark.parametrize("kwargs", [
    {"renew_fraction": 1.5},
    {"alarm_before": timedelta(days=120)},
    {"alarm_fraction": 0.5},
    {"jitter": 1.0},
    {"backoff_max": timedelta(seconds=1)},
    {"overlap": timedelta(0)},
    {"alarm_after_failures": 0},
])
def test_policy_is_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RenewalPolicy(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- CSR


def make_csr(identity: str = "pump-1", *, key: object = None, nonce: str | None = "n0nce",
             uris: tuple[str, ...] | None = None, cn: str | None = None,
             algorithm: hashes.HashAlgorithm | None = None) -> tuple[bytes, object]:
    private = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or identity)]))
    names = uris if uris is not None else (f"urn:device:{identity}",)
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in names]), critical=False)
    if nonce is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, nonce.encode())
    csr = builder.sign(private, algorithm or hashes.SHA256())  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM), private


def test_good_csr_passes_and_yields_the_key() -> None:
    pem, key = make_csr()
    checked = check_csr(pem, "pump-1", IdentityPolicy(), nonce="n0nce")
    assert checked.identity == "pump-1"
    assert checked.public_key.public_numbers() == key.public_key().public_numbers()  # type: ignore[attr-defined]
    assert checked.pin.startswith("sha256:")


def test_cn_policy_reads_the_common_name() -> None:
    pem, _ = make_csr(uris=(), cn="pump-1")
    assert check_csr(pem, "pump-1", IdentityPolicy(source="subject_cn"), nonce="n0nce").identity == "pump-1"


def _tampered_signature(pem: bytes) -> bytes:
    csr = x509.load_pem_x509_csr(pem)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    sig = csr.signature
    at = bytes(der).rindex(sig)
    # Replace the signature with a valid-looking ECDSA signature of other data by another key.
    other = ec.generate_private_key(ec.SECP256R1()).sign(b"other", ec.ECDSA(hashes.SHA256()))
    if len(other) != len(sig):
        pytest.skip("signature length differs; retry")
    der[at:at + len(sig)] = other
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(("case", "reason"), [
    ("garbage", "csr_unparseable"),
    ("huge", "csr_too_large"),
    ("rsa", "csr_key_type"),
    ("p384", "csr_key_type"),
    ("sha224", "csr_hash"),
    ("other_device", "csr_identity_mismatch"),
    ("two_ids", "identity_ambiguous"),
    ("no_san", "identity_missing"),
    ("bad_id", "identity_invalid"),
    ("no_nonce", "csr_nonce_mismatch"),
    ("replayed_nonce", "csr_nonce_mismatch"),
    ("reused_key", "csr_key_reused"),
])
def test_bad_csrs_are_refused_with_a_reason(case: str, reason: str) -> None:
    forbidden: tuple[str, ...] = ()
    if case == "garbage":
        pem = b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    elif case == "huge":
        pem = b"x" * 10_000
    elif case == "rsa":
        pem, _ = make_csr(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    elif case == "p384":
        pem, _ = make_csr(key=ec.generate_private_key(ec.SECP384R1()))
    elif case == "sha224":
        pem, _ = make_csr(algorithm=hashes.SHA224())
    elif case == "other_device":
        pem, _ = make_csr("valve-2")
    elif case == "two_ids":
        pem, _ = make_csr(uris=("urn:device:pump-1", "urn:device:pump-2"))
    elif case == "no_san":
        pem, _ = make_csr(uris=())
    elif case == "bad_id":
        pem, _ = make_csr(uris=("urn:device:pump/#",))
    elif case == "no_nonce":
        pem, _ = make_csr(nonce=None)
    elif case == "replayed_nonce":
        pem, _ = make_csr(nonce="old-nonce")
    else:
        pem, key = make_csr()
        pub = key.public_key().public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        forbidden = ("sha256:" + hashlib.sha256(pub).hexdigest(),)
    with pytest.raises(CredentialError) as err:
        check_csr(pem, "pump-1", IdentityPolicy(), nonce="n0nce", forbidden_pins=forbidden)
    assert err.value.reason == reason


def test_csr_without_proof_of_possession_is_refused() -> None:
    pem, _ = make_csr()
    for _ in range(20):  # ECDSA signature lengths vary by a byte; find one that fits
        try:
            bad = _tampered_signature(pem)
            break
        except pytest.skip.Exception:
            continue
    else:
        pytest.fail("could not build a tampered CSR")
    with pytest.raises(CredentialError) as err:
        check_csr(bad, "pump-1", IdentityPolicy(), nonce="n0nce")
    assert err.value.reason == "csr_signature_invalid"
