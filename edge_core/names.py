"""Distinguished-name comparison as RFC 5280 section 7.1 requires, in one place.

Two names are the same issuer when they have the same RDNs in the same order, each RDN
the same set of attribute types, and each pair of string values equal after the string
preparation of RFC 4518: Unicode NFKC, case folded, leading and trailing spaces dropped
and inner runs of white space reduced to one space. So ``CN=Edge  Dev CA`` (UTF8String)
and ``cn=edge dev ca`` (PrintableString) name the same CA, as OpenSSL also decides when it
chains; ``O=A,CN=B`` and ``CN=B,O=A`` do not (order matters). Non-string values (bit
strings such as ``x500UniqueIdentifier``) compare byte for byte.

``name_key`` renders that comparison as a string, so a CRL index, a state file and a
presented certificate meet on one key whatever the encoding the CA used. Pure functions,
no I/O.
"""

from __future__ import annotations

import re
import unicodedata

from cryptography import x509

__all__ = ["name_key", "name_key_of_text", "names_match", "prepare_value"]

_SPACES = re.compile(r"\s+")
_SHORT = {
    "2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.10": "O", "2.5.4.11": "OU",
    "2.5.4.9": "STREET", "0.9.2342.19200300.100.1.25": "DC", "0.9.2342.19200300.100.1.1": "UID",
}
_ESCAPE = re.compile(r'([,+=\\"<>;#])')


def prepare_value(value: str | bytes) -> str:
    """RFC 4518 string preparation (the parts that matter for names CAs really issue)."""
    if isinstance(value, bytes):
        return "#" + value.hex()
    text = unicodedata.normalize("NFKC", value).casefold()
    return _SPACES.sub(" ", text).strip()


def _attribute(attr: x509.NameAttribute[str | bytes]) -> str:
    oid = attr.oid.dotted_string
    value = _ESCAPE.sub(r"\\\1", prepare_value(attr.value))
    return f"{_SHORT.get(oid, oid)}={value}"


def name_key(name: x509.Name) -> str:
    """The RFC 5280 comparison key of ``name``: equal keys iff the names match.

    Rendered as RFC 4514 text (last RDN first, ``,`` between RDNs, ``+`` inside a
    multi-valued RDN in sorted order) with prepared, lower-case values, so
    ``x509.Name.from_rfc4514_string`` reads it back and ``name_key`` of that is the same.
    """
    rdns = ["+".join(sorted(_attribute(a) for a in rdn)) for rdn in name.rdns]
    return ",".join(reversed(rdns))


def names_match(a: x509.Name, b: x509.Name) -> bool:
    """RFC 5280 7.1 name matching."""
    return a == b or name_key(a) == name_key(b)


def name_key_of_text(text: str) -> str:
    """``name_key`` of an RFC 4514 string (a key written by an older release, say); else ``text``."""
    try:
        return name_key(x509.Name.from_rfc4514_string(text))
    except ValueError:
        return text
