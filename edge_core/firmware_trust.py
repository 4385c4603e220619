"""The broker's trusted firmware state: the current root and the highest version per device class.

Like python-tuf's trusted metadata set, this object owns "newer than what I trust" and does
no I/O: ``check`` verifies an offer with ``edge_core.firmware.verify_offer`` and, only when
the offer is accepted, moves the root and that class's version floor forward. The part of
the check that depends only on the offer's bytes and the trusted root (structure, chain,
signatures, schema) is kept for the last 64 distinct offers, so a rollout that sends one
offer to thousands of devices pays for the ECDSA checks once; class, time and version floor
are checked for every message. The caller
persists ``to_json()`` whenever ``check`` reports a change (temp file + ``os.replace``), and
restores it with ``from_json`` at start-up, so a restart never reopens a rollback window.

``FirmwareGuardSettings`` is the ``firmware:`` section of the broker settings.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from edge_core import strictjson, yamlsrc
from edge_core.errors import ConfigError
from edge_core.firmware import (
    FirmwarePolicy,
    FirmwareRefused,
    Root,
    VerifiedOffer,
    VersionFloor,
    admit_offer,
    authenticate_offer,
    canonical_json,
    parse_root_document,
)

__all__ = ["FirmwareGuardSettings", "FirmwareTrust", "parse_firmware_guard_settings"]


@dataclass(frozen=True)
class FirmwareGuardSettings:
    root: Path  # the pinned root (trust anchor), installed by the release team
    state: Path  # where the broker keeps the root that moved forward and the version floors
    class_attribute: str = "firmware_class"
    policy: FirmwarePolicy = field(default_factory=FirmwarePolicy)


def parse_firmware_guard_settings(sec: yamlsrc.Section, base_dir: Path) -> FirmwareGuardSettings:
    root = (base_dir / sec.take("root", str, required=True)).resolve()
    state = (base_dir / sec.take("state", str, required=True)).resolve()
    attribute = sec.take("class_attribute", str, "firmware_class")
    max_offer = sec.take("max_offer_size", int, 64 * 1024)
    skew = sec.take("max_skew", float, 300.0)
    if not 1024 <= max_offer <= 1024 * 1024:
        raise sec.error("max_offer_size", "firmware.max_offer_size must be 1024 .. 1048576 bytes")
    if not 0 <= skew <= 3600:
        raise sec.error("max_skew", "firmware.max_skew must be 0 .. 3600 seconds")
    sec.done()
    return FirmwareGuardSettings(root=root, state=state, class_attribute=attribute,
                                 policy=FirmwarePolicy(max_offer_size=max_offer, max_skew=timedelta(seconds=skew)))


class FirmwareTrust:
    #: Authenticated offers kept by payload digest: a rollout sends the same bytes to every device.
    CACHE_SIZE = 64

    def __init__(self, root: Root, floors: dict[str, VersionFloor] | None = None,
                 policy: FirmwarePolicy | None = None) -> None:
        self.root = root
        self.floors: dict[str, VersionFloor] = dict(floors or {})
        self.policy = policy or FirmwarePolicy()
        self._authenticated: OrderedDict[bytes, VerifiedOffer] = OrderedDict()

    def floor(self, device_class: str) -> VersionFloor:
        return self.floors.get(device_class, VersionFloor())

    def check(self, payload: bytes, *, device_class: str, now: datetime) -> tuple[VerifiedOffer, bool]:
        """The verified offer and whether the trusted state moved (persist it then); raises ``FirmwareRefused``."""
        offer = self._authenticate(payload, now)
        offer = admit_offer(offer, device_class=device_class, floor=self.floor(device_class), now=now,
                            policy=self.policy)
        changed = False
        if offer.root.version > self.root.version:
            self.root, changed = offer.root, True
            self._authenticated.clear()  # each entry was authenticated under the old root
        if offer.manifest.version > self.floor(device_class).version:
            self.floors[device_class], changed = offer.floor(), True
        return offer, changed

    def _authenticate(self, payload: bytes, now: datetime) -> VerifiedOffer:
        """Structure, chain, signatures and schema: computed once per distinct offer under this root."""
        key = hashlib.sha256(payload).digest() if len(payload) <= self.policy.max_offer_size else b""
        cached = self._authenticated.get(key) if key else None
        if cached is not None:
            self._authenticated.move_to_end(key)
            return cached
        offer = authenticate_offer(payload, root=self.root, now=now, policy=self.policy)
        self._authenticated[key] = offer
        if len(self._authenticated) > self.CACHE_SIZE:
            self._authenticated.popitem(last=False)
        return offer

    def to_json(self) -> bytes:
        return canonical_json({
            "root": strictjson.loads(self.root.raw),
            "floors": {c: {"version": f.version, "sha256": f.sha256} for c, f in sorted(self.floors.items())},
        })

    @classmethod
    def restore(cls, pinned: bytes, state: bytes | None, *, policy: FirmwarePolicy | None = None,
                source: str = "<firmware state>") -> FirmwareTrust:
        """The pinned root, moved forward by the saved state (whose root must chain from the pin)."""
        try:
            root = parse_root_document(pinned)
        except FirmwareRefused as exc:
            raise ConfigError(f"pinned firmware root is unusable ({exc.reason}): {exc}", source=source) from exc
        if state is None:
            return cls(root, policy=policy)
        try:
            doc = strictjson.loads(state)
            saved = parse_root_document(canonical_json(doc["root"]))
            floors = {str(c): VersionFloor(int(f["version"]), f["sha256"]) for c, f in doc["floors"].items()}
        except (ValueError, KeyError, TypeError, FirmwareRefused) as exc:
            raise ConfigError(f"firmware state is unreadable: {exc}", source=source,
                              hint="restore it from backup; deleting it reopens rollback to older firmware") from exc
        if saved.version < root.version:
            raise ConfigError(f"saved root v{saved.version} is older than the pinned v{root.version}", source=source)
        if saved.version > root.version and saved.raw != root.raw:
            # the saved root was reached by the chain from a pin; it is trusted as our own state
            root = saved
        return cls(root, floors, policy=policy)

