"""Generate ``validation_vectors.json``: validation-answer test vectors for firmware ports.

    python tests/vectors/make_validation_vectors.py            # rewrite the file
    python tests/vectors/make_validation_vectors.py --check    # exit 1 if the file is stale

Every input is fixed: keys come from published seeds (TEST KEYS, never use them for
anything else), the time is fixed, and every ECDSA signature (answers, the sample
certificate) is deterministic (RFC 6979), so the output is reproducible byte for byte.

The file holds the gateway key (PEM, raw X/Y and kid), the verifier settings, one
sample certificate with its issuer_hash and serial (to test the firmware's hash), request
payloads with what ``parse_request`` makes of them, and answer tokens with the verdict
a conforming device verifier must reach (``ok`` and the decoded claims, or a reason).
Tokens that must be refused are assembled by hand: no JOSE library would make them.
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

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import NameOID

from edge_core.files import atomic_write_text
from edge_core.validation import Answer, gateway_key_id, issuer_hash_of_certificate, sign_answer

OUT = Path(__file__).with_name("validation_vectors.json")

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
T = int(NOW.timestamp())
DEVICE = "pump-17"
GATEWAY = "gateway-agent"
MAX_AGE = 60
MAX_SKEW = 30
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
TYP = "edge-validation+jwt"


def seeded_key(seed: str) -> ec.EllipticCurvePrivateKey:
    """A test key from a public seed. Anyone can recompute it: it protects nothing."""
    digest = hashlib.sha512(f"edge-validation-vectors/{seed}".encode()).digest()
    return ec.derive_private_key(int.from_bytes(digest, "big") % (P256_ORDER - 1) + 1, ec.SECP256R1())


GATEWAY_KEY = seeded_key("gateway")
ROGUE_KEY = seeded_key("rogue")
CA_KEY = seeded_key("issuing-ca")
KID = gateway_key_id(GATEWAY_KEY.public_key())


def nonce(label: str) -> str:
    return b64(hashlib.sha256(label.encode()).digest()[:16])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sample_certificate() -> x509.Certificate:
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Edge Vectors"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "Vectors Issuing CA")])
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)]))
            .issuer_name(ca_name)
            .public_key(seeded_key("device").public_key())
            .serial_number(0x4F1C2B)
            .not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=30))
            .sign(CA_KEY, hashes.SHA256(), ecdsa_deterministic=True))


CERT = sample_certificate()
CERT_DER = CERT.public_bytes(serialization.Encoding.DER)
ISSUER_HASH = issuer_hash_of_certificate(CERT_DER)
SERIAL = CERT.serial_number


# --------------------------------------------------------------------------- answers


def answer(label: str, status: str = "good", **over: Any) -> Answer:
    fields: dict[str, Any] = {
        "status": status, "reason": "no_crl" if status == "unknown" else None, "nonce": nonce(label),
        "device": DEVICE, "gateway": GATEWAY, "issued_at": NOW, "issuer_hash": ISSUER_HASH, "serial": SERIAL,
        "this_update": NOW - timedelta(hours=1), "next_update": NOW + timedelta(days=7), "crl_number": 4,
    }
    if status == "unknown":
        fields.update(this_update=None, next_update=None, crl_number=None)
    fields.update(over)
    return Answer(**fields)


def enc(value: Any, *, sort: bool = False) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=sort).encode()


def es256(key: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True)))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return sign


def compact(header: dict[str, Any] | bytes, claims: dict[str, Any] | bytes,
            signer: Callable[[bytes], bytes]) -> str:
    h = header if isinstance(header, bytes) else enc(header, sort=True)
    c = claims if isinstance(claims, bytes) else enc(claims)
    signing_input = f"{b64(h)}.{b64(c)}"
    return f"{signing_input}.{b64(signer(signing_input.encode()))}"


def hdr(**over: Any) -> dict[str, Any]:
    h: dict[str, Any] = {"alg": "ES256", "kid": KID, "typ": TYP}
    h.update(over)
    return {k: v for k, v in h.items() if v is not ...}


def claims(label: str, **over: Any) -> dict[str, Any]:
    c = answer(label).claims()
    c.update(over)
    return {k: v for k, v in c.items() if v is not ...}


def signed(label: str, **over: Any) -> str:
    return compact(hdr(), claims(label, **over), es256(GATEWAY_KEY))


def valid(label: str, a: Answer | None = None) -> str:
    return sign_answer(a or answer(label), GATEWAY_KEY).decode("ascii")


def case(name: str, description: str, token: str, expect: str, *, label: str, **ctx: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "description": description, "token": token,
                           "expected_nonce": ctx.pop("expected_nonce", nonce(label)),
                           "expected_device": ctx.pop("expected_device", DEVICE),
                           "expected_issuer_hash": ctx.pop("expected_issuer_hash", ISSUER_HASH),
                           "expected_serial": ctx.pop("expected_serial", f"{SERIAL:x}"),
                           "now": ctx.pop("now", T), "expect": expect}
    assert not ctx, ctx
    if expect == "ok":
        out["claims"] = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    return out


def build_cases() -> list[dict[str, Any]]:
    sig_of = valid("good").split(".")[2]
    raw_sig = base64.urlsafe_b64decode(sig_of + "==")
    r, s = int.from_bytes(raw_sig[:32], "big"), int.from_bytes(raw_sig[32:], "big")
    head_body = ".".join(valid("good").split(".")[:2])
    hmac_secret = GATEWAY_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return [
        case("good", "a good answer", valid("good"), "ok", label="good"),
        case("revoked", "a revoked answer", valid("revoked", answer("revoked", "revoked")), "ok", label="revoked"),
        case("unknown_no_crl", "unknown: no CRL for the issuer", valid("unk", answer("unk", "unknown")), "ok",
             label="unk"),
        case("unknown_bad_cert", "unknown answer to a malformed request: no subject, no CRL",
             valid("bc", Answer("unknown", "bad_cert", nonce("bc"), DEVICE, GATEWAY, NOW)), "ok", label="bc"),
        case("max_age_edge", "exactly max_age old: accepted", valid("good"), "ok", label="good", now=T + MAX_AGE),
        case("skew_edge", "issued exactly max_skew in the future: accepted", valid("good"), "ok", label="good",
             now=T - MAX_SKEW),
        case("malleated", "(r, n - s) is valid ECDSA and verifies; the nonce makes it harmless",
             f"{head_body}.{b64(r.to_bytes(32, 'big') + (P256_ORDER - s).to_bytes(32, 'big'))}", "ok",
             label="good"),
        case("oversized", "longer than 2048 bytes", "a" * 2049, "oversized", label="good"),
        case("two_parts", "not three parts", head_body, "malformed", label="good"),
        case("padded", "base64 padding", valid("good").replace(".", "=.", 1), "malformed", label="good"),
        case("std_alphabet", "'+' is not base64url", "+" + valid("good")[1:], "malformed", label="good"),
        case("dup_key", "duplicate claim", compact(hdr(), enc(claims("good"))[:-1] + b',"v":1}',
                                                   es256(GATEWAY_KEY)), "malformed", label="good"),
        case("alg_none", "alg none, empty signature",
             f"{b64(enc({'alg': 'none', 'kid': KID, 'typ': TYP}, sort=True))}.{b64(enc(claims('good')))}.",
             "bad_algorithm", label="good"),
        case("alg_hs256", "HS256 keyed with the gateway public key PEM",
             compact(hdr(alg="HS256"), claims("good"),
                     lambda d: hmac.new(hmac_secret, d, hashlib.sha256).digest()), "bad_algorithm", label="good"),
        case("alg_lowercase", "es256 is not ES256", compact(hdr(alg="es256"), claims("good"), es256(GATEWAY_KEY)),
             "bad_algorithm", label="good"),
        case("wrong_typ", "the command typ", compact(hdr(typ="edge-cmd+jwt"), claims("good"), es256(GATEWAY_KEY)),
             "bad_header", label="good"),
        case("embedded_jwk", "a key inside the message is never trusted",
             compact(hdr(jwk={"kty": "EC"}), claims("good"), es256(GATEWAY_KEY)), "bad_header", label="good"),
        case("no_kid", "kid missing", compact(hdr(kid=...), claims("good"), es256(GATEWAY_KEY)), "bad_header",
             label="good"),
        case("rogue_key", "signed by another key, with its own kid",
             sign_answer(answer("good"), ROGUE_KEY).decode(), "unknown_key", label="good"),
        case("rogue_key_our_kid", "signed by another key, claiming our kid",
             compact(hdr(), claims("good"), es256(ROGUE_KEY)), "bad_signature", label="good"),
        case("tampered", "revoked answer re-labelled good, signature of the original",
             ".".join([valid("rv").split(".")[0], b64(enc(answer("rv").claims())), valid("rv", answer("rv", "revoked"))
                       .split(".")[2]]), "bad_signature", label="rv"),
        case("der_signature", "ASN.1 DER signature instead of r||s",
             f"{head_body}.{b64(encode_dss_signature(r, s))}", "bad_signature", label="good"),
        case("missing_claim", "crl_number missing", signed("good", crl_number=...), "bad_claim", label="good"),
        case("extra_claim", "an extra claim", signed("good", exp=T + 60), "bad_claim", label="good"),
        case("bad_status", "status not one of three", signed("good", status="valid"), "bad_claim", label="good"),
        case("good_with_reason", "a good answer carries no reason", signed("good", reason="no_crl"), "bad_claim",
             label="good"),
        case("float_iat", "iat must be an integer", signed("good", iat=T + 0.5), "bad_claim", label="good"),
        case("nonce_mismatch", "a genuine answer to another request", valid("other"), "nonce_mismatch",
             label="good"),
        case("audience_mismatch", "a genuine answer for another device",
             valid("good", answer("good", device="pump-18")), "audience_mismatch", label="good"),
        case("serial_mismatch", "a genuine answer about another serial",
             valid("good", answer("good", serial=SERIAL + 1)), "subject_mismatch", label="good"),
        case("issued_in_future", "iat more than max_skew ahead", valid("good"), "issued_in_future", label="good",
             now=T - MAX_SKEW - 1),
        case("too_old", "older than max_age", valid("good"), "too_old", label="good", now=T + MAX_AGE + 1),
    ]


def request_cases() -> list[dict[str, Any]]:
    n = nonce("req")
    cert_b64 = base64.b64encode(CERT_DER).decode()
    return [
        {"payload": json.dumps({"v": 1, "nonce": n, "cert": cert_b64}, separators=(",", ":")),
         "expect": "ok", "issuer_hash": ISSUER_HASH, "serial": f"{SERIAL:x}"},
        {"payload": json.dumps({"v": 1, "nonce": n, "issuer_hash": ISSUER_HASH, "serial": f"{SERIAL:x}"},
                               separators=(",", ":")),
         "expect": "ok", "issuer_hash": ISSUER_HASH, "serial": f"{SERIAL:x}"},
        {"payload": json.dumps({"v": 1, "nonce": "short"}), "expect": "bad_nonce"},
        {"payload": json.dumps({"v": 2, "nonce": n}), "expect": "bad_version"},
        {"payload": json.dumps({"v": 1, "nonce": n, "serial": "4f1c2b"}), "expect": "bad_request"},
        {"payload": json.dumps({"v": 1, "nonce": n, "issuer_hash": ISSUER_HASH, "serial": "004f1c2b"}),
         "expect": "bad_serial"},
        {"payload": json.dumps({"v": 1, "nonce": n, "issuer_hash": ISSUER_HASH.upper(), "serial": "4f1c2b"}),
         "expect": "bad_issuer_hash"},
        {"payload": json.dumps({"v": 1, "nonce": n, "cert": cert_b64.replace("+", "-").replace("/", "_")}),
         "expect": "bad_cert"},
    ]


def build() -> dict[str, Any]:
    numbers = GATEWAY_KEY.public_key().public_numbers()
    return {
        "description": "Validation answers (docs/validation.md). TEST KEYS from public seeds: never use them.",
        "generator": "tests/vectors/make_validation_vectors.py",
        "gateway_key": {
            "kid": KID,
            "pem": GATEWAY_KEY.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
            "x": f"{numbers.x:064x}",
            "y": f"{numbers.y:064x}",
        },
        "verifier": {"max_age_seconds": MAX_AGE, "max_skew_seconds": MAX_SKEW, "max_size_bytes": 2048,
                     "typ": TYP},
        "certificate": {"der_base64": base64.b64encode(CERT_DER).decode(), "issuer_hash": ISSUER_HASH,
                        "serial": f"{SERIAL:x}"},
        "requests": request_cases(),
        "cases": build_cases(),
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file is not current")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text("utf-8") if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is stale; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    atomic_write_text(OUT, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
