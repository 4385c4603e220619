"""The certificate test endpoint used during rotation: it checks a certificate and nothing else.

During renewal a device must prove that its *new* certificate works before switching
to it (the old one stays in use meanwhile). It connects to this listener with the new
certificate; the broker runs the full admission chain (TLS 1.3 chain, identity, client
id binding, registry pin, revocation) and answers CONNACK 0 or a refusal, then closes.
No session is created, nothing can be published or subscribed, and the device's live
session on the main listener is untouched. Every check is a ``cert_test.passed`` or
``cert_test.failed reason=...`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.mqtt.connack import CONNECTION_ACCEPTED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

from broker_plugins.runtime import REFUSAL, admitted_of

if TYPE_CHECKING:
    from broker_plugins.broker import HardenedBroker

__all__ = ["CertificateTestEndpoint"]


class CertificateTestEndpoint:
    def __init__(self, broker: HardenedBroker) -> None:
        self._broker = broker

    async def external_connected(self, reader: ReaderAdapter, writer: WriterAdapter, listener_name: str) -> None:
        events = self._broker.runtime.events
        peer = writer.get_peer_info()
        try:
            _handler, session = await asyncio.wait_for(
                BrokerProtocolHandler.init_from_connect(reader, writer, self._broker.plugins_manager),
                timeout=self._broker.runtime.settings.limits.connect_timeout,
            )
        except Exception as exc:  # noqa: BLE001 - any malformed or missing CONNECT fails the test
            events.emit("cert_test.failed", "malformed_connect", level="warning", peer=str(peer), detail=repr(exc))
            with contextlib.suppress(ConnectionError, OSError):
                await writer.close()
            return
        try:
            if await self._broker._authenticate(session, None):
                admitted = admitted_of(session)
                assert admitted is not None
                await ConnackPacket.build(0, CONNECTION_ACCEPTED).to_stream(writer)
                events.emit("cert_test.passed", device=admitted.identity, serial=f"{admitted.cert.serial:x}",
                            not_after=admitted.cert.not_after.isoformat())
            else:
                events.emit("cert_test.failed", session.attributes.get(REFUSAL, "not_authorized"), level="warning",
                            client_id=session.client_id)
                await self._broker._refuse_connect(session, writer)
        finally:
            with contextlib.suppress(ConnectionError, OSError):
                await writer.close()
