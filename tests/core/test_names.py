"""RFC 5280 7.1 name matching: one comparison wherever a CRL is looked up."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from edge_core.identity import IdentityPolicy, describe_certificate
from edge_core.names import name_key, name_key_of_text, names_match
from edge_core.revocation import InstalledCrl, RevocationIndex, accept_crl, issuer_key
from gateway_agent.pki import IssuingCA, issue_leaf, new_intermediate, new_root
from tests.core.test_revocation import NOW, build_crl


def name(*pairs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


@pytest.fixture(scope="module")
def ca() -> IssuingCA:
    return new_intermediate(new_root("Names Root", NOW), "Names Issuing CA", NOW)


def variant(ca: IssuingCA) -> x509.Name:
    """The CA's subject in other letter case and with extra white space."""
    return name((NameOID.ORGANIZATION_NAME, "  EDGE gateway   DEV pki "), (NameOID.COMMON_NAME, "names  ISSUING ca"))


def test_case_and_whitespace_do_not_make_another_name(ca: IssuingCA) -> None:
    assert names_match(ca.cert.subject, variant(ca))
    assert name_key(ca.cert.subject) == name_key(variant(ca)) == "CN=names issuing ca,O=edge gateway dev pki"


def test_order_and_values_do_make_another_name() -> None:
    a = name((NameOID.ORGANIZATION_NAME, "A"), (NameOID.COMMON_NAME, "B"))
    b = name((NameOID.COMMON_NAME, "B"), (NameOID.ORGANIZATION_NAME, "A"))
    c = name((NameOID.ORGANIZATION_NAME, "A"), (NameOID.COMMON_NAME, "B2"))
    assert not names_match(a, b)
    assert not names_match(a, c)


def test_a_key_reads_back_from_its_text_and_from_an_older_rfc4514_key(ca: IssuingCA) -> None:
    key = name_key(ca.cert.subject)
    assert name_key_of_text(key) == key
    assert name_key_of_text(ca.cert.subject.rfc4514_string()) == key
    record = InstalledCrl(ca.cert.subject.rfc4514_string(), 1, NOW, NOW.replace(day=8), "00", 0).to_json()
    assert InstalledCrl.from_json(record).issuer == key


def test_revoked_certificate_naming_its_issuer_in_other_case_is_found_revoked(ca: IssuingCA) -> None:
    """The CRL is looked up by the RFC 5280 key, not the exact text of the issuer field."""
    leaf = issue_leaf(ca, identity="valve-9", now=NOW, issuer_name=variant(ca))
    crl = accept_crl(build_crl(ca, serials=(leaf.cert.serial_number,)), issuers=[ca.cert], installed=None, now=NOW)
    index = RevocationIndex().with_update(crl)
    info = describe_certificate(leaf.cert.public_bytes(serialization.Encoding.DER), IdentityPolicy())
    assert info.issuer == issuer_key(ca.cert.subject)
    assert index.covers(info.issuer)
    assert index.is_revoked(info.issuer, info.serial)


def test_crl_naming_its_issuer_in_other_case_is_accepted(ca: IssuingCA) -> None:
    der = build_crl(ca, issuer=variant(ca))
    update = accept_crl(der, issuers=[ca.cert], installed=None, now=NOW)
    assert update.issuer == issuer_key(ca.cert.subject)
