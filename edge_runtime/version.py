"""The installed version of this software, for ``--version``, ``build_info`` and ``$SYS/broker/version``."""

from __future__ import annotations

from functools import cache
from importlib import metadata

__all__ = ["DISTRIBUTION", "version"]

DISTRIBUTION = "edge-gateway-security"


@cache
def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"
