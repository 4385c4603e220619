"""The device registry: who may connect, with which key pins, in which roles.

Admins and the gateway agent edit one YAML file::

    version: 1
    devices:
      pump-17:
        pins:                       # SPKI SHA-256 pins, at most two active (rotation overlap)
          - sha256:5b1f...e0
        roles: [pump]               # used by the ACL file
        attributes:                 # bound into ACL filters as {site}, {line}
          site: plant-a
          line: line-3
        enabled: true               # optional; false refuses the device without deleting it

``parse_registry`` validates the whole file into a frozen ``Registry`` or raises one
``ConfigError`` naming file, line and reason. A reload swaps the whole object.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import yaml

from edge_core import yamlsrc
from edge_core.errors import ConfigError, CredentialError
from edge_core.identity import check_identity

__all__ = ["MAX_ACTIVE_PINS", "DeviceEntry", "Registry", "dump_registry", "parse_registry"]

MAX_ACTIVE_PINS = 2
_PIN_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_ROLE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_ATTR_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
RESERVED_ATTRIBUTES = frozenset({"device"})


@dataclass(frozen=True)
class DeviceEntry:
    device_id: str
    pins: tuple[str, ...]
    roles: frozenset[str] = frozenset()
    attributes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    enabled: bool = True

    def __post_init__(self) -> None:
        check_identity(self.device_id)
        if not 1 <= len(self.pins) <= MAX_ACTIVE_PINS:
            raise ValueError(f"device {self.device_id}: {len(self.pins)} pins; 1 to {MAX_ACTIVE_PINS} allowed")
        for pin in self.pins:
            if not _PIN_RE.match(pin):
                raise ValueError(f"device {self.device_id}: pin {pin!r} is not sha256:<64 hex>")
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))

    def pinned(self, pin: str) -> bool:
        return pin in self.pins


@dataclass(frozen=True)
class Registry:
    devices: Mapping[str, DeviceEntry]
    source: str = "<registry>"
    digest: str = ""

    def get(self, device_id: str) -> DeviceEntry | None:
        return self.devices.get(device_id)

    def __len__(self) -> int:
        return len(self.devices)


def parse_registry(text: str | bytes, *, source: str = "<registry>") -> Registry:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    doc = yamlsrc.load(raw, source=source)
    if doc is None:
        raise ConfigError("registry file is empty; it needs 'version: 1' and 'devices:'", source=source, line=1)
    top = yamlsrc.Section(doc, source=source, what="registry")
    version = top.take("version", int, required=True)
    if version != 1:
        raise top.error("version", f"registry version {version} is not supported; use 1")
    devices_section = top.sub("devices")
    top.done()
    devices: dict[str, DeviceEntry] = {}
    if devices_section is not None:
        for device_id, body, line in devices_section.items():
            devices[device_id] = _parse_device(device_id, body, source=source, line=line)
    return Registry(
        devices=MappingProxyType(devices), source=source, digest=hashlib.sha256(raw).hexdigest()
    )


def _parse_device(device_id: str, body: Any, *, source: str, line: int | None) -> DeviceEntry:
    try:
        check_identity(device_id)
    except CredentialError as exc:
        raise ConfigError(f"device id: {exc}", source=source, line=line) from exc
    sec = yamlsrc.Section(body, source=source, line=line, what=f"device '{device_id}'")
    pins_raw = sec.take("pins", list, required=True)
    roles_raw = sec.take("roles", list, [])
    attrs = sec.sub("attributes")
    enabled = sec.take("enabled", bool, True)
    sec.done()
    pins: list[str] = []
    for index, pin in enumerate(pins_raw):
        pin_line = _item_line(pins_raw, index, sec.line_of("pins"))
        if not isinstance(pin, str) or not _PIN_RE.match(pin):
            raise ConfigError(
                f"device '{device_id}': pin {pin!r} must be 'sha256:' and 64 lowercase hex digits "
                "(see `gateway-agent pki pin CERT`)",
                source=source,
                line=pin_line,
            )
        if pin in pins:
            raise ConfigError(f"device '{device_id}': pin listed twice", source=source, line=pin_line)
        pins.append(pin)
    if not pins:
        raise sec.error("pins", f"device '{device_id}': needs at least one pin")
    if len(pins) > MAX_ACTIVE_PINS:
        raise sec.error(
            "pins", f"device '{device_id}': {len(pins)} pins; at most {MAX_ACTIVE_PINS} may be active at once"
        )
    roles: set[str] = set()
    for index, role in enumerate(roles_raw):
        if not isinstance(role, str) or not _ROLE_RE.match(role):
            raise ConfigError(
                f"device '{device_id}': role {role!r} must match {_ROLE_RE.pattern}",
                source=source,
                line=_item_line(roles_raw, index, sec.line_of("roles")),
            )
        roles.add(role)
    attributes: dict[str, str] = {}
    if attrs is not None:
        for key, value, attr_line in attrs.items():
            if not _ATTR_KEY_RE.match(key) or key in RESERVED_ATTRIBUTES:
                raise ConfigError(
                    f"device '{device_id}': attribute name {key!r} must match {_ATTR_KEY_RE.pattern}"
                    f" and not be one of {sorted(RESERVED_ATTRIBUTES)}",
                    source=source,
                    line=attr_line,
                )
            if not isinstance(value, str | int) or isinstance(value, bool):
                raise ConfigError(
                    f"device '{device_id}': attribute '{key}' must be a string", source=source, line=attr_line
                )
            try:
                attributes[key] = check_identity(str(value))
            except CredentialError as exc:
                raise ConfigError(
                    f"device '{device_id}': attribute '{key}': {exc}", source=source, line=attr_line
                ) from exc
    return DeviceEntry(
        device_id=device_id, pins=tuple(pins), roles=frozenset(roles), attributes=attributes, enabled=enabled
    )


def _item_line(seq: Any, index: int, fallback: int | None) -> int | None:
    lines = getattr(seq, "item_lines", None)
    return lines[index] if lines and index < len(lines) else fallback


def dump_registry(registry: Registry) -> str:
    """Serialise a registry back to the file format (used by the agent's atomic writes)."""
    devices: dict[str, Any] = {}
    for device_id in sorted(registry.devices):
        entry = registry.devices[device_id]
        body: dict[str, Any] = {"pins": list(entry.pins)}
        if entry.roles:
            body["roles"] = sorted(entry.roles)
        if entry.attributes:
            body["attributes"] = dict(entry.attributes)
        if not entry.enabled:
            body["enabled"] = False
        devices[device_id] = body
    header = "# Device registry. Edited by admins and by gateway-agent; see README 'Device registry'.\n"
    return header + yaml.safe_dump({"version": 1, "devices": devices}, sort_keys=False)
