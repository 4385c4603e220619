"""Revocation for the development CA: a revocation store and CRL issuing.

Next to the CA files (see ``gateway_agent.pki``)::

    certs-dev/
      revoked.json               the revocation store and the last CRL Number issued
      crl/issuing-ca.crl         the current CRL of the issuing CA (DER)

``revoked.json``::

    {
      "version": 1,
      "last_crl_number": 4,
      "revoked": [
        {"serial": "4f1c...", "device": "device-002", "reason": "key_compromise",
         "revoked_at": "2025-01-02T03:04:05+00:00"}
      ]
    }

Serials are lowercase hex without ``0x``. ``reason`` is a ``cryptography.x509.ReasonFlags``
member name. The CRL Number only moves forward: it is persisted before the CRL is
written, so a crash can skip a number but never reuse one. Every write is atomic, and
a lock file serialises concurrent CLI runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from edge_core.clock import as_utc
from edge_core.errors import ConfigError, StateError
from edge_core.files import atomic_write_bytes, atomic_write_text
from gateway_agent.pki import FileCA, load_cert

__all__ = [
    "DEFAULT_CRL_VALIDITY",
    "REVOCATION_REASONS",
    "RevocationStore",
    "RevokedEntry",
    "crl_path",
    "issue_crl",
    "revoke",
]

DEFAULT_CRL_VALIDITY = timedelta(days=7)
_BACKDATE = timedelta(minutes=5)  # thisUpdate slightly in the past: tolerate clock differences
_STORE_VERSION = 1
#: Reasons an operator may give (``ReasonFlags`` names); ``remove_from_crl`` only exists in delta CRLs.
REVOCATION_REASONS = tuple(r.name for r in x509.ReasonFlags if r is not x509.ReasonFlags.remove_from_crl)


def crl_path(ca: FileCA) -> Path:
    return ca.dir / "crl" / "issuing-ca.crl"


@dataclass(frozen=True)
class RevokedEntry:
    serial: int
    reason: str
    revoked_at: datetime
    device: str | None = None

    def __post_init__(self) -> None:
        if self.reason not in REVOCATION_REASONS:
            raise ConfigError(f"revocation reason {self.reason!r} is not one of "
                              f"{', '.join(REVOCATION_REASONS)}")
        if self.serial <= 0:
            raise ConfigError(f"serial {self.serial} must be a positive integer")
        object.__setattr__(self, "revoked_at", as_utc(self.revoked_at))

    def to_json(self) -> dict[str, Any]:
        return {"serial": f"{self.serial:x}", "device": self.device, "reason": self.reason,
                "revoked_at": self.revoked_at.isoformat()}

    @classmethod
    def from_json(cls, data: Any, source: str) -> RevokedEntry:
        try:
            return cls(serial=int(data["serial"], 16), reason=str(data["reason"]),
                       revoked_at=datetime.fromisoformat(data["revoked_at"]), device=data.get("device"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed revocation entry {data!r}: {exc}", source=source) from exc


@dataclass(frozen=True)
class _StoreState:
    last_crl_number: int
    revoked: tuple[RevokedEntry, ...]


class RevocationStore:
    """``revoked.json`` of one CA directory. Read-modify-write happens under ``locked()``."""

    def __init__(self, ca: FileCA) -> None:
        self.ca = ca
        self.path = ca.dir / "revoked.json"
        self._lock_path = ca.dir / ".revoked.lock"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.ca.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def read(self) -> _StoreState:
        try:
            data = json.loads(self.path.read_text("utf-8"))
        except FileNotFoundError:
            return _StoreState(0, ())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read revocation store: {exc}", source=str(self.path)) from exc
        if not isinstance(data, dict) or data.get("version") != _STORE_VERSION:
            raise ConfigError(f"revocation store must be a version {_STORE_VERSION} object",
                              source=str(self.path))
        number = data.get("last_crl_number")
        revoked = data.get("revoked")
        if not isinstance(number, int) or number < 0 or not isinstance(revoked, list):
            raise ConfigError("revocation store needs last_crl_number >= 0 and a revoked list",
                              source=str(self.path))
        return _StoreState(number, tuple(RevokedEntry.from_json(e, str(self.path)) for e in revoked))

    def write(self, state: _StoreState) -> None:
        doc = {"version": _STORE_VERSION, "last_crl_number": state.last_crl_number,
               "revoked": [e.to_json() for e in state.revoked]}
        atomic_write_text(self.path, json.dumps(doc, indent=2) + "\n", mode=0o600)

    def entries(self) -> tuple[RevokedEntry, ...]:
        return self.read().revoked

    def last_crl_number(self) -> int:
        return self.read().last_crl_number


def _device_serial(ca: FileCA, device_id: str) -> int:
    crt, _ = ca.device_paths(device_id)
    if not crt.exists():
        raise ConfigError(f"no certificate for device {device_id!r} in {crt.parent}",
                          hint="give the serial number instead, or check the device id")
    return load_cert(crt).serial_number


def revoke(ca: FileCA, target: int | str, reason: str = "unspecified") -> RevokedEntry:
    """Add a serial (``int``) or the current certificate of a device id (``str``) to the store.

    Revoking an already revoked serial returns the existing entry unchanged. The CRL is
    not reissued here: run ``issue_crl`` (``gateway-agent pki crl``) to publish.
    """
    device = target if isinstance(target, str) else None
    serial = _device_serial(ca, target) if isinstance(target, str) else target
    entry = RevokedEntry(serial=serial, reason=reason, revoked_at=ca.clock.now(), device=device)
    store = RevocationStore(ca)
    with store.locked():
        state = store.read()
        for existing in state.revoked:
            if existing.serial == serial:
                return existing
        store.write(_StoreState(state.last_crl_number, (*state.revoked, entry)))
    return entry


def issue_crl(ca: FileCA, *, validity: timedelta = DEFAULT_CRL_VALIDITY, out: Path | None = None) -> bytes:
    """Sign a CRL of every revoked serial with the issuing CA; write it (DER) and return it.

    The CRL Number is the store's last number plus one, persisted before the file is
    written. thisUpdate is now minus five minutes, nextUpdate thisUpdate plus ``validity``.
    """
    if validity <= timedelta(0):
        raise ConfigError("CRL validity must be positive")
    issuing = ca.issuing()
    store = RevocationStore(ca)
    with store.locked():
        state = store.read()
        number = state.last_crl_number + 1
        if number <= state.last_crl_number:  # pragma: no cover - guards a future refactor
            raise StateError("crl_rollback", f"new CRL number {number} must be > {state.last_crl_number}")
        this_update = ca.clock.now() - _BACKDATE
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuing.cert.subject)
            .last_update(this_update)
            .next_update(this_update + validity)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuing.key.public_key()),
                           critical=False)
        )
        for entry in state.revoked:
            revoked = (x509.RevokedCertificateBuilder().serial_number(entry.serial)
                       .revocation_date(entry.revoked_at))
            if entry.reason != "unspecified":  # RFC 5280 5.3.1: omit rather than say "unspecified"
                flag = x509.ReasonFlags[entry.reason]
                revoked = revoked.add_extension(x509.CRLReason(flag), critical=False)
            builder = builder.add_revoked_certificate(revoked.build())
        crl = builder.sign(issuing.key, hashes.SHA256())
        der = crl.public_bytes(serialization.Encoding.DER)
        store.write(_StoreState(number, state.revoked))
        atomic_write_bytes(out if out is not None else crl_path(ca), der)
    return der
