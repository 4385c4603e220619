"""The broker's connect event: ``$SYS/broker/clients/<id>/connected``, shared by broker and agent.

The broker publishes one message (QoS 1, not retained) each time it admits a session on a
device listener, never for the certificate test endpoint. Its payload is a small JSON object
that carries nothing secret::

    {"device": "meter-1", "serial": "1a2b", "at": "2026-12-02T02:45:00+00:00", "session_present": false}

``device`` is the identity of the client certificate (the same as the topic level), ``serial``
that certificate's serial in lowercase hex, ``at`` the broker's time in ISO 8601 UTC and
``session_present`` the CONNACK flag (the device's subscriptions survived from an earlier
connection). The topic is under ``$SYS``: only an ACL rule whose first level is ``$SYS``
reaches it (the gateway role's ``allow subscribe $SYS/broker/clients/#``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from edge_core.errors import CredentialError
from edge_core.identity import check_identity
from edge_core.rotation_wire import parse_serial
from edge_core.strictjson import json_object

__all__ = ["MAX_PRESENCE_BYTES", "PRESENCE_FILTER", "PRESENCE_TOPIC", "Presence", "parse_presence", "presence_device",
           "presence_payload"]

PRESENCE_TOPIC: Final = "$SYS/broker/clients/{device}/connected"
PRESENCE_FILTER: Final = "$SYS/broker/clients/+/connected"
MAX_PRESENCE_BYTES: Final = 1024


@dataclass(frozen=True)
class Presence:
    device: str
    serial: int
    at: datetime
    session_present: bool


def presence_payload(device: str, serial: int, at: datetime, *, session_present: bool) -> bytes:
    return json.dumps({"device": device, "serial": f"{serial:x}", "at": at.isoformat(),
                       "session_present": session_present}, separators=(",", ":")).encode()


def presence_device(topic: str) -> str | None:
    """The device level of a presence topic, unchecked; None if ``topic`` is not one."""
    levels = topic.split("/")
    if len(levels) != 5 or levels[:3] != ["$SYS", "broker", "clients"] or levels[4] != "connected":
        return None
    return levels[3]


def parse_presence(topic: str, payload: bytes) -> Presence:
    """One presence message; ``ValueError`` naming the problem if any part is off.

    The device is the topic's, checked as an identity; the payload must name the same one.
    """
    device = presence_device(topic)
    if device is None:
        raise ValueError(f"{topic[:200]!r} is not a presence topic")
    try:
        check_identity(device)
    except CredentialError as exc:
        raise ValueError(str(exc)) from exc
    if len(payload) > MAX_PRESENCE_BYTES:
        raise ValueError(f"presence payload of {len(payload)} bytes (at most {MAX_PRESENCE_BYTES})")
    body = json_object(payload, "presence payload")
    if body.get("device") != device:
        raise ValueError("presence payload names another device than its topic")
    at_text = body.get("at")
    present = body.get("session_present")
    if not isinstance(at_text, str) or not isinstance(present, bool):
        raise ValueError("presence payload lacks 'at' or 'session_present'")  # noqa: TRY004 - one error type
    try:
        at = datetime.fromisoformat(at_text)
    except ValueError as exc:
        raise ValueError(f"presence 'at' {at_text[:40]!r} is not an ISO 8601 time") from exc
    if at.tzinfo is None:
        raise ValueError("presence 'at' has no time zone")
    return Presence(device, parse_serial(body.get("serial")), at, present)
