"""Fail closed: a plugin that raises, answers None or is missing denies, with an event (no network)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin

from broker_plugins.broker import HardenedBroker
from broker_plugins.engine.codec import Will
from broker_plugins.engine.eager import run_eagerly
from broker_plugins.engine.session import Session
from broker_plugins.engine.store import MemoryStore
from broker_plugins.runtime import ADMITTED, BrokerRuntime
from broker_plugins.settings import parse_settings
from edge_core.registry import parse_registry
from tests.support.pki import DevPki

HERE = "tests.broker.test_plugin_failures"


@dataclass
class _Config:
    runtime: Any = None


class AllowAll(BaseAuthPlugin):
    Config = _Config

    async def authenticate(self, *, session: Any) -> bool:
        session.attributes[ADMITTED] = object()  # not an Admitted: the broker must not trust it
        return True


class RaisingAuth(BaseAuthPlugin):
    Config = _Config

    async def authenticate(self, *, session: Any) -> bool:
        raise RuntimeError("auth backend down")


class UndecidedAuth(BaseAuthPlugin):
    Config = _Config

    async def authenticate(self, *, session: Any) -> bool | None:
        return None


class RaisingTopic(BaseTopicPlugin):
    """A plain amqtt topic plugin (no synchronous ``decide``) that raises."""

    Config = _Config

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        raise RuntimeError("policy store down")


class AllowTopic(BaseTopicPlugin):
    Config = _Config

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        return True


class RaisingGuard(BasePlugin[Any]):
    Config = _Config

    async def guard_publish(self, *, session: Any, topic: str, payload: bytes, retain: bool) -> bool:
        raise RuntimeError("guard crashed")


def broker_with(pki: DevPki, *plugins: str) -> HardenedBroker:
    settings = parse_settings(
        f"listener:\n  certfile: a\n  keyfile: b\n  client_ca: c\nregistry: {pki.ca.registry_path}\n",
        source="broker.yaml", base_dir=Path("/"))
    registry = parse_registry(pki.ca.registry_path.read_bytes())
    runtime = BrokerRuntime(settings=settings, registry=registry)
    return HardenedBroker(runtime, {f"{HERE}.{name}": {} for name in plugins}, MemoryStore())


def run(coro: Any) -> Any:
    out: list[Any] = []
    assert run_eagerly(coro, lambda result, error: out.append(error or result))
    return out[0]


def decide(value: Any) -> Any:
    return value if isinstance(value, bool) else run(value)


def test_auth_plugin_exception_denies_with_an_event(pki: DevPki) -> None:
    broker = broker_with(pki, "AllowAll", "RaisingAuth")
    session = Session("pump-17", clean=True)
    assert run(broker.authenticate(session)) is False
    assert broker.runtime.events.count("auth.rejected", "plugin_error") == 1
    assert session.attributes["edge.refusal"] == "plugin_error"


def test_undecided_auth_plugin_denies(pki: DevPki) -> None:
    assert run(broker_with(pki, "UndecidedAuth").authenticate(Session("x", clean=True))) is False


def test_no_auth_plugin_denies(pki: DevPki) -> None:
    broker = broker_with(pki)
    assert run(broker.authenticate(Session("x", clean=True))) is False
    assert broker.runtime.events.count("auth.rejected", "no_auth_plugin") == 1


def test_auth_that_sets_no_admitted_identity_denies(pki: DevPki) -> None:
    assert run(broker_with(pki, "AllowAll").authenticate(Session("x", clean=True))) is False


def test_topic_plugin_exception_denies_every_action(pki: DevPki) -> None:
    broker = broker_with(pki, "RaisingTopic")
    session = Session("pump-17", clean=True)
    assert decide(broker.check_publish(session, "a/b", b"", False)) is False
    assert run(broker.check_subscribe(session, "a/#")) is False
    assert broker.may_receive(session, "a/b") is False
    assert run(broker.check_will(session, Will("a/b", b"", 0, False), firing=True)) is False
    assert broker.runtime.events.count("acl.denied", "plugin_error") == 3  # publish, subscribe, will
    assert broker.runtime.events.count("will.rejected", "publish_denied") == 1


def test_no_topic_plugin_denies_every_action(pki: DevPki) -> None:
    broker = broker_with(pki)
    session = Session("pump-17", clean=True)
    assert decide(broker.check_publish(session, "a/b", b"", False)) is False
    assert run(broker.check_subscribe(session, "a/#")) is False
    assert broker.may_receive(session, "a/b") is False
    assert broker.runtime.events.count("acl.denied", "no_acl_plugin") == 3


def test_guard_exception_denies_the_publish(pki: DevPki) -> None:
    broker = broker_with(pki, "AllowTopic", "RaisingGuard")
    session = Session("pump-17", clean=True)
    assert decide(broker.check_publish(session, "a/b", b"x", False)) is False
    assert broker.runtime.events.count("publish.rejected", "plugin_error") == 1
    assert broker.may_receive(session, "a/b") is True  # guards see publishes, not deliveries


@pytest.mark.parametrize("topic", ["$SYS/x", "$share/g/t"])
def test_dollar_topics_are_never_published_by_clients(pki: DevPki, topic: str) -> None:
    broker = broker_with(pki, "AllowTopic")
    assert decide(broker.check_publish(Session("pump-17", clean=True), topic, b"", False)) is False
    assert broker.runtime.events.count("publish.rejected", "dollar_topic") == 1
