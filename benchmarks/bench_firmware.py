"""Firmware verification speed and the manifest check the broker adds to an offer.

    python benchmarks/bench_firmware.py [--quick]

Measures:
- ``verify_offer`` per second with p50/p99 (a 2-of-3 signed manifest, pinned root), and the
  same with a root rotation carried in the offer (root v2: two more signature checks);
- the streamed image check (SHA-256 plus size cap, ``ImageCheck``) in MiB/s;
- through a real broker process (ours, uvloop, full checks): publish-to-delivery latency of
  the same offer bytes on the guarded topic ``devices/{d}/firmware/offer`` and on an
  unguarded topic of the same shape, at a fixed rate, QoS 1. The guard's cost is the
  difference. Every message must arrive: loss fails the run.

Prints a table, then one JSON line for CI trend tracking; writes benchmarks/results/firmware.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric import ec

from benchmarks.bench_broker import free_port
from benchmarks.loadgen import Endpoint, open_session, publish_packet, read_packet, subscribe_packet
from edge_core.firmware import (
    MANIFEST_TYPE,
    ROOT_TYPE,
    ImageCheck,
    SoftwareSigner,
    VersionFloor,
    make_manifest,
    make_offer,
    make_root,
    parse_root_document,
    sign_envelope,
    verify_offer,
)
from edge_core.registry import DeviceEntry, Registry, dump_registry, parse_registry
from gateway_agent.pki import init_dev

NOW = datetime.now(UTC)
CLASS = "pump-ctl"
ACL = """\
version: 1
devices:
  bench-dev:
    - allow subscribe devices/bench-dev/firmware/#
  bench-pub:
    - allow publish devices/+/firmware/#
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Release:
    def __init__(self) -> None:
        self.root_keys = [SoftwareSigner(ec.generate_private_key(ec.SECP256R1())) for _ in range(2)]
        self.release = [SoftwareSigner(ec.generate_private_key(ec.SECP256R1())) for _ in range(3)]
        self.pinned = self.root(1)
        self.image = os.urandom(1 << 20)

    def root(self, version: int) -> bytes:
        keys = [k.public_key() for k in (*self.root_keys, *self.release)]
        body = make_root(version=version, expires=NOW + timedelta(days=365), keys=keys,
                         root_keyids=[k.keyid for k in self.root_keys], root_threshold=2,
                         release_keyids=[k.keyid for k in self.release], release_threshold=2)
        return sign_envelope(ROOT_TYPE, body, self.root_keys)

    def offer(self, *, rotated: bool = False, url: str = "https://gw/firmware/x") -> bytes:
        body = make_manifest(device_class=CLASS, version=2, image_sha256=hashlib.sha256(self.image).hexdigest(),
                             size=len(self.image), not_before=NOW - timedelta(hours=1),
                             expires=NOW + timedelta(days=30))
        manifest = sign_envelope(MANIFEST_TYPE, body, self.release[:2])
        return make_offer(manifest, roots=[self.root(2)] if rotated else [], url=url)


def bench_verify(release: Release, n: int, *, rotated: bool) -> dict[str, float]:
    offer = release.offer(rotated=rotated)
    root = parse_root_document(release.pinned)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        verify_offer(offer, root=root, device_class=CLASS, floor=VersionFloor(1), now=NOW)
        times.append(time.perf_counter() - t0)
    us = sorted(t * 1e6 for t in times)
    return {"per_s": round(n / sum(times)), "p50_us": round(statistics.median(us), 1),
            "p99_us": round(percentile(us, 0.99), 1), "offer_bytes": len(offer)}


def bench_image(release: Release, mib: int) -> float:
    offer = verify_offer(release.offer(), root=parse_root_document(release.pinned), device_class=CLASS,
                         floor=VersionFloor(1), now=NOW)
    t0 = time.perf_counter()
    for _ in range(mib):
        check = ImageCheck(offer.manifest)
        for i in range(0, len(release.image), 16384):
            check.update(release.image[i:i + 16384])
        check.finish()
    return mib / (time.perf_counter() - t0)


async def phase(port: int, certs: Path, payloads: list[bytes], topic: str, rate: float) -> list[float]:
    def ep(name: str) -> Endpoint:
        return Endpoint(port, certs / "ca-chain.pem", certs / "devices" / f"{name}.crt",
                        certs / "devices" / f"{name}.key")

    dev_reader, dev_writer = await open_session(ep("bench-dev"), ep("bench-dev").context(), "bench-dev")
    dev_writer.write(subscribe_packet(1, "devices/bench-dev/firmware/#", 1))
    first, body = await read_packet(dev_reader)
    assert first == 0x90 and body[2] != 0x80, "device subscription refused"
    pub_reader, pub_writer = await open_session(ep("bench-pub"), ep("bench-pub").context(), "bench-pub")
    count = len(payloads)
    sent_at: list[float] = []
    latencies: list[float] = []

    async def drain_acks() -> None:
        while True:
            await read_packet(pub_reader)

    async def receive() -> None:
        import struct

        while len(latencies) < count:
            first, body = await read_packet(dev_reader)
            now = time.perf_counter()
            if first >> 4 != 3:
                continue
            topic_len = struct.unpack("!H", body[:2])[0]
            dev_writer.write(b"\x40\x02" + body[2 + topic_len: 4 + topic_len])
            latencies.append(now - sent_at[len(latencies)])  # QoS 1 on one session: in order

    acks = asyncio.create_task(drain_acks())
    receiver = asyncio.create_task(receive())
    start = time.perf_counter()
    for n in range(count):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent_at.append(time.perf_counter())
        pub_writer.write(publish_packet(topic, payloads[n], 1, (n % 65535) + 1))
    try:
        await asyncio.wait_for(receiver, 30)
    except TimeoutError:
        raise SystemExit(f"LOSS: {len(latencies)} of {count} offers delivered on {topic}") from None
    acks.cancel()
    for writer in (dev_writer, pub_writer):
        writer.transport.abort()
    return latencies


def bench_broker(release: Release, count: int, rate: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp)
        init_dev(certs, device_ids=["bench-dev", "bench-pub"], force=True)
        registry = parse_registry((certs / "registry.yaml").read_bytes())
        devices = dict(registry.devices)
        e = devices["bench-dev"]
        devices["bench-dev"] = DeviceEntry(device_id="bench-dev", pins=e.pins, roles=e.roles,
                                           attributes={**e.attributes, "firmware_class": CLASS})
        (certs / "registry.yaml").write_text(dump_registry(Registry(devices=devices)))
        (certs / "acl.yaml").write_text(ACL)
        (certs / "root.json").write_bytes(release.pinned)
        port = free_port()
        settings = certs / "broker.yaml"
        settings.write_text(f"""listener:
  bind: 127.0.0.1:{port}
  certfile: {certs / 'broker.crt'}
  keyfile: {certs / 'broker.key'}
  client_ca: {certs / 'ca-chain.pem'}
registry: {certs / 'registry.yaml'}
acl: {certs / 'acl.yaml'}
firmware:
  root: {certs / 'root.json'}
  state: {certs / 'firmware-state.json'}
""")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "broker_proc.py"), "ours",
                                 str(settings)], stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert proc.stdout is not None and proc.stdout.readline().startswith("READY")
            import uvloop

            # distinct offers (the unsigned url differs): the guard verifies every one in full;
            # one offer repeated: a rollout, where the broker authenticates it once
            distinct = [release.offer(url=f"https://gw/firmware/{n}") for n in range(count // 2)]
            same = [release.offer()] * (count // 2)
            results: dict[str, list[float]] = {"guarded": [], "guarded_repeat": [], "unguarded": []}
            offer_topic, plain_topic = "devices/bench-dev/firmware/offer", "devices/bench-dev/firmware/plain"
            for half in (distinct[: count // 4], distinct[count // 4:]):  # interleaved: noise hits all alike
                results["guarded"] += uvloop.run(phase(port, certs, half, offer_topic, rate))
                results["guarded_repeat"] += uvloop.run(phase(port, certs, same[: len(half)], offer_topic, rate))
                results["unguarded"] += uvloop.run(phase(port, certs, half, plain_topic, rate))
        finally:
            proc.terminate()
            proc.wait(10)
    report: dict[str, object] = {"rate_per_s": rate, "count": count}
    for name, values in results.items():
        ms = [v * 1000 for v in values]
        report[name] = {"p50_ms": round(statistics.median(ms), 3), "p99_ms": round(percentile(ms, 0.99), 3),
                        "delivered": len(ms)}
    g, u = report["guarded"], report["unguarded"]
    assert isinstance(g, dict) and isinstance(u, dict)
    report["guard_adds_p50_ms"] = round(g["p50_ms"] - u["p50_ms"], 3)
    report["guard_adds_p99_ms"] = round(g["p99_ms"] - u["p99_ms"], 3)
    r = report["guarded_repeat"]
    assert isinstance(r, dict)
    report["repeat_adds_p50_ms"] = round(r["p50_ms"] - u["p50_ms"], 3)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "firmware.json")
    args = parser.parse_args()
    n, mib, count, rate = (200, 8, 100, 50.0) if args.quick else (3000, 64, 2000, 100.0)
    release = Release()
    plain = bench_verify(release, n, rotated=False)
    rotated = bench_verify(release, n // 2, rotated=True)
    image = bench_image(release, mib)
    broker = bench_broker(release, count, rate)
    print(f"{'check':<34}{'per s':>9}{'p50 us':>9}{'p99 us':>9}")
    print(f"{'verify_offer (2 of 3 signatures)':<34}{plain['per_s']:>9}{plain['p50_us']:>9}{plain['p99_us']:>9}")
    print(f"{'verify_offer + root rotation':<34}{rotated['per_s']:>9}{rotated['p50_us']:>9}{rotated['p99_us']:>9}")
    print(f"image stream check (SHA-256, size cap): {image:.0f} MiB/s")
    print(f"broker, offers at {rate:.0f}/s QoS 1{'':<12}{'p50 ms':>9}{'p99 ms':>9}{'delivered':>11}")
    for name in ("guarded", "guarded_repeat", "unguarded"):
        v = broker[name]
        assert isinstance(v, dict)
        print(f"  {name:<43}{v['p50_ms']:>9.3f}{v['p99_ms']:>9.3f}{v['delivered']:>11}")
    print(f"the manifest check adds p50 {broker['guard_adds_p50_ms']} ms, p99 {broker['guard_adds_p99_ms']} ms "
          f"per distinct offer at the broker; a repeated offer (rollout) adds p50 {broker['repeat_adds_p50_ms']} ms")
    result = {"verify": plain, "verify_rotated": rotated, "image_mib_per_s": round(image), "broker": broker,
              "quick": args.quick}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
