"""Where the ``certs``, ``devices`` and ``pki`` verbs find the inventory, the CA and the registry.

Every verb reads ``-c/--config`` (the agent's YAML, default ``configs/agent.yaml``) like the
other verbs; its ``lifecycle`` section names the three files. ``--db``, ``--ca-dir`` and
``--registry`` override one path each (for a CA on another machine, or a copy of the
inventory). A missing config is fine when every path is given explicitly.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from edge_core.errors import ConfigError

__all__ = ["DEFAULT_CONFIG", "LifecyclePaths", "add_config_arguments", "lifecycle_paths"]

DEFAULT_CONFIG = Path("configs/agent.yaml")


@dataclass(frozen=True)
class LifecyclePaths:
    inventory: Path | None
    ca_dir: Path | None
    registry: Path | None
    source: str

    def need(self, what: str) -> Path:
        value = getattr(self, what)
        if value is None:
            flag = {"inventory": "--db", "ca_dir": "--ca-dir", "registry": "--registry"}[what]
            raise ConfigError(f"no {what.replace('_', ' ')} known: {self.source} has no 'lifecycle' section",
                              hint=f"pass -c with the agent's config, or {flag}")
        return value  # type: ignore[no-any-return]


def add_config_arguments(parser: argparse.ArgumentParser, *, db: bool = True, ca: bool = False,
                         registry: bool = False) -> None:
    parser.add_argument("-c", "--config", type=Path, default=None,
                        help=f"agent YAML with a 'lifecycle' section (default {DEFAULT_CONFIG})")
    if db:
        parser.add_argument("--db", type=Path, default=None, help="inventory file (default: from the config)")
    if ca:
        parser.add_argument("--ca-dir", type=Path, default=None, help="CA directory (default: from the config)")
    if registry:
        parser.add_argument("--registry", type=Path, default=None, help="registry file (default: from the config)")


def lifecycle_paths(args: argparse.Namespace) -> LifecyclePaths:
    """The paths from ``-c`` (or the default config), each overridden by its own flag."""
    overrides = {name: getattr(args, attr, None) for name, attr in
                 (("inventory", "db"), ("ca_dir", "ca_dir"), ("registry", "registry"))}
    config: Path | None = getattr(args, "config", None)
    path = config or DEFAULT_CONFIG
    found: dict[str, Path | None] = {"inventory": None, "ca_dir": None, "registry": None}
    if config is not None or path.exists():
        from gateway_agent.settings import load_agent_settings

        lifecycle = load_agent_settings(path).lifecycle
        if lifecycle is not None:
            found = {"inventory": lifecycle.inventory, "ca_dir": lifecycle.ca_dir, "registry": lifecycle.registry}
    elif not any(overrides.values()):
        raise ConfigError(f"no agent config at {path}", hint="pass -c with the agent's config file")
    merged = {k: overrides[k] or found[k] for k in found}
    return LifecyclePaths(merged["inventory"], merged["ca_dir"], merged["registry"], str(path))
