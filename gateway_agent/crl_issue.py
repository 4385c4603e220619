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
from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from edge_core.clock import as_utc
from edge_core.errors import ConfigError, StateError
from edge_core.files import atomic_write_bytes, atomic_write_text
from gateway_agent.pki import FileCA

__all__ = [
    "DEFAULT_CRL_VALIDITY",
    "REVOCATION_REASONS",
    "RevocationStore",
    "RevokedEntry",
    "crl_path",
    "issue_crl",
    "revoke",
    "revoke_device",
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
    #: devices revoked as devices: the CA issues nothing more for them until re-enrolled
    devices: tuple[RevokedEntry, ...] = ()


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
        devices = data.get("revoked_devices", [])
        if not isinstance(devices, list):
            raise ConfigError("revocation store: revoked_devices must be a list", source=str(self.path))
        return _StoreState(number, tuple(RevokedEntry.from_json(e, str(self.path)) for e in revoked),
                           tuple(RevokedEntry.from_json(e, str(self.path)) for e in devices))

    def write(self, state: _StoreState) -> None:
        doc: dict[str, Any] = {"version": _STORE_VERSION, "last_crl_number": state.last_crl_number,
                               "revoked": [e.to_json() for e in state.revoked]}
        if state.devices:
            doc["revoked_devices"] = [e.to_json() for e in state.devices]
        atomic_write_text(self.path, json.dumps(doc, indent=2) + "\n", mode=0o600)

    def entries(self) -> tuple[RevokedEntry, ...]:
        return self.read().revoked

    def last_crl_number(self) -> int:
        return self.read().last_crl_number

    def revoked_devices(self) -> dict[str, RevokedEntry]:
        return {e.device: e for e in self.read().devices if e.device is not None}

    def reinstate(self, device_id: str) -> bool:
        """Lift a device's revocation (an admin re-enrols it); its revoked serials stay revoked."""
        with self.locked():
            state = self.read()
            kept = tuple(e for e in state.devices if e.device != device_id)
            if len(kept) == len(state.devices):
                return False
            self.write(replace(state, devices=kept))
        return True


def revoke(ca: FileCA, target: int | str, reason: str = "unspecified", *, device: str | None = None) -> RevokedEntry:
    """Add a serial (``int``) or a device id (``str``) to the store.

    Revoking an already revoked serial returns the existing entry unchanged; ``device``
    names the device a serial belongs to, for the record. A device id goes through
    ``revoke_device`` without an inventory: every unexpired certificate of it is revoked,
    the device is blocked, and the newest entry is returned. The CRL is not reissued here:
    run ``issue_crl`` (``gateway-agent pki crl``) to publish.
    """
    if isinstance(target, str):
        return revoke_device(ca, target, reason)[0]
    entry = RevokedEntry(serial=target, reason=reason, revoked_at=ca.clock.now(), device=device)
    store = RevocationStore(ca)
    with store.locked():
        state = store.read()
        for existing in state.revoked:
            if existing.serial == target:
                return existing
        store.write(replace(state, revoked=(*state.revoked, entry)))
    return entry


def revoke_device(ca: FileCA, device_id: str, reason: str = "unspecified", *,
                  serials: Collection[int] | None = None, all_certs: bool = False) -> tuple[RevokedEntry, ...]:
    """Revoke a device, then block it. Which certificates:

    - ``serials``: the ones the device holds as the inventory knows them (current, an issued
      candidate, the old one in a renewal's overlap): every certificate the broker may admit;
    - ``all_certs``: every unexpired certificate the CA issued for it (with ``serials`` too);
    - neither (no inventory: the CA cannot tell which certificate is in use): every unexpired
      certificate of it not revoked yet. Fail closed: after a rolled-back renewal the newest
      certificate is the revoked candidate, and the one in use is older.

    When the CA holds no unexpired certificate of it, the newest is revoked (it still blocks
    the device). Entries come newest first (``serials`` in the order given). A blocked device
    gets nothing more from this CA (``FileCA.issue_device``, renewals) until an admin
    re-enrols it. Raises ``ConfigError`` when neither the CA nor ``serials`` know the device.
    """
    certs = ca.certificates_of(device_id)
    now = ca.clock.now()
    store = RevocationStore(ca)
    newest_first = [c.serial_number for c in reversed(certs)]
    unexpired = [c.serial_number for c in reversed(certs) if c.not_valid_after_utc > now]
    entries: list[RevokedEntry] = []
    with store.locked():
        state = store.read()
        known = {e.serial: e for e in state.revoked}
        if serials is not None or all_certs:
            targets = [*(serials or ()), *(unexpired if all_certs else ())]
        else:
            targets = [s for s in unexpired if s not in known]
        targets = list(dict.fromkeys(targets)) or newest_first[:1]
        if not targets:
            raise ConfigError(f"the CA never issued a certificate for device {device_id!r}",
                              hint="check the device id (`gateway-agent devices list`), or give the serial")
        added: list[RevokedEntry] = []
        for value in targets:
            entry = known.get(value) or RevokedEntry(serial=value, reason=reason, revoked_at=now, device=device_id)
            if value not in known:
                added.append(entry)
                known[value] = entry
            entries.append(entry)
        devices = state.devices
        if device_id not in {e.device for e in devices}:
            devices = (*devices, RevokedEntry(serial=targets[0], reason=reason, revoked_at=now, device=device_id))
        store.write(replace(state, revoked=(*state.revoked, *added), devices=devices))
    return tuple(entries)


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
        store.write(replace(state, last_crl_number=number))
        atomic_write_bytes(out if out is not None else crl_path(ca), der)
    return der
