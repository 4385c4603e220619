"""docs/quickstart-devices.md works as written: its mosquitto, paho and aiomqtt snippets, run against
a real broker (only the file names, device id and port are swapped for the test PKI's)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.broker.acl_fixture import TEST_ACL, write_acl
from tests.conftest import StartBroker
from tests.support.broker import BrokerThread
from tests.support.mqtt import Device
from tests.support.pki import DevPki

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "quickstart-devices.md"
DEVICE = "sensor-02"  # a sensor in the test PKI and tests/broker/acl_fixture.py


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


def adapt(text: str, pki: DevPki, port: int) -> str:
    cred = pki.device(DEVICE)
    return (text.replace("certs-dev/ca-chain.pem", str(pki.chain))
            .replace("certs-dev/devices/device-001.crt", str(cred.cert))
            .replace("certs-dev/devices/device-001.key", str(cred.key))
            .replace("device-001", DEVICE).replace("8883", str(port)))


def commands(pki: DevPki, port: int) -> dict[str, list[str]]:
    (shell,) = blocks("sh")
    out = {}
    for command in adapt(shell, pki, port).replace("\\\n", " ").split("\n"):
        if command.strip():
            argv = shlex.split(command)
            out[argv[0]] = argv
    return out


@pytest.fixture
def broker(start_broker: StartBroker, tmp_path: Path) -> BrokerThread:
    # pump-17 may send sensor-02 a message, so the subscriber has something to receive
    return start_broker(acl=write_acl(tmp_path, TEST_ACL.replace(
        "  pump-17:\n", f"  pump-17:\n    - allow publish devices/{DEVICE}/cmd/#\n")))


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="Debian's mosquitto-clients")
def test_mosquitto_snippets(broker: BrokerThread, pki: DevPki) -> None:
    argv = commands(pki, broker.port)
    pub = subprocess.run(argv["mosquitto_pub"], capture_output=True, text=True, timeout=20, check=False)
    assert pub.returncode == 0, pub.stderr
    broker.wait_event("auth.accepted")
    # one client per identity at a time (a second connection takes the session over), so the sub comes after
    sub = subprocess.Popen([*argv["mosquitto_sub"], "-C", "1", "-W", "10"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    broker.wait_event("subscription.granted")
    sender = Device(broker.port, pki.chain, pki.device("pump-17"), "pump-17")  # another identity
    assert sender.connect() == 0
    sender.publish(f"devices/{DEVICE}/cmd/x", b"go")
    out, err = sub.communicate(timeout=15)
    sender.close()
    assert out.strip() == f"devices/{DEVICE}/cmd/x go", err
    # what the doc says happens with a client id that is not the certificate's identity
    pub = argv["mosquitto_pub"]
    other = [*pub[:pub.index("-i") + 1], "not-this-device", *pub[pub.index("-i") + 2:]]
    refused = subprocess.run(other, capture_output=True, text=True, timeout=20, check=False)
    assert refused.returncode != 0 and "identifier rejected" in refused.stderr.lower()
    broker.wait_event("auth.rejected", "client_id_mismatch")


@pytest.mark.parametrize("index", [0, 1], ids=["paho", "aiomqtt"])
def test_python_snippets(broker: BrokerThread, pki: DevPki, index: int) -> None:
    code = adapt(blocks("python")[index], pki, broker.port)
    before = len(broker.events.recent("auth.accepted"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 5
    while len(broker.events.recent("auth.accepted")) <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert broker.events.recent("auth.accepted")[-1]["device"] == DEVICE
    assert broker.events.count("acl.denied") == 0
