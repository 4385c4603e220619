"""Small MQTT client helpers shared by our aiomqtt/paho users."""

from __future__ import annotations

__all__ = ["suback_refused"]


def suback_refused(code: object) -> bool:
    """A SUBACK failure: 0x80 in MQTT 3.1.1 (clients hand back an int or a ReasonCode object)."""
    value = getattr(code, "value", code)
    return not isinstance(value, int) or value >= 0x80
