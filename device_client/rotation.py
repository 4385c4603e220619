"""The device side of certificate rotation (issue 6, steps 1-4): what firmware must do.

The gateway agent drives a rotation over the device's own mTLS MQTT session
(``docs/rotation.md`` has the message formats and the sequence diagram)::

    devices/<id>/rotation/request   agent -> device   csr_request, certificate, test, switch
    devices/<id>/rotation/response  device -> agent   csr, stored, test_result, switched, error

The device side is three layers, outermost last:

- ``CredentialStore``: the credentials on disk. Key and certificate files are immutable once
  written (keys 0600); one small ``state.json``, replaced atomically, says which credential is
  active, which one is the previous (kept for rollback) and which key is pending. A switch or a
  rollback is a single ``os.replace``, so a power cut leaves the old or the new state, never half.
- ``RotationHandler``: one request in, one response out. It makes the fresh key and the CSR
  (the key never leaves the device), checks a pushed certificate before storing it (chains to
  the trust bundle, names this device, certifies the pending key), tests it against the broker's
  certificate test endpoint with a bare MQTT CONNECT, and switches only after a passed test.
- ``DeviceRotation``: the session loop. It connects with the active credential, hands rotation
  requests to the handler and everything else to ``on_message``, and performs the switch: close
  the session, reconnect with the new credential, and report the serial now in use. If the
  reconnect fails it rolls back to the previous credential and reports that serial instead.

Serials travel as lowercase hex strings: X.509 serials reach 159 bits, far past what a JSON
number carries safely.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import AttributeOID, NameOID

from device_client.client import DeviceClient, DeviceConfig
from edge_core.clock import Clock, SystemClock
from edge_core.errors import CredentialError, StateError
from edge_core.events import SecurityEvents
from edge_core.files import atomic_write_bytes, atomic_write_text
from edge_core.identity import IdentityPolicy, check_identity, spki_pin_of_key
from edge_core.rotation_wire import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    REQUEST_TOPIC,
    RESPONSE_TOPIC,
    parse_serial,
    serial_hex,
)

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "REQUEST_TOPIC",
    "RESPONSE_TOPIC",
    "CertTestResult",
    "CredentialStore",
    "DeviceRotation",
    "HandlerResult",
    "PendingCredential",
    "RotationHandler",
    "StoredCredential",
    "check_pushed_certificate",
    "make_csr",
    "probe_certificate",
    "spki_pin_of",
]

_NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CONNACK_REASONS = {1: "unacceptable_protocol", 2: "identifier_rejected", 3: "server_unavailable",
                    4: "bad_credentials", 5: "not_authorized"}


# --------------------------------------------------------------------------- the store on disk


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


# --------------------------------------------------------------------------- checks (no I/O)


def make_csr(key: ec.EllipticCurvePrivateKey, device_id: str, nonce: str, *,
             identity_policy: IdentityPolicy | None = None) -> bytes:
    """A PEM CSR for ``key`` naming this device, with ``nonce`` as challengePassword (proves freshness)."""
    policy = identity_policy or IdentityPolicy()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
    if policy.source == "san_uri":
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(policy.uri_prefix + device_id)]),
            critical=False)
    csr = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, nonce.encode("ascii")).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def check_pushed_certificate(
    cert_pem: bytes,
    chain_pem: bytes,
    *,
    device_id: str,
    pending_key: ec.EllipticCurvePublicKey,
    trust_bundle: bytes,
    now: datetime,
    identity_policy: IdentityPolicy | None = None,
) -> x509.Certificate:
    """Check a certificate the agent pushed; returns it or raises ``CredentialError``.

    - ``cert_unparseable`` / ``chain_unparseable``: not PEM;
    - ``cert_untrusted``: no valid path to a root of the device's own trust bundle at ``now``
      (signature, validity, CA constraints, client-auth usage); the pushed chain only supplies
      intermediates, it is never trusted by itself;
    - ``cert_identity_mismatch``: names another device (or none);
    - ``cert_key_mismatch``: certifies another key than the pending one.
    """
    policy = identity_policy or IdentityPolicy()
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise CredentialError("cert_unparseable", f"pushed certificate is not PEM: {exc}") from exc
    try:
        intermediates = x509.load_pem_x509_certificates(chain_pem) if chain_pem.strip() else []
    except ValueError as exc:
        raise CredentialError("chain_unparseable", f"pushed chain is not PEM: {exc}") from exc
    bundle = x509.load_pem_x509_certificates(trust_bundle)
    roots = [c for c in bundle if c.issuer == c.subject]
    intermediates += [c for c in bundle if c.issuer != c.subject]
    if not roots:
        raise CredentialError("cert_untrusted", "the device's trust bundle holds no root certificate")
    verifier = verification.PolicyBuilder().store(verification.Store(roots)).time(now).build_client_verifier()
    try:
        verifier.verify(cert, intermediates)
    except verification.VerificationError as exc:
        raise CredentialError("cert_untrusted",
                              f"pushed certificate does not chain to the trust bundle: {exc}") from exc
    try:
        identity = policy.extract(cert)
    except CredentialError as exc:
        raise CredentialError("cert_identity_mismatch", f"pushed certificate names no device: {exc}") from exc
    if identity != device_id:
        raise CredentialError("cert_identity_mismatch", f"pushed certificate is for {identity!r}, not {device_id!r}")
    if cert.public_key() != pending_key:
        raise CredentialError("cert_key_mismatch", "pushed certificate does not certify the pending key")
    return cert


# --------------------------------------------------------------------------- the test connection


@dataclass(frozen=True)
class CertTestResult:
    __test__ = False  # not a pytest test class

    ok: bool
    reason: str = ""


def _connect_packet(client_id: str, keepalive: int = 10) -> bytes:
    """An MQTT 3.1.1 CONNECT: clean session, no will, no credentials (the certificate is the credential)."""
    ident = client_id.encode("utf-8")
    body = b"\x00\x04MQTT\x04\x02" + keepalive.to_bytes(2, "big") + len(ident).to_bytes(2, "big") + ident
    return b"\x10" + bytes([len(body)]) + body  # < 128 bytes: identities are short


async def probe_certificate(host: str, port: int, *, device_id: str, trust: Path, credential: StoredCredential,
                            limit: float = 10.0) -> CertTestResult:
    """Connect to the broker's certificate test endpoint with ``credential``; CONNACK 0 means it works.

    Reasons on failure: ``test_timeout``, ``tls_handshake_failed``, ``connection_closed``,
    ``test_endpoint_unreachable``, ``protocol_error``, ``refused_<connack reason>``.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=trust)
    ctx.load_cert_chain(credential.cert_path, credential.key_path)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
            writer.write(_connect_packet(device_id))
            await writer.drain()
            head = await reader.readexactly(4)
    except TimeoutError:
        return CertTestResult(False, "test_timeout")
    except ssl.SSLError:
        return CertTestResult(False, "tls_handshake_failed")
    except asyncio.IncompleteReadError:
        return CertTestResult(False, "connection_closed")
    except OSError:
        return CertTestResult(False, "test_endpoint_unreachable")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                async with asyncio.timeout(2):
                    await writer.wait_closed()
    if head[0] != 0x20 or head[1] != 0x02:
        return CertTestResult(False, "protocol_error")
    if head[3] != 0:
        return CertTestResult(False, "refused_" + _CONNACK_REASONS.get(head[3], f"code_{head[3]}"))
    return CertTestResult(True)


# --------------------------------------------------------------------------- message handling


@dataclass(frozen=True)
class HandlerResult:
    """What to do with one request: publish ``response``; or, for a switch, reconnect with
    ``switch_to`` first and then report the serial in use under ``request_id``."""

    request_id: str
    response: dict[str, Any] | None = None
    switch_to: StoredCredential | None = None


class RotationHandler:
    """Turns one rotation request into one response. Keeps the last responses so a QoS 1
    duplicate gets the same answer instead of, say, a second fresh key."""

    def __init__(self, device_id: str, store: CredentialStore, *, trust: Path, test_endpoint: tuple[str, int],
                 clock: Clock | None = None, identity_policy: IdentityPolicy | None = None,
                 events: SecurityEvents | None = None, test_timeout: float = 10.0) -> None:
        self.device_id = check_identity(device_id)
        self.store = store
        self.trust = trust
        self.test_endpoint = test_endpoint
        self.clock = clock or SystemClock()
        self.identity_policy = identity_policy or IdentityPolicy()
        self.events = events or SecurityEvents("device_client.rotation")
        self.test_timeout = test_timeout
        self._answered: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def _error(self, request_id: str, reason: str, detail: str = "") -> HandlerResult:
        self.events.emit("rotation.request_refused", reason, level="warning", device=self.device_id, detail=detail)
        return HandlerResult(request_id, {"type": "error", "reason": reason})

    async def handle(self, payload: bytes) -> HandlerResult | None:
        """``None`` for a message that cannot be answered (no usable request id)."""
        if len(payload) > MAX_MESSAGE_BYTES:
            self.events.emit("rotation.request_dropped", "oversized", level="warning", device=self.device_id)
            return None
        try:
            request = json.loads(payload)
        except ValueError:
            request = None
        request_id = request.get("id") if isinstance(request, dict) else None
        if not isinstance(request, dict) or not isinstance(request_id, str) or not _REQUEST_ID_RE.match(request_id):
            self.events.emit("rotation.request_dropped", "malformed", level="warning", device=self.device_id)
            return None
        if request_id in self._answered:  # a QoS 1 duplicate: same answer, nothing done twice
            return HandlerResult(request_id, self._answered[request_id])
        result = await self._dispatch(request_id, request)
        if result.response is not None:
            self._answered[request_id] = result.response
            while len(self._answered) > 16:
                self._answered.popitem(last=False)
        return result

    def remember(self, request_id: str, response: dict[str, Any]) -> None:
        """Record the answer to a switch once it is known (after the reconnect)."""
        self._answered[request_id] = response

    async def _dispatch(self, request_id: str, request: dict[str, Any]) -> HandlerResult:
        if request.get("v") != PROTOCOL_VERSION:
            return self._error(request_id, "unsupported_version", f"version {request.get('v')!r}")
        kind = request.get("type")
        try:
            if kind == "csr_request":
                return self._csr(request_id, request)
            if kind == "certificate":
                return self._certificate(request_id, request)
            if kind == "test":
                return await self._test(request_id, _serial_field(request, "serial"))
            if kind == "switch":
                return self._switch(request_id, _serial_field(request, "serial"))
        except (ValueError, TypeError) as exc:
            return self._error(request_id, "malformed_request", str(exc))
        except CredentialError as exc:
            return self._error(request_id, exc.reason, str(exc))
        except (StateError, OSError) as exc:
            return self._error(request_id, getattr(exc, "reason", "store_failed"), str(exc))
        return self._error(request_id, "unknown_type", f"type {kind!r}")

    def _csr(self, request_id: str, request: dict[str, Any]) -> HandlerResult:
        nonce = request.get("nonce")
        if not isinstance(nonce, str) or not _NONCE_RE.match(nonce):
            raise ValueError("nonce must be 16 to 128 characters of A-Z a-z 0-9 _ -")
        key = self.store.new_pending_key()  # on disk before the CSR leaves
        csr = make_csr(key, self.device_id, nonce, identity_policy=self.identity_policy)
        self.events.emit("rotation.csr_created", device=self.device_id, pin=spki_pin_of(key.public_key())[:23])
        return HandlerResult(request_id, {"type": "csr", "nonce": nonce, "csr_pem": csr.decode("ascii")})

    def _certificate(self, request_id: str, request: dict[str, Any]) -> HandlerResult:
        cert_pem, chain_pem = request.get("cert_pem"), request.get("chain_pem", "")
        if not isinstance(cert_pem, str) or not isinstance(chain_pem, str):
            raise TypeError("cert_pem and chain_pem must be strings")
        serial = _serial_field(request, "serial")
        pending = self.store.pending()
        if pending is None:
            raise StateError("no_pending_key", "no rotation in progress")
        cert = check_pushed_certificate(cert_pem.encode("ascii"), chain_pem.encode("ascii"), device_id=self.device_id,
                                        pending_key=pending.key.public_key(), trust_bundle=self.trust.read_bytes(),
                                        now=self.clock.now(), identity_policy=self.identity_policy)
        if cert.serial_number != serial:
            raise CredentialError("serial_mismatch", f"message says serial {serial:x}, certificate has "
                                  f"{cert.serial_number:x}")
        self.store.store_candidate(cert, chain_pem.encode("ascii"))
        self.events.emit("rotation.cert_stored", device=self.device_id, serial=serial_hex(serial))
        return HandlerResult(request_id, {"type": "stored", "serial": serial_hex(serial)})

    async def _test(self, request_id: str, serial: int) -> HandlerResult:
        pending = self.store.pending()
        candidate = pending.credential if pending is not None else None
        if candidate is None or candidate.serial != serial:
            result = CertTestResult(False, "no_such_certificate")
        else:
            host, port = self.test_endpoint
            result = await probe_certificate(host, port, device_id=self.device_id, trust=self.trust,
                                            credential=candidate, limit=self.test_timeout)
            if result.ok:
                self.store.mark_tested(serial)
            else:
                self.store.discard_pending()  # roll back: the device stays on the certificate it uses
        if result.ok:
            self.events.emit("rotation.test_passed", device=self.device_id, serial=serial_hex(serial))
        else:
            self.events.emit("rotation.test_failed", result.reason, level="warning", device=self.device_id,
                             serial=serial_hex(serial))
        return HandlerResult(request_id, {"type": "test_result", "serial": serial_hex(serial), "ok": result.ok,
                                          "reason": result.reason})

    def _switch(self, request_id: str, serial: int) -> HandlerResult:
        active = self.store.active()
        pending = self.store.pending()
        candidate = pending.credential if pending is not None else None
        if active.serial != serial and pending is not None and pending.tested \
                and candidate is not None and candidate.serial == serial:
            return HandlerResult(request_id, switch_to=self.store.switch(serial))
        # Already switched (a repeated ask), or nothing tested to switch to: report what is in use.
        return HandlerResult(request_id, {"type": "switched", "serial_in_use": serial_hex(active.serial)})


def spki_pin_of(key: ec.EllipticCurvePublicKey) -> str:
    return spki_pin_of_key(key)


def _serial_field(request: dict[str, Any], name: str) -> int:
    return parse_serial(request.get(name), name)


# --------------------------------------------------------------------------- the session loop


MessageCallback = Callable[[aiomqtt.Message], Awaitable[None]]


class DeviceRotation:
    """Runs the device's MQTT session with rotation built in; one instance per device process.

    ``config`` gives broker address and trust bundle (``config.ca``); its ``cert``/``key`` are
    only read once, to initialise an empty ``store``. Every connection uses ``store.active()``.
    Other messages (commands, ...) go to ``on_message``; ``subscriptions`` are re-made on every
    (re)connection. ``run()`` reconnects with backoff until cancelled.
    """

    def __init__(self, config: DeviceConfig, store: CredentialStore, *, test_endpoint: tuple[str, int],
                 clock: Clock | None = None, identity_policy: IdentityPolicy | None = None,
                 events: SecurityEvents | None = None, test_timeout: float = 10.0,
                 subscriptions: tuple[str, ...] = (), on_message: MessageCallback | None = None,
                 retry_max: float = 5.0) -> None:
        self.config = config
        self.device_id = check_identity(config.device_id)
        self.store = store
        self.events = events or SecurityEvents("device_client.rotation")
        self.handler = RotationHandler(self.device_id, store, trust=config.ca, test_endpoint=test_endpoint,
                                       clock=clock, identity_policy=identity_policy, events=self.events,
                                       test_timeout=test_timeout)
        self.subscriptions = subscriptions
        self.on_message = on_message
        self.retry_max = retry_max
        self.request_topic = REQUEST_TOPIC.format(device=self.device_id)
        self.response_topic = RESPONSE_TOPIC.format(device=self.device_id)
        self.serial_in_use: int | None = None
        self._connected = asyncio.Event()
        self._changed = asyncio.Condition()
        self._report: tuple[str, int] | None = None  # (request id, serial): a switch answer to publish
        self._first_after_switch = False  # the next connection is the first with a new credential

    def _ensure_store(self) -> None:
        if not self.store.initialized:
            chain = self.config.ca.read_bytes()
            self.store.initialize(self.config.cert.read_bytes(), self.config.key.read_bytes(), chain)

    def _client(self, credential: StoredCredential) -> DeviceClient:
        return DeviceClient(replace(self.config, cert=credential.cert_path, key=credential.key_path))

    async def wait_connected(self, serial: int | None = None) -> int:
        """Wait until a session is up (with certificate ``serial`` if given); returns the serial in use.
        Unbounded: callers wrap it in ``asyncio.timeout``."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._connected.is_set()
                                         and (serial is None or self.serial_in_use == serial))
        assert self.serial_in_use is not None
        return self.serial_in_use

    async def _set_connected(self, serial: int | None) -> None:
        async with self._changed:
            if serial is None:
                self._connected.clear()
            else:
                self.serial_in_use = serial
                self._connected.set()
            self._changed.notify_all()

    async def run(self) -> None:
        """Connect, serve, reconnect; returns only by cancellation."""
        self._ensure_store()
        failures = 0
        while True:
            credential = self.store.active()
            try:
                switched_to = await self._session(credential)
                failures = 0
            except aiomqtt.MqttError as exc:
                await self._set_connected(None)
                failures += 1
                if self._first_after_switch and self._report is not None:
                    # The first connection with the new credential failed: go back to the one that
                    # worked, and tell the agent which serial is in use once connected again.
                    self._first_after_switch = False
                    old = self.store.rollback()
                    self._report = (self._report[0], old.serial)
                    self.events.emit("rotation.rolled_back", "reconnect_failed", level="warning",
                                     device=self.device_id, serial=serial_hex(old.serial), detail=str(exc))
                    continue
                delay = min(self.retry_max, 0.1 * 2 ** min(failures, 10)) * (0.5 + secrets.randbelow(1000) / 2000)
                await asyncio.sleep(delay)
                continue
            if switched_to is not None:
                self.events.emit("rotation.switching", device=self.device_id, serial=serial_hex(switched_to.serial))

    async def _session(self, credential: StoredCredential) -> StoredCredential | None:
        """One connection. Returns the credential to switch to, or raises ``MqttError`` when it ends."""
        device = self._client(credential)
        try:
            async with device:
                client = device.mqtt
                granted = await client.subscribe(self.request_topic, qos=1)
                if any(getattr(code, "value", code) >= 0x80 for code in granted):
                    # Not fatal (the device still does its job), but it can never be renewed: say so.
                    self.events.emit("rotation.subscribe_refused", "acl", level="error", device=self.device_id,
                                     topic=self.request_topic, hint="grant the device's role 'subscribe "
                                     "devices/{device}/rotation/request' and 'publish devices/{device}/rotation/"
                                     "response' in the ACL")
                for topic in self.subscriptions:
                    await client.subscribe(topic, qos=1)
                self._first_after_switch = False
                if self._report is not None:
                    request_id, serial = self._report
                    self._report = None
                    await self._answer(client, request_id, {"type": "switched", "serial_in_use": serial_hex(serial)})
                    self.events.emit("rotation.switched", device=self.device_id, serial_in_use=serial_hex(serial))
                # Tell the agent we are here: a renewal that waited for us (offline, backoff) runs now.
                online = {"v": PROTOCOL_VERSION, "id": f"online-{secrets.token_hex(8)}", "type": "online",
                          "serial_in_use": serial_hex(credential.serial)}
                await client.publish(self.response_topic, json.dumps(online, separators=(",", ":")).encode(), qos=1)
                await self._set_connected(credential.serial)
                async for message in client.messages:
                    if str(message.topic) != self.request_topic:
                        if self.on_message is not None:
                            await self.on_message(message)
                        continue
                    payload = message.payload if isinstance(message.payload, bytes) else b""
                    result = await self.handler.handle(payload)
                    if result is None:
                        continue
                    if result.switch_to is not None:
                        self._report = (result.request_id, result.switch_to.serial)
                        self._first_after_switch = True
                        await self._set_connected(None)
                        return result.switch_to  # leaving the context closes this session cleanly
                    assert result.response is not None
                    await self._answer(client, result.request_id, result.response)
        finally:
            _release_sockets(device.mqtt)
        raise aiomqtt.MqttError("message iteration ended")  # pragma: no cover - the iterator raises first

    async def _answer(self, client: aiomqtt.Client, request_id: str, body: dict[str, Any]) -> None:
        message = {"v": PROTOCOL_VERSION, "id": request_id, **body}
        self.handler.remember(request_id, body)
        await client.publish(self.response_topic, json.dumps(message, separators=(",", ":")).encode(), qos=1)


def _release_sockets(client: aiomqtt.Client) -> None:
    """paho 2.x keeps a wake-up socket pair per client until garbage collection; close it now."""
    paho = getattr(client, "_client", None)
    reset = getattr(paho, "_reset_sockets", None)
    if callable(reset):
        with contextlib.suppress(OSError):
            reset()

