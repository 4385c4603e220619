"""Command guard latency: what verifying signed commands adds, at 500 commands/s.

    python benchmarks/bench_command_latency.py [--quick]

One broker process (ours, uvloop, full checks). An operator publishes pre-signed
envelopes at a fixed rate, QoS 1, to a device's command topic (guarded: signature,
claims, replay cache) and, in a second phase, the same bytes to an unguarded topic of
the same shape. The device measures publish-to-delivery latency for each. The guard's
cost is the difference between the two distributions. The broker's replay cache refuses
commands issued in its first 30 s, so the run waits that out first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from benchmarks.bench_broker import free_port
from benchmarks.loadgen import Endpoint, open_session, publish_packet, read_packet, subscribe_packet
from edge_core.envelope import sign_command
from gateway_agent.pki import init_dev

ACL = """\
version: 1
roles:
  sensor:
    - allow subscribe devices/{device}/cmd/#
    - allow subscribe devices/{device}/plain/#
  operator:
    - allow publish devices/+/cmd/#
    - allow publish devices/+/plain/#
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def phase(port: int, certs: Path, tokens: list[bytes], topic: str, rate: float) -> list[float]:
    def ep(directory: str, name: str) -> Endpoint:
        return Endpoint(port, certs / "ca-chain.pem", certs / directory / f"{name}.crt",
                        certs / directory / f"{name}.key")

    dev_reader, dev_writer = await open_session(ep("devices", "bench-dev"), ep("devices", "bench-dev").context(),
                                                "bench-dev")
    dev_writer.write(subscribe_packet(1, topic + "/#", 1))
    first, body = await read_packet(dev_reader)
    assert first == 0x90 and body[2] != 0x80, f"device subscription to {topic}/# refused"
    op_reader, op_writer = await open_session(ep("operators", "alice"), ep("operators", "alice").context(), "alice")
    sent_at: dict[int, float] = {}
    latencies: list[float] = []

    async def drain_acks() -> None:
        while True:
            await read_packet(op_reader)

    async def receive() -> None:
        while len(latencies) < len(tokens):
            first, body = await read_packet(dev_reader)
            now = time.perf_counter()
            if first >> 4 != 3:
                continue
            topic_len = struct.unpack("!H", body[:2])[0]
            packet_id = body[2 + topic_len: 4 + topic_len]
            dev_writer.write(b"\x40\x02" + packet_id)
            index = int(bytes(body[:2 + topic_len]).rsplit(b"/", 1)[1])
            latencies.append(now - sent_at[index])

    acks = asyncio.create_task(drain_acks())
    receiver = asyncio.create_task(receive())
    interval = 1.0 / rate
    start = time.perf_counter()
    for n, token in enumerate(tokens):
        target = start + n * interval
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent_at[n] = time.perf_counter()
        op_writer.write(publish_packet(f"{topic}/{n}", token, 1, (n % 65535) + 1))
    await asyncio.wait_for(receiver, 30)
    acks.cancel()
    for writer in (dev_writer, op_writer):
        writer.transport.abort()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "command_latency.json")
    args = parser.parse_args()
    if args.quick:
        args.count = 500
    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp)
        init_dev(certs, device_ids=["bench-dev"], force=True)
        (certs / "acl.yaml").write_text(ACL)
        port = free_port()
        settings = certs / "broker.yaml"
        settings.write_text(f"""listener:
  bind: 127.0.0.1:{port}
  certfile: {certs / 'broker.crt'}
  keyfile: {certs / 'broker.key'}
  client_ca: {certs / 'ca-chain.pem'}
registry: {certs / 'registry.yaml'}
acl: {certs / 'acl.yaml'}
commands:
  operators: {certs / 'operators.yaml'}
""")
        key = serialization.load_pem_private_key((certs / "operators" / "alice-signing.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "broker_proc.py"), "ours",
                                 str(settings)], stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert proc.stdout is not None and proc.stdout.readline().startswith("READY")
            started = time.monotonic()
            print("waiting out the broker's 30 s post-start command blackout ...", file=sys.stderr)
            time.sleep(max(0.0, 31.5 - (time.monotonic() - started)))
            now = datetime.now(UTC)
            sign_started = time.perf_counter()
            tokens = [sign_command(key, issuer="alice", device="bench-dev", body={"op": "noop", "n": n},
                                   ttl=timedelta(seconds=120), now=now) for n in range(args.count)]
            sign_rate = args.count / (time.perf_counter() - sign_started)
            import uvloop

            guarded = uvloop.run(phase(port, certs, tokens, "devices/bench-dev/cmd/x", args.rate))
            plain = uvloop.run(phase(port, certs, tokens, "devices/bench-dev/plain/x", args.rate))
        finally:
            proc.terminate()
            proc.wait(10)
    report: dict[str, object] = {"rate_per_s": args.rate, "count": args.count, "sign_per_s": round(sign_rate)}
    for name, values in (("guarded", guarded), ("unguarded", plain)):
        ms = [v * 1000 for v in values]
        report[name] = {"p50_ms": round(statistics.median(ms), 3), "p99_ms": round(percentile(ms, 0.99), 3),
                        "max_ms": round(max(ms), 3), "delivered": len(ms)}
    g, u = report["guarded"], report["unguarded"]
    assert isinstance(g, dict) and isinstance(u, dict)
    report["guard_adds_p50_ms"] = round(g["p50_ms"] - u["p50_ms"], 3)
    report["guard_adds_p99_ms"] = round(g["p99_ms"] - u["p99_ms"], 3)
    print(f"{'topic':<11}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'delivered':>11}")
    for name in ("guarded", "unguarded"):
        r = report[name]
        assert isinstance(r, dict)
        print(f"{name:<11}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['max_ms']:>9.1f}{r['delivered']:>11}")
    print(f"guard adds p50 {report['guard_adds_p50_ms']} ms, p99 {report['guard_adds_p99_ms']} ms "
          f"at {args.rate:.0f} commands/s (target: p99 < 1 ms); operator signs {sign_rate:.0f}/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
