"""Asking the gateway whether a certificate is revoked: the device side.

A device that cannot parse a CRL sends the certificate (or its issuer hash and serial)
with a fresh nonce to ``gateway/validation/<its id>/request`` and verifies the signed
answer on ``gateway/validation/<its id>/response`` with the gateway's validation public
key, provisioned at manufacture (``validation.pub``). The verification itself is
``edge_core.validation.verify_response``, the same code the test vectors pin.

    answer = await check_certificate(device, peer_cert_der, gateway_public_key=gw_key)
    if answer.good: ...            # anything else, and every exception, means: do not trust

Only ``good`` means good. ``revoked``, ``unknown``, a refused answer and no answer all
mean the certificate must not be trusted.

A refused answer (forged, for another request, too old...) does not end the wait: it is
recorded as a ``validation.response_rejected`` event and the device keeps listening, so
an injected message can delay the genuine answer but never replace it. If the deadline
passes, the last refusal is raised (``ResponseRefused``), or ``ValidationTimeout`` if
nothing arrived.

The device has one MQTT message stream. While ``check_certificate`` waits, messages on
other topics are handed to ``on_other_message`` (or dropped with a
``validation.message_skipped`` event), so run it between command loops or pass a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from datetime import timedelta

import aiomqtt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from device_client.client import DeviceClient
from edge_core.clock import Clock, SystemClock
from edge_core.errors import FetchError
from edge_core.events import SecurityEvents
from edge_core.validation import (
    DEFAULT_MAX_AGE,
    Answer,
    ResponseRefused,
    encode_request,
    issuer_hash_of_certificate,
    new_nonce,
    request_topic,
    response_topic,
    verify_response,
)

__all__ = ["ValidationTimeout", "check_certificate"]


class ValidationTimeout(FetchError):
    """No acceptable answer arrived in time. Treat the certificate as not validated."""

    def __init__(self, message: str) -> None:
        super().__init__("no_answer", message,
                         hint="check that the gateway agent runs its validation service and the ACL "
                              "grants this device its validation topics")


async def check_certificate(
    client: DeviceClient,
    subject: bytes | tuple[str, int],
    *,
    gateway_public_key: ec.EllipticCurvePublicKey | Sequence[ec.EllipticCurvePublicKey],
    timeout: float = 5.0,  # noqa: ASYNC109 - one deadline for subscribe, publish and answer; becomes ValidationTimeout here
    clock: Clock | None = None,
    max_age: timedelta = DEFAULT_MAX_AGE,
    events: SecurityEvents | None = None,
    on_other_message: Callable[[aiomqtt.Message], None] | None = None,
    nonce: str | None = None,
) -> Answer:
    """Ask the gateway about ``subject`` (DER certificate, or ``(issuer_hash, serial)``).

    Returns the verified ``Answer``; raises ``ResponseRefused`` or ``ValidationTimeout``.
    ``nonce`` is for tests only; normally a fresh 128-bit nonce is drawn per request.
    """
    clock = clock or SystemClock()
    events = events if events is not None else SecurityEvents("device_client.validation")
    device = client.config.device_id
    if isinstance(subject, bytes | bytearray):
        cert_der = bytes(subject)
        cert = x509.load_der_x509_certificate(cert_der)  # ValueError: our own input is broken
        expected_hash, expected_serial = issuer_hash_of_certificate(cert_der), cert.serial_number
        nonce = nonce or new_nonce()
        payload = encode_request(nonce, cert_der=cert_der)
    else:
        expected_hash, expected_serial = subject
        nonce = nonce or new_nonce()
        payload = encode_request(nonce, issuer_hash=expected_hash, serial=expected_serial)

    mqtt = client.mqtt
    topic = response_topic(device)
    last_refusal: ResponseRefused | None = None
    subscribed = False
    try:
        async with asyncio.timeout(timeout):
            granted = await mqtt.subscribe(topic, qos=1)
            subscribed = True
            if any(not isinstance(v := getattr(code, "value", code), int) or v >= 0x80 for code in granted):
                raise ValidationTimeout(f"the broker refused the subscription {topic}; no answer can arrive")
            await mqtt.publish(request_topic(device), payload, qos=1)
            async for message in mqtt.messages:
                if str(message.topic) != topic:
                    if on_other_message is not None:
                        on_other_message(message)
                    else:
                        events.emit("validation.message_skipped", device=device, topic=str(message.topic)[:120])
                    continue
                token = message.payload if isinstance(message.payload, bytes) else b""
                try:
                    answer = verify_response(
                        token, gateway_key=gateway_public_key, expected_nonce=nonce, expected_device=device,
                        now=clock.now(), max_age=max_age, expected_issuer_hash=expected_hash,
                        expected_serial=expected_serial,
                    )
                except ResponseRefused as refused:
                    last_refusal = refused
                    events.emit("validation.response_rejected", refused.reason, level="warning", device=device)
                    continue
                events.emit("validation.answer_accepted", answer.reason, device=device, status=answer.status,
                            serial=f"{expected_serial:x}")
                return answer
    except TimeoutError as exc:
        if last_refusal is not None:
            raise last_refusal from exc
        raise ValidationTimeout(f"no answer from the gateway within {timeout} s") from exc
    finally:
        if subscribed:
            with contextlib.suppress(aiomqtt.MqttError):
                await mqtt.unsubscribe(topic)
    raise ValidationTimeout("the connection ended before an answer arrived")  # pragma: no cover
