"""Who may open an MQTT session: the admission decision.

``admit`` returns an ``Admitted`` record or raises ``AdmissionRefused`` with one of the
stable reason codes below. It does no I/O: the certificate bytes, the client id, the
registry and the time are all handed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from edge_core.chain import PathRefused, TrustStore, ValidPath, build_path, check_revocation
from edge_core.errors import CredentialError
from edge_core.identity import CertInfo, IdentityPolicy, describe_certificate
from edge_core.registry import DeviceEntry, Registry
from edge_core.revocation import RevocationIndex, StalenessPolicy

__all__ = ["REASONS", "AdmissionRefused", "Admitted", "RevocationView", "admit", "session_verdict", "still_admitted"]

#: Stable reason codes for ``auth.rejected`` events. Never renamed, only added to.
REASONS = (
    "no_client_cert",
    "cert_unparseable",
    "identity_missing",
    "identity_ambiguous",
    "identity_invalid",
    "cert_not_yet_valid",
    "cert_expired",
    "client_id_mismatch",
    "unknown_device",
    "device_disabled",
    "pin_mismatch",
)


class AdmissionRefused(CredentialError):
    """The CONNECT is refused; ``reason`` is one of ``REASONS`` (or a plugin's own code)."""

    def __init__(self, reason: str, message: str, *, device: str | None = None) -> None:
        super().__init__(reason, message)
        self.device = device


@dataclass(frozen=True)
class Admitted:
    device: DeviceEntry
    cert: CertInfo

    @property
    def identity(self) -> str:
        return self.device.device_id


def admit(
    *,
    cert_der: bytes | None,
    client_id: str | None,
    registry: Registry,
    policy: IdentityPolicy,
    now: datetime,
) -> Admitted:
    if not cert_der:
        raise AdmissionRefused("no_client_cert", "no client certificate was presented")
    try:
        cert = describe_certificate(cert_der, policy)
    except CredentialError as exc:
        raise AdmissionRefused(exc.reason, str(exc)) from exc
    device_id = cert.identity
    if now < cert.not_before:
        raise AdmissionRefused(
            "cert_not_yet_valid",
            f"certificate for {device_id} is valid from {cert.not_before.isoformat()}",
            device=device_id,
        )
    if now >= cert.not_after:
        raise AdmissionRefused(
            "cert_expired", f"certificate for {device_id} expired at {cert.not_after.isoformat()}", device=device_id
        )
    if client_id != device_id:
        raise AdmissionRefused(
            "client_id_mismatch",
            f"client id {client_id!r} differs from certificate identity {device_id!r}",
            device=device_id,
        )
    entry = registry.get(device_id)
    if entry is None:
        raise AdmissionRefused("unknown_device", f"device {device_id} is not in the registry", device=device_id)
    if not entry.enabled:
        raise AdmissionRefused("device_disabled", f"device {device_id} is disabled in the registry", device=device_id)
    if not entry.pinned(cert.spki_pin):
        raise AdmissionRefused(
            "pin_mismatch",
            f"certificate key {cert.spki_pin[:23]}... is not pinned for {device_id}",
            device=device_id,
        )
    return Admitted(device=entry, cert=cert)


def still_admitted(admitted: Admitted, registry: Registry, now: datetime) -> str | None:
    """Re-check a live session against a new registry or time; returns a refusal reason or None."""
    entry = registry.get(admitted.identity)
    if entry is None:
        return "unknown_device"
    if not entry.enabled:
        return "device_disabled"
    if not entry.pinned(admitted.cert.spki_pin):
        return "pin_mismatch"
    if now >= admitted.cert.not_after:
        return "cert_expired"
    return None


@dataclass(frozen=True)
class RevocationView:
    """What a session verdict needs of the revocation state: trust bundle, CRL index, policy."""

    trust: TrustStore
    index: RevocationIndex
    staleness: StalenessPolicy


def session_verdict(
    admitted: Admitted,
    *,
    now: datetime,
    registry: Registry | None = None,
    revocation: RevocationView | None = None,
    path: ValidPath | None = None,
) -> str | None:
    """May this session live (at CONNECT, and again whenever the registry, a CRL or the clock moves)?

    None, or the stable reason it must end: the registry's (``unknown_device``,
    ``device_disabled``, ``pin_mismatch``, ``cert_expired``), then revocation of every
    certificate on the path - ``revoked`` (the device's or a CA's), ``crl_stale`` (a CRL
    missing or stale under ``fail_closed``), ``path_crl_signer_invalid``. ``path`` is the
    path built at CONNECT (``build_path``); without one it is built here, and if the CAs
    are not all known locally (TLS accepted a chain the client sent) only the device's own
    certificate is checked against its issuer's CRL.
    """
    if registry is not None:
        reason = still_admitted(admitted, registry, now)
        if reason is not None:
            return reason
    if revocation is None:
        return None
    cert = admitted.cert
    if path is None and cert.certificate is not None:
        try:
            path = build_path(cert.certificate, trust=revocation.trust, now=now)
        except PathRefused:
            path = None
    if path is not None:
        try:
            check_revocation(path, trust=revocation.trust, index=revocation.index, now=now,
                             staleness=revocation.staleness)
        except PathRefused as exc:
            return "crl_stale" if exc.reason == "path_no_crl" else exc.reason
        return None
    if revocation.index.is_revoked(cert.issuer, cert.serial):
        return "revoked"
    if not revocation.staleness.evaluate(revocation.index.installed.get(cert.issuer), now).admit:
        return "crl_stale"
    return None
