"""Validation core: request parsing, the decision, signing and the device's verification.

Every reason code of the three sets is produced here at least once (the last test checks
that), and hypothesis shows that no bytes crash ``parse_request`` and no bytes verify.
"""

from __future__ import annotations

import base64
import importlib.util
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_core.revocation import RevocationIndex, StalenessPolicy, accept_crl
from edge_core.validation import (
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
    REQUEST_REASONS,
    RESPONSE_REASONS,
    TYP,
    UNKNOWN_REASONS,
    Answer,
    IssuerSet,
    RequestRefused,
    ResponseRefused,
    ValidationRequest,
    decide,
    device_from_request_topic,
    encode_request,
    gateway_key_id,
    issuer_hash,
    issuer_hash_of_certificate,
    load_gateway_public_key,
    new_nonce,
    parse_request,
    refusal_answer,
    request_topic,
    response_topic,
    sign_answer,
    verify_response,
)
from gateway_agent.pki import IssuingCA, issue_leaf, new_intermediate, new_key, new_root

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
NONCE = "q1Xr0b8HgC6kYV2mP3tJzA"
DEVICE = "pump-17"
GATEWAY = "gateway-agent"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
SEEN: dict[str, set[str]] = {"request": set(), "unknown": set(), "response": set()}


# --------------------------------------------------------------------------- fixtures


class World:
    """One issuing CA with a good and a revoked device certificate and a CRL of it."""

    def __init__(self) -> None:
        root = new_root("Validation Root", NOW - timedelta(days=1))
        self.root = root
        self.ca = new_intermediate(root, "Validation Issuing", NOW - timedelta(days=1))
        self.good = issue_leaf(self.ca, identity="good-1", now=NOW).cert
        self.revoked = issue_leaf(self.ca, identity="revoked-1", now=NOW).cert
        self.crl_der = self.crl([self.revoked.serial_number], this_update=NOW - timedelta(minutes=5))
        update = accept_crl(self.crl_der, issuers=[self.ca.cert], installed=None, now=NOW)
        self.index = RevocationIndex.from_updates([update])
        self.issuers = IssuerSet.from_certificates([self.ca.cert])
        self.key = new_key()
        self.other_key = new_key()

    def crl(self, serials: list[int], *, this_update: datetime, number: int = 1,
            validity: timedelta = timedelta(days=7)) -> bytes:
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.ca.cert.subject)
                   .last_update(this_update).next_update(this_update + validity)
                   .add_extension(x509.CRLNumber(number), critical=False))
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(this_update).build())
        return builder.sign(self.ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    @property
    def hash(self) -> str:
        return issuer_hash(self.ca.cert.subject)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def refused_request(payload: bytes | dict[str, Any]) -> RequestRefused:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    with pytest.raises(RequestRefused) as info:
        parse_request(raw)
    assert info.value.reason in REQUEST_REASONS
    SEEN["request"].add(info.value.reason)
    return info.value


def answer_for(world: World, request: ValidationRequest, *, index: RevocationIndex | None = None,
               issuers: IssuerSet | None = None, now: datetime = NOW,
               staleness: StalenessPolicy | None = None) -> Answer:
    answer = decide(request, device=DEVICE, gateway=GATEWAY, index=index or world.index,
                    issuers=issuers or world.issuers, now=now, staleness=staleness)
    if answer.reason is not None:
        assert answer.reason in UNKNOWN_REASONS
        SEEN["unknown"].add(answer.reason)
    return answer


def cert_request(cert: x509.Certificate | bytes) -> ValidationRequest:
    raw = cert if isinstance(cert, bytes) else der(cert)
    return parse_request(encode_request(NONCE, cert_der=raw))


def hash_request(hash_hex: str, serial: int) -> ValidationRequest:
    return parse_request(encode_request(NONCE, issuer_hash=hash_hex, serial=serial))


# --------------------------------------------------------------------------- names and topics


def test_issuer_hash_is_sha256_of_the_issuer_field_and_matches_the_ca_subject(world: World) -> None:
    import hashlib

    raw = der(world.good)
    expected = hashlib.sha256(world.ca.cert.subject.public_bytes()).hexdigest()
    assert issuer_hash_of_certificate(raw) == world.hash == expected
    assert set(world.issuers.by_hash) == {world.hash}


def test_issuer_hash_of_garbage_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"truncated|length|SEQUENCE"):
        issuer_hash_of_certificate(b"\x30\x03\x02\x01")


def test_topics_and_device_from_topic() -> None:
    assert request_topic("pump-17") == "gateway/validation/pump-17/request"
    assert response_topic("pump-17") == "gateway/validation/pump-17/response"
    assert device_from_request_topic("gateway/validation/pump-17/request") == "pump-17"
    for topic in ("gateway/validation/pump-17/response", "gateway/validation/request",
                  "gateway/validation/a/b/request", "gateway/validation/+/request",
                  "gateway/validation//request", "other/validation/pump-17/request"):
        with pytest.raises(RequestRefused) as info:
            device_from_request_topic(topic)
        assert info.value.reason == "bad_topic"
        SEEN["request"].add("bad_topic")


def test_new_nonce_is_fresh_and_well_formed() -> None:
    nonces = {new_nonce() for _ in range(100)}
    assert len(nonces) == 100
    assert all(len(n) == 22 for n in nonces)


def test_gateway_key_id_and_public_key_loading(world: World) -> None:
    pem = world.key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    loaded = load_gateway_public_key(pem)
    assert gateway_key_id(loaded) == gateway_key_id(world.key.public_key())
    assert len(gateway_key_id(loaded)) == 16
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ValueError, match="P-256"):
        load_gateway_public_key(p384)
    with pytest.raises(ValueError, match="not a PEM public key"):
        load_gateway_public_key(b"nope")


# --------------------------------------------------------------------------- requests


def test_encode_and_parse_both_forms(world: World) -> None:
    by_cert = cert_request(world.good)
    assert by_cert.issuer_hash == world.hash and by_cert.serial == world.good.serial_number
    assert by_cert.cert == world.good and by_cert.nonce == NONCE
    by_hash = hash_request(world.hash, 0x4F1C)
    assert by_hash == ValidationRequest(NONCE, world.hash, 0x4F1C)
    assert encode_request(NONCE, issuer_hash=world.hash, serial=0x4F1C) == (
        b'{"v":1,"nonce":"q1Xr0b8HgC6kYV2mP3tJzA","issuer_hash":"' + world.hash.encode() + b'","serial":"4f1c"}')


@pytest.mark.parametrize("kwargs", [
    {"cert_der": b"x", "serial": 1},
    {"issuer_hash": "ab" * 32},
    {"issuer_hash": "AB" * 32, "serial": 1},
    {"issuer_hash": "ab" * 32, "serial": 0},
])
def test_encode_request_refuses_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        encode_request(NONCE, **kwargs)
    with pytest.raises(ValueError, match="nonce"):
        encode_request("short", issuer_hash="ab" * 32, serial=1)


def pair(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 1, "nonce": NONCE, "issuer_hash": "ab" * 32, "serial": "4f1c"}
    body.update(over)
    return {k: v for k, v in body.items() if v is not ...}


def test_oversized_request_is_refused_before_parsing() -> None:
    error = refused_request(b" " * (MAX_REQUEST_BYTES + 1))
    assert error.reason == "oversized" and not error.answerable


@pytest.mark.parametrize("payload", [
    b"", b"\xff\xfe", b"not json", b"[1,2]", b'"str"', b"null",
    b'{"v":1,"v":1,"nonce":"q1Xr0b8HgC6kYV2mP3tJzA"}',  # duplicate key
    b'{"v":NaN,"nonce":"q1Xr0b8HgC6kYV2mP3tJzA"}',
    b"[" * 4000,  # deeper than the recursion limit, under the size cap
])
def test_not_a_json_object_is_bad_request(payload: bytes) -> None:
    error = refused_request(payload)
    assert error.reason == "bad_request" and error.nonce is None and not error.answerable


@pytest.mark.parametrize("nonce", [..., None, 12, "", "short", "a" * 15, "a" * 65, "q1Xr0b8HgC6kYV2mP3tJz=",
                                   "q1Xr0b8HgC6kYV2mP3tJ+A", "q1Xr0b8HgC6kYV2mP3tJ A", "ß" * 20])
def test_bad_nonce_is_not_answerable(nonce: Any) -> None:
    error = refused_request(pair(nonce=nonce))
    assert error.reason == "bad_nonce" and not error.answerable


@pytest.mark.parametrize("version", [..., 2, 0, "1", True, 1.0, None])
def test_bad_version(version: Any) -> None:
    error = refused_request(pair(v=version))
    assert error.reason == "bad_version" and error.nonce == NONCE and error.answerable


@pytest.mark.parametrize("body", [
    pair(extra=1),
    pair(cert="AAAA"),                    # both forms
    pair(issuer_hash=..., serial=...),    # neither
    pair(serial=...),
    pair(issuer_hash=...),
])
def test_wrong_field_set_is_bad_request_but_answerable(body: dict[str, Any]) -> None:
    error = refused_request(body)
    assert error.reason == "bad_request" and error.answerable


@pytest.mark.parametrize("value", ["AB" * 32, "ab" * 31, "ab" * 33, "zz" * 32, 5, None])
def test_bad_issuer_hash(value: Any) -> None:
    assert refused_request(pair(issuer_hash=value)).reason == "bad_issuer_hash"


@pytest.mark.parametrize("value", ["0", "04f1c", "4F1C", "0x4f1c", "-1", "f" * 41, "", 20252, None, "4f 1c"])
def test_bad_serial(value: Any) -> None:
    assert refused_request(pair(serial=value)).reason == "bad_serial"


def test_serial_of_forty_hex_digits_is_accepted() -> None:
    assert parse_request(json.dumps(pair(serial="f" * 40)).encode()).serial == int("f" * 40, 16)


@pytest.mark.parametrize("value", [
    5, "", "not base64!", "AAAA\n", "AAA=", "YQ", base64.b64encode(b"not a certificate").decode(),
    base64.b64encode(b"\x30\x03\x02\x01\x01").decode(),
])
def test_bad_cert(value: Any) -> None:
    body = {"v": 1, "nonce": NONCE, "cert": value}
    error = refused_request(body)
    assert error.reason == "bad_cert" and error.answerable


def test_urlsafe_or_unpadded_cert_encoding_is_bad_cert(world: World) -> None:
    std = base64.b64encode(der(world.good)).decode()
    for variant in (base64.urlsafe_b64encode(der(world.good)).decode(), std.rstrip("=") or std[:-1]):
        if variant != std:
            assert refused_request({"v": 1, "nonce": NONCE, "cert": variant}).reason == "bad_cert"


def test_refusal_answer_only_for_answerable_refusals() -> None:
    answerable = RequestRefused("bad_cert", "x", nonce=NONCE)
    answer = refusal_answer(answerable, device=DEVICE, gateway=GATEWAY, now=NOW)
    assert answer is not None and answer.status == "unknown" and answer.reason == "bad_cert"
    assert answer.issuer_hash is None and answer.serial is None and answer.this_update is None
    assert refusal_answer(RequestRefused("bad_nonce", "x"), device=DEVICE, gateway=GATEWAY, now=NOW) is None
    assert refusal_answer(RequestRefused("oversized", "x", nonce=NONCE), device=DEVICE, gateway=GATEWAY,
                          now=NOW) is None


# --------------------------------------------------------------------------- decide


def test_good_and_revoked_by_certificate(world: World) -> None:
    good = answer_for(world, cert_request(world.good))
    assert (good.status, good.reason, good.serial, good.issuer_hash) == ("good", None, world.good.serial_number,
                                                                         world.hash)
    assert good.this_update == NOW - timedelta(minutes=5) and good.crl_number == 1
    assert good.next_update == NOW - timedelta(minutes=5) + timedelta(days=7)
    assert (good.nonce, good.device, good.gateway, good.issued_at) == (NONCE, DEVICE, GATEWAY, NOW)
    assert answer_for(world, cert_request(world.revoked)).status == "revoked"


def test_good_and_revoked_by_hash_and_serial(world: World) -> None:
    assert answer_for(world, hash_request(world.hash, world.good.serial_number)).status == "good"
    assert answer_for(world, hash_request(world.hash, world.revoked.serial_number)).status == "revoked"


def test_unknown_issuer_by_hash_and_by_foreign_certificate(world: World) -> None:
    assert answer_for(world, hash_request("ab" * 32, 5)).reason == "unknown_issuer"
    rogue = new_intermediate(new_root("Rogue Root", NOW), "Rogue Issuing", NOW)
    foreign = issue_leaf(rogue, identity="pump-17", now=NOW).cert
    answer = answer_for(world, cert_request(foreign))
    assert (answer.status, answer.reason) == ("unknown", "unknown_issuer")


def test_empty_issuer_set_knows_nobody(world: World) -> None:
    answer = answer_for(world, cert_request(world.good), issuers=IssuerSet())
    assert (answer.status, answer.reason) == ("unknown", "unknown_issuer")


def test_forged_certificate_with_a_real_serial_is_not_good(world: World) -> None:
    """Same issuer name, same serial as a good certificate, signed by another key."""
    forger = IssuingCA(world.ca.cert, new_key())
    forged = issue_leaf(forger, identity="good-1", now=NOW, serial=world.good.serial_number).cert
    assert forged.issuer == world.good.issuer and forged.serial_number == world.good.serial_number
    answer = answer_for(world, cert_request(forged))
    assert (answer.status, answer.reason) == ("unknown", "chain_invalid")
    # The hash form cannot prove possession of anything: it answers for the serial.
    assert answer_for(world, hash_request(world.hash, forged.serial_number)).status == "good"


def test_expired_and_not_yet_valid_certificates_are_unknown(world: World) -> None:
    expired = issue_leaf(world.ca, identity="old", now=NOW, not_before=NOW - timedelta(days=40),
                         lifetime=timedelta(days=30)).cert
    future = issue_leaf(world.ca, identity="new", now=NOW, not_before=NOW + timedelta(days=2)).cert
    assert answer_for(world, cert_request(expired)).reason == "cert_expired"
    assert answer_for(world, cert_request(future)).reason == "cert_not_yet_valid"


def test_no_crl_installed_is_unknown(world: World) -> None:
    answer = answer_for(world, cert_request(world.good), index=RevocationIndex())
    assert (answer.status, answer.reason, answer.this_update) == ("unknown", "no_crl", None)


def test_stale_crl_fail_closed_is_unknown_fail_open_is_answered(world: World) -> None:
    later = NOW + timedelta(days=8)  # past nextUpdate
    good_req = cert_request(world.good)
    closed = StalenessPolicy(mode="fail_closed")
    stale = answer_for(world, good_req, now=later, staleness=closed)
    assert (stale.status, stale.reason, stale.crl_number) == ("unknown", "crl_stale", 1)
    assert stale.this_update == NOW - timedelta(minutes=5)  # the device sees which CRL was too old
    # a CRL past max_age but before nextUpdate is stale too
    assert answer_for(world, good_req, now=NOW + timedelta(hours=25), staleness=closed).reason == "crl_stale"
    # a revocation is permanent: even a stale CRL proves it
    assert answer_for(world, cert_request(world.revoked), now=later, staleness=closed).status == "revoked"
    # fail_open_alarm (the default) answers from the last good CRL; this_update shows its age
    assert answer_for(world, good_req, now=later).status == "good"


def test_rekeyed_ca_with_the_same_name_is_found(world: World) -> None:
    second = IssuingCA(world.ca.cert, new_key())  # same subject, new key
    rekeyed_cert = x509.CertificateBuilder().subject_name(world.ca.cert.subject).issuer_name(
        world.ca.cert.issuer).public_key(second.key.public_key()).serial_number(7).not_valid_before(
        NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=100)).add_extension(
        x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(new_key(), hashes.SHA256())
    issuers = IssuerSet.from_certificates([world.ca.cert, rekeyed_cert])
    leaf = issue_leaf(IssuingCA(rekeyed_cert, second.key), identity="x", now=NOW).cert
    assert answer_for(world, cert_request(leaf), issuers=issuers).status == "good"


def test_answer_invariants() -> None:
    with pytest.raises(ValueError, match="reason"):
        Answer("good", "no_crl", NONCE, DEVICE, GATEWAY, NOW)
    with pytest.raises(ValueError, match="reason"):
        Answer("unknown", None, NONCE, DEVICE, GATEWAY, NOW)
    with pytest.raises(ValueError, match="names the certificate"):
        Answer("revoked", None, NONCE, DEVICE, GATEWAY, NOW)
    with pytest.raises(ValueError, match="status"):
        Answer("maybe", None, NONCE, DEVICE, GATEWAY, NOW)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- signing and verifying


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any] | bytes, claims: dict[str, Any] | bytes, key: ec.EllipticCurvePrivateKey | None,
          *, signature: bytes | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    c = claims if isinstance(claims, bytes) else json.dumps(claims, separators=(",", ":")).encode()
    signing_input = f"{b64u(h)}.{b64u(c)}".encode()
    if signature is None:
        assert key is not None
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return signing_input + b"." + b64u(signature).encode()


def good_answer(world: World, **over: Any) -> Answer:
    fields: dict[str, Any] = {
        "status": "good", "reason": None, "nonce": NONCE, "device": DEVICE, "gateway": GATEWAY,
        "issued_at": NOW, "issuer_hash": world.hash, "serial": world.good.serial_number,
        "this_update": NOW - timedelta(minutes=5), "next_update": NOW + timedelta(days=7), "crl_number": 1,
    }
    fields.update(over)
    return Answer(**fields)


def header(world: World, key: ec.EllipticCurvePrivateKey | None = None, **over: Any) -> dict[str, Any]:
    h = {"alg": "ES256", "kid": gateway_key_id((key or world.key).public_key()), "typ": TYP}
    h.update(over)
    return {k: v for k, v in h.items() if v is not ...}


def claims_of(world: World, **over: Any) -> dict[str, Any]:
    c = good_answer(world).claims()
    c.update(over)
    return {k: v for k, v in c.items() if v is not ...}


def verify(world: World, token: bytes, **kw: Any) -> Answer:
    args: dict[str, Any] = {"gateway_key": world.key.public_key(), "expected_nonce": NONCE,
                            "expected_device": DEVICE, "now": NOW}
    args.update(kw)
    return verify_response(token, **args)


def refused(world: World, token: bytes, reason: str, **kw: Any) -> ResponseRefused:
    with pytest.raises(ResponseRefused) as info:
        verify(world, token, **kw)
    assert info.value.reason == reason, str(info.value)
    SEEN["response"].add(reason)
    return info.value


@pytest.mark.parametrize("status", ["good", "revoked", "unknown"])
def test_sign_then_verify_round_trips(world: World, status: str) -> None:
    answer = good_answer(world, status=status, reason="crl_stale" if status == "unknown" else None)
    token = sign_answer(answer, world.key)
    assert token.isascii() and b"\n" not in token and len(token) < MAX_RESPONSE_BYTES
    assert verify(world, token) == answer
    head = json.loads(base64.urlsafe_b64decode(token.split(b".")[0] + b"=="))
    assert head == {"alg": "ES256", "kid": gateway_key_id(world.key.public_key()), "typ": "edge-validation+jwt"}


def test_signing_is_deterministic_and_needs_p256(world: World) -> None:
    assert sign_answer(good_answer(world), world.key) == sign_answer(good_answer(world), world.key)
    with pytest.raises(TypeError, match="P-256"):
        sign_answer(good_answer(world), ec.generate_private_key(ec.SECP384R1()))


def test_unknown_answer_without_subject_verifies(world: World) -> None:
    answer = Answer("unknown", "bad_cert", NONCE, DEVICE, GATEWAY, NOW)
    assert verify(world, sign_answer(answer, world.key), expected_serial=5, expected_issuer_hash="ab" * 32) == answer


def test_a_key_rotation_accepts_either_key(world: World) -> None:
    token = sign_answer(good_answer(world), world.other_key)
    assert verify(world, token, gateway_key=[world.key.public_key(), world.other_key.public_key()]).good


def test_malleated_signature_still_verifies_same_content(world: World) -> None:
    """(r, n - s) is valid ECDSA; harmless here because the nonce binds the answer to one request."""
    token = sign_answer(good_answer(world), world.key)
    head, body, sig = token.split(b".")
    raw = base64.urlsafe_b64decode(sig + b"==")
    s = int.from_bytes(raw[32:], "big")
    flipped = head + b"." + body + b"." + b64u(raw[:32] + (P256_ORDER - s).to_bytes(32, "big")).encode()
    assert verify(world, flipped) == good_answer(world)


def test_oversized_and_non_bytes(world: World) -> None:
    refused(world, b"a" * (MAX_RESPONSE_BYTES + 1), "oversized")
    refused(world, "a.b.c", "malformed")  # type: ignore[arg-type]


@pytest.mark.parametrize("mangle", [
    lambda t: t.rsplit(b".", 1)[0],                      # two parts
    lambda t: t + b".x",                                 # four parts
    lambda t: t.replace(b".", b"=.", 1),                 # padding
    lambda t: b"!" + t,                                  # not base64url
    lambda t: t.replace(b".", b"\xc3\xa9.", 1),           # not ASCII
])
def test_malformed_tokens(world: World, mangle: Callable[[bytes], bytes]) -> None:
    refused(world, mangle(sign_answer(good_answer(world), world.key)), "malformed")


@pytest.mark.parametrize(("h", "c"), [
    (b"not json", None), (b"[1]", None), (b'{"alg":"ES256","alg":"ES256"}', None),
    (None, b"[]"), (None, b'{"v":NaN}'), (None, b'{"v":1,"v":1}'), (None, b"\xff"),
])
def test_malformed_json_parts(world: World, h: bytes | None, c: bytes | None) -> None:
    refused(world, forge(h or header(world), c or claims_of(world), world.key), "malformed")


def test_non_canonical_base64_is_malformed(world: World) -> None:
    token = sign_answer(good_answer(world), world.key)
    head, body, sig = token.split(b".")
    last = sig[-1:]
    # the 64-byte signature is 86 chars: the last char carries 2 unused bits
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = alphabet[alphabet.index(last) ^ 1 : (alphabet.index(last) ^ 1) + 1]
    refused(world, head + b"." + body + b"." + sig[:-1] + twin, "malformed")


@pytest.mark.parametrize("alg", ["none", "HS256", "ES384", "es256", "RS256", "EdDSA", None, ...])
def test_bad_algorithm_before_any_key(world: World, alg: Any) -> None:
    refused(world, forge(header(world, alg=alg), claims_of(world), None, signature=b""), "bad_algorithm")


def test_alg_none_with_empty_signature_is_refused(world: World) -> None:
    head = b64u(b'{"alg":"none","typ":"edge-validation+jwt"}')
    token = head + "." + b64u(json.dumps(claims_of(world)).encode()) + "."
    refused(world, token.encode(), "bad_algorithm")


@pytest.mark.parametrize("over", [
    {"typ": "edge-cmd+jwt"}, {"typ": ...}, {"kid": ...}, {"kid": "gateway-agent"}, {"kid": 5},
    {"jwk": {"kty": "EC"}}, {"crit": ["b64"]}, {"x5c": []},
])
def test_bad_header(world: World, over: dict[str, Any]) -> None:
    refused(world, forge(header(world, **over), claims_of(world), world.key), "bad_header")


def test_signed_by_another_key_is_unknown_key_or_bad_signature(world: World) -> None:
    refused(world, sign_answer(good_answer(world), world.other_key), "unknown_key")
    # the attacker copies our kid: the signature still does not verify
    refused(world, forge(header(world), claims_of(world), world.other_key), "bad_signature")


def test_tampered_payload_is_bad_signature(world: World) -> None:
    token = sign_answer(good_answer(world, status="revoked"), world.key)
    head, _, sig = token.split(b".")
    body = b64u(json.dumps(claims_of(world)).encode()).encode()  # status flipped to good
    refused(world, head + b"." + body + b"." + sig, "bad_signature")


def test_signature_shapes(world: World) -> None:
    token = sign_answer(good_answer(world), world.key)
    head, body, sig = token.split(b".")
    raw = base64.urlsafe_b64decode(sig + b"==")
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    for bad_sig in (encode_dss_signature(r, s), raw[:63], b"", bytes(64),
                    raw[:32] + P256_ORDER.to_bytes(32, "big")):
        refused(world, head + b"." + body + b"." + b64u(bad_sig).encode(), "bad_signature")


@pytest.mark.parametrize("over", [
    {"v": ...}, {"v": 2}, {"v": True}, {"extra": 1}, {"status": "maybe"}, {"status": "GOOD"},
    {"reason": "crl_stale"}, {"status": "unknown", "reason": None}, {"status": "unknown", "reason": "Bad Reason"},
    {"iat": 1.5}, {"iat": True}, {"iat": None}, {"iat": 0}, {"iat": "1767268800"},
    {"this_update": None}, {"crl_number": -1}, {"crl_number": "1"}, {"serial": "0abc"}, {"serial": 5},
    {"issuer_hash": "AB" * 32}, {"gw": ""}, {"aud": 5}, {"nonce": None}, {"next_update": 10**12},
])
def test_bad_claims(world: World, over: dict[str, Any]) -> None:
    refused(world, forge(header(world), claims_of(world, **over), world.key), "bad_claim")


def test_nonce_audience_and_subject_must_be_ours(world: World) -> None:
    token = sign_answer(good_answer(world), world.key)
    refused(world, token, "nonce_mismatch", expected_nonce="A" * 22)
    refused(world, token, "audience_mismatch", expected_device="pump-18")
    refused(world, token, "subject_mismatch", expected_serial=world.good.serial_number + 1)
    refused(world, token, "subject_mismatch", expected_issuer_hash="ab" * 32)
    assert verify(world, token, expected_serial=world.good.serial_number, expected_issuer_hash=world.hash).good


def test_time_edges(world: World) -> None:
    token = sign_answer(good_answer(world), world.key)
    assert verify(world, token, now=NOW + timedelta(seconds=60)).good  # exactly max_age
    refused(world, token, "too_old", now=NOW + timedelta(seconds=61))
    assert verify(world, token, now=NOW - timedelta(seconds=30)).good  # exactly max_skew early
    refused(world, token, "issued_in_future", now=NOW - timedelta(seconds=31))
    assert verify(world, token, now=NOW + timedelta(seconds=200), max_age=timedelta(seconds=200)).good


# --------------------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=MAX_REQUEST_BYTES + 10))
def test_arbitrary_request_bytes_never_crash(payload: bytes) -> None:
    try:
        parse_request(payload)
    except RequestRefused as exc:
        assert exc.reason in REQUEST_REASONS


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "v": _json | st.just(1), "nonce": _json | st.just(NONCE), "cert": _json | st.just("MAA="),
    "issuer_hash": _json | st.just("ab" * 32), "serial": _json | st.just("4f1c"), "x": _json}))
def test_arbitrary_request_objects_never_crash(body: dict[str, Any]) -> None:
    try:
        request = parse_request(json.dumps(body).encode())
    except RequestRefused as exc:
        assert exc.reason in REQUEST_REASONS
        return
    assert request.nonce == NONCE and request.issuer_hash == "ab" * 32


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=MAX_RESPONSE_BYTES + 10))
def test_arbitrary_response_bytes_never_verify(world: World, payload: bytes) -> None:
    with pytest.raises(ResponseRefused) as info:
        verify(world, payload)
    assert info.value.reason in RESPONSE_REASONS


_b64part = st.binary(max_size=200).map(lambda b: base64.urlsafe_b64encode(b).rstrip(b"="))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=_b64part, c=_b64part, s=_b64part)
def test_arbitrary_well_formed_parts_never_verify(world: World, h: bytes, c: bytes, s: bytes) -> None:
    with pytest.raises(ResponseRefused) as info:
        verify(world, h + b"." + c + b"." + s)
    assert info.value.reason in RESPONSE_REASONS


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_byte_change_of_a_valid_token_is_refused(world: World, data: st.DataObject) -> None:
    token = bytearray(sign_answer(good_answer(world), world.key))
    pos = data.draw(st.integers(0, len(token) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != token[pos]))
    token[pos] = value
    with pytest.raises(ResponseRefused):
        verify(world, bytes(token))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=st.sampled_from(["good", "revoked", "unknown"]), serial=st.integers(1, 2**160 - 1),
       iat=st.integers(1, 2**33), nonce=st.from_regex(r"[A-Za-z0-9_-]{16,64}", fullmatch=True))
def test_every_answer_round_trips(world: World, status: str, serial: int, iat: int, nonce: str) -> None:
    when = datetime.fromtimestamp(iat, UTC)
    answer = good_answer(world, status=status, reason="no_crl" if status == "unknown" else None, serial=serial,
                         issued_at=when, nonce=nonce)
    assert verify(world, sign_answer(answer, world.key), now=when, expected_nonce=nonce) == answer


# --------------------------------------------------------------------------- published vectors

VECTORS_DIR = Path(__file__).resolve().parents[1] / "vectors"
VECTORS = json.loads((VECTORS_DIR / "validation_vectors.json").read_text("utf-8"))


def test_vectors_file_is_current() -> None:
    path = VECTORS_DIR / "make_validation_vectors.py"
    spec = importlib.util.spec_from_file_location("make_validation_vectors", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == (VECTORS_DIR / "validation_vectors.json").read_text("utf-8"), (
        "validation_vectors.json is stale: run python tests/vectors/make_validation_vectors.py")


def test_vectors_cover_every_response_reason() -> None:
    assert {c["expect"] for c in VECTORS["cases"]} == {"ok", *RESPONSE_REASONS}


@pytest.mark.parametrize("vector", VECTORS["cases"], ids=[c["name"] for c in VECTORS["cases"]])
def test_response_vector(vector: dict[str, Any]) -> None:
    key = load_gateway_public_key(VECTORS["gateway_key"]["pem"].encode())
    numbers = key.public_numbers()
    assert (f"{numbers.x:064x}", f"{numbers.y:064x}") == (VECTORS["gateway_key"]["x"], VECTORS["gateway_key"]["y"])
    assert gateway_key_id(key) == VECTORS["gateway_key"]["kid"]
    settings_ = VECTORS["verifier"]
    kwargs: dict[str, Any] = {
        "gateway_key": key, "expected_nonce": vector["expected_nonce"], "expected_device": vector["expected_device"],
        "expected_issuer_hash": vector["expected_issuer_hash"], "expected_serial": int(vector["expected_serial"], 16),
        "now": datetime.fromtimestamp(vector["now"], UTC), "max_age": timedelta(seconds=settings_["max_age_seconds"]),
        "max_skew": timedelta(seconds=settings_["max_skew_seconds"]),
    }
    token = vector["token"].encode()
    if vector["expect"] == "ok":
        assert verify_response(token, **kwargs).claims() == vector["claims"]
    else:
        with pytest.raises(ResponseRefused) as info:
            verify_response(token, **kwargs)
        assert info.value.reason == vector["expect"], str(info.value)


def test_certificate_and_request_vectors() -> None:
    cert = VECTORS["certificate"]
    raw = base64.b64decode(cert["der_base64"])
    assert issuer_hash_of_certificate(raw) == cert["issuer_hash"]
    assert f"{x509.load_der_x509_certificate(raw).serial_number:x}" == cert["serial"]
    for vector in VECTORS["requests"]:
        if vector["expect"] == "ok":
            request = parse_request(vector["payload"].encode())
            assert (request.issuer_hash, f"{request.serial:x}") == (vector["issuer_hash"], vector["serial"])
        else:
            with pytest.raises(RequestRefused) as info:
                parse_request(vector["payload"].encode())
            assert info.value.reason == vector["expect"]


# --------------------------------------------------------------------------- coverage of the code sets


# --------------------------------------------------------------------------- the whole path


def _root_crl(world: World, serials: list[int]) -> RevocationIndex:
    builder = (x509.CertificateRevocationListBuilder().issuer_name(world.root.cert.subject)
               .last_update(NOW - timedelta(minutes=5)).next_update(NOW + timedelta(days=7))
               .add_extension(x509.CRLNumber(1), critical=False))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - timedelta(hours=1)).build())
    root_der = builder.sign(world.root.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    update = accept_crl(root_der, issuers=[world.root.cert], installed=None, now=NOW)
    return world.index.with_update(update)


def test_a_revoked_issuing_ca_makes_its_devices_unknown(world: World) -> None:
    """The issuing CA itself is on the root's CRL: nothing it issued is vouched for."""
    issuers = IssuerSet.from_certificates([world.ca.cert, world.root.cert], anchors=[world.root.cert])
    index = _root_crl(world, [world.ca.cert.serial_number])
    for request in (cert_request(world.good), hash_request(world.hash, world.good.serial_number)):
        answer = answer_for(world, request, index=index, issuers=issuers)
        assert (answer.status, answer.reason) == ("unknown", "chain_revoked")
    fine = answer_for(world, cert_request(world.good), index=_root_crl(world, []), issuers=issuers)
    assert fine.status == "good"


def test_an_expired_issuing_ca_is_not_vouched_for(world: World) -> None:
    """The configured CA's own validity counts (PKITS 4.2.5), not only the device's."""
    later = world.ca.cert.not_valid_after_utc + timedelta(days=1)
    issuers = IssuerSet.from_certificates([world.ca.cert], anchors=[world.root.cert])
    answer = answer_for(world, hash_request(world.hash, world.good.serial_number), issuers=issuers, now=later)
    assert answer.status == "unknown" and answer.reason != "cert_expired"


def test_an_issuing_ca_not_signed_by_the_anchor_is_not_vouched_for(world: World) -> None:
    """A configured CA whose signature does not verify under the anchor (PKITS 4.1.2)."""
    impostor_root = new_root("Validation Root", NOW - timedelta(days=1))  # same name, other key
    issuers = IssuerSet.from_certificates([world.ca.cert], anchors=[impostor_root.cert])
    answer = answer_for(world, cert_request(world.good), issuers=issuers)
    assert (answer.status, answer.reason) == ("unknown", "chain_invalid")


def test_issuer_hash_reader_refuses_non_minimal_der_lengths(world: World) -> None:
    """The firmware-side reader used to accept a long-form length where the short form fits."""
    raw = der(world.good)
    assert raw[1] == 0x82 and raw[5] == 0x82  # Certificate and tbsCertificate with 2-byte lengths
    outer, tbs = int.from_bytes(raw[2:4], "big"), int.from_bytes(raw[6:8], "big")
    pos = 8 + 5  # past [0] version (a0 03 02 01 02): the serialNumber INTEGER
    assert raw[pos] == 0x02 and raw[pos + 1] < 0x80
    # The serial's length in long form (81 nn): the same value, one byte longer, not DER.
    tampered = (raw[:2] + (outer + 1).to_bytes(2, "big") + raw[4:6] + (tbs + 1).to_bytes(2, "big")
                + raw[8:pos + 1] + bytes([0x81, raw[pos + 1]]) + raw[pos + 2:])
    with pytest.raises(ValueError, match="non-minimal length"):
        issuer_hash_of_certificate(tampered)


def test_zz_every_reason_code_is_exercised() -> None:
    """Runs last in this module (file order): each stable code was produced by a test above."""
    if len(SEEN["response"]) < 3:
        pytest.skip("run the whole module to check reason coverage")
    assert set(REQUEST_REASONS) <= SEEN["request"], set(REQUEST_REASONS) - SEEN["request"]
    assert set(UNKNOWN_REASONS) <= SEEN["unknown"] | SEEN["request"], set(UNKNOWN_REASONS) - SEEN["unknown"]
    assert set(RESPONSE_REASONS) <= SEEN["response"], set(RESPONSE_REASONS) - SEEN["response"]
