"""Uplink settings and topic rules (plain core): mapping, and refusals with file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_core.errors import ConfigError
from edge_core.uplink_rules import UplinkConfig, load_uplink_config, parse_uplink_config

SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "uplink.yaml"


def _with(rules: str) -> bytes:
    """The shipped file with its rules replaced (``forward:`` stays on line 44)."""
    text = SHIPPED.read_text()
    return (text[: text.index("forward:")] + rules).encode()


def _parse(text: bytes) -> UplinkConfig:
    return parse_uplink_config(text, source="uplink.yaml", base_dir=SHIPPED.parent)


def test_shipped_rules_map_telemetry_and_commands() -> None:
    config = load_uplink_config(SHIPPED)
    assert config.cloud_topic("devices/pump-17/telemetry/temp/c") == \
        "sites/plant-a/gateways/gw-01/devices/pump-17/telemetry/temp/c"
    assert config.cloud_topic("devices/pump-17/telemetry") == "sites/plant-a/gateways/gw-01/devices/pump-17/telemetry"
    assert config.cloud_topic("devices/pump-17/cmd/x") is None
    assert config.cloud_topic("$SYS/broker/clients") is None
    assert config.local_topic("sites/plant-a/gateways/gw-01/devices/pump-17/cmd/valve") == "devices/pump-17/cmd/valve"
    assert config.local_topic("sites/plant-a/gateways/gw-02/devices/pump-17/cmd/valve") is None  # not our gateway
    assert config.local_topic("sites/plant-a/gateways/gw-01/devices/pump-17/telemetry/x") is None
    assert config.downlink_filters() == ["sites/plant-a/gateways/gw-01/devices/+/cmd/+"]


def test_first_matching_rule_wins() -> None:
    config = _parse(_with("forward:\n  - from: devices/+/telemetry/debug/#\n    to: debug/{1}/{#}\n"
                          "  - from: devices/+/telemetry/#\n    to: t/{1}/{#}\n"))
    assert config.cloud_topic("devices/a/telemetry/debug/x") == "debug/a/x"
    assert config.cloud_topic("devices/a/telemetry/x") == "t/a/x"


@pytest.mark.parametrize(("rules", "line", "words"), [
    ("forward:\n  - from: devices/+/telemetry/#\n    to: a/{2}\n", 46, "'+' number 2"),
    ("forward:\n  - from: devices/+/telemetry\n    to: a/{#}\n", 46, "ends in '#'"),
    ("forward:\n  - from: devices/#/x\n    to: a\n", 45, "'#' must be the last level"),
    ("forward:\n  - from: devices/+/t\n    to: a/+/b\n", 46, "wildcard"),
    ("forward:\n  - from: devices/+/t\n    to: a/x{1}/b\n", 46, "whole level"),
    ("forward:\n  - from: devices/+/t\n    to: a/{line}\n", 46, "unknown placeholder"),
    ("forward:\n  - from: '#'\n    to: all/{#}\n", 45, "too wide"),
    ("forward:\n  - from: $SYS/#\n    to: sys/{#}\n", 45, "too wide"),
    ("forward:\n  - from: devices/+/t\n    to: a\n    qos: 2\n", 47, "unknown key 'qos'"),
    ("forward: []\n", 44, "at least one rule"),
    ("forward:\n  - from: devices/+/t\n    to: a/{1}\ndownlink:\n  - from: c/+/cmd\n    to: sensors/{1}/set\n", 49,
     "only target a device's command topics"),
    ("forward:\n  - from: devices/+/t\n    to: up/{1}\ndownlink:\n  - from: up/+\n    to: devices/{1}/cmd/x\n", 45,
     "bring back down"),
    ("forward:\n  - from: devices/#\n    to: up/{#}\ndownlink:\n  - from: down/+\n    to: devices/{1}/cmd/x\n", 48,
     "send up again"),
])
def test_bad_rules_are_refused_with_file_and_line(rules: str, line: int, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        _parse(_with(rules))
    assert err.value.source == "uplink.yaml"
    assert err.value.line == line, str(err.value)
    assert words in str(err.value)


@pytest.mark.parametrize(("old", "new", "words"), [
    ("overflow: drop_oldest", "overflow: block", "queue.overflow must be one of"),
    ("bind: 127.0.0.1:9466", "bind: 0.0.0.0:9466", "loopback"),
    ("max_bytes: 268435456", "max_bytes: 0", "must be > 0"),
    ("backoff_max: 60", "backoff_max: 0.5", "backoff_max must be >="),
    ("gateway: gw-01", "gateway: gw/01", "gateway"),
    ("durability: fsync", "durability: maybe", "durability"),
])
def test_bad_settings_are_refused(old: str, new: str, words: str) -> None:
    text = SHIPPED.read_text()
    assert old in text
    with pytest.raises(ConfigError) as err:
        _parse(text.replace(old, new).encode())
    assert words in str(err.value)
    assert err.value.line is not None


def test_cli_check_prints_rules_or_the_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway_agent.cli import main

    assert main(["uplink", "check", "-c", str(SHIPPED)]) == 0
    out = capsys.readouterr().out
    assert "downlink line 53: sites/plant-a/gateways/gw-01/devices/+/cmd/+ -> devices/{1}/cmd/{2}" in out
    bad = tmp_path / "uplink.yaml"
    bad.write_text(SHIPPED.read_text().replace("to: devices/{1}/cmd/{2}", "to: sensors/{1}"))
    assert main(["uplink", "check", "-c", str(bad)]) == 4  # an invalid file: exit 4 (edge_runtime.cli_support)
    assert f"{bad}:54: downlink[0]" in capsys.readouterr().err
