"""Which agent services a settings file turns on, beyond CRL sync (built into the daemon)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_core.events import SecurityEvents
from edge_core.revocation import RevocationIndex
from gateway_agent.commanding import BrokerEndpoint
from gateway_agent.crl_sync import load_issuers
from gateway_agent.settings import AgentSettings
from gateway_agent.validation_service import RateLimiter, ValidationService, load_validation_key

if TYPE_CHECKING:
    from gateway_agent.daemon import Agent, AgentService

__all__ = ["ValidationAgentService", "service_factories"]


@dataclass
class ValidationAgentService:
    """Runs the MCU validation service on the agent's own broker session.

    Each run opens a new session (a ``ValidationService`` is single-use), so when the
    broker is not up yet or restarts, the daemon's supervisor simply runs this again.
    """

    make: Callable[[], ValidationService]
    events: SecurityEvents
    name: str = "validation"
    runs: int = field(default=0)

    async def run(self) -> None:
        self.runs += 1
        service = self.make()
        async with service:
            await service.serve()

    def status(self) -> dict[str, Any]:
        events = self.events
        return {"answered": events.count("validation.answered"),
                "refused": events.snapshot().get("validation.refused", {}), "connections": self.runs}


def service_factories(settings: AgentSettings) -> list[Callable[[Agent], Awaitable[AgentService | None]]]:
    factories: list[Callable[[Agent], Awaitable[AgentService | None]]] = []
    if settings.validation is not None:
        factories.append(_validation)
    return factories


async def _validation(agent: Agent) -> AgentService | None:
    s = agent.settings
    assert s.validation is not None and s.broker is not None
    crl = agent.crl
    if crl is None or s.crl is None:
        agent.events.emit("agent.config_warning", "validation_without_crl", level="warning",
                          detail="the validation service answers 'unknown' for everything without a 'crl' section")

    def current_index() -> RevocationIndex:
        return crl.index if crl is not None else RevocationIndex()

    link = s.broker
    signing_key = load_validation_key(s.validation.signing_key)  # fail at start, not on first use
    issuers = load_issuers(s.crl.issuers) if s.crl is not None else []
    limiter = RateLimiter(rate=s.validation.rate_per_minute / 60.0, burst=5)  # shared across reconnects

    def make() -> ValidationService:
        return ValidationService(
            BrokerEndpoint(link.host, link.port, link.ca, link.cert, link.key),
            gateway_id=s.agent_id, signing_key=signing_key, issuers=issuers, current_index=current_index,
            staleness=s.crl.staleness if s.crl is not None else None, clock=agent.clock, events=agent.events,
            limiter=limiter,
        )

    return ValidationAgentService(make, agent.events)
