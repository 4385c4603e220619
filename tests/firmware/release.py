"""One helper for the firmware tests: release keys, roots, manifests and offers."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric import ec

from edge_core.firmware import (
    MANIFEST_TYPE,
    ROOT_TYPE,
    Root,
    SoftwareSigner,
    make_manifest,
    make_offer,
    make_root,
    parse_root_document,
    sign_envelope,
)

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN_PIN = "20261201"  # noqa: S105 - the PIN of a throwaway test token
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CLASS = "pump-ctl"


def signer() -> SoftwareSigner:
    return SoftwareSigner(ec.generate_private_key(ec.SECP256R1()))


@dataclass
class Release:
    """A release team: root keys, release keys (2 of 3 by default) and the root chain so far."""

    root_keys: list[SoftwareSigner] = field(default_factory=lambda: [signer(), signer()])
    release_keys: list[SoftwareSigner] = field(default_factory=lambda: [signer(), signer(), signer()])
    threshold: int = 2
    chain: list[bytes] = field(default_factory=list)
    now: datetime = NOW  # manifests are valid from an hour before to 30 days after

    def __post_init__(self) -> None:
        self.chain.append(self.root_envelope(1, self.root_keys))

    def root_envelope(self, version: int, signed_by: Sequence[SoftwareSigner]) -> bytes:
        keys = [k.public_key() for k in (*self.root_keys, *self.release_keys)]
        body = make_root(version=version, expires=self.now + timedelta(days=365), keys=keys,
                         root_keyids=[k.keyid for k in self.root_keys], root_threshold=len(self.root_keys),
                         release_keyids=[k.keyid for k in self.release_keys], release_threshold=self.threshold)
        return sign_envelope(ROOT_TYPE, body, signed_by)

    def rotate(self, new_release: list[SoftwareSigner]) -> bytes:
        """Root N+1 with new release keys, signed by the (unchanged) root keys."""
        self.release_keys = new_release
        envelope = self.root_envelope(len(self.chain) + 1, self.root_keys)
        self.chain.append(envelope)
        return envelope

    def pinned_root(self) -> Root:
        return parse_root_document(self.chain[0])

    def manifest(self, image: bytes, *, version: int = 2, device_class: str = CLASS,
                 signed_by: Sequence[SoftwareSigner] | None = None, not_before: datetime | None = None,
                 expires: datetime | None = None) -> bytes:
        body = make_manifest(device_class=device_class, version=version,
                             image_sha256=hashlib.sha256(image).hexdigest(), size=len(image),
                             not_before=not_before or self.now - timedelta(hours=1),
                             expires=expires or self.now + timedelta(days=30))
        return sign_envelope(MANIFEST_TYPE, body, self.release_keys[: self.threshold]
                             if signed_by is None else signed_by)

    def offer(self, image: bytes, *, url: str | None = None, **kw: object) -> bytes:
        return make_offer(self.manifest(image, **kw), roots=self.chain[1:], url=url)  # type: ignore[arg-type]
