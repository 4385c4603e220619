"""Certificate revocation lists: which CRL we accept, and which device serials are revoked.

This module holds the CRL acceptance rules and the revocation index. It does no I/O:
no files, no network, no event loop. Bytes, issuer CA certificates, the installed state
and the time are handed in; a verdict (``CrlUpdate``) or a ``CredentialError`` comes out.

Acceptance rules (``accept_crl``), each with a stable reason code:

==================================  ====================================================
``crl_unparseable``                 not DER/PEM, not a CRL, or malformed inside
``crl_unknown_issuer``              issuer name matches no configured CA with cRLSign
``crl_bad_signature``               signature does not verify under the matching CA key
``crl_unknown_critical_extension``  a critical extension (CRL or entry) we do not know
``crl_unsupported_scope``           delta CRL, indirect CRL, partitioned or partial CRL
``crl_no_number``                   no CRL Number extension
``crl_no_next_update``              no nextUpdate
``crl_bad_validity``                nextUpdate not after thisUpdate
``crl_from_future``                 thisUpdate later than now + allowed clock skew
``crl_rollback``                    CRL Number lower than the installed one
``crl_equivocation``                CRL Number equal to the installed one, other content
``crl_unsupported_algorithm``       signed with DSA (TLS 1.3 has none; we verify none)
==================================  ====================================================

The same CRL again is not an error: ``CrlUpdate.changed`` is False and the installed
CRL stays (``is_newer`` is the rule, for every caller). An expired CRL (nextUpdate in
the past) is still accepted if it is newer than the installed one, because it carries
strictly more information; whether devices may connect under a stale CRL is decided separately by ``StalenessPolicy``.

Large CRLs. cryptography's CRL object holds the GIL while it parses, re-encodes or
verifies (about 0.8 s for one million entries), which would freeze an event loop even
from a worker thread. ``accept_crl`` therefore splits the DER itself: a small skeleton
without the revoked list goes to cryptography for the header and extensions, the
signature is checked over the original tbsCertList bytes with ``hashlib`` (which
releases the GIL) and a prehashed verify, and the revoked entries are walked in plain
Python, which yields the GIL every switch interval. ``accept_crl`` is a pure function
with no shared mutable state: an adapter runs it via ``asyncio.to_thread`` and swaps the
resulting ``RevocationIndex`` in with one assignment.
"""

from __future__ import annotations

import binascii
import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa
from cryptography.x509.oid import ExtensionOID

from edge_core.clock import as_utc
from edge_core.der import DerError, encode_length, tlv
from edge_core.errors import ConfigError, CredentialError
from edge_core.names import name_key, name_key_of_text, names_match
from edge_core.signatures import verify_signature
from edge_core.yamlsrc import Section

__all__ = [
    "DEFAULT_MAX_SKEW",
    "REASONS",
    "CrlUpdate",
    "Freshness",
    "InstalledCrl",
    "RevocationIndex",
    "RevokedSerials",
    "StalenessPolicy",
    "accept_crl",
    "crl_pem",
    "evaluate_freshness",
    "is_newer",
    "issuer_key",
    "load_crl",
    "parse_staleness",
    "split_crl_bundle",
]

#: Stable reason codes of ``crl.rejected`` events. Never renamed, only added to.
REASONS = (
    "crl_unparseable",
    "crl_unknown_issuer",
    "crl_bad_signature",
    "crl_unknown_critical_extension",
    "crl_unsupported_scope",
    "crl_no_number",
    "crl_no_next_update",
    "crl_bad_validity",
    "crl_from_future",
    "crl_rollback",
    "crl_equivocation",
    "crl_unsupported_algorithm",
)

DEFAULT_MAX_SKEW = timedelta(minutes=5)

_PEM_BEGIN = b"-----BEGIN X509 CRL-----"
_PEM_END = b"-----END X509 CRL-----"
_PEM_CHUNK = 1 << 20  # decode PEM in 1 MiB steps so no single call holds the GIL for long

# CRL extensions whose meaning we implement; any other critical one refuses the CRL.
_KNOWN_CRL_EXTENSIONS = frozenset({
    ExtensionOID.CRL_NUMBER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ExtensionOID.ISSUER_ALTERNATIVE_NAME,
    ExtensionOID.ISSUING_DISTRIBUTION_POINT,
})
# Entry extensions (DER of the OID value): reasonCode 2.5.29.21, invalidityDate 2.5.29.24.
_KNOWN_ENTRY_EXTENSIONS = frozenset({b"\x55\x1d\x15", b"\x55\x1d\x18"})
# certificateIssuer 2.5.29.29 makes a CRL indirect: later entries belong to another CA.
_CERTIFICATE_ISSUER = b"\x55\x1d\x1d"


def _refuse(reason: str, message: str) -> CredentialError:
    hints = {
        "crl_unknown_issuer": "add the CA that signs this CRL to the configured issuers, or fix the source",
        "crl_bad_signature": "the CRL was altered or signed by another key; check the CRL source",
        "crl_rollback": "the source serves an older CRL than the one installed; the installed CRL stays",
        "crl_equivocation": "two different CRLs carry one CRL Number; investigate the CA, the installed CRL stays",
        "crl_from_future": "check the clocks of the CA and this gateway (NTP)",
    }
    return CredentialError(reason, message, hint=hints.get(reason, "the last good CRL stays in force"))


# --------------------------------------------------------------------------- encoding


def _pem_block(data: bytes, begin: int, end: int) -> bytes:
    """Decode the base64 between a BEGIN line at ``begin`` and an END line at ``end``."""
    body = memoryview(data)[begin + len(_PEM_BEGIN) : end]
    out: list[bytes] = []
    carry = b""
    try:
        for start in range(0, len(body), _PEM_CHUNK):
            piece = carry + bytes(body[start : start + _PEM_CHUNK]).translate(None, b" \t\r\n")
            usable = len(piece) - len(piece) % 4
            out.append(binascii.a2b_base64(piece[:usable], strict_mode=True))
            carry = piece[usable:]
    except binascii.Error as exc:
        raise _refuse("crl_unparseable", f"PEM CRL has invalid base64: {exc}") from exc
    if carry:
        raise _refuse("crl_unparseable", "PEM CRL has invalid base64: length is not a multiple of 4")
    return b"".join(out)


def _find(data: bytes, needle: bytes, start: int) -> int:
    """``data.find(needle, start)`` in 1 MiB windows: one find over 48 MB holds the GIL for 30 ms."""
    for window in range(start, len(data), _PEM_CHUNK):
        found = data.find(needle, window, window + _PEM_CHUNK + len(needle) - 1)
        if found >= 0:
            return found
    return -1


def split_crl_bundle(data: bytes) -> tuple[bytes, ...]:
    """The DER CRLs in ``data``: one DER CRL, or one or more concatenated PEM CRL blocks."""
    if data[:1] == b"\x30":
        return (data,)
    blocks: list[bytes] = []
    pos = 0
    while (begin := _find(data, _PEM_BEGIN, pos)) >= 0:
        end = _find(data, _PEM_END, begin)
        if end < 0:
            raise _refuse("crl_unparseable", "PEM CRL block has no END line")
        blocks.append(_pem_block(data, begin, end))
        pos = end + len(_PEM_END)
    if not blocks:
        raise _refuse("crl_unparseable", "CRL is neither DER nor PEM (no BEGIN X509 CRL block)")
    return tuple(blocks)


def crl_pem(der: bytes) -> bytes:
    """PEM text of one DER CRL (64-column base64)."""
    b64 = binascii.b2a_base64(der, newline=False)
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return _PEM_BEGIN + b"\n" + b"\n".join(lines) + b"\n" + _PEM_END + b"\n"


def _to_der(data: bytes) -> bytes:
    blocks = split_crl_bundle(data)
    if len(blocks) != 1:
        raise _refuse("crl_unparseable", f"expected one CRL, found {len(blocks)} PEM blocks")
    return blocks[0]


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    """Parse one CRL, DER or PEM, with cryptography. Raises ``CredentialError(crl_unparseable)``.

    Convenient for tools and small CRLs. For large CRLs on a server use ``accept_crl``,
    which does not hold the GIL for long.
    """
    try:
        return x509.load_der_x509_crl(_to_der(data))
    except ValueError as exc:
        raise _refuse("crl_unparseable", f"not a valid X.509 CRL: {exc}") from exc


@dataclass(frozen=True)
class _Split:
    skeleton: bytes  # the CRL without its revoked list: small, for cryptography
    tbs: tuple[int, int]  # the signed tbsCertList, as (start, end) in the original DER
    revoked: tuple[int, int]  # content range of revokedCertificates (empty if absent)


def _split(der: bytes) -> _Split:
    """Find tbsCertList and revokedCertificates without parsing the entries (RFC 5280 5.1)."""
    end = len(der)
    tag, cs, ce = tlv(der, 0, end)
    if tag != 0x30 or ce != end:
        raise DerError("CertificateList is not one SEQUENCE")
    tag, ts, te = tlv(der, cs, ce)  # tbsCertList
    if tag != 0x30:
        raise DerError("tbsCertList is not a SEQUENCE")
    tbs_start = cs
    rest = der[te:ce]  # signatureAlgorithm + signatureValue
    tag, _, outer_alg_end = tlv(der, te, ce)
    if tag != 0x30:
        raise DerError("signatureAlgorithm is not a SEQUENCE")
    # Walk the tbsCertList fields up to the optional revokedCertificates.
    pos = ts
    tag, _, fe = tlv(der, pos, te)
    if tag == 0x02:  # version
        pos = fe
        tag, _, fe = tlv(der, pos, te)
    if tag != 0x30 or der[pos:fe] != der[te:outer_alg_end]:
        # RFC 5280 5.1.1.2: the signed algorithm must equal the outer one, or the outer is unsigned.
        raise DerError("tbsCertList signature algorithm differs from signatureAlgorithm")
    pos = fe
    tag, _, fe = tlv(der, pos, te)
    if tag != 0x30:
        raise DerError("tbsCertList: issuer missing")
    pos = fe
    tag, _, fe = tlv(der, pos, te)
    if tag not in (0x17, 0x18):  # thisUpdate
        raise DerError("tbsCertList: thisUpdate missing")
    pos = fe
    rev_lo = rev_hi = rev_tlv_lo = rev_tlv_hi = 0
    if pos < te:
        tag, vs, fe = tlv(der, pos, te)
        if tag in (0x17, 0x18):  # nextUpdate
            pos = fe
            if pos < te:
                tag, vs, fe = tlv(der, pos, te)
        if pos < te and tag == 0x30:  # revokedCertificates
            rev_tlv_lo, rev_lo, rev_hi, rev_tlv_hi = pos, vs, fe, fe
    header = der[ts:rev_tlv_lo] + der[rev_tlv_hi:te] if rev_tlv_hi else der[ts:te]
    tbs = b"\x30" + encode_length(len(header)) + header
    body = tbs + rest
    return _Split(b"\x30" + encode_length(len(body)) + body, (tbs_start, te), (rev_lo, rev_hi))


_SHARDS = 64


class RevokedSerials(AbstractSet[int]):
    """An immutable set of serial numbers, built so that building and holding it never stalls.

    Serials live in 64 dicts (``serial -> None``) chosen by the low bits. Why not one
    frozenset: a million-entry set resizes in one C call (~40-90 ms with the GIL held),
    and sets are tracked by the garbage collector, so every full collection walks all
    entries (100+ ms) - in whatever thread it happens. Dicts holding only ints are
    untracked by the collector, and 64 shards keep each resize small. Lookup is one
    tuple index and one dict lookup.
    """

    __slots__ = ("_count", "_shards")

    def __init__(self, serials: Iterable[int] = ()) -> None:
        shards: tuple[dict[int, None], ...] = tuple({} for _ in range(_SHARDS))
        for serial in serials:
            shards[serial & (_SHARDS - 1)][serial] = None
        self._shards = shards
        self._count = sum(len(shard) for shard in shards)

    @classmethod
    def _from_shards(cls, shards: tuple[dict[int, None], ...]) -> RevokedSerials:
        self = cls.__new__(cls)
        self._shards = shards
        self._count = sum(len(shard) for shard in shards)
        return self

    def __contains__(self, serial: object) -> bool:
        return isinstance(serial, int) and serial in self._shards[serial & (_SHARDS - 1)]

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        for shard in self._shards:
            yield from shard

    def __repr__(self) -> str:
        return f"<RevokedSerials {self._count} serials>"


def _walk_entries(der: bytes, lo: int, hi: int) -> tuple[RevokedSerials, int]:
    """Serials of the revoked entries and the entry count; refuses unknown critical entry extensions.

    Plain Python on purpose: the interpreter hands the GIL to other threads every
    switch interval, so an event loop keeps running while a million entries are walked.
    """
    shards: tuple[dict[int, None], ...] = tuple({} for _ in range(_SHARDS))
    mask = _SHARDS - 1
    count = 0
    serial = 0
    from_bytes = int.from_bytes
    known = _KNOWN_ENTRY_EXTENSIONS
    pos = lo
    while pos < hi:
        tag, es, ee = tlv(der, pos, hi)
        if tag != 0x30:
            raise DerError(f"revoked entry at offset {pos} is not a SEQUENCE")
        tag, vs, ve = tlv(der, es, ee)
        if tag != 0x02 or vs == ve:
            raise DerError(f"revoked entry at offset {pos} has no serial")
        serial = from_bytes(der[vs:ve], "big", signed=True)
        shards[serial & mask][serial] = None
        count += 1
        tag, _, te = tlv(der, ve, ee)
        if tag not in (0x17, 0x18):
            raise DerError(f"revoked entry at offset {pos} has no revocationDate")
        if te < ee:
            tag, xs, xe = tlv(der, te, ee)
            if tag != 0x30 or xe != ee:
                raise DerError(f"revoked entry at offset {pos} has trailing data")
            while xs < xe:
                tag, ys, ye = tlv(der, xs, xe)
                tag, os_, oe = tlv(der, ys, ye)
                if tag != 0x06:
                    raise DerError(f"entry extension at offset {xs} has no OID")
                oid = der[os_:oe]
                tag, bs, be = tlv(der, oe, ye)
                critical = tag == 0x01 and be - bs == 1 and der[bs] != 0
                if oid == _CERTIFICATE_ISSUER:
                    raise _refuse(
                        "crl_unsupported_scope",
                        f"entry for serial {serial:#x} names another issuer (indirect CRL); not supported",
                    )
                if critical and oid not in known:
                    raise _refuse(
                        "crl_unknown_critical_extension",
                        f"entry for serial {serial:#x} has unknown critical extension "
                        f"{_oid_text(oid)}",
                    )
                xs = ye
        pos = ee
    return RevokedSerials._from_shards(shards), count


def _oid_text(raw: bytes) -> str:
    """Dotted form of an OID's DER content, for messages."""
    arcs: list[int] = []
    value = 0
    for byte in raw:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    if not arcs:
        return raw.hex()
    top = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [top, arcs[0] - 40 * top, *arcs[1:]])


# --------------------------------------------------------------------------- state records


def issuer_key(name: x509.Name) -> str:
    """How the index names an issuer: the RFC 5280 comparison key (``edge_core.names.name_key``).

    A certificate whose issuer field differs from its CA's subject only in letter case,
    white space or string type finds that CA's CRL; ``CertInfo.issuer`` is the same key,
    so the broker looks a presented certificate up without parsing it again. The
    signature check against the configured CA is what binds the CRL to the CA.
    """
    return name_key(name)


def _iso(value: datetime) -> str:
    return as_utc(value).isoformat()


@dataclass(frozen=True)
class InstalledCrl:
    """What we know about the CRL in force for one issuer. Serialisable to JSON."""

    issuer: str
    crl_number: int
    this_update: datetime
    next_update: datetime
    sha256: str
    count: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "this_update", as_utc(self.this_update))
        object.__setattr__(self, "next_update", as_utc(self.next_update))
        if self.crl_number < 0 or self.count < 0:
            raise ValueError("crl_number and count must not be negative")

    def to_json(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "crl_number": self.crl_number,
            "this_update": _iso(self.this_update),
            "next_update": _iso(self.next_update),
            "sha256": self.sha256,
            "count": self.count,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InstalledCrl:
        """Inverse of ``to_json``; raises ``ValueError`` on a malformed record."""
        number, count = data.get("crl_number"), data.get("count")
        if not isinstance(number, int) or not isinstance(count, int) or isinstance(number, bool):
            raise ValueError("installed CRL record: crl_number and count must be integers")  # noqa: TRY004
        try:
            return cls(
                issuer=name_key_of_text(str(data["issuer"])),
                crl_number=number,
                this_update=datetime.fromisoformat(str(data["this_update"])),
                next_update=datetime.fromisoformat(str(data["next_update"])),
                sha256=str(data["sha256"]),
                count=count,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"installed CRL record is malformed: {exc!r}") from exc


@dataclass(frozen=True)
class CrlUpdate:
    """The verdict of ``accept_crl`` for an acceptable CRL.

    ``changed`` is False when the CRL has the installed CRL Number: nothing to install,
    and ``revoked`` is None because the entries were not walked.
    """

    changed: bool
    installed: InstalledCrl
    der: bytes = field(repr=False)
    revoked: RevokedSerials | None = field(default=None, repr=False)
    previous_number: int | None = None
    #: the certificate whose key verified the CRL (a separate CRL key, or the CA itself)
    signer: x509.Certificate | None = field(default=None, repr=False, compare=False)

    @property
    def issuer(self) -> str:
        return self.installed.issuer


# --------------------------------------------------------------------------- acceptance


def is_newer(current: InstalledCrl | None, number: int, sha256: str) -> bool:
    """The one rollback rule: may a verified CRL (``number``, DER digest ``sha256``) replace ``current``?

    True for a higher CRL Number (or nothing installed), False for the very CRL in force.
    Raises ``crl_rollback`` for a lower number and ``crl_equivocation`` for an equal number
    with other content: two different CRLs under one number means the CA (or whoever holds
    its key) tells different parties different things, and swapping one in could un-revoke
    serials. The CRL in force stays in both cases.
    """
    if current is None or number > current.crl_number:
        return True
    if number < current.crl_number:
        raise _refuse("crl_rollback", f"new CRL number {number} must be >= installed {current.crl_number}")
    if sha256 != current.sha256:
        raise _refuse("crl_equivocation",
                      f"CRL number {number} of {current.issuer} is already installed with other content "
                      f"(sha256 {current.sha256[:16]}, offered {sha256[:16]})")
    return False



def _verify_signature(der: bytes, split: _Split, crl: x509.CertificateRevocationList,
                      ca: x509.Certificate) -> bool:
    start, end = split.tbs
    try:
        hash_alg = crl.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return False
    # Over the original tbsCertList bytes (the skeleton was re-encoded without the entries).
    return verify_signature(ca.public_key(), crl.signature, memoryview(der)[start:end], hash_alg,
                            crl.signature_algorithm_parameters)


def _may_sign_crls(ca: x509.Certificate) -> bool:
    try:
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return bool(usage.crl_sign)


def _check_extensions(crl: x509.CertificateRevocationList) -> int:
    """Refuse unknown critical and unsupported-scope extensions; return the CRL Number."""
    number: int | None = None
    for ext in crl.extensions:
        value = ext.value
        if isinstance(value, x509.DeltaCRLIndicator):
            raise _refuse("crl_unsupported_scope",
                          f"delta CRL (base CRL number {value.crl_number}); only complete CRLs are supported")
        if isinstance(value, x509.IssuingDistributionPoint):
            unsupported = [name for name, flag in (
                ("indirect CRL", value.indirect_crl),
                ("only CA certificates", value.only_contains_ca_certs),
                ("only attribute certificates", value.only_contains_attribute_certs),
                ("only some reasons", value.only_some_reasons is not None),
                ("partitioned (distribution point name)",
                 value.full_name is not None or value.relative_name is not None),
            ) if flag]
            if unsupported:
                raise _refuse("crl_unsupported_scope",
                              f"issuing distribution point limits the CRL to: {', '.join(unsupported)}; "
                              "only complete CRLs are supported")
            continue
        if isinstance(value, x509.CRLNumber):
            number = value.crl_number
        if ext.critical and ext.oid not in _KNOWN_CRL_EXTENSIONS:
            raise _refuse("crl_unknown_critical_extension",
                          f"CRL has unknown critical extension {ext.oid.dotted_string}")
    if number is None:
        raise _refuse("crl_no_number", "CRL has no CRL Number extension; rollback could not be detected")
    return number


def accept_crl(
    crl_bytes: bytes,
    *,
    issuers: Sequence[x509.Certificate],
    installed: InstalledCrl | Mapping[str, InstalledCrl] | None,
    now: datetime,
    max_skew: timedelta = DEFAULT_MAX_SKEW,
) -> CrlUpdate:
    """Apply every acceptance rule to one CRL (DER or PEM); raise ``CredentialError`` or return.

    ``installed`` is the CRL in force for this CRL's issuer, or the installed CRLs by
    ``issuer_key`` (the caller need not know the issuer before parsing). An
    ``InstalledCrl`` of a different issuer is a caller bug and raises ``ValueError``.
    """
    now = as_utc(now)
    der = _to_der(crl_bytes)
    try:
        split = _split(der)
        crl = x509.load_der_x509_crl(split.skeleton)
        crl_issuer = crl.issuer
        this_update = crl.last_update_utc
        next_update = crl.next_update_utc
        _ = crl.extensions  # parsed now so a malformed one is "unparseable"
    except DerError as exc:
        raise _refuse("crl_unparseable", f"CRL DER is malformed: {exc}") from exc
    except ValueError as exc:
        raise _refuse("crl_unparseable", f"not a valid X.509 CRL: {exc}") from exc
    issuer = issuer_key(crl_issuer)
    shown = crl_issuer.rfc4514_string()

    candidates = [ca for ca in issuers if names_match(ca.subject, crl_issuer)]
    if not candidates:
        raise _refuse("crl_unknown_issuer", f"CRL issuer {shown!r} is not a configured CA")
    signers = [ca for ca in candidates if _may_sign_crls(ca)]
    if not signers:
        raise _refuse("crl_unknown_issuer", f"configured CA {shown!r} has no cRLSign key usage")
    signer = next((ca for ca in signers if _verify_signature(der, split, crl, ca)), None)
    if signer is None:
        if all(isinstance(ca.public_key(), dsa.DSAPublicKey) for ca in signers):
            raise _refuse("crl_unsupported_algorithm",
                          f"CRL of {shown!r} is signed with DSA, which this gateway does not support")
        raise _refuse("crl_bad_signature", f"CRL signature does not verify under the key of CA {shown!r}")

    try:
        number = _check_extensions(crl)
    except ValueError as exc:
        raise _refuse("crl_unparseable", f"CRL extension is malformed: {exc}") from exc
    if next_update is None:
        raise _refuse("crl_no_next_update", "CRL has no nextUpdate; its freshness could not be judged")
    if next_update <= this_update:
        raise _refuse("crl_bad_validity",
                      f"CRL nextUpdate {next_update.isoformat()} is not after "
                      f"thisUpdate {this_update.isoformat()}")
    if this_update > now + max_skew:
        raise _refuse("crl_from_future",
                      f"CRL thisUpdate {this_update.isoformat()} is later than now {now.isoformat()} "
                      f"+ skew {max_skew}")

    current = installed.get(issuer) if isinstance(installed, Mapping) else installed
    if current is not None and current.issuer != issuer:
        raise ValueError(f"installed CRL is for {current.issuer!r}, not {issuer!r}")
    digest = hashlib.sha256(der).hexdigest()
    if not is_newer(current, number, digest):
        assert current is not None
        return CrlUpdate(changed=False, installed=current, der=der, previous_number=current.crl_number)

    try:
        serials, count = _walk_entries(der, *split.revoked)
    except DerError as exc:
        raise _refuse("crl_unparseable", f"CRL revoked list is malformed: {exc}") from exc
    record = InstalledCrl(issuer=issuer, crl_number=number, this_update=this_update,
                          next_update=next_update, sha256=digest, count=count)
    return CrlUpdate(changed=True, installed=record, der=der, revoked=serials,
                     previous_number=current.crl_number if current is not None else None, signer=signer)


# --------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class RevocationIndex:
    """Revoked serials per issuer (``issuer_key``). Immutable: updates build a new index.

    ``is_revoked`` is one dict lookup and one set lookup (well under a microsecond), so
    the broker can call it on every CONNECT. An issuer without a CRL is not covered:
    ``is_revoked`` answers False and ``covers`` tells the caller to apply its staleness
    policy instead.
    """

    by_issuer: Mapping[str, RevokedSerials] = field(default_factory=lambda: MappingProxyType({}))
    installed: Mapping[str, InstalledCrl] = field(default_factory=lambda: MappingProxyType({}))
    #: who signed the CRL in force, per issuer (path validation checks a separate CRL signer)
    signers: Mapping[str, x509.Certificate] = field(default_factory=lambda: MappingProxyType({}),
                                                    compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_issuer", MappingProxyType(dict(self.by_issuer)))
        object.__setattr__(self, "installed", MappingProxyType(dict(self.installed)))
        object.__setattr__(self, "signers", MappingProxyType(dict(self.signers)))

    def is_revoked(self, issuer: str, serial: int) -> bool:
        serials = self.by_issuer.get(issuer)
        return serials is not None and serial in serials

    def covers(self, issuer: str) -> bool:
        return issuer in self.by_issuer

    def with_update(self, update: CrlUpdate) -> RevocationIndex:
        """A new index with ``update`` in force for its issuer (unchanged updates keep the old set)."""
        if update.revoked is None:
            if not self.covers(update.issuer):
                raise ValueError(f"no serials for {update.issuer!r}: accept with installed=None first")
            return self
        by_issuer = dict(self.by_issuer)
        by_issuer[update.issuer] = update.revoked
        installed = dict(self.installed)
        installed[update.issuer] = update.installed
        signers = dict(self.signers)
        if update.signer is not None:
            signers[update.issuer] = update.signer
        else:
            signers.pop(update.issuer, None)
        return RevocationIndex(by_issuer, installed, signers)

    @classmethod
    def from_updates(cls, updates: Iterable[CrlUpdate]) -> RevocationIndex:
        index = cls()
        for update in updates:
            index = index.with_update(update)
        return index


# --------------------------------------------------------------------------- staleness

FreshnessState = Literal["fresh", "expiring", "stale_too_old", "stale_past_next_update", "missing"]


@dataclass(frozen=True)
class Freshness:
    """How current the installed CRL of one issuer is, and what the policy makes of it.

    ``admit``: may devices of this issuer connect. ``alarm``: raise an operator alarm
    (``expiring`` alarms long before anything is refused).
    """

    state: FreshnessState
    admit: bool
    alarm: bool
    message: str
    age: timedelta | None = None
    expires_in: timedelta | None = None


@dataclass(frozen=True)
class StalenessPolicy:
    """What to do when the CRL of an issuer is stale.

    ``fail_open_alarm`` (the default) keeps devices connected and raises an alarm;
    ``fail_closed`` refuses every device of that issuer until a fresh CRL is installed.

    Why fail-open is the default: a stale CRL is a failure of the publishing path, not
    evidence of an attack, and it hits every device of a CA at the same moment -
    Mosquitto and EMQX users report whole fleets rejected at once when a CRL expired.
    In a plant that stops production and safety telemetry. The exposure is bounded:
    the last good CRL stays enforced, so every certificate revoked before it is still
    refused; only revocations published after the last successful fetch are missed,
    which is the same window as any network outage. And it never surprises the
    operator: ``expiring`` alarms once ``warn_fraction`` (75 %) of the CRL's validity
    window has passed, days before nextUpdate with a 7-day CRL. Sites whose threat model
    puts a stolen certificate above availability choose ``fail_closed`` explicitly;
    they must then publish CRLs more often than ``max_age``.

    ``max_age`` bounds the age of a CRL (now - thisUpdate) even when the CA gives it a
    long validity, so a CRL source that silently stopped updating is noticed.
    """

    mode: Literal["fail_closed", "fail_open_alarm"] = "fail_open_alarm"
    max_age: timedelta = timedelta(hours=24)
    warn_fraction: float = 0.75

    def __post_init__(self) -> None:
        if self.mode not in ("fail_closed", "fail_open_alarm"):
            raise ConfigError(f"CRL staleness mode must be 'fail_closed' or 'fail_open_alarm', "
                              f"not {self.mode!r}")
        if self.max_age <= timedelta(0):
            raise ConfigError("CRL max_age must be positive")
        if not 0.0 < self.warn_fraction < 1.0:
            raise ConfigError("CRL warn_fraction must be between 0 and 1")

    def evaluate(self, installed: InstalledCrl | None, now: datetime) -> Freshness:
        now = as_utc(now)
        closed = self.mode == "fail_closed"
        if installed is None:
            return Freshness("missing", admit=not closed, alarm=True,
                             message="no CRL installed for this issuer")
        age = now - installed.this_update
        expires_in = installed.next_update - now
        if expires_in <= timedelta(0):
            return Freshness("stale_past_next_update", admit=not closed, alarm=True, age=age,
                             expires_in=expires_in,
                             message=f"CRL {installed.crl_number} of {installed.issuer} expired at "
                                     f"{installed.next_update.isoformat()}")
        if age > self.max_age:
            return Freshness("stale_too_old", admit=not closed, alarm=True, age=age, expires_in=expires_in,
                             message=f"CRL {installed.crl_number} of {installed.issuer} is {age} old "
                                     f"(max {self.max_age})")
        window = installed.next_update - installed.this_update
        if age >= window * self.warn_fraction:
            return Freshness("expiring", admit=True, alarm=True, age=age, expires_in=expires_in,
                             message=f"CRL {installed.crl_number} of {installed.issuer} "
                                     f"expires in {expires_in}")
        return Freshness("fresh", admit=True, alarm=False, age=age, expires_in=expires_in,
                         message=f"CRL {installed.crl_number} of {installed.issuer} is fresh")


def evaluate_freshness(installed: InstalledCrl | None, now: datetime,
                       policy: StalenessPolicy | None = None) -> Freshness:
    """``policy.evaluate`` with the default policy when none is given."""
    return (policy or StalenessPolicy()).evaluate(installed, now)


def parse_staleness(section: Section) -> StalenessPolicy:
    """The ``staleness`` section (mode, max_age seconds, warn_fraction); errors name file and line."""
    defaults = StalenessPolicy()
    mode = section.take("mode", str, defaults.mode)
    if mode not in ("fail_closed", "fail_open_alarm"):
        raise section.error("mode", f"{section.what}: 'mode' must be fail_closed or fail_open_alarm, not {mode!r}")
    max_age = section.take("max_age", float, defaults.max_age.total_seconds())
    if max_age <= 0:
        raise section.error("max_age", f"{section.what}: 'max_age' must be positive")
    warn = section.take("warn_fraction", float, defaults.warn_fraction)
    section.done()
    try:
        return StalenessPolicy(mode=mode, max_age=timedelta(seconds=max_age), warn_fraction=warn)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise section.error(None, f"{section.what}: {exc.reason}") from exc
