"""A broker whose ACL opens command topics refuses to start without a command policy.

Leaving out the ``commands:`` section used to switch command verification off silently:
anything the ACL allowed on ``devices/+/cmd/#`` was forwarded unverified.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker_plugins.settings import load_settings
from edge_core.errors import ConfigError
from tests.broker.acl_fixture import write_acl
from tests.support.broker import BrokerThread
from tests.support.pki import DevPki

pytestmark = pytest.mark.integration


def _settings(tmp_path: Path, pki: DevPki, registry_file: Path, commands_line: str) -> Path:
    acl = write_acl(tmp_path)
    assert "cmd/#" in acl.read_text()
    text = (f"listener:\n  bind: 127.0.0.1:0\n  certfile: {pki.root / 'broker.crt'}\n"
            f"  keyfile: {pki.root / 'broker.key'}\n  client_ca: {pki.chain}\n"
            f"registry: {registry_file}\nacl: {acl}\n{commands_line}")
    path = tmp_path / "broker-cmd.yaml"
    path.write_text(text)
    return path


def test_missing_commands_section_with_command_grants_refuses_to_start(tmp_path: Path, pki: DevPki,
                                                                       registry_file: Path) -> None:
    broker = BrokerThread(_settings(tmp_path, pki, registry_file, ""))
    with pytest.raises(ConfigError) as info:
        broker.start()
    broker.stop()
    assert "no 'commands:' section" in str(info.value) and "commands: disabled" in info.value.diagnostics()


def test_commands_disabled_starts_and_says_so(tmp_path: Path, pki: DevPki, registry_file: Path) -> None:
    path = _settings(tmp_path, pki, registry_file, "commands: disabled\n")
    assert load_settings(path).commands_disabled
    broker = BrokerThread(path).start()
    try:
        event = broker.wait_event("broker.commands_disabled", "unverified_commands")[0]
        assert "without verification" in event["detail"]
    finally:
        broker.stop()


def test_commands_must_be_a_section_or_disabled(tmp_path: Path, pki: DevPki, registry_file: Path) -> None:
    with pytest.raises(ConfigError, match="'commands' is a section"):
        load_settings(_settings(tmp_path, pki, registry_file, "commands: skip\n"))
