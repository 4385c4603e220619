"""Firmware guard: every offer on ``devices/{device}/firmware/offer`` must verify before it is forwarded.

Runs after the topic ACL (only a release publisher may publish offers) and before routing.
The decision is ``edge_core.firmware_trust.FirmwareTrust.check``, the same verifier the
device runs, against the device's class from the registry (attribute ``firmware_class`` by
default). Refused offers are dropped and logged as ``firmware.rejected reason=<code>``:
unsigned, badly signed, below threshold, wrong class, rolled back, expired, ... A retained
offer is refused outright (it would replay itself to every future subscriber).

The trusted state (root and version floor per class) is loaded once at start-up from the
pinned root and the state file, and written back atomically whenever an accepted offer
moves it forward, so a broker restart does not reopen a rollback window. If it cannot be
loaded, every offer is refused (fail closed) and the error is logged; offers try to load it
again, at most once a second (the pinned root may be installed after the broker started).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from amqtt.plugins.base import BasePlugin

from broker_plugins.engine.session import Session
from broker_plugins.runtime import BrokerRuntime, admitted_of
from edge_core.errors import ConfigError
from edge_core.files import atomic_write_bytes
from edge_core.firmware import FirmwareRefused, device_from_topic
from edge_core.firmware_trust import FirmwareTrust

__all__ = ["FirmwareGuardPlugin"]

#: While the trust is unusable, at most one attempt per second to load it again.
_RETRY = timedelta(seconds=1)


class FirmwareGuardPlugin(BasePlugin[Any]):
    @dataclass
    class Config:
        runtime: Any = None

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.trust: FirmwareTrust | None = None
        self._last_load: datetime | None = None
        self._load()

    def _load(self) -> None:
        runtime = self.config.runtime
        assert isinstance(runtime, BrokerRuntime)
        settings = runtime.settings.firmware
        assert settings is not None
        self._last_load = runtime.clock.now()
        try:
            pinned = _read(settings.root, "pinned firmware root")
            state = settings.state.read_bytes() if settings.state.exists() else None
            self.trust = FirmwareTrust.restore(pinned, state, policy=settings.policy, source=str(settings.state))
        except ConfigError as exc:
            runtime.events.emit("firmware.config_error", "unusable_trust", level="error", detail=str(exc)[:300])
        else:
            runtime.events.emit("firmware.trust_loaded", root_version=self.trust.root.version,
                                classes=len(self.trust.floors))

    async def guard_publish(self, *, session: Session, topic: str, payload: bytes, retain: bool) -> bool:
        device = device_from_topic(topic)
        if device is None:
            return True  # not a firmware offer
        runtime = self.config.runtime
        assert isinstance(runtime, BrokerRuntime)
        settings = runtime.settings.firmware
        assert settings is not None
        admitted = admitted_of(session)
        sender = admitted.identity if admitted else None

        def refuse(reason: str, **fields: Any) -> bool:
            runtime.events.emit("firmware.rejected", reason, level="warning", device=device, sender=sender,
                                topic=topic, **fields)
            return False

        if self.trust is None and (self._last_load is None or runtime.clock.now() - self._last_load >= _RETRY):
            self._load()  # the pinned root may have been installed since start-up
        trust = self.trust
        if trust is None:
            return refuse("no_firmware_trust")
        if retain:
            return refuse("retained_offer")
        entry = runtime.registry.get(device)
        device_class = entry.attributes.get(settings.class_attribute) if entry is not None else None
        if device_class is None:
            return refuse("no_device_class", detail=f"device has no registry attribute {settings.class_attribute!r}")
        try:
            offer, changed = trust.check(payload, device_class=device_class, now=runtime.clock.now())
        except FirmwareRefused as refused:
            return refuse(refused.reason, version=refused.version, device_class=device_class,
                          detail=str(refused)[:200])
        if changed:
            atomic_write_bytes(settings.state, trust.to_json(), mode=0o600)
        m = offer.manifest
        runtime.events.emit("firmware.accepted", device=device, sender=sender, device_class=m.device_class,
                            version=m.version, sha256=m.sha256[:16], root_version=offer.root.version)
        return True


def _read(path: Any, what: str) -> bytes:
    try:
        return bytes(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror}", source=str(path)) from exc
