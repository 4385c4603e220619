"""Reference device-side code: what firmware must do with what the broker delivers.

``DeviceCommandVerifier`` re-verifies every command on the device, independently of
the broker, so a command forged or replayed past the broker is still refused.
Pure Python, no network: the MQTT wiring lives elsewhere.
"""

from device_client.commands import DeviceCommandVerifier

__all__ = ["DeviceCommandVerifier"]
