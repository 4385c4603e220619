"""CRL acceptance rules, the revocation index and staleness: each rule has its own bad CRL."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_core.clock import ManualClock
from edge_core.crl import REASONS, InstalledCrl, RevokedSerials, crl_pem, issuer_key, load_crl, split_crl_bundle
from edge_core.crl_freshness import StalenessPolicy, evaluate_freshness
from edge_core.crl_trust import accept_crl
from edge_core.errors import ConfigError, CredentialError
from edge_core.identity import IdentityPolicy, describe_certificate
from edge_core.revocation import RevocationIndex
from gateway_agent.pki import IssuingCA, issue_leaf, new_intermediate, new_root

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
UNKNOWN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.55555.1")


@pytest.fixture(scope="module")
def ca() -> IssuingCA:
    yesterday = NOW - timedelta(days=1)
    return new_intermediate(new_root("Test Root", yesterday), "Test Issuing CA", yesterday)


def build_crl(
    ca: IssuingCA,
    *,
    number: int | None = 7,
    this_update: datetime = NOW - timedelta(hours=1),
    next_update: datetime | None = NOW + timedelta(days=7),
    serials: Sequence[int] = (1001, 1002),
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    entry_extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    signer: ec.EllipticCurvePrivateKey | None = None,
    issuer: x509.Name | None = None,
) -> bytes:
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(issuer or ca.cert.subject).last_update(this_update))
    if next_update is not None:
        builder = builder.next_update(next_update)
    if number is not None:
        builder = builder.add_extension(x509.CRLNumber(number), critical=False)
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    for serial in serials:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(this_update)
        for ext, critical in entry_extensions:
            entry = entry.add_extension(ext, critical=critical)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(signer or ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def accept(ca: IssuingCA, der: bytes, installed: InstalledCrl | None = None, **kw: object):  # type: ignore[no-untyped-def]
    return accept_crl(der, issuers=[ca.cert], installed=installed, now=kw.pop("now", NOW), **kw)  # type: ignore[arg-type]


def refused(ca: IssuingCA, der: bytes, reason: str, installed: InstalledCrl | None = None) -> CredentialError:
    with pytest.raises(CredentialError) as info:
        accept(ca, der, installed)
    assert info.value.reason == reason, str(info.value)
    assert reason in REASONS
    return info.value


# --------------------------------------------------------------------------- acceptance


def test_valid_crl_is_accepted_with_state_and_serials(ca: IssuingCA) -> None:
    der = build_crl(ca, serials=(1001, 2**158 + 5))
    update = accept(ca, der)
    assert update.changed
    assert update.installed.crl_number == 7
    assert update.installed.issuer == issuer_key(ca.cert.subject) == "CN=test issuing ca,O=edge gateway dev pki"
    assert update.installed.count == 2
    assert update.installed.this_update == NOW - timedelta(hours=1)
    assert update.revoked is not None and set(update.revoked) == {1001, 2**158 + 5}
    assert update.der == der


def test_pem_and_der_give_the_same_verdict(ca: IssuingCA) -> None:
    der = build_crl(ca)
    pem = crl_pem(der)
    assert accept(ca, pem).installed == accept(ca, der).installed
    assert load_crl(pem).public_bytes(serialization.Encoding.DER) == der


def test_empty_crl_is_accepted(ca: IssuingCA) -> None:
    update = accept(ca, build_crl(ca, serials=()))
    assert update.installed.count == 0 and update.revoked is not None and len(update.revoked) == 0


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x30\x03\x02\x01\x01",
                                  b"-----BEGIN X509 CRL-----\n!!!!\n-----END X509 CRL-----\n"])
def test_garbage_is_unparseable(ca: IssuingCA, data: bytes) -> None:
    refused(ca, data, "crl_unparseable")
    with pytest.raises(CredentialError) as info:
        load_crl(data)
    assert info.value.reason == "crl_unparseable"


def test_truncated_crl_is_unparseable(ca: IssuingCA) -> None:
    refused(ca, build_crl(ca)[:-10], "crl_unparseable")


def test_crl_of_another_ca_is_unknown_issuer(ca: IssuingCA) -> None:
    other = new_root("Other CA", NOW)
    refused(ca, build_crl(other), "crl_unknown_issuer")


def test_crl_signed_by_another_key_under_our_name_is_bad_signature(ca: IssuingCA) -> None:
    err = refused(ca, build_crl(ca, signer=ec.generate_private_key(ec.SECP256R1())), "crl_bad_signature")
    assert "Test Issuing CA" in str(err)


def test_tampered_crl_is_bad_signature(ca: IssuingCA) -> None:
    der = bytearray(build_crl(ca, serials=(0x1234,)))
    pos = der.find(b"\x02\x02\x12\x34")
    der[pos + 3] = 0x35  # un-revoke 0x1234 by changing the entry
    refused(ca, bytes(der), "crl_bad_signature")


def test_ca_without_crl_sign_usage_is_not_an_issuer() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "No CRL Sign")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=1))
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, False, False, False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    signer = IssuingCA(cert, key)
    with pytest.raises(CredentialError) as info:
        accept(signer, build_crl(signer))
    assert info.value.reason == "crl_unknown_issuer"
    assert "cRLSign" in str(info.value)


def test_dsa_signed_crl_is_unsupported_algorithm() -> None:
    """DSA is refused by design (TLS 1.3 has no DSA): its CRL is named so, not a bad signature."""
    key = dsa.generate_private_key(2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "DSA CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    der = (x509.CertificateRevocationListBuilder().issuer_name(name).last_update(NOW - timedelta(hours=1))
           .next_update(NOW + timedelta(days=7)).add_extension(x509.CRLNumber(1), critical=False)
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    with pytest.raises(CredentialError) as info:
        accept_crl(der, issuers=[cert], installed=None, now=NOW)
    assert info.value.reason == "crl_unsupported_algorithm" and "DSA" in str(info.value)
    assert info.value.reason in REASONS


def test_crl_from_the_future_is_refused_beyond_skew(ca: IssuingCA) -> None:
    refused(ca, build_crl(ca, this_update=NOW + timedelta(minutes=6),
                          next_update=NOW + timedelta(days=7)), "crl_from_future")
    # within the default 5 minute skew: fine
    assert accept(ca, build_crl(ca, this_update=NOW + timedelta(minutes=4))).changed
    with pytest.raises(CredentialError, match="later than now"):
        accept(ca, build_crl(ca, this_update=NOW + timedelta(minutes=1)), max_skew=timedelta(0))


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _seq_content(der: bytes) -> bytes:
    """Content of a DER SEQUENCE (test helper; long lengths only as produced by cryptography)."""
    first = der[1]
    if first < 0x80:
        return der[2:]
    return der[2 + (first & 0x7F):]


def resign_edited(ca: IssuingCA, der: bytes, old: bytes, new: bytes) -> bytes:
    """Replace ``old`` by ``new`` inside tbsCertList and sign again: for CRLs no builder will make."""
    crl = x509.load_der_x509_crl(der)
    content = _seq_content(crl.tbs_certlist_bytes)
    assert content.count(old) == 1
    content = content.replace(old, new)
    tbs = b"\x30" + _der_len(len(content)) + content
    sig = ca.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    alg = bytes.fromhex("300a06082a8648ce3d040302")
    bits = b"\x03" + _der_len(len(sig) + 1) + b"\x00" + sig
    body = tbs + alg + bits
    return b"\x30" + _der_len(len(body)) + body


def _utctime(when: datetime) -> bytes:
    text = when.strftime("%y%m%d%H%M%SZ").encode()
    return b"\x17" + bytes([len(text)]) + text


def test_crl_without_next_update_is_refused(ca: IssuingCA) -> None:
    nxt = NOW + timedelta(days=7)
    der = resign_edited(ca, build_crl(ca, next_update=nxt), _utctime(nxt), b"")
    assert x509.load_der_x509_crl(der).next_update_utc is None
    refused(ca, der, "crl_no_next_update")


def test_crl_with_next_update_before_this_update_is_refused(ca: IssuingCA) -> None:
    nxt = NOW + timedelta(days=7)
    der = resign_edited(ca, build_crl(ca, next_update=nxt), _utctime(nxt), _utctime(NOW - timedelta(hours=2)))
    refused(ca, der, "crl_bad_validity")


def test_crl_without_number_is_refused(ca: IssuingCA) -> None:
    refused(ca, build_crl(ca, number=None), "crl_no_number")


def test_older_crl_number_is_rollback_with_a_clear_message(ca: IssuingCA) -> None:
    installed = accept(ca, build_crl(ca, number=5)).installed
    err = refused(ca, build_crl(ca, number=3), "crl_rollback", installed=installed)
    assert "new CRL number 3 must be >= installed 5" in str(err)


def test_the_same_crl_again_is_a_no_op(ca: IssuingCA) -> None:
    der = build_crl(ca, number=5)
    installed = accept(ca, der).installed
    update = accept(ca, der, installed)
    assert not update.changed
    assert update.installed == installed
    assert update.revoked is None


def test_other_crl_with_the_installed_number_is_equivocation(ca: IssuingCA) -> None:
    installed = accept(ca, build_crl(ca, number=5, serials=(1, 2))).installed
    # Same number, one serial fewer: swapping it in would un-revoke serial 2.
    err = refused(ca, build_crl(ca, number=5, serials=(1,)), "crl_equivocation", installed=installed)
    assert "CRL number 5" in str(err) and "other content" in str(err)
    assert "crl_equivocation" in REASONS


def test_newer_crl_number_replaces(ca: IssuingCA) -> None:
    installed = accept(ca, build_crl(ca, number=5)).installed
    update = accept(ca, build_crl(ca, number=6, serials=(1, 2, 3)), installed)
    assert update.changed and update.previous_number == 5 and update.installed.count == 3


def test_installed_by_issuer_mapping_picks_the_right_record(ca: IssuingCA) -> None:
    installed = accept(ca, build_crl(ca, number=5)).installed
    other = InstalledCrl("CN=Someone Else", 99, NOW, NOW + timedelta(days=1), "00", 0)
    with pytest.raises(CredentialError, match="must be >= installed 5"):
        accept_crl(build_crl(ca, number=4), issuers=[ca.cert], now=NOW,
                   installed={installed.issuer: installed, other.issuer: other})
    with pytest.raises(ValueError, match="installed CRL is for"):
        accept(ca, build_crl(ca, number=4), other)


def test_expired_but_newer_crl_is_accepted_and_judged_stale(ca: IssuingCA) -> None:
    update = accept(ca, build_crl(ca, this_update=NOW - timedelta(days=9),
                                  next_update=NOW - timedelta(days=2)))
    assert update.changed
    assert evaluate_freshness(update.installed, NOW).state == "stale_past_next_update"


def test_unknown_critical_crl_extension_is_refused(ca: IssuingCA) -> None:
    ext = x509.UnrecognizedExtension(UNKNOWN_OID, b"\x05\x00")
    err = refused(ca, build_crl(ca, extensions=[(ext, True)]), "crl_unknown_critical_extension")
    assert UNKNOWN_OID.dotted_string in str(err)
    assert accept(ca, build_crl(ca, extensions=[(ext, False)])).changed  # non-critical: ignored


def test_unknown_critical_entry_extension_is_refused(ca: IssuingCA) -> None:
    ext = x509.UnrecognizedExtension(UNKNOWN_OID, b"\x05\x00")
    err = refused(ca, build_crl(ca, entry_extensions=[(ext, True)]), "crl_unknown_critical_extension")
    assert "1.3.6.1.4.1.55555.1" in str(err)
    assert accept(ca, build_crl(ca, entry_extensions=[(ext, False)])).changed


def test_known_entry_extensions_are_fine(ca: IssuingCA) -> None:
    exts = [(x509.CRLReason(x509.ReasonFlags.key_compromise), False),
            (x509.InvalidityDate(NOW.replace(tzinfo=None)), False)]
    assert accept(ca, build_crl(ca, entry_extensions=exts)).changed


def test_delta_crl_is_unsupported(ca: IssuingCA) -> None:
    refused(ca, build_crl(ca, extensions=[(x509.DeltaCRLIndicator(3), True)]), "crl_unsupported_scope")


def test_indirect_crl_entry_is_unsupported(ca: IssuingCA) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "X")])
    other = x509.CertificateIssuer([x509.DirectoryName(name)])
    refused(ca, build_crl(ca, entry_extensions=[(other, True)]), "crl_unsupported_scope")


@pytest.mark.parametrize(("idp", "ok"), [
    (x509.IssuingDistributionPoint(None, None, True, False, None, False, False), True),
    (x509.IssuingDistributionPoint(None, None, False, True, None, False, False), False),
    (x509.IssuingDistributionPoint(None, None, False, False,
                                   frozenset({x509.ReasonFlags.key_compromise}), False, False), False),
    (x509.IssuingDistributionPoint(None, None, False, False, None, True, False), False),
    (x509.IssuingDistributionPoint([x509.UniformResourceIdentifier("http://x/1.crl")], None,
                                   False, False, None, False, False), False),
])
def test_issuing_distribution_point_scope(ca: IssuingCA, idp: x509.IssuingDistributionPoint,
                                          ok: bool) -> None:
    der = build_crl(ca, extensions=[(idp, True)])
    if ok:
        assert accept(ca, der).changed
    else:
        refused(ca, der, "crl_unsupported_scope")


_FUZZ: dict[str, bytes] = {}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_crls_only_ever_raise_credential_error(ca: IssuingCA, data: st.DataObject) -> None:
    # ECDSA signatures vary in length: build once so hypothesis sees the same input each run
    der = bytearray(_FUZZ.setdefault("crl", build_crl(ca, serials=(1, 2, 3))))
    for _ in range(data.draw(st.integers(1, 4))):
        der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(der)))
    try:
        update = accept(ca, bytes(der[:cut]))
    except CredentialError as exc:
        assert exc.reason in REASONS
    else:  # only a change the signature does not cover (the signature encoding itself) can pass
        assert update.installed.crl_number == 7


# --------------------------------------------------------------------------- bundle, state


def test_bundle_of_two_pem_crls_splits(ca: IssuingCA) -> None:
    other = new_root("Other CA", NOW)
    a, b = build_crl(ca), build_crl(other)
    assert split_crl_bundle(crl_pem(a) + b"\n" + crl_pem(b)) == (a, b)
    assert split_crl_bundle(a) == (a,)
    with pytest.raises(CredentialError):
        accept(ca, crl_pem(a) + crl_pem(b))  # accept takes exactly one


def test_installed_crl_json_round_trip(ca: IssuingCA) -> None:
    record = accept(ca, build_crl(ca)).installed
    assert InstalledCrl.from_json(record.to_json()) == record
    with pytest.raises(ValueError, match="must be integers"):
        InstalledCrl.from_json({**record.to_json(), "crl_number": "7"})
    with pytest.raises(ValueError, match="malformed"):
        InstalledCrl.from_json({"crl_number": 1, "count": 0})


# --------------------------------------------------------------------------- index


def test_index_answers_for_a_device_cert_info(ca: IssuingCA) -> None:
    revoked_dev = issue_leaf(ca, identity="pump-17", now=NOW)
    good_dev = issue_leaf(ca, identity="pump-18", now=NOW)
    crl = build_crl(ca, serials=(revoked_dev.cert.serial_number,))
    index = RevocationIndex().with_update(accept(ca, crl))
    policy = IdentityPolicy()
    bad = describe_certificate(revoked_dev.cert.public_bytes(serialization.Encoding.DER), policy)
    good = describe_certificate(good_dev.cert.public_bytes(serialization.Encoding.DER), policy)
    assert bad.issuer == issuer_key(ca.cert.subject)
    assert index.covers(bad.issuer)
    assert index.is_revoked(bad.issuer, bad.serial)
    assert not index.is_revoked(good.issuer, good.serial)
    assert not index.is_revoked("CN=Other", bad.serial)
    assert not index.covers("CN=Other")


def test_index_updates_build_new_objects(ca: IssuingCA) -> None:
    first = accept(ca, build_crl(ca, number=1, serials=(5,)))
    index1 = RevocationIndex.from_updates([first])
    second = accept(ca, build_crl(ca, number=2, serials=(6,)), first.installed)
    index2 = index1.with_update(second)
    key = first.issuer
    assert index1.is_revoked(key, 5) and not index1.is_revoked(key, 6)
    assert index2.is_revoked(key, 6) and not index2.is_revoked(key, 5)
    assert index2.installed[key].crl_number == 2
    same = accept(ca, second.der, second.installed)
    assert index2.with_update(same) is index2
    with pytest.raises(ValueError, match="accept with installed=None"):
        RevocationIndex().with_update(same)


def test_revoked_serials_behaves_as_a_set() -> None:
    serials = RevokedSerials([1, 2, 2**100, -3])
    assert len(serials) == 4 and 2**100 in serials and -3 in serials and 4 not in serials
    assert "1" not in serials
    assert set(serials) == {1, 2, 2**100, -3}


def test_lookup_is_fast() -> None:
    index = RevocationIndex({"CN=CA": RevokedSerials(range(0, 2_000_000, 2))})
    n = 200_000
    probe = index.is_revoked
    start = time.perf_counter()
    for serial in range(n):
        probe("CN=CA", serial)
    per_op = (time.perf_counter() - start) / n
    assert per_op < 5e-6, f"{per_op * 1e9:.0f} ns per lookup"


# --------------------------------------------------------------------------- staleness


def _record(this_update: datetime, next_update: datetime) -> InstalledCrl:
    return InstalledCrl("CN=CA", 1, this_update, next_update, "00" * 32, 0)


def test_freshness_states_over_time() -> None:
    clock = ManualClock(NOW)
    record = _record(NOW, NOW + timedelta(hours=20))
    policy = StalenessPolicy(max_age=timedelta(hours=24))
    assert policy.evaluate(record, clock.now()).state == "fresh"
    clock.advance(timedelta(hours=14, minutes=59))
    assert policy.evaluate(record, clock.now()).state == "fresh"
    clock.advance(timedelta(minutes=1))  # 75 % of 20 h
    verdict = policy.evaluate(record, clock.now())
    assert verdict.state == "expiring" and verdict.alarm and verdict.admit
    assert verdict.expires_in == timedelta(hours=5)
    clock.advance(timedelta(hours=5))
    assert policy.evaluate(record, clock.now()).state == "stale_past_next_update"


def test_too_old_even_with_long_validity() -> None:
    record = _record(NOW, NOW + timedelta(days=30))
    verdict = evaluate_freshness(record, NOW + timedelta(hours=25))
    assert verdict.state == "stale_too_old" and verdict.alarm


def test_default_policy_is_fail_open_with_alarm() -> None:
    assert StalenessPolicy().mode == "fail_open_alarm"
    stale = evaluate_freshness(_record(NOW, NOW + timedelta(hours=1)), NOW + timedelta(hours=2))
    assert stale.admit and stale.alarm
    missing = evaluate_freshness(None, NOW)
    assert missing.state == "missing" and missing.admit and missing.alarm


def test_fail_closed_refuses_when_stale_or_missing() -> None:
    policy = StalenessPolicy(mode="fail_closed")
    record = _record(NOW, NOW + timedelta(hours=1))
    assert policy.evaluate(record, NOW).admit
    assert not policy.evaluate(record, NOW + timedelta(hours=2)).admit
    assert not policy.evaluate(_record(NOW, NOW + timedelta(days=9)), NOW + timedelta(days=2)).admit
    assert not policy.evaluate(None, NOW).admit


def test_policy_validates_itself() -> None:
    with pytest.raises(ConfigError):
        StalenessPolicy(mode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        StalenessPolicy(warn_fraction=1.5)
    with pytest.raises(ConfigError):
        StalenessPolicy(max_age=timedelta(0))


# --------------------------------------------------------------------------- an outside producer: openssl


def _openssl_ca(tmp_path: Path, ca: IssuingCA, lines: Sequence[str], number_hex: str = "2A") -> Path:
    (tmp_path / "ca.crt").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.key").write_bytes(ca.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "index.txt").write_text("".join(line + "\n" for line in lines))
    (tmp_path / "index.txt.attr").write_text("unique_subject = no\n")
    (tmp_path / "crlnumber").write_text(number_hex + "\n")
    cnf = tmp_path / "ca.cnf"
    cnf.write_text(f"""
[ ca ]
default_ca = dev
[ dev ]
database = {tmp_path}/index.txt
certificate = {tmp_path}/ca.crt
private_key = {tmp_path}/ca.key
crlnumber = {tmp_path}/crlnumber
default_md = sha256
default_crl_days = 7
crl_extensions = crl_ext
[ crl_ext ]
authorityKeyIdentifier = keyid:always
""")
    return cnf


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


@needs_openssl
def test_openssl_generated_crl_pem_and_der(tmp_path: Path) -> None:
    now = datetime.now(UTC)  # openssl stamps the real time
    yesterday = now - timedelta(days=1)
    ca = new_intermediate(new_root("OpenSSL Root", yesterday), "OpenSSL Issuing", yesterday)
    cnf = _openssl_ca(tmp_path, ca, [
        "R\t300101000000Z\t250101000000Z,keyCompromise\t0ABCDEF0\tunknown\t/CN=stolen",
        "V\t300101000000Z\t\t0ABCDEF1\tunknown\t/CN=fine",
        "R\t300101000000Z\t250102000000Z\t0ABCDEF2\tunknown\t/CN=retired",
    ])
    pem_path, der_path = tmp_path / "crl.pem", tmp_path / "crl.der"
    subprocess.run(["openssl", "ca", "-gencrl", "-batch", "-config", str(cnf), "-out", str(pem_path)],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "crl", "-in", str(pem_path), "-outform", "DER", "-out", str(der_path)],
                   check=True, capture_output=True)
    by_pem = accept_crl(pem_path.read_bytes(), issuers=[ca.cert], installed=None, now=now)
    by_der = accept_crl(der_path.read_bytes(), issuers=[ca.cert], installed=None, now=now)
    assert by_pem.installed == by_der.installed
    assert by_der.installed.crl_number == 0x2A
    assert by_der.revoked is not None and set(by_der.revoked) == {0x0ABCDEF0, 0x0ABCDEF2}
    # and back: our PEM of the DER is what openssl reads
    round_trip = tmp_path / "ours.pem"
    round_trip.write_bytes(crl_pem(der_path.read_bytes()))
    out = subprocess.run(["openssl", "crl", "-in", str(round_trip), "-noout", "-crlnumber"],
                         check=True, capture_output=True, text=True)
    assert "2A" in out.stdout
    # the next openssl CRL (number 0x2B) replaces; the old one is then a rollback
    subprocess.run(["openssl", "ca", "-gencrl", "-batch", "-config", str(cnf), "-out", str(pem_path)],
                   check=True, capture_output=True)
    newer = accept_crl(pem_path.read_bytes(), issuers=[ca.cert], installed=by_der.installed, now=now)
    assert newer.changed and newer.installed.crl_number == 0x2B
    with pytest.raises(CredentialError) as info:
        accept_crl(der_path.read_bytes(), issuers=[ca.cert], installed=newer.installed, now=now)
    assert info.value.reason == "crl_rollback"
    assert "new CRL number 42 must be >= installed 43" in str(info.value)


@needs_openssl
def test_openssl_crl_without_number_is_refused(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    ca = new_root("OpenSSL NoNumber", now - timedelta(days=1))
    cnf = _openssl_ca(tmp_path, ca, ["R\t300101000000Z\t250101000000Z\t01\tunknown\t/CN=x"])
    cnf.write_text(cnf.read_text().replace(f"crlnumber = {tmp_path}/crlnumber\n", ""))
    out = tmp_path / "crl.pem"
    subprocess.run(["openssl", "ca", "-gencrl", "-batch", "-config", str(cnf), "-out", str(out)],
                   check=True, capture_output=True)
    with pytest.raises(CredentialError) as info:
        accept_crl(out.read_bytes(), issuers=[ca.cert], installed=None, now=now)
    assert info.value.reason == "crl_no_number"
