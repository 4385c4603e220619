"""A real MQTT device for tests: paho-mqtt 2.x over TLS 1.3 with a client certificate."""

from __future__ import annotations

import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt

from tests.support.pki import Credential

_V5_TO_V311 = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int


def tls_context(chain: Path, cred: Credential | None, *, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=chain)
    if cred is not None:
        ctx.load_cert_chain(cred.cert, cred.key)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


class Device:
    """One MQTT client. ``connect`` returns the CONNACK code, or None when the connection died first."""

    def __init__(self, port: int, chain: Path, cred: Credential | None, client_id: str, *,
                 clean_session: bool = True, keepalive: int = 30,
                 max_tls: ssl.TLSVersion | None = None) -> None:
        self.port = port
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=clean_session, protocol=mqtt.MQTTv311,
                                  reconnect_on_failure=False)
        self.client.tls_set_context(tls_context(chain, cred, max_version=max_tls))
        self.keepalive = keepalive
        self.messages: queue.Queue[Received] = queue.Queue()
        self._connack: queue.Queue[int] = queue.Queue()
        self._suback: dict[int, list[int]] = {}
        self._suback_event = threading.Condition()
        self.disconnected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        # paho 2 reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes; map them back.
        value = int(getattr(rc, "value", rc))  # type: ignore[call-overload]
        self._connack.put(_V5_TO_V311.get(value, value))

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(Received(msg.topic, msg.payload, bool(msg.retain), msg.qos))

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, codes: list[object],
                      props: object) -> None:
        with self._suback_event:
            self._suback[mid] = [int(getattr(c, "value", c)) for c in codes]  # type: ignore[call-overload]
            self._suback_event.notify_all()

    def _on_disconnect(self, *args: object) -> None:
        self.disconnected.set()

    def will(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> Device:
        self.client.will_set(topic, payload, qos=qos, retain=retain)
        return self

    def connect(self, timeout: float = 5.0) -> int | None:
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=self.keepalive)
        except (ssl.SSLError, OSError):
            self._discard()
            return None
        self.client.loop_start()
        try:
            code = self._connack.get(timeout=timeout)
        except queue.Empty:
            code = None
        if code != 0:
            self._discard()
        return code

    def _discard(self) -> None:
        """Stop a client whose connection failed: no reconnect attempts, no leaked socket."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()
        self.client._reset_sockets()  # paho 2.x leaves its wake-up socket pair to __del__

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 5.0) -> list[int]:
        _, mid = self.client.subscribe(topic_filter, qos)
        deadline = time.monotonic() + timeout
        with self._suback_event:
            while mid not in self._suback:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no SUBACK for {topic_filter}")
                self._suback_event.wait(remaining)
            return self._suback.pop(mid)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(5)

    def expect(self, timeout: float = 5.0) -> Received:
        return self.messages.get(timeout=timeout)

    def expect_none(self, timeout: float = 0.5) -> None:
        try:
            got = self.messages.get(timeout=timeout)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message {got}")

    def drop(self) -> None:
        """Vanish without DISCONNECT (power loss): the broker sees the socket close abruptly."""
        sock = self.client.socket()
        self.client.loop_stop()
        if isinstance(sock, socket.socket | ssl.SSLSocket):
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.client._reset_sockets()

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
            self.client._reset_sockets()  # paho 2.x leaves its wake-up socket pair to __del__
