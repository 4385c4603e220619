"""Device identity from an X.509 certificate.

The identity always comes from the certificate, never from the MQTT username.
Where it sits in the certificate is a policy (``IdentityPolicy``):

- ``san_uri`` (default): exactly one SubjectAltName URI starting with the prefix,
  ``urn:device:`` by default, so ``urn:device:pump-17`` names device ``pump-17``;
- ``subject_cn``: the single Common Name of the subject, for site CAs that only set CN.

Identities are also used as MQTT topic levels and client ids, so anything that could
widen a topic filter (``+``, ``#``, ``/``), NUL, whitespace or control characters is
refused, as is anything outside a conservative character set.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from edge_core.errors import ConfigError, CredentialError
from edge_core.names import name_key

__all__ = [
    "CertInfo",
    "IdentityPolicy",
    "check_identity",
    "describe_certificate",
    "spki_pin",
    "spki_pin_of_key",
]

_IDENTITY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_TOPIC_META = {"+": "'+'", "#": "'#'", "/": "'/'", "\x00": "NUL"}


def check_identity(value: str) -> str:
    """Return ``value`` if it is a safe identity, else raise ``CredentialError(identity_invalid)``."""
    for char, name in _TOPIC_META.items():
        if char in value:
            raise CredentialError(
                "identity_invalid",
                f"identity {value!r} contains {name}, which could widen an MQTT topic filter",
            )
    if not _IDENTITY_RE.match(value):
        raise CredentialError(
            "identity_invalid",
            f"identity {value!r} must be 1-128 characters of A-Z a-z 0-9 . _ : @ - and start alphanumeric",
        )
    return value


def spki_pin_of_key(public_key: CertificatePublicKeyTypes) -> str:
    """The one pin function: ``sha256:`` and the hex SHA-256 of the SubjectPublicKeyInfo (DER)."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def spki_pin(cert: x509.Certificate | x509.CertificateSigningRequest) -> str:
    """The pin of a certificate (or of the key a CSR asks to certify)."""
    return spki_pin_of_key(cert.public_key())


@dataclass(frozen=True)
class IdentityPolicy:
    source: Literal["san_uri", "subject_cn"] = "san_uri"
    uri_prefix: str = "urn:device:"

    def __post_init__(self) -> None:
        if self.source not in ("san_uri", "subject_cn"):
            raise ConfigError(f"identity source must be 'san_uri' or 'subject_cn', not {self.source!r}")
        if self.source == "san_uri" and not self.uri_prefix:
            raise ConfigError("identity uri_prefix must not be empty")

    def extract(self, cert: x509.Certificate | x509.CertificateSigningRequest) -> str:
        """The identity a certificate (or a CSR) names under this policy; raises ``CredentialError``.

        One extractor for both, so a renewal CSR is judged by exactly the rules the broker
        applies to the certificate it becomes.
        """
        what = "CSR" if isinstance(cert, x509.CertificateSigningRequest) else "certificate"
        if self.source == "san_uri":
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            except x509.ExtensionNotFound as exc:
                raise CredentialError(
                    "identity_missing", f"{what} has no SubjectAltName with a {self.uri_prefix} URI"
                ) from exc
            ids = [u[len(self.uri_prefix) :] for u in san.get_values_for_type(x509.UniformResourceIdentifier)
                   if u.startswith(self.uri_prefix)]
            if not ids:
                raise CredentialError(
                    "identity_missing", f"{what} has no SubjectAltName URI starting with {self.uri_prefix}"
                )
            if len(ids) > 1:
                raise CredentialError(
                    "identity_ambiguous", f"{what} names {len(ids)} identities; exactly one is allowed"
                )
            return check_identity(ids[0])
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1:
            raise CredentialError("identity_missing", f"{what} subject has {len(cns)} CNs; exactly one needed")
        value = cns[0].value
        return check_identity(value if isinstance(value, str) else value.decode("utf-8", "replace"))


@dataclass(frozen=True)
class CertInfo:
    """What the rest of the system needs to know about a presented certificate."""

    identity: str
    serial: int
    issuer: str  # the RFC 5280 comparison key of the issuer name (edge_core.names.name_key)
    spki_pin: str
    fingerprint: str
    not_before: datetime
    not_after: datetime
    #: the parsed certificate, for path checks (revocation of its CAs); not compared
    certificate: x509.Certificate | None = field(default=None, repr=False, compare=False)

    @property
    def short_fingerprint(self) -> str:
        return self.fingerprint[:16]


def describe_certificate(der: bytes, policy: IdentityPolicy) -> CertInfo:
    """Parse a DER certificate and extract its identity; raises ``CredentialError``."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise CredentialError("cert_unparseable", f"certificate is not valid DER X.509: {exc}") from exc
    identity = policy.extract(cert)
    return CertInfo(
        identity=identity,
        serial=cert.serial_number,
        issuer=name_key(cert.issuer),
        spki_pin=spki_pin(cert),
        fingerprint=hashlib.sha256(der).hexdigest(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        certificate=cert,
    )
