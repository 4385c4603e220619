"""Which agent services a settings file turns on, beyond CRL sync (built into the daemon)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from edge_core.revocation import RevocationIndex
from gateway_agent.agent_session import AgentSession, LifecycleRunner
from gateway_agent.commanding import BrokerEndpoint
from gateway_agent.crl_sync import load_issuers
from gateway_agent.settings import AgentSettings
from gateway_agent.validation_service import RateLimiter, ValidationService, load_validation_key

if TYPE_CHECKING:
    from gateway_agent.daemon import Agent, AgentService

__all__ = ["service_factories"]


def service_factories(settings: AgentSettings) -> list[Callable[[Agent], Awaitable[AgentService | None]]]:
    if settings.broker is None or (settings.validation is None and settings.lifecycle is None):
        return []
    return [_session]


async def _session(agent: Agent) -> AgentService | None:
    """One MQTT session for the validation service and the certificate lifecycle."""
    s = agent.settings
    assert s.broker is not None
    link = s.broker
    endpoint = BrokerEndpoint(link.host, link.port, link.ca, link.cert, link.key)
    validator = None
    if s.validation is not None:
        crl = agent.crl
        if crl is None or s.crl is None:
            agent.events.emit("agent.config_warning", "validation_without_crl", level="warning",
                              detail="without a 'crl' section the validation service answers 'unknown' only")

        def current_index() -> RevocationIndex:
            return crl.index if crl is not None else RevocationIndex()

        validator = ValidationService(
            endpoint, gateway_id=s.agent_id, signing_key=load_validation_key(s.validation.signing_key),
            issuers=load_issuers(s.crl.issuers) if s.crl is not None else [], current_index=current_index,
            anchors=load_issuers([link.ca]),
            staleness=s.crl.staleness if s.crl is not None else None, clock=agent.clock, events=agent.events,
            limiter=RateLimiter(rate=s.validation.rate_per_minute / 60.0, burst=5),
        )
    lifecycle = None
    if s.lifecycle is not None:
        crl_state = agent.crl
        lifecycle = LifecycleRunner(s.lifecycle, clock=agent.clock, events=agent.events,
                                    broker_status_url=s.lifecycle.broker_status_url, agent_id=s.agent_id,
                                    current_index=(lambda: crl_state.index) if crl_state is not None else None)
    return AgentSession(endpoint, s.agent_id, agent.events, validator=validator, lifecycle=lifecycle)
