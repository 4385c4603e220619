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

from edge_core.admission import AdmissionRefused, admit
from edge_core.identity import IdentityPolicy, spki_pin
from edge_core.lifecycle import (
    CertRef,
    CertState,
    RenewalPolicy,
    RenewalState,
    begin_renewal,
    begin_switch,
    begin_test,
    candidate_issued,
    switched,
)
from edge_core.registry import parse_registry
from gateway_agent.cli import main
from gateway_agent.crl_issue import RevocationStore, crl_path
from gateway_agent.inventory import import_from_registry, open_inventory, write_registry
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


def _mid_renewal(config: Path, stage: str) -> tuple[x509.Certificate, x509.Certificate]:
    """device-002 renewed by the agent up to ``stage`` (its candidate pinned for the test, or the
    switch done and the old certificate still pinned in the overlap); registry written as the
    agent writes it. Returns (old, new) certificates."""
    ca = FileCA(config.parent / "pki")
    now = ca.clock.now()
    old = load_cert(ca.device_paths("device-002")[0])
    new = ca.issue_device("device-002", write=False).cert
    registry = config.parent / "pki" / "registry.yaml"
    with open_inventory(_inventory_of(config), create=False) as inventory:
        device = inventory.get("device-002")
        assert device is not None
        device = inventory.apply(begin_renewal(device, now=now, cause="scan"))
        device = inventory.apply(candidate_issued(device, CertRef.from_certificate(new), now=now))
        device = inventory.apply(begin_switch(inventory.apply(begin_test(device, now=now)), now=now))
        if stage == "overlap":
            device = inventory.apply(switched(device, new.serial_number, now=now, policy=RenewalPolicy()))
            assert device.renewal is RenewalState.OVERLAP and device.retiring is not None
        write_registry(inventory, parse_registry(registry.read_bytes(), source=str(registry)), registry)
    entry = parse_registry(registry.read_bytes()).get("device-002")
    assert entry is not None and entry.enabled and set(entry.pins) == {spki_pin(old), spki_pin(new)}
    return old, new


def _broker_refuses(config: Path, cert: x509.Certificate) -> bool:
    """What the broker reads: the registry file (admission) and the CA's published CRL."""
    registry = parse_registry((config.parent / "pki" / "registry.yaml").read_bytes())
    crl = x509.load_der_x509_crl(crl_path(FileCA(config.parent / "pki")).read_bytes())
    revoked = crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    try:
        admit(cert_der=cert.public_bytes(serialization.Encoding.DER), client_id="device-002", registry=registry,
              policy=IdentityPolicy(), now=FileCA(config.parent / "pki").clock.now())
    except AdmissionRefused:
        return revoked  # refused by the registry, and revoked for every other relying party too
    return False


@pytest.mark.parametrize("stage", ["overlap", "candidate"])
def test_revoke_a_device_mid_renewal_revokes_every_certificate_it_may_use(
        config: Path, stage: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``pki revoke <device>`` in a renewal's overlap used to put only the current serial on the CA's
    list and leave the registry alone (the agent's next scan saw nothing new): the old certificate
    stayed pinned, enabled and off the CRL, so a revoked device still connected with it."""
    old, new = _mid_renewal(config, stage)
    code, out, _ = run(capsys, "pki", "revoke", "device-002", "-c", str(config))
    assert code == 0 and f"{old.serial_number:#x}" in out and f"{new.serial_number:#x}" in out
    assert "registry" in out and "blocked at the CA" in out
    listed = {e.serial for e in RevocationStore(FileCA(config.parent / "pki")).entries()}
    assert {old.serial_number, new.serial_number} <= listed
    entry = parse_registry((config.parent / "pki" / "registry.yaml").read_bytes()).get("device-002")
    assert entry is not None and not entry.enabled and len(entry.pins) == 1
    assert "# admin: keep this comment" in (config.parent / "pki" / "registry.yaml").read_text()
    assert run(capsys, "pki", "crl", "--ca-dir", str(config.parent / "pki"))[0] == 0
    assert _broker_refuses(config, old) and _broker_refuses(config, new)
    with open_inventory(_inventory_of(config), create=False) as inventory:
        states = {r.serial: r.state for r in inventory.certificates("device-002")}
    assert states == {old.serial_number: CertState.REVOKED, new.serial_number: CertState.REVOKED}


def test_revoke_the_current_serial_in_an_overlap_ends_the_old_certificate_too(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The current serial revoked makes the device REVOKED in the inventory, the old certificate
    with it: the CA lists that one too, and the registry is rewritten; the device is not blocked."""
    old, new = _mid_renewal(config, "overlap")
    code, out, _ = run(capsys, "pki", "revoke", hex(new.serial_number), "-c", str(config))
    assert code == 0 and f"serial {new.serial_number:#x}" in out and f"device-002 serial {old.serial_number:#x}" in out
    assert "blocked" not in out
    store = RevocationStore(FileCA(config.parent / "pki"))
    assert {old.serial_number, new.serial_number} <= {e.serial for e in store.entries()}
    assert "device-002" not in store.revoked_devices()
    entry = parse_registry((config.parent / "pki" / "registry.yaml").read_bytes()).get("device-002")
    assert entry is not None and not entry.enabled
    assert run(capsys, "pki", "crl", "--ca-dir", str(config.parent / "pki"))[0] == 0
    assert _broker_refuses(config, old) and _broker_refuses(config, new)


def test_revoke_all_and_by_serial(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    serial = load_cert(config.parent / "pki" / "devices" / "device-001.crt").serial_number
    code, out, _ = run(capsys, "pki", "revoke", hex(serial), "--reason", "superseded", "-c", str(config))
    assert code == 0 and f"serial {serial:#x} (superseded)" in out and "blocked" not in out
    with open_inventory(_inventory_of(config), create=False) as inventory:
        device = inventory.get("device-001")
        assert device is not None and device.current.state is CertState.REVOKED
    ca = FileCA(config.parent / "pki")
    assert "device-001" not in RevocationStore(ca).revoked_devices()  # a serial does not block the device
    # --all: every unexpired certificate the CA issued for it, also one the inventory never heard of
    current = load_cert(config.parent / "pki" / "devices" / "device-002.crt").serial_number
    stray = ca.issue_device("device-002", write=False).cert.serial_number
    code, out, _ = run(capsys, "pki", "revoke", "device-002", "--all", "-c", str(config))
    assert code == 0 and "device device-002 is blocked at the CA" in out
    assert f"serial {current:#x} (key_compromise)" in out and f"serial {stray:#x} (key_compromise)" in out
    store = RevocationStore(ca)
    assert {e.serial for e in store.entries() if e.device == "device-002"} == {current, stray}
    assert "device-002" in store.revoked_devices()
    with open_inventory(_inventory_of(config), create=False) as inventory:
        device = inventory.get("device-002")
        assert device is not None and device.current.state is CertState.REVOKED
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
    # The CA issues nothing for a disabled device: `devices add` used to re-certify and re-enable it.
    issued = FileCA(config.parent / "pki").certificates_of("device-001")
    code, _, err = run(capsys, "devices", "add", "device-001", "-c", str(config))
    assert code == 1 and "disabled" in err
    assert FileCA(config.parent / "pki").certificates_of("device-001") == issued
    entry = parse_registry((config.parent / "pki" / "registry.yaml").read_bytes()).get("device-001")
    assert entry is not None and not entry.enabled
    code, out, _ = run(capsys, "devices", "add", "device-001", "--reinstate", "-c", str(config))
    assert code == 0 and "pin device-001" in out
    entry = parse_registry((config.parent / "pki" / "registry.yaml").read_bytes()).get("device-001")
    assert entry is not None and entry.enabled


def test_certs_renew_fails_loudly_for_unknown_device_and_stopped_agent(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "certs", "renew", "ghost", "-c", str(config))
    assert code == 1 and "not in the inventory" in err
    code, _, err = run(capsys, "certs", "renew", "device-001", "--wait", "0.3", "-c", str(config))
    assert code == 1 and "no running agent" in err
    spool = config.parent / "spool"  # lifecycle.spool_dir of the config
    assert spool.is_dir(), "the request was not queued where the agent looks"
    assert not [p.name for p in spool.iterdir()]  # not left queued behind
