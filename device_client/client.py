"""The reference device client: an MQTT device over TLS 1.3 with its client certificate.

Firmware developers read this as the executable specification of the device side:
it connects with ``client id == certificate identity``, subscribes to its own command
topic and verifies every command itself (``DeviceCommandVerifier``) before acting, so
a command injected past the broker is still refused.

    async with DeviceClient(config, verifier=verifier) as device:
        async for outcome in device.commands():
            if outcome.accepted: ...
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import aiomqtt

from device_client.commands import DeviceCommandVerifier
from edge_core.envelope import CommandRefused, VerifiedCommand
from edge_runtime.tls import client_tls_context

__all__ = ["CommandOutcome", "DeviceClient", "DeviceConfig"]


@dataclass(frozen=True)
class DeviceConfig:
    device_id: str
    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    keepalive: int = 30

    def tls_context(self) -> ssl.SSLContext:
        return client_tls_context(self.ca, self.cert, self.key)


@dataclass(frozen=True)
class CommandOutcome:
    topic: str
    payload: bytes
    command: VerifiedCommand | None
    refused: CommandRefused | None

    @property
    def accepted(self) -> bool:
        return self.command is not None


class DeviceClient:
    def __init__(self, config: DeviceConfig, *, verifier: DeviceCommandVerifier | None = None) -> None:
        self.config = config
        self.verifier = verifier
        self._client = aiomqtt.Client(
            config.host, config.port, identifier=config.device_id, tls_context=config.tls_context(),
            protocol=aiomqtt.ProtocolVersion.V311, clean_session=True, keepalive=config.keepalive,
        )
        self._entered = False

    @property
    def mqtt(self) -> aiomqtt.Client:
        return self._client

    async def __aenter__(self) -> DeviceClient:
        if self._entered:
            raise RuntimeError("DeviceClient cannot be entered twice")
        self._entered = True
        await self._client.__aenter__()
        if self.verifier is not None:
            await self._client.subscribe(self.verifier.policy.subscription_filter(self.config.device_id), qos=1)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self._client.__aexit__(exc_type, exc, tb)
        except aiomqtt.MqttError:
            if exc is None and not self.was_cut:
                raise
        finally:
            # aiomqtt keeps the reason of an unexpected disconnect in a future; a broker that
            # cuts the device (revocation) is an expected outcome here, so read it.
            if self.was_cut:
                self._disconnected.exception()

    @property
    def _disconnected(self) -> asyncio.Future[None]:
        return self._client._disconnected  # aiomqtt has no public accessor

    @property
    def was_cut(self) -> bool:
        """True when the broker closed the connection (for example after revoking the certificate)."""
        fut = self._disconnected
        return fut.done() and not fut.cancelled() and fut.exception() is not None

    async def commands(self) -> AsyncIterator[CommandOutcome]:
        """Every message on the command topic, verified by the device itself."""
        if self.verifier is None:
            raise RuntimeError("commands() needs a DeviceCommandVerifier")
        async for message in self._client.messages:
            topic = str(message.topic)
            if not self.verifier.policy.is_command_topic(topic):
                continue
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            try:
                yield CommandOutcome(topic, payload, self.verifier.verify(payload, topic=topic), None)
            except CommandRefused as refused:
                yield CommandOutcome(topic, payload, None, refused)

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        await self._client.publish(topic, payload, qos=qos, retain=retain)
