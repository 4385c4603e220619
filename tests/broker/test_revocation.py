"""Revocation end to end: a revoked device is refused at connect and cut while connected;
bad CRL files keep the last good state; both staleness policies; the agent's HTTP path."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from edge_core.clock import ManualClock
from edge_core.crl import crl_pem
from edge_core.events import SecurityEvents
from edge_core.registry import DeviceEntry, Registry, dump_registry, parse_registry
from gateway_agent.crl_issue import issue_crl, revoke
from gateway_agent.crl_sync import CrlSyncer, HttpCrlSource
from gateway_agent.pki import FileCA
from tests.broker.acl_fixture import replace_file, write_acl
from tests.conftest import StartBroker
from tests.support.broker import BrokerThread
from tests.support.mqtt import Device
from tests.support.pki import Credential, DevPki

pytestmark = pytest.mark.integration
NOT_AUTHORIZED = 5


@pytest.fixture
def ca(tmp_path: Path, pki: DevPki) -> FileCA:
    """The test PKI's issuing CA with a revocation store of this test's own."""
    return pki.private_ca(tmp_path / "ca")


@pytest.fixture
def valve(pki: DevPki, registry_file: Path) -> tuple[Credential, int]:
    """A device of its own, so revoking it touches no other test."""
    cred = pki.issue(f"valve-{time.monotonic_ns()}", "valve-1")
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cred.cert.read_bytes())
    from edge_core.identity import spki_pin

    registry = parse_registry(registry_file.read_bytes())
    devices = dict(registry.devices)
    devices["valve-1"] = DeviceEntry("valve-1", (spki_pin(cert),), frozenset({"sensor"}),
                                     {"site": "plant-a", "line": "line-1"})
    replace_file(registry_file, dump_registry(Registry(devices)))
    return cred, cert.serial_number


def revocation_settings(crl: Path, pki: DevPki, mode: str = "fail_open_alarm", max_age: int = 86400) -> str:
    return (f"revocation:\n  crl_files: [{crl}]\n  issuers: [{pki.root / 'issuing-ca.crt'}]\n"
            f"  check_interval: 0.1\n  staleness:\n    mode: {mode}\n    max_age: {max_age}\n")


def publish_crl(ca: FileCA, target: Path, validity: timedelta = timedelta(days=7)) -> bytes:
    der = issue_crl(ca, validity=validity)
    replace_file_bytes(target, crl_pem(der))
    return der


def replace_file_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def connect(broker: BrokerThread, pki: DevPki, cred: Credential, client_id: str = "valve-1") -> Device:
    return Device(broker.port, pki.chain, cred, client_id)


def test_revoked_device_is_cut_within_2s_and_refused_at_connect(
    start_broker: StartBroker, pki: DevPki, ca: FileCA, valve: tuple[Credential, int], tmp_path: Path
) -> None:
    cred, serial = valve
    crl = tmp_path / "crl.pem"
    publish_crl(ca, crl)
    broker = start_broker(acl=write_acl(tmp_path), extra=revocation_settings(crl, pki))
    device = connect(broker, pki, cred)
    assert device.connect() == 0
    bystander = connect(broker, pki, pki.device("pump-17"), "pump-17")
    assert bystander.connect() == 0

    revoke(ca, serial, "key_compromise")
    started = time.monotonic()
    publish_crl(ca, crl)
    assert device.disconnected.wait(2.0), "revoked device still connected 2 s after the CRL landed"
    elapsed = time.monotonic() - started
    cut = broker.wait_event("session.cut", "revoked")[0]
    assert cut["device"] == "valve-1" and cut["serial"] == f"{serial:x}"
    assert elapsed < 2.0
    assert not bystander.disconnected.is_set()

    assert connect(broker, pki, cred).connect() == NOT_AUTHORIZED
    broker.wait_event("auth.rejected", "revoked")
    bystander.close()


def test_bad_crl_files_are_refused_and_the_last_good_stays(
    start_broker: StartBroker, pki: DevPki, ca: FileCA, valve: tuple[Credential, int], tmp_path: Path
) -> None:
    cred, serial = valve
    crl = tmp_path / "crl.pem"
    first = publish_crl(ca, crl)
    revoke(ca, serial)
    publish_crl(ca, crl)  # CRL 2 revokes the valve
    broker = start_broker(acl=write_acl(tmp_path), extra=revocation_settings(crl, pki))
    broker.wait_event("crl.loaded")
    replace_file_bytes(crl, b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
    broker.wait_event("crl.reload_failed", "crl_unparseable")
    replace_file_bytes(crl, crl_pem(first))  # an older CRL, without the revocation
    failed = broker.wait_event("crl.reload_failed", "crl_rollback")[0]
    assert "must be >=" in failed["detail"]
    assert connect(broker, pki, cred).connect() == NOT_AUTHORIZED  # still revoked
    pump = connect(broker, pki, pki.device("pump-17"), "pump-17")
    assert pump.connect() == 0
    pump.close()


def test_fail_closed_refuses_and_cuts_when_the_crl_goes_stale(
    start_broker: StartBroker, pki: DevPki, ca: FileCA, tmp_path: Path
) -> None:
    crl = tmp_path / "crl.pem"
    publish_crl(ca, crl, validity=timedelta(days=1))
    clock = ManualClock()
    broker = start_broker(acl=write_acl(tmp_path), extra=revocation_settings(crl, pki, "fail_closed"),
                          clock=clock)
    pump = connect(broker, pki, pki.device("pump-17"), "pump-17")
    assert pump.connect() == 0
    clock.advance(timedelta(days=2))  # past nextUpdate
    alarm = broker.wait_event("crl.alarm", "stale_past_next_update")[0]
    assert alarm["admit"] is False and alarm["policy"] == "fail_closed"
    assert pump.disconnected.wait(2.0)
    broker.wait_event("session.cut", "crl_stale")
    again = connect(broker, pki, pki.device("pump-17"), "pump-17")
    assert again.connect() == NOT_AUTHORIZED
    assert broker.wait_event("auth.rejected", "crl_stale")[0]["state"] == "stale_past_next_update"
    publish_crl(FileCA(ca.dir, clock=clock), crl)  # a fresh CRL (issued "now" on the same clock) ends it
    broker.wait_event("crl.recovered", "fresh")
    back = connect(broker, pki, pki.device("pump-17"), "pump-17")
    assert back.connect() == 0
    back.close()


def test_fail_open_alarm_keeps_devices_and_raises_the_alarm_early(
    start_broker: StartBroker, pki: DevPki, ca: FileCA, tmp_path: Path
) -> None:
    crl = tmp_path / "crl.pem"
    publish_crl(ca, crl, validity=timedelta(days=4))
    clock = ManualClock()
    broker = start_broker(acl=write_acl(tmp_path), extra=revocation_settings(crl, pki, max_age=30 * 86400),
                          clock=clock)
    pump = connect(broker, pki, pki.device("pump-17"), "pump-17")
    assert pump.connect() == 0
    clock.advance(timedelta(days=3, hours=1))  # 75 % of the validity window: warn before anything breaks
    assert broker.wait_event("crl.alarm", "expiring")[0]["admit"] is True
    clock.advance(timedelta(days=2))
    assert broker.wait_event("crl.alarm", "stale_past_next_update")[0]["admit"] is True
    assert not pump.disconnected.is_set()
    late = connect(broker, pki, pki.device("pump-18"), "pump-18")
    assert late.connect() == 0
    late.close()
    pump.close()


def test_missing_crl_under_fail_closed_refuses(start_broker: StartBroker, pki: DevPki, tmp_path: Path) -> None:
    broker = start_broker(acl=write_acl(tmp_path),
                          extra=revocation_settings(tmp_path / "not-yet.pem", pki, "fail_closed"))
    broker.wait_event("crl.alarm", "missing")
    assert connect(broker, pki, pki.device("pump-17"), "pump-17").connect() == NOT_AUTHORIZED
    broker.wait_event("auth.rejected", "crl_stale")


@pytest.fixture
def crl_server() -> Iterator[tuple[str, dict[str, bytes]]]:
    content: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = content.get("crl")
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/issuing-ca.crl", content
    server.shutdown()
    server.server_close()


def test_agent_sync_to_broker_disconnect(
    start_broker: StartBroker, pki: DevPki, ca: FileCA, valve: tuple[Credential, int], tmp_path: Path,
    crl_server: tuple[str, dict[str, bytes]],
) -> None:
    """CA publishes -> agent fetches over HTTP, verifies, installs -> broker cuts the device."""
    url, content = crl_server
    targets = [tmp_path / "broker-a.pem", tmp_path / "broker-b.pem"]  # one agent feeds two brokers
    content["crl"] = issue_crl(ca)
    from edge_core.clock import SystemClock
    from gateway_agent.crl_sync import load_issuers

    syncer = CrlSyncer([HttpCrlSource(url)], load_issuers([pki.root / "issuing-ca.crt"]), targets,
                       tmp_path / "state.json", SystemClock(), SecurityEvents("agent"))
    assert syncer.sync_once().ok
    brokers = [start_broker(acl=write_acl(tmp_path), extra=revocation_settings(targets[0], pki))]
    device = connect(brokers[0], pki, valve[0])
    assert device.connect() == 0

    revoke(ca, valve[1])
    content["crl"] = issue_crl(ca)  # published by the CA
    started = time.monotonic()
    report = syncer.sync_once()
    assert report.ok and report.changed
    assert device.disconnected.wait(2.0)
    elapsed = time.monotonic() - started
    brokers[0].wait_event("session.cut", "revoked")
    assert targets[1].read_bytes() == targets[0].read_bytes()
    print(f"CRL publication to disconnect: {elapsed * 1000:.0f} ms")
    assert elapsed < 2.0


def test_a_crl_is_parsed_once_at_start_up(
    start_broker: StartBroker, pki: DevPki, ca: FileCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1,000,000-entry CRL takes over a second to load: the file watcher must not load it again."""
    from broker_plugins.revocation import RevocationState

    crl = tmp_path / "crl.pem"
    publish_crl(ca, crl)
    calls = []
    original = RevocationState.reload

    async def counting(self: RevocationState, now: object) -> object:
        calls.append(now)
        return await original(self, now)  # type: ignore[arg-type]

    monkeypatch.setattr(RevocationState, "reload", counting)
    broker = start_broker(acl=write_acl(tmp_path), extra=revocation_settings(crl, pki))
    broker.wait_event("crl.loaded")
    time.sleep(0.5)  # several watcher polls (0.1 s) pass
    assert len(calls) == 1
    publish_crl(ca, crl)  # a real change is still picked up
    broker.wait_event("crl.loaded", count=2)
    assert len(calls) == 2
