"""The renewal orchestrator's ``DeviceChannel`` over MQTT: requests to a device, answers back.

Each call publishes one request (QoS 1) on ``devices/<id>/rotation/request`` and waits for the
answer with the same request id on ``devices/<id>/rotation/response`` (``docs/rotation.md`` has
the formats). The broker's ACL lets only the device itself publish on its response topic, so an
answer is attributed to the device named by the topic, never by anything in the payload.

    async with aiomqtt.Client(...) as client, MqttDeviceChannel(client, timeout=20) as channel:
        orchestrator = RenewalOrchestrator(inventory, channel, ca, clock=clock, ...)

As a context manager the channel subscribes to every device's response topic and reads
``client.messages`` itself. A daemon that reads the messages of a shared client elsewhere calls
``await channel.subscribe()`` once and passes every message to ``channel.dispatch``.

Failures become the errors the orchestrator handles (``FetchError`` / ``CredentialError``), in
one place each: no answer within ``timeout`` is ``device_timeout`` (the device is offline, or
slow: the orchestrator retries with backoff); the device answering ``error`` is
``device_refused:<reason>`` for a pushed certificate and ``device_error:<reason>`` otherwise;
an answer that breaks the protocol is ``device_protocol_error``.

"A device is connected" (``on_online``) comes from two places: the broker's connect event on
``$SYS/broker/clients/<id>/connected`` (``edge_core.presence``; every device, whatever its
firmware) and the reference client's own ``type: online`` announcement. A broker event for a
new session waits ``presence_settle`` seconds before it counts, so that the device has
subscribed to its request topic first (a request published earlier would reach nobody); the
device's own announcement, sent once it has subscribed, or a resumed session (its subscriptions
survived) counts at once. Either way one connection starts one trigger.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aiomqtt
from cryptography import x509

from edge_core.csr import MAX_CSR_BYTES
from edge_core.errors import ConfigError, CredentialError, FetchError
from edge_core.events import SecurityEvents
from edge_core.identity import check_identity
from edge_core.presence import PRESENCE_FILTER, parse_presence, presence_device
from edge_core.rotation_wire import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    REQUEST_TOPIC,
    RESPONSE_FILTER,
    RESPONSE_TOPIC,
    parse_serial,
)
from edge_runtime.mqtt import suback_refused
from gateway_agent.renewal import TestResult

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "REQUEST_TOPIC",
    "RESPONSE_FILTER",
    "RESPONSE_TOPIC",
    "MqttDeviceChannel",
]

_REASON_RE = re.compile(r"^[a-z0-9_.:-]{1,64}$")

PinsReady = Callable[[str], Awaitable[None]]


@dataclass
class _Pending:
    expects: str  # the answer type that completes the request
    future: asyncio.Future[dict[str, Any]]


def _reason(value: object) -> str:
    """A device-supplied reason code, made safe for logs and the inventory."""
    return value if isinstance(value, str) and _REASON_RE.match(value) else "unspecified"


def _serial(value: object) -> int:
    try:
        return parse_serial(value)
    except ValueError as exc:
        raise FetchError("device_protocol_error", f"serial {value!r:.60} is not a lowercase hex string") from exc


class MqttDeviceChannel:
    """``gateway_agent.renewal.DeviceChannel`` over the agent's own mTLS MQTT session.

    ``timeout`` bounds every round trip; it must cover a switch, in which the device reconnects
    with its new certificate before answering. ``pins_ready(device_id)`` is awaited before a
    device is asked to test its new certificate: the broker must already serve the registry that
    pins it (the daemon polls the broker's status for the digest ``write_registry`` returned).
    """

    def __init__(self, client: aiomqtt.Client, *, timeout: float = 20.0, pins_ready: PinsReady | None = None,
                 events: SecurityEvents | None = None, presence_settle: float = 2.0) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if presence_settle < 0:
            raise ValueError("presence_settle must not be negative")
        self.client = client
        self.timeout = timeout
        self.pins_ready = pins_ready
        #: called with the device id when a device is connected (the broker's connect event or ``type: online``)
        self.on_online: Callable[[str], None] | None = None
        #: seconds a broker connect event of a new session waits for the device to subscribe
        self.presence_settle = presence_settle
        #: False when the broker refused the connect-event subscription (``rotation.presence_unavailable``)
        self.presence = False
        self._settling: dict[str, asyncio.TimerHandle] = {}
        self.events = events or SecurityEvents("gateway_agent.rotation")
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._reader: asyncio.Task[None] | None = None
        self._entered = False
        self._subscribed = False

    # ------------------------------------------------------------------ lifecycle

    async def subscribe(self) -> None:
        """Subscribe to every device's response topic (once per MQTT session).

        A refused subscription is a configuration error, raised here: otherwise every device
        would look offline (``device_timeout``) while the ACL is what is missing.
        """
        try:
            granted = await self.client.subscribe(RESPONSE_FILTER, qos=1)
        except aiomqtt.MqttError as exc:
            raise FetchError("broker_refused", f"subscribe to {RESPONSE_FILTER} failed: {exc}") from exc
        if any(suback_refused(code) for code in granted):
            raise ConfigError(f"the broker refused the subscription {RESPONSE_FILTER}",
                              hint="grant the gateway role 'subscribe devices/+/rotation/response' and "
                                   "'publish devices/+/rotation/request' in the ACL (docs/rotation.md)")
        self._subscribed = True
        await self._subscribe_presence()

    async def _subscribe_presence(self) -> None:
        """The broker's connect events. Refused: renewals still run (on ``type: online`` and backoff), loudly."""
        try:
            granted = await self.client.subscribe(PRESENCE_FILTER, qos=1)
        except aiomqtt.MqttError as exc:
            raise FetchError("broker_refused", f"subscribe to {PRESENCE_FILTER} failed: {exc}") from exc
        self.presence = not any(suback_refused(code) for code in granted)
        if not self.presence:
            self.events.emit("rotation.presence_unavailable", "subscribe_refused", level="warning",
                             filter=PRESENCE_FILTER,
                             hint="grant the gateway role 'allow subscribe $SYS/broker/clients/#' (docs/rotation.md): "
                                  "until then a device that does not announce itself is retried only after backoff")

    def forget_presence(self) -> None:
        """Drop the connect events still settling (the session ends: they start nothing more)."""
        for handle in self._settling.values():
            handle.cancel()
        self._settling.clear()

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("MqttDeviceChannel cannot be entered twice")
        self._entered = True
        await self.subscribe()
        self._reader = asyncio.create_task(self._read(), name="rotation-channel-reader")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        reader, self._reader = self._reader, None
        failure: BaseException | None = None
        if reader is not None:
            if not reader.done():
                reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await reader
                except aiomqtt.MqttError as error:  # the session ended under us: surfaced below
                    failure = error
        self._fail_all(FetchError("channel_closed", "the rotation channel was closed"))
        self.forget_presence()
        if failure is not None and exc is None:
            raise FetchError("broker_disconnected", f"the agent's MQTT session ended: {failure}") from failure

    async def _read(self) -> None:
        try:
            async for message in self.client.messages:
                self.dispatch(message)
        except aiomqtt.MqttError as exc:
            self._fail_all(FetchError("broker_disconnected", f"the agent's MQTT session ended: {exc}"))
            raise

    def _fail_all(self, error: FetchError) -> None:
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(error)
        self._pending.clear()

    # ------------------------------------------------------------------ answers

    def dispatch(self, message: aiomqtt.Message) -> bool:
        """Route one incoming message; ``False`` if it is neither a rotation response nor a connect event."""
        topic = str(message.topic)
        if presence_device(topic) is not None:
            self._on_presence(topic, message.payload if isinstance(message.payload, bytes) else b"")
            return True
        levels = topic.split("/")
        if len(levels) != 4 or levels[0] != "devices" or levels[2:] != ["rotation", "response"]:
            return False
        device_id = levels[1]
        payload = message.payload if isinstance(message.payload, bytes) else b""
        if len(payload) > MAX_MESSAGE_BYTES:
            self._drop("oversized", device_id, size=len(payload))
            return True
        try:
            check_identity(device_id)
            body = json.loads(payload)
        except (ValueError, CredentialError):
            self._drop("malformed", device_id)
            return True
        request_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(body, dict) or not isinstance(request_id, str) or body.get("v") != PROTOCOL_VERSION:
            self._drop("malformed", device_id)
            return True
        if body.get("type") == "online" and (device_id, request_id) not in self._pending:
            # The device's own connect announcement: a renewal that waited for it (offline, backoff)
            # runs now; a broker connect event still settling for it is the same connection.
            self.events.emit("device.online", device=device_id, serial=str(body.get("serial_in_use"))[:40],
                             source="device")
            settling = self._settling.pop(device_id, None)
            if settling is not None:
                settling.cancel()
            self._online(device_id)
            return True
        pending = self._pending.pop((device_id, request_id), None)
        if pending is None or pending.future.done():
            self._drop("unsolicited", device_id, request_id=request_id[:64], type=str(body.get("type"))[:32])
            return True
        kind = body.get("type")
        if kind not in (pending.expects, "error"):
            pending.future.set_exception(FetchError(
                "device_protocol_error", f"device {device_id}: answered {kind!r} to a request expecting "
                f"{pending.expects!r}"))
            return True
        pending.future.set_result(body)
        return True

    def _on_presence(self, topic: str, payload: bytes) -> None:
        """The broker's connect event (only the broker publishes ``$SYS`` topics)."""
        try:
            presence = parse_presence(topic, payload)
        except ValueError as exc:
            self._drop("malformed", presence_device(topic) or "", source="broker", detail=str(exc)[:200])
            return
        device_id = presence.device
        self.events.emit("device.online", device=device_id, serial=f"{presence.serial:x}", source="broker",
                         session_present=presence.session_present)
        previous = self._settling.pop(device_id, None)
        if previous is not None:
            previous.cancel()  # a reconnect within the settle time: one trigger, for the newest connection
        if presence.session_present or self.presence_settle == 0:
            self._online(device_id)  # its subscriptions survived: a request reaches it now
            return

        def settled() -> None:
            self._settling.pop(device_id, None)
            self._online(device_id)

        self._settling[device_id] = asyncio.get_running_loop().call_later(self.presence_settle, settled)

    def _online(self, device_id: str) -> None:
        if self.on_online is not None:
            self.on_online(device_id)

    def _drop(self, reason: str, device_id: str, **fields: object) -> None:
        self.events.emit("rotation.response_dropped", reason, level="warning", device=device_id[:128], **fields)

    # ------------------------------------------------------------------ requests

    async def _request(self, device_id: str, kind: str, expects: str, **fields: object) -> dict[str, Any]:
        """The one place a missing answer becomes ``device_timeout``."""
        check_identity(device_id)  # never lets an id widen the topic
        if not self._subscribed:
            raise RuntimeError("MqttDeviceChannel: enter it or call subscribe() first")
        request_id = secrets.token_urlsafe(12)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        key = (device_id, request_id)
        self._pending[key] = _Pending(expects, future)
        payload = json.dumps({"v": PROTOCOL_VERSION, "id": request_id, "type": kind, **fields},
                             separators=(",", ":")).encode()
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    await self.client.publish(REQUEST_TOPIC.format(device=device_id), payload, qos=1)
                except aiomqtt.MqttError as exc:
                    raise FetchError("broker_unreachable", f"device {device_id}: could not publish "
                                     f"{kind}: {exc}") from exc
                body = await future
        except TimeoutError as exc:
            raise FetchError("device_timeout", f"device {device_id}: no answer to {kind} within "
                             f"{self.timeout:g}s (offline?)") from exc
        finally:
            self._pending.pop(key, None)
        if body.get("type") == "error":
            reason = _reason(body.get("reason"))
            self.events.emit("rotation.device_error", reason, level="warning", device=device_id, request=kind)
            if kind == "certificate":
                raise CredentialError(f"device_refused:{reason}",
                                      f"device {device_id} refused the pushed certificate: {reason}")
            raise FetchError(f"device_error:{reason}", f"device {device_id} could not do {kind}: {reason}")
        return body

    async def request_csr(self, device_id: str, nonce: str) -> bytes:
        body = await self._request(device_id, "csr_request", "csr", nonce=nonce)
        csr = body.get("csr_pem")
        if body.get("nonce") != nonce or not isinstance(csr, str) or len(csr) > MAX_CSR_BYTES:
            raise FetchError("device_protocol_error", f"device {device_id}: csr answer without the nonce "
                             "asked for, or without a CSR of sane size")
        return csr.encode("ascii", "replace")

    async def push_certificate(self, device_id: str, cert_pem: bytes, chain_pem: bytes) -> None:
        serial = x509.load_pem_x509_certificate(cert_pem).serial_number
        body = await self._request(device_id, "certificate", "stored", serial=f"{serial:x}",
                                   cert_pem=cert_pem.decode("ascii"), chain_pem=chain_pem.decode("ascii"))
        if _serial(body.get("serial")) != serial:
            raise FetchError("device_protocol_error", f"device {device_id}: stored another serial than {serial:x}")

    async def request_test(self, device_id: str, serial: int) -> TestResult:
        if self.pins_ready is not None:
            await self.pins_ready(device_id)
        body = await self._request(device_id, "test", "test_result", serial=f"{serial:x}")
        ok = body.get("ok")
        if _serial(body.get("serial")) != serial or not isinstance(ok, bool):
            raise FetchError("device_protocol_error", f"device {device_id}: test answer is not about {serial:x}")
        return TestResult(ok, "" if ok else _reason(body.get("reason")))

    async def request_switch(self, device_id: str, serial: int) -> int:
        body = await self._request(device_id, "switch", "switched", serial=f"{serial:x}")
        return _serial(body.get("serial_in_use"))
