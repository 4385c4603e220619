"""A small raw MQTT 3.1.1 load generator over TLS: prebuilt packets, no client library.

Used by ``bench_broker.py``. It measures what a broker does, not what a Python client
library costs: packets are built once and written in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.tls import client_tls_context


def _string(value: str) -> bytes:
    data = value.encode("utf-8")
    return struct.pack("!H", len(data)) + data


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, clean: bool = True) -> bytes:
    body = _string("MQTT") + bytes([4, 0x02 if clean else 0]) + struct.pack("!H", 60) + _string(client_id)
    return b"\x10" + _length(len(body)) + body


def subscribe_packet(packet_id: int, topic: str, qos: int) -> bytes:
    body = struct.pack("!H", packet_id) + _string(topic) + bytes([qos])
    return b"\x82" + _length(len(body)) + body


def publish_packet(topic: str, payload: bytes, qos: int, packet_id: int = 0) -> bytes:
    body = _string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + _length(len(body)) + body


DISCONNECT = b"\xe0\x00"


@dataclass(frozen=True)
class Endpoint:
    port: int
    chain: Path
    cert: Path
    key: Path

    def context(self) -> ssl.SSLContext:
        return client_tls_context(self.chain, self.cert, self.key)


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, multiplier = 0, 1
    while True:
        byte = (await reader.readexactly(1))[0]
        length += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            break
        multiplier *= 128
    return first, await reader.readexactly(length) if length else b""


async def open_session(ep: Endpoint, ctx: ssl.SSLContext, client_id: str,
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", ep.port, ssl=ctx, server_hostname="localhost")
    writer.write(connect_packet(client_id))
    first, body = await read_packet(reader)
    if first != 0x20 or body[1] != 0:
        writer.close()
        raise ConnectionError(f"CONNACK refused for {client_id}: {body!r}")
    return reader, writer


async def connection_rate(endpoints: list[tuple[Endpoint, str]], seconds: float) -> tuple[int, float]:
    """Each worker: TLS handshake + CONNECT/CONNACK + DISCONNECT, repeated. Returns (count, elapsed)."""
    deadline = time.perf_counter() + seconds
    count = 0
    errors = 0

    async def worker(ep: Endpoint, client_id: str) -> None:
        nonlocal count, errors
        ctx = ep.context()
        while time.perf_counter() < deadline:
            try:
                _reader, writer = await open_session(ep, ctx, client_id)
                count += 1  # handshake + CONNECT/CONNACK done: that is what is measured
                writer.write(DISCONNECT)
                await writer.drain()
                # no TLS close_notify round trip: brokers differ there, and it is not the metric
                writer.transport.abort()
            except (OSError, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                errors += 1
                if errors > 50:
                    raise

    started = time.perf_counter()
    await asyncio.gather(*(worker(ep, cid) for ep, cid in endpoints))
    return count, time.perf_counter() - started


async def throughput(pub: tuple[Endpoint, str], sub: tuple[Endpoint, str], *, topic: str, qos: int,
                     messages: int, payload: bytes, window: int = 64, limit_s: float = 60.0) -> tuple[int, float]:
    """Messages delivered end to end per second, publisher -> broker -> subscriber."""
    sub_reader, sub_writer = await open_session(sub[0], sub[0].context(), sub[1])
    sub_writer.write(subscribe_packet(1, topic, qos))
    first, body = await read_packet(sub_reader)
    if first != 0x90 or body[2] == 0x80:
        raise ConnectionError(f"SUBSCRIBE refused: {body!r}")
    pub_reader, pub_writer = await open_session(pub[0], pub[0].context(), pub[1])
    received = 0
    done = asyncio.Event()
    last = 0.0

    async def consume() -> None:
        nonlocal received, last
        while received < messages:
            first, body = await read_packet(sub_reader)
            if first >> 4 != 3:
                continue
            received += 1
            last = time.perf_counter()
            if (first >> 1) & 3:
                topic_len = struct.unpack("!H", body[:2])[0]
                packet_id = body[2 + topic_len: 4 + topic_len]
                sub_writer.write(b"\x40\x02" + packet_id)
        done.set()

    consumer = asyncio.create_task(consume())
    started = time.perf_counter()
    if qos == 0:
        packet = publish_packet(topic, payload, 0)
        for sent in range(messages):
            pub_writer.write(packet)
            if sent % 256 == 255:
                await pub_writer.drain()
        await pub_writer.drain()
    else:
        inflight = asyncio.Semaphore(window)

        async def acks() -> None:
            for _ in range(messages):
                first, _body = await read_packet(pub_reader)
                if first >> 4 == 4:
                    inflight.release()

        ack_task = asyncio.create_task(acks())
        for n in range(messages):
            await inflight.acquire()
            pub_writer.write(publish_packet(topic, payload, 1, (n % 65535) + 1))
            if n % 32 == 31:
                await pub_writer.drain()
        await pub_writer.drain()
        await asyncio.wait_for(ack_task, limit_s)
    with contextlib.suppress(TimeoutError):  # a shortfall shows as delivered < 100%
        await asyncio.wait_for(done.wait(), limit_s)
    consumer.cancel()
    for writer in (pub_writer, sub_writer):
        writer.write(DISCONNECT)
        writer.close()
    elapsed = (last or time.perf_counter()) - started
    return received, elapsed


async def hold_connections(endpoints: list[tuple[Endpoint, str]], *, concurrency: int = 100,
                           limit_s: float = 300.0) -> tuple[list[asyncio.StreamWriter], int]:
    """Connect every (endpoint, client id) and keep the sessions open; returns (writers, failures).

    The client side skips verifying the broker's certificate (the broker still verifies each
    device's): building a verifying context per device would cost the client more than the broker.
    """
    writers: list[asyncio.StreamWriter] = []
    failures = 0
    gate = asyncio.Semaphore(concurrency)

    async def one(ep: Endpoint, client_id: str) -> None:
        nonlocal failures
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(ep.cert, ep.key)
        async with gate:
            try:
                _reader, writer = await asyncio.wait_for(open_session(ep, ctx, client_id), 30)
            except (OSError, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError):
                failures += 1
                return
        writers.append(writer)

    await asyncio.wait_for(asyncio.gather(*(one(ep, cid) for ep, cid in endpoints)), limit_s)
    return writers, failures
