"""``gateway-agent command send`` waits for the broker's answer: accepted, rejected, or no answer (forged)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edge_core.clock import ManualClock
from gateway_agent.cli import main
from gateway_agent.pki import key_pem
from tests.broker.acl_fixture import write_acl
from tests.broker.test_commands import COMMAND_ACL
from tests.conftest import StartBroker
from tests.support.broker import BrokerThread
from tests.support.mqtt import Device
from tests.support.pki import DevPki

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(start_broker: StartBroker, tmp_path: Path, pki: DevPki) -> Iterator[BrokerThread]:
    # the CLI signs with the real clock; the broker's replay watermark (start + 30 s skew) must lie behind it
    clock = ManualClock(datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=60))
    broker = start_broker(acl=write_acl(tmp_path, COMMAND_ACL), clock=clock,
                          extra=f"commands:\n  operators: {pki.root / 'operators.yaml'}\n")
    clock.advance(timedelta(seconds=60))
    yield broker


def operator_file(tmp_path: Path, pki: DevPki, broker: BrokerThread, *, signing_key: Path | None = None) -> Path:
    ops = pki.root / "operators"
    path = tmp_path / "operator.yaml"
    path.write_text(
        f"operator: alice\nsigning_key: {signing_key or ops / 'alice-signing.key'}\n"
        f"broker:\n  host: 127.0.0.1\n  port: {broker.port}\n  ca: {pki.chain}\n"
        f"  cert: {ops / 'alice.crt'}\n  key: {ops / 'alice.key'}\nwait: 3\n"
    )
    return path


def send(capsys: pytest.CaptureFixture[str], config: Path, *extra: str) -> tuple[int, dict[str, object]]:
    capsys.readouterr()
    code = main(["command", "send", "-c", str(config), "--device", "pump-17", "--subtopic", "valve", "--json",
                 *extra, '{"op":"open"}'])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_accepted_command_exits_0_and_reaches_the_device(broker: BrokerThread, pki: DevPki, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    pump = Device(broker.port, pki.chain, pki.device("pump-17"), "pump-17")
    assert pump.connect() == 0
    assert pump.subscribe("devices/pump-17/cmd/#") == [1]
    code, result = send(capsys, operator_file(tmp_path, pki, broker))
    assert code == 0, result
    assert result["status"] == "accepted" and result["reason"] is None
    assert pump.expect().topic == "devices/pump-17/cmd/valve"
    assert broker.wait_event("command.accepted")[0]["jti"] == result["jti"]
    pump.close()


def test_forged_command_exits_non_zero(broker: BrokerThread, pki: DevPki, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Signed with a key the broker does not know: no notice (no oracle for a forger), so no answer: exit 5."""
    forger = tmp_path / "forged.key"
    forger.write_bytes(key_pem(ec.generate_private_key(ec.SECP256R1())))
    code, result = send(capsys, operator_file(tmp_path, pki, broker, signing_key=forger), "--wait", "1")
    assert code == 5 and result["status"] == "no_answer"
    assert broker.wait_event("command.rejected", "bad_signature")[0]["sender"] == "alice"
    assert broker.events.count("command.accepted") == 0


def test_rejected_command_exits_1_with_the_reason(broker: BrokerThread, pki: DevPki, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, result = send(capsys, operator_file(tmp_path, pki, broker), "--ttl", "3600")  # policy max is 300 s
    assert code == 1 and result == {**result, "status": "rejected", "reason": "ttl_too_long"}


def test_unusable_operator_file_is_one_line_exit_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "operator.yaml"
    bad.write_text("operator: alice\nsigning_key: k\nbroker: {ca: a, cert: b, key: c}\nttl: 30\nwiat: 3\n")
    assert main(["command", "send", "-c", str(bad), "--device", "pump-17", "{}"]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {bad}:5: operator settings: unknown key 'wiat'")
    assert main(["command", "send", "-c", str(tmp_path / "none.yaml"), "--device", "x", "{}"]) == 4
    assert "Traceback" not in capsys.readouterr().err
