"""Certification path validation with revocation for every certificate in the path.

One decision for every caller: the broker at CONNECT and the validation service that
answers for MCUs both ask ``validate_path`` whether a certificate may be trusted now.
It builds the path from the certificate up to a trust anchor and checks, for each link:

- RFC 5280 name chaining (``edge_core.names``: letter case and white space do not count);
- the signature, under the issuer's key (DSA is refused: TLS 1.3 has no DSA);
- the validity period of every certificate below the anchor;
- that each issuer is a CA (basicConstraints cA, keyUsage keyCertSign when present);
- revocation of every certificate below the anchor whose issuer is a configured CRL
  issuer, intermediates included, from the ``RevocationIndex``; the CRL must be fresh
  enough for the staleness policy, and the CRL's signer, when it is another certificate
  than the CA (a separate CRL key), must itself validate and not be revoked.

Pure: no I/O, no event loop. Stable reason codes (``PATH_REASONS``) on ``PathRefused``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from edge_core.clock import as_utc
from edge_core.errors import CredentialError
from edge_core.names import name_key, names_match
from edge_core.revocation import RevocationIndex, StalenessPolicy
from edge_core.signatures import verify_signature

__all__ = [
    "MAX_PATH",
    "PATH_REASONS",
    "PathRefused",
    "TrustStore",
    "ValidPath",
    "build_path",
    "check_revocation",
    "signed_by",
    "validate_path",
]

MAX_PATH = 8

#: Stable reason codes of ``PathRefused``, never renamed, only added to.
PATH_REASONS = (
    "path_no_issuer",            # no CA (by RFC 5280 name) signed it, up to a trust anchor
    "path_unsupported_algorithm",  # a DSA (or other unsupported) key or signature on the path
    "path_not_yet_valid",        # a certificate on the path is before its notBefore
    "path_expired",              # a certificate on the path is past its notAfter
    "path_not_ca",               # an issuer is not a CA (basicConstraints, keyUsage keyCertSign)
    "revoked",                   # a certificate on the path is on its issuer's CRL
    "path_no_crl",               # no CRL of a configured issuer is installed (and the policy says refuse)
    "crl_stale",                 # the CRL in force is stale and the policy is fail_closed
    "path_crl_signer_invalid",   # the CRL was signed by a certificate that does not validate
    "path_too_long",             # more than MAX_PATH certificates
)


class PathRefused(CredentialError):
    """The certificate does not validate; ``reason`` is one of ``PATH_REASONS``, ``depth`` where."""

    def __init__(self, reason: str, message: str, *, depth: int = 0) -> None:
        super().__init__(reason, message)
        self.depth = depth


@dataclass(frozen=True)
class TrustStore:
    """Trust anchors, the intermediates available for path building, and the CRL issuers.

    ``crl_issuers`` (name keys) are the issuers whose certificates are revocation-checked;
    empty means every issuer on the path.
    """

    anchors: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...] = ()
    crl_issuers: frozenset[str] = frozenset()
    _anchor_der: frozenset[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_anchor_der", frozenset(c.public_bytes(Encoding.DER) for c in self.anchors))

    @classmethod
    def from_bundle(cls, certificates: Iterable[x509.Certificate],
                    crl_issuers: Iterable[x509.Certificate] = ()) -> TrustStore:
        """Self-signed certificates become anchors, the others intermediates."""
        anchors: list[x509.Certificate] = []
        intermediates: list[x509.Certificate] = []
        for cert in certificates:
            self_signed = names_match(cert.subject, cert.issuer) and signed_by(cert, cert)
            (anchors if self_signed else intermediates).append(cert)
        return cls(tuple(anchors), tuple(intermediates), frozenset(name_key(c.subject) for c in crl_issuers))

    def is_anchor(self, cert: x509.Certificate) -> bool:
        return cert.public_bytes(Encoding.DER) in self._anchor_der

    def candidates(self, cert: x509.Certificate) -> list[x509.Certificate]:
        return [ca for ca in (*self.anchors, *self.intermediates) if names_match(ca.subject, cert.issuer)]


@dataclass(frozen=True)
class ValidPath:
    """A validated path, leaf first, anchor last."""

    certificates: tuple[x509.Certificate, ...]

    @property
    def anchor(self) -> x509.Certificate:
        return self.certificates[-1]


def _unsupported(key: object) -> bool:
    return isinstance(key, dsa.DSAPublicKey) or not isinstance(
        key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)


def signed_by(item: x509.Certificate | x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    """Does ``issuer``'s key verify the signature on a certificate or CRL? (No name check.)"""
    data = item.tbs_certificate_bytes if isinstance(item, x509.Certificate) else item.tbs_certlist_bytes
    try:
        hash_alg = item.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return False
    return verify_signature(issuer.public_key(), item.signature, data, hash_alg, item.signature_algorithm_parameters)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not basic.ca:
        return False
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return bool(usage.key_cert_sign)


def _check_time(cert: x509.Certificate, now: datetime, depth: int) -> None:
    if now < cert.not_valid_before_utc:
        raise PathRefused("path_not_yet_valid", f"certificate at depth {depth} ({cert.subject.rfc4514_string()}) "
                          f"is not valid before {cert.not_valid_before_utc.isoformat()}", depth=depth)
    if now > cert.not_valid_after_utc:
        raise PathRefused("path_expired", f"certificate at depth {depth} ({cert.subject.rfc4514_string()}) "
                          f"expired at {cert.not_valid_after_utc.isoformat()}", depth=depth)


def _build(cert: x509.Certificate, trust: TrustStore, now: datetime) -> list[x509.Certificate]:
    """Leaf-to-anchor path by depth-first search; the first refusal met explains a failure."""
    first_error: list[PathRefused] = []

    def walk(path: list[x509.Certificate]) -> list[x509.Certificate] | None:
        current = path[-1]
        depth = len(path) - 1
        if trust.is_anchor(current):
            return path
        if len(path) > MAX_PATH:
            first_error.append(PathRefused("path_too_long", f"path longer than {MAX_PATH}", depth=depth))
            return None
        if _unsupported(current.public_key()):
            first_error.append(PathRefused("path_unsupported_algorithm",
                                           f"certificate at depth {depth} has an unsupported (DSA?) key",
                                           depth=depth))
            return None
        try:
            _check_time(current, now, depth)
        except PathRefused as exc:
            first_error.append(exc)
            return None
        issuers = [ca for ca in trust.candidates(current) if ca not in path]
        if not issuers:
            first_error.append(PathRefused("path_no_issuer", f"no trusted CA named "
                                           f"{current.issuer.rfc4514_string()!r} issued the certificate at "
                                           f"depth {depth}", depth=depth))
        for ca in issuers:
            if _unsupported(ca.public_key()):
                first_error.append(PathRefused("path_unsupported_algorithm",
                                               f"issuer {ca.subject.rfc4514_string()!r} has an unsupported key",
                                               depth=depth + 1))
                continue
            if not signed_by(current, ca):
                first_error.append(PathRefused("path_no_issuer", f"the certificate at depth {depth} is not signed "
                                               f"by {ca.subject.rfc4514_string()!r}", depth=depth))
                continue
            if not trust.is_anchor(ca) and not _is_ca(ca):
                first_error.append(PathRefused("path_not_ca", f"{ca.subject.rfc4514_string()!r} is not a CA",
                                               depth=depth + 1))
                continue
            found = walk([*path, ca])
            if found is not None:
                return found
        return None

    found = walk([cert])
    if found is None:
        raise first_error[0] if first_error else PathRefused("path_no_issuer", "no path to a trust anchor")
    return found


def validate_path(
    cert: x509.Certificate,
    *,
    trust: TrustStore,
    index: RevocationIndex,
    now: datetime,
    staleness: StalenessPolicy | None = None,
    _signers_seen: Sequence[bytes] = (),
) -> ValidPath:
    """Validate ``cert`` up to a trust anchor, revocation included; return the path or raise ``PathRefused``."""
    now = as_utc(now)
    path = build_path(cert, trust=trust, now=now)
    check_revocation(path, trust=trust, index=index, now=now, staleness=staleness, _signers_seen=_signers_seen)
    return path


def build_path(cert: x509.Certificate, *, trust: TrustStore, now: datetime) -> ValidPath:
    """The path to a trust anchor with names, signatures, validity and CA flags checked (no revocation)."""
    return ValidPath(tuple(_build(cert, trust, as_utc(now))))


def check_revocation(
    path: ValidPath,
    *,
    trust: TrustStore,
    index: RevocationIndex,
    now: datetime,
    staleness: StalenessPolicy | None = None,
    _signers_seen: Sequence[bytes] = (),
) -> None:
    """Revocation and CRL freshness of every certificate on a built path; raises ``PathRefused``.

    Cheap (no signature checks on the path itself), so a broker can re-run it for every
    live session whenever a new CRL lands.
    """
    now = as_utc(now)
    policy = staleness or StalenessPolicy()
    for depth, (subject, issuer) in enumerate(itertools.pairwise(path.certificates)):
        key = name_key(issuer.subject)
        if trust.crl_issuers and key not in trust.crl_issuers:
            continue
        installed = index.installed.get(key)
        if index.is_revoked(key, subject.serial_number):
            raise PathRefused("revoked", f"certificate {subject.serial_number:x} at depth {depth} is revoked by "
                              f"{issuer.subject.rfc4514_string()}", depth=depth)
        fresh = policy.evaluate(installed, now)
        if installed is None and not fresh.admit:
            raise PathRefused("path_no_crl", f"no CRL of {issuer.subject.rfc4514_string()} is installed",
                              depth=depth)
        if not fresh.admit:
            raise PathRefused("crl_stale", f"depth {depth}: {fresh.message}", depth=depth)
        signer = index.signers.get(key)
        if installed is not None and signer is not None and signer.public_bytes(Encoding.DER) != \
                issuer.public_bytes(Encoding.DER):
            der = signer.public_bytes(Encoding.DER)
            if der in _signers_seen:
                raise PathRefused("path_crl_signer_invalid", "CRL signer path loops", depth=depth)
            try:
                validate_path(signer, trust=trust, index=index, now=now, staleness=policy,
                              _signers_seen=(*_signers_seen, der))
            except PathRefused as exc:
                raise PathRefused("path_crl_signer_invalid",
                                  f"the CRL of {issuer.subject.rfc4514_string()} is signed by a certificate that "
                                  f"does not validate ({exc.reason}: {exc})", depth=depth) from exc
