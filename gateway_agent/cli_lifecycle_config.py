"""Where the ``certs``, ``devices`` and ``pki`` verbs find the inventory, the CA and the registry.

Every verb reads ``-c/--config`` (the agent's YAML) like the other verbs; without it the
deployed one (``$EDGE_GATEWAY_CONFIG_DIR/agent.yaml``, else ``/etc/edge-gateway/agent.yaml``,
never the working directory; ``edge_runtime.cli_support.resolve_config``). Its ``lifecycle``
section names the three files. ``--db``, ``--ca-dir`` and ``--registry`` override one path
each (for a CA on another machine, or a copy of the inventory). A missing config is fine
when every path is given explicitly.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from edge_core.errors import ConfigError
from edge_runtime.cli_support import CONFIG_DIR, resolve_config

__all__ = ["CONFIG_NAME", "LifecyclePaths", "add_config_arguments", "lifecycle_paths"]

CONFIG_NAME = "agent.yaml"


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
                        help=f"agent YAML with a 'lifecycle' section (default {CONFIG_DIR / CONFIG_NAME})")
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
    found: dict[str, Path | None] = {"inventory": None, "ca_dir": None, "registry": None}
    try:
        path = resolve_config(config, CONFIG_NAME)
    except ConfigError:
        if config is not None or not any(overrides.values()):
            raise
        path = None  # every path this verb needs may come from its own flag
    if path is not None:
        from gateway_agent.settings import load_agent_settings

        lifecycle = load_agent_settings(path).lifecycle
        if lifecycle is not None:
            found = {"inventory": lifecycle.inventory, "ca_dir": lifecycle.ca_dir, "registry": lifecycle.registry}
    merged = {k: overrides[k] or found[k] for k in found}
    source = str(path) if path is not None else f"{CONFIG_DIR / CONFIG_NAME} (not found)"
    return LifecyclePaths(merged["inventory"], merged["ca_dir"], merged["registry"], source)
