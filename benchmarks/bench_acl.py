"""ACL decision latency at fleet scale.

    python benchmarks/bench_acl.py            # 10,000 devices x 10 rules, 300,000 decisions
    python benchmarks/bench_acl.py --quick    # 500 devices, 20,000 decisions (CI smoke)

Builds an ACL file (role rules with {device}/{site}/{line} plus per-device rules), times
``parse_policy`` (YAML + validation + compile) and the compile step alone, measures the
memory the compiled policy holds, then times single publish / receive / subscribe
decisions for random devices and topics. Prints a table and one JSON line. Exits 1 if
the full run misses the p99 target.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_core.acl import Policy, Subject
from edge_core.acl_file import parse_policy

TARGET_P99_US = 20.0
SITES = [f"plant-{n}" for n in range(10)]
LINES = [f"line-{n}" for n in range(20)]
ROLES = ("sensor", "pump", "operator", "gateway")

ROLE_RULES = {
    "sensor": [
        "allow publish devices/{device}/telemetry/#",
        "allow publish devices/{device}/status",
        "allow subscribe devices/{device}/cmd/#",
        "allow subscribe sites/{site}/lines/{line}/broadcast",
        "deny publish devices/{device}/telemetry/debug/#",
    ],
    "pump": [
        "allow publish devices/{device}/telemetry/#",
        "allow publish devices/{device}/state",
        "allow subscribe devices/{device}/cmd/#",
        "allow subscribe sites/{site}/lines/{line}/setpoints/+",
        "deny subscribe devices/{device}/cmd/firmware/#",
    ],
    "operator": [
        "allow subscribe sites/{site}/#",
        "deny subscribe sites/{site}/admin/#",
        "allow publish sites/{site}/lines/+/setpoints/+",
        "allow subscribe devices/+/telemetry/#",
        "allow publish operators/{device}/audit",
    ],
    "gateway": [
        "allow publish devices/+/cmd/#",
        "allow subscribe devices/+/state",
        "allow subscribe $SYS/broker/clients/#",
        "allow both gateways/{device}/#",
        "deny publish devices/+/cmd/firmware/unsigned",
    ],
}


def device_rules(device: str, site: str, rng: random.Random) -> list[str]:
    peer = f"dev-{rng.randrange(100000)}"
    return [
        f"allow publish devices/{device}/metrics/+",
        f"allow publish devices/{device}/events/{rng.choice(['alarm', 'info', 'trace'])}",
        f"allow subscribe devices/{device}/config/#",
        f"allow subscribe devices/{peer}/state",
        f"allow subscribe sites/{site}/weather",
        f"allow publish sites/{site}/logs/{device}/#",
        f"deny publish devices/{device}/metrics/secret",
        f"deny subscribe devices/{device}/config/keys/#",
        f"allow both maintenance/{device}/+/ticket",
        f"allow subscribe time/{site}",
    ]


@dataclass(frozen=True)
class Fleet:
    text: str
    subjects: list[Subject]
    rule_count: int


def build_fleet(devices: int, seed: int) -> Fleet:
    rng = random.Random(seed)
    lines = [
        "version: 1",
        "attributes: [site, line]",
        "everyone:",
        "  - allow publish devices/{device}/hello",
    ]
    lines.append("roles:")
    rule_count = 1
    for role, rules in ROLE_RULES.items():
        lines.append(f"  {role}:")
        lines.extend(f"    - {rule}" for rule in rules)
        rule_count += len(rules)
    lines.append("devices:")
    subjects = []
    for index in range(devices):
        device = f"dev-{index}"
        site, line = rng.choice(SITES), rng.choice(LINES)
        roles = frozenset(rng.sample(ROLES[:2], 1) + (["operator"] if index % 50 == 0 else []))
        if index % 500 == 0:
            roles = frozenset({"gateway"})
        subjects.append(Subject(device, roles, {"site": site, "line": line}))
        rules = device_rules(device, site, rng)
        lines.append(f"  {device}:")
        lines.extend(f"    - {rule}" for rule in rules)
        rule_count += len(rules)
    return Fleet("\n".join(lines) + "\n", subjects, rule_count)


def _draw(fleet: Fleet, count: int, rng: random.Random) -> list[tuple[str, Subject, str]]:
    drawn = []
    for _ in range(count):
        subject = rng.choice(fleet.subjects)
        other = rng.choice(fleet.subjects).device
        me = subject.device
        site = subject.attributes["site"]
        line = subject.attributes["line"]
        action = rng.choice(("publish", "receive", "subscribe"))
        if action == "subscribe":
            topic = rng.choice(
                [
                    f"devices/{me}/cmd/#",
                    f"devices/{me}/config/+",
                    f"devices/{me}/config/#",
                    f"devices/{other}/cmd/#",
                    f"sites/{site}/lines/{line}/setpoints/+",
                    f"sites/{site}/#",
                    "#",
                    "devices/+/state",
                    "$SYS/broker/clients/#",
                    f"time/{site}",
                ]
            )
        else:
            topic = rng.choice(
                [
                    f"devices/{me}/telemetry/temp/{rng.randrange(100)}",
                    f"devices/{me}/telemetry/debug/x",
                    f"devices/{me}/metrics/flow",
                    f"devices/{me}/metrics/secret",
                    f"devices/{other}/telemetry/temp",
                    f"devices/{me}/cmd/stop",
                    f"devices/{me}/config/keys/k1",
                    f"sites/{site}/lines/{line}/setpoints/speed",
                    f"sites/{site}/admin/users",
                    f"sites/{site}/logs/{me}/2024/01/01",
                    "$SYS/broker/clients/connected",
                    "a/very/deep/" + "/".join(["level"] * 30),
                    f"maintenance/{me}/pump/ticket",
                ]
            )
        drawn.append((action, subject, topic))
    return drawn


def _timer_overhead_ns(clock: Callable[[], int]) -> int:
    begin = clock()
    return clock() - begin


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small fleet and few decisions, for CI")
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--decisions", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1729)
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() after loading, as a broker may do, so full collections skip the policy",
    )
    args = parser.parse_args(argv)
    devices = args.devices or (500 if args.quick else 10_000)
    decisions = args.decisions or (20_000 if args.quick else 300_000)

    fleet = build_fleet(devices, args.seed)

    started = time.perf_counter()
    policy = parse_policy(fleet.text, source="bench-acl.yaml")
    parse_seconds = time.perf_counter() - started

    started = time.perf_counter()
    Policy(rules=policy.rules, attributes=policy.attributes, source=policy.source)
    compile_seconds = time.perf_counter() - started

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    measured = Policy(rules=policy.rules, attributes=policy.attributes, source=policy.source)
    compiled_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del measured
    rules_bytes_note = "compiled index only; the Rule objects are shared with the parsed policy"

    checks = {
        "publish": policy.check_publish,
        "receive": policy.check_receive,
        "subscribe": policy.check_subscribe,
    }
    work = [
        (checks[action], action, subject, topic)
        for action, subject, topic in _draw(fleet, decisions, random.Random(args.seed + 1))
    ]
    for check, _, subject, topic in work[:2000]:  # warm up
        check(subject, topic)

    gc.collect()
    if args.gc_freeze:
        gc.freeze()
    clock = time.perf_counter_ns
    by_action: dict[str, list[float]] = {"publish": [], "receive": [], "subscribe": []}
    allowed = 0
    for check, action, subject, topic in work:
        begin = clock()
        decision = check(subject, topic)
        elapsed = clock() - begin
        by_action[action].append(elapsed / 1000)
        allowed += decision.allowed
    timer_overhead_us = statistics.median(_timer_overhead_ns(clock) for _ in range(10_000)) / 1000

    all_us = sorted(value for values in by_action.values() for value in values)
    rows = []
    for name, values in [("all", all_us), *((k, sorted(v)) for k, v in by_action.items())]:
        rows.append((name, len(values), percentile(values, 0.50), percentile(values, 0.99), values[-1]))

    print(
        f"ACL benchmark on {platform.python_implementation()} {platform.python_version()}, "
        f"{platform.machine()}; {devices:,} devices, {fleet.rule_count:,} rules"
    )
    print(f"  parse_policy (YAML + validate + compile): {parse_seconds:8.2f} s")
    print(f"  compile alone (Policy from rules):        {compile_seconds:8.2f} s")
    print(
        f"  compiled index memory (tracemalloc):      {compiled_bytes / 2**20:8.1f} MiB  ({rules_bytes_note})"
    )
    print(f"  timer overhead per sample:                {timer_overhead_us:8.3f} us (included below)")
    print(f"  {'action':<10} {'count':>9} {'p50 us':>9} {'p99 us':>9} {'max us':>9}")
    for name, count, p50, p99, worst in rows:
        print(f"  {name:<10} {count:>9,} {p50:>9.2f} {p99:>9.2f} {worst:>9.1f}")
    p99_all = rows[0][3]
    p999_all = percentile(all_us, 0.999)
    slow = sum(1 for value in all_us if value > 100)
    print(f"  all: p99.9 {p999_all:.2f} us; {slow} of {len(all_us):,} samples over 100 us (scheduler / GC)")
    verdict = "met" if p99_all < TARGET_P99_US else "MISSED"
    print(f"  target p99 < {TARGET_P99_US:.0f} us: {verdict}; {allowed / len(work):.0%} of decisions allowed")
    print(
        json.dumps(
            {
                "benchmark": "acl_decisions",
                "gc_freeze": args.gc_freeze,
                "devices": devices,
                "rules": fleet.rule_count,
                "decisions": len(work),
                "parse_s": round(parse_seconds, 3),
                "compile_s": round(compile_seconds, 3),
                "compiled_mib": round(compiled_bytes / 2**20, 2),
                "p50_us": round(rows[0][2], 3),
                "p99_us": round(p99_all, 3),
                "p999_us": round(p999_all, 3),
                "over_100us": slow,
                "max_us": round(rows[0][4], 1),
                "per_action": {
                    name: {"p50_us": round(p50, 3), "p99_us": round(p99, 3), "max_us": round(worst, 1)}
                    for name, _, p50, p99, worst in rows[1:]
                },
                "target_p99_us": TARGET_P99_US,
                "met": p99_all < TARGET_P99_US,
            }
        )
    )
    return 0 if args.quick or p99_all < TARGET_P99_US else 1


if __name__ == "__main__":
    sys.exit(main())
