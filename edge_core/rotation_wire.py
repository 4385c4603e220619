"""The certificate rotation wire format, shared by the agent and the reference device client.

Topics in the device's own scope, QoS 1, JSON messages ``{"v": 1, "id": ..., "type": ...}``
(docs/rotation.md). Serials travel as lowercase hex strings: X.509 serials reach 159
bits and JSON numbers lose precision past 2**53.
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "REQUEST_TOPIC",
    "RESPONSE_FILTER",
    "RESPONSE_TOPIC",
    "parse_serial",
    "serial_hex",
]

PROTOCOL_VERSION = 1
REQUEST_TOPIC = "devices/{device}/rotation/request"
RESPONSE_TOPIC = "devices/{device}/rotation/response"
RESPONSE_FILTER = "devices/+/rotation/response"
MAX_MESSAGE_BYTES = 16 * 1024  # a CSR is at most 8 KiB; a certificate plus chain a few KiB

_SERIAL_RE = re.compile(r"^[0-9a-f]{1,40}$")


def serial_hex(serial: int) -> str:
    return f"{serial:x}"


def parse_serial(value: object, name: str = "serial") -> int:
    """A serial from the wire; ``ValueError`` unless it is 1-40 lowercase hex digits."""
    if not isinstance(value, str) or not _SERIAL_RE.match(value):
        raise ValueError(f"{name} must be a lowercase hex string")
    return int(value, 16)
