"""The agent daemon: CRL schedule and SIGHUP, status endpoint, clean SIGTERM, as a real process too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from edge_core.crl import split_crl_bundle
from gateway_agent.crl_issue import crl_path, issue_crl, revoke
from gateway_agent.daemon import Agent
from gateway_agent.pki import FileCA, init_dev
from gateway_agent.settings import load_agent_settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ca(tmp_path: Path) -> FileCA:
    ca = init_dev(tmp_path / "pki", device_ids=["pump-1"])
    issue_crl(ca)
    return ca


def write_config(tmp_path: Path, ca: FileCA, port: int) -> Path:
    config = tmp_path / "agent.yaml"
    config.write_text(f"""agent_id: gateway-agent
status:
  bind: 127.0.0.1:{port}
crl:
  sources: [{{file: {crl_path(ca)}}}]
  issuers: [{ca.dir / 'issuing-ca.crt'}]
  install_targets: [{tmp_path / 'broker-a' / 'crl.pem'}, {tmp_path / 'broker-b' / 'crl.pem'}]
  state: {tmp_path / 'state' / 'crl.json'}
  interval: 3600
""")
    return config


def get_status(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


async def test_agent_syncs_at_start_and_again_on_sighup(tmp_path: Path, ca: FileCA) -> None:
    port = free_port()
    settings = load_agent_settings(write_config(tmp_path, ca, port))
    target = tmp_path / "broker-a" / "crl.pem"
    async with Agent(settings) as agent:
        assert agent.crl is not None
        await asyncio.wait_for(agent.crl.wait_synced(1), timeout=60)  # the sync at start has finished
        assert len(split_crl_bundle(target.read_bytes())) == 1
        status = await asyncio.to_thread(get_status, port)
        crl = status["services"]["crl"]  # type: ignore[index]
        (issuer_status,) = crl["issuers"].values()
        assert issuer_status["crl_number"] == 1 and issuer_status["freshness"] == "fresh"

        revoke(ca, "pump-1")
        issue_crl(ca)
        agent._sighup()  # what `systemctl reload gateway-agent` sends
        await asyncio.wait_for(agent.crl.wait_synced(2), timeout=60)  # the sync SIGHUP asked for
        assert any(i.crl_number == 2 and i.count == 1 for i in agent.crl.syncer.installed.values())
        assert (tmp_path / "broker-b" / "crl.pem").read_bytes() == target.read_bytes()
        assert agent.events.count("crl.installed") == 2


def test_gateway_agent_run_as_a_process_stops_cleanly_on_sigterm(tmp_path: Path, ca: FileCA) -> None:
    port = free_port()
    config = write_config(tmp_path, ca, port)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(bin_dir / "gateway-agent"), "run", "-c", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                status = get_status(port)
                break
            except OSError:
                assert time.monotonic() < deadline, "agent status endpoint never came up"
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.1)
        assert status["agent_id"] == "gateway-agent"
        cli = subprocess.run([str(bin_dir / "gateway-agent"), "status", "-c", str(config)],
                             capture_output=True, text=True, timeout=10, check=False)
        assert cli.returncode == 0 and json.loads(cli.stdout)["component"] == "gateway-agent"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert "agent.started" in names and "crl.installed" in names and names[-1] == "agent.stopped"


def test_status_of_an_agent_that_is_not_running_exits_5_unavailable(tmp_path: Path, ca: FileCA) -> None:
    from gateway_agent.cli import main

    assert main(["status", "-c", str(write_config(tmp_path, ca, free_port()))]) == 5


from tests.agent.test_validation_service import VALIDATION_ACL  # noqa: E402 - the same grants


async def test_daemon_answers_mcu_validation_from_the_crl_it_installed(
    tmp_path: Path, start_broker: object, pki: object
) -> None:
    """Agent daemon (CRL sync + validation service) on a real broker; a device asks about two certs."""

    from cryptography.hazmat.primitives import serialization

    from device_client.client import DeviceClient, DeviceConfig
    from device_client.validation import check_certificate
    from gateway_agent.validation_service import make_validation_key
    from tests.support.pki import DevPki

    assert isinstance(pki, DevPki)
    own_ca = pki.private_ca(tmp_path / "ca")
    good = pki.issue("val-good", "peer-good")
    bad = pki.issue("val-bad", "peer-bad")
    from cryptography import x509

    bad_serial = x509.load_pem_x509_certificate(bad.cert.read_bytes()).serial_number
    revoke(own_ca, bad_serial)
    issue_crl(own_ca)
    acl = tmp_path / "acl.yaml"
    acl.write_text(VALIDATION_ACL)
    broker = await asyncio.to_thread(start_broker, acl=acl)  # type: ignore[operator]
    keys = make_validation_key(tmp_path / "validation")
    port = free_port()
    config = write_config(tmp_path, own_ca, port)
    config.write_text(config.read_text() + f"""broker:
  host: 127.0.0.1
  port: {broker.port}
  ca: {pki.chain}
  cert: {pki.root / 'agent' / 'gateway-agent.crt'}
  key: {pki.root / 'agent' / 'gateway-agent.key'}
validation:
  signing_key: {keys.private}
""")
    from gateway_agent.services import service_factories

    settings = load_agent_settings(config)
    public = serialization.load_pem_public_key(keys.public.read_bytes())
    async with Agent(settings, extra_services=service_factories(settings)) as agent:
        assert [s.name for s in agent.services] == ["crl", "session"]
        for _ in range(250):
            if agent.crl is not None and agent.crl.index.installed:
                break
            await asyncio.sleep(0.02)
        await asyncio.to_thread(broker.wait_event, "subscription.granted")
        device = DeviceClient(DeviceConfig("pump-17", "127.0.0.1", broker.port, pki.chain,
                                           pki.device("pump-17").cert, pki.device("pump-17").key))
        async with device:
            for cred, expected in ((good, "good"), (bad, "revoked")):
                der = x509.load_pem_x509_certificate(cred.cert.read_bytes()).public_bytes(
                    serialization.Encoding.DER)
                answer = await check_certificate(device, der, gateway_public_key=public, timeout=5)  # type: ignore[arg-type]
                assert answer.status == expected and answer.gateway == "gateway-agent"
                assert answer.crl_number == 1
        status = agent.status()
        assert status["services"]["session"]["validation"]["answered"] == 2  # type: ignore[index]


async def test_validation_service_comes_up_when_the_broker_starts_after_the_agent(tmp_path: Path, ca: FileCA) -> None:
    """systemd may start the agent first, and brokers restart: the service must reconnect, not die."""
    from gateway_agent.services import service_factories
    from gateway_agent.validation_service import make_validation_key

    keys = make_validation_key(tmp_path / "validation")
    config = write_config(tmp_path, ca, free_port())
    config.write_text(config.read_text() + f"""broker:
  host: 127.0.0.1
  port: {free_port()}
  ca: {ca.chain_path}
  cert: {ca.dir / 'agent' / 'gateway-agent.crt'}
  key: {ca.dir / 'agent' / 'gateway-agent.key'}
validation:
  signing_key: {keys.private}
""")
    settings = load_agent_settings(config)
    async with Agent(settings, extra_services=service_factories(settings)) as agent:
        for _ in range(300):
            if agent.events.count("agent.service_failed") >= 2:
                break
            await asyncio.sleep(0.02)
        failures = [e for e in agent.events.recent("agent.service_failed") if e["service"] == "session"]
        assert len(failures) >= 2
        assert all(e["reason"] == "FetchError" for e in failures), failures  # reconnect attempts, not re-entry


async def test_daemon_renews_a_device_when_asked(tmp_path: Path, pki: object, registry_file: Path,
                                                 start_broker: object) -> None:
    """`gateway-agent certs renew` -> the daemon's lifecycle service rotates the device over the wire."""

    from cryptography import x509

    from device_client.client import DeviceConfig
    from device_client.credential_store import CredentialStore
    from device_client.rotation import DeviceRotation
    from edge_core.registry import parse_registry
    from gateway_agent.agent_session import request_renewal
    from gateway_agent.services import service_factories
    from tests.agent.test_rotation_e2e import DEVICE, ROTATION_ACL, _issue_device, _register
    from tests.support.pki import DevPki

    assert isinstance(pki, DevPki)
    ca_dir = pki.private_ca(tmp_path / "ca").dir
    factory = _issue_device(FileCA(ca_dir), ca_dir / "devices", days_left=25)  # not due: only the request renews
    _register(registry_file, factory)
    acl = tmp_path / "acl.yaml"
    acl.write_text(ROTATION_ACL)
    broker = await asyncio.to_thread(start_broker, acl=acl,  # type: ignore[operator]
                                     extra="cert_test_listener:\n  bind: 127.0.0.1:0\n")
    edge = broker.edge
    config = tmp_path / "agent.yaml"
    config.write_text(f"""agent_id: gateway-agent
broker:
  host: 127.0.0.1
  port: {broker.port}
  ca: {pki.chain}
  cert: {pki.root / 'agent' / 'gateway-agent.crt'}
  key: {pki.root / 'agent' / 'gateway-agent.key'}
lifecycle:
  inventory: {tmp_path / 'agent' / 'inventory.db'}
  ca_dir: {ca_dir}
  registry: {registry_file}
  broker_status_url: http://127.0.0.1:{edge.status_server.port}/status
""")
    settings = load_agent_settings(config)
    old_serial = x509.load_pem_x509_certificate(factory.cert.read_bytes()).serial_number
    rotation = DeviceRotation(DeviceConfig(DEVICE, "127.0.0.1", broker.port, pki.chain, factory.cert, factory.key),
                              CredentialStore(tmp_path / "store"),
                              test_endpoint=("127.0.0.1", edge.cert_test_listener.port))
    device = asyncio.create_task(rotation.run())
    try:
        async with Agent(settings, extra_services=service_factories(settings)) as agent:
            await asyncio.wait_for(rotation.wait_connected(old_serial), 10)
            for _ in range(200):
                if agent.events.count("lifecycle.scan"):
                    break
                await asyncio.sleep(0.05)
            assert agent.events.count("renewal.started") == 0  # the daily scan found nothing due
            assert settings.lifecycle is not None
            request_renewal(settings.lifecycle, DEVICE)
            for _ in range(600):
                if agent.events.count("renewal.switched"):
                    break
                await asyncio.sleep(0.05)
            switched = agent.events.recent("renewal.switched")[0]
            new_serial = int(switched["serial"], 16)
            assert new_serial != old_serial
            await asyncio.wait_for(rotation.wait_connected(new_serial), 10)
            entry = parse_registry(await asyncio.to_thread(registry_file.read_bytes)).get(DEVICE)
            assert entry is not None and len(entry.pins) == 2  # the 7-day overlap: both certificates admitted
            assert broker.events.count("cert_test.passed") == 1
    finally:
        device.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await device
