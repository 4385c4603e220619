"""The device's credential store: old and new certificates with their keys, side by side on disk.

Key and certificate files are immutable once written (keys 0600); one small ``state.json``,
replaced atomically, says which credential is active, which one is the previous (kept for
rollback) and which key is pending. A switch or a rollback is a single ``os.replace``, so a
power cut leaves the old or the new state, never half. The rotation protocol
(``device_client.rotation``) is the store's only writer.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge_core.errors import CredentialError, StateError
from edge_core.files import atomic_write_bytes, atomic_write_text
from edge_core.identity import spki_pin_of_key
from edge_core.rotation_wire import serial_hex

__all__ = ["CredentialStore", "PendingCredential", "StoredCredential"]


@dataclass(frozen=True)
class StoredCredential:
    """One certificate with its key, as files the TLS stack can load."""

    serial: int
    cert_path: Path
    key_path: Path
    chain_path: Path | None = None

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_path.read_bytes())


@dataclass(frozen=True)
class PendingCredential:
    """A rotation in progress: the fresh key, its certificate once stored, whether that passed its test."""

    key: ec.EllipticCurvePrivateKey
    credential: StoredCredential | None = None
    tested: bool = False


def _key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    return spki_pin_of_key(public_key).removeprefix("sha256:")[:32]


class CredentialStore:
    """Old and new credentials side by side on disk; ``state.json`` points at them.

    Layout::

        <dir>/state.json                 {"version": 1, "active": {...}, "previous": {...}|null,
                                          "pending": {"key": <key id>, "serial": <hex>|null,
                                                      "tested": bool}|null}
        <dir>/keys/<key id>.key          PKCS#8 PEM, 0600, never sent anywhere
        <dir>/certs/<serial>.crt         the leaf certificate
        <dir>/certs/<serial>.chain.pem   the chain the agent sent with it

    Files are written once under names derived from their content (key id, serial); only
    ``state.json`` changes, atomically, so every operation is all-or-nothing. Files no longer
    referenced are deleted after the state that dropped them is on disk.
    """

    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory)
        self._state_path = self.dir / "state.json"

    # ---------------------------------------------------------------- reading

    @property
    def initialized(self) -> bool:
        return self._state_path.exists()

    def _read(self) -> dict[str, Any]:
        try:
            state = json.loads(self._state_path.read_text("utf-8"))
        except FileNotFoundError as exc:
            raise StateError("store_uninitialized", f"{self.dir}: no credential store yet; call initialize() "
                             "with the factory certificate and key") from exc
        except ValueError as exc:
            raise StateError("store_corrupt", f"{self._state_path}: not JSON: {exc}") from exc
        if not isinstance(state, dict) or state.get("version") != 1 or not isinstance(state.get("active"), dict):
            raise StateError("store_corrupt", f"{self._state_path}: not a version 1 credential store")
        return state

    def _credential(self, slot: dict[str, Any]) -> StoredCredential:
        serial = slot["serial"]
        return StoredCredential(int(serial, 16), self.dir / "certs" / f"{serial}.crt",
                                self.dir / "keys" / f"{slot['key']}.key",
                                self.dir / "certs" / f"{serial}.chain.pem")

    def active(self) -> StoredCredential:
        """The credential every (re)connection uses."""
        return self._credential(self._read()["active"])

    def previous(self) -> StoredCredential | None:
        """The credential before the last switch, kept so the device can roll back."""
        slot = self._read().get("previous")
        return self._credential(slot) if isinstance(slot, dict) else None

    def pending(self) -> PendingCredential | None:
        """The rotation in progress, if any."""
        slot = self._read().get("pending")
        if not isinstance(slot, dict):
            return None
        key = _load_key(self.dir / "keys" / f"{slot['key']}.key")
        cred = self._credential(slot) if isinstance(slot.get("serial"), str) else None
        return PendingCredential(key, cred, bool(slot.get("tested")))

    # ---------------------------------------------------------------- changes

    def _write(self, state: dict[str, Any]) -> None:
        atomic_write_text(self._state_path, json.dumps(state, indent=2, sort_keys=True) + "\n", mode=0o600)
        self._collect(state)

    def _collect(self, state: dict[str, Any]) -> None:
        """Delete key and certificate files the state no longer references (best effort)."""
        slots = [s for s in (state.get("active"), state.get("previous"), state.get("pending")) if isinstance(s, dict)]
        keep_keys = {f"{s['key']}.key" for s in slots}
        keep_certs = set()
        for s in slots:
            if isinstance(s.get("serial"), str):
                keep_certs |= {f"{s['serial']}.crt", f"{s['serial']}.chain.pem"}
        for sub, keep in (("keys", keep_keys), ("certs", keep_certs)):
            folder = self.dir / sub
            if folder.is_dir():
                for path in folder.iterdir():
                    if path.name not in keep and not path.name.startswith("."):
                        with contextlib.suppress(OSError):
                            path.unlink()

    def _write_key(self, key: ec.EllipticCurvePrivateKey) -> str:
        kid = _key_id(key.public_key())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        (self.dir / "keys").mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_bytes(self.dir / "keys" / f"{kid}.key", pem, mode=0o600)
        return kid

    def _write_cert(self, cert: x509.Certificate, chain_pem: bytes) -> str:
        serial = serial_hex(cert.serial_number)
        atomic_write_bytes(self.dir / "certs" / f"{serial}.chain.pem", chain_pem)
        atomic_write_bytes(self.dir / "certs" / f"{serial}.crt", cert.public_bytes(serialization.Encoding.PEM))
        return serial

    def initialize(self, cert_pem: bytes, key_pem: bytes, chain_pem: bytes = b"") -> StoredCredential:
        """Adopt the factory (or enrolment) credential as the active one. Refuses to overwrite a store."""
        if self.initialized:
            raise StateError("store_exists", f"{self.dir} already holds credentials; it is never re-initialised")
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.public_key() != key.public_key():
            raise CredentialError("cert_key_mismatch", "the initial certificate does not certify the initial key")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        kid = self._write_key(key)
        serial = self._write_cert(cert, chain_pem)
        self._write({"version": 1, "active": {"serial": serial, "key": kid}, "previous": None, "pending": None})
        return self.active()

    def new_pending_key(self) -> ec.EllipticCurvePrivateKey:
        """Start a rotation: a fresh P-256 key, on disk before its CSR leaves the device.

        Replaces any earlier pending key. The previous credential is dropped too: the agent only
        starts a rotation once the last overlap is over, so nothing can fall back to it any more.
        """
        state = self._read()
        key = ec.generate_private_key(ec.SECP256R1())
        kid = self._write_key(key)
        state["pending"] = {"key": kid, "serial": None, "tested": False}
        state["previous"] = None
        self._write(state)
        return key

    def store_candidate(self, cert: x509.Certificate, chain_pem: bytes) -> StoredCredential:
        """Keep a checked certificate for the pending key next to the active one (not used yet)."""
        state = self._read()
        pending = state.get("pending")
        if not isinstance(pending, dict):
            raise StateError("no_pending_key", "no rotation in progress: no pending key for this certificate")
        serial = self._write_cert(cert, chain_pem)
        state["pending"] = {"key": pending["key"], "serial": serial, "tested": False}
        self._write(state)
        return self._credential(state["pending"])

    def mark_tested(self, serial: int) -> None:
        state = self._read()
        pending = state.get("pending")
        if not isinstance(pending, dict) or pending.get("serial") != serial_hex(serial):
            raise StateError("no_such_certificate", f"certificate {serial:x} is not the pending one")
        pending["tested"] = True
        self._write(state)

    def discard_pending(self) -> None:
        """Forget the pending key and certificate: the device stays on its active credential."""
        state = self._read()
        if state.get("pending") is not None:
            state["pending"] = None
            self._write(state)

    def switch(self, serial: int) -> StoredCredential:
        """Make the tested pending credential ``serial`` the active one; the old one becomes previous."""
        state = self._read()
        pending = state.get("pending")
        if not isinstance(pending, dict) or pending.get("serial") != serial_hex(serial):
            raise StateError("no_such_certificate", f"certificate {serial:x} is not the pending one")
        if not pending.get("tested"):
            raise StateError("not_tested", f"certificate {serial:x} has not passed its test; refusing to switch")
        state["previous"] = state["active"]
        state["active"] = {"serial": pending["serial"], "key": pending["key"]}
        state["pending"] = None
        self._write(state)
        return self._credential(state["active"])

    def rollback(self) -> StoredCredential:
        """Go back to the previous credential (the active one is dropped)."""
        state = self._read()
        previous = state.get("previous")
        if not isinstance(previous, dict):
            raise StateError("no_previous", "there is no previous credential to roll back to")
        state["active"] = previous
        state["previous"] = None
        self._write(state)
        return self._credential(previous)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StateError("store_corrupt", f"{path}: not an EC private key")
    return key
