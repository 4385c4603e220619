"""Certificate validation on behalf of MCUs: requests, decisions and signed answers.

A constrained device cannot fetch or parse a CRL. It asks the gateway instead, over the
local broker, and gets back a small answer signed by the gateway's validation key
(ES256, JWS compact), which it verifies with one P-256 signature check::

    request   {"v":1,"nonce":"q1Xr0b8HgC6kYV2mP3tJzA","issuer_hash":"<64 hex>","serial":"4f1c"}
              {"v":1,"nonce":"q1Xr0b8HgC6kYV2mP3tJzA","cert":"<base64 DER>"}
    header    {"alg":"ES256","kid":"<16 hex>","typ":"edge-validation+jwt"}
    claims    {"v":1,"gw":"gateway-agent","aud":"pump-17","iat":1767268800,
               "nonce":"q1Xr0b8HgC6kYV2mP3tJzA","status":"good","reason":null,
               "issuer_hash":"<64 hex>","serial":"4f1c","this_update":1767268500,
               "next_update":1767873300,"crl_number":4}

This module does no I/O: no network, no event loop, no files. Bytes, the revocation
index, the issuer CA certificates, the key and the time are handed in.
``gateway_agent.validation_service`` is the MQTT adapter on the gateway and
``device_client.validation`` the device side. ``docs/validation.md`` is the format
reference for firmware.

Three stable reason-code sets, never renamed, only added to:

- ``REQUEST_REASONS``: why ``parse_request`` refused a request (``RequestRefused``);
- ``UNKNOWN_REASONS``: why a signed answer says ``unknown`` (the ``reason`` claim);
- ``RESPONSE_REASONS``: why ``verify_response`` refused an answer (``ResponseRefused``),
  in check order.

``issuer_hash`` is the lowercase hex SHA-256 of the DER encoding of the issuer Name: the
whole ``issuer`` field of the device certificate, tag and length included, byte for byte
as it appears in the certificate. It equals the hash of the issuing CA's ``subject`` field
(see ``issuer_hash_of_certificate`` and ``issuer_hash``). It plays the role of OCSP's
issuerNameHash (RFC 6960 4.1.1) with SHA-256.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Literal, NoReturn

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from edge_core import strictjson
from edge_core.chain import PathRefused, TrustStore, validate_path
from edge_core.clock import as_utc
from edge_core.der import name_fields
from edge_core.errors import CredentialError, EnvelopeError
from edge_core.identity import check_identity
from edge_core.names import names_match
from edge_core.revocation import InstalledCrl, RevocationIndex, StalenessPolicy, issuer_key

__all__ = [
    "ALGORITHM",
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_SKEW",
    "MAX_REQUEST_BYTES",
    "MAX_RESPONSE_BYTES",
    "REQUEST_FILTER",
    "REQUEST_REASONS",
    "REQUEST_TOPIC",
    "RESPONSE_REASONS",
    "RESPONSE_TOPIC",
    "STATUSES",
    "TYP",
    "UNKNOWN_REASONS",
    "Answer",
    "IssuerSet",
    "RequestRefused",
    "ResponseRefused",
    "Status",
    "ValidationRequest",
    "decide",
    "device_from_request_topic",
    "encode_request",
    "gateway_key_id",
    "issuer_hash",
    "issuer_hash_of_certificate",
    "load_gateway_public_key",
    "new_nonce",
    "parse_request",
    "refusal_answer",
    "request_topic",
    "response_topic",
    "sign_answer",
    "verify_response",
]

ALGORITHM = "ES256"
TYP = "edge-validation+jwt"
VERSION = 1
REQUEST_TOPIC = "gateway/validation/{device}/request"
RESPONSE_TOPIC = "gateway/validation/{device}/response"
REQUEST_FILTER = "gateway/validation/+/request"
#: A device certificate is well under 2 KB of DER; base64 adds a third.
MAX_REQUEST_BYTES = 4096
MAX_RESPONSE_BYTES = 2048
DEFAULT_MAX_AGE = timedelta(seconds=60)
DEFAULT_MAX_SKEW = timedelta(seconds=30)

Status = Literal["good", "revoked", "unknown"]
STATUSES: tuple[Status, ...] = ("good", "revoked", "unknown")

#: ``parse_request`` refusals, in check order. Never renamed, only added to.
REQUEST_REASONS = (
    "oversized",
    "bad_request",
    "bad_nonce",
    "bad_version",
    "bad_cert",
    "bad_issuer_hash",
    "bad_serial",
    "bad_topic",
)
#: Refusals that still get a signed ``unknown`` answer: the nonce was readable.
ANSWERED_REQUEST_REASONS = frozenset({"bad_version", "bad_request", "bad_cert", "bad_issuer_hash", "bad_serial"})

#: The ``reason`` claim of an ``unknown`` answer. Never renamed, only added to.
UNKNOWN_REASONS = (
    "unknown_issuer",      # the issuer is not a CA this gateway is configured with
    "chain_invalid",       # the presented certificate is not signed by that CA
    "cert_expired",        # presented certificate past notAfter: CRLs may drop expired entries
    "cert_not_yet_valid",  # presented certificate before notBefore
    "no_crl",              # the issuer is configured but no CRL of it is installed
    "crl_stale",           # the CRL is stale and the staleness policy is fail_closed
    "chain_revoked",       # a CA on the path (or the CRL's signer) is revoked
    *sorted(ANSWERED_REQUEST_REASONS),
)

#: ``verify_response`` refusals, in check order. Never renamed, only added to.
RESPONSE_REASONS = (
    "oversized",
    "malformed",
    "bad_algorithm",
    "bad_header",
    "unknown_key",
    "bad_signature",
    "bad_claim",
    "nonce_mismatch",
    "audience_mismatch",
    "subject_mismatch",
    "issued_in_future",
    "too_old",
)

CLAIMS = ("v", "gw", "aud", "iat", "nonce", "status", "reason", "issuer_hash", "serial",
          "this_update", "next_update", "crl_number")
_HEADER_PARAMS = frozenset({"alg", "typ", "kid"})
_REQUEST_KEYS = frozenset({"v", "nonce", "cert", "issuer_hash", "serial"})
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")
_HASH_RE = re.compile(r"[0-9a-f]{64}")
#: Lowercase hex of a positive integer, no leading zeros; RFC 5280 4.1.2.2 caps serials at 20 octets.
_SERIAL_RE = re.compile(r"[1-9a-f][0-9a-f]{0,39}")
_KID_RE = re.compile(r"[0-9a-f]{16}")
_REASON_RE = re.compile(r"[a-z][a-z0-9_]{0,39}")
_B64URL_RE = re.compile(rb"[A-Za-z0-9_-]*")
_B64_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_MAX_NUMERIC_DATE = 253402300799  # 9999-12-31T23:59:59Z
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


# --------------------------------------------------------------------------- errors


class RequestRefused(EnvelopeError):
    """A validation request was refused; ``reason`` is one of ``REQUEST_REASONS``.

    ``nonce`` is set when the request's nonce was readable, so the refusal can still be
    answered (signed ``unknown`` with this reason) and the device need not time out.
    """

    def __init__(self, reason: str, message: str, *, nonce: str | None = None) -> None:
        super().__init__(reason, message)
        self.nonce = nonce

    @property
    def answerable(self) -> bool:
        return self.nonce is not None and self.reason in ANSWERED_REQUEST_REASONS


class ResponseRefused(EnvelopeError):
    """A signed answer was refused by the device; ``reason`` is one of ``RESPONSE_REASONS``.

    Treat it like no answer at all: the certificate is not known to be good.
    """


# --------------------------------------------------------------------------- topics and names


def request_topic(device: str) -> str:
    return REQUEST_TOPIC.format(device=check_identity(device))


def response_topic(device: str) -> str:
    return RESPONSE_TOPIC.format(device=check_identity(device))


def device_from_request_topic(topic: str) -> str:
    """The requester's id from ``gateway/validation/<id>/request``; ``RequestRefused(bad_topic)``."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[:2] != ["gateway", "validation"] or parts[3] != "request":
        raise RequestRefused("bad_topic", f"topic {topic[:120]!r} is not a validation request topic")
    try:
        return check_identity(parts[2])
    except CredentialError as exc:
        raise RequestRefused("bad_topic", f"topic {topic[:120]!r}: {exc}") from exc


def new_nonce() -> str:
    """A fresh request nonce: 128 random bits as 22 base64url characters."""
    return secrets.token_urlsafe(16)


def issuer_hash(name: x509.Name) -> str:
    """Hex SHA-256 of the DER encoding of ``name`` (for a CA: pass its ``subject``)."""
    return hashlib.sha256(name.public_bytes()).hexdigest()


def issuer_hash_of_certificate(der: bytes) -> str:
    """Hex SHA-256 of the ``issuer`` field of a DER certificate, exactly as encoded in it.

    This is what firmware computes: it needs no X.509 parser beyond finding the fourth
    element of tbsCertificate. Raises ``ValueError`` on malformed DER.
    """
    issuer, _ = name_fields(der)
    return hashlib.sha256(issuer).hexdigest()


def gateway_key_id(key: ec.EllipticCurvePublicKey) -> str:
    """The ``kid`` of a gateway validation key: first 16 hex digits of SHA-256(SPKI DER)."""
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()[:16]


def load_gateway_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    """The gateway's validation public key from SubjectPublicKeyInfo PEM; ``ValueError`` otherwise."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"gateway validation key: not a PEM public key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("gateway validation key must be an EC P-256 public key (ES256)")
    return key


def _serial_hex(serial: int) -> str:
    return f"{serial:x}"


# --------------------------------------------------------------------------- issuers


@dataclass(frozen=True)
class IssuerSet:
    """The CA certificates whose device certificates the gateway answers for, by ``issuer_hash``.

    Built once from configuration (the same CA certificates the CRL sync trusts) plus the
    trust anchors they chain to (``trust``): an answer vouches for the whole path, so the
    issuing CA's own validity, signature and revocation are checked too. Without anchors
    the configured CAs are the anchors (their validity periods are still checked). An
    empty set knows no issuer, so every answer is ``unknown``.
    """

    by_hash: Mapping[str, tuple[x509.Certificate, ...]] = field(default_factory=lambda: MappingProxyType({}))
    trust: TrustStore = field(default_factory=lambda: TrustStore(()))

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_hash", MappingProxyType(dict(self.by_hash)))

    @classmethod
    def from_certificates(cls, certificates: Iterable[x509.Certificate],
                          anchors: Iterable[x509.Certificate] = ()) -> IssuerSet:
        cas = list(certificates)
        by_hash: dict[str, list[x509.Certificate]] = {}
        for ca in cas:
            der = ca.public_bytes(serialization.Encoding.DER)
            # The raw subject bytes are what device certificates carry; the re-encoded
            # form is added in case a CA's encoding differs (both name the same CA).
            hashes_ = {hashlib.sha256(name_fields(der)[1]).hexdigest(), issuer_hash(ca.subject)}
            for value in hashes_:
                by_hash.setdefault(value, []).append(ca)
        bundle = TrustStore.from_bundle([*anchors, *cas], crl_issuers=cas)
        if not bundle.anchors:
            bundle = TrustStore(tuple(cas), (), bundle.crl_issuers)
        return cls({k: tuple(v) for k, v in by_hash.items()}, bundle)

    def find(self, hash_hex: str) -> tuple[x509.Certificate, ...]:
        return self.by_hash.get(hash_hex, ())

    def find_by_name(self, name: x509.Name) -> tuple[x509.Certificate, ...]:
        """The configured CAs whose subject matches ``name`` under RFC 5280 rules."""
        return tuple(dict.fromkeys(ca for cas in self.by_hash.values() for ca in cas if names_match(ca.subject, name)))


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class ValidationRequest:
    """A parsed request. ``cert`` is set when the device presented a whole certificate."""

    nonce: str
    issuer_hash: str
    serial: int
    cert: x509.Certificate | None = field(default=None, compare=False, repr=False)


def encode_request(nonce: str, *, cert_der: bytes | None = None, issuer_hash: str | None = None,
                   serial: int | None = None) -> bytes:
    """The request payload (compact JSON): either ``cert_der``, or ``issuer_hash`` and ``serial``."""
    if not _NONCE_RE.fullmatch(nonce):
        raise ValueError("nonce must be 16-64 base64url characters")
    body: dict[str, Any] = {"v": VERSION, "nonce": nonce}
    if cert_der is not None:
        if issuer_hash is not None or serial is not None:
            raise ValueError("give cert_der, or issuer_hash and serial, not both")
        body["cert"] = base64.b64encode(cert_der).decode("ascii")
    else:
        if issuer_hash is None or serial is None:
            raise ValueError("give cert_der, or both issuer_hash and serial")
        if not _HASH_RE.fullmatch(issuer_hash):
            raise ValueError("issuer_hash must be 64 lowercase hex digits")
        if serial <= 0:
            raise ValueError("serial must be a positive integer")
        body["issuer_hash"] = issuer_hash
        body["serial"] = _serial_hex(serial)
    return json.dumps(body, separators=(",", ":")).encode("ascii")


def parse_request(payload: bytes) -> ValidationRequest:
    """Parse and check one request; raise ``RequestRefused`` with a ``REQUEST_REASONS`` code.

    Order: size; a UTF-8 JSON object (no duplicate keys, no NaN); the nonce (from here on
    the refusal carries it and can be answered); ``v``; the key set; the subject fields.
    """
    if len(payload) > MAX_REQUEST_BYTES:
        raise RequestRefused("oversized", f"request is {len(payload)} bytes; at most {MAX_REQUEST_BYTES}")
    try:
        doc = strictjson.loads(bytes(payload).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise RequestRefused("bad_request", f"request is not UTF-8 JSON: {str(exc)[:80]}") from exc
    if not isinstance(doc, dict):
        raise RequestRefused("bad_request", "request must be a JSON object")
    nonce = doc.get("nonce")
    if not isinstance(nonce, str) or not _NONCE_RE.fullmatch(nonce):
        raise RequestRefused("bad_nonce", "nonce must be 16-64 base64url characters (A-Z a-z 0-9 - _)")

    def refuse(reason: str, message: str) -> NoReturn:
        raise RequestRefused(reason, message, nonce=nonce)

    version = doc.get("v")
    if type(version) is not int or version != VERSION:
        refuse("bad_version", f"v must be the integer {VERSION}, not {version!r:.20}")
    extra = sorted(set(doc) - _REQUEST_KEYS)
    if extra:
        refuse("bad_request", f"unknown field {extra[0]!r:.40}; only v, nonce, cert | issuer_hash + serial")
    has_cert = "cert" in doc
    has_pair = "issuer_hash" in doc or "serial" in doc
    if has_cert == has_pair:
        refuse("bad_request", "give either cert, or issuer_hash and serial")
    if has_cert:
        return _parse_cert(doc["cert"], nonce, refuse)
    if "issuer_hash" not in doc or "serial" not in doc:
        refuse("bad_request", "issuer_hash and serial go together")
    hash_hex, serial = doc["issuer_hash"], doc["serial"]
    if not isinstance(hash_hex, str) or not _HASH_RE.fullmatch(hash_hex):
        refuse("bad_issuer_hash", "issuer_hash must be 64 lowercase hex digits (SHA-256 of the issuer Name DER)")
    if not isinstance(serial, str) or not _SERIAL_RE.fullmatch(serial):
        refuse("bad_serial", "serial must be 1-40 lowercase hex digits without leading zeros")
    return ValidationRequest(nonce=nonce, issuer_hash=hash_hex, serial=int(serial, 16))


def _parse_cert(value: object, nonce: str, refuse: Callable[[str, str], NoReturn]) -> ValidationRequest:
    if not isinstance(value, str) or not value or not _B64_RE.fullmatch(value):
        refuse("bad_cert", "cert must be standard base64 (with padding) of a DER certificate")
    try:
        der = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        refuse("bad_cert", "cert is not valid base64")
    if base64.b64encode(der).decode("ascii") != value:
        refuse("bad_cert", "cert is not canonical base64")
    try:
        cert = x509.load_der_x509_certificate(der)
        serial = cert.serial_number
        issuer_raw, _ = name_fields(der)
    except ValueError as exc:
        refuse("bad_cert", f"cert is not a DER X.509 certificate: {str(exc)[:80]}")
    if serial <= 0:
        refuse("bad_cert", "certificate serial must be positive (RFC 5280 4.1.2.2)")
    return ValidationRequest(nonce=nonce, issuer_hash=hashlib.sha256(issuer_raw).hexdigest(), serial=serial,
                             cert=cert)


# --------------------------------------------------------------------------- answers


def _epoch(value: datetime) -> int:
    return int(as_utc(value).timestamp())


@dataclass(frozen=True)
class Answer:
    """One answer, as the gateway signs it and as the device gets it back from ``verify_response``.

    Times are whole seconds, aware UTC. ``this_update``, ``next_update`` and ``crl_number``
    describe the CRL the answer is based on; they are None only for ``unknown`` answers
    without a CRL in force. ``reason`` is set exactly for ``unknown`` answers.
    """

    status: Status
    reason: str | None
    nonce: str
    device: str
    gateway: str
    issued_at: datetime
    issuer_hash: str | None = None
    serial: int | None = None
    this_update: datetime | None = None
    next_update: datetime | None = None
    crl_number: int | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")
        if (self.reason is None) != (self.status != "unknown"):
            raise ValueError("reason is set for unknown answers and only for them")
        if self.status != "unknown" and None in (self.issuer_hash, self.serial, self.this_update,
                                                 self.next_update, self.crl_number):
            raise ValueError(f"a {self.status} answer names the certificate and the CRL")
        for name in ("issued_at", "this_update", "next_update"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, datetime.fromtimestamp(_epoch(value), UTC))

    @property
    def good(self) -> bool:
        return self.status == "good"

    def claims(self) -> dict[str, Any]:
        """The signed claims, in the documented order."""
        return {
            "v": VERSION,
            "gw": self.gateway,
            "aud": self.device,
            "iat": _epoch(self.issued_at),
            "nonce": self.nonce,
            "status": self.status,
            "reason": self.reason,
            "issuer_hash": self.issuer_hash,
            "serial": None if self.serial is None else _serial_hex(self.serial),
            "this_update": None if self.this_update is None else _epoch(self.this_update),
            "next_update": None if self.next_update is None else _epoch(self.next_update),
            "crl_number": self.crl_number,
        }


def decide(
    request: ValidationRequest,
    *,
    device: str,
    gateway: str,
    index: RevocationIndex,
    issuers: IssuerSet,
    now: datetime,
    staleness: StalenessPolicy | None = None,
) -> Answer:
    """The answer to one parsed request. ``good`` needs all of:

    1. the issuer hash (or, for a presented certificate, its RFC 5280 issuer name) names a
       configured issuer CA (else ``unknown_issuer``);
    2. the whole path validates (``edge_core.chain.validate_path``): a presented
       certificate up to a trust anchor, or for a hash request the issuing CA itself -
       signatures, validity periods (``cert_expired``, ``cert_not_yet_valid`` for the
       device's own certificate), CA flags, and revocation of every CA on the path and of
       a separate CRL signer (``chain_revoked``); anything else is ``chain_invalid``;
    3. a CRL of that issuer is installed in ``index`` (``no_crl``);
    4. the serial is not on it (else ``revoked``; a revocation is permanent, so a stale
       CRL still proves it);
    5. the CRL is not stale, or the policy is ``fail_open_alarm`` (else ``crl_stale``).
    """
    now = as_utc(now)
    policy = staleness or StalenessPolicy()

    def answer(status: Status, reason: str | None, crl: InstalledCrl | None = None) -> Answer:
        return Answer(status, reason, request.nonce, device, gateway, now,
                      issuer_hash=request.issuer_hash, serial=request.serial,
                      this_update=None if crl is None else crl.this_update,
                      next_update=None if crl is None else crl.next_update,
                      crl_number=None if crl is None else crl.crl_number)

    candidates = issuers.find(request.issuer_hash)
    if not candidates and request.cert is not None:
        candidates = issuers.find_by_name(request.cert.issuer)  # same CA, issuer spelled otherwise
    if not candidates:
        return answer("unknown", "unknown_issuer")
    subject = request.cert if request.cert is not None else candidates[0]
    try:
        path = validate_path(subject, trust=issuers.trust, index=index, now=now, staleness=policy)
    except PathRefused as exc:
        leaf = request.cert is not None and exc.depth == 0
        key = issuer_key(subject.issuer if request.cert is not None else subject.subject)
        crl = index.installed.get(key)
        if exc.reason == "revoked" and leaf and crl is not None:
            return answer("revoked", None, crl)
        if leaf and exc.reason in _LEAF_REASONS:
            return answer("unknown", _LEAF_REASONS[exc.reason], crl)
        return answer("unknown", _PATH_REASONS.get(exc.reason, "chain_invalid"), crl)
    ca = path.certificates[1] if request.cert is not None else path.certificates[0]
    key = issuer_key(ca.subject)
    installed = index.installed.get(key)
    if not index.covers(key) or installed is None:
        return answer("unknown", "no_crl")
    if index.is_revoked(key, request.serial):
        return answer("revoked", None, installed)
    if not policy.evaluate(installed, now).admit:
        return answer("unknown", "crl_stale", installed)
    return answer("good", None, installed)


_LEAF_REASONS = {"path_expired": "cert_expired", "path_not_yet_valid": "cert_not_yet_valid"}
_PATH_REASONS = {"revoked": "chain_revoked", "path_no_crl": "no_crl", "crl_stale": "crl_stale"}


def refusal_answer(error: RequestRefused, *, device: str, gateway: str, now: datetime) -> Answer | None:
    """The signed ``unknown`` answer to a refused request, or None when it cannot be answered."""
    if not error.answerable:
        return None
    assert error.nonce is not None
    return Answer("unknown", error.reason, error.nonce, device, gateway, now)


# --------------------------------------------------------------------------- signing


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign_answer(answer: Answer, key: ec.EllipticCurvePrivateKey) -> bytes:
    """The answer as a JWS compact token (ASCII), ES256 with deterministic ECDSA (RFC 6979)."""
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise TypeError("the gateway validation key must be an EC P-256 private key")
    header = {"alg": ALGORITHM, "kid": gateway_key_id(key.public_key()), "typ": TYP}
    signing_input = (_b64url(json.dumps(header, separators=(",", ":"), sort_keys=True).encode())
                     + "." + _b64url(json.dumps(answer.claims(), separators=(",", ":")).encode()))
    der = key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    r, s = decode_dss_signature(der)
    return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}".encode("ascii")


# --------------------------------------------------------------------------- verifying


def verify_response(
    token: bytes,
    *,
    gateway_key: ec.EllipticCurvePublicKey | Sequence[ec.EllipticCurvePublicKey],
    expected_nonce: str,
    expected_device: str,
    now: datetime,
    max_age: timedelta = DEFAULT_MAX_AGE,
    max_skew: timedelta = DEFAULT_MAX_SKEW,
    expected_issuer_hash: str | None = None,
    expected_serial: int | None = None,
) -> Answer:
    """Verify a signed answer on the device; return it or raise ``ResponseRefused``.

    Checks run in ``RESPONSE_REASONS`` order. ``gateway_key`` may be several keys during a
    key rotation; the header ``kid`` picks one. Accepted iff the signature verifies, the
    nonce and audience are ours, the subject (when the answer names one) is the one we
    asked about, and ``iat - max_skew <= now <= iat + max_age``.
    """
    now = as_utc(now)
    keys = [gateway_key] if isinstance(gateway_key, ec.EllipticCurvePublicKey) else list(gateway_key)
    header, claims, signing_input, signature = _split_token(token)
    alg = header.get("alg")
    if not (isinstance(alg, str) and alg == ALGORITHM):
        _refuse("bad_algorithm", f"algorithm {alg!r:.40} is refused; only {ALGORITHM}")
    extra = sorted(set(header) - _HEADER_PARAMS)
    if extra:
        _refuse("bad_header", f"header parameter {extra[0]!r:.40} is not allowed; only alg, typ, kid")
    if header.get("typ") != TYP:
        _refuse("bad_header", f"header typ {header.get('typ')!r:.40} must be {TYP!r}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not _KID_RE.fullmatch(kid):
        _refuse("bad_header", "header kid must be the 16 hex digit gateway key id")
    key = next((k for k in keys if gateway_key_id(k) == kid), None)
    if key is None:
        _refuse("unknown_key", f"no configured gateway key has kid {kid}")
    if len(signature) != 64:
        _refuse("bad_signature", f"signature must be 64 bytes r||s, not {len(signature)}")
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    if not (0 < r < _P256_ORDER and 0 < s < _P256_ORDER):
        _refuse("bad_signature", "signature r or s is out of range")
    try:
        key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        _refuse("bad_signature", f"signature does not verify with gateway key {kid}")
    answer = _answer_from_claims(claims)
    if answer.nonce != expected_nonce:
        _refuse("nonce_mismatch", "the answer is for another request (nonce differs)")
    if answer.device != expected_device:
        _refuse("audience_mismatch", f"the answer is for {answer.device!r:.80}, not {expected_device!r}")
    if expected_issuer_hash is not None and answer.issuer_hash not in (None, expected_issuer_hash):
        _refuse("subject_mismatch", "the answer names another issuer than the one asked about")
    if expected_serial is not None and answer.serial not in (None, expected_serial):
        _refuse("subject_mismatch", "the answer names another serial than the one asked about")
    if answer.issued_at - max_skew > now:
        _refuse("issued_in_future", f"iat {answer.issued_at.isoformat()} is more than {max_skew} after "
                                    f"now {now.isoformat()}")
    if now > answer.issued_at + max_age:
        _refuse("too_old", f"answer issued {answer.issued_at.isoformat()} is older than {max_age}")
    return answer


def _refuse(reason: str, message: str) -> NoReturn:
    raise ResponseRefused(reason, message)


def _split_token(token: bytes) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    if not isinstance(token, bytes | bytearray | memoryview):
        _refuse("malformed", f"an answer is bytes, not {type(token).__name__}")
    raw = bytes(token)
    if len(raw) > MAX_RESPONSE_BYTES:
        _refuse("oversized", f"answer is {len(raw)} bytes; at most {MAX_RESPONSE_BYTES}")
    parts = raw.split(b".")
    if len(parts) != 3:
        _refuse("malformed", f"a JWS compact answer has 3 dot-separated parts, not {len(parts)}")
    header = _json_object(_b64url_decode(parts[0], "header"), "header")
    claims = _json_object(_b64url_decode(parts[1], "payload"), "payload")
    signature = _b64url_decode(parts[2], "signature")
    return header, claims, parts[0] + b"." + parts[1], signature


def _b64url_decode(part: bytes, name: str) -> bytes:
    try:
        return strictjson.b64url_canonical(part, name)
    except ValueError as exc:
        _refuse("malformed", str(exc))


def _json_object(raw: bytes, name: str) -> dict[str, Any]:
    try:
        return strictjson.json_object(raw, name)
    except ValueError as exc:
        _refuse("malformed", str(exc))


def _answer_from_claims(claims: dict[str, Any]) -> Answer:
    def bad(message: str) -> NoReturn:
        _refuse("bad_claim", message)

    missing = [name for name in CLAIMS if name not in claims]
    if missing:
        bad(f"claim {missing[0]!r} is missing")
    extra = sorted(set(claims) - set(CLAIMS))
    if extra:
        bad(f"claim {extra[0]!r:.40} is not allowed")
    if type(claims["v"]) is not int or claims["v"] != VERSION:
        bad(f"claim 'v' must be {VERSION}")
    for name in ("gw", "aud", "nonce"):
        if not isinstance(claims[name], str) or not claims[name]:
            bad(f"claim {name!r} must be a non-empty string")
    status, reason = claims["status"], claims["reason"]
    if status not in STATUSES:
        bad(f"claim 'status' {status!r:.20} is not one of {', '.join(STATUSES)}")
    if status == "unknown":
        if not isinstance(reason, str) or not _REASON_RE.fullmatch(reason):
            bad("an unknown answer carries a reason code")
    elif reason is not None:
        bad(f"a {status} answer carries no reason")
    times: dict[str, datetime | None] = {}
    for name in ("iat", "this_update", "next_update"):
        value = claims[name]
        if value is None and name != "iat":
            times[name] = None
            continue
        if type(value) is not int or not 0 < value <= _MAX_NUMERIC_DATE:
            bad(f"claim {name!r} must be an integer NumericDate")
        times[name] = datetime.fromtimestamp(value, UTC)
    number = claims["crl_number"]
    if number is not None and (type(number) is not int or number < 0):
        bad("claim 'crl_number' must be a non-negative integer")
    hash_hex, serial = claims["issuer_hash"], claims["serial"]
    if hash_hex is not None and not (isinstance(hash_hex, str) and _HASH_RE.fullmatch(hash_hex)):
        bad("claim 'issuer_hash' must be 64 lowercase hex digits")
    if serial is not None and not (isinstance(serial, str) and _SERIAL_RE.fullmatch(serial)):
        bad("claim 'serial' must be lowercase hex without leading zeros")
    issued_at = times["iat"]
    assert issued_at is not None
    try:
        return Answer(status, reason, claims["nonce"], claims["aud"], claims["gw"], issued_at,
                      issuer_hash=hash_hex, serial=None if serial is None else int(serial, 16),
                      this_update=times["this_update"], next_update=times["next_update"], crl_number=number)
    except ValueError as exc:
        bad(str(exc))
