"""A tiny loopback-only HTTP endpoint: ``/status`` (JSON) and ``/metrics`` (Prometheus text).

It serves GET only, reads at most one small request line and headers, and binds to a
loopback address (the settings loader refuses anything else).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

__all__ = ["StatusServer", "prometheus_text"]

_MAX_REQUEST = 8192


def prometheus_text(prefix: str, counters: dict[str, dict[str, int]], gauges: dict[str, float]) -> str:
    lines = [f"# TYPE {prefix}_events_total counter"]
    for event, reasons in counters.items():
        for reason, n in reasons.items():
            lines.append(f'{prefix}_events_total{{event="{event}",reason="{reason}"}} {n}')
    for name, value in gauges.items():
        lines.append(f"# TYPE {prefix}_{name} gauge")
        lines.append(f"{prefix}_{name} {value}")
    return "\n".join(lines) + "\n"


class StatusServer:
    def __init__(self, host: str, port: int, *, status: Callable[[], dict[str, Any]],
                 metrics: Callable[[], str]) -> None:
        self.host, self.port = host, port
        self._status = status
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        # the stream limit caps the request head: a longer one raises LimitOverrunError
        self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True,
                                                  limit=_MAX_REQUEST)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            method, path, _ = head.split(b"\r\n", 1)[0].decode("ascii").split(" ", 2)
            if method != "GET":
                await self._reply(writer, 405, "text/plain", "GET only\n")
            elif path == "/status":
                await self._reply(writer, 200, "application/json", json.dumps(self._status(), indent=2) + "\n")
            elif path == "/metrics":
                await self._reply(writer, 200, "text/plain; version=0.0.4", self._metrics())
            else:
                await self._reply(writer, 404, "text/plain", "try /status or /metrics\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError,
                UnicodeDecodeError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
                await writer.wait_closed()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, code: int, ctype: str, body: str) -> None:
        data = body.encode("utf-8")
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[code]
        writer.write(
            f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n".encode("ascii") + data
        )
        await writer.drain()
