"""amqtt plugins: thin adapters from amqtt hooks to the plain core.

``enabled_plugins`` lists the plugins a settings file turns on, in the order the broker
consults them (authentication first, then topic ACL, then message guards).
"""

from __future__ import annotations

from typing import Any

from broker_plugins.settings import BrokerSettings

__all__ = ["enabled_plugins"]


def enabled_plugins(settings: BrokerSettings) -> dict[str, dict[str, Any]]:
    plugins: dict[str, dict[str, Any]] = {}
    if settings.revocation is not None:
        plugins["broker_plugins.plugins.revocation_check.RevocationCheckPlugin"] = {}
    if settings.acl_path is not None:
        plugins["broker_plugins.plugins.topic_acl.TopicAclPlugin"] = {}
    if settings.commands is not None:
        plugins["broker_plugins.plugins.command_guard.CommandGuardPlugin"] = {}
    if settings.firmware is not None:
        plugins["broker_plugins.plugins.firmware_guard.FirmwareGuardPlugin"] = {}
    return plugins
