"""Round-trip edits of the registry file: the agent changes pins, admins keep their comments.

The registry is one YAML file that admins edit by hand (comments, order, blank lines) and
that the agent rewrites when a device's pins change. ``apply_entries`` changes only the
device entries it is given - their ``pins``, ``roles``, ``attributes`` and ``enabled`` -
in place, with ruamel.yaml's round-trip mode, so every comment and every other device
stays as the admin wrote it. The result is parsed again with ``parse_registry`` before it
is returned: a write never produces a file the broker would refuse. Text in, text out.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from edge_core.errors import ConfigError
from edge_core.registry import DeviceEntry, parse_registry

__all__ = ["apply_entries"]


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def _flow(values: list[str]) -> CommentedSeq:
    seq = CommentedSeq(values)
    seq.fa.set_flow_style()
    return seq


def apply_entries(text: str, entries: Mapping[str, DeviceEntry], *, source: str = "<registry>") -> str:
    """``text`` with each of ``entries`` written into ``devices:`` (added at the end if new)."""
    yaml = _yaml()
    try:
        doc = yaml.load(text) if text.strip() else None
    except Exception as exc:  # ruamel raises many types; the file is the admin's to fix
        raise ConfigError(f"registry is not valid YAML: {exc}", source=source) from exc
    if doc is None:
        doc = CommentedMap([("version", 1), ("devices", CommentedMap())])
    if not isinstance(doc, CommentedMap):
        raise ConfigError("registry must be a mapping with 'version' and 'devices'", source=source)
    devices = doc.get("devices")
    if devices is None:
        devices = doc["devices"] = CommentedMap()
    if not isinstance(devices, CommentedMap):
        raise ConfigError("registry 'devices' must be a mapping", source=source)
    for device_id, entry in entries.items():
        body = devices.get(device_id)
        if not isinstance(body, CommentedMap):
            body = devices[device_id] = CommentedMap()
        existing = body.get("pins")
        if isinstance(existing, CommentedSeq) and list(existing) != list(entry.pins):
            existing.clear()
            existing.extend(entry.pins)
        elif not isinstance(existing, CommentedSeq):
            body["pins"] = CommentedSeq(entry.pins)
        if (entry.roles or "roles" in body) and sorted(body.get("roles") or []) != sorted(entry.roles):
            body["roles"] = _flow(sorted(entry.roles))
        if entry.attributes or "attributes" in body:
            current = body.get("attributes")
            if not isinstance(current, CommentedMap):
                current = body["attributes"] = CommentedMap()
            for key in [k for k in current if k not in entry.attributes]:
                del current[key]
            for key, value in entry.attributes.items():
                if current.get(key) != value:
                    current[key] = value
        if entry.enabled:
            if "enabled" in body:
                body["enabled"] = True
        else:
            body["enabled"] = False
    out = io.StringIO()
    yaml.dump(doc, out)
    result = out.getvalue()
    parse_registry(result.encode("utf-8"), source=source)  # never write what the broker would refuse
    return result
