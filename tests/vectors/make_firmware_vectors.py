"""Generate ``firmware_vectors.json``: firmware offer and image test vectors for verifier ports.

    python tests/vectors/make_firmware_vectors.py            # rewrite the file
    python tests/vectors/make_firmware_vectors.py --check    # exit 1 if the file is stale

Every input is fixed: keys derive from published seeds (TEST KEYS, never use them for
anything else), the time is fixed and signatures are deterministic ECDSA (RFC 6979), so the
output is reproducible byte for byte. Offers are assembled here by hand on purpose: many are
malformed in ways ``edge_core.firmware`` would never produce. ``tests/firmware/test_vectors.py``
runs every case through the broker's verifier and the device's.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from edge_core.files import atomic_write_text

OUT = Path(__file__).with_name("firmware_vectors.json")
NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
T = int(NOW.timestamp())
SKEW = 300
MAX_OFFER = 65536
CLASS = "pump-ctl"
MANIFEST_TYPE = "application/vnd.edge.firmware-manifest+json"
ROOT_TYPE = "application/vnd.edge.firmware-root+json"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
IMAGE = bytes((i * 7 + 3) % 256 for i in range(1000))
INSTALLED = b"installed image v1 " * 10


def seeded_key(seed: str) -> ec.EllipticCurvePrivateKey:
    """A test key from a public seed. Anyone can recompute it: it protects nothing."""
    digest = hashlib.sha512(f"edge-firmware-vectors/{seed}".encode()).digest()
    return ec.derive_private_key(int.from_bytes(digest, "big") % (P256_ORDER - 1) + 1, ec.SECP256R1())


KEYS = {name: seeded_key(name) for name in (
    "root-1", "root-2", "release-1", "release-2", "release-3", "release-4", "release-5", "mallory")}


def spki(name: str) -> bytes:
    return KEYS[name].public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)


def kid(name: str) -> str:
    return hashlib.sha256(spki(name)).hexdigest()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def canon(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def pae(payload_type: str, payload: bytes) -> bytes:
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def sign_raw(name: str, data: bytes) -> bytes:
    der = KEYS[name].sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


Sig = tuple[str, bytes]  # (keyid, signature)


def envelope(payload_type: str, payload: bytes, signers: Sequence[str] = (), *, extra_sigs: Sequence[Sig] = (),
             sig_type: str | None = None) -> dict[str, Any]:
    signing_input = pae(sig_type or payload_type, payload)
    sigs = [{"keyid": kid(n), "sig": b64(sign_raw(n, signing_input))} for n in signers]
    sigs += [{"keyid": k, "sig": b64(s)} for k, s in extra_sigs]
    return {"payloadType": payload_type, "payload": b64(payload), "signatures": sigs}


def root_body(version: int, *, release: Sequence[str], threshold: int = 2, expires: int = T + 86400 * 365,
              root: Sequence[str] = ("root-1", "root-2"), root_threshold: int = 2) -> dict[str, Any]:
    names = sorted(set(root) | set(release))
    return {"_type": "firmware-root", "spec": 1, "version": version, "expires": expires,
            "keys": {kid(n): b64(spki(n)) for n in names},
            "root": {"keyids": sorted(kid(n) for n in root), "threshold": root_threshold},
            "release": {"keyids": sorted(kid(n) for n in release), "threshold": threshold}}


def root_env(version: int, signers: Sequence[str] = ("root-1", "root-2"), **kw: Any) -> dict[str, Any]:
    return envelope(ROOT_TYPE, canon(root_body(version, **kw)), signers)


PINNED = root_env(1, release=("release-1", "release-2", "release-3"))
ROOT_V2 = root_env(2, release=("release-4", "release-5"))  # rotation: release-1..3 retired


def manifest_body(*, version: int = 2, image: bytes = IMAGE, device_class: str = CLASS, not_before: int = T - 3600,
                  expires: int = T + 86400 * 30, **extra: Any) -> dict[str, Any]:
    body = {"_type": "firmware-manifest", "spec": 1, "device_class": device_class, "version": version,
            "image": {"sha256": hashlib.sha256(image).hexdigest(), "size": len(image)},
            "not_before": not_before, "expires": expires}
    body.update(extra)
    return body


def manifest(signers: Sequence[str] = ("release-1", "release-2"), **kw: Any) -> dict[str, Any]:
    return envelope(MANIFEST_TYPE, canon(manifest_body(**kw)), signers)


def offer(man: dict[str, Any] | None = None, roots: Sequence[dict[str, Any]] = (), url: str | None = None,
          **extra: Any) -> str:
    value: dict[str, Any] = {"type": "firmware-offer", "manifest": man if man is not None else manifest(),
                             "roots": list(roots)}
    if url is not None:
        value["url"] = url
    value.update(extra)
    return canon(value).decode("ascii")


def tamper(env: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    body = json.loads(base64.urlsafe_b64decode(env["payload"] + "=="))
    change(body)
    return {**env, "payload": b64(canon(body))}


def der_sig(env: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(env))
    for s in out["signatures"]:
        raw = base64.urlsafe_b64decode(s["sig"] + "==")
        s["sig"] = b64(encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")))
    return out


def malleate(env: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(env))
    for s in out["signatures"]:
        raw = base64.urlsafe_b64decode(s["sig"] + "==")
        high_s = P256_ORDER - int.from_bytes(raw[32:], "big")
        s["sig"] = b64(raw[:32] + high_s.to_bytes(32, "big"))
    return out


def raw_manifest(payload: bytes, signers: Sequence[str] = ("release-1", "release-2")) -> dict[str, Any]:
    return envelope(MANIFEST_TYPE, payload, signers)


# --------------------------------------------------------------------------- cases


def case(name: str, description: str, offer_text: str, expect: str, *, floor: int = 1,
         floor_image: bytes = INSTALLED, image: bytes | None = None, expect_image: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "description": description,
                           "floor": {"version": floor, "image_hex": floor_image.hex()},
                           "offer": offer_text, "expect": expect}
    if image is not None:
        out["image_hex"] = image.hex()
        out["expect_image"] = expect_image
    return out


def build_cases() -> list[dict[str, Any]]:
    good = manifest()
    v2_good = manifest(("release-4", "release-5"), version=3)
    return [
        # accepted
        case("ok_basic", "2 of 3 release keys", offer(good, url="https://gw.example/firmware/x"), "ok",
             image=IMAGE, expect_image="ok"),
        case("ok_all_three", "more signatures than the threshold", offer(manifest(("release-1", "release-2",
                                                                                  "release-3"))), "ok"),
        case("ok_duplicate_plus_one", "a key twice counts once; two distinct keys still suffice",
             offer(manifest(("release-1", "release-1", "release-3"))), "ok"),
        case("ok_extra_unknown_signature", "a signature by an unknown key is ignored when the threshold holds",
             offer(manifest(("release-1", "mallory", "release-2"))), "ok"),
        case("ok_malleated_signatures", "(r, n-s) is valid ECDSA", offer(malleate(good)), "ok"),
        case("ok_rotated_root", "the offer carries root v2; new release keys sign",
             offer(v2_good, [ROOT_V2]), "ok"),
        case("ok_chain_with_pinned_root", "the pinned root itself in the chain is skipped",
             offer(v2_good, [PINNED, ROOT_V2]), "ok"),
        case("ok_same_version_same_image", "the floor's own release again (a re-offer)",
             offer(manifest(version=2)), "ok", floor=2, floor_image=IMAGE),
        case("ok_expires_at_skew_edge", "expires = now - skew", offer(manifest(expires=T - SKEW,
                                                                                not_before=T - 9999)), "ok"),
        case("ok_not_before_at_skew_edge", "not_before = now + skew", offer(manifest(not_before=T + SKEW)), "ok"),
        # size and structure
        case("oversized", "max_offer_size + 1 bytes, refused before parsing", "{" + " " * (MAX_OFFER - 1) + "}",
             "oversized"),
        case("empty", "zero bytes", "", "malformed"),
        case("not_json", "", "firmware!", "malformed"),
        case("array", "", "[]", "malformed"),
        case("duplicate_key", "parsers disagree on which duplicate wins",
             offer(good)[:-1] + ',"type":"firmware-offer"}', "malformed"),
        case("wrong_offer_type", "", offer(good, type="firmware-recall"), "malformed"),
        case("extra_offer_field", "", offer(good, force=True), "malformed"),
        case("url_not_http", "", offer(good, url="file:///etc/passwd"), "malformed"),
        case("manifest_payload_type_root", "a root is not a manifest",
             offer({**good, "payloadType": ROOT_TYPE}), "malformed"),
        case("manifest_padded_base64", "", offer({**good, "payload": good["payload"] + "="}), "malformed"),
        case("manifest_extra_field", "", offer({**good, "note": "x"}), "malformed"),
        case("signature_extra_field", "", offer({**good, "signatures": [{**good["signatures"][0], "x": 1}]}),
             "malformed"),
        case("keyid_uppercase", "key ids are lowercase hex",
             offer({**good, "signatures": [{**s, "keyid": s["keyid"].upper()} for s in good["signatures"]]}),
             "malformed"),
        # roots
        case("root_bad_body", "root v2 with threshold 0",
             offer(v2_good, [root_env(2, release=("release-4", "release-5"), threshold=0)]), "root_malformed"),
        case("root_not_an_envelope", "", offer(good, ["root"]), "root_malformed"),  # type: ignore[list-item]
        case("root_gap", "root v3 without v2", offer(good, [root_env(3, release=("release-4", "release-5"))]),
             "root_version"),
        case("root_conflicting_v1", "another root claiming version 1",
             offer(good, [root_env(1, release=("release-4", "release-5"))]), "root_version"),
        case("root_one_root_key", "root v2 signed by 1 of the 2 root keys",
             offer(v2_good, [root_env(2, ("root-1",), release=("release-4", "release-5"))]), "root_signature"),
        case("root_self_signed_takeover", "root v2 with new root keys signs itself only",
             offer(v2_good, [root_env(2, ("mallory", "release-5"), release=("release-4", "release-5"),
                                      root=("mallory", "release-5"))]), "root_signature"),
        case("root_signed_by_release_keys", "release keys cannot sign a root",
             offer(v2_good, [root_env(2, ("release-1", "release-2"), release=("release-4", "release-5"))]),
             "root_signature"),
        case("root_expired", "the root the chain ends at has expired",
             offer(v2_good, [root_env(2, release=("release-4", "release-5"), expires=T - 1)]), "root_expired"),
        # signatures
        case("unsigned", "", offer(manifest(())), "unsigned"),
        case("unknown_key", "signed by keys no root lists", offer(manifest(("mallory",))), "unknown_key"),
        case("root_key_signs_manifest", "root keys are not release keys", offer(manifest(("root-1", "root-2"))),
             "unknown_key"),
        case("retired_keys_after_rotation", "old release keys after root v2 retired them (replayed old manifest)",
             offer(manifest(version=3), [ROOT_V2]), "unknown_key"),
        case("tampered_version", "version changed after signing",
             offer(tamper(good, lambda b: b.update(version=99))), "bad_signature"),
        case("tampered_digest", "image digest swapped after signing",
             offer(tamper(good, lambda b: b["image"].update(sha256="0" * 64))), "bad_signature"),
        case("der_signatures", "ASN.1 DER instead of 64-byte r||s", offer(der_sig(good)), "bad_signature"),
        case("zero_signatures", "r = s = 0", offer({**good, "signatures": [
            {"keyid": kid("release-1"), "sig": b64(bytes(64))}, {"keyid": kid("release-2"), "sig": b64(bytes(64))}]}),
            "bad_signature"),
        case("root_type_signature", "signatures over PAE(root type, payload)",
             offer(envelope(MANIFEST_TYPE, canon(manifest_body()), ("release-1", "release-2"), sig_type=ROOT_TYPE)),
             "bad_signature"),
        case("one_below_threshold", "1 of the 2 required", offer(manifest(("release-1",))), "below_threshold"),
        case("same_key_twice", "one key, two signatures", offer(manifest(("release-2", "release-2"))),
             "below_threshold"),
        case("one_good_one_forged", "the second signature is by mallory under release-2's id",
             offer(envelope(MANIFEST_TYPE, canon(manifest_body()), ("release-1",), extra_sigs=[
                 (kid("release-2"), sign_raw("mallory", pae(MANIFEST_TYPE, canon(manifest_body()))))])),
             "below_threshold"),
        # the signed body
        case("missing_expires", "", offer(raw_manifest(canon({k: v for k, v in manifest_body().items()
                                                              if k != "expires"}))), "bad_manifest"),
        case("extra_manifest_field", "", offer(raw_manifest(canon(manifest_body(install_script="rm -rf /")))),
             "bad_manifest"),
        case("version_zero", "", offer(manifest(version=0)), "bad_manifest"),
        case("version_string", "", offer(raw_manifest(canon({**manifest_body(), "version": "2"}))), "bad_manifest"),
        case("version_float", "integers only",
             offer(raw_manifest(canon(manifest_body()).replace(b'"version":2', b'"version":2.0'))), "bad_manifest"),
        case("not_canonical", "whitespace in the signed payload",
             offer(raw_manifest(json.dumps(manifest_body(), sort_keys=True).encode())), "bad_manifest"),
        case("unsorted_keys", "", offer(raw_manifest(json.dumps(manifest_body(), separators=(",", ":")).encode())),
             "bad_manifest"),
        case("sha256_uppercase", "", offer(raw_manifest(canon({**manifest_body(), "image": {
            "sha256": hashlib.sha256(IMAGE).hexdigest().upper(), "size": len(IMAGE)}}))), "bad_manifest"),
        case("size_zero", "", offer(raw_manifest(canon({**manifest_body(), "image": {
            "sha256": hashlib.sha256(IMAGE).hexdigest(), "size": 0}}))), "bad_manifest"),
        case("expires_before_not_before", "", offer(manifest(not_before=T, expires=T - 1)), "bad_manifest"),
        case("class_uppercase", "", offer(manifest(device_class="Pump-Ctl")), "bad_manifest"),
        # for whom, when
        case("wrong_class", "a valve controller's firmware", offer(manifest(device_class="valve-ctl")),
             "wrong_class"),
        case("not_yet_valid", "not_before = now + skew + 1", offer(manifest(not_before=T + SKEW + 1)),
             "not_yet_valid"),
        case("expired", "expires = now - skew - 1", offer(manifest(not_before=T - 9999, expires=T - SKEW - 1)),
             "expired"),
        # versions
        case("rolled_back", "version 2 below the floor 3", offer(good), "rolled_back", floor=3),
        case("replayed_old_release", "the genuine v2 offer after v5 was installed", offer(good), "rolled_back",
             floor=5),
        case("version_conflict", "version 2 again, with another image", offer(good), "version_conflict", floor=2),
        # the image
        case("image_digest_mismatch", "one byte flipped", offer(good), "ok",
             image=IMAGE[:-1] + bytes([IMAGE[-1] ^ 1]), expect_image="digest_mismatch"),
        case("image_truncated", "the last byte missing", offer(good), "ok", image=IMAGE[:-1],
             expect_image="truncated"),
        case("image_too_long", "one byte past the signed size", offer(good), "ok", image=IMAGE + b"\x00",
             expect_image="image_too_long"),
    ]


def render() -> str:
    doc = {
        "description": "Firmware offer test vectors (DSSE-style envelopes, ECDSA P-256/SHA-256, k-of-n release "
                       "keys, rotatable root). For each case: a verifier pinned to 'pinned_root', at time 'now', "
                       "for a device of class 'device_class' whose anti-rollback floor is 'floor' (version, and "
                       "the installed image whose SHA-256 that version names), receives 'offer' (UTF-8 bytes) "
                       "and must answer 'expect' ('ok' or the reason code). When 'image_hex' is present the "
                       "accepted offer's image is then streamed and must end in 'expect_image'. TEST KEYS: "
                       "derived from public seeds.",
        "format": 1,
        "generator": "tests/vectors/make_firmware_vectors.py",
        "now": NOW.isoformat().replace("+00:00", "Z"),
        "now_unix": T,
        "max_skew_seconds": SKEW,
        "max_offer_size": MAX_OFFER,
        "device_class": CLASS,
        "pinned_root": PINNED,
        "keys": {n: {"keyid": kid(n), "public_key_pem": KEYS[n].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()} for n in KEYS},
        "cases": build_cases(),
    }
    return json.dumps(doc, indent=1, ensure_ascii=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file on disk is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        return 0 if OUT.exists() and OUT.read_text("utf-8") == text else 1
    atomic_write_text(OUT, text)
    print(f"wrote {OUT} ({len(json.loads(text)['cases'])} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
