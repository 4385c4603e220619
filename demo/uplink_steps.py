"""Demo steps: the Zone 2 -> Zone 3 uplink with store-and-forward, and a forged downlink command.

Called once from ``demo/demo.py`` with the broker already running on the dev PKI. A "cloud"
mosquitto (its own CA, client certificates, an ACL) starts on a free loopback port; the uplink
runs as its own daemon (``gateway-agent uplink run``). The cloud is taken down, the uplink is
killed mid-outage, the cloud comes back: every message arrives, in order.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from device_client.client import DeviceConfig
from edge_core.envelope import sign_command
from gateway_agent.pki import FileCA, new_key
from gateway_agent.uplink_devcloud import MosquittoCloud, enroll_dev_uplink, free_port, init_cloud_pki

__all__ = ["uplink_section"]

STATUS_PORT = 9466  # configs/uplink.yaml status.bind
CLOUD_PREFIX = "sites/plant-a/gateways/gw-01/devices/device-001/telemetry/"


def _say(text: str) -> None:
    print(f"   {text}", flush=True)


def _uplink_status() -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{STATUS_PORT}/status", timeout=2) as response:
        body: dict[str, Any] = json.loads(response.read())
    return body["services"]["uplink"]  # type: ignore[no-any-return]


def _wait(predicate: Callable[[dict[str, Any]], bool], what: str, limit_s: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            status = _uplink_status()
            if predicate(status):
                return status
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"uplink: no '{what}' within {limit_s} s; see demo-uplink.log")


class _CloudApp:
    """The cloud platform's consumer: a persistent QoS 1 subscriber on sites/#."""

    def __init__(self, cloud: MosquittoCloud) -> None:
        self.got: list[str] = []
        ctx = cloud.pki.client_context("cloud-app")
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cloud-app", clean_session=False,
                                  protocol=mqtt.MQTTv311)
        self.client.tls_set_context(ctx)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_connect = lambda c, *a: c.subscribe("sites/#", 1)
        self.client.on_message = lambda c, u, m: self.got.append(m.payload.decode())
        self.client.connect("127.0.0.1", cloud.port, keepalive=5)
        self.client.loop_start()

    def wait_for(self, n: int, limit_s: float = 20.0) -> None:
        deadline = time.monotonic() + limit_s
        while len(self.got) < n and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _publish(device: DeviceConfig, numbers: range) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=device.ca)
    ctx.load_cert_chain(device.cert, device.key)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device.device_id, protocol=mqtt.MQTTv311)
    client.tls_set_context(ctx)
    client.connect(device.host, device.port)
    client.loop_start()
    try:
        for n in numbers:
            client.publish(f"devices/{device.device_id}/telemetry/seq", str(n), qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def uplink_section(*, root: Path, certs: Path, bin_dir: Path, device: DeviceConfig,
                   wait_for_refusal: Callable[[str, int, float], dict[str, Any]],
                   count: Callable[[str], int]) -> None:
    print("\n\033[1m== 8. Uplink to the cloud (Zone 2 -> Zone 3): store-and-forward, and a forged downlink\033[0m",
          flush=True)
    cloud_pki = init_cloud_pki(certs / "cloud", gateway="gw-01")
    enroll_dev_uplink(FileCA(certs), certs / "registry.yaml", certs / "uplink")
    _say("dev cloud: its own CA; the gateway's cloud certificate gw-01; uplink identity gateway-uplink "
         "(role uplink) added to the registry")
    cloud = MosquittoCloud(cloud_pki, root / "var" / "cloud", port=free_port()).start()
    config = root / "var" / "demo-uplink.yaml"  # var/ and configs/ are siblings: relative paths still hold
    shipped = (root / "configs" / "uplink.yaml").read_text()
    cloud_line = shipped[shipped.index("  host: mqtt.cloud.example.net"):]
    cloud_line = cloud_line[: cloud_line.index("  port: 8883") + len("  port: 8883")]
    config.write_text(shipped.replace(cloud_line, f"  host: 127.0.0.1\n  port: {cloud.port}")
                      .replace("backoff_max: 60 ", "backoff_max: 2  "))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def start_uplink() -> subprocess.Popen[bytes]:
        with open(root / "demo-uplink.log", "ab") as log:
            return subprocess.Popen([str(bin_dir / "gateway-agent"), "uplink", "run", "-c", str(config)], cwd=root,
                                    env=env, stdout=subprocess.DEVNULL, stderr=log)

    app = _CloudApp(cloud)
    uplink = start_uplink()
    try:
        _wait(lambda s: s["cloud"]["connected"] and s["local"]["connected"], "both sessions up")
        _say(f"mosquitto \"cloud\" on 127.0.0.1:{cloud.port} (TLS 1.3, require_certificate, CN = username, ACL); "
             "gateway-agent uplink connected out to it")
        _publish(device, range(1, 6))
        app.wait_for(5)
        _say(f"device-001 telemetry 1..5 -> cloud received {app.got[:5]} on {CLOUD_PREFIX}seq")

        cloud.stop()
        _wait(lambda s: not s["cloud"]["connected"], "cloud down")
        _publish(device, range(6, 26))
        status = _wait(lambda s: s["queue"]["depth"] == 20, "20 queued")
        _say(f"cloud down; device-001 sends 6..25: queued on disk, depth {status['queue']['depth']}, "
             f"oldest {status['queue']['oldest_age_s']:.1f} s (reconnects back off with jitter)")
        uplink.send_signal(signal.SIGKILL)
        uplink.wait(10)
        uplink = start_uplink()
        status = _wait(lambda s: s["local"]["connected"] and s["queue"]["depth"] == 20, "queue after kill -9")
        _say(f"uplink killed (kill -9) mid-outage and started again: still {status['queue']['depth']} queued")

        cloud.start()
        status = _wait(lambda s: s["queue"]["depth"] == 0, "drained", 30)
        app.wait_for(25)
        unique = list(dict.fromkeys(app.got))
        in_order = unique == [str(n) for n in range(1, 26)]
        _say(f"cloud back: queue drained; the cloud has {len(unique)} of 25, in order: {in_order}, "
             f"duplicates {len(app.got) - len(unique)} (at least once; at most the in-flight window)")
        if not in_order:
            raise SystemExit(f"uplink lost or reordered messages: {app.got}")

        before = count("command.rejected")
        forged = sign_command(new_key(), issuer="alice", device="device-001", body={"op": "open", "valve": 3},
                              ttl=timedelta(seconds=30), now=datetime.now(UTC))
        _cloud_publish(cloud, "sites/plant-a/gateways/gw-01/devices/device-001/cmd/valve", forged)
        event = wait_for_refusal("command.rejected", before, 10.0)
        _say(f"a compromised cloud sends a command 'from alice' it signed itself -> the uplink carries it down, "
             f"the broker refuses it: command.rejected reason={event['reason']} sender={event.get('sender')}")
        _say("`gateway-agent uplink status -c var/demo-uplink.yaml` shows queue depth, oldest age, forwarded, dropped")
        checked = subprocess.run([str(bin_dir / "gateway-agent"), "zones", "check", "-c", "configs/zones.yaml"],
                                 cwd=root, capture_output=True, text=True, check=False)
        _say(f"`gateway-agent zones check -c configs/zones.yaml` (exit {checked.returncode}): "
             f"{checked.stderr.strip().splitlines()[-1]}")
    finally:
        app.close()
        uplink.terminate()
        uplink.wait(15)
        cloud.stop()


def _cloud_publish(cloud: MosquittoCloud, topic: str, payload: bytes) -> None:
    ctx = cloud.pki.client_context("cloud-operator")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cloud-operator", protocol=mqtt.MQTTv311)
    client.tls_set_context(ctx)
    client.connect("127.0.0.1", cloud.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()
