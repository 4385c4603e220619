"""Command guard: every message on a command topic must be a valid signed envelope.

Runs after the topic ACL (so a device can never publish commands to another device's
topic) and before the message is broadcast. Refused messages are dropped, counted and
logged as ``command.rejected reason=<code>``. MQTT 3.1.1 cannot refuse a PUBLISH, so
when the signature verified (and only then: a forger gets no oracle) the broker tells
the signing operator on ``operators/<operator>/cmd-rejected`` with the reason. A command
that passes is announced to its operator on ``operators/<operator>/cmd-accepted``, so
silence is never mistaken for success (``gateway-agent command send`` waits for one of them).
Retained messages on command topics are refused outright: a retained command would
replay itself to every future subscriber.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from amqtt.plugins.base import BasePlugin

from broker_plugins.commands import CommandState
from broker_plugins.engine.session import Session
from broker_plugins.runtime import BrokerRuntime, admitted_of
from edge_core.envelope import CommandRefused, acceptance_notice, rejection_notice

__all__ = ["CommandGuardPlugin"]


class CommandGuardPlugin(BasePlugin[Any]):
    #: A will carrying a command is verified once, when it fires: verifying it at CONNECT
    #: would record its nonce as seen and refuse it as ``replayed`` when it fires.
    checks_wills_when_fired = True

    @dataclass
    class Config:
        runtime: Any = None

    async def guard_publish(self, *, session: Session, topic: str, payload: bytes, retain: bool) -> bool:
        runtime = self.config.runtime
        assert isinstance(runtime, BrokerRuntime)
        state = runtime.commands
        if not isinstance(state, CommandState):
            runtime.events.emit("command.rejected", "no_command_policy", level="error", topic=topic)
            return False
        policy = state.config.policy
        device = policy.device_from_topic(topic)
        if device is None:
            return True  # not a command topic
        admitted = admitted_of(session)
        sender = admitted.identity if admitted else None
        if retain:
            runtime.events.emit("command.rejected", "retained_command", level="warning", device=device,
                                sender=sender, topic=topic)
            return False
        now = runtime.clock.now()
        try:
            command = await state.verify(payload, device=device, registry=runtime.registry, now=now)
        except CommandRefused as refused:
            runtime.events.emit("command.rejected", refused.reason, level="warning", device=device,
                                sender=sender, operator=refused.operator, jti=refused.jti, topic=topic,
                                detail=str(refused)[:200])
            notice = rejection_notice(refused, at=now)
            if notice is not None:
                notice_topic, body = notice
                await self.context.broadcast_message(notice_topic, body)
            return False
        runtime.events.emit("command.accepted", device=device, sender=sender, operator=command.issuer,
                            jti=command.jti, expires=command.expires_at.isoformat(), topic=topic,
                            op=json.dumps(dict(command.body))[:80])
        notice_topic, body = acceptance_notice(command, at=now)
        await self.context.broadcast_message(notice_topic, body)
        return True
