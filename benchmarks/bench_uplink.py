"""Uplink store-and-forward benchmark: 100,000 queued messages, enqueue and drain, disk use.

1. Enqueue: the uplink's write path (batches of 256 in one transaction, as it takes them from
   the local broker) into the SQLite WAL queue, for both durability modes.
2. Drain to the cloud: the queue filled with the outage backlog, then the real uplink service
   drains it over TLS 1.3 to a real mosquitto (the dev cloud: client certificates, ACL), QoS 1,
   deleting each message on its PUBACK. A C client (``mosquitto_sub``) on the cloud counts what
   arrived: fewer than queued is a failure, not a slow figure.

    .venv/bin/python benchmarks/bench_uplink.py            # 100,000 messages
    .venv/bin/python benchmarks/bench_uplink.py --quick    # 5,000 (smoke run)

Prints a table and one JSON line; writes benchmarks/results/uplink.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_core.events import SecurityEvents  # noqa: E402
from edge_core.uplink_rules import QueuePolicy, load_uplink_config  # noqa: E402
from gateway_agent.pki import init_dev  # noqa: E402
from gateway_agent.uplink import UplinkService  # noqa: E402
from gateway_agent.uplink_devcloud import MosquittoCloud, enroll_dev_uplink, free_port, init_cloud_pki  # noqa: E402
from gateway_agent.uplink_queue import StoreAndForwardQueue  # noqa: E402

PAYLOAD = 64
TOPIC = "sites/plant-a/gateways/gw-01/devices/sensor-{:04d}/telemetry/temp"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def enqueue(work: Path, count: int, durability: str) -> dict[str, Any]:
    policy = QueuePolicy(path=work / f"enqueue-{durability}.db", max_bytes=1 << 34, durability=durability)
    queue = StoreAndForwardQueue(policy)
    batch = 256
    started = time.perf_counter()
    for base in range(0, count, batch):
        queue.put_many([(TOPIC.format(n % 1000), n.to_bytes(8, "big") * (PAYLOAD // 8), 1)
                        for n in range(base, min(count, base + batch))])
    elapsed = time.perf_counter() - started
    stats = queue.stats()
    assert stats.depth == count, f"queued {stats.depth} of {count}"
    disk = _dir_bytes(policy.path)
    queue.close()
    return {"durability": durability, "messages": count, "seconds": round(elapsed, 3),
            "msg_per_s": round(count / elapsed), "queue_bytes": stats.bytes, "disk_bytes": disk,
            "disk_bytes_per_msg": round(disk / count, 1)}


def _uplink_yaml(work: Path, cloud: MosquittoCloud, chain: Path, local_port: int) -> Path:
    path = work / "uplink.yaml"
    c = cloud.pki
    path.write_text(f"""version: 1
site: plant-a
gateway: gw-01
local: {{host: 127.0.0.1, port: {local_port}, ca: {chain}, cert: {work / 'uplink-cred' / 'gateway-uplink.crt'},
         key: {work / 'uplink-cred' / 'gateway-uplink.key'}, client_id: gateway-uplink}}
cloud: {{host: 127.0.0.1, port: {cloud.port}, ca: {c.ca}, cert: {c.cert('gw-01')}, key: {c.key('gw-01')},
         inflight: 64, backoff_initial: 0.2, backoff_max: 1}}
queue: {{path: {work / 'drain.db'}, max_bytes: 17179869184, durability: fsync}}
forward:
  - from: devices/+/telemetry/#
    to: sites/{{site}}/gateways/{{gateway}}/devices/{{1}}/telemetry/{{#}}
""")
    return path


async def _drain(config_path: Path, count: int) -> tuple[float, dict[str, Any]]:
    config = load_uplink_config(config_path)
    service = UplinkService(config, events=SecurityEvents("bench-uplink"))
    started = time.perf_counter()
    task = asyncio.create_task(service.run())
    try:
        while service.counters.forwarded < count:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
        return elapsed, service.status()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await service.close()


def drain(work: Path, count: int) -> dict[str, Any]:
    ca = init_dev(work / "pki", devices=1)
    enroll_dev_uplink(ca, ca.registry_path, work / "uplink-cred")
    cloud = MosquittoCloud(init_cloud_pki(work / "cloud-pki"), work / "cloud").start()
    try:
        config_path = _uplink_yaml(work, cloud, ca.chain_path, free_port())  # no local broker: the backlog only
        queue = StoreAndForwardQueue(load_uplink_config(config_path).queue)
        for base in range(0, count, 256):
            queue.put_many([(TOPIC.format(n % 1000), n.to_bytes(8, "big") * (PAYLOAD // 8), 1)
                            for n in range(base, min(count, base + 256))])
        disk_full = _dir_bytes(queue.policy.path)
        queue.close()
        c = cloud.pki
        counter = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(cloud.port), "--cafile", str(c.ca), "--cert",
             str(c.cert("cloud-app")), "--key", str(c.key("cloud-app")), "-i", "bench-counter", "-q", "1",
             "-t", "sites/#", "-C", str(count), "-W", "600", "-F", "%m"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)  # subscribed before the uplink starts
        elapsed, status = asyncio.run(_drain(config_path, count))
        out, _ = counter.communicate(timeout=120)
        arrived = len(out.splitlines())
        assert arrived >= count, f"the cloud received {arrived} of {count}: loss"
        return {"messages": count, "seconds": round(elapsed, 3), "msg_per_s": round(count / elapsed),
                "arrived": arrived, "resent": status["resent"], "disk_bytes_full": disk_full,
                "disk_bytes_after": _dir_bytes(queue.policy.path), "queue_depth_after": status["queue"]["depth"]}
    finally:
        cloud.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5,000 messages instead of 100,000")
    parser.add_argument("--count", type=int, default=None)
    args = parser.parse_args(argv)
    # the uplink's own events (the local side has no broker here on purpose) stay below errors
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    count = args.count or (5_000 if args.quick else 100_000)
    if shutil.which("mosquitto") is None or shutil.which("mosquitto_sub") is None:
        print("bench_uplink: mosquitto and mosquitto-clients are needed (scripts/system-packages.sh)")
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-uplink-") as tmp:
        work = Path(tmp)
        results: dict[str, Any] = {"enqueue": [enqueue(work, count, "fsync"), enqueue(work, count, "process")],
                   "drain": drain(work, count)}
    print(f"uplink store-and-forward, {count:,} messages of {PAYLOAD} B (topic ~60 B)")
    print(f"{'phase':34} {'msg/s':>9} {'seconds':>8} {'disk':>12}")
    for row in results["enqueue"]:
        print(f"{'enqueue, durability ' + row['durability']:34} {row['msg_per_s']:>9,} {row['seconds']:>8} "
              f"{row['disk_bytes'] / 1e6:>9.1f} MB  ({row['disk_bytes_per_msg']} B/msg)")
    d = results["drain"]
    print(f"{'drain to mosquitto, TLS 1.3, QoS 1':34} {d['msg_per_s']:>9,} {d['seconds']:>8} "
          f"{d['disk_bytes_full'] / 1e6:>9.1f} MB  (arrived {d['arrived']:,}, resent {d['resent']}, "
          f"left {d['queue_depth_after']})")
    line = json.dumps({"bench": "uplink", "count": count, **results})
    print(line)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / "uplink.json").write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
