"""Reading CA certificate files named in configuration (shared by the broker and the agent)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from edge_core.errors import ConfigError

__all__ = ["load_ca_certificates"]


def load_ca_certificates(paths: Sequence[Path], *, what: str = "CA certificate") -> list[x509.Certificate]:
    """Every certificate in the given PEM files; ``ConfigError`` names an unreadable one."""
    certs: list[x509.Certificate] = []
    for path in paths:
        try:
            certs.extend(x509.load_pem_x509_certificates(path.read_bytes()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load {what}: {exc}", source=str(path)) from exc
    return certs
