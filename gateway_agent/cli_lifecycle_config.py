"""Where the ``certs``, ``devices`` and ``pki`` verbs find the inventory, the CA and the registry.

Every verb reads ``-c/--config`` (the agent's YAML) like the other verbs; without it the
deployed one (``$EDGE_GATEWAY_CONFIG_DIR/agent.yaml``, else ``/etc/edge-gateway/agent.yaml``,
never the working directory; ``edge_runtime.cli_support.resolve_config``). Its ``lifecycle``
section names the three places. ``--db``, ``--ca-dir`` and
``--registry`` override one each (for a CA on another machine, or a copy of the
inventory). The inventory is a URL as in ``lifecycle.inventory`` (``sqlite:///<path>``, a plain
path, or ``postgresql://...``; ``gateway_agent.inventory.open_inventory``). A missing config is
fine when every path is given explicitly.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_core.errors import ConfigError
from edge_runtime.cli_support import CONFIG_DIR, resolve_config

if TYPE_CHECKING:
    from gateway_agent.inventory import SqliteInventory
    from gateway_agent.inventory_pg import PostgresInventory

__all__ = ["CONFIG_NAME", "LifecyclePaths", "add_config_arguments", "lifecycle_paths"]

CONFIG_NAME = "agent.yaml"


@dataclass(frozen=True)
class LifecyclePaths:
    #: a URL (``sqlite:///<path>``, a plain path, ``postgresql://...``)
    inventory: str | None
    ca_dir: Path | None
    registry: Path | None
    source: str

    def need(self, what: str) -> Path:
        """``ca_dir`` or ``registry``, or a ``ConfigError`` naming the flag that gives it."""
        value: Path | None = {"ca_dir": self.ca_dir, "registry": self.registry}[what]
        if value is None:
            raise self._missing(what)
        return value

    def need_inventory(self) -> str:
        if self.inventory is None:
            raise self._missing("inventory")
        return self.inventory

    def open_inventory(self, *, create: bool = True) -> SqliteInventory | PostgresInventory:
        from gateway_agent.inventory import open_inventory

        return open_inventory(self.need_inventory(), create=create)

    def open_existing_inventory(self) -> SqliteInventory | PostgresInventory | None:
        """The inventory if one is configured and (a SQLite file) exists; ``None`` otherwise."""
        if self.inventory is None:
            return None
        sqlite = not self.inventory.startswith(("postgresql://", "postgres://"))
        if sqlite and not Path(self.inventory.removeprefix("sqlite:///")).exists():
            return None
        return self.open_inventory(create=False)

    def _missing(self, what: str) -> ConfigError:
        flag = {"inventory": "--db", "ca_dir": "--ca-dir", "registry": "--registry"}[what]
        return ConfigError(f"no {what.replace('_', ' ')} known: {self.source} has no 'lifecycle' section",
                           hint=f"pass -c with the agent's config, or {flag}")


def add_config_arguments(parser: argparse.ArgumentParser, *, db: bool = True, ca: bool = False,
                         registry: bool = False) -> None:
    parser.add_argument("-c", "--config", type=Path, default=None,
                        help=f"agent YAML with a 'lifecycle' section (default {CONFIG_DIR / CONFIG_NAME})")
    if db:
        parser.add_argument("--db", default=None,
                            help="inventory file or URL (sqlite:///..., postgresql://...; default: from the config)")
    if ca:
        parser.add_argument("--ca-dir", type=Path, default=None, help="CA directory (default: from the config)")
    if registry:
        parser.add_argument("--registry", type=Path, default=None, help="registry file (default: from the config)")


def lifecycle_paths(args: argparse.Namespace) -> LifecyclePaths:
    """The paths from ``-c`` (or the default config), each overridden by its own flag."""
    db: str | None = getattr(args, "db", None)
    ca_dir: Path | None = getattr(args, "ca_dir", None)
    registry: Path | None = getattr(args, "registry", None)
    config: Path | None = getattr(args, "config", None)
    try:
        path: Path | None = resolve_config(config, CONFIG_NAME)
    except ConfigError:
        if config is not None or not (db or ca_dir or registry):
            raise
        path = None  # every path this verb needs may come from its own flag
    if path is not None:
        from gateway_agent.settings import load_agent_settings

        lifecycle = load_agent_settings(path).lifecycle
        if lifecycle is not None:
            db = db or lifecycle.inventory
            ca_dir = ca_dir or lifecycle.ca_dir
            registry = registry or lifecycle.registry
    source = str(path) if path is not None else f"{CONFIG_DIR / CONFIG_NAME} (not found)"
    return LifecyclePaths(None if db is None else str(db), ca_dir, registry, source)
