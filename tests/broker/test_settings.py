"""Broker settings are validated at the edge: unknown keys, unsafe binds and bad limits name file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker_plugins.settings import parse_settings
from edge_core.errors import ConfigError
from tests.conftest import StartBroker
from tests.support.pki import DevPki
from tests.support.raw import try_connect

BASE = """\
listener:
  bind: 127.0.0.1:8883
  certfile: broker.crt
  keyfile: broker.key
  client_ca: ca.pem
registry: registry.yaml
"""


def parse(extra: str) -> object:
    return parse_settings(BASE + extra, source="broker.yaml", base_dir=Path("/etc/edge"))


@pytest.mark.parametrize(("extra", "line", "reason"), [
    ("bogus: 1\n", 7, "unknown key 'bogus'"),
    ("limits:\n  max_connections: 0\n", 8, "must be positive"),
    ("limits:\n  max_packet_size: 300000000\n", 8, "exceeds the MQTT maximum"),
    ("status:\n  bind: 0.0.0.0:9464\n", 8, "must be a loopback address"),
    ("unsafe_plaintext_listener:\n  bind: 10.0.0.5:1883\n", 8, "must be a loopback address"),
    ("identity:\n  source: username\n", 8, "identity.source"),
    ("reload_interval: 5\n", 7, "between 0.05 and 2.0"),
    ("listener_typo: {}\n", 7, "unknown key"),
])
def test_bad_settings_name_the_line(extra: str, line: int, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(extra)
    assert err.value.line == line and reason in err.value.reason, err.value


def test_relative_paths_resolve_against_the_settings_file() -> None:
    settings = parse("")
    assert settings.listener.certfile == Path("/etc/edge/broker.crt")  # type: ignore[attr-defined]


@pytest.mark.integration
def test_plaintext_listener_is_loud_and_admits_nobody(start_broker: StartBroker, pki: DevPki) -> None:
    broker = start_broker(extra="unsafe_plaintext_listener:\n  bind: 127.0.0.1:0\n")
    warning = broker.wait_event("broker.unsafe_plaintext_listener")[0]
    assert "plaintext" in warning["detail"]
    assert broker.edge is not None and broker.edge.plaintext_listener is not None
    import socket

    from tests.support.raw import connect_packet, recv_exactly

    with socket.create_connection(("127.0.0.1", broker.edge.plaintext_listener.port), timeout=5) as sock:
        sock.sendall(connect_packet("pump-17"))
        assert recv_exactly(sock, 4)[3] == 5  # CONNACK not authorized: no certificate, no identity
    broker.wait_event("auth.rejected", "no_client_cert")
    assert try_connect(broker.port, pki.chain, pki.device("pump-17"), "pump-17") == 0  # TLS listener unaffected
