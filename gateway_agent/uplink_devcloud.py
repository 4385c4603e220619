"""A development "cloud": its own CA and a mosquitto configured as a careful operator would.

For the demo, the benchmarks and the tests; never for production. The cloud has a PKI of
its own (the plant's CA is not trusted there, nor the cloud's in the plant), a TLS 1.3 only
listener on loopback, client certificates required, the certificate's CN used as the MQTT
username, and an ACL file that confines the gateway to its own subtree:

- the gateway may write ``sites/<site>/gateways/<gw>/#`` and read only its downlink topics;
- ``cloud-app`` (the platform's consumer) may read ``sites/#``;
- ``cloud-operator`` (an operator's tool in the cloud) may write device command topics.

Persistence is on, so a restarted cloud keeps the sessions and queued messages of its
persistent subscribers, as a production cloud broker does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from edge_core.errors import ConfigError
from edge_core.files import atomic_write_bytes, atomic_write_text
from edge_core.identity import spki_pin
from edge_core.registry import DeviceEntry, Registry, dump_registry, parse_registry
from edge_runtime.tls import client_tls_context
from gateway_agent.pki import FileCA, cert_pem, issue_leaf, key_pem, new_intermediate, new_root

__all__ = ["CloudPki", "MosquittoCloud", "enroll_dev_uplink", "free_port", "init_cloud_pki"]

CLOUD_CLIENTS = ("cloud-app", "cloud-operator")


@dataclass(frozen=True)
class CloudPki:
    dir: Path
    gateway: str

    @property
    def ca(self) -> Path:
        return self.dir / "cloud-ca.pem"

    def cert(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def client_context(self, name: str) -> ssl.SSLContext:
        """TLS 1.3 toward the cloud broker as client ``name`` (its certificate's CN is its username)."""
        return client_tls_context(self.ca, self.cert(name), self.key(name))


def init_cloud_pki(out: Path, *, gateway: str = "gw-01") -> CloudPki:
    """The cloud's CA, the cloud broker's server certificate and the client certificates (CN = username)."""
    now = datetime.now(UTC)
    root = new_root("Dev Cloud Root CA", now)
    issuing = new_intermediate(root, "Dev Cloud Issuing CA", now)
    atomic_write_bytes(out / "cloud-ca.pem", cert_pem(issuing.cert) + cert_pem(root.cert))
    server = issue_leaf(issuing, identity="cloud-broker", now=now, lifetime=timedelta(days=365), uri_prefix=None,
                        server_names=("localhost", "127.0.0.1", "::1"), client=False)
    assert server.key is not None
    atomic_write_bytes(out / "cloud-broker.crt", cert_pem(server.cert) + cert_pem(issuing.cert))
    atomic_write_bytes(out / "cloud-broker.key", key_pem(server.key), mode=0o600)
    for name in (gateway, *CLOUD_CLIENTS):
        leaf = issue_leaf(issuing, identity=name, now=now, lifetime=timedelta(days=90), uri_prefix=None)
        assert leaf.key is not None
        atomic_write_bytes(out / f"{name}.crt", cert_pem(leaf.cert))
        atomic_write_bytes(out / f"{name}.key", key_pem(leaf.key), mode=0o600)
    return CloudPki(out, gateway)


def enroll_dev_uplink(ca: FileCA, registry_path: Path, out_dir: Path, *, identity: str = "gateway-uplink",
                      site: str = "plant-a") -> tuple[Path, Path]:
    """Issue the uplink's local certificate from the dev CA and admit it in the registry with role ``uplink``."""
    issued = issue_leaf(ca.issuing(), identity=identity, now=ca.clock.now(), lifetime=timedelta(days=365))
    assert issued.key is not None
    crt, key = out_dir / f"{identity}.crt", out_dir / f"{identity}.key"
    atomic_write_bytes(key, key_pem(issued.key), mode=0o600)
    atomic_write_bytes(crt, cert_pem(issued.cert))
    registry = parse_registry(registry_path.read_bytes(), source=str(registry_path))
    devices = dict(registry.devices)
    devices[identity] = DeviceEntry(device_id=identity, pins=(spki_pin(issued.cert),), roles=frozenset({"uplink"}),
                                    attributes={"site": site})
    atomic_write_text(registry_path, dump_registry(Registry(devices=devices)))
    return crt, key


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MosquittoCloud:
    """One mosquitto process on a fixed loopback port; ``stop``/``start`` take the cloud down and back."""

    def __init__(self, pki: CloudPki, workdir: Path, *, site: str = "plant-a", port: int | None = None) -> None:
        if shutil.which("mosquitto") is None:
            raise ConfigError("mosquitto is not installed", hint="run scripts/system-packages.sh")
        self.pki = pki
        self.dir = workdir
        self.port = port or free_port()
        self.site = site
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "mosquitto.conf"
        self.acl = self.dir / "mosquitto.acl"
        gw = pki.gateway
        atomic_write_text(self.acl, (
            f"user {gw}\n"
            f"topic write sites/{site}/gateways/{gw}/#\n"
            f"topic read sites/{site}/gateways/{gw}/devices/+/cmd/+\n\n"
            "user cloud-app\ntopic read sites/#\n\n"
            "user cloud-operator\ntopic write sites/+/gateways/+/devices/+/cmd/+\n"
        ))
        atomic_write_text(self.conf, (
            "per_listener_settings false\n"
            "allow_anonymous false\n"
            f"acl_file {self.acl}\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 1000000\n"
            "max_inflight_messages 100\n"
            f"log_dest file {self.dir / 'mosquitto.log'}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            f"listener {self.port} 127.0.0.1\n"
            f"cafile {pki.ca}\n"
            f"certfile {pki.cert('cloud-broker')}\n"
            f"keyfile {pki.key('cloud-broker')}\n"
            "tls_version tlsv1.3\n"
            "require_certificate true\n"
            "use_identity_as_username true\n"
            + ("user root\n" if os.geteuid() == 0 else "")  # as root it drops to 'mosquitto': 0600 keys unreadable
        ))

    def start(self, timeout: float = 10.0) -> MosquittoCloud:
        if self.proc is not None and self.proc.poll() is None:
            return self
        argv = ["mosquitto", "-c", str(self.conf)]  # Debian's mosquitto on PATH, fixed arguments
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ConfigError(f"mosquitto exited with {self.proc.returncode}; see {self.dir / 'mosquitto.log'}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise ConfigError(f"mosquitto did not listen on 127.0.0.1:{self.port} within {timeout} s")

    def stop(self, *, kill: bool = False) -> None:
        """Take the cloud down: SIGTERM (saves its persistence file) or, with ``kill``, SIGKILL."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> MosquittoCloud:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
