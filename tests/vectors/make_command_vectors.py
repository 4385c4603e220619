"""Generate ``command_vectors.json``: signed-command test vectors for firmware ports.

    python tests/vectors/make_command_vectors.py            # rewrite the file
    python tests/vectors/make_command_vectors.py --check    # exit 1 if the file is stale

Every input is fixed: the keys are derived from published seeds (TEST KEYS, never use
them for anything else), the time is fixed, and ES256/ES384/ES512 signatures use
deterministic ECDSA (RFC 6979), so the output is byte-for-byte reproducible. Tokens
that must be refused on their ``alg`` before any key is used (RS256, PS256) carry
filler signature bytes: a conforming verifier never looks at them.

Tokens are assembled here by hand on purpose: most vectors are malformed in ways no
JOSE library would produce. ``tests/core/test_command_vectors.py`` checks that the
valid ones are byte-identical (up to the signature) to what ``sign_command`` emits.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from edge_core.files import atomic_write_text

OUT = Path(__file__).with_name("command_vectors.json")

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
T = int(NOW.timestamp())
NOT_BEFORE = NOW - timedelta(seconds=100)  # the replay cache "started" 100 s ago
DEVICE = "pump-17"
TOPIC = f"devices/{DEVICE}/cmd"
POLICY = {
    "max_ttl_seconds": 300,
    "max_skew_seconds": 30,
    "max_size_bytes": 4096,
    "command_topic": "devices/{device}/cmd/#",
    "typ": "edge-cmd+jwt",
}
SKEW = POLICY["max_skew_seconds"]
TTL = 60
DEFAULT_CAPACITY = 16
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def seeded_key(seed: str, curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    """A test key from a public seed. Anyone can recompute it: it protects nothing."""
    digest = hashlib.sha512(f"edge-cmd-vectors/{seed}".encode()).digest()
    # Below the group order of P-256 (and so of P-384 and P-521), never zero.
    scalar = int.from_bytes(digest, "big") % (P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, curve or ec.SECP256R1())


KEYS = {
    "alice": seeded_key("alice"),
    "bob": seeded_key("bob"),
    "carol-1": seeded_key("carol-1"),
    "carol-2": seeded_key("carol-2"),
    "dave": seeded_key("dave"),
    "erin": seeded_key("erin"),
    "mallory": seeded_key("mallory"),  # not configured anywhere
}
OPERATORS = [
    {"id": "alice", "keys": ["alice"], "scope": [{"devices": [DEVICE]}]},
    {"id": "bob", "keys": ["bob"], "scope": [{"devices": ["valve-3"]}]},
    {
        "id": "carol",
        "keys": ["carol-1", "carol-2"],
        "scope": [{"roles": ["pump"], "attributes": {"site": "plant-a"}}],
    },
    {"id": "dave", "keys": ["dave"], "scope": [{"roles": ["valve"]}]},
    {"id": "erin", "keys": ["erin"], "scope": [{"roles": ["pump"], "attributes": {"site": "plant-b"}}]},
]
DEVICE_PROFILE = {"id": DEVICE, "roles": ["pump"], "attributes": {"site": "plant-a", "line": "line-3"}}


# --------------------------------------------------------------------------- assembling


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def enc_json(value: Any, *, sort: bool = False) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=sort).encode("utf-8")


def es_sign(key: ec.EllipticCurvePrivateKey, data: bytes, hash_alg: hashes.HashAlgorithm) -> bytes:
    der = key.sign(data, ec.ECDSA(hash_alg, deterministic_signing=True))
    r, s = decode_dss_signature(der)
    size = (key.curve.key_size + 7) // 8
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


Signer = Callable[[bytes], bytes]


def es256(kid: str) -> Signer:
    return lambda data: es_sign(KEYS[kid], data, hashes.SHA256())


def compact(header: dict[str, Any] | bytes, payload: dict[str, Any] | bytes, signer: Signer) -> str:
    """``header.payload.signature`` like PyJWT (sorted header, compact JSON), or raw bytes."""
    h = header if isinstance(header, bytes) else enc_json(header, sort=True)
    p = payload if isinstance(payload, bytes) else enc_json(payload)
    signing_input = f"{b64(h)}.{b64(p)}".encode("ascii")
    return f"{signing_input.decode()}.{b64(signer(signing_input))}"


def hdr(kid: str = "alice", **extra: Any) -> dict[str, Any]:
    return {"alg": "ES256", "kid": kid, "typ": POLICY["typ"], **extra}


def claims(
    iss: str = "alice",
    *,
    jti: str,
    iat: int = T,
    ttl: int = TTL,
    aud: str = DEVICE,
    cmd: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    body = {"name": "set_speed", "rpm": 1200} if cmd is None else cmd
    return {"iss": iss, "aud": aud, "iat": iat, "exp": iat + ttl, "jti": jti, "cmd": body, **extra}


def nonce(label: str) -> str:
    """A fixed 128-bit nonce per vector (22 base64url characters)."""
    return b64(hashlib.sha256(label.encode()).digest()[:16])


def signed(label: str, kid: str = "alice", **claim_args: Any) -> str:
    return compact(hdr(kid), claims(jti=nonce(label), **claim_args), es256(kid))


def without(claim: str, label: str) -> str:
    body = claims(jti=nonce(label))
    del body[claim]
    return compact(hdr(), body, es256("alice"))


def filler(size: int) -> Signer:
    return lambda data: hashlib.shake_256(b"filler" + data).digest(size)


def hs256_with_public_key(label: str) -> str:
    """The classic confusion: HMAC keyed with the verifier's public key PEM."""
    secret = (
        KEYS["alice"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = {"alg": "HS256", "kid": "alice", "typ": POLICY["typ"]}
    return compact(
        header, claims(jti=nonce(label)), lambda data: hmac.new(secret, data, hashlib.sha256).digest()
    )


def eddsa(label: str) -> str:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"edge-cmd-vectors/ed").digest())
    return compact({"alg": "EdDSA", "kid": "alice", "typ": POLICY["typ"]}, claims(jti=nonce(label)), key.sign)


def es_other_curve(label: str, alg: str, curve: ec.EllipticCurve, hash_alg: hashes.HashAlgorithm) -> str:
    key = seeded_key(f"attacker-{alg}", curve)
    return compact(
        {"alg": alg, "kid": "alice", "typ": POLICY["typ"]},
        claims(jti=nonce(label)),
        lambda data: es_sign(key, data, hash_alg),
    )


def malleate(token: str) -> str:
    """Same (r, s) signature re-expressed as (r, n - s): still valid ECDSA."""
    head, body, sig = token.split(".")
    raw = base64.urlsafe_b64decode(sig + "==")
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    return f"{head}.{body}.{b64(r.to_bytes(32, 'big') + (P256_ORDER - s).to_bytes(32, 'big'))}"


def der_signature(label: str) -> str:
    """A porting bug: ASN.1 DER signature instead of the 64-byte r||s JOSE form."""
    token = signed(label)
    head, body, sig = token.split(".")
    raw = base64.urlsafe_b64decode(sig + "==")
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    return f"{head}.{body}.{b64(der)}"


def non_canonical_signature(label: str) -> str:
    """The last base64url character of a 64-byte value has 4 unused bits; set one."""
    token = signed(label)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    return token[:-1] + alphabet[last ^ 0b0001]


def tamper_payload(label: str) -> str:
    head, _, sig = signed(label).split(".")
    forged = claims(jti=nonce(label), cmd={"name": "set_speed", "rpm": 9000})
    return f"{head}.{b64(enc_json(forged))}.{sig}"


# --------------------------------------------------------------------------- cases


def step(token: str, expect: str, *, topic: str = TOPIC) -> dict[str, Any]:
    return {"token": token, "topic": topic, "expect": expect}


def case(
    name: str, description: str, *steps: dict[str, Any], capacity: int = DEFAULT_CAPACITY
) -> dict[str, Any]:
    return {"name": name, "description": description, "replay_capacity": capacity, "steps": list(steps)}


def one(name: str, description: str, token: str, expect: str, **kw: Any) -> dict[str, Any]:
    return case(name, description, step(token, expect, **kw))


def build_cases() -> list[dict[str, Any]]:
    base = signed("replay")
    first_fill = signed("fill-1")
    return [
        # accepted
        one("ok_basic", "alice commands pump-17, explicitly granted", signed("ok_basic"), "ok"),
        one(
            "ok_subtopic",
            "any level below the command topic",
            signed("ok_subtopic"),
            "ok",
            topic=f"{TOPIC}/set_speed",
        ),
        one(
            "ok_role_grant",
            "carol's grant: role pump at site plant-a; second key",
            signed("ok_role_grant", "carol-2", iss="carol"),
            "ok",
        ),
        one(
            "ok_unicode_body",
            "cmd may hold any JSON",
            signed(
                "ok_unicode_body", cmd={"name": "label", "text": "Pumpe Süd ✓", "n": [1, 2.5, None, True]}
            ),
            "ok",
        ),
        one("ok_iat_at_skew_edge", "iat = now + skew", signed("ok_iat_edge", iat=T + SKEW), "ok"),
        one(
            "ok_exp_at_skew_edge", "exp = now - skew", signed("ok_exp_edge", iat=T - SKEW - 10, ttl=10), "ok"
        ),
        one("ok_ttl_at_max", "exp - iat = max_ttl", signed("ok_ttl_max", ttl=300), "ok"),
        one(
            "ok_iat_at_restart_edge",
            "iat = not_before + skew",
            signed("ok_restart_edge", iat=T - 100 + SKEW),
            "ok",
        ),
        one(
            "ok_malleated_signature",
            "(r, n-s) is valid ECDSA; replay protection keys on jti",
            malleate(signed("malleable")),
            "ok",
        ),
        # size and structure
        one(
            "oversized",
            "a valid signature does not excuse 4097+ bytes",
            signed("oversized", cmd={"name": "blob", "data": "A" * 4000}),
            "oversized",
        ),
        one("empty", "zero bytes", "", "not_envelope"),
        one("two_parts", "no signature part", ".".join(signed("two").split(".")[:2]), "not_envelope"),
        one("four_parts", "a JWE has five, a JWS three", signed("four") + ".AAAA", "not_envelope"),
        one("padded_base64", "base64url without '=' padding only", signed("padded") + "==", "not_envelope"),
        one(
            "standard_base64_chars",
            "'+' and '/' are not base64url",
            signed("std").replace("-", "+").replace("_", "/") + "+/",
            "not_envelope",
        ),
        one(
            "non_canonical_base64",
            "unused trailing bits must be zero",
            non_canonical_signature("noncanon"),
            "not_envelope",
        ),
        one("trailing_newline", "no whitespace around the token", signed("newline") + "\n", "not_envelope"),
        one(
            "header_not_json", "", compact(b"ES256", claims(jti=nonce("hnj")), es256("alice")), "not_envelope"
        ),
        one(
            "payload_array",
            "the claims are a JSON object",
            compact(hdr(), b"[1,2]", es256("alice")),
            "not_envelope",
        ),
        one(
            "duplicate_header_key",
            "parsers disagree on which duplicate wins",
            compact(
                b'{"alg":"none","alg":"ES256","kid":"alice","typ":"edge-cmd+jwt"}',
                claims(jti=nonce("dup")),
                es256("alice"),
            ),
            "not_envelope",
        ),
        one(
            "payload_nan",
            "NaN is not JSON",
            compact(
                hdr(), enc_json(claims(jti=nonce("nan"))).replace(b'"rpm":1200', b'"rpm":NaN'), es256("alice")
            ),
            "not_envelope",
        ),
        # algorithm confusion: refused from the header, before any key is used
        one(
            "alg_none",
            "unsecured JWS, empty signature",
            compact(
                {"alg": "none", "kid": "alice", "typ": POLICY["typ"]},
                claims(jti=nonce("none")),
                lambda _: b"",
            ),
            "bad_algorithm",
        ),
        one(
            "alg_none_with_signature",
            "",
            compact(
                {"alg": "none", "kid": "alice", "typ": POLICY["typ"]},
                claims(jti=nonce("none2")),
                es256("alice"),
            ),
            "bad_algorithm",
        ),
        one(
            "alg_hs256_public_key_secret",
            "HMAC keyed with the public key PEM",
            hs256_with_public_key("hs"),
            "bad_algorithm",
        ),
        one(
            "alg_rs256",
            "filler signature",
            compact(
                {"alg": "RS256", "kid": "alice", "typ": POLICY["typ"]}, claims(jti=nonce("rs")), filler(256)
            ),
            "bad_algorithm",
        ),
        one(
            "alg_ps256",
            "filler signature",
            compact(
                {"alg": "PS256", "kid": "alice", "typ": POLICY["typ"]}, claims(jti=nonce("ps")), filler(256)
            ),
            "bad_algorithm",
        ),
        one("alg_eddsa", "", eddsa("ed"), "bad_algorithm"),
        one(
            "alg_es384",
            "",
            es_other_curve("es384", "ES384", ec.SECP384R1(), hashes.SHA384()),
            "bad_algorithm",
        ),
        one(
            "alg_es512",
            "",
            es_other_curve("es512", "ES512", ec.SECP521R1(), hashes.SHA512()),
            "bad_algorithm",
        ),
        one(
            "alg_lowercase",
            "algorithm names are case-sensitive",
            compact(hdr(alg="es256"), claims(jti=nonce("lower")), es256("alice")),
            "bad_algorithm",
        ),
        one(
            "alg_missing",
            "",
            compact({"kid": "alice", "typ": POLICY["typ"]}, claims(jti=nonce("noalg")), es256("alice")),
            "bad_algorithm",
        ),
        one(
            "alg_list",
            "",
            compact(hdr(alg=["ES256"]), claims(jti=nonce("alglist")), es256("alice")),
            "bad_algorithm",
        ),
        # header
        one(
            "typ_missing",
            "",
            compact({"alg": "ES256", "kid": "alice"}, claims(jti=nonce("notyp")), es256("alice")),
            "bad_header",
        ),
        one(
            "typ_jwt",
            "a generic JWT is not a command",
            compact(hdr(typ="JWT"), claims(jti=nonce("typjwt")), es256("alice")),
            "bad_header",
        ),
        one(
            "kid_missing",
            "",
            compact({"alg": "ES256", "typ": POLICY["typ"]}, claims(jti=nonce("nokid")), es256("alice")),
            "bad_header",
        ),
        one(
            "embedded_jwk",
            "a key in the header is never trusted",
            compact(
                hdr("mallory", jwk={"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}),
                claims(jti=nonce("jwk")),
                es256("mallory"),
            ),
            "bad_header",
        ),
        one(
            "crit_header",
            "",
            compact(hdr(crit=["exp"]), claims(jti=nonce("crit")), es256("alice")),
            "bad_header",
        ),
        one(
            "b64_false",
            "RFC 7797 unencoded payload",
            compact(hdr(b64=False, crit=["b64"]), claims(jti=nonce("b64")), es256("alice")),
            "bad_header",
        ),
        # keys and signature
        one(
            "unknown_kid",
            "mallory's own key is not configured",
            signed("mallory", "mallory", iss="mallory"),
            "unknown_issuer",
        ),
        one(
            "wrong_key",
            "claims alice's kid, signed by mallory",
            compact(hdr("alice"), claims(jti=nonce("wrongkey")), es256("mallory")),
            "bad_signature",
        ),
        one(
            "other_operators_key",
            "claims alice's kid, signed with bob's key",
            compact(hdr("alice"), claims(jti=nonce("bobkey")), es256("bob")),
            "bad_signature",
        ),
        one("tampered_payload", "rpm changed after signing", tamper_payload("tamper"), "bad_signature"),
        one(
            "zero_signature",
            "r = s = 0",
            compact(hdr(), claims(jti=nonce("zero")), lambda _: bytes(64)),
            "bad_signature",
        ),
        one("der_signature", "ASN.1 DER instead of 64-byte r||s", der_signature("der"), "bad_signature"),
        one(
            "truncated_signature",
            "63 bytes",
            compact(hdr(), claims(jti=nonce("trunc")), lambda d: es256("alice")(d)[:63]),
            "bad_signature",
        ),
        # claims
        *[
            one(f"missing_{name}", "", without(name, f"missing-{name}"), "missing_claim")
            for name in ("iss", "aud", "iat", "exp", "jti", "cmd")
        ],
        one("extra_claim_nbf", "only the six claims", signed("nbf", nbf=T), "bad_claim"),
        one(
            "iat_float",
            "NumericDate is an integer here",
            compact(hdr(), {**claims(jti=nonce("iatf")), "iat": T + 0.5}, es256("alice")),
            "bad_claim",
        ),
        one(
            "iat_string",
            "",
            compact(hdr(), {**claims(jti=nonce("iats")), "iat": str(T)}, es256("alice")),
            "bad_claim",
        ),
        one(
            "exp_bool",
            "",
            compact(hdr(), {**claims(jti=nonce("expb")), "exp": True}, es256("alice")),
            "bad_claim",
        ),
        one(
            "exp_before_iat",
            "",
            compact(hdr(), {**claims(jti=nonce("expiat")), "exp": T - 1}, es256("alice")),
            "bad_claim",
        ),
        one(
            "jti_too_short",
            "21 characters: under 128 bits",
            compact(hdr(), claims(jti=nonce("short")[:21]), es256("alice")),
            "bad_claim",
        ),
        one("jti_bad_chars", "", compact(hdr(), claims(jti="a" * 21 + "="), es256("alice")), "bad_claim"),
        one(
            "aud_list",
            "one device per command",
            compact(hdr(), {**claims(jti=nonce("audl")), "aud": [DEVICE]}, es256("alice")),
            "bad_claim",
        ),
        one(
            "iss_not_key_owner",
            "signed with alice's key, claims to be bob",
            signed("issbob", iss="bob"),
            "bad_claim",
        ),
        one("cmd_string", "", signed("cmdstr", cmd="reboot"), "bad_claim"),
        # who
        one(
            "audience_mismatch",
            "for valve-3, published on pump-17's topic",
            signed("aud", aud="valve-3"),
            "audience_mismatch",
        ),
        one(
            "issuer_not_authorized",
            "bob may only command valve-3",
            signed("bob", "bob", iss="bob"),
            "issuer_not_authorized",
        ),
        one(
            "role_not_granted",
            "dave may command role valve only",
            signed("dave", "dave", iss="dave"),
            "issuer_not_authorized",
        ),
        one(
            "attribute_not_granted",
            "erin: role pump, but at site plant-b",
            signed("erin", "erin", iss="erin"),
            "issuer_not_authorized",
        ),
        # when
        one("ttl_too_long", "exp - iat = max_ttl + 1", signed("ttl", ttl=301), "ttl_too_long"),
        one(
            "iat_past_skew_edge",
            "iat = now + skew + 1",
            signed("future", iat=T + SKEW + 1),
            "issued_in_future",
        ),
        one(
            "exp_past_skew_edge",
            "exp = now - skew - 1",
            signed("expired", iat=T - SKEW - 1 - 10, ttl=10),
            "expired",
        ),
        one(
            "iat_before_restart",
            "iat = not_before + skew - 1",
            signed("restart", iat=T - 100 + SKEW - 1),
            "issued_before_restart",
        ),
        # replay
        case("replayed", "the same token twice", step(base, "ok"), step(base, "replayed")),
        case(
            "replayed_malleated",
            "a re-encoded signature is still the same command",
            step(signed("replay-m"), "ok"),
            step(malleate(signed("replay-m")), "replayed"),
        ),
        case(
            "replayed_other_topic_level",
            "a sub-topic does not make it new",
            step(signed("replay-t"), "ok"),
            step(signed("replay-t"), "replayed", topic=f"{TOPIC}/x"),
        ),
        case(
            "replay_cache_full",
            "capacity 1, holding a live nonce: fail closed",
            step(first_fill, "ok"),
            step(signed("fill-2"), "replay_cache_full"),
            capacity=1,
        ),
        case(
            "refused_does_not_fill",
            "capacity 1: an expired envelope takes no room",
            step(signed("refused-1", iat=T - 1000), "expired"),
            step(signed("refused-2"), "ok"),
            capacity=1,
        ),
    ]


def operator_entries() -> list[dict[str, Any]]:
    out = []
    for op in OPERATORS:
        keys = []
        for kid in op["keys"]:
            public = KEYS[kid].public_key()
            numbers = public.public_numbers()
            keys.append(
                {
                    "kid": kid,
                    "public_key_pem": public.public_bytes(
                        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                    ).decode(),
                    "public_key_jwk": {
                        "kty": "EC",
                        "crv": "P-256",
                        "kid": kid,
                        "alg": "ES256",
                        "use": "sig",
                        "x": b64(numbers.x.to_bytes(32, "big")),
                        "y": b64(numbers.y.to_bytes(32, "big")),
                    },
                }
            )
        out.append({"id": op["id"], "keys": keys, "scope": op["scope"]})
    return out


def build() -> dict[str, Any]:
    return {
        "description": (
            "Signed command envelope test vectors (JWS compact, ES256). Run every case with a fresh "
            "replay cache of 'replay_capacity' entries whose not_before is 'replay_not_before', at time "
            "'now', as device 'device.id'; feed the steps in order, each as the MQTT payload received on "
            "'topic'. 'expect' is 'ok' or the reason code. TEST KEYS: derived from public seeds."
        ),
        "format": 1,
        "generator": "tests/vectors/make_command_vectors.py",
        "now": NOW.isoformat().replace("+00:00", "Z"),
        "now_unix": T,
        "replay_not_before": NOT_BEFORE.isoformat().replace("+00:00", "Z"),
        "replay_not_before_unix": int(NOT_BEFORE.timestamp()),
        "policy": POLICY,
        "device": DEVICE_PROFILE,
        "operators": operator_entries(),
        "cases": build_cases(),
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from a fresh build")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text("utf-8") if args.out.exists() else ""
        if current != text:
            sys.stderr.write(f"{args.out} is stale; run {sys.argv[0]}\n")
            return 1
        return 0
    atomic_write_text(args.out, text)
    sys.stdout.write(f"wrote {args.out}: {len(build()['cases'])} cases\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
