"""Release keys: in a secure element through PKCS#11, or (development only) in a file.

``Pkcs11Key`` signs inside the token (SoftHSM2 in tests and the demo, a real HSM or a
secure element in production). The private key is generated on the token as sensitive
and non-extractable: its value can never be read, only used. The PIN comes from the
environment, never from a file.

``UnsafeFileKey`` reads a PEM private key from disk. It exists so a developer can try the
tools without a token; it logs a loud warning each time it is loaded.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge_core.errors import ConfigError, CredentialError
from edge_core.firmware import SoftwareSigner, key_id

__all__ = ["Pkcs11Key", "Pkcs11Token", "UnsafeFileKey", "generate_unsafe_file_key"]



def _warn_unsafe(**fields: object) -> None:
    # looked up per call: a logger cached at import would outlive the CLI's logging configuration
    structlog.get_logger("gateway-agent.firmware").warning("firmware.unsafe_file_key", reason="unsafe_file_key",
                                                           **fields)


@dataclass(frozen=True)
class Pkcs11Token:
    """Where the release keys live: a PKCS#11 module, a token label and the PIN's variable."""

    module: Path
    token_label: str
    pin_env: str = "FIRMWARE_TOKEN_PIN"

    def _pin(self) -> str:
        pin = os.environ.get(self.pin_env)
        if not pin:
            raise ConfigError(f"the token PIN is not set: export {self.pin_env}",
                              hint="the PIN comes from the environment (or systemd credentials), never a file")
        return pin

    @contextmanager
    def session(self, *, rw: bool = False) -> Iterator[Any]:
        import pkcs11
        from pkcs11 import exceptions as p11err

        try:
            lib = pkcs11.lib(str(self.module))
            token = lib.get_token(token_label=self.token_label)
        except (RuntimeError, OSError, p11err.PKCS11Error) as exc:
            raise ConfigError(f"PKCS#11 token {self.token_label!r} not found via {self.module}: {exc!r}",
                              hint="check the module path, the token label and SOFTHSM2_CONF") from exc
        try:
            with token.open(user_pin=self._pin(), rw=rw) as session:
                yield session
        except p11err.PinIncorrect as exc:
            raise CredentialError("bad_pin", f"the PIN for token {self.token_label!r} is wrong") from exc

    def generate(self, label: str) -> ec.EllipticCurvePublicKey:
        """A new P-256 key pair on the token: private half sensitive, non-extractable, sign-only."""
        from pkcs11 import Attribute, KeyType, ObjectClass
        from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

        with self.session(rw=True) as session:
            if list(session.get_objects({Attribute.LABEL: label, Attribute.CLASS: ObjectClass.PRIVATE_KEY})):
                raise ConfigError(f"token {self.token_label!r} already holds a key labelled {label!r}")
            params = session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
            ident = hashlib.sha256(label.encode()).digest()[:8]
            public, _private = params.generate_keypair(
                store=True, label=label, id=ident,
                public_template={Attribute.VERIFY: True, Attribute.TOKEN: True},
                private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
                                  Attribute.TOKEN: True, Attribute.PRIVATE: True},
            )
            return _load_public(encode_ec_public_key(public))

    def key(self, label: str) -> Pkcs11Key:
        from pkcs11 import Attribute, ObjectClass
        from pkcs11.util.ec import encode_ec_public_key

        with self.session() as session:
            publics = list(session.get_objects({Attribute.LABEL: label, Attribute.CLASS: ObjectClass.PUBLIC_KEY}))
            if len(publics) != 1:
                raise ConfigError(f"token {self.token_label!r} has {len(publics)} public keys labelled {label!r}; "
                                  "expected one", hint="create it with `gateway-agent firmware keygen`")
            return Pkcs11Key(self, label, _load_public(encode_ec_public_key(publics[0])))

    def keys(self, labels: Sequence[str]) -> list[Pkcs11Key]:
        return [self.key(label) for label in labels]


def _load_public(der: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_der_public_key(der)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise CredentialError("bad_key", "the token's key is not an EC P-256 key")
    return key


class Pkcs11Key:
    """One release key on a token. ``sign`` opens a session, signs the SHA-256 digest, closes."""

    def __init__(self, token: Pkcs11Token, label: str, public: ec.EllipticCurvePublicKey) -> None:
        self.token = token
        self.label = label
        self._public = public
        self._keyid = key_id(public)

    @property
    def keyid(self) -> str:
        return self._keyid

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        from pkcs11 import Attribute, Mechanism, ObjectClass

        digest = hashlib.sha256(data).digest()
        with self.token.session() as session:
            private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=self.label)
            if private[Attribute.EXTRACTABLE] or not private[Attribute.SENSITIVE]:
                raise CredentialError("key_exportable", f"release key {self.label!r} is extractable or not "
                                      "sensitive; generate it on the token with `firmware keygen`")
            # CKM_ECDSA over our SHA-256 digest: every token has it; the result is r||s (64 bytes).
            signature = bytes(private.sign(digest, mechanism=Mechanism.ECDSA))
        return signature


class UnsafeFileKey(SoftwareSigner):
    """DEVELOPMENT ONLY: a release key read from a PEM file. Anyone who reads the file can ship firmware."""

    def __init__(self, path: Path) -> None:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load release key: {exc}", source=str(path)) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ConfigError("a release key must be an EC P-256 private key", source=str(path))
        super().__init__(key)
        _warn_unsafe(path=str(path), keyid=self.keyid[:16],
                     detail="UNSAFE: release key read from a file, not a secure element; development only")


def generate_unsafe_file_key(path: Path) -> ec.EllipticCurvePublicKey:
    """DEVELOPMENT ONLY: write a new P-256 release key to ``path`` (mode 0600)."""
    from edge_core.files import atomic_write_bytes

    key = ec.generate_private_key(ec.SECP256R1())
    atomic_write_bytes(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()), mode=0o600)
    _warn_unsafe(path=str(path), detail="UNSAFE: generated a release key in a file; use a PKCS#11 token in production")
    return key.public_key()
