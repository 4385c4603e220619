"""Fail closed on command configuration: command topics in the ACL need a command policy.

Without a ``commands:`` section the broker has no operator keys and so runs no envelope
check: whatever the ACL allows on a command topic would be forwarded unverified. So a
broker whose ACL grants publish on any topic that the command template can name refuses
to start, unless the settings say ``commands: disabled`` explicitly (the operator then
owns that choice, and the broker logs it loudly). Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from edge_core import topics
from edge_core.acl import Policy, Rule
from edge_core.errors import ConfigError

__all__ = ["DEFAULT_COMMAND_TOPIC", "check_command_configuration", "command_grants"]

DEFAULT_COMMAND_TOPIC = "devices/{device}/cmd/#"


def _wild(level: str) -> bool:
    return level == "+" or (level.startswith("{") and level.endswith("}"))


def _overlap(a: Sequence[str], b: Sequence[str]) -> bool:
    """Could one topic match both filters (ACL variables count as ``+``)?"""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x == "#" or y == "#":
            return not (i == 0 and (x.startswith("$") or y.startswith("$")))
        if not (_wild(x) or _wild(y) or x == y):
            return False
    if len(a) == len(b):
        return True
    longer = a if len(a) > len(b) else b
    return longer[min(len(a), len(b))] == "#"  # "a/#" also matches "a"


def command_grants(policy: Policy, command_topic: str = DEFAULT_COMMAND_TOPIC) -> list[Rule]:
    """The ACL's allow-publish rules that reach a command topic."""
    template = tuple(command_topic.split(topics.SEPARATOR))
    return [rule for rule in policy.rules
            if rule.effect == "allow" and "publish" in rule.permissions and _overlap(rule.levels, template)]


def check_command_configuration(policy: Policy | None, *, commands_configured: bool, disabled: bool,
                                command_topic: str = DEFAULT_COMMAND_TOPIC, source: str = "<settings>") -> None:
    """Raise ``ConfigError`` when command topics are open in the ACL but nothing verifies them."""
    if commands_configured or disabled or policy is None:
        return
    grants = command_grants(policy, command_topic)
    if grants:
        first = grants[0]
        raise ConfigError(
            f"the ACL allows publishing on command topics ({command_topic}) in `{first.ref.text}` "
            f"({first.ref.source}:{first.ref.line}), but there is no 'commands:' section, so no command "
            "would be verified",
            source=source,
            hint="add 'commands: {operators: operators.yaml}', or say 'commands: disabled' to forward "
                 "them unverified on purpose",
        )
