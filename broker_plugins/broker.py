"""``HardenedBroker``: our MQTT engine with the security plugin chain in front of every decision.

The data plane (codec, sessions, routing, persistence) is ``broker_plugins.engine``.
This module is the engine's ``Hooks``: it loads the security plugins (amqtt's plugin
interface: ``BaseAuthPlugin``, ``BaseTopicPlugin``, ``BasePlugin`` with a ``Config``
dataclass) and turns each engine question into plugin calls, failing closed:

- ``authenticate``: auth plugins in order; the first that does not answer True refuses
  (None, "cannot decide", refuses too); an exception is a deny plus ``auth.rejected
  reason=plugin_error``. No plugin at all denies (``no_auth_plugin``).
- ``check_publish``: topic ACL (``publish``), then the message guards
  (``guard_publish(*, session, topic, payload, retain) -> bool``), for PUBLISH and wills.
- ``check_will``: at CONNECT (a CONNECT whose will is denied is refused) and again when
  the will fires (``will.rejected reason=invalid_topic|publish_denied``).
- ``check_subscribe`` and ``may_receive``: the topic ACL's ``subscribe`` and ``receive``.
  ``may_receive`` runs on every delivery (live, retained, queued, will), synchronously.
- ``session_started``: the connect event, published by the broker itself on
  ``$SYS/broker/clients/<id>/connected`` (``edge_core.presence``; QoS 1, not retained),
  so the gateway agent learns at once that a device is reachable.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin

from broker_plugins.engine.codec import Will
from broker_plugins.engine.core import CONNACK_IDENTIFIER_REJECTED, CONNACK_NOT_AUTHORIZED, Engine
from broker_plugins.engine.eager import run_eagerly
from broker_plugins.engine.session import Message, Session
from broker_plugins.engine.store import SessionStore
from broker_plugins.runtime import REFUSAL, BrokerRuntime, admitted_of
from edge_core.errors import CredentialError
from edge_core.identity import describe_certificate
from edge_core.presence import PRESENCE_TOPIC, presence_payload

__all__ = ["HardenedBroker", "MessageGuard", "PluginContext"]


class MessageGuard(Protocol):
    """A plugin that inspects PUBLISH payloads (for example signed command envelopes)."""

    async def guard_publish(self, *, session: Session, topic: str, payload: bytes, retain: bool) -> bool: ...


class PluginContext:
    """What a plugin sees as ``self.context``: its ``config``, a logger, and ``broadcast_message``."""

    def __init__(self, config: Any, engine: Engine | None) -> None:
        self.config = config
        self.logger = logging.getLogger("edge-broker.plugins")
        self._engine = engine

    async def broadcast_message(self, topic: str, data: bytes, qos: int | None = None, retain: bool = False) -> None:
        """Publish a broker-originated message (for example a command-rejection notice)."""
        assert self._engine is not None
        self._engine.route(None, Message(topic, bytes(data), qos or 0, retain))


def _load_plugin(path: str, runtime: BrokerRuntime, options: dict[str, Any],
                 engine: Engine | None) -> BasePlugin[Any]:
    module_name, _, class_name = path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    config = cls.Config(runtime=runtime, **options)
    plugin = cls(PluginContext(config, engine))
    assert isinstance(plugin, BasePlugin)
    return plugin


def _device(session: Session | None) -> str | None:
    admitted = admitted_of(session)
    return admitted.identity if admitted else (session.client_id if session else None)


class _CertCache:
    """Parsed client certificates by DER digest: a reconnect storm parses each certificate once."""

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[bytes, str] = OrderedDict()

    def identity(self, der: bytes, runtime: BrokerRuntime) -> str | None:
        key = hashlib.sha256(der).digest()
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            return found
        try:
            identity = describe_certificate(der, runtime.settings.identity).identity
        except CredentialError:
            return None
        self._entries[key] = identity
        if len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return identity


class HardenedBroker:
    """The engine's security hooks, backed by the plugin chain; owns the engine."""

    def __init__(self, runtime: BrokerRuntime, plugins: dict[str, dict[str, Any]], store: SessionStore) -> None:
        self.runtime = runtime
        self.engine = Engine(limits=runtime.settings.limits, hooks=self, store=store, events=runtime.events)
        loaded = [_load_plugin(path, runtime, dict(options), self.engine) for path, options in plugins.items()]
        self.plugins = loaded
        self._auth = [p for p in loaded if isinstance(p, BaseAuthPlugin)]
        self._topic = [p for p in loaded if isinstance(p, BaseTopicPlugin)]
        self._guards: list[MessageGuard] = [p for p in loaded if callable(getattr(p, "guard_publish", None))]
        self._certs = _CertCache()
        # topic plugins with a synchronous ``decide(session, topic, kind)``: the hot path skips coroutines
        self._deciders: list[Callable[[Session, str, str], bool]] = [
            p.decide for p in self._topic if callable(getattr(p, "decide", None))
        ]
        self._all_sync = bool(self._topic) and len(self._deciders) == len(self._topic)

    async def close(self) -> None:
        self.engine.abort_all()
        for plugin in self.plugins:
            await plugin.close()
        await self.engine.store.close()

    # -- authentication ---------------------------------------------------------------

    async def authenticate(self, session: Session) -> bool:
        events = self.runtime.events
        if not self._auth:
            events.emit("auth.rejected", "no_auth_plugin", level="error", client_id=session.client_id)
            return False
        for plugin in self._auth:
            try:
                result = await plugin.authenticate(session=session)
            except Exception as exc:  # noqa: BLE001 - fail closed: any plugin error denies
                session.attributes[REFUSAL] = "plugin_error"
                events.emit("auth.rejected", "plugin_error", level="error", plugin=type(plugin).__name__,
                            client_id=session.client_id, error=repr(exc))
                return False
            if result is not True:
                # False refuses; None ("cannot decide") also refuses: deny by default.
                session.attributes.setdefault(REFUSAL, "not_authorized")
                return False
        session.admitted = admitted_of(session)
        return session.admitted is not None

    def refusal_code(self, session: Session) -> int:
        reason = session.attributes.get(REFUSAL, "not_authorized")
        return CONNACK_IDENTIFIER_REJECTED if reason == "client_id_mismatch" else CONNACK_NOT_AUTHORIZED

    def identity_for_empty_client_id(self, session: Session) -> str | None:
        ssl_object = session.ssl_object
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        return self._certs.identity(der, self.runtime) if der else None

    def connection_tested(self, session: Session, passed: bool) -> None:
        events = self.runtime.events
        admitted = admitted_of(session)
        if passed and admitted is not None:
            events.emit("cert_test.passed", device=admitted.identity, serial=f"{admitted.cert.serial:x}",
                        not_after=admitted.cert.not_after.isoformat())
        else:
            events.emit("cert_test.failed", session.attributes.get(REFUSAL, "not_authorized"), level="warning",
                        client_id=session.client_id)

    def session_started(self, session: Session, present: bool) -> None:
        """Announce the admitted session on ``$SYS/broker/clients/<id>/connected`` (ACL-gated like any delivery)."""
        admitted = admitted_of(session)
        if admitted is None:
            return  # never admitted: nothing to announce (the engine admits only authenticated sessions)
        payload = presence_payload(admitted.identity, admitted.cert.serial, self.runtime.clock.now(),
                                   session_present=present)
        self.engine.route(None, Message(PRESENCE_TOPIC.format(device=admitted.identity), payload, 1, False))

    # -- topic decisions --------------------------------------------------------------

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        if not self._topic:
            self.runtime.events.emit("acl.denied", "no_acl_plugin", level="error", device=_device(session),
                                     topic=topic, action=str(action.value))
            return False
        for plugin in self._topic:
            try:
                result = await plugin.topic_filtering(session=session, topic=topic, action=action)
            except Exception as exc:  # noqa: BLE001 - fail closed: any plugin error denies
                self.runtime.events.emit(
                    "acl.denied", "plugin_error", level="error", plugin=type(plugin).__name__,
                    device=_device(session), topic=topic, action=str(action.value), error=repr(exc),
                )
                return False
            if result is not True:
                return False
        return True

    async def _guard_message(self, session: Session, topic: str, payload: bytes, retain: bool,
                             *, will_at_connect: bool = False) -> bool:
        for guard in self._guards:
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

    def check_publish(self, session: Session, topic: str, payload: bytes, retain: bool,
                      *, will_at_connect: bool = False) -> bool | Coroutine[Any, Any, bool]:
        """The full publish check: topic ACL then message guards. Used for PUBLISH and wills.

        Synchronous when every topic plugin decides synchronously and no message guard is
        loaded (the hot path); otherwise a coroutine, which the engine runs eagerly. A guard
        with ``checks_wills_when_fired`` sees a will only when it fires, not at CONNECT.
        """
        if topic.startswith("$"):
            self.runtime.events.emit("publish.rejected", "dollar_topic", level="warning", device=_device(session),
                                     topic=topic[:200])
            return False
        if self._all_sync:
            allowed = self._decide_sync(session, topic, "publish")
            if not allowed or not self._guards:
                return allowed
            return self._guard_message(session, topic, payload, retain, will_at_connect=will_at_connect)
        return self._check_publish_async(session, topic, payload, retain, will_at_connect=will_at_connect)

    async def _check_publish_async(self, session: Session, topic: str, payload: bytes, retain: bool,
                                   *, will_at_connect: bool) -> bool:
        if not await self._topic_filtering(session, topic, Action.PUBLISH):
            return False
        return await self._guard_message(session, topic, payload, retain, will_at_connect=will_at_connect)

    async def check_will(self, session: Session, will: Will, *, firing: bool) -> bool:
        topic = will.topic
        if topic.startswith("$"):
            self.runtime.events.emit("will.rejected", "invalid_topic", level="warning", device=_device(session),
                                     topic=topic)
            return False
        decision = self.check_publish(session, topic, will.payload, will.retain, will_at_connect=not firing)
        if not (decision if isinstance(decision, bool) else await decision):
            self.runtime.events.emit("will.rejected", "publish_denied", level="warning", device=_device(session),
                                     topic=topic, firing=firing)
            return False
        return True

    async def check_subscribe(self, session: Session, topic_filter: str) -> bool:
        return await self._topic_filtering(session, topic_filter, Action.SUBSCRIBE)

    def may_receive(self, session: Session, topic: str) -> bool:
        """The receive check of one delivery, synchronously (it is the hot path)."""
        if not self._topic:
            return self._no_topic_plugin(session, topic)
        if self._all_sync:
            return self._decide_sync(session, topic, "receive")
        for plugin in self._topic:
            outcome: list[bool] = []

            def record(ok: bool | None, err: BaseException | None, out: list[bool] = outcome) -> None:
                out.append(ok is True and err is None)

            finished = run_eagerly(self._topic_filtering_one(plugin, session, topic), record)
            if not finished or not outcome or not outcome[0]:
                if not finished:
                    self.runtime.events.emit("acl.denied", "plugin_suspended", level="error",
                                             plugin=type(plugin).__name__, device=_device(session), topic=topic)
                return False
        return True

    def _decide_sync(self, session: Session, topic: str, kind: str) -> bool:
        """Every topic plugin's synchronous ``decide``, in order; the first that does not allow denies."""
        for decide in self._deciders:
            try:
                ok = decide(session, topic, kind)
            except Exception as exc:  # noqa: BLE001 - fail closed: any plugin error denies
                self.runtime.events.emit("acl.denied", "plugin_error", level="error", device=_device(session),
                                         topic=topic, action=kind, error=repr(exc))
                return False
            if ok is not True:
                return False
        return True

    async def _topic_filtering_one(self, plugin: BaseTopicPlugin, session: Session, topic: str) -> bool:
        result = await plugin.topic_filtering(session=session, topic=topic, action=Action.RECEIVE)
        return result is True

    def _no_topic_plugin(self, session: Session, topic: str) -> bool:
        self.runtime.events.emit("acl.denied", "no_acl_plugin", level="error", device=_device(session), topic=topic,
                                 action="receive")
        return False

