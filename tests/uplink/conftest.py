"""Fixtures for the uplink: a real local broker, a real mosquitto "cloud", the uplink as a real process."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edge_core.clock import ManualClock
from gateway_agent.uplink_devcloud import CloudPki, MosquittoCloud, enroll_dev_uplink, free_port, init_cloud_pki
from tests.conftest import StartBroker
from tests.support.broker import BrokerThread
from tests.support.pki import DevPki

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_ACL = ROOT / "configs" / "acl.yaml"

needs_mosquitto = pytest.mark.skipif(shutil.which("mosquitto") is None,
                                     reason="mosquitto not installed (scripts/system-packages.sh installs it)")


@pytest.fixture(scope="session")
def cloud_pki(tmp_path_factory: pytest.TempPathFactory) -> CloudPki:
    return init_cloud_pki(tmp_path_factory.mktemp("cloud-pki"), gateway="gw-01")


@pytest.fixture
def cloud(cloud_pki: CloudPki, tmp_path: Path) -> Iterator[MosquittoCloud]:
    broker = MosquittoCloud(cloud_pki, tmp_path / "cloud").start()
    yield broker
    broker.stop()


@pytest.fixture
def broker_clock() -> ManualClock:
    return ManualClock(datetime.now(UTC).replace(microsecond=0))  # JWT times are whole seconds


@pytest.fixture
def local_broker(start_broker: StartBroker, pki: DevPki, registry_file: Path, tmp_path: Path,
                 broker_clock: ManualClock) -> BrokerThread:
    """Our broker with the shipped ACL, signed commands on, and the uplink's identity in the registry."""
    enroll_dev_uplink(pki.ca, registry_file, tmp_path / "uplink-cred")
    broker = start_broker(acl=SHIPPED_ACL, clock=broker_clock,
                          extra=f"commands:\n  operators: {pki.root / 'operators.yaml'}\n")
    # the replay cache refuses commands issued before start + skew (no replay window after a restart)
    broker_clock.advance(timedelta(seconds=31))
    return broker


def write_uplink_config(tmp_path: Path, *, local_port: int, cloud: MosquittoCloud, pki: DevPki,
                        status_port: int, inflight: int = 32, extra_queue: str = "",
                        max_bytes: int = 64 * 1024 * 1024, overflow: str = "drop_oldest") -> Path:
    cred = tmp_path / "uplink-cred"
    c = cloud.pki
    path = tmp_path / "uplink.yaml"
    path.write_text(f"""version: 1
site: plant-a
gateway: gw-01
status:
  bind: 127.0.0.1:{status_port}
local:
  host: 127.0.0.1
  port: {local_port}
  ca: {pki.chain}
  cert: {cred / 'gateway-uplink.crt'}
  key: {cred / 'gateway-uplink.key'}
  client_id: gateway-uplink
cloud:
  host: 127.0.0.1
  port: {cloud.port}
  ca: {c.ca}
  cert: {c.cert('gw-01')}
  key: {c.key('gw-01')}
  inflight: {inflight}
  backoff_initial: 0.2
  backoff_max: 1
  keepalive: 5
queue:
  path: {tmp_path / 'queue' / 'uplink.db'}
  max_bytes: {max_bytes}
  overflow: {overflow}
  durability: fsync
{extra_queue}forward:
  - from: devices/+/telemetry/#
    to: sites/{{site}}/gateways/{{gateway}}/devices/{{1}}/telemetry/{{#}}
  - from: operators/+/cmd-rejected
    to: sites/{{site}}/gateways/{{gateway}}/operators/{{1}}/cmd-rejected
downlink:
  - from: sites/{{site}}/gateways/{{gateway}}/devices/+/cmd/+
    to: devices/{{1}}/cmd/{{2}}
""")
    return path


class UplinkProcess:
    """``gateway-agent uplink run`` as a real process: restart it, SIGTERM it, kill -9 it."""

    def __init__(self, config: Path, status_port: int, log: Path) -> None:
        self.config = config
        self.status_port = status_port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> UplinkProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway_agent.cli", "uplink", "run", "-c",
                                          str(self.config)], stdout=subprocess.DEVNULL, stderr=out, env=env)
        self.wait(lambda s: True, what="status endpoint up")
        return self

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.status_port}/status"
        with urllib.request.urlopen(url, timeout=2) as response:
            body: dict[str, Any] = json.loads(response.read())
        return body["services"]["uplink"]  # type: ignore[no-any-return]

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.status_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode()  # type: ignore[no-any-return]

    def wait(self, predicate: Callable[[dict[str, Any]], bool], *, what: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"uplink exited ({self.proc.returncode}); log:\n{self.log.read_text()[-3000:]}")
            try:
                last = self.status()
                if predicate(last):
                    return last
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"uplink: no '{what}' within {timeout}s; last status {last}")

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(15)
        self.proc = None


@pytest.fixture
def uplink_process(tmp_path: Path) -> Iterator[Callable[[Path, int], UplinkProcess]]:
    started: list[UplinkProcess] = []

    def make(config: Path, status_port: int) -> UplinkProcess:
        proc = UplinkProcess(config, status_port, tmp_path / "uplink.log")
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()


class CloudClient:
    """A cloud-side client (paho) with its own cloud certificate; reconnects when the cloud comes back."""

    def __init__(self, cloud: MosquittoCloud, name: str, *, persistent: bool = True) -> None:
        self.received: queue.Queue[tuple[str, bytes]] = queue.Queue()
        #: what the cloud broker itself sent again with DUP set (a resumed session), also in ``received``
        self.redelivered: list[tuple[str, bytes]] = []
        self.subscriptions: list[str] = []
        self.connected = threading.Event()
        ctx = cloud.pki.client_context(name)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, clean_session=not persistent,
                                  protocol=mqtt.MQTTv311)
        self.client.tls_set_context(ctx)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", cloud.port, keepalive=5)
        self.client.loop_start()
        assert self.connected.wait(10), "cloud client did not connect"

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        for topic in self.subscriptions:
            client.subscribe(topic, 1)
        self.connected.set()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if message.dup:
            self.redelivered.append((message.topic, bytes(message.payload)))
        self.received.put((message.topic, bytes(message.payload)))

    def subscribe(self, topic: str) -> None:
        self.subscriptions.append(topic)
        result, _mid = self.client.subscribe(topic, 1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        time.sleep(0.2)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def collect(self, count: int, timeout: float) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            try:
                out.append(self.received.get(timeout=0.2))
            except queue.Empty:
                continue
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def cloud_client(cloud: MosquittoCloud) -> Iterator[Callable[..., CloudClient]]:
    made: list[CloudClient] = []

    def make(name: str = "cloud-app", *, persistent: bool = True) -> CloudClient:
        client = CloudClient(cloud, name, persistent=persistent)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


__all__ = ["CloudClient", "UplinkProcess", "free_port", "needs_mosquitto", "write_uplink_config"]
