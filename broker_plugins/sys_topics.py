"""``$SYS/broker/...`` topics, in mosquitto's names, for the counters that have one there.

Published every ``interval`` seconds (mosquitto's ``sys_interval``), every value each
time, as live messages: not retained, so they take nothing from the retained-message
limits that bound the devices (a subscriber has every value within one interval).
They reach nobody by default: a `$` topic is matched only by an ACL rule whose first
level is that `$` level (``allow subscribe $SYS/broker/clients/#``), and every delivery
passes the broker's receive check like any other message.

The publisher knows nothing of the broker: it takes a snapshot function and a publish
callback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Final

from broker_plugins.engine.session import Message
from edge_runtime.version import version

if TYPE_CHECKING:
    from broker_plugins.server import EdgeBroker

__all__ = ["SYS_TOPICS", "SysTopicPublisher", "broker_snapshot", "publish_via"]

#: our value -> mosquitto's topic
SYS_TOPICS: Final[Mapping[str, str]] = {
    "version": "$SYS/broker/version",
    "uptime": "$SYS/broker/uptime",
    "clients_connected": "$SYS/broker/clients/connected",
    "clients_disconnected": "$SYS/broker/clients/disconnected",
    "clients_total": "$SYS/broker/clients/total",
    "clients_maximum": "$SYS/broker/clients/maximum",
    "messages_stored": "$SYS/broker/store/messages/count",
    "messages_received": "$SYS/broker/messages/received",
    "messages_sent": "$SYS/broker/messages/sent",
    "retained_count": "$SYS/broker/retained messages/count",
    "subscriptions_count": "$SYS/broker/subscriptions/count",
    "publish_dropped": "$SYS/broker/publish/messages/dropped",
}


class SysTopicPublisher:
    def __init__(self, snapshot: Callable[[], Mapping[str, int | str]],
                 publish: Callable[[str, bytes], Awaitable[None]], *, interval: float = 10.0) -> None:
        self._snapshot = snapshot
        self._publish = publish
        self.interval = interval
        self._maximum = 0

    async def publish_once(self) -> list[str]:
        """Publish every value; returns the topics published."""
        values = dict(self._snapshot())
        connected = values.get("clients_connected")
        if isinstance(connected, int):
            self._maximum = max(self._maximum, connected)
            values["clients_maximum"] = self._maximum
        sent = []
        for key, topic in SYS_TOPICS.items():
            if key not in values:
                continue
            await self._publish(topic, str(values[key]).encode())
            sent.append(topic)
        return sent

    async def run(self) -> None:
        while True:
            await self.publish_once()
            await asyncio.sleep(self.interval)


def broker_snapshot(edge: EdgeBroker) -> dict[str, int | str]:
    if edge.broker is None:
        return {}
    engine = edge.broker.engine
    sessions = list(engine.sessions.values())
    connected = sum(1 for s in sessions if s.connection is not None)
    return {
        "version": f"edge-broker {version()}",
        "uptime": f"{int(edge.uptime())} seconds",
        "clients_connected": connected,
        "clients_disconnected": len(sessions) - connected,
        "clients_total": len(sessions),
        "messages_stored": sum(len(s.queue) for s in sessions),
        "messages_received": engine.messages_in,
        "messages_sent": engine.messages_out,
        "retained_count": len(engine.retained),
        "subscriptions_count": sum(len(s.subscriptions) for s in sessions),
        "publish_dropped": engine.messages_dropped,
    }


def publish_via(edge: EdgeBroker) -> Callable[[str, bytes], Awaitable[None]]:
    async def publish(topic: str, payload: bytes) -> None:
        if edge.broker is not None:
            edge.broker.engine.route(None, Message(topic, payload, 0, False))

    return publish
