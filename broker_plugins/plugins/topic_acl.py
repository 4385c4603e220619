"""Topic ACL: every publish, subscribe and delivery decided by the compiled policy.

The broker consults this plugin on PUBLISH (``publish``), SUBSCRIBE (``subscribe``: a
filter is granted only if everything it can match may be received) and on every
delivery: live messages, retained messages, will messages and messages queued for an
offline session (``receive``). Denials are ``acl.denied`` events with the decision's
reason and the rule that decided. Allowed publishes are not logged one by one: they
are the hot path, and the subscription grant that enables them is logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action as AmqttAction
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from broker_plugins.runtime import BrokerRuntime, admitted_of
from edge_core.acl import Action, Policy

__all__ = ["TopicAclPlugin"]

_ACTIONS: dict[str, Action] = {
    AmqttAction.PUBLISH.value: "publish",
    AmqttAction.SUBSCRIBE.value: "subscribe",
    AmqttAction.RECEIVE.value: "receive",
}


_CACHE_LIMIT = 65536


class TopicAclPlugin(BaseTopicPlugin):
    """Decides through ``Policy.check``; remembers *allowed* publish/receive decisions.

    A decision depends only on the policy, the registry entry and (identity, action, topic),
    and a reload swaps the policy or registry object, which empties the cache. Denials are
    never cached: each one is decided again and logged. The cache is bounded.
    """

    @dataclass
    class Config:
        runtime: Any = None

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._allowed: set[tuple[str, str, str]] = set()
        self._cached_for: tuple[object, object] | None = None

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: AmqttAction | None = None
    ) -> bool:
        runtime = self.config.runtime
        assert isinstance(runtime, BrokerRuntime)
        admitted = admitted_of(session)
        if admitted is None or topic is None or action is None:
            runtime.events.emit("acl.denied", "unauthenticated", level="warning",
                                client_id=session.client_id if session else None, topic=topic)
            return False
        policy = runtime.acl
        if not isinstance(policy, Policy):
            runtime.events.emit("acl.denied", "no_policy", level="error", device=admitted.identity, topic=topic)
            return False
        kind = _ACTIONS[action.value if isinstance(action, AmqttAction) else str(action)]
        key = (admitted.identity, kind, topic)
        if self._cached_for is not None and self._cached_for[0] is policy and self._cached_for[1] is runtime.registry:
            if key in self._allowed:
                return True
        else:
            self._allowed = set()
            self._cached_for = (policy, runtime.registry)
        subject = runtime.subject_of(admitted.identity)
        if subject is None:
            runtime.events.emit("acl.denied", "unknown_device", level="warning", device=admitted.identity,
                                topic=topic, action=kind)
            return False
        decision = policy.check(subject, kind, topic)
        if decision.allowed:
            if kind == "subscribe":
                runtime.events.emit("subscription.granted", device=admitted.identity, filter=topic,
                                    rule=str(decision.rule) if decision.rule else None)
            else:
                if len(self._allowed) >= _CACHE_LIMIT:
                    self._allowed = set()
                self._allowed.add(key)
            return True
        runtime.events.emit(
            "acl.denied", decision.reason, level="warning", device=admitted.identity, action=kind, topic=topic,
            rule=str(decision.rule) if decision.rule else None,
        )
        return False

