"""The firmware verifier: every forgery refused with its one reason code; rotation moves forward."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from edge_core.firmware import (
    REASONS,
    FirmwareRefused,
    ImageCheck,
    VersionFloor,
    canonical_json,
    make_offer,
    parse_root_document,
    verify_offer,
)
from tests.firmware.release import CLASS, NOW, Release, signer

IMAGE = bytes(range(256)) * 64


def verdict(offer: bytes, release: Release, *, floor: VersionFloor | None = None, device_class: str = CLASS,
            now=NOW) -> str:  # type: ignore[no-untyped-def]
    try:
        verify_offer(offer, root=release.pinned_root(), device_class=device_class,
                     floor=floor or VersionFloor(1), now=now)
    except FirmwareRefused as exc:
        return exc.reason
    return "ok"


def test_valid_offer_is_accepted() -> None:
    release = Release()
    got = verify_offer(release.offer(IMAGE, url="http://127.0.0.1:1/img"), root=release.pinned_root(),
                       device_class=CLASS, floor=VersionFloor(1), now=NOW)
    assert got.manifest.version == 2 and got.manifest.size == len(IMAGE)
    assert len(got.manifest.signers) == 2 and got.url == "http://127.0.0.1:1/img"


def test_wrong_key_is_unknown_key() -> None:
    release = Release()
    assert verdict(make_offer(release.manifest(IMAGE, signed_by=[signer(), signer()])), release) == "unknown_key"


def test_one_signature_below_threshold() -> None:
    release = Release()
    assert verdict(make_offer(release.manifest(IMAGE, signed_by=release.release_keys[:1])), release) \
        == "below_threshold"


def test_the_same_key_twice_counts_once() -> None:
    release = Release()
    one = release.release_keys[0]
    assert verdict(make_offer(release.manifest(IMAGE, signed_by=[one, one])), release) == "below_threshold"


def test_unsigned() -> None:
    release = Release()
    assert verdict(make_offer(release.manifest(IMAGE, signed_by=[])), release) == "unsigned"


def test_tampered_manifest_is_bad_signature() -> None:
    release = Release()
    env = json.loads(release.manifest(IMAGE))
    body = json.loads(_unb64(env["payload"]))
    body["version"] = 99
    env["payload"] = _b64(canonical_json(body))
    assert verdict(make_offer(canonical_json(env)), release) == "bad_signature"


def test_manifest_for_another_class() -> None:
    release = Release()
    assert verdict(release.offer(IMAGE, device_class="valve-ctl"), release) == "wrong_class"


def test_expired_and_not_yet_valid() -> None:
    release = Release()
    assert verdict(release.offer(IMAGE, expires=NOW - timedelta(hours=1), not_before=NOW - timedelta(days=2)),
                   release) == "expired"
    assert verdict(release.offer(IMAGE, not_before=NOW + timedelta(hours=1)), release) == "not_yet_valid"


def test_version_rollback_and_conflict() -> None:
    release = Release()
    assert verdict(release.offer(IMAGE, version=3), release, floor=VersionFloor(4)) == "rolled_back"
    assert verdict(release.offer(IMAGE, version=4), release, floor=VersionFloor(4, "0" * 64)) == "version_conflict"
    assert verdict(release.offer(IMAGE, version=4), release, floor=VersionFloor(4)) == "ok"


def test_release_key_rotation_refuses_the_old_keys_and_old_manifests() -> None:
    release = Release()
    old_keys = release.release_keys
    replayed = release.offer(IMAGE, version=2)  # captured before the rotation
    release.rotate([signer(), signer(), signer()])
    # the chain in a new offer moves the verifier to root v2 ...
    new_offer = release.offer(IMAGE, version=3)
    got = verify_offer(new_offer, root=release.pinned_root(), device_class=CLASS, floor=VersionFloor(1), now=NOW)
    assert got.root.version == 2
    # ... after which manifests signed by the retired keys are refused, even a replayed genuine one
    forged = make_offer(release.manifest(IMAGE, version=5, signed_by=old_keys[:2]), roots=release.chain[1:])
    for offer in (forged, replayed):
        with pytest.raises(FirmwareRefused) as info:
            verify_offer(offer, root=got.root, device_class=CLASS, floor=VersionFloor(3), now=NOW)
        assert info.value.reason in {"unknown_key", "rolled_back"}
    with pytest.raises(FirmwareRefused, match="release key") as info:
        verify_offer(forged, root=got.root, device_class=CLASS, floor=VersionFloor(1), now=NOW)
    assert info.value.reason == "unknown_key"


def test_root_chain_rules() -> None:
    release = Release()
    v2 = release.rotate([signer(), signer()])
    # skipping a version is refused
    gap = make_offer(release.manifest(IMAGE), roots=[release.root_envelope(3, release.root_keys)])
    assert verdict(gap, release) == "root_version"
    # a root signed by one of the two root keys is below the root threshold
    weak = make_offer(release.manifest(IMAGE), roots=[release.root_envelope(2, release.root_keys[:1])])
    assert verdict(weak, release) == "root_signature"
    # a root signed by an outsider
    outsider = make_offer(release.manifest(IMAGE), roots=[release.root_envelope(2, [signer(), signer()])])
    assert verdict(outsider, release) == "root_signature"
    assert verdict(make_offer(release.manifest(IMAGE), roots=[v2]), release) == "ok"
    # an expired trusted root refuses everything until a new root arrives
    assert verdict(release.offer(IMAGE), release, now=NOW + timedelta(days=400)) == "root_expired"


def test_structure_errors_are_malformed_or_oversized() -> None:
    release = Release()
    assert verdict(b"", release) == "malformed"
    assert verdict(b'{"type":"firmware-offer","type":"x"}', release) == "malformed"
    assert verdict(b"{" + b" " * 70000 + b"}", release) == "oversized"
    env = json.loads(release.manifest(IMAGE))
    env["payloadType"] = "application/vnd.edge.firmware-root+json"
    assert verdict(make_offer(canonical_json(env)), release) == "malformed"


def test_non_canonical_signed_payload_is_bad_manifest() -> None:
    from edge_core.firmware import MANIFEST_TYPE, pae

    release = Release()
    body = json.loads(_unb64(json.loads(release.manifest(IMAGE))["payload"]))
    payload = json.dumps(body, indent=1).encode()
    sigs = [{"keyid": k.keyid, "sig": _b64(k.sign(pae(MANIFEST_TYPE, payload)))} for k in release.release_keys[:2]]
    env = canonical_json({"payloadType": MANIFEST_TYPE, "payload": _b64(payload), "signatures": sigs})
    assert verdict(make_offer(env), release) == "bad_manifest"


def test_pinned_root_must_be_self_signed_to_threshold() -> None:
    release = Release()
    with pytest.raises(FirmwareRefused) as info:
        parse_root_document(release.root_envelope(1, release.root_keys[:1]))
    assert info.value.reason == "root_signature"


@pytest.mark.parametrize(("image", "reason"), [
    (IMAGE[:-1], "truncated"),
    (IMAGE[:-1] + b"\x00", "digest_mismatch"),
    (IMAGE + b"\x00", "image_too_long"),
])
def test_image_check(image: bytes, reason: str) -> None:
    release = Release()
    got = verify_offer(release.offer(IMAGE), root=release.pinned_root(), device_class=CLASS,
                       floor=VersionFloor(1), now=NOW)
    check = ImageCheck(got.manifest)
    with pytest.raises(FirmwareRefused) as info:
        for i in range(0, len(image), 1000):
            check.update(image[i:i + 1000])
        check.finish()
    assert info.value.reason == reason


def test_reason_codes_are_unique() -> None:
    assert len(REASONS) == len(set(REASONS))


def _b64(data: bytes) -> str:
    import base64
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    import base64
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_offer_id_names_an_offer_even_when_it_is_refused() -> None:
    import hashlib

    from edge_core.firmware import offer_id

    release = Release()
    envelope = release.manifest(IMAGE)
    offer = make_offer(envelope, url="https://127.0.0.1:1/img")
    verified = verify_offer(offer, root=release.pinned_root(), device_class=CLASS, floor=VersionFloor(1), now=NOW)
    assert offer_id(offer) == hashlib.sha256(verified.manifest_envelope).hexdigest()
    # the same manifest with another URL or root chain is the same offer; another manifest is not
    assert offer_id(make_offer(envelope, roots=release.chain)) == offer_id(offer)
    assert offer_id(release.offer(IMAGE, version=3)) != offer_id(offer)
    # a device that trusts other keys refuses before any signature verified, yet can name the offer
    stranger = Release()
    assert verdict(offer, stranger) == "unknown_key" and offer_id(offer) is not None
    for junk in (b"", b"[]", b'{"manifest": 1}', b"\xff", b'{"manifest": {"a": 1.5}}', b"{" * 100000):
        assert offer_id(junk) is None
