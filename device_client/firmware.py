"""The reference device side of firmware updates: verify, stream, install A/B, confirm or roll back.

A device trusts nothing between the release team and itself. For every offer it:

1. verifies the manifest with its *own* pinned root (``edge_core.firmware.verify_offer``,
   the function the broker runs too), moving its root forward along a chain the offer carries;
2. checks the version against its anti-rollback counter (the last *confirmed* version);
3. streams the image into ``download/image.part`` while hashing it, with a hard stop at the
   signed size; after a power loss it resumes from the bytes already on flash (re-hashing
   them) and restarts from zero if the result does not match;
4. writes the verified image into the inactive slot, then marks it pending (trial boot);
5. at the next boot (``boot``), the bootloader re-checks the slot's digest and tries it once;
   ``confirm`` (the new firmware is healthy) makes it active and raises the counter;
   a failed or unconfirmed trial boot rolls back to the old slot.

Every step that changes state writes a file atomically, so a power cut at any point leaves
either the old or the new state. Storage layout under ``storage``::

    trust/root.json      the trusted root envelope (pinned at provisioning, moves forward only)
    state.json           active slot, anti-rollback counter, pending trial
    slots/a.img b.img    the two firmware slots
    download/            offer.json (the manifest being fetched) and image.part
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edge_core.clock import Clock
from edge_core.errors import FetchError
from edge_core.events import SecurityEvents
from edge_core.files import atomic_write_bytes
from edge_core.firmware import (
    OFFER_TOPIC,
    REPORT_TOPIC,
    FirmwarePolicy,
    FirmwareRefused,
    ImageCheck,
    Manifest,
    VerifiedOffer,
    VersionFloor,
    canonical_json,
    offer_id,
    parse_root_document,
    verify_offer,
)
from edge_core.identity import check_identity

__all__ = ["BytesSource", "DeviceFirmware", "HttpImageSource", "ImageSource", "serve_offers"]

_SYNC_EVERY = 64 * 1024
_CHUNK = 16 * 1024


class ImageSource(Protocol):
    def read_from(self, offset: int) -> Iterator[bytes]:
        """The image's bytes from ``offset`` on, in chunks; raises ``FetchError`` on failure."""
        ...


@dataclass
class BytesSource:
    """An in-memory image (tests): ``fail_after`` bytes delivered, then the link dies."""

    data: bytes
    fail_after: int | None = None
    chunk: int = 4096

    def read_from(self, offset: int) -> Iterator[bytes]:
        sent = 0
        for start in range(offset, len(self.data), self.chunk):
            piece = self.data[start:start + self.chunk]
            if self.fail_after is not None and sent + len(piece) > self.fail_after:
                yield piece[: self.fail_after - sent]
                raise FetchError("download_failed", "the link dropped mid-download")
            sent += len(piece)
            yield piece


@dataclass
class HttpImageSource:
    """An image on the gateway's image server, fetched over HTTPS with a Range request for resuming.

    ``ssl_context`` is the device's own client context (``edge_runtime.tls.client_tls_context``: the
    gateway verified against the device's CA, the device's certificate presented, TLS 1.3). A URL
    that is not ``https://`` is refused before anything is sent (``not_https``).
    """

    url: str
    ssl_context: ssl.SSLContext
    timeout: float = 10.0

    def read_from(self, offset: int) -> Iterator[bytes]:
        if not self.url.lower().startswith("https://"):
            raise FetchError("not_https", f"{self.url[:200]} is not an https URL: images are fetched over TLS only")
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={offset}-"} if offset else {})  # noqa: S310 - URL is signed-offer data, hash-checked
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self.ssl_context) as response:  # noqa: S310
                if offset and response.status != 206:
                    raise FetchError("no_range", f"{self.url} ignored the Range request (HTTP {response.status})")
                while chunk := response.read(_CHUNK):
                    yield chunk
        except (OSError, ValueError) as exc:  # ValueError: not a URL urllib can fetch
            raise FetchError("download_failed", f"GET {self.url[:200]}: {exc}") from exc


@dataclass(frozen=True)
class _State:
    active: str
    counter: int
    sha256: str
    pending: dict[str, Any] | None

    def to_json(self) -> bytes:
        return canonical_json({"active": self.active, "counter": self.counter, "sha256": self.sha256,
                               "pending": self.pending})


class DeviceFirmware:
    """The update logic of one device over its flash storage. Not thread-safe: one updater per device."""

    def __init__(self, device_id: str, device_class: str, storage: Path, clock: Clock, *,
                 policy: FirmwarePolicy | None = None, events: SecurityEvents | None = None) -> None:
        self.device_id = check_identity(device_id)
        self.device_class = device_class
        self.storage = storage
        self.clock = clock
        self.policy = policy or FirmwarePolicy()
        self.events = events if events is not None else SecurityEvents("device_client")
        self.root = parse_root_document((storage / "trust" / "root.json").read_bytes())

    # -- provisioning (factory) -------------------------------------------------------

    @staticmethod
    def provision(storage: Path, *, pinned_root: bytes, image: bytes, version: int) -> None:
        """Factory state: the pinned root, the image in slot a, counter = its version."""
        parse_root_document(pinned_root)
        atomic_write_bytes(storage / "trust" / "root.json", pinned_root)
        atomic_write_bytes(storage / "slots" / "a.img", image)
        state = _State(active="a", counter=version, sha256=hashlib.sha256(image).hexdigest(), pending=None)
        atomic_write_bytes(storage / "state.json", state.to_json())

    # -- state --------------------------------------------------------------------------

    def _state(self) -> _State:
        raw = json.loads((self.storage / "state.json").read_bytes())
        return _State(active=raw["active"], counter=raw["counter"], sha256=raw["sha256"], pending=raw["pending"])

    def _save(self, state: _State) -> None:
        atomic_write_bytes(self.storage / "state.json", state.to_json())

    @property
    def version(self) -> int:
        """The confirmed version: the anti-rollback counter."""
        return self._state().counter

    @property
    def active_slot(self) -> str:
        return self._state().active

    def slot_image(self, slot: str) -> bytes:
        return (self.storage / "slots" / f"{slot}.img").read_bytes()

    # -- 1, 2: the offer ----------------------------------------------------------------

    def verify(self, payload: bytes) -> VerifiedOffer:
        """Verify an offer against the pinned root and the counter; persists a root that moved forward."""
        state = self._state()
        try:
            offer = verify_offer(payload, root=self.root, device_class=self.device_class,
                                 floor=VersionFloor(state.counter, state.sha256), now=self.clock.now(),
                                 policy=self.policy)
        except FirmwareRefused as exc:
            self.events.emit("firmware.rejected", exc.reason, level="warning", device=self.device_id,
                             version=exc.version, detail=str(exc)[:200])
            raise
        if offer.root.version > self.root.version:
            atomic_write_bytes(self.storage / "trust" / "root.json", offer.root.raw)
            self.events.emit("firmware.root_updated", device=self.device_id, version=offer.root.version)
            self.root = offer.root
        return offer

    def is_current(self, manifest: Manifest) -> bool:
        state = self._state()
        return manifest.version == state.counter and manifest.sha256 == state.sha256

    # -- 3: the download ----------------------------------------------------------------

    def download(self, offer: VerifiedOffer, source: ImageSource) -> Path:
        """Stream the image to ``download/image.part``, resuming after a power loss; returns the file."""
        manifest = offer.manifest
        folder = self.storage / "download"
        folder.mkdir(parents=True, exist_ok=True)
        part, marker = folder / "image.part", folder / "offer.json"
        resuming = marker.exists() and marker.read_bytes() == offer.manifest_envelope and part.exists()
        if not resuming:
            part.unlink(missing_ok=True)
            atomic_write_bytes(marker, offer.manifest_envelope)
        for attempt in (1, 2):
            try:
                self._fetch(manifest, source, part)
            except FirmwareRefused as exc:
                part.unlink(missing_ok=True)
                if attempt == 2 or not resuming or exc.reason == "image_too_long":
                    self.events.emit("firmware.rejected", exc.reason, level="warning", device=self.device_id,
                                     version=manifest.version, detail=str(exc)[:200])
                    raise
                # bytes kept across a power cut did not add up: start again from zero, once
                self.events.emit("firmware.download_restarted", device=self.device_id, version=manifest.version)
            else:
                return part
        raise AssertionError("unreachable")

    def _fetch(self, manifest: Manifest, source: ImageSource, part: Path) -> None:
        check = ImageCheck(manifest)
        offset = 0
        if part.exists() and part.stat().st_size > manifest.size:
            part.unlink()  # not what we wrote: start again from zero
        if part.exists():
            with part.open("rb") as handle:
                while chunk := handle.read(_CHUNK):
                    check.update(chunk)
            offset = check.received
            if offset:
                self.events.emit("firmware.download_resumed", device=self.device_id, offset=offset)
        with part.open("ab") as handle:
            unsynced = 0
            for chunk in source.read_from(offset) if offset < manifest.size else iter(()):
                check.update(chunk)  # hash and size cap before a byte reaches flash
                handle.write(chunk)
                unsynced += len(chunk)
                if unsynced >= _SYNC_EVERY:
                    handle.flush()
                    os.fsync(handle.fileno())
                    unsynced = 0
            handle.flush()
            os.fsync(handle.fileno())
        check.finish()

    # -- 4: install into the inactive slot ------------------------------------------------

    def install(self, offer: VerifiedOffer, image_file: Path) -> str:
        """Copy the verified image into the inactive slot and mark it for a trial boot; returns the slot."""
        state = self._state()
        target = "b" if state.active == "a" else "a"
        data = image_file.read_bytes()
        if hashlib.sha256(data).hexdigest() != offer.manifest.sha256:  # flash changed under us
            raise FirmwareRefused("digest_mismatch", "the downloaded file changed before install",
                                  version=offer.manifest.version, device_class=offer.manifest.device_class)
        atomic_write_bytes(self.storage / "slots" / f"{target}.img", data)
        pending = {"slot": target, "version": offer.manifest.version, "sha256": offer.manifest.sha256, "tries": 0}
        self._save(_State(state.active, state.counter, state.sha256, pending))
        image_file.unlink(missing_ok=True)
        (self.storage / "download" / "offer.json").unlink(missing_ok=True)
        self.events.emit("firmware.installed", device=self.device_id, version=offer.manifest.version, slot=target)
        return target

    # -- 5: the bootloader, confirm and roll back ------------------------------------------

    def boot(self) -> str:
        """What the bootloader does at power-on; returns the slot it runs.

        A pending slot gets one trial boot, after its digest is checked again. If a trial
        boot was already tried and never confirmed (it crashed or hung), roll back.
        """
        state = self._state()
        pending = state.pending
        if pending is None:
            return state.active
        slot = str(pending["slot"])
        if pending["tries"] >= 1:
            self._rollback(state, "trial_not_confirmed")
            return state.active
        if hashlib.sha256(self.slot_image(slot)).hexdigest() != pending["sha256"]:
            self._rollback(state, "slot_corrupt")
            return state.active
        self._save(_State(state.active, state.counter, state.sha256, {**pending, "tries": 1}))
        return slot

    @property
    def pending_version(self) -> int | None:
        pending = self._state().pending
        return None if pending is None else int(pending["version"])

    def confirm(self) -> int:
        """The trial firmware runs and is healthy: make it active and raise the counter."""
        state = self._state()
        pending = state.pending
        if pending is None or pending["tries"] != 1:
            raise RuntimeError("nothing to confirm: no trial boot is running")
        version = int(pending["version"])
        if version < state.counter:  # the check at offer time makes this impossible; keep the rule local
            raise RuntimeError(f"counter {state.counter} cannot move back to {version}")
        self._save(_State(active=str(pending["slot"]), counter=version, sha256=str(pending["sha256"]),
                          pending=None))
        self.events.emit("firmware.confirmed", device=self.device_id, version=version)
        return version

    def fail_trial(self) -> None:
        """The trial firmware is unhealthy (its self-test failed): roll back now."""
        self._rollback(self._state(), "self_test_failed")

    def _rollback(self, state: _State, reason: str) -> None:
        version = None if state.pending is None else state.pending["version"]
        self._save(_State(state.active, state.counter, state.sha256, None))
        self.events.emit("firmware.rolled_back", reason, level="warning", device=self.device_id, version=version,
                         slot=state.active)

    # -- the whole flow for one offer --------------------------------------------------------

    def take_offer(self, payload: bytes, source_for: Callable[[VerifiedOffer], ImageSource]) -> dict[str, Any]:
        """Verify, download and install one offer; returns the report to send (never raises on refusal)."""
        try:
            offer = self.verify(payload)
        except FirmwareRefused as exc:
            return {"state": "refused", "reason": exc.reason, "version": exc.version}
        manifest = offer.manifest
        if self.is_current(manifest):
            return {"state": "confirmed", "version": manifest.version}
        try:
            slot = self.install(offer, self.download(offer, source_for(offer)))
        except FirmwareRefused as exc:
            return {"state": "failed", "reason": exc.reason, "version": manifest.version}
        except FetchError as exc:
            return {"state": "failed", "reason": exc.reason, "version": manifest.version}
        return {"state": "installed", "version": manifest.version, "slot": slot}


async def serve_offers(
    client: Any, firmware: DeviceFirmware, *, source_for: Callable[[VerifiedOffer], ImageSource],
    self_test: Callable[[DeviceFirmware, str], bool],
) -> None:
    """Take offers on the device's own MQTT session (an ``aiomqtt.Client``) and report each step.

    After an install the device reboots (``boot()``, the bootloader's trial boot) and runs
    ``self_test(firmware, slot)``: healthy firmware is confirmed, anything else rolls back.
    Every report names the offer it answers (``offer``: ``edge_core.firmware.offer_id``), also a
    refusal that came before the signatures verified and so carries no version.
    """
    offer_topic = OFFER_TOPIC.format(device=firmware.device_id)
    report_topic = REPORT_TOPIC.format(device=firmware.device_id)
    await client.subscribe(offer_topic, qos=1)

    async for message in client.messages:
        if str(message.topic) != offer_topic:
            continue
        payload = message.payload if isinstance(message.payload, bytes) else b""
        answered = offer_id(payload, max_size=firmware.policy.max_offer_size)

        async def report(body: dict[str, Any], answered: str | None = answered) -> None:
            await client.publish(report_topic, canonical_json({**body, "device": firmware.device_id,
                                                               "offer": answered}), qos=1)

        outcome = await asyncio.to_thread(firmware.take_offer, payload, source_for)
        if outcome["state"] != "installed":
            await report(outcome)
            continue
        await report(outcome)
        healthy = await asyncio.to_thread(self_test, firmware, firmware.boot())
        if healthy and firmware.pending_version is not None:
            await report({"state": "confirmed", "version": firmware.confirm()})
        else:
            if firmware.pending_version is not None:
                firmware.fail_trial()
            await report({"state": "rolled_back", "reason": "self_test_failed", "version": outcome["version"]})
