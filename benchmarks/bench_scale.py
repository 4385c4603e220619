"""Scale-out benchmark: the shared stores a site of several gateways runs on.

    python benchmarks/bench_scale.py            # 1,000,000 devices, 10 s of replay checks, 3 failovers
    python benchmarks/bench_scale.py --quick    # 20,000 devices, 2 s, 1 failover (CI smoke)

1. Daily scan on PostgreSQL: a private schema, migrated, bulk-loaded with ``COPY`` with devices
   whose certificates expire uniformly over the next year. Timed: the design's query
   (``PostgresInventory.expiring``: ``current_not_after < now + interval '90 days'``, with days
   left), then the decision pass the leader makes each day over the renewal window (load it,
   refresh states, plan renewals, check alarms; nothing stored). Target: < 30 s for both together.
2. Replay check against Redis at 1,000 commands/s: ``RedisReplayStore.remember`` paced at a fixed
   rate (each call is one Lua round trip), and a replay of each nonce from a second store, as a
   second broker would see it. Target: p99 < 5 ms, every replay refused.
3. Leader failover: two lease-holder processes on one schema; the leader is killed (``kill -9``)
   and the time until the standby holds the lease is measured. Target: <= lease * 4/3 (+ 0.5 s).

PostgreSQL and Redis come from ``EDGE_TEST_POSTGRES_URL`` / ``EDGE_TEST_REDIS_URL`` (defaults:
this machine's, on loopback). Prints a table, then one JSON line (``{"bench": "scale", ...}``).
Exits 1 if a full run misses a target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import select
import signal
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import redis  # noqa: E402
import structlog  # noqa: E402
from psycopg import sql  # noqa: E402

from broker_plugins.replay_redis import RedisReplayStore  # noqa: E402
from edge_core.clock import SystemClock  # noqa: E402
from edge_core.events import SecurityEvents  # noqa: E402
from edge_core.lifecycle import RenewalPolicy, check_alarms, plan_renewals, refresh  # noqa: E402
from edge_core.replay import ReplayVerdict, replay_key  # noqa: E402
from gateway_agent.inventory import _DEVICE_COLUMNS  # noqa: E402
from gateway_agent.inventory_pg import PostgresInventory, split_schema  # noqa: E402
from gateway_agent.leadership import LeaderLease  # noqa: E402

PG_URL = os.environ.get("EDGE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("EDGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TARGET_SCAN_S = 30.0
TARGET_REPLAY_P99_MS = 5.0
DAY = timedelta(days=1)


def _schema_url(schema: str) -> str:
    return f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}"


def _drop(schema: str) -> None:
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


# --------------------------------------------------------------------------- 1. scan


def bench_scan(devices: int) -> dict[str, Any]:
    schema = f"bench_scan_{os.getpid()}_{secrets.token_hex(3)}"
    url = _schema_url(schema)
    now = datetime.now(UTC).replace(microsecond=0)
    try:
        with PostgresInventory(url) as inv:
            started = time.perf_counter()
            with inv._db.cursor() as cur, cur.copy(sql.SQL("COPY devices ({}) FROM STDIN").format(
                    sql.SQL(", ").join(map(sql.Identifier, _DEVICE_COLUMNS)))) as copy:
                for n in range(devices):
                    not_after = now + timedelta(seconds=(n * 7919 % devices) * 365 * 86400 // devices + 3600)
                    copy.write_row((f"dev-{n:07d}", f"{0xA000 + n:x}", f"sha256:{n:064x}",
                                    not_after - 365 * DAY, not_after, "active",
                                    None, None, None, None, None, None, None, None, None, None,
                                    "idle", None, 0, None, None, None, 1, 0))
            load_s = time.perf_counter() - started
            inv._db.execute("ANALYZE devices")
            plan = " ".join(str(r[0]) for r in inv._db.execute(
                "EXPLAIN SELECT device_id FROM devices WHERE current_not_after < NOW() + INTERVAL '90 days' "
                "ORDER BY current_not_after").fetchall())

            started = time.perf_counter()
            rows = inv.expiring(now, timedelta(days=90))
            query_s = time.perf_counter() - started

            policy = RenewalPolicy()
            started = time.perf_counter()
            window = inv.expiring_devices(now + policy.renew_before)
            fetched_s = time.perf_counter() - started
            refreshed = []
            changes = 0
            for device in window:
                step = refresh(device, now=now, policy=policy)
                changes += len(step.transitions)
                refreshed.append(step.after)
            plans = plan_renewals(refreshed, now, policy)
            alarms = check_alarms(refreshed, now, policy)
            decision_s = time.perf_counter() - started
    finally:
        _drop(schema)
    return {"devices": devices, "load_s": round(load_s, 2), "load_rows_per_s": round(devices / load_s),
            "query_s": round(query_s, 3), "expiring": len(rows), "window": len(window),
            "window_fetch_s": round(fetched_s, 3), "decision_s": round(decision_s, 3),
            "state_changes": changes, "renewals_planned": len(plans), "alarms": len(alarms),
            "uses_expiry_index": "devices_by_expiry" in plan}


# --------------------------------------------------------------------------- 2. replay


def bench_replay(seconds: float, rate: int) -> dict[str, Any]:
    prefix = f"bench_replay_{os.getpid()}_{secrets.token_hex(3)}"
    clock = SystemClock()
    first = RedisReplayStore(REDIS_URL, prefix=prefix, clock=clock)
    second = RedisReplayStore(REDIS_URL, prefix=prefix, clock=clock)
    latencies: list[float] = []
    replay_latencies: list[float] = []
    refused = 0
    try:
        first.check_server()
        second.check_server()
        total = int(seconds * rate)
        interval = 1.0 / rate
        started = time.perf_counter()
        behind = 0
        for n in range(total):
            due = started + n * interval
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            else:
                behind += 1
            key = replay_key("alice", f"jti-{n:012d}-{prefix}")
            now = clock.now()
            t0 = time.perf_counter()
            verdict = first.remember(key, keep_until=now + timedelta(seconds=90), now=now)
            latencies.append(time.perf_counter() - t0)
            assert verdict is ReplayVerdict.RECORDED
            if n % 10 == 0:  # one in ten replayed on the other broker
                t0 = time.perf_counter()
                again = second.remember(key, keep_until=now + timedelta(seconds=90), now=now)
                replay_latencies.append(time.perf_counter() - t0)
                refused += again is ReplayVerdict.REPLAYED
        elapsed = time.perf_counter() - started
        memory = redis.Redis.from_url(REDIS_URL).memory_usage(f"{{{prefix}}}:n:{key.hex()}") or 0
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{{{prefix}}}:*", count=5000))
        for i in range(0, len(keys), 5000):
            client.delete(*keys[i:i + 5000])
        first.close()
        second.close()
    q = statistics.quantiles(latencies, n=100)
    return {"commands": len(latencies), "rate_per_s": round(len(latencies) / elapsed), "late_starts": behind,
            "p50_ms": round(q[49] * 1000, 3), "p99_ms": round(q[98] * 1000, 3),
            "max_ms": round(max(latencies) * 1000, 3),
            "replay_p99_ms": round(statistics.quantiles(replay_latencies, n=100)[98] * 1000, 3),
            "replays": len(replay_latencies), "replays_refused": refused, "bytes_per_nonce": memory}


# --------------------------------------------------------------------------- 3. failover


async def _hold(url: str, name: str, lease: float) -> None:
    """A lease holder (the subprocess): print LEADER <unix time> when it takes the lease."""
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(open(os.devnull, "w")))  # noqa: SIM115, ASYNC230
    holder = LeaderLease(url, holder=name, ttl=timedelta(seconds=lease), events=SecurityEvents("bench"))
    task = asyncio.create_task(holder.run())
    while not holder.is_leader:
        await holder.wait_changed(1.0)  # set the moment the lease is taken
    print(f"LEADER {time.time():.6f}", flush=True)
    await task


def _wait_line(proc: subprocess.Popen[str], timeout: float) -> float:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError("no leader")
    line = proc.stdout.readline()
    if not line.startswith("LEADER "):
        raise RuntimeError(f"lease holder said {line!r} (exit {proc.poll()})")
    return float(line.split()[1])


def bench_failover(rounds: int, lease: float) -> dict[str, Any]:
    schema = f"bench_lease_{os.getpid()}_{secrets.token_hex(3)}"
    url = _schema_url(schema)
    PostgresInventory(url).close()  # migrate
    times = []
    try:
        for r in range(rounds):
            def start(name: str) -> subprocess.Popen[str]:
                return subprocess.Popen([sys.executable, __file__, "--lease-holder", url, name, str(lease)],
                                        stdout=subprocess.PIPE, text=True, cwd=ROOT)
            a = start(f"a{r}")
            b: subprocess.Popen[str] | None = None
            try:
                _wait_line(a, lease * 3 + 10)
                b = start(f"b{r}")
                time.sleep(lease / 2)  # b is polling as a standby
                os.kill(a.pid, signal.SIGKILL)
                killed = time.time()
                a.wait()
                took = _wait_line(b, lease * 3 + 10) - killed
                times.append(took)
            finally:
                for proc in (a, b):
                    if proc is not None and proc.poll() is None:
                        proc.kill()
                        proc.wait()
    finally:
        _drop(schema)
    return {"rounds": rounds, "lease_s": lease, "bound_s": round(lease * 4 / 3, 2),
            "failover_s": [round(t, 2) for t in times], "max_s": round(max(times), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--devices", type=int)
    parser.add_argument("--lease", type=float, default=3.0)
    parser.add_argument("--lease-holder", nargs=3, metavar=("URL", "NAME", "LEASE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lease_holder:
        url, name, lease = args.lease_holder
        asyncio.run(_hold(url, name, float(lease)))
        return 0
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(open(os.devnull, "w")))  # noqa: SIM115
    split_schema(_schema_url("x"))  # a bad URL fails here, before anything is created
    devices = args.devices or (20_000 if args.quick else 1_000_000)
    scan = bench_scan(devices)
    replay = bench_replay(2.0 if args.quick else 10.0, 1000)
    failover = bench_failover(1 if args.quick else 3, args.lease)

    print(f"scan on PostgreSQL, {scan['devices']:,} devices (COPY load {scan['load_s']} s, "
          f"{scan['load_rows_per_s']:,} rows/s)")
    print(f"  expiry query (90 days): {scan['query_s']:.3f} s, {scan['expiring']:,} rows, "
          f"index used: {scan['uses_expiry_index']}")
    print(f"  decision pass: fetch {scan['window_fetch_s']:.3f} s + decide {scan['decision_s']:.3f} s over "
          f"{scan['window']:,} devices ({scan['renewals_planned']:,} renewals planned, {scan['alarms']:,} alarms)")
    print(f"replay check on Redis at {replay['rate_per_s']} commands/s ({replay['commands']:,} commands): "
          f"p50 {replay['p50_ms']} ms, p99 {replay['p99_ms']} ms, max {replay['max_ms']} ms; "
          f"replays on a second store refused {replay['replays_refused']}/{replay['replays']} "
          f"(p99 {replay['replay_p99_ms']} ms); {replay['bytes_per_nonce']} bytes per nonce")
    print(f"leader failover (kill -9, lease {failover['lease_s']} s, bound {failover['bound_s']} s): "
          f"{', '.join(f'{t} s' for t in failover['failover_s'])}")
    scan_total = scan["query_s"] + scan["window_fetch_s"] + scan["decision_s"]
    ok = (scan_total < TARGET_SCAN_S and scan["uses_expiry_index"] and replay["p99_ms"] < TARGET_REPLAY_P99_MS
          and replay["replays_refused"] == replay["replays"] and failover["max_s"] <= failover["bound_s"] + 0.5)
    print(f"target: scan < {TARGET_SCAN_S:.0f} s ({scan_total:.2f} s), replay p99 < {TARGET_REPLAY_P99_MS} ms, "
          f"every replay refused, failover <= lease*4/3 + 0.5 s: {'met' if ok else 'MISSED'}")
    print(json.dumps({"bench": "scale", "quick": args.quick, "scan": scan, "replay": replay, "failover": failover,
                      "target_met": ok}))
    if not ok and not args.quick:
        return 1
    return 0 if replay["replays_refused"] == replay["replays"] else 1


if __name__ == "__main__":
    sys.exit(main())
