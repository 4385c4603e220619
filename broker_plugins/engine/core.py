"""The engine: sessions, routing, retained messages, QoS flows, takeovers and wills.

The engine owns the data plane and makes no security decision itself: every decision is a
call to its ``Hooks`` (the hardened broker's plugin chain), which deny by default. The
order on a connection:

1. CONNECT: an unsupported protocol level gets CONNACK 0x01 and a close
   (``conn.rejected reason=unsupported_protocol``); a zero-length client id with clean
   session is given the certificate identity (without clean session: CONNACK 0x02).
2. ``authenticate`` and, for a will, ``check_will`` run *before* any shared state is
   touched: a refused CONNECT changes no session.
3. Takeover: the live connection of the same client id (same identity, by the binding
   of client id to certificate) is aborted at once, in the same step that attaches the
   new one, so two racing connections serialize and the newest wins; nothing waits.
   The old connection's will does not fire: the device is not offline.
4. The clean flag is taken from this CONNECT: clean 1 discards any stored state.
5. CONNACK 0, then ``session_started`` (the broker announces the connection on
   ``$SYS/broker/clients/<id>/connected``); the certificate test endpoint's connections
   are not sessions and announce nothing.
6. On resume, in-flight QoS 1/2 messages are resent (DUP; PUBREL after PUBREC), then
   the queue drains.

Every delivery (live, retained, queued, will) passes ``may_receive`` when it is written.
A planned shutdown (``withhold_wills``, SIGTERM) fires no will: the devices did not go away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from broker_plugins.engine import codec
from broker_plugins.engine.codec import Connect, PacketId, Publish, Subscribe, Unsubscribe, Will
from broker_plugins.engine.eager import run_eagerly
from broker_plugins.engine.protocol import MqttConnection
from broker_plugins.engine.router import RetainedTrie, SubscriptionTrie
from broker_plugins.engine.session import Message, Outgoing, Session
from broker_plugins.engine.store import SessionStore, StoredMessage
from broker_plugins.settings import Limits
from edge_core.events import SecurityEvents

__all__ = ["Engine", "Hooks"]

CONNACK_ACCEPTED = 0
CONNACK_BAD_PROTOCOL = 1
CONNACK_IDENTIFIER_REJECTED = 2
CONNACK_NOT_AUTHORIZED = 5
SUBACK_FAILURE = 0x80
_RETAINED_BATCH = 256
#: Seconds a live receiver that takes nothing may hold back its publishers (at most write_timeout / 2).
STALL_GRACE = 5.0


class Hooks(Protocol):
    """The security decisions the engine asks for; each must deny on any doubt."""

    async def authenticate(self, session: Session) -> bool: ...
    def refusal_code(self, session: Session) -> int: ...
    def identity_for_empty_client_id(self, session: Session) -> str | None: ...
    def check_publish(self, session: Session, topic: str, payload: bytes,
                      retain: bool) -> bool | Coroutine[Any, Any, bool]:
        """The decision, or a coroutine when a hook must await (message guards)."""
    async def check_will(self, session: Session, will: Will, *, firing: bool) -> bool: ...
    async def check_subscribe(self, session: Session, topic_filter: str) -> bool: ...
    def may_receive(self, session: Session, topic: str) -> bool: ...
    def connection_tested(self, session: Session, passed: bool) -> None: ...
    def session_started(self, session: Session, present: bool) -> None:
        """A session was admitted (CONNACK 0 written) on a device listener, never the test endpoint."""


class _Retained:
    __slots__ = ("message", "owner")

    def __init__(self, message: Message, owner: str) -> None:
        self.message = message
        self.owner = owner


class Engine:
    def __init__(self, *, limits: Limits, hooks: Hooks, store: SessionStore, events: SecurityEvents) -> None:
        self.limits = limits
        self.hooks = hooks
        self.store = store
        self.events = events
        self.sessions: dict[str, Session] = {}
        self.subscriptions: SubscriptionTrie[Session] = SubscriptionTrie()
        self.retained: RetainedTrie[_Retained] = RetainedTrie()
        self._retained_per_owner: dict[str, int] = {}
        self._connections: set[MqttConnection] = set()
        self._seq = 0
        self.messages_in = 0
        self.messages_out = 0
        self.messages_dropped = 0  # every delivery a full queue refused (the events about it are rate-limited)
        self.stopping = False  # a planned shutdown began: wills are withheld

    # -- start-up and shutdown -------------------------------------------------------

    def restore(self) -> None:
        """Load persistent sessions, their queues and the retained messages from the store."""
        state = self.store.load()
        self._seq = state.last_seq
        for topic, (payload, qos, owner) in state.retained.items():
            self.retained.set(topic, _Retained(Message(topic, payload, qos, True), owner))
            self._retained_per_owner[owner] = self._retained_per_owner.get(owner, 0) + 1
        for client_id, stored in state.sessions.items():
            session = Session(client_id, clean=False)
            self.sessions[client_id] = session
            for topic_filter, qos in stored.subscriptions.items():
                session.subscriptions[topic_filter] = qos
                self.subscriptions.add(topic_filter, session, qos)
            for row in stored.messages:
                item = Outgoing(Message(row.topic, row.payload, row.qos), row.qos, retain=row.retain, seq=row.seq)
                if row.packet_id and row.packet_id not in session.inflight:
                    item.packet_id, item.received = row.packet_id, row.received
                    session.inflight[row.packet_id] = item
                else:
                    session._push(item)
        if state.sessions or state.retained:
            self.events.emit("store.restored", sessions=len(state.sessions), retained=len(state.retained),
                             queued=sum(len(s.messages) for s in state.sessions.values()))

    def protocol_factory(self, *, listener: str = "default", test_only: bool = False) -> Callable[[], MqttConnection]:
        def make() -> MqttConnection:
            return MqttConnection(self, listener=listener, test_only=test_only)
        return make

    def connection_opened(self, conn: MqttConnection) -> None:
        self._connections.add(conn)

    def abort_all(self) -> None:
        for connection in list(self._connections):
            connection.abort()

    def withhold_wills(self) -> int:
        """A planned shutdown begins: no will fires from here on; returns how many were withheld.

        A will says that a device went away; a broker that stops on purpose has not seen that,
        so closing every connection must not announce the whole fleet offline. Wills are not
        kept in the store (a device gives its will again in its next CONNECT), so a withheld
        will is dropped. One ``will.suppressed reason=broker_shutdown`` event gives the count.
        """
        if self.stopping:
            return 0
        self.stopping = True
        withheld = 0
        for session in self.sessions.values():
            if session.connection is not None and session.will is not None:
                session.will = None
                withheld += 1
        self.events.emit("will.suppressed", "broker_shutdown", withheld=withheld)
        return withheld

    def status(self) -> dict[str, object]:
        return {"subscriptions": len(self.subscriptions), "retained": len(self.retained),
                "persistent": sum(1 for s in self.sessions.values() if not s.clean),
                "queued": sum(len(s.queue) for s in self.sessions.values()),
                "messages_in": self.messages_in, "messages_out": self.messages_out,
                "messages_dropped": self.messages_dropped,
                "store": "sqlite" if self.store.durable else "memory"}

    def connected_sessions(self) -> list[Session]:
        return [s for s in self.sessions.values() if s.connection is not None]

    # -- CONNECT ----------------------------------------------------------------------

    def connect(self, conn: MqttConnection, packet: Connect) -> None:
        if packet.protocol != "MQTT" or packet.level != 4:
            self.events.emit("conn.rejected", "unsupported_protocol", level="warning", peer=conn.peer,
                             protocol=packet.protocol[:16], protocol_level=packet.level)
            if packet.protocol in ("MQTT", "MQIsdp"):
                conn.write(codec.encode_connack(False, CONNACK_BAD_PROTOCOL))
            conn.close()
            return
        candidate = Session(packet.client_id, clean=packet.clean)
        candidate.ssl_object = conn.ssl_object
        candidate.remote_address, _, port = conn.peer.rpartition(":")
        candidate.remote_port = int(port) if port.isdigit() else 0
        candidate.username, candidate.password = packet.username, packet.password
        candidate.will = packet.will
        candidate.keep_alive = packet.keep_alive
        if not packet.client_id:
            identity = self.hooks.identity_for_empty_client_id(candidate) if packet.clean else None
            if identity is None:
                self.events.emit("conn.rejected", "empty_client_id", level="warning", peer=conn.peer,
                                 clean_session=packet.clean)
                conn.write(codec.encode_connack(False, CONNACK_IDENTIFIER_REJECTED))
                conn.close()
                return
            candidate.client_id = identity
        self._drive(conn, self._admit(conn, candidate), self._admitted)

    async def _admit(self, conn: MqttConnection, candidate: Session) -> tuple[Session, bool]:
        if not await self.hooks.authenticate(candidate):
            return candidate, False
        will = candidate.will
        if will is not None and not conn.test_only and not await self.hooks.check_will(candidate, will, firing=False):
            candidate.attributes.setdefault("edge.refusal", "will_denied")
            return candidate, False
        return candidate, True

    def _admitted(self, conn: MqttConnection, outcome: tuple[Session, bool]) -> None:
        candidate, ok = outcome
        if conn.test_only:
            self.hooks.connection_tested(candidate, ok)
            code = CONNACK_ACCEPTED if ok else self.hooks.refusal_code(candidate)
            conn.write(codec.encode_connack(False, code))
            conn.close()
            return
        if not ok:
            conn.write(codec.encode_connack(False, self.hooks.refusal_code(candidate)))
            conn.close()
            return
        if conn.closing:
            conn.done_reading = True
            return  # the client left while we decided: change nothing
        client_id = candidate.client_id
        existing = self.sessions.get(client_id)
        if existing is not None and existing.connection is not None:
            self._take_over(existing, "session_resumed" if not candidate.clean else "clean_session")
        present = False
        if existing is not None and not candidate.clean and not existing.clean:
            session = existing
            session.admitted = candidate.admitted
            session.attributes = candidate.attributes
            session.will, session.keep_alive = candidate.will, candidate.keep_alive
            session.ssl_object, session.username = candidate.ssl_object, candidate.username
            session.remote_address, session.remote_port = candidate.remote_address, candidate.remote_port
            session.cut_reason = None
            present = True
        else:
            if existing is not None:
                self._forget(existing)
            session = candidate
            self.sessions[client_id] = session
            if not session.clean:
                self.store.save_session(client_id, {})
        session.connection = conn
        conn.session = session
        conn.write(codec.encode_connack(present, CONNACK_ACCEPTED))
        conn.start_keepalive(session.keep_alive)
        self.hooks.session_started(session, present)
        if present:
            self._resend_inflight(session)
            self.drain(session)

    def _take_over(self, existing: Session, why: str) -> None:
        old = existing.connection
        assert old is not None
        self.events.emit("session.takeover", why, device=existing.client_id, peer=old.peer)
        old.taken_over = True
        existing.connection = None
        old.session = None
        if existing.waiters:
            self._release(existing)
        if existing.will is not None:
            self.events.emit("will.suppressed", "takeover", device=existing.client_id, topic=existing.will.topic)
            existing.will = None
        old.abort()

    def _drive(self, conn: MqttConnection, coro: Coroutine[Any, Any, Any],
               then: Callable[[MqttConnection, Any], None]) -> None:
        """Run a hook coroutine for ``conn``; if it suspends, later packets wait until it is done."""
        suspended: list[bool] = []

        def done(result: Any, error: BaseException | None) -> None:
            if error is not None:
                self.events.emit("engine.hook_error", type(error).__name__, level="error", peer=conn.peer,
                                 detail=repr(error)[:200])
                conn.abort()
                return
            then(conn, result)
            if suspended:
                conn.unblock()

        if not run_eagerly(coro, done):
            suspended.append(True)
            conn.block()

    # -- session end ------------------------------------------------------------------

    def connection_closed(self, conn: MqttConnection) -> None:
        self._connections.discard(conn)
        session = conn.session
        if session is None or session.connection is not conn:
            return
        session.connection = None
        conn.session = None
        if session.waiters:
            self._release(session)
        will = session.will
        session.will = None
        if will is not None and not conn.graceful:
            if self.stopping:  # admitted while the shutdown began
                self.events.emit("will.suppressed", "broker_shutdown", device=session.client_id, topic=will.topic,
                                 withheld=1)
            elif session.cut_reason is not None:
                self.events.emit("will.suppressed", session.cut_reason, device=session.client_id, topic=will.topic)
            else:
                self._fire_will(session, will)
        if session.clean:
            self._forget(session)
        else:
            session.discard_qos0()

    def _fire_will(self, session: Session, will: Will) -> None:
        def done(ok: bool | None, error: BaseException | None) -> None:
            if ok is True and error is None:
                self.route(session, Message(will.topic, will.payload, will.qos, will.retain))
        run_eagerly(self.hooks.check_will(session, will, firing=True), done)

    def _forget(self, session: Session) -> None:
        """Drop a session: its subscriptions, queue and stored state."""
        for topic_filter in session.subscriptions:
            self.subscriptions.remove(topic_filter, session)
        session.subscriptions = {}
        session.queue.clear()
        session.queue_bytes = session.queued_qos0 = 0
        session.inflight.clear()
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        if not session.clean:
            self.store.delete_session(session.client_id)

    def cut_session(self, client_id: str, reason: str, *, drop_state: bool = True, **fields: Any) -> bool:
        """Disconnect a live session now (no will); optionally forget its persistent state."""
        session = self.sessions.get(client_id)
        if session is None:
            return False
        conn = session.connection
        session.cut_reason = reason
        if conn is not None:
            self.events.emit("session.cut", reason, level="warning", device=client_id, **fields)
            self.connection_closed(conn)  # detach now: the will is suppressed by cut_reason
            conn.abort()
        if drop_state and self.sessions.get(client_id) is session:
            self._forget(session)
        return conn is not None

    # -- PUBLISH from a client --------------------------------------------------------

    def publish(self, conn: MqttConnection, session: Session, packet: Publish) -> None:
        self.messages_in += 1
        if packet.qos == 2 and packet.packet_id in session.inbound_qos2:
            conn.write(codec.encode_packet_id(codec.PUBREC, packet.packet_id))  # duplicate: not routed again
            return
        refusal = self._topic_limit(packet.topic)
        if refusal is not None:
            self.events.emit("publish.rejected", refusal, level="warning", device=session.client_id,
                             topic=packet.topic[:200], topic_bytes=len(packet.topic))
            self._acknowledge(conn, session, packet)
            return
        decision = self.hooks.check_publish(session, packet.topic, packet.payload, packet.retain)
        if decision is True or decision is False:
            if decision:
                self.route(session, Message(packet.topic, packet.payload, packet.qos, packet.retain), source=conn)
            if packet.qos:
                self._acknowledge(conn, session, packet)
            return
        finished: list[bool] = []

        def done(ok: bool | None, error: BaseException | None) -> None:
            if error is not None:
                self.events.emit("publish.rejected", "plugin_error", level="error", device=session.client_id,
                                 topic=packet.topic[:200], error=repr(error)[:200])
            elif ok is True:
                self.route(session, Message(packet.topic, packet.payload, packet.qos, packet.retain), source=conn)
            if not conn.closing:
                self._acknowledge(conn, session, packet)
            if finished:  # it had suspended: let the connection read on
                conn.unblock()
            finished.append(True)

        if not run_eagerly(decision, done):
            finished.append(False)
            conn.block()

    def _acknowledge(self, conn: MqttConnection, session: Session, packet: Publish) -> None:
        if packet.qos == 0:
            return
        wait = self.store.durable and self.store.pending()
        if packet.qos == 1:
            conn.ack(codec.encode_packet_id(codec.PUBACK, packet.packet_id), wait_for_store=wait)
        else:
            session.inbound_qos2.add(packet.packet_id)
            conn.ack(codec.encode_packet_id(codec.PUBREC, packet.packet_id), wait_for_store=wait)

    def _topic_limit(self, topic: str) -> str | None:
        limits = self.limits
        if len(topic) > limits.max_topic_length or (
            not topic.isascii() and len(topic.encode("utf-8")) > limits.max_topic_length
        ):
            return "topic_too_long"
        if topic.count("/") >= limits.max_topic_levels:
            return "topic_too_deep"
        return None

    # -- routing ----------------------------------------------------------------------

    def route(self, publisher: Session | None, message: Message, *, source: MqttConnection | None = None) -> None:
        """Deliver ``message`` to every matching subscription (and keep it if retained).

        ``source`` is the publisher's connection: while a live receiver's queue is above
        half its bound, the publisher stops being read (TCP pushes back) instead of the
        queue overflowing; a receiver that makes no progress for ``write_timeout`` is cut.
        """
        if message.retain:
            owner = publisher.client_id if publisher is not None else "$broker"
            if not self._retain(owner, message):
                return
        targets = self.subscriptions.match(message.topic)
        if not targets:
            return
        qos = message.qos
        for session, granted in targets.items():
            self.deliver(session, message, granted if granted < qos else qos, retain=False, source=source)

    def _retain(self, owner: str, message: Message) -> bool:
        topic = message.topic
        if not message.payload:
            previous = self.retained.delete(topic)
            if previous is not None:
                self._retained_per_owner[previous.owner] -= 1
                self.store.delete_retained(topic)
            return True
        previous = self.retained.get(topic)
        if previous is None:
            limits = self.limits
            if len(self.retained) >= limits.max_retained_total:
                self.events.emit("publish.rejected", "retained_limit", level="warning", device=owner, topic=topic,
                                 limit=limits.max_retained_total, scope="total")
                return False
            if self._retained_per_owner.get(owner, 0) >= limits.max_retained_per_device:
                self.events.emit("publish.rejected", "retained_limit", level="warning", device=owner, topic=topic,
                                 limit=limits.max_retained_per_device, scope="device")
                return False
        else:
            self._retained_per_owner[previous.owner] -= 1
        self.retained.set(topic, _Retained(message, owner))
        self._retained_per_owner[owner] = self._retained_per_owner.get(owner, 0) + 1
        self.store.set_retained(topic, message.payload, message.qos, owner)
        return True

    def deliver(self, session: Session, message: Message, qos: int, *, retain: bool,
                source: MqttConnection | None = None) -> None:
        conn = session.connection
        if conn is None:
            if qos == 0 or session.clean:
                return  # QoS 0 is not kept for offline sessions
            item = Outgoing(message, qos, retain=retain)
            self._store_item(session, item)
            self._enqueue(session, item)
            return
        if not self.hooks.may_receive(session, message.topic):
            return
        if qos == 0:
            if conn.writable and not session.queue:
                self.messages_out += 1
                if retain:
                    conn.write(codec.encode_publish(message.topic, message.payload, 0, True))
                else:
                    conn.write(message.qos0_packet())
                return
            self._enqueue(session, Outgoing(message, 0, retain=retain), source)
            return
        item = Outgoing(message, qos, retain=retain)
        if not session.clean:
            self._store_item(session, item)
        if conn.writable and not session.queue and len(session.inflight) < self.limits.max_inflight:
            self._send(session, conn, item)
        else:
            self._enqueue(session, item, source)

    def _store_item(self, session: Session, item: Outgoing) -> None:
        self._seq += 1
        item.seq = self._seq
        message = item.message
        self.store.add_message(session.client_id, StoredMessage(item.seq, message.topic, message.payload, item.qos,
                                                                item.retain))

    def _enqueue(self, session: Session, item: Outgoing, source: MqttConnection | None = None) -> None:
        limits = self.limits
        dropped = session.enqueue(item, limits.outbound_queue_messages, limits.outbound_queue_bytes)
        if source is not None and session.connection is not None and (
            len(session.queue) * 2 >= limits.outbound_queue_messages
            or session.queue_bytes * 2 >= limits.outbound_queue_bytes
        ):
            self._throttle(source, session)
        if dropped is None:
            session.drop_streak = 0
            return
        self.messages_dropped += 1
        if dropped.seq:
            self.store.remove_message(session.client_id, dropped.seq)
        session.drop_streak += 1
        streak = session.drop_streak
        if streak == 1 or streak % 1000 == 0:  # one event per overflow episode, then every 1000 drops
            self.events.emit("delivery.dropped", "queue_full", level="warning", device=session.client_id,
                             topic=dropped.message.topic[:200], qos=dropped.qos, dropped=streak,
                             queued=len(session.queue), queued_bytes=session.queue_bytes,
                             limit_messages=limits.outbound_queue_messages, limit_bytes=limits.outbound_queue_bytes)

    def _send(self, session: Session, conn: MqttConnection, item: Outgoing) -> None:
        packet_id = session.next_packet_id()
        item.packet_id = packet_id
        session.inflight[packet_id] = item
        if item.seq and item.qos == 2:
            self.store.mark_inflight(session.client_id, item.seq, packet_id, False)
        self.messages_out += 1
        message = item.message
        conn.write(codec.publish_prefix(message.topic_bytes, len(message.payload), item.qos, item.retain)
                   + packet_id.to_bytes(2, "big") + message.payload)

    def drain(self, session: Session) -> None:
        """Write queued messages while the connection takes them and the in-flight window allows."""
        conn = session.connection
        if conn is None:
            return
        max_inflight = self.limits.max_inflight
        taken = False
        while session.queue and conn.writable:
            item = session.queue[0]
            if item.qos and len(session.inflight) >= max_inflight:
                break
            session.pop()
            taken = True
            if not self.hooks.may_receive(session, item.message.topic):
                if item.seq:
                    self.store.remove_message(session.client_id, item.seq)
                continue
            if item.qos:
                self._send(session, conn, item)
            else:
                message = item.message
                self.messages_out += 1
                conn.write(codec.encode_publish(message.topic, message.payload, 0, item.retain)
                           if item.retain else message.qos0_packet())
        if not session.queue:
            session.drop_streak = 0
        if taken:
            self._progressed(session)
        self._release_if_drained(session)

    # -- flow control -----------------------------------------------------------------

    def _throttle(self, source: MqttConnection, session: Session) -> None:
        if source.throttled_by is not None or source.done_reading or source.session is session or session.stalled:
            return
        source.throttled_by = session
        session.waiters.append(source)
        source.block()
        if session.stall_timer is None:
            loop = asyncio.get_running_loop()
            session.progress = loop.time()
            session.stall_timer = loop.call_later(self._stall_grace, self._check_stall, session)

    @property
    def _stall_grace(self) -> float:
        """How long a receiver that takes nothing may hold its publishers back."""
        return min(STALL_GRACE, self.limits.write_timeout / 2)

    def _progressed(self, session: Session) -> None:
        session.stalled = False
        if session.waiters:
            session.progress = asyncio.get_running_loop().time()

    def _release_if_drained(self, session: Session) -> None:
        if session.waiters and len(session.queue) * 4 <= self.limits.outbound_queue_messages \
                and session.queue_bytes * 4 <= self.limits.outbound_queue_bytes:
            self._release(session)

    def _release(self, session: Session) -> None:
        waiters, session.waiters = session.waiters, []
        if session.stall_timer is not None:
            session.stall_timer.cancel()
            session.stall_timer = None
        for conn in waiters:
            conn.throttled_by = None
            conn.unblock()

    def _check_stall(self, session: Session) -> None:
        session.stall_timer = None
        if not session.waiters:
            return
        loop = asyncio.get_running_loop()
        idle = loop.time() - session.progress
        grace = self._stall_grace
        if idle < grace:
            session.stall_timer = loop.call_later(grace - idle, self._check_stall, session)
            return
        # it takes nothing: its publishers go on and its bounded queue overflows (queue_full);
        # a transport that stays full past write_timeout is cut by the connection
        session.stalled = True
        self._release(session)

    def _resend_inflight(self, session: Session) -> None:
        conn = session.connection
        assert conn is not None
        for packet_id, item in list(session.inflight.items()):
            if item.received:
                conn.write(codec.encode_packet_id(codec.PUBREL, packet_id))
                continue
            if not self.hooks.may_receive(session, item.message.topic):
                del session.inflight[packet_id]
                if item.seq:
                    self.store.remove_message(session.client_id, item.seq)
                continue
            message = item.message
            conn.write(codec.publish_prefix(message.topic_bytes, len(message.payload), item.qos, item.retain,
                                            dup=True) + packet_id.to_bytes(2, "big") + message.payload)

    # -- acknowledgements from the client ---------------------------------------------

    def packet_id(self, conn: MqttConnection, session: Session, packet: PacketId) -> None:
        kind, packet_id = packet.kind, packet.packet_id
        if kind == codec.PUBREL:
            session.inbound_qos2.discard(packet_id)
            conn.write(codec.encode_packet_id(codec.PUBCOMP, packet_id))  # also for an unknown id
            return
        item = session.inflight.get(packet_id)
        if item is None:
            return  # a late or duplicate acknowledgement
        if kind == codec.PUBREC:
            if item.qos == 2:
                item.received = True
                if item.seq:
                    self.store.mark_inflight(session.client_id, item.seq, packet_id, True)
                conn.write(codec.encode_packet_id(codec.PUBREL, packet_id))
            return
        if (kind == codec.PUBACK and item.qos == 1) or (kind == codec.PUBCOMP and item.qos == 2):
            del session.inflight[packet_id]
            self._progressed(session)
            if item.seq:
                self.store.remove_message(session.client_id, item.seq)
            if session.queue or session.waiters:
                self.drain(session)

    # -- SUBSCRIBE / UNSUBSCRIBE ------------------------------------------------------

    def subscribe(self, conn: MqttConnection, session: Session, packet: Subscribe) -> None:
        self._drive(conn, self._decide_subscriptions(session, packet),
                    lambda c, granted: self._subscribed(c, session, packet, granted))

    async def _decide_subscriptions(self, session: Session, packet: Subscribe) -> list[int]:
        codes: list[int] = []
        limits = self.limits
        for topic_filter, qos in packet.requests:
            # a malformed filter never gets here: the codec closes the connection (invalid_topic_filter)
            reason = None
            if len(topic_filter.encode("utf-8")) > limits.max_topic_length:
                reason = "topic_too_long"
            elif topic_filter.count("/") >= limits.max_topic_levels:
                reason = "topic_too_deep"
            elif (topic_filter not in session.subscriptions
                  and len(session.subscriptions) >= limits.max_subscriptions_per_client):
                reason = "too_many_subscriptions"
            if reason is not None:
                self.events.emit("subscribe.rejected", reason, level="warning", device=session.client_id,
                                 filter=topic_filter[:200], limit=_limit_of(limits, reason))
                codes.append(SUBACK_FAILURE)
                continue
            try:
                allowed = await self.hooks.check_subscribe(session, topic_filter)
            except Exception as exc:  # noqa: BLE001 - fail closed: any hook error denies
                self.events.emit("subscribe.rejected", "plugin_error", level="error", device=session.client_id,
                                 filter=topic_filter[:200], error=repr(exc)[:200])
                allowed = False
            if not allowed:
                codes.append(SUBACK_FAILURE)
                continue
            codes.append(qos)
            session.subscriptions[topic_filter] = qos
            self.subscriptions.add(topic_filter, session, qos)
        return codes

    def _subscribed(self, conn: MqttConnection, session: Session, packet: Subscribe, codes: list[int]) -> None:
        if not session.clean and any(code != SUBACK_FAILURE for code in codes):
            self.store.save_session(session.client_id, session.subscriptions)
        conn.write(codec.encode_suback(packet.packet_id, codes))
        for (topic_filter, _), code in zip(packet.requests, codes, strict=True):
            if code != SUBACK_FAILURE:
                self._send_retained(session, topic_filter, code)

    def _send_retained(self, session: Session, topic_filter: str, qos: int) -> None:
        """Retained messages for a new subscription, in batches that yield to the loop.

        The match walks the retained trie lazily and tolerates changes between batches (a
        retained message set or cleared meanwhile): every one stored throughout is sent. The
        delivery stops, with ``retained.abandoned``, when the connection that subscribed is
        gone (``connection_closed``), the filter was unsubscribed (``unsubscribed``) or the
        client took nothing for ``write_timeout`` (``write_timeout``).
        """
        matches = self.retained.match(topic_filter)
        subscriber = session.connection
        loop = asyncio.get_running_loop()
        write_timeout = self.limits.write_timeout
        sent = 0
        deadline = time.monotonic() + write_timeout

        def abandon(reason: str) -> None:
            if next(matches, None) is None:
                return  # nothing was left to send
            self.events.emit("retained.abandoned", reason, level="warning" if reason == "write_timeout" else "info",
                             device=session.client_id, filter=topic_filter[:200], sent=sent)

        def batch() -> None:
            nonlocal sent, deadline
            conn = session.connection
            if conn is None or conn is not subscriber or conn.closing:
                abandon("connection_closed")
                return
            if topic_filter not in session.subscriptions:
                abandon("unsubscribed")
                return
            if not conn.writable or len(session.queue) >= self.limits.outbound_queue_messages // 2:
                if time.monotonic() < deadline:
                    loop.call_later(0.01, batch)  # let the client read; the write timeout cuts a stalled one
                else:
                    abandon("write_timeout")
                return
            deadline = time.monotonic() + write_timeout  # it took the last batch: measured from here
            for count, (_, retained) in enumerate(matches):
                message = retained.message
                self.deliver(session, message, min(qos, message.qos), retain=True)
                sent += 1
                if count + 1 >= _RETAINED_BATCH:
                    loop.call_soon(batch)
                    return
        batch()

    def unsubscribe(self, conn: MqttConnection, session: Session, packet: Unsubscribe) -> None:
        changed = False
        for topic_filter in packet.filters:
            if session.subscriptions.pop(topic_filter, None) is not None:
                self.subscriptions.remove(topic_filter, session)
                changed = True
        if changed and not session.clean:
            self.store.save_session(session.client_id, session.subscriptions)
        conn.write(codec.encode_packet_id(codec.UNSUBACK, packet.packet_id))

    def remove_subscriptions(self, predicate: Callable[[Session, str], bool], reason: str) -> int:
        """Drop subscriptions for which ``predicate(session, filter)`` is true; log each."""
        removed = 0
        for session in list(self.sessions.values()):
            gone = [f for f in session.subscriptions if predicate(session, f)]
            for topic_filter in gone:
                del session.subscriptions[topic_filter]
                self.subscriptions.remove(topic_filter, session)
                removed += 1
                self.events.emit("subscription.removed", reason, level="warning", device=session.client_id,
                                 filter=topic_filter)
            if gone and not session.clean:
                self.store.save_session(session.client_id, session.subscriptions)
        return removed


def _limit_of(limits: Limits, reason: str) -> int:
    return {"topic_too_long": limits.max_topic_length, "topic_too_deep": limits.max_topic_levels,
            "too_many_subscriptions": limits.max_subscriptions_per_client}[reason]
