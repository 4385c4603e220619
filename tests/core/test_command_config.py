"""Fail closed on command configuration: open command topics need a command policy."""

from __future__ import annotations

import pytest

from edge_core.acl import parse_policy
from edge_core.command_config import check_command_configuration, command_grants
from edge_core.errors import ConfigError

OPEN = """version: 1
roles:
  gateway:
    - allow publish devices/+/cmd/#
  sensor:
    - allow publish devices/{device}/telemetry/#
    - allow subscribe devices/{device}/cmd/#
"""
CLOSED = """version: 1
roles:
  sensor:
    - allow publish devices/{device}/telemetry/#
    - allow subscribe devices/{device}/cmd/#
    - allow publish devices/{device}/cmdx
"""


def test_acl_with_command_grants_and_no_commands_section_is_refused() -> None:
    policy = parse_policy(OPEN, source="acl.yaml")
    with pytest.raises(ConfigError) as info:
        check_command_configuration(policy, commands_configured=False, disabled=False, source="broker.yaml")
    text = info.value.diagnostics()
    assert "broker.yaml" in text and "allow publish devices/+/cmd/#" in text and "acl.yaml:4" in text
    assert "commands: disabled" in text


@pytest.mark.parametrize(("configured", "disabled"), [(True, False), (False, True)])
def test_a_command_section_or_an_explicit_disabled_passes(configured: bool, disabled: bool) -> None:
    check_command_configuration(parse_policy(OPEN), commands_configured=configured, disabled=disabled)


@pytest.mark.parametrize("rule", ["allow publish #", "allow both devices/#", "allow publish +/+/cmd/reboot",
                                  "allow publish devices/{device}/cmd"])
def test_every_filter_that_reaches_a_command_topic_counts(rule: str) -> None:
    policy = parse_policy(f"version: 1\neveryone:\n  - \"{rule}\"\n")
    assert [r.ref.text for r in command_grants(policy)] == [rule]


def test_subscribe_only_and_neighbouring_topics_do_not_count() -> None:
    assert command_grants(parse_policy(CLOSED)) == []
    check_command_configuration(parse_policy(CLOSED), commands_configured=False, disabled=False)
