"""Revocation at CONNECT: a revoked certificate, or a stale CRL under ``fail_closed``, is refused.

Runs after ``DeviceAuthPlugin`` (which admitted the identity and pins). The decision is
``RevocationState.verdict`` (``edge_core.admission.session_verdict``), the same one the
broker re-runs for live sessions. Reasons: ``auth.rejected reason=revoked`` (the device's
certificate or a CA on its path), ``reason=crl_stale`` (with the freshness state) and
``reason=path_crl_signer_invalid``. A
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
        now = runtime.clock.now()
        reason = state.verdict(admitted, now)
        if reason is None:
            return True
        session.attributes[REFUSAL] = reason
        detail = state.freshness(cert.issuer, now) if reason == "crl_stale" else None
        runtime.events.emit("auth.rejected", reason, level="warning", device=admitted.identity,
                            serial=f"{cert.serial:x}", issuer=cert.issuer,
                            state=detail.state if detail else None, detail=detail.message if detail else None)
        return False
