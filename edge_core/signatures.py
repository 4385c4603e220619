"""One signature check for X.509 objects (certificates, CRLs): the key type decides the scheme.

The signed bytes are hashed with ``hashlib`` (which releases the GIL on large buffers, so
a million-entry CRL does not freeze an event loop) and verified prehashed. DSA and other
key types are not supported and verify nothing. Pure: no I/O.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

__all__ = ["verify_signature"]


def verify_signature(key: CertificatePublicKeyTypes, signature: bytes, signed: bytes | memoryview,
                     hash_alg: hashes.HashAlgorithm | None, params: object) -> bool:
    """Does ``key`` verify ``signature`` over ``signed`` (with the object's hash and padding)?"""
    try:
        if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(signature, bytes(signed))
            return True
        if hash_alg is None:
            return False
        digest = hashlib.new(hash_alg.name, signed).digest()
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, digest, ec.ECDSA(Prehashed(hash_alg)))
            return True
        if isinstance(key, rsa.RSAPublicKey):
            pad = params if isinstance(params, padding.PKCS1v15 | padding.PSS) else padding.PKCS1v15()
            key.verify(signature, digest, pad, Prehashed(hash_alg))
            return True
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return False
