"""Compact JWS, ES256 only (RFC 7515/7518): the one signer and verifier of our signed messages.

Command envelopes (``edge_core.envelope``) and the validation service's answers to MCUs
(``edge_core.validation``) are both ``header.payload.signature`` tokens signed with P-256.
Both go through this module, so they are equally strict:

1. ``malformed``, ``oversized``: bytes, at most ``max_size``, exactly three dot-separated
   parts, each unpadded canonical base64url; header and payload are JSON objects with unique
   keys and no NaN or Infinity (``edge_core.strictjson``). No key is touched yet;
2. ``bad_algorithm``: the header's ``alg`` is exactly ``ES256``;
3. ``bad_header``: only ``alg``, ``typ`` and ``kid`` are present (no embedded key such as
   ``jwk``, ``jku`` or ``x5c``, no ``crit``, no ``b64``), ``typ`` is the caller's, and ``kid``
   is a non-empty string;
4. ``bad_signature`` (``CompactJws.verify``): the signature is 64 bytes r||s with
   0 < r, s < n and verifies over the ASCII signing input.

``JwsError.kind`` is one of these five words; each caller maps it to its own stable reason
code and checks the payload's claims itself. Tokens are signed with deterministic ECDSA
(RFC 6979), the header with sorted keys and the payload in the caller's key order, both as
compact JSON, the bytes PyJWT writes for the same header and claims. No I/O.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from edge_core import strictjson

__all__ = ["ALGORITHM", "HEADER_PARAMS", "MAX_NUMERIC_DATE", "CompactJws", "JwsError", "parse_compact", "sign_compact"]

ALGORITHM = "ES256"
HEADER_PARAMS = frozenset({"alg", "typ", "kid"})
#: NumericDate claims (RFC 7519 2) we accept: after 1970, before year 10000 (datetime can represent it)
MAX_NUMERIC_DATE = 253402300799  # 9999-12-31T23:59:59Z
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

JwsFault = Literal["malformed", "oversized", "bad_algorithm", "bad_header", "bad_signature"]


class JwsError(ValueError):
    """A token was refused; ``kind`` says which step of the module docstring refused it."""

    def __init__(self, kind: JwsFault, message: str) -> None:
        super().__init__(message)
        self.kind: JwsFault = kind


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _p256(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bool:
    return key.curve.name == "secp256r1"


def sign_compact(header: Mapping[str, Any], payload: Mapping[str, Any],
                 key: ec.EllipticCurvePrivateKey) -> bytes:
    """``header.payload.signature`` (ASCII bytes); ``alg`` is set to ES256 in the header."""
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _p256(key):
        raise TypeError("ES256 needs an EC P-256 private key")
    head = json.dumps({**header, "alg": ALGORITHM}, separators=(",", ":"), sort_keys=True).encode()
    body = json.dumps(dict(payload), separators=(",", ":")).encode()
    signing_input = _b64url(head) + b"." + _b64url(body)
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256(), deterministic_signing=True)))
    return signing_input + b"." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


@dataclass(frozen=True)
class CompactJws:
    """A token whose structure and header passed ``parse_compact``; its signature is not checked yet."""

    header: dict[str, Any]
    payload: dict[str, Any]
    kid: str
    signing_input: bytes = field(repr=False)
    signature: bytes = field(repr=False)

    def verify(self, key: ec.EllipticCurvePublicKey) -> None:
        """Return if the signature verifies with ``key`` (P-256), else raise ``JwsError(bad_signature)``."""
        if not isinstance(key, ec.EllipticCurvePublicKey) or not _p256(key):
            raise JwsError("bad_signature", "ES256 needs an EC P-256 public key")
        if len(self.signature) != 64:
            raise JwsError("bad_signature", f"signature must be 64 bytes r||s, not {len(self.signature)}")
        r, s = int.from_bytes(self.signature[:32], "big"), int.from_bytes(self.signature[32:], "big")
        if not (0 < r < _P256_ORDER and 0 < s < _P256_ORDER):
            raise JwsError("bad_signature", "signature r or s is out of range")
        try:
            key.verify(encode_dss_signature(r, s), self.signing_input, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise JwsError("bad_signature", "signature does not verify") from None


def parse_compact(token: bytes, *, max_size: int, typ: str, what: str = "token") -> CompactJws:
    """Steps 1-3 of the module docstring; ``what`` names the token in messages ("envelope", "answer")."""
    if not isinstance(token, bytes | bytearray | memoryview):
        raise JwsError("malformed", f"an {what} is bytes, not {type(token).__name__}")
    raw = bytes(token)
    if len(raw) > max_size:
        raise JwsError("oversized", f"{what} is {len(raw)} bytes; at most {max_size} allowed")
    parts = raw.split(b".")
    if len(parts) != 3:
        raise JwsError("malformed", f"a JWS compact {what} has 3 dot-separated parts, not {len(parts)}")
    try:
        header_raw = strictjson.b64url_canonical(parts[0], "header")
        payload_raw = strictjson.b64url_canonical(parts[1], "payload")
        signature = strictjson.b64url_canonical(parts[2], "signature")
        header = strictjson.json_object(header_raw, "header")
        payload = strictjson.json_object(payload_raw, "payload")
    except ValueError as exc:
        raise JwsError("malformed", str(exc)) from exc
    alg = header.get("alg")
    if not (isinstance(alg, str) and alg == ALGORITHM):
        raise JwsError("bad_algorithm", f"algorithm {alg!r:.40} is refused; only {ALGORITHM} is accepted")
    extra = sorted(set(header) - HEADER_PARAMS)
    if extra:
        raise JwsError("bad_header", f"header parameter {extra[0]!r:.40} is not allowed; only alg, typ, kid")
    if header.get("typ") != typ:
        raise JwsError("bad_header", f"header typ {header.get('typ')!r:.40} must be {typ!r}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JwsError("bad_header", "header kid (the signing key's id) is missing or not a string")
    return CompactJws(header, payload, kid, parts[0] + b"." + parts[1], signature)
