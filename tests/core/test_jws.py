"""The one compact-JWS ES256 module: strict parsing, one signature check, PyJWT-compatible bytes."""

from __future__ import annotations

import base64
import json

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edge_core import jws

KEY = ec.derive_private_key(0x1D2C3B4A, ec.SECP256R1())
OTHER = ec.derive_private_key(0x5E6F7081, ec.SECP256R1())
TYP = "test+jwt"
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def token(header: dict[str, object] | bytes, payload: bytes = b'{"a":1}', signature: bytes = b"\x01" * 64) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return b".".join([b64(head), b64(payload), b64(signature)])


def parse(raw: bytes) -> jws.CompactJws:
    return jws.parse_compact(raw, max_size=1024, typ=TYP)


def test_a_signed_token_parses_verifies_and_matches_pyjwt_bytes() -> None:
    claims = {"iss": "alice", "n": 1, "z": [1, 2]}
    ours = jws.sign_compact({"typ": TYP, "kid": "k1"}, claims, KEY)
    theirs = jwt.encode(claims, KEY, algorithm="ES256", headers={"typ": TYP, "kid": "k1"}).encode()
    assert ours.split(b".")[:2] == theirs.split(b".")[:2]
    assert ours == jws.sign_compact({"typ": TYP, "kid": "k1"}, claims, KEY)  # RFC 6979: deterministic
    parsed = parse(ours)
    assert (parsed.kid, parsed.payload, parsed.header["alg"]) == ("k1", claims, "ES256")
    parsed.verify(KEY.public_key())
    parse(theirs).verify(KEY.public_key())  # PyJWT's random-k signature verifies here too
    assert jwt.decode(ours, KEY.public_key(), algorithms=["ES256"]) == claims


def test_another_key_or_a_changed_payload_is_a_bad_signature() -> None:
    good = jws.sign_compact({"typ": TYP, "kid": "k1"}, {"a": 1}, KEY)
    with pytest.raises(jws.JwsError) as info:
        parse(good).verify(OTHER.public_key())
    assert info.value.kind == "bad_signature"
    head, _, sig = good.split(b".")
    with pytest.raises(jws.JwsError) as info:
        parse(b".".join([head, b64(b'{"a":2}'), sig])).verify(KEY.public_key())
    assert info.value.kind == "bad_signature"


@pytest.mark.parametrize("signature", [b"\x01" * 63, b"\x00" * 64, N.to_bytes(32, "big") + b"\x01" * 32])
def test_signatures_of_the_wrong_length_or_out_of_range_are_refused(signature: bytes) -> None:
    with pytest.raises(jws.JwsError) as info:
        parse(token({"alg": "ES256", "typ": TYP, "kid": "k"}, signature=signature)).verify(KEY.public_key())
    assert info.value.kind == "bad_signature"


@pytest.mark.parametrize(("raw", "kind"), [
    ("not bytes", "malformed"),
    (b"a" * 1025, "oversized"),
    (b"a.b", "malformed"),
    (token({"alg": "ES256", "typ": TYP, "kid": "k"}) + b"=", "malformed"),  # padded
    (token(b'{"alg":"ES256","alg":"none","typ":"test+jwt","kid":"k"}'), "malformed"),  # duplicate key
    (token(b'["ES256"]'), "malformed"),
    (token({"alg": "ES256", "typ": TYP, "kid": "k"}, payload=b'{"a":NaN}'), "malformed"),
    (token({"alg": "none", "typ": TYP, "kid": "k"}), "bad_algorithm"),
    (token({"alg": "HS256", "typ": TYP, "kid": "k"}), "bad_algorithm"),
    (token({"alg": "ES256", "typ": TYP, "kid": "k", "jwk": {}}), "bad_header"),
    (token({"alg": "ES256", "typ": TYP, "kid": "k", "crit": ["b64"], "b64": False}), "bad_header"),
    (token({"alg": "ES256", "typ": "JWT", "kid": "k"}), "bad_header"),
    (token({"alg": "ES256", "typ": TYP, "kid": ""}), "bad_header"),
    (token({"alg": "ES256", "typ": TYP}), "bad_header"),
])
def test_each_structural_fault_has_its_kind(raw: bytes, kind: str) -> None:
    with pytest.raises(jws.JwsError) as info:
        parse(raw)
    assert info.value.kind == kind, str(info.value)


def test_signing_needs_a_p256_key() -> None:
    with pytest.raises(TypeError, match="P-256"):
        jws.sign_compact({"typ": TYP, "kid": "k"}, {}, ec.generate_private_key(ec.SECP384R1()))
