"""Signed firmware: manifests, the release-key root, and the one verifier both sides run.

Wire format (``docs/firmware.md``): every signed document is a DSSE-style envelope::

    {"payloadType": "application/vnd.edge.firmware-manifest+json",
     "payload": "<base64url of canonical JSON>",
     "signatures": [{"keyid": "<sha256 hex of the key's SPKI DER>", "sig": "<base64url r||s>"}]}

Each signature is ECDSA P-256 / SHA-256 over the DSSE pre-authentication encoding
``PAE(payloadType, payload)``, so a root signature can never pass as a manifest signature.
The payload is canonical JSON (sorted keys, no whitespace, ASCII, integers only): the verifier
checks the signature over the bytes it received, then refuses a payload that is not canonical.

A *root* (in the spirit of python-tuf's root) lists the release keys and two thresholds:
``root`` (who may sign the next root) and ``release`` (who may sign manifests). A new root
must have version N+1 and be signed by a threshold of root keys of version N *and* of its own;
so release keys rotate and the key list only moves forward.

``verify_offer`` returns a ``VerifiedOffer`` or raises ``FirmwareRefused`` with exactly one
stable reason code from ``REASONS``. The checks run in a fixed order, pinned by the published
vectors (``tests/vectors/firmware_vectors.json``):

1. ``oversized``, ``malformed``: size, then the offer's and envelopes' structure;
2. ``root_malformed``, ``root_version``, ``root_signature``: each root in the offer's chain,
   then ``root_expired`` for the root that results;
3. ``unsigned``, ``unknown_key``, ``bad_signature``, ``below_threshold``: the manifest's
   signatures against the release role (distinct valid key ids are counted);
4. ``bad_manifest``: the signed body's schema and canonical form;
5. ``wrong_class``, ``not_yet_valid``, ``expired``: for whom and when;
6. ``rolled_back``, ``version_conflict``: against the caller's version floor.

The image itself is checked while it streams (``ImageCheck``): ``image_too_long``,
``truncated``, ``digest_mismatch`` (``IMAGE_REASONS``).

No I/O: the bytes, the time, the trusted root and the floor are handed in. The caller
persists the root and the floor that come back (state only moves forward).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from edge_core import strictjson
from edge_core.clock import as_utc
from edge_core.errors import EnvelopeError

__all__ = [
    "IMAGE_REASONS",
    "MANIFEST_TYPE",
    "OFFER_TOPIC",
    "REASONS",
    "REPORT_TOPIC",
    "ROOT_TYPE",
    "FirmwarePolicy",
    "FirmwareRefused",
    "ImageCheck",
    "Manifest",
    "Role",
    "Root",
    "Signer",
    "SoftwareSigner",
    "VerifiedOffer",
    "VersionFloor",
    "add_signatures",
    "admit_offer",
    "authenticate_offer",
    "canonical_json",
    "check_floor",
    "device_from_topic",
    "key_id",
    "make_manifest",
    "make_offer",
    "make_root",
    "offer_id",
    "pae",
    "parse_root_document",
    "sign_envelope",
    "verify_offer",
    "verify_release",
    "verify_root_update",
]

MANIFEST_TYPE = "application/vnd.edge.firmware-manifest+json"
ROOT_TYPE = "application/vnd.edge.firmware-root+json"
SPEC = 1
OFFER_TOPIC = "devices/{device}/firmware/offer"
REPORT_TOPIC = "devices/{device}/firmware/report"

#: Stable reason codes, in check order. Never renamed, only added to.
REASONS = (
    "oversized",
    "malformed",
    "root_malformed",
    "root_version",
    "root_signature",
    "root_expired",
    "unsigned",
    "unknown_key",
    "bad_signature",
    "below_threshold",
    "bad_manifest",
    "wrong_class",
    "not_yet_valid",
    "expired",
    "rolled_back",
    "version_conflict",
)
#: Reason codes of the streamed image check (device side).
IMAGE_REASONS = ("image_too_long", "truncated", "digest_mismatch")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CLASS_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_OFFER_RE = re.compile(r"devices/([^/]+)/firmware/offer")
_MAX_SIGNATURES = 16
_MAX_ROOTS = 8
_MAX_KEYS = 32
_MAX_NUMERIC_DATE = 253402300799
_MAX_VERSION = 2**53 - 1  # every JSON parser represents it exactly
_ENVELOPE_KEYS = frozenset({"payloadType", "payload", "signatures"})
_OFFER_KEYS = frozenset({"type", "manifest", "roots", "url"})
_MANIFEST_KEYS = frozenset({"_type", "spec", "device_class", "version", "image", "not_before", "expires"})
_ROOT_KEYS = frozenset({"_type", "spec", "version", "expires", "keys", "root", "release"})


class FirmwareRefused(EnvelopeError):
    """A firmware offer, root or image was refused; ``reason`` is one of ``REASONS``/``IMAGE_REASONS``.

    ``version`` and ``device_class`` are set only once the manifest's signatures verified.
    """

    def __init__(self, reason: str, message: str, *, version: int | None = None,
                 device_class: str | None = None) -> None:
        super().__init__(reason, message)
        self.version = version
        self.device_class = device_class


def _refuse(reason: str, message: str) -> NoReturn:
    raise FirmwareRefused(reason, message)


_Refuser = Callable[[str, str], NoReturn]


# --------------------------------------------------------------------------- primitives


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII only; floats are refused (integers only)."""
    _no_floats(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _no_floats(value: Any) -> None:
    if isinstance(value, float):
        raise ValueError("canonical JSON carries integers only, not floats")  # noqa: TRY004 - one error type for bad input
    if isinstance(value, dict):
        for item in value.values():
            _no_floats(item)
    elif isinstance(value, list):
        for item in value:
            _no_floats(item)


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what each signature covers."""
    kind = payload_type.encode("ascii")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """Key id: SHA-256 (hex) of the key's SubjectPublicKeyInfo DER."""
    return hashlib.sha256(_spki(public_key)).hexdigest()


def _spki(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Signer(Protocol):
    """Anything that signs with one P-256 release key: a PKCS#11 token, or a development key."""

    @property
    def keyid(self) -> str: ...

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign(self, data: bytes) -> bytes:
        """ECDSA P-256 / SHA-256 over ``data``; the 64-byte r||s form."""
        ...


class SoftwareSigner:
    """A signer over a private key held in this process (tests, vectors, benchmarks)."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or private_key.curve.name != "secp256r1":
            raise TypeError("a release key is an EC P-256 private key")
        self._key = private_key
        self._keyid = key_id(private_key.public_key())

    @property
    def keyid(self) -> str:
        return self._keyid

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def sign(self, data: bytes) -> bytes:
        r, s = decode_dss_signature(self._key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def sign_envelope(payload_type: str, body: Mapping[str, Any], signers: Sequence[Signer]) -> bytes:
    """The envelope (canonical JSON bytes) of ``body`` signed by each of ``signers``."""
    payload = canonical_json(dict(body))
    signing_input = pae(payload_type, payload)
    signatures = []
    for signer in signers:
        sig = signer.sign(signing_input)
        if len(sig) != 64:
            raise ValueError(f"signer {signer.keyid[:16]} returned {len(sig)} bytes, not a 64-byte r||s")
        signatures.append({"keyid": signer.keyid, "sig": _b64(sig)})
    return canonical_json({"payloadType": payload_type, "payload": _b64(payload), "signatures": signatures})


def add_signatures(envelope: bytes, signers: Sequence[Signer]) -> bytes:
    """``envelope`` with one more signature per signer (threshold signing by separate holders).

    The payload is not re-encoded: every holder signs the same bytes. A key that already
    signed is skipped.
    """
    env = _envelope(_json(envelope, "envelope", "malformed"), MANIFEST_TYPE, "manifest", "malformed")
    signing_input = pae(env.payload_type, env.payload)
    present = {kid for kid, _ in env.signatures}
    sigs = [dict(s) for s in env.raw["signatures"]]
    for signer in signers:
        if signer.keyid not in present:
            sigs.append({"keyid": signer.keyid, "sig": _b64(signer.sign(signing_input))})
            present.add(signer.keyid)
    return canonical_json({**env.raw, "signatures": sigs})


# --------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Role:
    keyids: frozenset[str]
    threshold: int


@dataclass(frozen=True)
class Root:
    """A verified release-key list. ``raw`` is the envelope it came in (for persisting)."""

    version: int
    expires: datetime
    keys: Mapping[str, ec.EllipticCurvePublicKey]
    root: Role
    release: Role
    raw: bytes = field(repr=False, compare=False)


@dataclass(frozen=True)
class Manifest:
    device_class: str
    version: int
    sha256: str
    size: int
    not_before: datetime
    expires: datetime
    signers: frozenset[str]
    digest: str  # SHA-256 of the signed payload: the identity of this manifest


@dataclass(frozen=True)
class VersionFloor:
    """The highest version a verifier has accepted for a class, and the image it named."""

    version: int = 0
    sha256: str | None = None


@dataclass(frozen=True)
class VerifiedOffer:
    manifest: Manifest
    root: Root  # the root after the offer's chain (the caller's, if the offer carried none newer)
    url: str | None
    manifest_envelope: bytes = field(repr=False)

    def floor(self) -> VersionFloor:
        return VersionFloor(self.manifest.version, self.manifest.sha256)


@dataclass(frozen=True)
class FirmwarePolicy:
    max_offer_size: int = 64 * 1024
    max_skew: timedelta = timedelta(minutes=5)
    max_image_size: int = 256 * 1024 * 1024


def device_from_topic(topic: str) -> str | None:
    """The device of an offer topic ``devices/{device}/firmware/offer``, or None."""
    match = _OFFER_RE.fullmatch(topic)
    return match.group(1) if match else None


# --------------------------------------------------------------------------- building


def make_root(
    *, version: int, expires: datetime, keys: Sequence[ec.EllipticCurvePublicKey],
    root_keyids: Sequence[str], root_threshold: int, release_keyids: Sequence[str], release_threshold: int,
) -> dict[str, Any]:
    """The body of a root document (sign it with ``sign_envelope(ROOT_TYPE, ...)``)."""
    body = {
        "_type": "firmware-root", "spec": SPEC, "version": version, "expires": _ts(expires),
        "keys": {key_id(k): _b64(_spki(k)) for k in keys},
        "root": {"keyids": sorted(root_keyids), "threshold": root_threshold},
        "release": {"keyids": sorted(release_keyids), "threshold": release_threshold},
    }
    _parse_root_body(body, _refuse)  # the producer refuses what a verifier would
    return body


def make_manifest(
    *, device_class: str, version: int, image_sha256: str, size: int, not_before: datetime, expires: datetime,
) -> dict[str, Any]:
    body = {"_type": "firmware-manifest", "spec": SPEC, "device_class": device_class, "version": version,
            "image": {"sha256": image_sha256, "size": size}, "not_before": _ts(not_before),
            "expires": _ts(expires)}
    _parse_manifest_body(body, frozenset(), "", _refuse)
    return body


def make_offer(manifest_envelope: bytes, *, roots: Sequence[bytes] = (), url: str | None = None) -> bytes:
    offer: dict[str, Any] = {"type": "firmware-offer", "manifest": json.loads(manifest_envelope),
                             "roots": [json.loads(r) for r in roots]}
    if url is not None:
        offer["url"] = url
    return canonical_json(offer)


def offer_id(payload: bytes, *, max_size: int = 64 * 1024) -> str | None:
    """The identity of an offer: SHA-256 (hex) of the canonical JSON of the manifest envelope it carries.

    It needs no trusted key, so a device can name the offer it answers even when it refuses the
    offer before any signature verified (``unknown_key``, ``root_expired``); the publisher matches
    reports to its rollout by it. None for bytes that carry no manifest object (or more than
    ``max_size`` of them). For a verified offer it is SHA-256 of ``VerifiedOffer.manifest_envelope``.
    """
    if not isinstance(payload, bytes | bytearray | memoryview) or len(payload) > max_size:
        return None
    try:
        manifest = strictjson.json_object(bytes(payload), "offer").get("manifest")
        if not isinstance(manifest, dict):
            return None
        return hashlib.sha256(canonical_json(manifest)).hexdigest()
    except (ValueError, TypeError, RecursionError):
        return None


def _ts(when: datetime) -> int:
    return int(as_utc(when).timestamp())


# --------------------------------------------------------------------------- verifying


def verify_offer(
    payload: bytes, *, root: Root, device_class: str, floor: VersionFloor, now: datetime,
    policy: FirmwarePolicy | None = None,
) -> VerifiedOffer:
    """Verify a firmware offer for a device of ``device_class``; see the module docstring for the order."""
    policy = policy or FirmwarePolicy()
    offer = authenticate_offer(payload, root=root, now=now, policy=policy)
    return admit_offer(offer, device_class=device_class, floor=floor, now=now, policy=policy)


def authenticate_offer(payload: bytes, *, root: Root, now: datetime, policy: FirmwarePolicy) -> VerifiedOffer:
    """Checks 1 to 4 (structure, root chain, signatures, schema): they depend only on the bytes and ``root``.

    A verifier that sees the same offer bytes many times (the broker, during a rollout) may keep
    this result for as long as its trusted root is ``root``, then call ``admit_offer`` each time.
    """
    now = as_utc(now)
    if not isinstance(payload, bytes | bytearray | memoryview):
        _refuse("malformed", f"an offer is bytes, not {type(payload).__name__}")
    if len(payload) > policy.max_offer_size:
        _refuse("oversized", f"offer is {len(payload)} bytes; at most {policy.max_offer_size} allowed")
    offer = _json(bytes(payload), "offer", "malformed")
    extra = sorted(set(offer) - _OFFER_KEYS)
    if extra:
        _refuse("malformed", f"offer field {extra[0]!r:.40} is not allowed")
    if offer.get("type") != "firmware-offer":
        _refuse("malformed", "offer 'type' must be 'firmware-offer'")
    url = offer.get("url")
    if url is not None and not (isinstance(url, str) and url.startswith(("https://", "http://")) and len(url) < 2048):
        _refuse("malformed", "offer 'url' must be an http(s) URL")
    roots = offer.get("roots", [])
    if not isinstance(roots, list) or len(roots) > _MAX_ROOTS:
        _refuse("malformed", f"offer 'roots' must be a list of at most {_MAX_ROOTS} root envelopes")
    manifest_env = _envelope(offer.get("manifest"), MANIFEST_TYPE, "manifest", "malformed")
    root_envs = [_envelope(r, ROOT_TYPE, f"roots[{i}]", "root_malformed") for i, r in enumerate(roots)]
    for env in root_envs:
        root = _apply_root(root, env)
    _check_root_fresh(root, now)
    manifest = _verify_manifest(manifest_env, root)
    if manifest.size > policy.max_image_size:
        _manifest_refuser(manifest)("bad_manifest", f"image size {manifest.size} exceeds the limit "
                                                    f"{policy.max_image_size}")
    return VerifiedOffer(manifest=manifest, root=root, url=url, manifest_envelope=canonical_json(offer["manifest"]))


def admit_offer(
    offer: VerifiedOffer, *, device_class: str, floor: VersionFloor, now: datetime, policy: FirmwarePolicy,
) -> VerifiedOffer:
    """Checks 5 and 6 (and the root's expiry again): for whom, when, and against the version floor."""
    now = as_utc(now)
    _check_root_fresh(offer.root, now)
    manifest = offer.manifest
    refuse = _manifest_refuser(manifest)
    if manifest.device_class != device_class:
        refuse("wrong_class", f"manifest is for class {manifest.device_class!r}, the device is {device_class!r}")
    skew = policy.max_skew
    if now < manifest.not_before - skew:
        refuse("not_yet_valid", f"manifest valid from {manifest.not_before.isoformat()}; now {now.isoformat()}")
    if now > manifest.expires + skew:
        refuse("expired", f"manifest expired at {manifest.expires.isoformat()}; now {now.isoformat()}")
    check_floor(manifest, floor)
    return offer


def _check_root_fresh(root: Root, now: datetime) -> None:
    if now > root.expires:
        _refuse("root_expired", f"trusted root version {root.version} expired at {root.expires.isoformat()}; "
                                "the release team must publish a new root")


def verify_release(
    manifest_envelope: bytes, chain: Sequence[bytes], *, now: datetime, device_class: str | None = None,
    floor: VersionFloor | None = None, policy: FirmwarePolicy | None = None,
) -> VerifiedOffer:
    """The release tool's check: the manifest as a device pinned to ``chain[0]`` would see it.

    Without ``device_class`` the manifest's own class is used (the signatures are verified
    before the class is read, so the class is the release team's word).
    """
    if not chain:
        raise ValueError("a root chain starts with the pinned root")
    offer = make_offer(manifest_envelope, roots=chain[1:]) if manifest_envelope.lstrip().startswith(b"{") else b""
    pinned = parse_root_document(chain[0])
    floor = floor or VersionFloor()
    try:
        return verify_offer(offer, root=pinned, device_class=device_class or "", floor=floor, now=now, policy=policy)
    except FirmwareRefused as exc:
        if device_class is not None or exc.reason != "wrong_class" or exc.device_class is None:
            raise
        return verify_offer(offer, root=pinned, device_class=exc.device_class, floor=floor, now=now, policy=policy)


def check_floor(manifest: Manifest, floor: VersionFloor) -> None:
    """Versions only move forward; one version names one image."""
    refuse = _manifest_refuser(manifest)
    if manifest.version < floor.version:
        refuse("rolled_back", f"new version {manifest.version} must be >= {floor.version}")
    if manifest.version == floor.version and floor.sha256 is not None and manifest.sha256 != floor.sha256:
        refuse("version_conflict", f"version {manifest.version} was already released with another image")


def _manifest_refuser(manifest: Manifest) -> _Refuser:
    def refuse(reason: str, message: str) -> NoReturn:
        raise FirmwareRefused(reason, message, version=manifest.version, device_class=manifest.device_class)
    return refuse


def verify_root_update(trusted: Root, envelope: bytes) -> Root:
    """The next root (version N+1) if ``envelope`` is one the trusted root N vouches for."""
    env = _envelope(_json(envelope, "root", "root_malformed"), ROOT_TYPE, "root", "root_malformed")
    return _apply_root(trusted, env)


def parse_root_document(envelope: bytes) -> Root:
    """A root read from local, trusted storage (first boot pin, or our own state file).

    The root must carry a threshold of its own root-role signatures; no older root vouches
    for it, so the file itself must be protected (it is the trust anchor).
    """
    env = _envelope(_json(envelope, "root", "root_malformed"), ROOT_TYPE, "root", "root_malformed")
    body = _json(env.payload, "root payload", "root_malformed")
    candidate = _parse_root_body(body, _root_refuser)
    _require_canonical(env.payload, body, "root_malformed")
    _count_valid(env, candidate.keys, candidate.root, "root_signature", "root", refuse=_root_refuser)
    return _with_raw(candidate, env)


def _root_refuser(reason: str, message: str) -> NoReturn:
    raise FirmwareRefused(reason if reason.startswith("root_") else "root_malformed", message)


@dataclass(frozen=True)
class _Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[tuple[str, bytes], ...]
    raw: Mapping[str, Any]


def _envelope(value: Any, payload_type: str, what: str, reason: str) -> _Envelope:
    def refuse(message: str) -> NoReturn:
        _refuse(reason, f"{what}: {message}")

    if not isinstance(value, dict):
        refuse("must be a JSON object envelope")
    extra = sorted(set(value) - _ENVELOPE_KEYS)
    if extra:
        refuse(f"field {extra[0]!r:.40} is not allowed")
    if value.get("payloadType") != payload_type:
        refuse(f"payloadType must be {payload_type!r}")
    raw_payload, sigs = value.get("payload"), value.get("signatures")
    if not isinstance(raw_payload, str) or not isinstance(sigs, list):
        refuse("payload must be a string and signatures a list")
    try:
        payload = strictjson.b64url_canonical(raw_payload.encode("ascii", "replace"), "payload")
    except ValueError as exc:
        refuse(str(exc))
    if len(sigs) > _MAX_SIGNATURES:
        refuse(f"{len(sigs)} signatures; at most {_MAX_SIGNATURES}")
    signatures = []
    for i, entry in enumerate(sigs):
        if not isinstance(entry, dict) or set(entry) != {"keyid", "sig"}:
            refuse(f"signatures[{i}] must be an object with exactly 'keyid' and 'sig'")
        kid, sig = entry["keyid"], entry["sig"]
        if not isinstance(kid, str) or not _HEX64.fullmatch(kid) or not isinstance(sig, str):
            refuse(f"signatures[{i}]: keyid must be 64 lowercase hex characters and sig a string")
        try:
            signatures.append((kid, strictjson.b64url_canonical(sig.encode("ascii", "replace"), "sig")))
        except ValueError as exc:
            refuse(f"signatures[{i}]: {exc}")
    return _Envelope(payload_type, payload, tuple(signatures), value)


def _json(raw: bytes, what: str, reason: str) -> dict[str, Any]:
    try:
        return strictjson.json_object(raw, what)
    except ValueError as exc:
        _refuse(reason, str(exc))


def _verify_ecdsa(key: ec.EllipticCurvePublicKey, sig: bytes, data: bytes) -> bool:
    if len(sig) != 64:
        return False
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    if not (r and s):
        return False
    try:
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _count_valid(
    env: _Envelope, keys: Mapping[str, ec.EllipticCurvePublicKey], role: Role, reason: str, what: str,
    *, refuse: _Refuser = _refuse,
) -> frozenset[str]:
    """Distinct role key ids whose signature verifies; ``reason`` when below the role's threshold."""
    signing_input = pae(env.payload_type, env.payload)
    valid = set()
    for kid, sig in env.signatures:
        if kid in role.keyids and kid not in valid and _verify_ecdsa(keys[kid], sig, signing_input):
            valid.add(kid)
    if len(valid) < role.threshold:
        refuse(reason, f"{what}: {len(valid)} valid signature(s) of the {role.threshold} required")
    return frozenset(valid)


def _apply_root(trusted: Root, env: _Envelope) -> Root:
    body = _json(env.payload, "root payload", "root_malformed")
    candidate = _parse_root_body(body, _root_refuser)
    _require_canonical(env.payload, body, "root_malformed")
    if candidate.version <= trusted.version:
        if canonical_json(dict(env.raw)) == trusted.raw or candidate.version < trusted.version:
            return trusted  # an older link of the chain the verifier already walked
        _refuse("root_version", f"root version {candidate.version} differs from the trusted root of that version")
    if candidate.version != trusted.version + 1:
        _refuse("root_version", f"new root version {candidate.version} must be {trusted.version + 1}")
    _count_valid(env, trusted.keys, trusted.root, "root_signature", f"root v{candidate.version} by root "
                 f"v{trusted.version}")
    _count_valid(env, candidate.keys, candidate.root, "root_signature", f"root v{candidate.version} by itself")
    return _with_raw(candidate, env)


def _with_raw(root: Root, env: _Envelope) -> Root:
    return Root(version=root.version, expires=root.expires, keys=root.keys, root=root.root,
                release=root.release, raw=canonical_json(dict(env.raw)))


def _verify_manifest(env: _Envelope, root: Root) -> Manifest:
    if not env.signatures:
        _refuse("unsigned", "the manifest carries no signature")
    release = root.release
    if not any(kid in release.keyids for kid, _ in env.signatures):
        _refuse("unknown_key", f"no signature is by a release key of root v{root.version}")
    signing_input = pae(env.payload_type, env.payload)
    valid = {kid for kid, sig in env.signatures
             if kid in release.keyids and _verify_ecdsa(root.keys[kid], sig, signing_input)}
    if not valid:
        _refuse("bad_signature", "no release-key signature verifies over the manifest")
    if len(valid) < release.threshold:
        _refuse("below_threshold", f"{len(valid)} valid release signature(s); root v{root.version} "
                                   f"requires {release.threshold}")
    # From here on the manifest is the release team's own words.
    body = _json(env.payload, "manifest payload", "bad_manifest")
    manifest = _parse_manifest_body(body, frozenset(valid), hashlib.sha256(env.payload).hexdigest(), _refuse)
    _require_canonical(env.payload, body, "bad_manifest")
    return manifest


def _require_canonical(payload: bytes, body: dict[str, Any], reason: str) -> None:
    try:
        again = canonical_json(body)
    except ValueError as exc:
        _refuse(reason, f"payload is not canonical JSON: {exc}")
    if again != payload:
        _refuse(reason, "payload is not canonical JSON (sorted keys, no whitespace, ASCII escapes)")


def _int(value: Any, name: str, low: int, high: int, refuse: _Refuser, reason: str) -> int:
    if type(value) is not int or not low <= value <= high:
        refuse(reason, f"{name} must be an integer in {low} .. {high}, not {value!r:.40}")
    return value


def _parse_manifest_body(body: dict[str, Any], signers: frozenset[str], digest: str, refuse: _Refuser) -> Manifest:
    reason = "bad_manifest"
    if set(body) != _MANIFEST_KEYS:
        missing = sorted(_MANIFEST_KEYS - set(body))
        refuse(reason, f"manifest field {missing[0]!r} is missing" if missing
               else f"manifest field {sorted(set(body) - _MANIFEST_KEYS)[0]!r:.40} is not allowed")
    if body["_type"] != "firmware-manifest" or body["spec"] != SPEC:
        refuse(reason, f"manifest must be _type 'firmware-manifest', spec {SPEC}")
    device_class = body["device_class"]
    if not isinstance(device_class, str) or not _CLASS_RE.fullmatch(device_class):
        refuse(reason, "device_class must be 1-64 characters of a-z 0-9 _ . - (starting alphanumeric)")
    version = _int(body["version"], "version", 1, _MAX_VERSION, refuse, reason)
    image = body["image"]
    if not isinstance(image, dict) or set(image) != {"sha256", "size"}:
        refuse(reason, "image must be an object with exactly 'sha256' and 'size'")
    sha = image["sha256"]
    if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
        refuse(reason, "image.sha256 must be 64 lowercase hex characters")
    size = _int(image["size"], "image.size", 1, _MAX_VERSION, refuse, reason)
    not_before = _int(body["not_before"], "not_before", 1, _MAX_NUMERIC_DATE, refuse, reason)
    expires = _int(body["expires"], "expires", 1, _MAX_NUMERIC_DATE, refuse, reason)
    if expires <= not_before:
        refuse(reason, f"expires {expires} must be after not_before {not_before}")
    return Manifest(device_class=device_class, version=version, sha256=sha, size=size,
                    not_before=datetime.fromtimestamp(not_before, UTC), expires=datetime.fromtimestamp(expires, UTC),
                    signers=signers, digest=digest)


def _parse_role(value: Any, name: str, keys: Mapping[str, Any], refuse: _Refuser) -> Role:
    if not isinstance(value, dict) or set(value) != {"keyids", "threshold"}:
        refuse("root_malformed", f"role {name!r} must have exactly 'keyids' and 'threshold'")
    keyids = value["keyids"]
    if not isinstance(keyids, list) or not keyids or len(set(keyids)) != len(keyids) or \
            not all(isinstance(k, str) and k in keys for k in keyids):
        refuse("root_malformed", f"role {name!r}: keyids must be distinct ids listed under 'keys'")
    threshold = _int(value["threshold"], f"{name}.threshold", 1, len(keyids), refuse, "root_malformed")
    return Role(keyids=frozenset(keyids), threshold=threshold)


def _parse_root_body(body: dict[str, Any], refuse: _Refuser) -> Root:
    if set(body) != _ROOT_KEYS:
        refuse("root_malformed", f"root fields must be exactly {', '.join(sorted(_ROOT_KEYS))}")
    if body["_type"] != "firmware-root" or body["spec"] != SPEC:
        refuse("root_malformed", f"root must be _type 'firmware-root', spec {SPEC}")
    version = _int(body["version"], "root version", 1, _MAX_VERSION, refuse, "root_malformed")
    expires = _int(body["expires"], "root expires", 1, _MAX_NUMERIC_DATE, refuse, "root_malformed")
    raw_keys = body["keys"]
    if not isinstance(raw_keys, dict) or not 1 <= len(raw_keys) <= _MAX_KEYS:
        refuse("root_malformed", f"root 'keys' must map 1 to {_MAX_KEYS} key ids to keys")
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for kid, encoded in raw_keys.items():
        try:
            der = strictjson.b64url_canonical(str(encoded).encode("ascii", "replace"), "key")
            key = serialization.load_der_public_key(der)
        except ValueError as exc:
            refuse("root_malformed", f"key {kid[:16]!r}: not a base64url SPKI DER public key ({exc})")
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            refuse("root_malformed", f"key {kid[:16]!r} is not an EC P-256 key")
        if key_id(key) != kid or _spki(key) != der:
            refuse("root_malformed", f"key id {kid[:16]!r} is not the SHA-256 of its SPKI DER")
        keys[kid] = key
    return Root(version=version, expires=datetime.fromtimestamp(expires, UTC), keys=keys,
                root=_parse_role(body["root"], "root", keys, refuse),
                release=_parse_role(body["release"], "release", keys, refuse), raw=b"")


# --------------------------------------------------------------------------- the image


class ImageCheck:
    """Hashes an image while it streams; refuses a byte past the signed size at once."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._hash = hashlib.sha256()
        self.received = 0

    def update(self, chunk: bytes) -> None:
        if self.received + len(chunk) > self.manifest.size:
            raise FirmwareRefused("image_too_long", f"image exceeds its signed size {self.manifest.size}",
                                  version=self.manifest.version, device_class=self.manifest.device_class)
        self._hash.update(chunk)
        self.received += len(chunk)

    def finish(self) -> None:
        m = self.manifest
        if self.received < m.size:
            raise FirmwareRefused("truncated", f"image ended at {self.received} of {m.size} bytes",
                                  version=m.version, device_class=m.device_class)
        if self._hash.hexdigest() != m.sha256:
            raise FirmwareRefused("digest_mismatch", f"image SHA-256 {self._hash.hexdigest()[:16]}... is not the "
                                  f"signed {m.sha256[:16]}...", version=m.version, device_class=m.device_class)

