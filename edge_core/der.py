"""The one strict DER reader: every hand-walked ASN.1 structure in the project goes through it.

X.509 certificates and CRLs are DER (X.690 section 10): definite lengths in their shortest
form, single-byte tags for everything RFC 5280 uses. A reader that accepts a long-form
length where the short form fits, or a length with leading zero bytes, accepts an encoding
that another parser (OpenSSL, firmware) may read differently. So ``tlv`` refuses:

- indefinite lengths (``0x80``) and lengths of more than four length bytes;
- non-minimal lengths (long form below 128, or leading zero bytes);
- high tag numbers (``tag & 0x1f == 0x1f``);
- anything running past the enclosing element.

No I/O; pure functions over ``bytes``. ``DerError`` is a ``ValueError`` naming the offset.
"""

from __future__ import annotations

__all__ = ["DerError", "encode_length", "name_fields", "tlv"]


class DerError(ValueError):
    """Malformed or non-canonical DER; the message names the offset."""


def tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """One DER TLV at ``pos`` within ``buf[:end]``: (tag, content start, content end)."""
    if pos + 2 > end:
        raise DerError(f"truncated at offset {pos}")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise DerError(f"multi-byte tag at offset {pos}")
    length = buf[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if not 1 <= n <= 4 or pos + n > end:
            raise DerError(f"bad length at offset {pos}")
        length = int.from_bytes(buf[pos : pos + n], "big")
        if length < 0x80 or buf[pos] == 0:
            raise DerError(f"non-minimal length at offset {pos}")
        pos += n
    if pos + length > end:
        raise DerError(f"length past end at offset {pos}")
    return tag, pos, pos + length


def encode_length(n: int) -> bytes:
    """The minimal DER length octets of ``n``."""
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def name_fields(der: bytes) -> tuple[bytes, bytes]:
    """The raw issuer and subject Name TLVs of a DER certificate (RFC 5280 4.1), byte for byte."""
    tag, cs, ce = tlv(der, 0, len(der))  # Certificate
    if tag != 0x30 or ce != len(der):
        raise DerError("Certificate is not one SEQUENCE")
    tag, ts, te = tlv(der, cs, ce)  # tbsCertificate
    if tag != 0x30:
        raise DerError("tbsCertificate is not a SEQUENCE")
    pos = ts
    tag, _, end = tlv(der, pos, te)
    if tag == 0xA0:  # [0] version
        pos = end
        tag, _, end = tlv(der, pos, te)
    if tag != 0x02:
        raise DerError("serialNumber is not an INTEGER")
    pos = end
    _, _, pos = tlv(der, pos, te)  # signature AlgorithmIdentifier
    tag, _, issuer_end = tlv(der, pos, te)
    if tag != 0x30:
        raise DerError("issuer is not a SEQUENCE")
    issuer = der[pos:issuer_end]
    _, _, pos = tlv(der, issuer_end, te)  # validity
    tag, _, subject_end = tlv(der, pos, te)
    if tag != 0x30:
        raise DerError("subject is not a SEQUENCE")
    return issuer, der[pos:subject_end]
