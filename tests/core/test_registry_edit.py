"""Round-trip registry edits: the agent's writes keep the admin's comments and layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_core.errors import ConfigError
from edge_core.registry import DeviceEntry, parse_registry
from edge_core.registry_edit import apply_entries

A, B, C = ("sha256:" + c * 64 for c in "abc")
ADMIN = f"""# Plant A device registry - owned by the OT team, ticket OPS-1234
version: 1
devices:
  # pumps on line 3
  pump-17:
    pins:
      - {A}   # factory certificate
    roles: [pump]
    attributes:
      site: plant-a   # moved from plant-b in May
  valve-2:
    pins: [{B}]
    roles: [valve]
"""


def test_pin_change_keeps_every_comment_and_other_device() -> None:
    entry = DeviceEntry("pump-17", (A, C), frozenset({"pump"}), {"site": "plant-a"})
    out = apply_entries(ADMIN, {"pump-17": entry})
    for comment in ("# Plant A device registry", "# pumps on line 3", "# moved from plant-b in May"):
        assert comment in out
    assert f"pins: [{B}]" in out  # the untouched device is byte-identical
    registry = parse_registry(out.encode())
    assert registry.devices["pump-17"].pins == (A, C)
    assert registry.devices["valve-2"].pins == (B,)


def test_disable_and_add_keep_the_rest() -> None:
    disabled = DeviceEntry("valve-2", (B,), frozenset({"valve"}), enabled=False)
    new = DeviceEntry("fan-1", (C,), frozenset({"sensor"}), {"site": "plant-a"})
    out = apply_entries(ADMIN, {"valve-2": disabled, "fan-1": new})
    registry = parse_registry(out.encode())
    assert not registry.devices["valve-2"].enabled
    assert registry.devices["fan-1"].roles == frozenset({"sensor"})
    assert out.index("pump-17") < out.index("valve-2") < out.index("fan-1")
    assert "# factory certificate" in out


def test_a_broken_file_is_refused_not_overwritten() -> None:
    with pytest.raises(ConfigError):
        apply_entries("version: 1\ndevices: [\n", {})


def test_agent_registry_write_keeps_admin_comments(tmp_path: Path) -> None:
    """On the agent's first registry write every device used to lose its comments (and older pins)."""
    from gateway_agent.inventory import SqliteInventory, write_registry

    path = tmp_path / "registry.yaml"
    path.write_text(ADMIN)
    with SqliteInventory(tmp_path / "inv.db") as inventory:
        write_registry(inventory, parse_registry(path.read_bytes()), path)
    assert "# moved from plant-b in May" in path.read_text()
