"""A small raw MQTT 3.1.1 load generator over TLS: prebuilt packets, no client library.

Used by ``bench_broker.py``. It measures what a broker does, not what a Python client
library costs: packets are built once and written in batches. The connection rate comes from
``connload.c``, a single-threaded C client (compiled on demand into ``benchmarks/.cache/``):
Python TLS clients cannot open connections as fast as the brokers accept them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import ssl
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
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


CONNLOAD_SOURCE = Path(__file__).resolve().parent / "connload.c"
CONNLOAD_BINARY = Path(__file__).resolve().parent / ".cache" / "connload"


def connload_binary(source: Path = CONNLOAD_SOURCE, binary: Path = CONNLOAD_BINARY) -> Path:
    """``connload.c`` compiled with gcc against OpenSSL 3; rebuilt when the source is newer."""
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    gcc = shutil.which("gcc")
    if gcc is None:
        raise SystemExit("gcc not found: install the Debian packages gcc and libssl-dev "
                         "(scripts/system-packages.sh) to build benchmarks/connload.c")
    binary.parent.mkdir(parents=True, exist_ok=True)
    # compiled beside the target, then renamed: a concurrent or interrupted build never leaves half a binary
    fd, tmp_name = tempfile.mkstemp(prefix=".connload-", dir=binary.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        built = subprocess.run([gcc, "-O2", "-Wall", "-Wextra", "-o", str(tmp), str(source), "-lssl", "-lcrypto"],
                               capture_output=True, text=True, timeout=120, check=False)
        if built.returncode != 0:
            if "openssl/" in built.stderr and "No such file" in built.stderr:
                raise SystemExit("OpenSSL headers not found: install the Debian package libssl-dev "
                                 "(scripts/system-packages.sh) to build benchmarks/connload.c")
            raise SystemExit(f"building benchmarks/connload.c failed:\n{built.stderr}")
        tmp.replace(binary)
    finally:
        tmp.unlink(missing_ok=True)
    return binary


@dataclass(frozen=True)
class ConnRate:
    """What one ``connload`` run reports: failures are counted by reason, never dropped."""

    ok: int
    failed: int
    seconds: float
    conn_per_s: float
    errors: dict[str, int] = field(default_factory=dict)


def connection_rate(port: int, ca: Path, clients: list[tuple[Path, Path, str]], *, seconds: float | None = None,
                    count: int | None = None, timeout_s: float = 5.0) -> ConnRate:
    """TLS 1.3 handshake + CONNECT/CONNACK + DISCONNECT, repeated by ``connload`` for ``seconds`` or ``count``.

    One connection at a time per (certificate, key, client id) in ``clients``: our broker admits a
    client id only with the certificate of that identity, and no id is ever connected twice at once.
    """
    limit_s = (seconds or 0.0) + timeout_s + 30.0
    cmd = [str(connload_binary()), "--host", "127.0.0.1", "--port", str(port), "--servername", "localhost",
           "--cafile", str(ca), "--timeout", str(timeout_s), "--limit", str(limit_s)]
    if seconds is not None:
        cmd += ["--seconds", str(seconds)]
    if count is not None:
        cmd += ["--count", str(count)]
    for cert, key, client_id in clients:
        cmd += ["--client", str(cert), str(key), client_id]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s + 10, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"connload exited {done.returncode}: {done.stderr.strip()}")
    report = json.loads(done.stdout)
    return ConnRate(ok=int(report["ok"]), failed=int(report["failed"]), seconds=float(report["seconds"]),
                    conn_per_s=float(report["conn_per_s"]),
                    errors={str(k): int(v) for k, v in report["errors"].items()})


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
