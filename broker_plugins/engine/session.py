"""Session state of one client identity: subscriptions, in-flight QoS 1/2, the outbound queue.

A ``Session`` outlives its connections when the client asked for a persistent session
(clean session 0). It holds, per MQTT 3.1.1:

- the granted subscriptions (filter -> QoS);
- outgoing QoS 1/2 messages in flight (sent, not yet acknowledged), keyed by packet id,
  resent with DUP on resume (a QoS 2 message past PUBREC resends its PUBREL);
- incoming QoS 2 packet ids between PUBREC and PUBREL, so a duplicate is not routed twice;
- a bounded outbound queue (messages and bytes) for messages that cannot be written now:
  the client is offline (QoS 1/2 only), its connection is not draining, or the in-flight
  window is full. When the queue is full a queued QoS 0 message is dropped first; a
  QoS 1/2 message is refused only when no QoS 0 message is left to drop.

The session does no I/O and makes no security decision; the engine does both.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from broker_plugins.engine.codec import Will, publish_prefix

if TYPE_CHECKING:
    from broker_plugins.engine.protocol import MqttConnection
    from edge_core.admission import Admitted

__all__ = ["Message", "Outgoing", "Session"]

#: Bytes counted per queued message on top of topic and payload (object and framing overhead).
MESSAGE_OVERHEAD = 96


class Message:
    """One application message as routed: immutable once it left the publisher."""

    __slots__ = ("_qos0", "payload", "qos", "retain", "size", "topic", "topic_bytes")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        self.topic = topic
        self.topic_bytes = topic.encode("utf-8")
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.size = len(self.topic_bytes) + len(payload) + MESSAGE_OVERHEAD
        self._qos0: bytes | None = None

    def qos0_packet(self) -> bytes:
        """The QoS 0 PUBLISH without retain, encoded once and shared by every QoS 0 receiver."""
        packet = self._qos0
        if packet is None:
            packet = self._qos0 = publish_prefix(self.topic_bytes, len(self.payload), 0, False) + self.payload
        return packet


class Outgoing:
    """A message on its way to one session, at the QoS granted to that session."""

    __slots__ = ("message", "packet_id", "qos", "received", "retain", "seq")

    def __init__(self, message: Message, qos: int, *, retain: bool = False, seq: int = 0) -> None:
        self.message = message
        self.qos = qos
        self.retain = retain
        self.packet_id = 0
        self.received = False  # QoS 2: PUBREC seen, PUBREL sent
        self.seq = seq  # key in the persistent store, 0 when not stored


class Session:
    __slots__ = (
        "_next_id",
        "admitted",
        "attributes",
        "clean",
        "client_id",
        "connection",
        "cut_reason",
        "drop_streak",
        "inbound_qos2",
        "inflight",
        "keep_alive",
        "password",
        "progress",
        "queue",
        "queue_bytes",
        "queued_qos0",
        "remote_address",
        "remote_port",
        "ssl_object",
        "stall_timer",
        "stalled",
        "subscriptions",
        "username",
        "waiters",
        "will",
    )

    def __init__(self, client_id: str, *, clean: bool) -> None:
        self.client_id = client_id
        self.clean = clean
        self.admitted: Admitted | None = None
        self.attributes: dict[str, Any] = {}
        self.connection: MqttConnection | None = None
        self.cut_reason: str | None = None
        self.subscriptions: dict[str, int] = {}
        self.inflight: dict[int, Outgoing] = {}
        self.inbound_qos2: set[int] = set()
        self.queue: deque[Outgoing] = deque()
        self.queue_bytes = 0
        self.queued_qos0 = 0
        self.drop_streak = 0
        self.keep_alive = 0
        self.will: Will | None = None
        self._next_id = 0
        # flow control: publishers paused while this session's queue is above half its bound
        self.waiters: list[MqttConnection] = []
        self.progress = 0.0  # loop time the client last took a message or acknowledged one
        self.stall_timer: Any = None
        self.stalled = False  # took nothing for the stall grace: no longer holds publishers back
        # what authentication plugins read at CONNECT (amqtt's session attribute names)
        self.ssl_object: Any = None
        self.remote_address = ""
        self.remote_port = 0
        self.username: str | None = None
        self.password: bytes | None = None

    @property
    def connected(self) -> bool:
        return self.connection is not None

    @property
    def identity(self) -> str | None:
        return self.admitted.identity if self.admitted is not None else None

    def next_packet_id(self) -> int:
        """A packet identifier (1..65535) that no in-flight message uses."""
        for _ in range(65536):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self.inflight:
                return self._next_id
        raise RuntimeError("all 65535 packet identifiers are in flight")

    # -- the bounded queue --------------------------------------------------------------

    def enqueue(self, item: Outgoing, max_messages: int, max_bytes: int) -> Outgoing | None:
        """Queue ``item``; returns what was dropped to make room (maybe ``item`` itself), or None."""
        size = item.message.size
        if len(self.queue) < max_messages and self.queue_bytes + size <= max_bytes:
            self._push(item)
            return None
        if item.qos == 0:
            return item  # the newest QoS 0 gives way: never evict anything for it
        if self.queued_qos0:
            victim = self._drop_oldest_qos0()
            if len(self.queue) < max_messages and self.queue_bytes + size <= max_bytes:
                self._push(item)
                return victim
            return item
        return item

    def _push(self, item: Outgoing) -> None:
        self.queue.append(item)
        self.queue_bytes += item.message.size
        if item.qos == 0:
            self.queued_qos0 += 1

    def _drop_oldest_qos0(self) -> Outgoing:
        for index, candidate in enumerate(self.queue):
            if candidate.qos == 0:
                del self.queue[index]
                self.queue_bytes -= candidate.message.size
                self.queued_qos0 -= 1
                return candidate
        raise AssertionError("queued_qos0 out of step with the queue")

    def pop(self) -> Outgoing:
        item = self.queue.popleft()
        self.queue_bytes -= item.message.size
        if item.qos == 0:
            self.queued_qos0 -= 1
        return item

    def push_front(self, item: Outgoing) -> None:
        self.queue.appendleft(item)
        self.queue_bytes += item.message.size
        if item.qos == 0:
            self.queued_qos0 += 1

    def discard_qos0(self) -> None:
        """The client went away: QoS 0 messages are not kept for an offline session."""
        if self.queued_qos0:
            kept = deque(item for item in self.queue if item.qos)
            self.queue = kept
            self.queue_bytes = sum(item.message.size for item in kept)
            self.queued_qos0 = 0
