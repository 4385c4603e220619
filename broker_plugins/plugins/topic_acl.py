"""Topic ACL: every publish, subscribe and delivery decided by the compiled policy.

The broker consults this plugin on PUBLISH (``publish``), SUBSCRIBE (``subscribe``: a
filter is granted when an allow rule covers it and no deny rule covers all of it) and on
every delivery: live messages, retained messages, will messages and messages queued for
an offline session (``receive``), which is where deny rules that overlap a granted
wildcard subscription withhold their messages. Denials are ``acl.denied`` events with
the decision's reason and the rule that decided. Allowed publishes are not logged one by
one: they are the hot path, and the subscription grant that enables them is logged.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action as AmqttAction
from amqtt.plugins.base import BaseTopicPlugin

from broker_plugins.engine.session import Session
from broker_plugins.runtime import BrokerRuntime, admitted_of
from edge_core.acl import Action, Policy

__all__ = ["TopicAclPlugin"]

_ACTIONS: dict[str, Action] = {
    AmqttAction.PUBLISH.value: "publish",
    AmqttAction.SUBSCRIBE.value: "subscribe",
    AmqttAction.RECEIVE.value: "receive",
}

#: Bytes counted per cached decision on top of identity and topic (tuple, set slot, strings).
_ENTRY_OVERHEAD = 160


class TopicAclPlugin(BaseTopicPlugin):
    """Decides through ``Policy.check``; remembers *allowed* publish/receive decisions.

    A decision depends only on the policy, the registry entry and (identity, action, topic),
    and a reload swaps the policy or registry object, which empties the cache. Denials are
    never cached: each one is decided again and logged. The cache is bounded in bytes
    (``limits.decision_cache_bytes``), oldest entries evicted first, so long topics cannot
    grow it past the bound.
    """

    @dataclass
    class Config:
        runtime: Any = None

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._allowed: OrderedDict[tuple[str, str, str], int] = OrderedDict()
        self._cached_bytes = 0
        self._cached_for: tuple[object, object] | None = None

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: AmqttAction | None = None
    ) -> bool:
        if topic is None or action is None:
            return self.decide(session, None, "publish")
        return self.decide(session, topic, _ACTIONS[action.value if isinstance(action, AmqttAction) else str(action)])

    def decide(self, session: Session | None, topic: str | None, kind: Action) -> bool:
        """The decision, synchronously (the engine calls this for every delivery)."""
        runtime = self.config.runtime
        assert isinstance(runtime, BrokerRuntime)
        admitted = admitted_of(session)
        if admitted is None or topic is None:
            runtime.events.emit("acl.denied", "unauthenticated", level="warning",
                                client_id=session.client_id if session else None, topic=topic)
            return False
        policy = runtime.acl
        if not isinstance(policy, Policy):
            runtime.events.emit("acl.denied", "no_policy", level="error", device=admitted.identity, topic=topic)
            return False
        key = (admitted.identity, kind, topic)
        cached_for = self._cached_for
        if cached_for is not None and cached_for[0] is policy and cached_for[1] is runtime.registry:
            if key in self._allowed:
                return True
        else:
            self._allowed = OrderedDict()
            self._cached_bytes = 0
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
                self._remember(key, runtime.settings.limits.decision_cache_bytes)
            return True
        runtime.events.emit(
            "acl.denied", decision.reason, level="warning", device=admitted.identity, action=kind, topic=topic,
            rule=str(decision.rule) if decision.rule else None,
        )
        return False

    def _remember(self, key: tuple[str, str, str], budget: int) -> None:
        size = len(key[0]) + len(key[2]) + _ENTRY_OVERHEAD
        if size > budget:
            return
        allowed = self._allowed
        while allowed and self._cached_bytes + size > budget:
            _, evicted = allowed.popitem(last=False)
            self._cached_bytes -= evicted
        allowed[key] = size
        self._cached_bytes += size

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes
