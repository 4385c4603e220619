"""MQTT framing guard: refuse oversized packets before amqtt buffers them.

amqtt 0.12.1 reads the fixed header, then reads the whole remaining length (up to
256 MiB) into memory. ``FramingGuardReader`` sits between the socket and amqtt's
parser and follows MQTT framing itself: a type byte, a variable-length "remaining
length" (at most 4 bytes), then exactly that many bytes. When a remaining length is
over the limit it raises ``PacketTooLarge`` before a single body byte is read, which
makes amqtt's reader loop (or our CONNECT handling) close the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from amqtt.adapters import ReaderAdapter

__all__ = ["FramingGuardReader", "FramingViolation", "PacketTooLarge"]


class FramingViolation(Exception):
    """The byte stream does not follow MQTT framing; the connection must close."""

    reason = "malformed_frame"


class PacketTooLarge(FramingViolation):
    reason = "packet_too_large"


_HEADER, _LENGTH, _BODY = 0, 1, 2


class FramingGuardReader(ReaderAdapter):
    def __init__(
        self,
        reader: asyncio.StreamReader,
        *,
        max_packet_size: int,
        on_violation: Callable[[FramingViolation], None] | None = None,
    ) -> None:
        self._reader = reader
        self._max = max_packet_size
        self._on_violation = on_violation
        self._state = _HEADER
        self._length = 0
        self._multiplier = 1
        self._length_bytes = 0
        self._remaining = 0
        self.packets_read = 0

    def _fail(self, violation: FramingViolation) -> FramingViolation:
        if self._on_violation is not None:
            self._on_violation(violation)
        return violation

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            raise self._fail(FramingViolation("unbounded read refused by the framing guard"))
        if self._state == _BODY and n > self._remaining:
            raise self._fail(FramingViolation(f"read of {n} bytes crosses the packet boundary"))
        if self._state != _BODY and n != 1:
            raise self._fail(FramingViolation(f"header read of {n} bytes; MQTT headers are read bytewise"))
        data = await self._reader.readexactly(n)
        self._advance(data)
        return data

    def _advance(self, data: bytes) -> None:
        if self._state == _HEADER:
            self._state, self._length, self._multiplier, self._length_bytes = _LENGTH, 0, 1, 0
            return
        if self._state == _LENGTH:
            byte = data[0]
            self._length += (byte & 0x7F) * self._multiplier
            self._multiplier *= 128
            self._length_bytes += 1
            if byte & 0x80:
                if self._length_bytes >= 4:
                    raise self._fail(FramingViolation("remaining length uses more than 4 bytes"))
                return
            # 1 type byte + length bytes + body: the MQTT "packet size".
            size = 1 + self._length_bytes + self._length
            if size > self._max:
                raise self._fail(PacketTooLarge(f"packet of {size} bytes exceeds the {self._max}-byte limit"))
            self._remaining = self._length
            self._state = _BODY if self._length else _HEADER
            if not self._length:
                self.packets_read += 1
            return
        self._remaining -= len(data)
        if self._remaining == 0:
            self._state = _HEADER
            self.packets_read += 1

    def feed_eof(self) -> None:
        self._reader.feed_eof()
