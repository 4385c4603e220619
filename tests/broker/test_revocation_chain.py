"""Revocation is checked for every CA on a device's path, not only for the device.

A revoked intermediate (the issuing CA on the root's CRL) used to leave every device it
issued connected and admitted.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from edge_core.revocation import crl_pem
from gateway_agent.pki import load_cert, load_key
from tests.broker.acl_fixture import write_acl
from tests.broker.test_revocation import NOT_AUTHORIZED, connect, publish_crl, replace_file_bytes
from tests.conftest import StartBroker
from tests.support.pki import DevPki

pytestmark = pytest.mark.integration


def root_crl(pki: DevPki, number: int, serials: tuple[int, ...]) -> bytes:
    root = load_cert(pki.root / "root-ca.crt")
    key = load_key(pki.root / "root-ca.key")
    now = datetime.now(UTC) - timedelta(minutes=5)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(root.subject).last_update(now)
               .next_update(now + timedelta(days=7)).add_extension(x509.CRLNumber(number), critical=False))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    return crl_pem(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def test_devices_of_a_revoked_issuing_ca_are_cut_and_refused(start_broker: StartBroker, pki: DevPki,
                                                             tmp_path: Path) -> None:
    ca = pki.private_ca(tmp_path / "ca")
    issuing_crl, roots = tmp_path / "issuing.pem", tmp_path / "root.pem"
    publish_crl(ca, issuing_crl)
    replace_file_bytes(roots, root_crl(pki, 1, ()))
    extra = (f"revocation:\n  crl_files: [{issuing_crl}, {roots}]\n"
             f"  issuers: [{pki.root / 'issuing-ca.crt'}, {pki.root / 'root-ca.crt'}]\n"
             "  check_interval: 0.1\n  staleness:\n    mode: fail_closed\n")
    broker = start_broker(acl=write_acl(tmp_path), extra=extra)
    device = connect(broker, pki, pki.device("pump-17"), "pump-17")
    assert device.connect() == 0

    issuing_serial = load_cert(pki.root / "issuing-ca.crt").serial_number
    replace_file_bytes(roots, root_crl(pki, 2, (issuing_serial,)))
    assert device.disconnected.wait(2.0), "a device of a revoked CA is still connected"
    broker.wait_event("session.cut", "revoked")
    assert connect(broker, pki, pki.device("pump-18"), "pump-18").connect() == NOT_AUTHORIZED
    rejected = broker.wait_event("auth.rejected", "revoked")[0]
    assert rejected["device"] == "pump-18"
