"""The device listener we own: TCP accept, connection cap, TLS 1.3 handshake, framing guard.

amqtt's own TCP listener waits on a semaphore when ``max_connections`` is reached (so
extra clients queue instead of being refused), and asyncio's ``start_server(ssl=...)``
handles handshake failures out of our sight. We accept raw sockets ourselves
(``sock_accept``: nothing is read yet), refuse at once over the cap, then let
``connect_accepted_socket(ssl=...)`` run the TLS 1.3 handshake under a timeout, which
raises any handshake failure to us on asyncio and uvloop alike. (Upgrading an already
reading transport with ``start_tls`` loses the ClientHello on uvloop.) The stream is
handed to amqtt as an "external" listener connection. Every refusal is a
``conn.rejected`` or ``tls.rejected`` event with a reason code.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from typing import Any

from amqtt.adapters import StreamWriterAdapter

from broker_plugins.framing import FramingGuardReader, FramingViolation
from broker_plugins.settings import Limits
from broker_plugins.tls import classify_tls_error
from edge_core.events import SecurityEvents
from edge_runtime.logsetup import bind_connection

__all__ = ["DeviceListener"]


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
        reader = asyncio.StreamReader(limit=2**16)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport: asyncio.Transport | None = None
        try:
            transport = await self._open(loop, conn, protocol, peer)
            if transport is None:
                return
            self._transports.add(transport)
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)

            def on_violation(violation: FramingViolation) -> None:
                self._events.emit("conn.rejected", violation.reason, level="warning", peer=peer,
                                  detail=str(violation))

            guarded = FramingGuardReader(reader, max_packet_size=self._limits.max_packet_size,
                                         on_violation=on_violation)
            await self._broker.external_connected(guarded, StreamWriterAdapter(writer), self._name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the listener must outlive any one connection
            # amqtt lets some errors escape its connection handler; never let them kill the listener
            self._events.emit("conn.error", type(exc).__name__, level="warning", peer=peer, detail=str(exc))
        finally:
            self.active -= 1
            if transport is not None:
                self._transports.discard(transport)
                if not transport.is_closing():
                    transport.abort()
            else:
                conn.close()

    async def _open(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
                    protocol: asyncio.StreamReaderProtocol, peer: str) -> asyncio.Transport | None:
        """Wrap the accepted socket; with TLS, complete the handshake or report why not."""
        if self._ssl is None:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn)
            return transport
        timeout = self._limits.tls_handshake_timeout
        try:
            transport, _ = await asyncio.wait_for(
                loop.connect_accepted_socket(lambda: protocol, conn, ssl=self._ssl,
                                             ssl_handshake_timeout=timeout),
                timeout=timeout + 1.0,
            )
        except (ssl.SSLError, TimeoutError, ConnectionError, OSError, EOFError) as exc:
            reason, detail = classify_tls_error(exc)
            self._events.emit("tls.rejected", reason, level="warning", peer=peer, detail=detail)
            return None
        return transport
