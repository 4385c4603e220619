"""``HardenedBroker``: amqtt 0.12.1 with its security gaps closed.

amqtt's broker path has gaps a security product cannot ship with. Each override
below names the gap it closes; ``tests/broker/test_amqtt_overrides.py`` pins the amqtt
internals we rely on so that an upgrade which moves them fails loudly.

1. ``_initialize_client_session``: amqtt deletes (clean session) or rewrites
   (persistent session: will, username, ...) the stored session of the client id
   *before* it authenticates. We read CONNECT under a timeout, authenticate first, and
   only then touch shared state. A refused CONNECT gets its CONNACK and changes nothing.
2. ``_handle_client_session``: amqtt takes over the live connection of the client id
   and replaces the session entry even when authentication failed. We only get here
   after authentication; because the client id is bound to the certificate identity,
   only the same identity can take over or resume a session, and the old connection
   is fully closed before the new one starts.
3. ``_authenticate`` / ``_topic_filtering``: amqtt gathers plugin results as tasks and
   treats "no plugin answered" inconsistently. We call plugins in order, deny on the
   first False, and turn any exception into a deny plus a ``*.plugin_error`` event.
4. ``_handle_disconnect``: amqtt publishes will messages without any publish check. We
   run the same checks as a normal PUBLISH (and refuse a CONNECT whose will is denied).
5. ``_publish_retained_messages_for_subscription`` / ``_publish_session_retained_messages``
   and the resume path: amqtt sends retained and queued messages without the receive
   check, and on resume even sends retained messages matching *other clients'*
   filters. We check every delivery and only use the session's own subscriptions.
6. ``_retain_broadcast_message``: the offline queue of a persistent session is bounded.
7. ``_handle_message_delivery``: after the topic check, message guards (signed command
   envelopes) see the payload; anything they refuse is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, ListenerConfig
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import ApplicationMessage, Session
from transitions import MachineError

from broker_plugins.framing import FramingViolation
from broker_plugins.runtime import ADMITTED, CUT, REFUSAL, BrokerRuntime, admitted_of
from edge_core.topics import topic_filter_problem

__all__ = ["HardenedBroker", "MessageGuard"]

LISTENER_NAME = "default"
_TAKEOVER_WAIT = 5.0


class MessageGuard(Protocol):
    """A plugin that inspects PUBLISH payloads (for example signed command envelopes)."""

    async def guard_publish(self, *, session: Session, topic: str, payload: bytes, retain: bool) -> bool: ...


@dataclass
class _Connection:
    handler: BrokerProtocolHandler
    done: asyncio.Event


def _device(session: Session | None) -> str | None:
    admitted = admitted_of(session)
    return admitted.identity if admitted else (session.client_id if session else None)


async def _close_quietly(writer: WriterAdapter) -> None:
    """Close a connection we are refusing; the peer may already be gone."""
    with contextlib.suppress(ConnectionError, OSError):
        await writer.close()


class HardenedBroker(Broker):
    """amqtt ``Broker`` with authentication first, checked deliveries and fail-closed hooks."""

    def __init__(self, runtime: BrokerRuntime, plugins: dict[str, dict[str, Any]]) -> None:
        self.runtime = runtime
        config: dict[str, Any] = {
            "listeners": {LISTENER_NAME: {"type": "external", "bind": f"{runtime.settings.listener.host}:"
                                                                      f"{runtime.settings.listener.port}"}},
            "plugins": {path: {"runtime": runtime, **cfg} for path, cfg in plugins.items()},
        }
        super().__init__(config)
        self._connections: dict[str, _Connection] = {}
        self._message_guards: list[MessageGuard] = [
            p for p in self.plugins_manager.plugins if callable(getattr(p, "guard_publish", None))
        ]

    # -- 3. fail-closed plugin dispatch -------------------------------------------------

    async def _authenticate(self, session: Session, _: ListenerConfig | None) -> bool:
        plugins = list(self.plugins_manager._auth_plugins)
        if not plugins:
            self.runtime.events.emit("auth.rejected", "no_auth_plugin", level="error", client_id=session.client_id)
            return False
        for plugin in plugins:
            try:
                result = await plugin.authenticate(session=session)
            except Exception as exc:  # noqa: BLE001 - fail closed: any plugin error denies
                session.attributes[REFUSAL] = "plugin_error"
                self.runtime.events.emit(
                    "auth.rejected", "plugin_error", level="error", plugin=type(plugin).__name__,
                    client_id=session.client_id, error=repr(exc),
                )
                return False
            if result is not True:
                # False refuses; None ("cannot decide") also refuses: deny by default.
                session.attributes.setdefault(REFUSAL, "not_authorized")
                return False
        return True

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        plugins = self.plugins_manager._topic_plugins
        if not plugins:
            self.runtime.events.emit("acl.denied", "no_acl_plugin", level="error", device=_device(session),
                                     topic=topic, action=str(action))
            return False
        for plugin in plugins:
            try:
                result = await plugin.topic_filtering(session=session, topic=topic, action=action)
            except Exception as exc:  # noqa: BLE001 - fail closed: any plugin error denies
                self.runtime.events.emit(
                    "acl.denied", "plugin_error", level="error", plugin=type(plugin).__name__,
                    device=_device(session), topic=topic, action=str(action), error=repr(exc),
                )
                return False
            if result is not True:
                return False
        return True

    async def _guard_message(self, session: Session, topic: str, payload: bytes, retain: bool,
                             *, will_at_connect: bool = False) -> bool:
        for guard in self._message_guards:
            if will_at_connect and getattr(guard, "checks_wills_when_fired", False):
                continue  # checked once, when the will fires: checking now would spend its nonce
            try:
                ok = await guard.guard_publish(session=session, topic=topic, payload=payload, retain=retain)
            except Exception as exc:  # noqa: BLE001 - fail closed: any plugin error denies
                self.runtime.events.emit(
                    "publish.rejected", "plugin_error", level="error", plugin=type(guard).__name__,
                    device=_device(session), topic=topic, error=repr(exc),
                )
                return False
            if ok is not True:
                return False
        return True

    async def check_publish(self, session: Session, topic: str, payload: bytes, retain: bool,
                            *, will_at_connect: bool = False) -> bool:
        """The full publish check: topic ACL then message guards. Used for PUBLISH and wills."""
        if not await self._topic_filtering(session, topic, Action.PUBLISH):
            return False
        return await self._guard_message(session, topic, payload, retain, will_at_connect=will_at_connect)

    # -- 1. authenticate before any shared state changes --------------------------------

    async def _initialize_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        remote_address: str,
        remote_port: int,
    ) -> tuple[BrokerProtocolHandler, Session]:
        events = self.runtime.events
        peer = f"{remote_address}:{remote_port}"
        try:
            handler, incoming = await asyncio.wait_for(
                BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager),
                timeout=self.runtime.settings.limits.connect_timeout,
            )
        except TimeoutError as exc:
            events.emit("conn.rejected", "connect_timeout", level="warning", peer=peer)
            await _close_quietly(writer)
            raise AMQTTError("no CONNECT within the connect timeout") from exc
        except FramingViolation as exc:
            # the guard reported the event already
            await _close_quietly(writer)
            raise AMQTTError(str(exc)) from exc
        except MQTTError as exc:
            events.emit("conn.rejected", "malformed_connect", level="warning", peer=peer, detail=str(exc))
            await _close_quietly(writer)
            raise
        except NoDataError as exc:
            events.emit("conn.rejected", "no_connect", level="info", peer=peer)
            await _close_quietly(writer)
            raise AMQTTError(str(exc)) from exc
        except Exception as exc:
            # anything else while parsing CONNECT (e.g. undecodable strings): refuse, never crash the listener
            events.emit("conn.rejected", "malformed_connect", level="warning", peer=peer, detail=repr(exc))
            await _close_quietly(writer)
            raise AMQTTError(repr(exc)) from exc

        if not await self._authenticate(incoming, None):
            await self._refuse_connect(incoming, writer)
            raise AMQTTError(f"CONNECT from {peer} refused: {incoming.attributes.get(REFUSAL)}")

        if incoming.will_flag and not await self._will_allowed(incoming, firing=False):
            incoming.attributes[REFUSAL] = "will_denied"
            await self._refuse_connect(incoming, writer)
            raise AMQTTError(f"CONNECT from {peer} refused: will message not allowed")

        client_id = incoming.client_id
        assert client_id  # admission bound it to the certificate identity
        existing = self._sessions.get(client_id, (None, None))[0]
        if incoming.clean_session or existing is None:
            if existing is not None:
                await self._end_previous_connection(client_id, "clean_session")
                await self._delete_session(client_id)
            incoming.parent = 0
            return handler, incoming

        # Resume the persistent session of the same identity with the new connection's parameters.
        await self._end_previous_connection(client_id, "session_resumed")
        for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                     "username", "password", "ssl_object", "remote_address", "remote_port"):
            setattr(existing, name, getattr(incoming, name))
        existing.attributes[ADMITTED] = incoming.attributes[ADMITTED]
        existing.attributes.pop(CUT, None)
        existing.parent = 1
        return handler, existing

    async def _refuse_connect(self, session: Session, writer: WriterAdapter) -> None:
        reason = session.attributes.get(REFUSAL, "not_authorized")
        code = IDENTIFIER_REJECTED if reason == "client_id_mismatch" else NOT_AUTHORIZED
        try:
            await ConnackPacket.build(0, code).to_stream(writer)
        except (ConnectionError, OSError):
            pass
        finally:
            await _close_quietly(writer)

    async def _will_allowed(self, session: Session, *, firing: bool) -> bool:
        topic = session.will_topic or ""
        if not topic or "#" in topic or "+" in topic or topic.startswith("$"):
            self.runtime.events.emit("will.rejected", "invalid_topic", level="warning",
                                     device=_device(session), topic=topic)
            return False
        if not await self.check_publish(session, topic, bytes(session.will_message or b""),
                                        bool(session.will_retain), will_at_connect=not firing):
            self.runtime.events.emit("will.rejected", "publish_denied", level="warning",
                                     device=_device(session), topic=topic)
            return False
        return True

    async def _end_previous_connection(self, client_id: str, why: str) -> None:
        """Close the live connection of ``client_id`` (same identity) and wait until it is gone."""
        previous = self._connections.get(client_id)
        if previous is None:
            return
        self.runtime.events.emit("session.takeover", why, device=client_id)
        await previous.handler.handle_connection_closed()
        try:
            await asyncio.wait_for(previous.done.wait(), _TAKEOVER_WAIT)
        except TimeoutError:
            self.runtime.events.emit("session.takeover_stuck", why, level="error", device=client_id)
            await previous.handler.stop()

    # -- 2. session start only after authentication --------------------------------------

    async def _handle_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Any,
        listener_name: str,
    ) -> None:
        client_id = client_session.client_id
        if not client_id or admitted_of(client_session) is None:
            # unreachable by construction; refuse rather than trust it
            await _close_quietly(writer)
            raise AMQTTError("session reached the message loop without authentication")
        try:
            client_session.transitions.connect()
        except (MachineError, ValueError) as exc:
            await _close_quietly(writer)
            raise AMQTTError(f"session {client_id} could not enter 'connected': {exc}") from exc

        connection = _Connection(handler, asyncio.Event())
        self._connections[client_id] = connection
        try:
            handler.attach(client_session, reader, writer)
            self._sessions[client_id] = (client_session, handler)
            await handler.mqtt_connack_authorize(True)
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_CONNECTED, client_id=client_id, client_session=client_session
            )
            await handler.start()
            await self._publish_session_retained_messages(client_session)
            # Resumed session: retained messages for its *own* subscriptions only (amqtt used every filter).
            for topic_filter, subscribers in list(self._subscriptions.items()):
                for session, qos in subscribers:
                    if session is client_session:
                        await self._publish_retained_messages_for_subscription((topic_filter, qos), client_session)
            await self._client_message_loop(client_session, handler)
        finally:
            connection.done.set()
            if self._connections.get(client_id) is connection:
                del self._connections[client_id]

    # -- 4. will messages pass the publish checks ----------------------------------------

    async def _handle_disconnect(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        disconnect_waiter: asyncio.Future[Any],
    ) -> None:
        result = disconnect_waiter.result()
        abnormal = result is None or not isinstance(result, DisconnectPacket)
        if abnormal and client_session.will_flag and client_session.will_topic is not None:
            if client_session.attributes.get(CUT):
                self.runtime.events.emit("will.suppressed", client_session.attributes[CUT],
                                         device=_device(client_session), topic=client_session.will_topic)
            elif await self._will_allowed(client_session, firing=True):
                payload = bytes(client_session.will_message or b"")
                await self._broadcast_message(client_session, client_session.will_topic, payload,
                                              client_session.will_qos)
                if client_session.will_retain:
                    await self.retain_message(client_session, client_session.will_topic, payload,
                                              client_session.will_qos)
        await self._stop_handler(handler)
        if client_session.transitions.is_connected():
            client_session.transitions.disconnect()
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_DISCONNECTED, client_id=client_session.client_id, client_session=client_session
        )

    # -- 7. message guards see the payload -------------------------------------------------

    async def _handle_message_delivery(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        wait_deliver: asyncio.Future[Any],
    ) -> bool:
        app_message: ApplicationMessage | None = wait_deliver.result()
        if app_message is None:
            return True
        topic = app_message.topic
        if not topic or "#" in topic or "+" in topic or topic.startswith("$"):
            self.runtime.events.emit("publish.rejected", "invalid_topic", level="warning",
                                     device=_device(client_session), topic=topic)
            return False  # protocol violation: close the connection, as amqtt does
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_RECEIVED, client_id=client_session.client_id, message=app_message
        )
        payload = bytes(app_message.data)
        retain = bool(app_message.publish_packet and app_message.publish_packet.retain_flag)
        if not await self.check_publish(client_session, topic, payload, retain):
            return True
        await self.plugins_manager.fire_event(
            BrokerEvents.MESSAGE_BROADCAST, client_id=client_session.client_id, message=app_message
        )
        await self._broadcast_message(client_session, topic, payload)
        if retain:
            await self.retain_message(client_session, topic, payload, app_message.qos)
        return True

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """amqtt refuses malformed filters silently; every refusal here is an event."""
        problem = topic_filter_problem(subscription[0])
        if problem is not None:
            self.runtime.events.emit("subscribe.rejected", "invalid_filter", level="warning",
                                     device=_device(session), filter=subscription[0][:200], detail=problem)
            return 0x80
        return int(await super().add_subscription(subscription, session))

    # -- 5. every delivery passes the receive check ---------------------------------------

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic, Action.RECEIVE):
                continue
            tasks.append(asyncio.ensure_future(
                handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)
            ))
        if tasks:
            await asyncio.wait(tasks)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            # the policy may have changed while the device was offline: check again now
            if not await self._topic_filtering(session, queued.topic, Action.RECEIVE):
                continue
            tasks.append(asyncio.ensure_future(
                handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False)
            ))
        if tasks:
            await asyncio.wait(tasks)

    # -- 6. bounded offline queue ---------------------------------------------------------------

    async def _retain_broadcast_message(self, broadcast: dict[str, Any], qos: int, target_session: Session) -> None:
        limit = self.runtime.settings.limits.max_offline_queue
        if target_session.retained_messages.qsize() >= limit:
            self.runtime.events.emit("delivery.dropped", "offline_queue_full", level="warning",
                                     device=_device(target_session), topic=broadcast.get("topic"), limit=limit)
            return
        await super()._retain_broadcast_message(broadcast, qos, target_session)

    # -- live session control (registry reload, revocation) ----------------------------------

    def connected_sessions(self) -> list[Session]:
        return [s for s, _ in self._sessions.values() if s.transitions.is_connected()]

    async def cut_session(self, client_id: str, reason: str, *, drop_state: bool = True, **fields: Any) -> bool:
        """Disconnect a live session now (no will message); optionally forget its persistent state."""
        entry = self._sessions.get(client_id)
        if entry is None:
            return False
        session, handler = entry
        was_connected = bool(session.transitions.is_connected())
        session.attributes[CUT] = reason
        if was_connected:
            self.runtime.events.emit("session.cut", reason, level="warning", device=client_id, **fields)
            await handler.handle_connection_closed()
            connection = self._connections.get(client_id)
            if connection is not None:
                try:
                    await asyncio.wait_for(connection.done.wait(), _TAKEOVER_WAIT)
                except TimeoutError:
                    await handler.stop()
        if drop_state:
            await self._cleanup_session(client_id)
        return was_connected

    async def remove_subscriptions(self, predicate: Callable[[Session, str], bool], reason: str) -> int:
        """Drop live subscriptions for which ``predicate(session, filter)`` is true; log each."""
        removed = 0
        for topic_filter in list(self._subscriptions):
            for session, _qos in list(self._subscriptions.get(topic_filter, [])):
                if predicate(session, topic_filter):
                    self._del_subscription(topic_filter, session)
                    removed += 1
                    self.runtime.events.emit("subscription.removed", reason, level="warning",
                                             device=_device(session), filter=topic_filter)
            if not self._subscriptions.get(topic_filter):
                self._subscriptions.pop(topic_filter, None)
        return removed

    def subscriptions_of(self, session: Session) -> list[tuple[str, int]]:
        return [(f, q) for f, subs in self._subscriptions.items() for s, q in subs if s is session]
