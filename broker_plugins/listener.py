"""The device listener we own: TCP accept, connection cap, TLS 1.3 handshake, framing guard.

amqtt's own TCP listener waits on a semaphore when ``max_connections`` is reached (so
extra clients queue instead of being refused), and asyncio's ``start_server(ssl=...)``
handles handshake failures out of our sight. We take the raw transport in
``connection_made``, pause reading before a single byte is consumed (so the
ClientHello cannot be swallowed by a plain reader), refuse at once over the cap,
upgrade with ``loop.start_tls`` under a timeout, and hand the stream to amqtt as an
"external" listener connection. Every refusal is a ``conn.rejected`` or
``tls.rejected`` event with a reason code.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

from amqtt.adapters import StreamWriterAdapter

from edge_core.events import SecurityEvents

from broker_plugins.framing import FramingGuardReader, FramingViolation
from broker_plugins.settings import Limits
from broker_plugins.tls import classify_tls_error

__all__ = ["DeviceListener"]


class _AcceptProtocol(asyncio.Protocol):
    """Holds a fresh connection still; the listener decides what happens to it."""

    def __init__(self, listener: DeviceListener) -> None:
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self._listener._admit(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class DeviceListener:
    def __init__(
        self,
        broker: Any,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        limits: Limits,
        events: SecurityEvents,
        listener_name: str = "default",
    ) -> None:
        self._broker = broker
        self.host = host
        self.port = port
        self._ssl = ssl_context
        self._limits = limits
        self._events = events
        self._name = listener_name
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._transports: set[asyncio.BaseTransport] = set()
        self.active = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _AcceptProtocol(self), self.host, self.port,
                                                reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for transport in list(self._transports):
            transport.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        if self._server is not None:
            await self._server.wait_closed()

    def _admit(self, transport: asyncio.Transport) -> None:
        peername = transport.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        if self.active >= self._limits.max_connections:
            self._events.emit("conn.rejected", "max_connections", level="warning", peer=peer,
                              limit=self._limits.max_connections)
            transport.abort()
            return
        self.active += 1
        self._transports.add(transport)
        task = asyncio.get_running_loop().create_task(self._serve(transport, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, transport: asyncio.Transport, peer: str) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**16)
        protocol = asyncio.StreamReaderProtocol(reader)
        current: asyncio.BaseTransport = transport
        try:
            if self._ssl is not None:
                tls_transport = await self._handshake(loop, transport, protocol, peer)
                if tls_transport is None:
                    return
                current = tls_transport
                self._transports.add(current)
                protocol.connection_made(tls_transport)
            else:
                transport.set_protocol(protocol)
                protocol.connection_made(transport)
                transport.resume_reading()
            assert isinstance(current, asyncio.Transport)
            writer = asyncio.StreamWriter(current, protocol, reader, loop)

            def on_violation(violation: FramingViolation) -> None:
                self._events.emit("conn.rejected", violation.reason, level="warning", peer=peer,
                                  detail=str(violation))

            guarded = FramingGuardReader(reader, max_packet_size=self._limits.max_packet_size,
                                         on_violation=on_violation)
            await self._broker.external_connected(guarded, StreamWriterAdapter(writer), self._name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # amqtt lets some errors escape its connection handler; never let them kill the listener
            self._events.emit("conn.error", type(exc).__name__, level="warning", peer=peer, detail=str(exc))
        finally:
            self.active -= 1
            for t in {transport, current}:
                self._transports.discard(t)
                if not t.is_closing():
                    t.abort()

    async def _handshake(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport,
                         protocol: asyncio.StreamReaderProtocol, peer: str) -> asyncio.Transport | None:
        assert self._ssl is not None
        timeout = self._limits.tls_handshake_timeout
        try:
            tls = await asyncio.wait_for(
                loop.start_tls(transport, protocol, self._ssl, server_side=True, ssl_handshake_timeout=timeout),
                timeout=timeout + 1.0,
            )
        except (ssl.SSLError, TimeoutError, ConnectionError, OSError, EOFError) as exc:
            reason, detail = classify_tls_error(exc)
            self._events.emit("tls.rejected", reason, level="warning", peer=peer, detail=detail)
            with contextlib.suppress(Exception):
                transport.abort()
            return None
        if tls is None:
            self._events.emit("tls.rejected", "tls_handshake_aborted", level="warning", peer=peer,
                              detail="connection closed during the handshake")
            return None
        return tls
