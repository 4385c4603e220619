"""Revocation at CONNECT: a revoked certificate, or a stale CRL under ``fail_closed``, is refused.

Runs after ``DeviceAuthPlugin`` (which admitted the identity and pins). Reasons:
``auth.rejected reason=revoked`` and ``reason=crl_stale`` (with the freshness state). A
stale CRL under ``fail_open_alarm`` admits the device; the alarm is raised by the broker's
periodic freshness check, not once per connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amqtt.plugins.base import BaseAuthPlugin

from broker_plugins.engine.session import Session
from broker_plugins.revocation import RevocationState
from broker_plugins.runtime import REFUSAL, BrokerRuntime, admitted_of

__all__ = ["RevocationCheckPlugin"]


class RevocationCheckPlugin(BaseAuthPlugin):
    @dataclass
    class Config:
        runtime: Any = None

    async def authenticate(self, *, session: Session) -> bool | None:
        runtime = self.config.runtime
        assert isinstance(runtime, BrokerRuntime)
        state = runtime.revocation
        admitted = admitted_of(session)
        if not isinstance(state, RevocationState) or admitted is None:
            session.attributes[REFUSAL] = "revocation_unavailable"
            runtime.events.emit("auth.rejected", "revocation_unavailable", level="error",
                                client_id=session.client_id)
            return False
        cert = admitted.cert
        if state.index.is_revoked(cert.issuer, cert.serial):
            session.attributes[REFUSAL] = "revoked"
            runtime.events.emit("auth.rejected", "revoked", level="warning", device=admitted.identity,
                                serial=f"{cert.serial:x}", issuer=cert.issuer)
            return False
        freshness = state.freshness(cert.issuer, runtime.clock.now())
        if not freshness.admit:
            session.attributes[REFUSAL] = "crl_stale"
            runtime.events.emit("auth.rejected", "crl_stale", level="warning", device=admitted.identity,
                                state=freshness.state, detail=freshness.message)
            return False
        return True
