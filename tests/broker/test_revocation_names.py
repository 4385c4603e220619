"""A revoked device stays out when its certificate spells the issuer name differently.

OpenSSL chains a certificate whose issuer field differs from the CA's subject only in
letter case and white space (RFC 5280 7.1), so the broker must find the CRL the same way.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from edge_core.identity import spki_pin
from edge_core.registry import DeviceEntry, Registry, dump_registry, parse_registry
from gateway_agent.crl_issue import revoke
from gateway_agent.pki import FileCA, issue_leaf
from tests.broker.acl_fixture import replace_file, write_acl
from tests.broker.test_revocation import NOT_AUTHORIZED, connect, publish_crl, revocation_settings
from tests.conftest import StartBroker
from tests.support.pki import DevPki

pytestmark = pytest.mark.integration


def test_revoked_device_with_issuer_in_other_case_is_refused(
    start_broker: StartBroker, pki: DevPki, registry_file: Path, tmp_path: Path
) -> None:
    ca = pki.private_ca(tmp_path / "ca")
    issuing = ca.issuing()
    shouted = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EDGE GATEWAY  DEV PKI"),
        x509.NameAttribute(NameOID.COMMON_NAME, "edge dev issuing ca"),
    ])
    assert shouted != issuing.cert.subject
    issued = issue_leaf(issuing, identity="valve-7", now=datetime.now(UTC), issuer_name=shouted)
    cred = pki.write(f"valve-7-{time.monotonic_ns()}", issued)
    registry = parse_registry(registry_file.read_bytes())
    devices = dict(registry.devices)
    devices["valve-7"] = DeviceEntry("valve-7", (spki_pin(issued.cert),), frozenset({"sensor"}),
                                     {"site": "plant-a", "line": "line-1"})
    replace_file(registry_file, dump_registry(Registry(devices)))

    crl = tmp_path / "crl.pem"
    publish_crl(ca, crl)
    broker = start_broker(acl=write_acl(tmp_path), extra=revocation_settings(crl, pki, mode="fail_closed"))
    device = connect(broker, pki, cred, "valve-7")
    assert device.connect() == 0, "a valid device with a case-variant issuer name is admitted (fail_closed)"

    revoke(FileCA(ca.dir), issued.cert.serial_number, "key_compromise")
    publish_crl(ca, crl)
    assert device.disconnected.wait(2.0), "revoked device still connected"
    cut = broker.wait_event("session.cut", "revoked")[0]
    assert cut["serial"] == f"{issued.cert.serial_number:x}"
    assert connect(broker, pki, cred, "valve-7").connect() == NOT_AUTHORIZED
    broker.wait_event("auth.rejected", "revoked")
