"""Certificate lifecycle benchmark: the daily scan over a large inventory, and fleet renewal.

    python benchmarks/bench_lifecycle.py [--quick] [--devices N] [--renewals N]
                                         [--concurrency N] [--latency-ms MS]

1. Daily scan: an SQLite inventory of 100,000 devices (10,000 with ``--quick``) whose
   certificates expire uniformly over the next year. Timed: the design's expiry query
   (``Inventory.expiring``: WHERE not_after < now + 90 days ORDER BY not_after, with days left),
   and the decision pass the daemon makes each day (load the 90-day window, plan renewals,
   check alarms). Target: < 1 s each.
2. Renewal: 1,000 devices (100 with ``--quick``), all due, renewed through the orchestrator
   with the in-memory device simulator (real keys and CSRs) and real ``FileCA`` issuance, with
   bounded concurrency. ``--latency-ms`` adds a simulated device round trip per step.

Prints a table, then one JSON line (``{"bench": "lifecycle", ...}``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402

from edge_core.clock import ManualClock  # noqa: E402
from edge_core.events import SecurityEvents  # noqa: E402
from edge_core.expiry_scan import check_alarms, plan_renewals  # noqa: E402
from edge_core.lifecycle import CertRef, CertState, RenewalPolicy, Step, enroll  # noqa: E402
from gateway_agent.inventory import SqliteInventory, iter_chunks  # noqa: E402
from gateway_agent.pki import init_dev, issue_leaf, new_key  # noqa: E402
from gateway_agent.renewal import FileCABackend, RenewalOrchestrator  # noqa: E402
from tests.agent.test_renewal import FakeDeviceChannel, SimDevice  # noqa: E402

T0 = datetime(2025, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def _fake_pin(n: int) -> str:
    return f"sha256:{n:064x}"


def bench_scan(workdir: Path, devices: int) -> dict[str, float | int]:
    rng = random.Random(1)
    inventory = SqliteInventory(workdir / "scan.db")
    t = time.perf_counter()

    def steps() -> Iterator[Step]:
        for n in range(devices):
            not_after = T0 + timedelta(seconds=rng.uniform(3600, 365 * 86400))
            ref = CertRef(n + 1, _fake_pin(n + 1), not_after - 365 * DAY, not_after, CertState.ACTIVE)
            yield enroll(f"dev-{n:06d}", ref, now=T0, cause="bench")

    for chunk in iter_chunks(steps(), 5000):
        inventory.apply_many(chunk)
    load = time.perf_counter() - t

    policy = RenewalPolicy()
    t = time.perf_counter()
    rows = inventory.expiring(T0, policy.renew_before)
    query = time.perf_counter() - t

    t = time.perf_counter()
    window = inventory.expiring_devices(T0 + policy.renew_before)
    plans = plan_renewals(window, T0, policy)
    alarms = check_alarms(window, T0, policy)
    decide = time.perf_counter() - t
    inventory.close()
    return {"devices": devices, "load_s": load, "query_s": query, "rows": len(rows),
            "decide_s": decide, "planned": len(plans), "alarms": len(alarms)}


async def bench_renewal(workdir: Path, count: int, concurrency: int, latency: float) -> dict[str, float | int]:
    clock = ManualClock(T0)
    ca = init_dev(workdir / "pki", devices=0, clock=clock)
    issuing = ca.issuing()
    inventory = SqliteInventory(workdir / "renew.db")
    backend = FileCABackend(ca, clock=clock)
    sims: dict[str, SimDevice] = {}
    steps = []
    for n in range(count):
        device_id = f"dev-{n:05d}"
        key = new_key()
        not_after = T0 + timedelta(days=30 + n % 50)
        cert = issue_leaf(issuing, identity=device_id, now=T0, lifetime=365 * DAY, public_key=key.public_key(),
                          not_before=not_after - 365 * DAY).cert
        sims[device_id] = SimDevice(device_id, key, cert)
        steps.append(enroll(device_id, CertRef.from_certificate(cert, CertState.ACTIVE), now=T0, cause="bench"))
    inventory.apply_many(steps)

    def pins_of(device_id: str) -> tuple[str, ...]:
        device = inventory.get(device_id)
        return device.pins() if device is not None else ()

    channel = FakeDeviceChannel(clock, issuing.cert, pins_of, lambda serial: serial in backend.revoked,
                                latency=latency)
    channel.devices = sims
    orchestrator = RenewalOrchestrator(inventory, channel, backend, clock=clock,
                                       events=SecurityEvents("bench.renewal"), concurrency=concurrency,
                                       rand=random.Random(2).random)
    t = time.perf_counter()
    report = await orchestrator.daily_scan()
    total = time.perf_counter() - t
    inventory.close()
    switched = report.count("switched")
    renewed_ok = switched == count and not channel.violations
    return {"renewals": count, "switched": switched, "all_switched": int(renewed_ok), "total_s": total,
            "per_s": switched / total if total else 0.0, "concurrency_limit": concurrency,
            "max_concurrency": orchestrator.max_in_flight, "channel_max_in_flight": channel.max_in_flight,
            "violations": len(channel.violations)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 devices and 100 renewals")
    parser.add_argument("--devices", type=int, help="inventory size for the scan (default 100,000)")
    parser.add_argument("--renewals", type=int, help="devices to renew (default 1,000)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="simulated device round trip per step")
    args = parser.parse_args(argv)
    devices = args.devices or (10_000 if args.quick else 100_000)
    renewals = args.renewals or (100 if args.quick else 1_000)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only

    with tempfile.TemporaryDirectory(prefix="bench-lifecycle-") as tmp:
        scan = bench_scan(Path(tmp), devices)
        renew = asyncio.run(bench_renewal(Path(tmp), renewals, args.concurrency, args.latency_ms / 1000))

    print(f"{'measure':<50} {'value':>12}")
    print("-" * 63)
    rows = [
        ("inventory size (devices)", f"{scan['devices']:,}"),
        ("bulk load (s)", f"{scan['load_s']:.2f}"),
        ("expiry query, 90-day window (s)", f"{scan['query_s']:.3f}"),
        ("  rows returned", f"{scan['rows']:,}"),
        ("daily decision pass: load window+plan+alarm (s)", f"{scan['decide_s']:.3f}"),
        ("  renewals planned", f"{scan['planned']:,}"),
        ("renewals through the orchestrator", f"{renew['renewals']:,}"),
        ("  switched", f"{renew['switched']:,}"),
        ("  total time (s)", f"{renew['total_s']:.2f}"),
        ("  throughput (renewals/s)", f"{renew['per_s']:.0f}"),
        ("  concurrency limit / observed max", f"{renew['concurrency_limit']} / {renew['max_concurrency']}"),
        ("  outage violations", f"{renew['violations']}"),
    ]
    for name, value in rows:
        print(f"{name:<50} {value:>12}")
    target_ok = float(scan["query_s"]) < 1.0 and float(scan["decide_s"]) < 1.0
    print(f"\nscan target < 1 s: {'met' if target_ok else 'MISSED'}"
          f"{'' if devices == 100_000 else f' (measured on {devices:,} devices)'}")
    print(json.dumps({"bench": "lifecycle", "quick": args.quick, "latency_ms": args.latency_ms,
                      "scan": scan, "renewal": renew, "scan_target_met": target_ok}, sort_keys=True))
    ok = target_ok and renew["switched"] == renewals and renew["max_concurrency"] <= args.concurrency
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
