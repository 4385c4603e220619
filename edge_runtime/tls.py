"""The TLS client side every component of ours uses toward the broker: TLS 1.3, our CA, our cert."""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["client_tls_context"]


def client_tls_context(ca: Path, cert: Path, key: Path, *,
                       context_class: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
    """Verify the broker against ``ca`` (hostname checked) and present ``cert``/``key``, TLS 1.3 only."""
    ctx = context_class(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=ca)
    ctx.load_cert_chain(cert, key)
    return ctx
