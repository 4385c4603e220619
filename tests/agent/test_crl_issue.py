"""Dev CA revocation verbs: the store, CRL issuing, monotonic CRL numbers, the CLI verbs."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from edge_core.clock import ManualClock
from edge_core.crl_trust import accept_crl
from edge_core.errors import ConfigError, CredentialError
from edge_core.registry import Registry, dump_registry, parse_registry
from edge_core.registry_edit import apply_entries
from gateway_agent import cli_pki
from gateway_agent.crl_issue import RevocationStore, crl_path, issue_crl, revoke, revoke_device
from gateway_agent.pki import FileCA, init_dev, load_cert

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def ca(tmp_path: Path) -> FileCA:
    return init_dev(tmp_path / "certs-dev", device_ids=["pump-17", "pump-18"], clock=ManualClock(NOW))


def _accept(ca: FileCA, der: bytes, installed=None, now=None):  # type: ignore[no-untyped-def]
    return accept_crl(der, issuers=[ca.issuing().cert], installed=installed, now=now or ca.clock.now())


def test_revoke_device_by_id_uses_its_certificate_serial(ca: FileCA) -> None:
    entry = revoke(ca, "pump-17", "key_compromise")
    serial = load_cert(ca.device_paths("pump-17")[0]).serial_number
    assert entry.serial == serial and entry.device == "pump-17" and entry.revoked_at == NOW
    doc = json.loads((ca.dir / "revoked.json").read_text())
    record = {"serial": f"{serial:x}", "device": "pump-17", "reason": "key_compromise",
              "revoked_at": NOW.isoformat()}
    assert doc == {"version": 1, "last_crl_number": 0, "revoked": [record], "revoked_devices": [record]}
    assert (ca.dir / "revoked.json").stat().st_mode & 0o777 == 0o600


def test_revoke_device_without_an_inventory_revokes_every_unexpired_certificate(ca: FileCA) -> None:
    """The CA alone cannot tell which certificate is in use: after a rolled-back renewal its
    newest is the revoked candidate, and the device still uses the one before (it used to stay valid)."""
    ca.clock.advance(timedelta(days=31))  # type: ignore[attr-defined]
    expired = load_cert(ca.device_paths("pump-17")[0])  # the factory certificate, expired by now
    in_use = ca.issue_device("pump-17", write=False)
    ca.clock.advance(timedelta(days=20))  # type: ignore[attr-defined]
    candidate = ca.issue_device("pump-17", write=False)
    revoke(ca, candidate.cert.serial_number, "superseded")  # the renewal rolled back
    entry = revoke(ca, "pump-17", "key_compromise")
    assert entry.serial == in_use.cert.serial_number
    revoked = {e.serial: e.reason for e in RevocationStore(ca).entries()}
    assert revoked == {candidate.cert.serial_number: "superseded", in_use.cert.serial_number: "key_compromise"}
    assert expired.serial_number not in revoked


def test_revoke_device_without_an_inventory_after_a_renewal_revokes_both(ca: FileCA) -> None:
    first = load_cert(ca.device_paths("pump-17")[0])
    ca.clock.advance(timedelta(days=20))  # type: ignore[attr-defined]
    renewed = ca.issue_device("pump-17", write=False)
    entries = revoke_device(ca, "pump-17", "key_compromise")
    assert [e.serial for e in entries] == [renewed.cert.serial_number, first.serial_number]  # newest first
    assert {e.serial for e in RevocationStore(ca).entries()} == {renewed.cert.serial_number, first.serial_number}


def test_revoke_device_all_revokes_every_unexpired_certificate(ca: FileCA) -> None:
    first = load_cert(ca.device_paths("pump-18")[0])
    renewed = ca.issue_device("pump-18", write=False)
    entries = revoke_device(ca, "pump-18", "key_compromise", all_certs=True)
    assert {e.serial for e in entries} == {first.serial_number, renewed.cert.serial_number}


def test_revoked_device_gets_no_certificate_until_reinstated(ca: FileCA) -> None:
    revoke(ca, "pump-17", "key_compromise")
    with pytest.raises(CredentialError) as info:
        ca.issue_device("pump-17", write=False)
    assert info.value.reason == "device_revoked"
    assert ca.issue_device("pump-18", write=False).cert  # others are unaffected
    assert RevocationStore(ca).reinstate("pump-17")
    assert ca.issue_device("pump-17", write=False).cert
    assert {e.serial for e in RevocationStore(ca).entries()}  # the revoked serial stays revoked


def test_disabled_device_gets_no_certificate(ca: FileCA, tmp_path: Path) -> None:
    """The CA refused a revoked device but issued for a disabled one (the renewal backend refuses both)."""
    registry = parse_registry(ca.registry_path.read_bytes())
    ca.registry_path.write_text(apply_entries(ca.registry_path.read_text(), {
        "pump-17": replace(registry.devices["pump-17"], enabled=False)}))
    before = ca.certificates_of("pump-17")
    with pytest.raises(CredentialError) as info:
        ca.issue_device("pump-17", write=False)
    assert info.value.reason == "device_disabled" and "--reinstate" in (info.value.hint or "")
    assert ca.certificates_of("pump-17") == before, "the CA issued for a disabled device"
    assert ca.issue_device("pump-18", write=False).cert  # others are unaffected
    # A CA told where the admins' registry is reads that one.
    elsewhere = tmp_path / "registry.yaml"
    elsewhere.write_text(dump_registry(Registry({"pump-18": replace(registry.devices["pump-18"], enabled=False)})))
    moved = FileCA(ca.dir, clock=ca.clock, registry=elsewhere)
    with pytest.raises(CredentialError) as info:
        moved.issue_device("pump-18", write=False)
    assert info.value.reason == "device_disabled"
    assert moved.issue_device("pump-17", write=False).cert  # enabled (absent) in the registry it reads
    assert ca.issue_device("pump-17", write=False, reinstate=True).cert  # an admin re-enrols it on purpose


def test_revoke_is_idempotent_and_accepts_serials(ca: FileCA) -> None:
    first = revoke(ca, 0xABC, "superseded")
    again = revoke(ca, 0xABC, "key_compromise")
    assert again == first
    assert len(RevocationStore(ca).entries()) == 1


def test_revoke_refuses_unknown_device_and_bad_reason(ca: FileCA) -> None:
    with pytest.raises(ConfigError, match="never issued a certificate for device 'ghost'"):
        revoke(ca, "ghost")
    with pytest.raises(ConfigError, match="revocation reason"):
        revoke(ca, 5, "because")


def test_issue_crl_lists_revoked_serials_and_counts_up(ca: FileCA) -> None:
    revoke(ca, "pump-17", "key_compromise")
    first = issue_crl(ca)
    assert crl_path(ca).read_bytes() == first
    update = _accept(ca, first)
    serial = load_cert(ca.device_paths("pump-17")[0]).serial_number
    assert update.revoked is not None and set(update.revoked) == {serial}
    assert update.installed.crl_number == 1
    assert update.installed.next_update - update.installed.this_update == timedelta(days=7)
    assert update.installed.this_update <= NOW
    second = issue_crl(ca, validity=timedelta(days=1))
    newer = _accept(ca, second, update.installed)
    assert newer.changed and newer.installed.crl_number == 2
    assert RevocationStore(ca).last_crl_number() == 2


def test_crl_reason_is_carried(ca: FileCA) -> None:
    revoke(ca, 77, "key_compromise")
    revoke(ca, 78, "unspecified")
    crl = x509.load_der_x509_crl(issue_crl(ca))
    by_serial = {r.serial_number: r for r in crl}
    reason = by_serial[77].extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.key_compromise
    assert len(by_serial[78].extensions) == 0  # "unspecified" is omitted (RFC 5280 5.3.1)


def test_corrupt_store_is_a_config_error(ca: FileCA) -> None:
    (ca.dir / "revoked.json").write_text('{"version": 1, "last_crl_number": -1, "revoked": []}')
    with pytest.raises(ConfigError, match="last_crl_number"):
        issue_crl(ca)
    (ca.dir / "revoked.json").write_text("{nope")
    with pytest.raises(ConfigError, match="cannot read"):
        revoke(ca, 5)


def test_issue_without_ca_explains(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no CA found"):
        issue_crl(FileCA(tmp_path / "empty"))


def _pki_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    cli_pki.add_parser(parser.add_subparsers(dest="group", required=True))
    sub = parser._subparsers._group_actions[0].choices["pki"]  # type: ignore[union-attr]
    assert isinstance(sub, argparse.ArgumentParser)
    return sub


def test_pki_verbs_revoke_and_crl(ca: FileCA, capsys: pytest.CaptureFixture[str]) -> None:
    parser = _pki_parser()
    args = parser.parse_args(["revoke", "pump-18", "--ca-dir", str(ca.dir)])
    assert args.func(args) == 0
    args = parser.parse_args(["revoke", "0x1f", "--reason", "superseded", "--ca-dir", str(ca.dir)])
    assert args.func(args) == 0
    out = ca.dir / "other.crl"
    args = parser.parse_args(["crl", "--ca-dir", str(ca.dir), "--days", "2", "--out", str(out)])
    assert args.func(args) == 0
    assert "pump-18" in capsys.readouterr().out
    update = _accept(ca, out.read_bytes(), now=datetime.now(UTC))  # the CLI signs with the real clock
    assert update.revoked is not None and 0x1F in update.revoked and len(update.revoked) == 2
    args = parser.parse_args(["revoke", "not-a-device", "--ca-dir", str(ca.dir)])
    with pytest.raises(ConfigError, match="neither a device"):
        args.func(args)


def test_pki_revoke_with_the_ca_alone_fails_closed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``pki revoke <device> --ca-dir`` (no inventory) after a rolled-back renewal used to revoke
    only the newest certificate, the already revoked candidate: the one in use stayed valid."""
    ca = init_dev(tmp_path / "certs-dev", device_ids=["pump-17"])  # the CLI runs on the real clock
    in_use = load_cert(ca.device_paths("pump-17")[0])
    candidate = ca.issue_device("pump-17", write=False)
    revoke(ca, candidate.cert.serial_number, "superseded")
    args = _pki_parser().parse_args(["revoke", "pump-17", "--ca-dir", str(ca.dir)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"revoked device pump-17 serial {in_use.serial_number:#x} (key_compromise)"
    assert "no inventory: the certificate in use is unknown, so every unexpired certificate" in out
    assert "blocked at the CA" in out
    crl = x509.load_der_x509_crl(issue_crl(ca))
    assert {r.serial_number for r in crl} == {in_use.serial_number, candidate.cert.serial_number}


def test_init_dev_force_starts_a_new_ca_without_old_revocations(tmp_path: Path) -> None:
    """A revoked device of the old dev CA used to make `init-dev --force` stop half-way."""
    ca = init_dev(tmp_path / "certs-dev", device_ids=["pump-17"], clock=ManualClock(NOW))
    revoke(ca, "pump-17", "key_compromise")
    issue_crl(ca)
    again = init_dev(tmp_path / "certs-dev", device_ids=["pump-17"], force=True, clock=ManualClock(NOW))
    assert RevocationStore(again).entries() == ()
    assert [c.serial_number for c in again.certificates_of("pump-17")] == [
        load_cert(again.device_paths("pump-17")[0]).serial_number]
