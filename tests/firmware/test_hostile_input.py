"""Hostile bytes never crash the verifier: every input is accepted or refused with a published reason."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_core.firmware import REASONS, FirmwareRefused, VersionFloor, canonical_json, verify_offer
from tests.firmware.release import CLASS, NOW, Release

RELEASE = Release()
ROOT = RELEASE.pinned_root()
GOOD = RELEASE.offer(b"image" * 100, url="https://gw/fw")


def verdict(payload: bytes) -> str:
    try:
        verify_offer(payload, root=ROOT, device_class=CLASS, floor=VersionFloor(1), now=NOW)
    except FirmwareRefused as exc:
        return exc.reason
    return "ok"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    assert verdict(data) in REASONS


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(GOOD) - 1), st.integers(min_value=1, max_value=255))
def test_every_flipped_byte_of_a_good_offer_is_refused_or_harmless(position: int, xor: int) -> None:
    mutated = bytearray(GOOD)
    mutated[position] ^= xor
    got = verdict(bytes(mutated))
    assert got in (*REASONS, "ok")
    if got == "ok":  # only the unsigned url may change, and only into another valid url
        assert json.loads(mutated)["manifest"] == json.loads(GOOD)["manifest"]


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["manifest", "roots", "url", "type", "manifest.payload", "manifest.signatures",
                        "manifest.payloadType"]), JSONISH)
def test_any_json_in_any_field(field: str, value: object) -> None:
    offer = json.loads(GOOD)
    if "." in field:
        outer, inner = field.split(".")
        offer[outer][inner] = value
    else:
        offer[field] = value
    try:
        payload = canonical_json(offer)
    except ValueError:
        return
    assert verdict(payload) in (*REASONS, "ok")
