"""Two brokers, one site: every part a real process or a real client.

Broker A and broker B (``edge-broker run``) share the Redis replay store, the device registry
file and the CRL install targets; agent A and agent B (``gateway-agent run``) run in HA on one
PostgreSQL inventory, each with its own identity and its own broker session. Devices connect
with real TLS clients (the reference rotation client, paho). Proved:

- a command accepted on A is refused as ``replayed`` on B;
- a revocation (CA -> CRL file -> agents -> both install targets) cuts the device on both brokers;
- the device due for renewal is renewed exactly once, by the leader, though both agents run;
- broker A dies: the device fails over to B with its renewed certificate, agent A loses its
  session and hands the lease over, agent B leads within the bound and renews nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_client.client import DeviceConfig
from device_client.rotation import CredentialStore, DeviceRotation
from edge_core.envelope import sign_command
from edge_core.files import atomic_write_bytes, atomic_write_text
from edge_core.lifecycle import RenewalState
from edge_core.registry import DeviceEntry, Registry, dump_registry, parse_registry
from gateway_agent.crl_issue import crl_path, issue_crl, revoke
from gateway_agent.inventory_pg import PostgresInventory
from gateway_agent.pki import FileCA, cert_pem, init_dev, issue_leaf, key_pem
from tests.agent.test_rotation_e2e import ROTATION_ACL
from tests.support.mqtt import Device
from tests.support.pki import Credential
from tests.support.stores import REDIS_URL, free_port, redis_client

pytestmark = pytest.mark.integration

LEASE = 3.0
WAIT = 30.0
# The rotation grants of the single-broker test, plus what commands need here.
ACL = ROTATION_ACL + """\
devices:
  alice:
    - allow publish devices/+/cmd/#
    - allow subscribe operators/{device}/cmd-rejected
  pump-2:
    - allow subscribe devices/{device}/cmd/#
"""
BIN = Path(sys.executable).parent


@dataclass
class Gateway:
    name: str
    port: int
    test_port: int
    status_port: int
    agent_status_port: int
    broker: subprocess.Popen[bytes] | None = None
    agent: subprocess.Popen[bytes] | None = None


def _get(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _wait(what: str, check: Any, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, KeyError, TypeError):
            found = check()
            if found:
                return found
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def _issue(ca: FileCA, directory: Path, identity: str, *, now: datetime, lifetime: timedelta) -> Credential:
    issued = issue_leaf(ca.issuing(), identity=identity, now=now, lifetime=lifetime)
    assert issued.key is not None
    atomic_write_bytes(directory / f"{identity}.crt", cert_pem(issued.cert))
    atomic_write_bytes(directory / f"{identity}.key", key_pem(issued.key), mode=0o600)
    return Credential(directory / f"{identity}.crt", directory / f"{identity}.key")


def _pin_of(cred: Credential) -> str:
    from edge_core.identity import spki_pin

    return spki_pin(x509.load_pem_x509_certificate(cred.cert.read_bytes()))


@dataclass
class Site:
    tmp: Path
    ca: FileCA
    pg_url: str
    prefix: str
    a: Gateway
    b: Gateway

    def broker_yaml(self, gw: Gateway) -> Path:
        path = self.tmp / f"broker-{gw.name}.yaml"
        path.write_text(f"""listener:
  bind: 127.0.0.1:{gw.port}
  certfile: {self.ca.dir / 'broker.crt'}
  keyfile: {self.ca.dir / 'broker.key'}
  client_ca: {self.ca.chain_path}
registry: {self.ca.registry_path}
acl: {self.tmp / 'acl.yaml'}
commands:
  operators: {self.ca.dir / 'operators.yaml'}
  replay_store: {REDIS_URL}
  replay_prefix: {self.prefix}
revocation:
  crl_files: [{self.tmp / gw.name / 'crl.pem'}]
  issuers: [{self.ca.dir / 'issuing-ca.crt'}]
  check_interval: 0.5
cert_test_listener:
  bind: 127.0.0.1:{gw.test_port}
status:
  bind: 127.0.0.1:{gw.status_port}
reload_interval: 0.1
event_loop: asyncio
""")
        return path

    def agent_yaml(self, gw: Gateway, agent_id: str) -> Path:
        path = self.tmp / f"agent-{gw.name}.yaml"
        path.write_text(f"""agent_id: {agent_id}
status:
  bind: 127.0.0.1:{gw.agent_status_port}
crl:
  sources: [{{file: {crl_path(self.ca)}}}]
  issuers: [{self.ca.dir / 'issuing-ca.crt'}]
  install_targets: [{self.tmp / 'a' / 'crl.pem'}, {self.tmp / 'b' / 'crl.pem'}]
  state: {self.tmp / gw.name / 'crl-state.json'}
  interval: 3600
broker:
  host: 127.0.0.1
  port: {gw.port}
  ca: {self.ca.chain_path}
  cert: {self.ca.dir / 'agent' / f'{agent_id}.crt'}
  key: {self.ca.dir / 'agent' / f'{agent_id}.key'}
lifecycle:
  inventory: {self.pg_url}
  spool_dir: {self.tmp / gw.name / 'spool'}
  ca_dir: {self.ca.dir}
  registry: {self.ca.registry_path}
  broker_status_url: http://127.0.0.1:{gw.status_port}/status
  leader_lease_seconds: {LEASE}
  scan_interval_hours: 0.001
  certificate_days: 30
""")
        return path

    def start_broker(self, gw: Gateway) -> None:
        with (self.tmp / f"broker-{gw.name}.log").open("wb") as log:
            gw.broker = subprocess.Popen([str(BIN / "edge-broker"), "run", "-c", str(self.broker_yaml(gw))],
                                         stdout=log, stderr=subprocess.STDOUT)
        _wait(f"broker {gw.name}", lambda: _get(gw.status_port)["component"] == "edge-broker")

    def start_agent(self, gw: Gateway, agent_id: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with (self.tmp / f"agent-{gw.name}.log").open("wb") as log:
            gw.agent = subprocess.Popen([str(BIN / "gateway-agent"), "run", "-c", str(self.agent_yaml(gw, agent_id))],
                                        stdout=log, stderr=subprocess.STDOUT, env=env)
        _wait(f"agent {gw.name}", lambda: _get(gw.agent_status_port)["component"] == "gateway-agent")

    def lifecycle(self, gw: Gateway) -> dict[str, Any]:
        return _get(gw.agent_status_port)["services"]["session"]["lifecycle"]  # type: ignore[no-any-return]

    def broker_events(self, gw: Gateway) -> dict[str, dict[str, int]]:
        return _get(gw.status_port)["events"]  # type: ignore[no-any-return]

    def renewals(self, device_id: str) -> int:
        with PostgresInventory(self.pg_url, create=False) as inv:
            return sum(1 for t in inv.history(device_id) if t.to_state == RenewalState.OVERLAP.value)


@pytest.fixture
def site(tmp_path: Path, pg_url: str, redis_prefix: str) -> Iterator[Site]:
    now = datetime.now(UTC)
    ca = init_dev(tmp_path / "pki", device_ids=["meter-1", "pump-2"])
    # meter-1 is due: issued 25 days ago for 30 days (renewal starts 10 days ahead)
    meter = _issue(ca, ca.dir / "devices", "meter-1", now=now - timedelta(days=25), lifetime=timedelta(days=30))
    agent_b = _issue(ca, ca.dir / "agent", "gateway-agent-b", now=now, lifetime=timedelta(days=30))
    registry = parse_registry(ca.registry_path.read_bytes())
    devices = dict(registry.devices)
    devices["meter-1"] = replace(devices["meter-1"], pins=(_pin_of(meter),))
    devices["gateway-agent-b"] = DeviceEntry("gateway-agent-b", (_pin_of(agent_b),), frozenset({"gateway"}),
                                             dict(devices["gateway-agent"].attributes))
    atomic_write_text(ca.registry_path, dump_registry(Registry(devices)))
    (tmp_path / "acl.yaml").write_text(ACL)
    # The site's replay store has vouched for a minute already (a new one refuses commands issued
    # before its epoch + skew, like a restarted broker).
    redis_client().set(f"{{{redis_prefix}}}:epoch", str(int((now - timedelta(minutes=1)).timestamp() * 1000)))
    issue_crl(ca)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "crl.pem").write_bytes(crl_path(ca).read_bytes())
    a = Gateway("a", free_port(), free_port(), free_port(), free_port())
    b = Gateway("b", free_port(), free_port(), free_port(), free_port())
    s = Site(tmp_path, ca, pg_url, redis_prefix, a, b)
    yield s
    for gw in (a, b):
        for proc in (gw.agent, gw.broker):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


def _client(site: Site, gw: Gateway, identity: str, cred: Credential, subscribe: str) -> Device:
    device = Device(gw.port, site.ca.chain_path, cred, identity)
    assert device.connect() == 0, f"{identity} refused by broker {gw.name}"
    assert device.subscribe(subscribe) == [1]
    return device


async def test_two_brokers_one_site(site: Site) -> None:
    ca, a, b = site.ca, site.a, site.b
    site.start_broker(a)
    site.start_broker(b)

    # meter-1 runs the reference device client on broker A.
    meter_cred = Credential(ca.dir / "devices" / "meter-1.crt", ca.dir / "devices" / "meter-1.key")
    store = CredentialStore(site.tmp / "meter-store")
    old_serial = x509.load_pem_x509_certificate(meter_cred.cert.read_bytes()).serial_number

    def meter_on(gw: Gateway) -> tuple[DeviceRotation, asyncio.Task[None]]:
        config = DeviceConfig("meter-1", "127.0.0.1", gw.port, ca.chain_path, meter_cred.cert, meter_cred.key)
        rotation = DeviceRotation(config, store, test_endpoint=("127.0.0.1", gw.test_port), test_timeout=5.0)
        return rotation, asyncio.create_task(rotation.run())

    meter, meter_task = meter_on(a)
    try:
        async with asyncio.timeout(WAIT):
            await meter.wait_connected(old_serial)

        # Both agents in HA on one PostgreSQL inventory; the first to start leads.
        await asyncio.to_thread(site.start_agent, a, "gateway-agent")
        await asyncio.to_thread(_wait, "agent A to lead", lambda: site.lifecycle(a)["leadership"]["leader"])
        await asyncio.to_thread(site.start_agent, b, "gateway-agent-b")
        await asyncio.to_thread(_wait, "agent B to stand by",
                                lambda: site.lifecycle(b)["leadership"]["current_leader"]["holder"].startswith(
                                    "gateway-agent@"))

        # -- renewal happens once, by the leader, over broker A ---------------------------------
        async with asyncio.timeout(60):
            new_serial = await meter.wait_connected()
            while new_serial == old_serial:
                new_serial = await meter.wait_connected()
                await asyncio.sleep(0.1)
        await asyncio.to_thread(_wait, "the switch to be recorded", lambda: site.renewals("meter-1") == 1)
        assert not site.lifecycle(b)["leadership"]["leader"]

        # -- a command accepted on A is a replay on B ------------------------------------------
        alice = Credential(ca.dir / "operators" / "alice.crt", ca.dir / "operators" / "alice.key")
        pump = Credential(ca.dir / "devices" / "pump-2.crt", ca.dir / "devices" / "pump-2.key")
        signing = serialization.load_pem_private_key((ca.dir / "operators" / "alice-signing.key").read_bytes(), None)
        assert isinstance(signing, ec.EllipticCurvePrivateKey)
        pump_a = _client(site, a, "pump-2", pump, "devices/pump-2/cmd/#")
        pump_b = _client(site, b, "pump-2", pump, "devices/pump-2/cmd/#")
        op_a = _client(site, a, "alice", alice, "operators/alice/cmd-rejected")
        op_b = _client(site, b, "alice", alice, "operators/alice/cmd-rejected")
        token = sign_command(signing, issuer="alice", device="pump-2", body={"op": "open"},
                             ttl=timedelta(seconds=120), now=datetime.now(UTC))
        op_a.publish("devices/pump-2/cmd/valve", token)
        assert (await asyncio.to_thread(pump_a.expect)).payload == token
        op_b.publish("devices/pump-2/cmd/valve", token)
        notice = json.loads((await asyncio.to_thread(op_b.expect)).payload)
        assert notice["reason"] == "replayed"
        await asyncio.to_thread(pump_b.expect_none)
        assert site.broker_events(b)["command.rejected"]["replayed"] == 1

        # -- one revocation cuts pump-2 on both brokers ----------------------------------------
        revoke(ca, "pump-2", "key_compromise")
        issue_crl(ca)
        for gw in (a, b):
            assert gw.agent is not None
            gw.agent.send_signal(signal.SIGHUP)  # `systemctl reload gateway-agent`: sync the CRL now
        for device in (pump_a, pump_b):
            assert await asyncio.to_thread(device.disconnected.wait, WAIT), "revoked device kept its session"
        for gw in (a, b):
            again = Device(gw.port, ca.chain_path, pump, "pump-2")
            assert again.connect() != 0, f"broker {gw.name} admitted a revoked device"
        for client in (pump_a, pump_b, op_a, op_b):
            client.close()

        # -- gateway A's broker dies: the device fails over, agent B takes the lead ------------
        assert a.broker is not None
        a.broker.kill()
        a.broker.wait(timeout=10)
        died = time.monotonic()
        meter_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await meter_task
        meter, meter_task = meter_on(b)
        async with asyncio.timeout(WAIT):
            assert await meter.wait_connected() == new_serial  # the renewed certificate, pinned on B too
        await asyncio.to_thread(_wait, "agent B to lead", lambda: site.lifecycle(b)["leadership"]["leader"])
        takeover = time.monotonic() - died
        # A releases the lease when its session ends (or the lease expires): bounded either way.
        assert takeover <= LEASE * 4 / 3 + 10.0, f"takeover took {takeover:.1f}s"
        await asyncio.to_thread(_wait, "B's first scan as leader",
                                lambda: site.lifecycle(b)["last_scan"] is not None)
        await asyncio.sleep(2 * LEASE)  # several scans by the new leader
        assert site.renewals("meter-1") == 1  # renewed once, not again by the new leader
        assert meter.serial_in_use == new_serial
    finally:
        meter_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await meter_task
