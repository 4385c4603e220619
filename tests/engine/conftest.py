"""Outside-in tests of the broker's MQTT engine: real C clients, raw TLS sockets, restarts, crashes.

Every test here talks to the broker only over the wire (plus its security events and a
loop-lag probe); none reaches into the engine's objects, so they hold for any engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop

from broker_plugins.settings import load_settings
from tests.support.broker import BrokerProcess, BrokerThread, free_port, write_settings
from tests.support.mqtt import Device
from tests.support.pki import DevPki
from tests.support.raw import RawClient

# The devices of tests/support/pki.py are all role sensor, site plant-a, line line-1;
# alice is the dev PKI's operator (role operator, site plant-a).
ENGINE_ACL = """\
version: 1
attributes: [site, line]
everyone:
  - allow publish devices/{device}/status
roles:
  sensor:
    - allow both lab/#
    - allow publish devices/{device}/telemetry/#
    - allow subscribe devices/+/telemetry/#
    - allow subscribe devices/+/status
    - allow subscribe devices/{device}/cmd/#
    - allow publish devices/+/cmd/#
    - allow publish sites/{site}/#
  operator:
    - allow subscribe sites/{site}/#
    - deny subscribe sites/{site}/admin/#
"""


@dataclass
class Engine:
    """One test's broker setup: settings files, brokers in threads or processes, clients."""

    tmp: Path
    pki: DevPki
    registry: Path
    acl: Path
    started: list[BrokerThread | BrokerProcess] = field(default_factory=list)
    clients: list[RawClient | Device] = field(default_factory=list)

    def settings(self, *, limits: dict[str, Any] | None = None, persistence: str | None = None,
                 port: int = 0) -> Path:
        """Settings file; ``persistence`` is ``full`` or ``normal`` (a database under the test's tmp dir)."""
        extra = ""
        if persistence is not None:
            extra = f"persistence:\n  path: {self.tmp / 'broker.db'}\n  synchronous: {persistence}\n"
        return write_settings(self.tmp, registry=self.registry, chain=self.pki.chain, server_dir=self.pki.root,
                              acl=self.acl, limits=limits, extra=extra, bind=f"127.0.0.1:{port}")

    def start(self, settings: Path | None = None, **kwargs: Any) -> BrokerThread:
        """A broker in a thread, on the event loop its settings name (uvloop by default, as in production)."""
        loaded = load_settings(settings or self.settings(**kwargs))
        factory = uvloop.new_event_loop if loaded.event_loop == "uvloop" else None
        broker = BrokerThread(loaded, loop_factory=factory).start()
        self.started.append(broker)
        return broker

    def process(self, **kwargs: Any) -> BrokerProcess:
        """A broker as a child process (``edge-broker run -c``) on a fixed port, so it can be killed."""
        port = free_port()
        proc = BrokerProcess(self.settings(port=port, **kwargs), port, log=self.tmp / "edge-broker.log")
        self.started.append(proc)
        return proc

    def raw(self, port: int, name: str, **kwargs: Any) -> RawClient:
        client = RawClient(port, self.pki.chain, self.pki.client(name), **kwargs)
        self.clients.append(client)
        return client

    def device(self, port: int, name: str, client_id: str | None = None, **kwargs: Any) -> Device:
        cid = client_id if client_id is not None else name
        client = Device(port, self.pki.chain, self.pki.client(name), cid, **kwargs)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):  # a client the test already closed
                client.drop() if isinstance(client, RawClient) else client.close()
        for broker in reversed(self.started):
            broker.stop()


@pytest.fixture
def engine(tmp_path: Path, pki: DevPki, registry_file: Path) -> Iterator[Engine]:
    acl = tmp_path / "acl.yaml"
    acl.write_text(ENGINE_ACL)
    env = Engine(tmp_path, pki, registry_file, acl)
    yield env
    env.close()
