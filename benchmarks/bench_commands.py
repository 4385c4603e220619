"""Signed-command verification speed and replay cache memory.

    python benchmarks/bench_commands.py [--quick]

Measures:
- full ``verify_envelope`` (parse, ES256 signature, claims, authorization, replay record)
  per second, with p50/p99 latency, against a replay cache that already holds entries;
- the signature check alone (PyJWT ES256), to show what the rest costs;
- replay cache memory with 1,000,000 live nonces (100,000 with ``--quick``), by
  tracemalloc (Python allocations) and by RSS delta.

Prints a table, then one JSON line (prefix ``RESULT``) for CI trend tracking.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric import ec
from jwt.api_jws import PyJWS

from edge_core.envelope import sign_command, verify_envelope
from edge_core.operators import EnvelopePolicy, Grant, Operator, OperatorKey, OperatorKeys
from edge_core.replay import MemoryReplayCache, replay_key

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
DEVICE = "pump-17"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


def bench_verify(n: int) -> dict[str, float]:
    key = ec.generate_private_key(ec.SECP256R1())
    keys = OperatorKeys(operators={
        "alice": Operator("alice", (OperatorKey("alice", "alice", key.public_key()),),
                          (Grant(devices=frozenset({DEVICE})),)),
    })
    policy = EnvelopePolicy()
    tokens = [
        sign_command(key, issuer="alice", device=DEVICE, body={"name": "set_speed", "rpm": i},
                     ttl=timedelta(seconds=300), now=NOW)
        for i in range(n)
    ]
    replay = MemoryReplayCache(2 * n + 10_000, started_at=NOW - timedelta(hours=1))
    for i in range(10_000):  # a cache that is not empty
        replay.remember(replay_key("alice", f"pre{i:019d}"), keep_until=NOW + timedelta(seconds=300), now=NOW)

    latencies: list[float] = []
    gc.disable()
    try:
        start = time.perf_counter()
        for token in tokens:
            t0 = time.perf_counter_ns()
            verify_envelope(token, topic_device=DEVICE, keys=keys, policy=policy, now=NOW, replay=replay)
            latencies.append((time.perf_counter_ns() - t0) / 1000)
        total = time.perf_counter() - start
        jws = PyJWS(algorithms=["ES256"])
        public = key.public_key()
        sig_start = time.perf_counter()
        for token in tokens:
            jws.decode_complete(token, key=public, algorithms=["ES256"])
        sig_total = time.perf_counter() - sig_start
    finally:
        gc.enable()
    latencies.sort()
    return {
        "verifications": n,
        "verify_per_s": n / total,
        "p50_us": statistics.median(latencies),
        "p99_us": _percentile(latencies, 0.99),
        "max_us": latencies[-1],
        "signature_only_per_s": n / sig_total,
        "token_bytes": len(tokens[0]),
    }


def bench_memory(n: int) -> dict[str, float]:
    gc.collect()
    rss_before = _rss_bytes()
    cache = MemoryReplayCache(n, started_at=NOW)
    until = [NOW + timedelta(seconds=s) for s in range(331)]  # exp + skew spread over max_ttl + skew
    start = time.perf_counter()
    for i in range(n):
        cache.remember(replay_key("alice", f"{i:022d}"), keep_until=until[i % 331], now=NOW)
    fill_s = time.perf_counter() - start
    gc.collect()
    rss_delta = _rss_bytes() - rss_before
    assert len(cache) == n
    del cache
    gc.collect()

    tracemalloc.start()
    cache = MemoryReplayCache(n, started_at=NOW)
    for i in range(n):
        cache.remember(replay_key("alice", f"{i:022d}"), keep_until=until[i % 331], now=NOW)
    traced, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "nonces": n,
        "traced_mb": traced / 1e6,
        "rss_delta_mb": rss_delta / 1e6,
        "bytes_per_entry": traced / n,
        "inserts_per_s": n / fill_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer verifications, 100k nonces")
    args = parser.parse_args(argv)
    verify = bench_verify(1_000 if args.quick else 10_000)
    memory = bench_memory(100_000 if args.quick else 1_000_000)

    rows = [
        ("full verify_envelope", f"{verify['verify_per_s']:,.0f} /s"),
        ("  latency p50", f"{verify['p50_us']:,.0f} us"),
        ("  latency p99", f"{verify['p99_us']:,.0f} us"),
        ("  latency max", f"{verify['max_us']:,.0f} us"),
        ("ES256 signature only", f"{verify['signature_only_per_s']:,.0f} /s"),
        ("token size", f"{verify['token_bytes']:.0f} bytes"),
        (f"replay cache, {memory['nonces']:,.0f} live nonces", f"{memory['traced_mb']:,.1f} MB traced"),
        ("  RSS delta", f"{memory['rss_delta_mb']:,.1f} MB"),
        ("  per entry", f"{memory['bytes_per_entry']:,.0f} bytes"),
        ("  inserts", f"{memory['inserts_per_s']:,.0f} /s"),
    ]
    width = max(len(name) for name, _ in rows)
    sys.stdout.write(f"bench_commands  python {platform.python_version()}  {platform.machine()}\n")
    for name, value in rows:
        sys.stdout.write(f"  {name:<{width}}  {value:>16}\n")
    result = {"bench": "commands", "quick": args.quick, **verify, **memory}
    sys.stdout.write("RESULT " + json.dumps({k: round(v, 2) if isinstance(v, float) else v
                                             for k, v in result.items()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
