"""Pin the amqtt pieces the broker still uses: its plugin interface, nothing else.

The data plane (codec, sessions, router, persistence) is ``broker_plugins.engine``; no
amqtt broker, handler, codec or session class is used or overridden any more. What
remains is the plugin interface our security plugins are written against:
``BasePlugin`` (``context`` and ``config`` from ``context.config``), ``BaseAuthPlugin``,
``BaseTopicPlugin`` and the ``Action`` values. Each test below fails if an upgrade
changes one of them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin

import broker_plugins
from broker_plugins.broker import PluginContext


def test_amqtt_is_the_pinned_version() -> None:
    assert version("amqtt") == "0.12.1", "the plugin interface is pinned to amqtt 0.12.1; re-audit before upgrading"


def test_plugin_base_takes_config_from_the_context() -> None:
    @dataclass
    class Config:
        runtime: Any = None

    marker = object()
    for base in (BasePlugin, BaseAuthPlugin, BaseTopicPlugin):
        plugin = base(PluginContext(Config(runtime=marker), None))
        assert plugin.config.runtime is marker
        assert isinstance(plugin.context, PluginContext)


def test_hook_signatures_we_call() -> None:
    assert list(inspect.signature(BaseAuthPlugin.authenticate).parameters) == ["self", "session"]
    assert inspect.signature(BaseAuthPlugin.authenticate).parameters["session"].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(inspect.signature(BaseTopicPlugin.topic_filtering).parameters) == ["self", "session", "topic",
                                                                                   "action"]
    assert inspect.iscoroutinefunction(BasePlugin.close)


def test_action_values_we_map() -> None:
    assert {a.value for a in (Action.PUBLISH, Action.SUBSCRIBE, Action.RECEIVE)} == {"publish", "subscribe",
                                                                                     "receive"}


def test_no_amqtt_broker_internals_are_imported() -> None:
    """Only the plugin interface: no amqtt broker, handler, codec, session or adapter module."""
    root = inspect.getfile(broker_plugins).rsplit("/", 1)[0]
    import pathlib

    allowed = {"from amqtt.contexts import Action", "from amqtt.contexts import Action as AmqttAction",
               "from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin",
               "from amqtt.plugins.base import BaseAuthPlugin", "from amqtt.plugins.base import BasePlugin",
               "from amqtt.plugins.base import BaseTopicPlugin"}
    for path in pathlib.Path(root).rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("from amqtt", "import amqtt")):
                assert stripped in allowed, f"{path.name}: {stripped}"
