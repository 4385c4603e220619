"""TLS contexts of our own components: TLS 1.3 only, our CA, our certificates, both sides authenticated."""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["client_tls_context", "server_tls_context"]


def client_tls_context(ca: Path, cert: Path, key: Path, *,
                       context_class: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
    """Verify the broker against ``ca`` (hostname checked) and present ``cert``/``key``, TLS 1.3 only."""
    ctx = context_class(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=ca)
    ctx.load_cert_chain(cert, key)
    return ctx


def server_tls_context(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """Serve ``cert``/``key`` over TLS 1.3 only; every client presents a certificate chaining to ``client_ca``.

    The broker's device listener and the firmware image server both use it. No session tickets:
    every connection presents its certificate again; no post-handshake authentication.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    ctx.post_handshake_auth = False
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=client_ca)
    return ctx
