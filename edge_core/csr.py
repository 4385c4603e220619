"""A device's certificate signing request, checked before the CA sees it (enrolment and renewal).

No I/O: the PEM, the identity it must name and the policy are handed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AttributeOID

from edge_core.errors import CredentialError
from edge_core.identity import IdentityPolicy, spki_pin_of_key

__all__ = ["MAX_CSR_BYTES", "CheckedCsr", "check_csr"]

MAX_CSR_BYTES = 8 * 1024


@dataclass(frozen=True)
class CheckedCsr:
    """A CSR that passed ``check_csr``: the identity it names and the key to certify."""

    identity: str
    public_key: ec.EllipticCurvePublicKey
    pin: str


_CSR_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


def check_csr(
    csr_pem: bytes,
    expected_identity: str,
    policy: IdentityPolicy,
    *,
    nonce: str | None = None,
    forbidden_pins: Sequence[str] = (),
) -> CheckedCsr:
    """Check a device's CSR before the CA sees it; raises ``CredentialError`` with a reason code.

    - ``csr_too_large`` / ``csr_unparseable``: not a PEM CSR of sane size;
    - ``csr_signature_invalid``: no proof of possession of the private key;
    - ``csr_key_type``: not an EC P-256 key; ``csr_hash``: signed with a weak hash;
    - ``identity_missing`` / ``identity_ambiguous`` / ``identity_invalid`` / ``csr_identity_mismatch``:
      the CSR does not name exactly ``expected_identity`` under ``policy``;
    - ``csr_nonce_mismatch``: the challengePassword attribute is not the nonce we asked with (replay);
    - ``csr_key_reused``: the key is one the device already has (renewal requires a fresh key).
    """
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CredentialError("csr_too_large", f"CSR from {expected_identity} is {len(csr_pem)} bytes; "
                              f"at most {MAX_CSR_BYTES} allowed")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise CredentialError("csr_unparseable",
                              f"CSR from {expected_identity} is not a PEM CSR: {exc}") from exc
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CredentialError("csr_key_type", f"CSR from {expected_identity} must carry an EC P-256 key",
                              hint="generate the key with SECP256R1 (prime256v1)")
    algorithm = csr.signature_hash_algorithm
    if not isinstance(algorithm, _CSR_HASHES):
        raise CredentialError("csr_hash",
                              f"CSR from {expected_identity} is not signed with SHA-256 or stronger")
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, ValueError) as exc:  # defensive: some backends raise
        raise CredentialError("csr_signature_invalid", f"CSR from {expected_identity}: {exc}") from exc
    if not valid:
        raise CredentialError("csr_signature_invalid",
                              f"CSR from {expected_identity} is not signed by its own key "
                              "(no proof of possession)")
    identity = policy.extract(csr)
    if identity != expected_identity:
        raise CredentialError("csr_identity_mismatch",
                              f"CSR names {identity!r} but was requested from {expected_identity!r}")
    if nonce is not None:
        try:
            raw = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD).value
        except x509.AttributeNotFound:
            raw = b""
        if raw != nonce.encode("utf-8"):
            raise CredentialError("csr_nonce_mismatch",
                                  f"CSR from {expected_identity} does not carry the nonce it was asked with")
    pin = spki_pin_of_key(key)
    if pin in forbidden_pins:
        raise CredentialError("csr_key_reused", f"CSR from {expected_identity} reuses a key it already holds",
                              hint="the device must generate a fresh key for every renewal")
    return CheckedCsr(identity=identity, public_key=key, pin=pin)
