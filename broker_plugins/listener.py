"""The device listener: TCP accept, connection cap, TLS 1.3 handshake, then the engine's protocol.

asyncio's ``start_server(ssl=...)`` handles handshake failures out of our sight and
cannot refuse over a cap before the handshake. We accept raw sockets ourselves
(``sock_accept``: nothing is read yet) and refuse at once over the cap (RST). The TCP
transport then belongs to one ``MqttConnection`` of the engine, which runs the TLS 1.3
handshake in memory under ``tls_handshake_timeout`` (so that flow control can pause TCP
itself: an SSL transport drops decrypted but unread bytes when the peer closes) and
enforces the packet size limit from the header. Every refusal is a ``conn.rejected`` or
``tls.rejected`` event with a reason code.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Callable

from broker_plugins.engine.protocol import MqttConnection
from broker_plugins.settings import Limits
from edge_core.events import SecurityEvents
from edge_runtime.logsetup import bind_connection

__all__ = ["DeviceListener"]


class DeviceListener:
    def __init__(
        self,
        protocol_factory: Callable[[], MqttConnection],
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        limits: Limits,
        events: SecurityEvents,
        listener_name: str = "default",
    ) -> None:
        self._factory = protocol_factory
        self.host = host
        self.port = port
        self._ssl = ssl_context
        self._limits = limits
        self._events = events
        self._name = listener_name
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._transports: set[asyncio.Transport] = set()
        self.active = 0

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family, backlog=1024, reuse_port=False)
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._accept_task = asyncio.create_task(self._accept_loop(), name=f"listener:{self.port}")

    @property
    def accepting(self) -> bool:
        """True while the accept loop runs (for ``/readyz``)."""
        return self._sock is not None and self._accept_task is not None and not self._accept_task.done()

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        if self._sock is not None:
            self._sock.close()
        for transport in list(self._transports):
            transport.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, address = await loop.sock_accept(self._sock)
            except OSError as exc:  # e.g. EMFILE: keep serving the connections we have
                self._events.emit("conn.error", "accept_failed", level="error", detail=str(exc))
                await asyncio.sleep(0.1)
                continue
            peer = f"{address[0]}:{address[1]}"
            if self.active >= self._limits.max_connections:
                self._events.emit("conn.rejected", "max_connections", level="warning", peer=peer,
                                  limit=self._limits.max_connections)
                # RST, not FIN: the client learns at once, and no TIME_WAIT piles up here
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                continue
            self.active += 1
            task = loop.create_task(self._serve(conn, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket, peer: str) -> None:
        bind_connection(peer=peer, listener=self._name)  # every line logged for this connection names it
        loop = asyncio.get_running_loop()
        protocol = self._factory()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.active -= 1
                if protocol.transport is not None:
                    self._transports.discard(protocol.transport)

        protocol.on_lost = release
        try:
            transport = await self._open(loop, conn, protocol, peer)
        except asyncio.CancelledError:
            release()
            conn.close()
            raise
        except Exception as exc:  # noqa: BLE001 - the listener must outlive any one connection
            self._events.emit("conn.error", type(exc).__name__, level="warning", peer=peer, detail=str(exc))
            transport = None
        if transport is None:
            release()
            conn.close()
            return
        if not released:
            self._transports.add(transport)

    async def _open(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
                    protocol: MqttConnection, peer: str) -> asyncio.Transport | None:
        """Wrap the accepted socket; the connection runs the TLS handshake itself, under its timeout."""
        if self._ssl is not None:
            protocol.use_tls(self._ssl, self._limits.tls_handshake_timeout)
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn)
        return transport
