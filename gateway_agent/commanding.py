"""Send a signed command through the broker, as an operator.

The operator connects with its own TLS client certificate (its MQTT identity), signs
the command with its separate signing key, publishes it at QoS 1 on the device's command
topic and waits for the broker's answer: ``operators/<id>/cmd-accepted`` (every check
passed, the command is routed) or ``operators/<id>/cmd-rejected`` (with the reason).
MQTT 3.1.1 cannot refuse a PUBLISH, so these notices are how the outcome becomes
visible. No answer within the wait means the command was dropped without a notice (a
forged or malformed envelope gets none, by design) or the broker is not answering:
never success.

``OperatorSettings`` is the small operator config file (``configs/operator.yaml``) that
holds the identity, keys and broker endpoint, so a call needs only the device and body.
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

from edge_core import yamlsrc
from edge_core.clock import Clock, SystemClock
from edge_core.envelope import ACCEPTANCE_TOPIC, REJECTION_TOPIC, sign_command
from edge_core.errors import ConfigError, FetchError
from edge_core.identity import check_identity
from edge_core.operators import EnvelopePolicy
from edge_runtime.tls import client_tls_context

__all__ = ["BrokerEndpoint", "OperatorSettings", "SendResult", "load_operator_settings", "load_signing_key",
           "send_command"]


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
    accepted: bool = False  # the broker announced it passed every check

    @property
    def ok(self) -> bool:
        return self.accepted and self.rejected is None

    @property
    def status(self) -> str:
        return "accepted" if self.ok else ("rejected" if self.rejected is not None else "no_answer")


@dataclass(frozen=True)
class OperatorSettings:
    """``configs/operator.yaml``: who signs, with which key, through which broker."""

    operator: str
    signing_key: Path
    endpoint: BrokerEndpoint
    kid: str | None = None
    ttl: int = 30
    wait: float = 5.0
    subtopic: str = "exec"
    source: str = "<operator settings>"


def load_operator_settings(path: Path) -> OperatorSettings:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read operator settings: {exc.strerror or exc}", source=str(path),
                          hint="pass -c with your operator file (example: configs/operator.yaml)") from exc
    source = str(path)
    base = path.resolve().parent
    top = yamlsrc.Section(yamlsrc.load(text, source=source), source=source, what="operator settings")

    def file(sec: yamlsrc.Section, key: str) -> Path:
        return (base / sec.take(key, str, required=True)).resolve()

    operator = top.take("operator", str, required=True)
    try:
        check_identity(operator)
    except Exception as exc:
        raise top.error("operator", f"operator: {exc}") from exc
    signing_key = file(top, "signing_key")
    kid = top.take("kid", str, None)
    ttl = top.take("ttl", int, 30)
    wait = top.take("wait", float, 5.0)
    subtopic = top.take("subtopic", str, "exec")
    if not 1 <= ttl <= 86400:
        raise top.error("ttl", "ttl must be 1 .. 86400 seconds (the broker's max_ttl applies too)")
    if not 0.1 <= wait <= 120:
        raise top.error("wait", "wait must be 0.1 .. 120 seconds")
    bsec = top.sub("broker", required=True)
    assert bsec is not None
    endpoint = BrokerEndpoint(host=bsec.take("host", str, "127.0.0.1"), port=bsec.take("port", int, 8883),
                              ca=file(bsec, "ca"), cert=file(bsec, "cert"), key=file(bsec, "key"))
    bsec.done()
    top.done()
    return OperatorSettings(operator=operator, signing_key=signing_key, endpoint=endpoint, kid=kid, ttl=ttl,
                            wait=wait, subtopic=subtopic, source=source)


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
    wait: float = 5.0,
    token: bytes | None = None,
) -> SendResult:
    """Sign (unless ``token`` is given, e.g. to demonstrate a replay), publish one command and
    wait up to ``wait`` seconds for the broker's accepted or rejected notice."""
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
            notice["_accepted"] = msg.topic.endswith("/cmd-accepted")
            notices.put(notice)

    subacks: queue.Queue[list[int]] = queue.Queue()

    def on_subscribe(c: mqtt.Client, u: object, mid: int, codes: Any, p: object) -> None:
        subacks.put([int(getattr(code, "value", code)) for code in codes])

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
        # subscribe to both notices first, so a fast answer cannot be missed
        notice_topics = [REJECTION_TOPIC.format(operator=operator), ACCEPTANCE_TOPIC.format(operator=operator)]
        client.subscribe([(t, 1) for t in notice_topics])
        try:
            codes = subacks.get(timeout=10)
        except queue.Empty as exc:
            raise FetchError("broker_refused", "no SUBACK for the notice topics") from exc
        refused = [t for t, code in zip(notice_topics, codes, strict=False) if code >= 0x80]
        if refused or len(codes) != len(notice_topics):
            raise ConfigError(
                f"the broker's ACL does not let operator {operator} subscribe {', '.join(refused) or notice_topics}",
                hint="grant the operator role 'allow subscribe operators/{device}/cmd-rejected' and "
                     "'allow subscribe operators/{device}/cmd-accepted' (configs/acl.yaml)",
            )
        client.publish(topic, token, qos=1).wait_for_publish(10)
        try:
            notice = notices.get(timeout=wait)
        except queue.Empty:
            return SendResult(jti=jti, topic=topic, rejected=None, accepted=False)
        if notice["_accepted"]:
            return SendResult(jti=jti, topic=topic, rejected=None, accepted=True)
        return SendResult(jti=jti, topic=topic, rejected=str(notice.get("reason")))
    finally:
        client.disconnect()
        client.loop_stop()
        client._reset_sockets()


def _jti_of(token: bytes) -> str:
    payload = token.split(b".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    return str(claims.get("jti", ""))
