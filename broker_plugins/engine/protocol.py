"""One ``asyncio.Protocol`` per client connection: bytes in, packets decoded in memory, batched writes.

``data_received`` appends to a buffer and decodes every whole packet in it (never a
byte-by-byte await). Packets of one connection are handled strictly in order: when a
security hook really suspends (rare: nearly all complete at once, see ``eager``),
reading pauses until it is done. Writes are collected and handed to the transport
once per loop turn (one TLS record batch instead of one per packet).

Timers, all per connection and lazily re-armed (no task, no scan of all connections):

- no CONNECT within ``connect_timeout``: ``conn.rejected reason=connect_timeout``;
- no packet within 1.5 x the keep-alive: ``session.keepalive_timeout``, the will fires;
- the transport stayed above its write high-water mark for ``write_timeout`` (a reader
  that stopped reading): ``session.cut reason=write_timeout`` and ``transport.abort()``.

Protocol violations are ``mqtt.protocol_violation`` events with the codec's reason code,
then the connection closes (a will fires: the client did not say goodbye).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import TYPE_CHECKING, Any

from broker_plugins.engine import codec
from broker_plugins.engine.codec import Connect, PacketId, ProtocolError, Publish, Subscribe, Unsubscribe
from broker_plugins.tls import classify_tls_error

if TYPE_CHECKING:
    from broker_plugins.engine.core import Engine
    from broker_plugins.engine.session import Session

__all__ = ["MqttConnection"]

#: Bytes the transport may hold before we stop writing to it and queue in the session instead.
WRITE_HIGH_WATER = 512 * 1024


class MqttConnection(asyncio.Protocol):
    __slots__ = (
        "_buf",
        "_eof",
        "_finished",
        "_flush_handle",
        "_handshake_timeout",
        "_held_acks",
        "_holds",
        "_incoming",
        "_keepalive_handle",
        "_loop",
        "_lost",
        "_out",
        "_out_bytes",
        "_outgoing",
        "_paused",
        "_sslobj",
        "_timer",
        "_write_paused_at",
        "closing",
        "connected",
        "done_reading",
        "engine",
        "graceful",
        "last_rx",
        "listener",
        "on_lost",
        "peer",
        "session",
        "ssl_object",
        "taken_over",
        "test_only",
        "throttled_by",
        "tls",
        "transport",
    )

    def __init__(self, engine: Engine, *, listener: str = "default", test_only: bool = False) -> None:
        self.engine = engine
        self.listener = listener
        self.test_only = test_only
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.peer = "?"
        self.ssl_object: Any = None
        self.connected = False  # CONNECT accepted
        self.closing = False  # nothing more is written
        self.done_reading = False  # nothing more is handled: DISCONNECT, a violation, a close or abort
        self._lost = False  # the transport is gone (bytes already received may still be handled)
        self._finished = False  # the engine was told the connection ended
        self.graceful = False  # DISCONNECT received: no will
        self.taken_over = False
        self._paused = False  # the transport is above its high-water mark
        self.last_rx = 0.0
        self.on_lost: Any = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        self._holds = 0  # reasons to stop reading: a suspended hook, a full queue downstream
        self.throttled_by: Session | None = None
        self._held_acks: list[bytes] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._write_paused_at = 0.0
        self._loop = asyncio.get_running_loop()
        self._eof = False  # the peer's FIN arrived while packets still waited in the buffer
        # TLS in memory over the TCP transport: pausing reads then pauses TCP itself, so bytes
        # and FIN wait in the kernel (an SSL transport drops decrypted-but-unread data at EOF)
        self.tls: ssl.SSLContext | None = None
        self._handshake_timeout = 5.0
        self._sslobj: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()

    def use_tls(self, context: ssl.SSLContext, handshake_timeout: float) -> None:
        """Run a TLS server handshake on this connection before any MQTT (call before it is made)."""
        self.tls = context
        self._handshake_timeout = handshake_timeout

    # -- asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.last_rx = self._loop.time()
        self.engine.connection_opened(self)
        if self.tls is not None:
            self._sslobj = self.tls.wrap_bio(self._incoming, self._outgoing, server_side=True)
            self._timer = self._loop.call_later(self._handshake_timeout, self._tls_timeout)
        else:
            self._timer = self._loop.call_later(self.engine.limits.connect_timeout, self._connect_timeout)

    def data_received(self, data: bytes) -> None:
        if self.done_reading:
            return
        self.last_rx = self._loop.time()
        if self._sslobj is None:
            self._buf += data
        else:
            self._incoming.write(data)
            if self.ssl_object is None and not self._handshake():
                return
            self._decrypt()
        if not self._holds:
            self._process()

    def eof_received(self) -> bool:
        if self._holds and self._buf and not self.done_reading:
            self._eof = True  # finish the packets that arrived first, then close (see _process)
            return True
        return False  # close our side too

    # -- TLS ------------------------------------------------------------------------

    def _handshake(self) -> bool:
        sslobj = self._sslobj
        assert sslobj is not None
        try:
            sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._send_tls()
            return False
        except (ssl.SSLError, OSError) as exc:
            self._send_tls()
            self._tls_refused(exc)
            return False
        self._send_tls()
        self.ssl_object = sslobj
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self.engine.limits.connect_timeout, self._connect_timeout)
        return True

    def _tls_refused(self, exc: BaseException) -> None:
        reason, detail = classify_tls_error(exc)
        self.engine.events.emit("tls.rejected", reason, level="warning", peer=self.peer, detail=detail)
        self.abort()

    def _tls_timeout(self) -> None:
        self._timer = None
        if self.ssl_object is None and not self.closing:
            self._tls_refused(TimeoutError())

    def _decrypt(self) -> None:
        sslobj = self._sslobj
        assert sslobj is not None
        buf = self._buf
        while True:
            try:
                chunk = sslobj.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: what came before it is handled
                break
            except ssl.SSLError as exc:
                self.engine.events.emit("conn.rejected", "tls_error", level="warning", peer=self.peer,
                                        detail=str(exc)[:200])
                self.abort()
                return
            if not chunk:
                break
            buf += chunk
        if self._outgoing.pending:  # post-handshake messages (key updates)
            self._send_tls()

    def _send_tls(self) -> None:
        if self._outgoing.pending and self.transport is not None and not self._lost:
            self.transport.write(self._outgoing.read())

    @property
    def writable(self) -> bool:
        """Whether more may be written now: the transport drains and this turn's batch is not full."""
        return not self._paused and not self.closing and self._out_bytes < WRITE_HIGH_WATER

    def pause_writing(self) -> None:
        self._paused = True
        self._write_paused_at = self._loop.time()
        self._loop.call_later(self.engine.limits.write_timeout, self._check_write_timeout, self._write_paused_at)

    def resume_writing(self) -> None:
        self._paused = False  # the transport is above its high-water mark
        self._write_paused_at = 0.0
        if self.session is not None and self.session.connection is self:
            self.engine.drain(self.session)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tls is not None and self.ssl_object is None and not self.closing:
            reason, detail = classify_tls_error(exc or ConnectionResetError())
            self.engine.events.emit("tls.rejected", reason, level="warning", peer=self.peer, detail=detail)
        self.closing = True
        self._lost = True
        for handle in (self._timer, self._keepalive_handle, self._flush_handle):
            if handle is not None:
                handle.cancel()
        self._out.clear()
        if self._holds and self._buf and not self.done_reading:
            # packets that arrived before the peer left (a burst, then DISCONNECT and close) wait
            # behind flow control: they are handled when it lets go, then the session ends
            return
        self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.done_reading = True
        if self.on_lost is not None:
            self.on_lost()
        self.engine.connection_closed(self)

    # -- reading ----------------------------------------------------------------------

    def _process(self) -> None:
        buf = self._buf
        pos = 0
        max_size = self.engine.limits.max_packet_size
        try:
            while not self._holds and not self.done_reading:
                frame = codec.next_frame(buf, pos, max_size)
                if frame is None:
                    break
                first, start, end = frame
                body = bytes(buf[start:end])
                pos = end
                self._handle(codec.decode(first, body))
        except ProtocolError as exc:
            self.violation(exc.reason, str(exc))
        finally:
            if pos:
                del buf[:pos]
        if self._lost and not self._holds:
            self._finish()  # the transport left while packets waited: they are handled now
        elif self._eof and not self._holds and not self.done_reading:
            self.close()  # the peer's FIN came behind these packets

    def block(self) -> None:
        """Stop handling packets (and reading) until a matching ``unblock``."""
        self._holds += 1
        if self._holds == 1 and self.transport is not None and not self._lost:
            self.transport.pause_reading()

    def unblock(self) -> None:
        self._holds -= 1
        if self._holds or (self.done_reading and not self._lost):
            return
        if self.transport is not None and not self._lost:
            self.transport.resume_reading()
        self._loop.call_soon(self._process_if_idle)

    def _process_if_idle(self) -> None:
        if not self._holds and (not self.done_reading or (self._lost and not self._finished)):
            self._process()

    def _handle(self, packet: codec.Packet) -> None:
        engine = self.engine
        if not self.connected:
            if not isinstance(packet, Connect):
                raise ProtocolError("expected_connect", "the first packet must be CONNECT")
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.connected = True
            engine.connect(self, packet)
            return
        session = self.session
        if session is None:  # CONNECT still being decided: unreachable while blocked
            raise ProtocolError("expected_connect", "packet before the CONNECT was accepted")
        if isinstance(packet, Publish):
            engine.publish(self, session, packet)
        elif isinstance(packet, PacketId):
            engine.packet_id(self, session, packet)
        elif isinstance(packet, Subscribe):
            engine.subscribe(self, session, packet)
        elif isinstance(packet, Unsubscribe):
            engine.unsubscribe(self, session, packet)
        elif packet == codec.PINGREQ:
            self.write(codec.PINGRESP_BYTES)
        elif packet == codec.DISCONNECT:
            self.graceful = True
            session.will = None
            self.close()
            self.done_reading = True
        else:
            raise ProtocolError("second_connect", "a second CONNECT on the same connection")

    # -- writing ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.closing:
            return
        self._out.append(data)
        self._out_bytes += len(data)
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        out = self._out
        if not out or self.closing or self.transport is None:
            out.clear()
            self._out_bytes = 0
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_bytes = 0
        sslobj = self._sslobj
        if sslobj is None:
            self.transport.write(data)
        else:
            try:
                view = memoryview(data)
                written = 0
                while written < len(data):
                    written += sslobj.write(view[written:])
            except ssl.SSLError as exc:
                self.engine.events.emit("conn.error", "tls_write_failed", level="warning", peer=self.peer,
                                        detail=str(exc)[:200])
                self.abort()
                return
            self.transport.write(self._outgoing.read())
        session = self.session
        if session is not None and session.queue and self.writable:
            self.engine.drain(session)  # the batch was full: go on with what waited

    def ack(self, data: bytes, *, wait_for_store: bool) -> None:
        """Send a PUBACK/PUBREC in order; after the store's commit when the PUBLISH was written to it."""
        if self._held_acks is not None:
            self._held_acks.append(data)
            return
        if not wait_for_store:
            self.write(data)
            return
        self._held_acks = [data]
        self.engine.store.after_commit(self._release_acks)

    def _release_acks(self, error: BaseException | None) -> None:
        acks, self._held_acks = self._held_acks or [], None
        if error is not None:
            # not stored, so not acknowledged: the client resends after reconnecting
            self.abort()
            return
        for data in acks:
            self.write(data)

    # -- closing ----------------------------------------------------------------------

    def close(self) -> None:
        """Flush what is queued and close (after DISCONNECT or a refused CONNECT)."""
        self.done_reading = True
        if self.closing or self.transport is None:
            return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush()
        if self._sslobj is not None and self.ssl_object is not None and not self._lost:
            with contextlib.suppress(ssl.SSLError):
                self._sslobj.unwrap()  # close_notify; the peer's answer is not awaited
            self._send_tls()
        self.closing = True
        self.transport.close()

    def abort(self) -> None:
        """Drop the connection now, unsent bytes and all (takeover, cut, stalled reader)."""
        self.done_reading = True
        if self.transport is not None:
            self.closing = True
            self.transport.abort()

    def violation(self, reason: str, detail: str) -> None:
        session = self.session
        # an oversized packet is a resource refusal, reported as before the engine existed
        event = "conn.rejected" if reason == "packet_too_large" else "mqtt.protocol_violation"
        self.engine.events.emit(event, reason, level="warning", peer=self.peer,
                                device=session.client_id if session else None, detail=detail[:200])
        self.close()

    def start_keepalive(self, keep_alive: int) -> None:
        if keep_alive > 0:
            self._arm_keepalive(keep_alive * 1.5)

    def _arm_keepalive(self, grace: float) -> None:
        self._keepalive_handle = self._loop.call_at(self.last_rx + grace, self._check_keepalive, grace)

    def _check_keepalive(self, grace: float) -> None:
        if self.closing:
            return
        if self._holds:
            self.last_rx = self._loop.time()  # we stopped reading, not the client: not silence
        if self._loop.time() - self.last_rx >= grace:
            session = self.session
            self.engine.events.emit("session.keepalive_timeout", "keepalive_timeout", level="warning",
                                    device=session.client_id if session else None, peer=self.peer,
                                    keep_alive=round(grace / 1.5, 1))
            self.abort()
            return
        self._arm_keepalive(grace)

    def _connect_timeout(self) -> None:
        self._timer = None
        if not self.connected and not self.closing:
            self.engine.events.emit("conn.rejected", "connect_timeout", level="warning", peer=self.peer)
            self.abort()

    def _check_write_timeout(self, paused_at: float) -> None:
        if self.closing or not self._paused or self._write_paused_at != paused_at:
            return
        session = self.session
        assert self.transport is not None
        self.engine.events.emit("session.cut", "write_timeout", level="warning",
                                device=session.client_id if session else None, peer=self.peer,
                                unsent_bytes=self.transport.get_write_buffer_size(),
                                queued=len(session.queue) if session else 0)
        self.abort()
