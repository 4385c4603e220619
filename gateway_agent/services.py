"""Which agent services a settings file turns on, beyond CRL sync (built into the daemon)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from gateway_agent.settings import AgentSettings

if TYPE_CHECKING:
    from gateway_agent.daemon import Agent, AgentService

__all__ = ["service_factories"]


def service_factories(settings: AgentSettings) -> list[Callable[[Agent], Awaitable[AgentService | None]]]:
    return []
