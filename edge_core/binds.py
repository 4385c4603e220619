"""``host:port`` bind values, and the rule that our status endpoints listen on loopback only."""

from __future__ import annotations

import ipaddress

from edge_core import yamlsrc

__all__ = ["is_loopback", "loopback_bind", "split_bind"]


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1); a host name is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_bind(value: str) -> tuple[str, int | None]:
    """``host:port`` / ``[v6]:port`` into host and port (None when the port is not a number)."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else None


def loopback_bind(value: str, sec: yamlsrc.Section, key: str, *, who: str) -> tuple[str, int]:
    """A loopback ``host:port`` read from ``sec[key]``, or a ``ConfigError`` with file and line."""
    host, port = split_bind(value)
    if not is_loopback(host) or port is None:
        raise sec.error(key, f"{sec.what}.{key} must be a loopback host:port; {who} listens toward nothing else")
    return host, port
