"""The operator's sequences from the command line: devices, pki revoke, certs (all reading -c),
with the agent's inventory on each backend (``lifecycle.inventory``: a SQLite file, PostgreSQL)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from edge_core.lifecycle import CertState
from edge_core.registry import parse_registry
from gateway_agent.cli import main
from gateway_agent.crl_issue import RevocationStore
from gateway_agent.inventory import import_from_registry, open_inventory
from gateway_agent.pki import FileCA, init_dev, load_cert, new_key


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.fixture
def config(tmp_path: Path, inv_url: str) -> Path:
    ca = init_dev(tmp_path / "pki", device_ids=["device-001", "device-002", "device-003"])
    text = ca.registry_path.read_text().replace("version: 1", "# admin: keep this comment\nversion: 1", 1)
    ca.registry_path.write_text(text)
    path = tmp_path / "agent.yaml"
    path.write_text(f"lifecycle:\n  inventory: '{inv_url}'\n  spool_dir: {tmp_path / 'spool'}\n"
                    f"  ca_dir: {ca.dir}\n  registry: {ca.registry_path}\n")
    with open_inventory(inv_url) as inventory:
        import_from_registry(inventory, ca.registry_path, ca.issued_dir, now=ca.clock.now())
    return path


def _inventory_of(config: Path) -> str:
    from gateway_agent.settings import load_agent_settings

    lifecycle = load_agent_settings(config).lifecycle
    assert lifecycle is not None
    return lifecycle.inventory


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_devices_add_enrols_everywhere_and_prints_the_pin(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "devices", "add", "pump-42", "--role", "pump", "--attr", "site=plant-a",
                       "-c", str(config))
    assert code == 0 and "pin pump-42: sha256:" in out
    pin = out.split("pin pump-42: ")[1].split()[0]
    registry_path = config.parent / "pki" / "registry.yaml"
    entry = parse_registry(registry_path.read_bytes()).get("pump-42")
    assert entry is not None and entry.pins == (pin,) and entry.roles == frozenset({"pump"})
    assert "# admin: keep this comment" in registry_path.read_text()
    code, out, _ = run(capsys, "certs", "expiring", "--within", "31d", "--json", "-c", str(config))
    assert code == 0 and "pump-42" in {json.loads(line)["device_id"] for line in out.splitlines()}
    code, out, _ = run(capsys, "devices", "list", "--json", "-c", str(config))
    rows = {json.loads(line)["device_id"]: json.loads(line) for line in out.splitlines()}
    assert rows["pump-42"]["cert_state"] == "active"


def test_revoke_then_renew_is_refused_and_the_device_leaves_the_report(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``pki revoke device-003`` then ``certs renew device-003`` used to re-certify it."""
    code, out, _ = run(capsys, "pki", "revoke", "device-003", "--reason", "key_compromise", "-c", str(config))
    assert code == 0 and "blocked at the CA" in out
    code, _, err = run(capsys, "certs", "renew", "device-003", "-c", str(config))
    assert code == 1 and "revoked" in err
    code, out, _ = run(capsys, "certs", "expiring", "--within", "400d", "--json", "-c", str(config))
    assert "device-003" not in {json.loads(line)["device_id"] for line in out.splitlines()}
    code, _, err = run(capsys, "devices", "add", "device-003", "-c", str(config))
    assert code == 1 and "--reinstate" in err


def test_revoke_a_device_after_renewal_revokes_the_certificate_in_use(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = load_cert(config.parent / "pki" / "devices" / "device-002.crt").serial_number
    code, out, _ = run(capsys, "devices", "add", "device-002", "--out", str(config.parent / "new"),
                       "-c", str(config))
    assert code == 0
    current = load_cert(config.parent / "new" / "device-002.crt").serial_number
    code, out, _ = run(capsys, "pki", "revoke", "device-002", "-c", str(config))
    assert code == 0 and f"{current:#x}" in out and f"{first:#x}" not in out
    revoked = {e.serial for e in RevocationStore(FileCA(config.parent / "pki")).entries()}
    assert revoked == {current}


def test_revoke_all_and_by_serial(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    serial = load_cert(config.parent / "pki" / "devices" / "device-001.crt").serial_number
    code, out, _ = run(capsys, "pki", "revoke", hex(serial), "--reason", "superseded", "-c", str(config))
    assert code == 0 and f"serial {serial:#x} (superseded)" in out and "blocked" not in out
    with open_inventory(_inventory_of(config), create=False) as inventory:
        device = inventory.get("device-001")
        assert device is not None and device.current.state is CertState.REVOKED
    code, out, _ = run(capsys, "pki", "revoke", "device-002", "--all", "-c", str(config))
    assert code == 0
    code, _, err = run(capsys, "pki", "revoke", "no-such-device", "-c", str(config))
    assert code == 4 and "neither a device" in err  # a bad argument naming no device: exit 4


def test_enroll_from_a_csr_and_import_several_certificates(config: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    key = new_key()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mcu-7")]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("urn:device:mcu-7")]),
                          critical=False).sign(key, hashes.SHA256()))
    (tmp_path / "mcu-7.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    code, out, _ = run(capsys, "devices", "enroll", "mcu-7", "--csr", str(tmp_path / "mcu-7.csr"), "--role",
                       "sensor", "-c", str(config))
    assert code == 0 and "pin mcu-7" in out
    code, _, err = run(capsys, "devices", "enroll", "mcu-8", "--csr", str(tmp_path / "mcu-7.csr"), "-c", str(config))
    assert code == 1 and "'mcu-7'" in err  # the CSR names another device

    # A fleet mid-rotation: one device with two certificates imports in one go, both pins kept.
    other = init_dev(tmp_path / "other", device_ids=["legacy-1"])
    second = other.issue_device("legacy-1", write=False)
    (tmp_path / "legacy-new.crt").write_bytes(second.cert.public_bytes(serialization.Encoding.PEM))
    code, out, _ = run(capsys, "devices", "import", str(other.dir / "devices" / "legacy-1.crt"),
                       str(tmp_path / "legacy-new.crt"), "--role", "sensor", "-c", str(config))
    assert code == 0 and "2 certificate(s), enrolled" in out
    entry = parse_registry((config.parent / "pki" / "registry.yaml").read_bytes()).get("legacy-1")
    assert entry is not None and len(entry.pins) == 2


def test_disable_and_show(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "devices", "disable", "device-001", "-c", str(config))[0] == 0
    entry = parse_registry((config.parent / "pki" / "registry.yaml").read_bytes()).get("device-001")
    assert entry is not None and not entry.enabled
    code, out, _ = run(capsys, "devices", "show", "device-001", "-c", str(config))
    assert code == 0 and "enabled=False" in out and "inventory: current" in out


def test_certs_renew_fails_loudly_for_unknown_device_and_stopped_agent(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "certs", "renew", "ghost", "-c", str(config))
    assert code == 1 and "not in the inventory" in err
    code, _, err = run(capsys, "certs", "renew", "device-001", "--wait", "0.3", "-c", str(config))
    assert code == 1 and "no running agent" in err
    assert not list((config.parent / "renew-requests").glob("device-001"))  # not left queued behind
