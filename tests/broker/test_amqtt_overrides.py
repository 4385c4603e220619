"""Pin the amqtt internals that HardenedBroker overrides or relies on.

We subclass amqtt 0.12.1 rather than patch it. If an upgrade renames, removes or
changes the signature of any of these, the override would silently stop applying;
this file makes that a test failure instead. The behavioural tests in
test_session_safety.py prove that each override also changes behaviour.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

import pytest
from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.manager import PluginManager
from amqtt.session import Session

from broker_plugins.broker import HardenedBroker

OVERRIDDEN = {
    "_initialize_client_session": ["self", "reader", "writer", "remote_address", "remote_port"],
    "_handle_client_session": ["self", "reader", "writer", "client_session", "handler", "server", "listener_name"],
    "_authenticate": ["self", "session", "_"],
    "_topic_filtering": ["self", "session", "topic", "action"],
    "_handle_disconnect": ["self", "client_session", "handler", "disconnect_waiter"],
    "_handle_message_delivery": ["self", "client_session", "handler", "wait_deliver"],
    "_publish_retained_messages_for_subscription": ["self", "subscription", "session"],
    "_publish_session_retained_messages": ["self", "session"],
    "_retain_broadcast_message": ["self", "broadcast", "qos", "target_session"],
    "add_subscription": ["self", "subscription", "session"],
}

USED = [
    "external_connected", "_client_connected", "_client_message_loop", "_broadcast_message", "retain_message",
    "_delete_session", "_cleanup_session", "_del_subscription", "_matches", "_get_handler", "_stop_handler",
    "start", "shutdown",
]


def test_amqtt_is_the_pinned_version() -> None:
    assert version("amqtt") == "0.12.1", "HardenedBroker overrides amqtt 0.12.1 internals; re-audit before upgrading"


@pytest.mark.parametrize(("name", "params"), sorted(OVERRIDDEN.items()))
def test_overridden_method_still_exists_with_the_same_signature(name: str, params: list[str]) -> None:
    base = getattr(Broker, name)
    assert list(inspect.signature(base).parameters) == params, f"amqtt changed Broker.{name}"
    assert getattr(HardenedBroker, name) is not base, f"HardenedBroker no longer overrides {name}"
    assert inspect.iscoroutinefunction(getattr(HardenedBroker, name))


@pytest.mark.parametrize("name", USED)
def test_internals_we_call_exist(name: str) -> None:
    assert callable(getattr(Broker, name))


def test_internal_state_and_plugin_lists_we_read_exist() -> None:
    source = inspect.getsource(Broker.__init__)
    for attribute in ("self._sessions", "self._subscriptions", "self._retained_messages", "self.plugins_manager"):
        assert attribute in source
    manager_source = inspect.getsource(PluginManager.__init__)
    assert "self._auth_plugins" in manager_source and "self._topic_plugins" in manager_source
    assert "attributes" in inspect.getsource(Session.__init__)
    assert list(inspect.signature(BrokerProtocolHandler.init_from_connect).parameters)[:3] == [
        "reader", "writer", "plugins_manager"
    ]


def test_amqtt_still_has_the_gaps_we_close() -> None:
    """If amqtt fixes a gap upstream, revisit the override rather than carry dead code."""
    init_source = inspect.getsource(Broker._initialize_client_session)
    # amqtt deletes the stored session before authentication happens
    assert "_delete_session" in init_source and "_authenticate" not in init_source
    assert "CERT_OPTIONAL" in inspect.getsource(Broker._create_ssl_context)
    disconnect_source = inspect.getsource(Broker._handle_disconnect)
    assert "_topic_filtering" not in disconnect_source  # wills bypass the publish check
    retained_source = inspect.getsource(Broker._publish_retained_messages_for_subscription)
    assert "_topic_filtering" not in retained_source  # retained messages bypass the receive check
