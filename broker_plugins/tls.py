"""TLS for the device listener: TLS 1.3 only, client certificate required.

amqtt 0.12.1 builds its own context with ``CERT_OPTIONAL`` and TLS 1.2 as the floor
(``Broker._create_ssl_context``); we never use that path. ``classify_tls_error`` turns
OpenSSL's handshake failures into stable reason codes for ``tls.rejected`` events.
"""

from __future__ import annotations

import ssl

from broker_plugins.settings import ListenerSettings
from edge_core.errors import ConfigError
from edge_runtime.tls import server_tls_context

__all__ = ["classify_tls_error", "server_context"]


def server_context(listener: ListenerSettings) -> ssl.SSLContext:
    """The device listener's context (``edge_runtime.tls.server_tls_context``); bad material is a config error."""
    try:
        return server_tls_context(listener.certfile, listener.keyfile, listener.client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load TLS material ({listener.certfile}, {listener.keyfile}, {listener.client_ca}): {exc}",
            hint="check the paths in listener: certfile, keyfile, client_ca",
        ) from exc


# OpenSSL X509 verify codes (x509_vfy.h) we name explicitly.
_VERIFY_CODES = {
    2: "unknown_ca",    # unable to get issuer certificate
    9: "cert_not_yet_valid",
    10: "cert_expired",
    18: "unknown_ca",   # self-signed leaf
    19: "unknown_ca",   # self-signed in chain
    20: "unknown_ca",   # unable to get local issuer certificate
    21: "unknown_ca",
    26: "bad_key_usage",  # unsupported certificate purpose
}


def classify_tls_error(exc: BaseException) -> tuple[str, str]:
    """Map a handshake failure to (reason code, short detail)."""
    if isinstance(exc, TimeoutError) or (
        # asyncio's ssl_handshake_timeout aborts with this ConnectionAbortedError
        isinstance(exc, ConnectionAbortedError) and "handshake is taking longer" in str(exc)
    ):
        return "tls_handshake_timeout", "client did not complete the TLS handshake in time"
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        return _VERIFY_CODES.get(code, "cert_verify_failed"), str(exc.verify_message)
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
            return "no_client_cert", "client presented no certificate"
        if "UNSUPPORTED_PROTOCOL" in reason or "WRONG_VERSION" in reason or "VERSION" in reason:
            return "tls_version", "client does not speak TLS 1.3"
        if "NO_SHARED_CIPHER" in reason or "NO_SUITABLE" in reason:
            return "tls_no_shared_cipher", reason.lower()
        if "CERTIFICATE_VERIFY_FAILED" in reason:
            return "cert_verify_failed", reason.lower()
        if "HTTP_REQUEST" in reason:
            return "not_tls", "client spoke HTTP to the TLS port"
        return "tls_handshake_failed", reason.lower() or str(exc)
    if isinstance(exc, ConnectionError | EOFError):
        return "tls_handshake_aborted", type(exc).__name__
    return "tls_handshake_failed", type(exc).__name__
