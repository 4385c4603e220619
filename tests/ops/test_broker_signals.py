"""``edge-broker run`` as a process under an init system: SIGHUP reloads while it serves, SIGTERM
stops it cleanly, every stderr line is JSON; and the reload of each concern in-process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from broker_plugins.signals import reload_all
from gateway_agent.pki import cert_pem, issue_leaf, key_pem
from tests.broker.acl_fixture import TEST_ACL, replace_file, write_acl
from tests.support.broker import BrokerThread, write_settings
from tests.support.mqtt import Device
from tests.support.pki import DevPki

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def json_lines(path: Path) -> list[dict[str, object]]:
    """Every line of the log, parsed; a line that is not one JSON object fails the test."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            value = json.loads(line)
        except ValueError:
            pytest.fail(f"{path.name}:{number} is not JSON: {line!r}")
        assert isinstance(value, dict), line
        out.append(value)
    return out


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


class BrokerProcess:
    def __init__(self, tmp_path: Path, pki: DevPki, registry: Path) -> None:
        # systemd's side of Type=notify: a datagram socket the broker reports to
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp_path / "notify"))
        self.notify.settimeout(10)
        self.port, self.status_port = free_port(), free_port()
        self.acl = write_acl(tmp_path)
        self.server_dir = tmp_path / "tls"
        self.server_dir.mkdir()
        for name in ("broker.crt", "broker.key"):
            shutil.copy(pki.root / name, self.server_dir / name)
        self.config = tmp_path / "broker.yaml"
        self.config.write_text(
            f"listener:\n  bind: 127.0.0.1:{self.port}\n  certfile: tls/broker.crt\n  keyfile: tls/broker.key\n"
            f"  client_ca: {pki.chain}\nregistry: {registry}\nacl: acl.yaml\nreload_interval: 2.0\n"
            f"status:\n  bind: 127.0.0.1:{self.status_port}\nevent_loop: asyncio\ncommands: disabled\n"
        )
        self.log = tmp_path / "broker.log"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen([str(BIN / "edge-broker"), "run", "-c", str(self.config)],
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})

    def notified(self) -> dict[str, str]:
        data = self.notify.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.status_port}{path}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url("/readyz"), timeout=2) as response:  # noqa: S310
                return bool(response.status == 200)
        except (OSError, urllib.error.HTTPError):
            return False

    def events(self, name: str) -> list[dict[str, object]]:
        return [e for e in json_lines(self.log) if e.get("event") == name]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)


@pytest.fixture
def broker_process(tmp_path: Path, pki: DevPki, registry_file: Path) -> Iterator[BrokerProcess]:
    broker = BrokerProcess(tmp_path, pki, registry_file)
    try:
        wait_for(lambda: broker.ready() or broker.proc.poll() is not None, 20)
        assert broker.proc.poll() is None, f"the broker exited: {broker.log.read_text()[-2000:]}"
        yield broker
    finally:
        if broker.proc.poll() is None:
            broker.proc.kill()
            broker.proc.wait(10)
        broker.notify.close()


def test_sighup_reloads_while_serving_and_sigterm_stops_cleanly(broker_process: BrokerProcess,
                                                                 pki: DevPki) -> None:
    b = broker_process
    ready = b.notified()
    assert ready["READY"] == "1" and ready["STATUS"] == f"serving on 127.0.0.1:{b.port}"
    pump = Device(b.port, pki.chain, pki.device("pump-17"), "pump-17")
    assert pump.connect() == 0
    assert pump.subscribe("devices/+/status") == [1]
    # the poller would only look in 2 s: it is SIGHUP that makes the broker read the new ACL now
    replace_file(b.acl, TEST_ACL + "  pump-18:\n    - allow publish sites/plant-a/hello\n")
    b.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: b.events("broker.reloaded"), 10)
    assert "RELOADING" in b.notified()
    assert b.notified() == {"READY": "1", "STATUS": f"serving on 127.0.0.1:{b.port}; reloaded"}
    (reloaded,) = b.events("broker.reloaded")
    assert reloaded["changed"] == ["acl"] and reloaded["failed"] == []
    assert set(reloaded["unchanged"]) == {"registry", "tls"}  # type: ignore[arg-type]
    # still serving: the live session kept its subscription, a new connection works
    sensor = Device(b.port, pki.chain, pki.device("sensor-02"), "sensor-02")
    assert sensor.connect() == 0
    sensor.publish("devices/sensor-02/status", b"up")
    assert pump.expect().payload == b"up"
    assert b.ready()
    # a broken file on HUP: refused with file and line, the last good ACL stays, still serving
    replace_file(b.acl, "version: 1\neveryone:\n  - allow publish a/#/b\n")
    b.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(b.events("broker.reloaded")) == 2, 10)
    assert b.events("broker.reloaded")[1]["failed"] == ["acl"]
    assert "RELOADING" in b.notified()
    assert b.notified()["STATUS"].endswith("reloaded, kept last good acl")
    failed = b.events("config.reload_failed")[0]
    assert failed["file"] == str(b.acl) and failed["line"] == 3
    sensor.publish("devices/sensor-02/status", b"still")
    assert pump.expect().payload == b"still"
    pump.close()
    sensor.close()
    assert b.stop() == 0
    assert b.notified()["STOPPING"] == "1"
    lines = json_lines(b.log)  # every stderr line is JSON, from start to stop
    assert any(e["event"] == "broker.started" for e in lines)
    assert any(e["event"] == "broker.stopping" and e.get("reason") == "SIGTERM" for e in lines)


def test_unknown_signals_keep_their_default(broker_process: BrokerProcess) -> None:
    broker_process.proc.send_signal(signal.SIGUSR1)  # default action: terminate
    assert broker_process.proc.wait(10) == -signal.SIGUSR1


def test_port_in_use_is_one_line_and_exit_5(broker_process: BrokerProcess, tmp_path: Path) -> None:
    second = subprocess.run([str(BIN / "edge-broker"), "run", "-c", str(broker_process.config)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode == 5, second.stderr
    (line,) = [json.loads(line) for line in second.stderr.splitlines() if "cli.error" in line]
    assert "address already in use" in str(line["detail"]).lower() and line["exit"] == 5 and line["hint"]
    assert "Traceback" not in second.stderr
    for text in second.stderr.splitlines():
        json.loads(text)


def new_server_cert(pki: DevPki, directory: Path) -> int:
    issued = issue_leaf(pki.ca.issuing(), identity="broker", now=datetime.now(UTC), uri_prefix=None,
                        server_names=("localhost", "127.0.0.1"), client=False)
    assert issued.key is not None
    tmp = directory / "new.crt"
    tmp.write_bytes(cert_pem(issued.cert) + (pki.root / "issuing-ca.crt").read_bytes())
    (directory / "new.key").write_bytes(key_pem(issued.key))
    return int(issued.cert.serial_number)


def served_serial(port: int, pki: DevPki) -> int:
    import ssl

    ctx = ssl.create_default_context(cafile=str(pki.chain))
    cred = pki.device("pump-17")
    ctx.load_cert_chain(cred.cert, cred.key)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


@pytest.fixture
def own_tls_broker(tmp_path: Path, pki: DevPki, registry_file: Path) -> Iterator[BrokerThread]:
    """A broker whose server certificate and key are this test's copies (it overwrites them)."""
    tls = tmp_path / "tls"
    tls.mkdir()
    for name in ("broker.crt", "broker.key"):
        shutil.copy(pki.root / name, tls / name)
    settings = write_settings(tmp_path, registry=registry_file, chain=pki.chain, server_dir=tls,
                              acl=write_acl(tmp_path))
    # the pollers look only every 2 s, so what reloads below is reload_all, not a poll that got there first
    settings.write_text(settings.read_text().replace("reload_interval: 0.1", "reload_interval: 2.0"))
    with BrokerThread(settings) as broker:
        yield broker


def test_reload_all_swaps_each_concern_and_the_tls_certificate(own_tls_broker: BrokerThread, pki: DevPki,
                                                               tmp_path: Path) -> None:
    broker = own_tls_broker
    assert broker.edge is not None
    pump = Device(broker.port, pki.chain, pki.device("pump-17"), "pump-17")
    assert pump.connect() == 0
    before = served_serial(broker.port, pki)
    assert broker.call(lambda: reload_all(broker.edge)) == {  # type: ignore[arg-type]
        "registry": "unchanged", "acl": "unchanged", "tls": "unchanged"}
    # new server certificate and key, written over the configured files (the test's own copies)
    listener = broker.edge.settings.listener
    serial = new_server_cert(pki, tmp_path)
    saved_key = listener.keyfile.read_bytes()
    shutil.copy(tmp_path / "new.crt", listener.certfile)
    shutil.copy(tmp_path / "new.key", listener.keyfile)
    outcome = broker.call(lambda: reload_all(broker.edge))  # type: ignore[arg-type]
    assert outcome["tls"] == "changed"
    assert served_serial(broker.port, pki) == serial != before
    assert not pump.disconnected.is_set()  # live connections keep theirs
    # a key that does not match its certificate is refused; the served pair stays
    listener.keyfile.write_bytes(saved_key)
    outcome = broker.call(lambda: reload_all(broker.edge))  # type: ignore[arg-type]
    assert outcome["tls"] == "failed"
    assert broker.wait_event("config.reload_failed", "invalid")[0]["file"] == str(listener.certfile)
    assert served_serial(broker.port, pki) == serial
    # the registry and ACL reload through the same entry point
    replace_file(tmp_path / "acl.yaml", TEST_ACL + "  pump-18:\n    - allow publish x/y\n")
    assert broker.call(lambda: reload_all(broker.edge))["acl"] == "changed"  # type: ignore[arg-type]
    pump.close()
