"""Send a signed command through the broker, as an operator.

The operator connects with its own TLS client certificate (its MQTT identity), signs
the command with its separate signing key, publishes it at QoS 1 on the device's command
topic and listens briefly on ``operators/<id>/cmd-rejected``: MQTT 3.1.1 cannot refuse
a PUBLISH, so a rejection notice from the broker is how a refusal becomes visible.
"""

from __future__ import annotations

import base64
import json
import queue
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion

from edge_core.clock import Clock, SystemClock
from edge_core.envelope import REJECTION_TOPIC, sign_command
from edge_core.errors import ConfigError, FetchError
from edge_core.operators import EnvelopePolicy
from edge_runtime.tls import client_tls_context

__all__ = ["BrokerEndpoint", "SendResult", "load_signing_key", "send_command"]


@dataclass(frozen=True)
class BrokerEndpoint:
    host: str
    port: int
    ca: Path
    cert: Path
    key: Path

    def tls_context(self) -> ssl.SSLContext:
        return client_tls_context(self.ca, self.cert, self.key)


@dataclass(frozen=True)
class SendResult:
    jti: str
    topic: str
    rejected: str | None  # the broker's reason code, if it refused the command

    @property
    def ok(self) -> bool:
        return self.rejected is None


def load_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load signing key: {exc}", source=str(path)) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("signing key must be an EC P-256 private key", source=str(path))
    return key


def send_command(
    endpoint: BrokerEndpoint,
    *,
    operator: str,
    signing_key: ec.EllipticCurvePrivateKey,
    device: str,
    body: Mapping[str, Any],
    ttl: timedelta,
    subtopic: str = "exec",
    kid: str | None = None,
    policy: EnvelopePolicy | None = None,
    clock: Clock | None = None,
    wait: float = 2.0,
    token: bytes | None = None,
) -> SendResult:
    """Sign (unless ``token`` is given, e.g. to demonstrate a replay) and publish one command."""
    policy = policy or EnvelopePolicy()
    clock = clock or SystemClock()
    if token is None:
        token = sign_command(signing_key, issuer=operator, device=device, body=body, ttl=ttl,
                             now=clock.now(), kid=kid, typ=policy.typ)
    jti = _jti_of(token)
    topic = policy.topic_for(device, subtopic)
    notices: queue.Queue[dict[str, Any]] = queue.Queue()
    connected: queue.Queue[int] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=operator, protocol=mqtt.MQTTv311,
                         reconnect_on_failure=False)
    client.tls_set_context(endpoint.tls_context())

    def on_connect(c: mqtt.Client, u: object, f: object, rc: Any, p: object) -> None:
        connected.put(int(getattr(rc, "value", rc)))

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        try:
            notice = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(notice, dict) and notice.get("jti") == jti:
            notices.put(notice)

    subacks: queue.Queue[int] = queue.Queue()

    def on_subscribe(c: mqtt.Client, u: object, mid: int, codes: object, p: object) -> None:
        subacks.put(mid)

    client.on_connect = on_connect
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    try:
        client.connect(endpoint.host, endpoint.port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        raise FetchError("broker_unreachable", f"cannot reach broker {endpoint.host}:{endpoint.port}: {exc}") from exc
    client.loop_start()
    try:
        try:
            code = connected.get(timeout=10)
        except queue.Empty as exc:
            raise FetchError("broker_refused", "the broker closed the connection during CONNECT") from exc
        if code != 0:
            raise FetchError("broker_refused", f"the broker refused the operator connection (code {code})")
        # subscribe to rejection notices first, so a fast refusal cannot be missed
        client.subscribe(REJECTION_TOPIC.format(operator=operator), qos=1)
        try:
            subacks.get(timeout=10)
        except queue.Empty as exc:
            raise FetchError("broker_refused", "no SUBACK for the rejection notice topic") from exc
        client.publish(topic, token, qos=1).wait_for_publish(10)
        try:
            notice = notices.get(timeout=wait)
        except queue.Empty:
            return SendResult(jti=jti, topic=topic, rejected=None)
        return SendResult(jti=jti, topic=topic, rejected=str(notice.get("reason")))
    finally:
        client.disconnect()
        client.loop_stop()
        client._reset_sockets()


def _jti_of(token: bytes) -> str:
    payload = token.split(b".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    return str(claims.get("jti", ""))
