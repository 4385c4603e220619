"""Broker benchmark: our hardened broker against plain amqtt 0.12.1 and mosquitto, same run.

    python benchmarks/bench_broker.py            # full run (about 2 minutes)
    python benchmarks/bench_broker.py --quick    # smoke run for CI

Figures (all over TLS 1.3 with client certificates, on loopback):
  conn/s      TLS handshake + CONNECT/CONNACK + DISCONNECT, 4 concurrent workers
  qos0 msg/s  publisher -> broker -> subscriber, delivered messages per second
  qos1 msg/s  same with QoS 1 both ways (64 in flight)

Variants: ``ours`` (full checks, 10-rule ACL), ``ours-acl10k`` (ACL and registry with
10,000 devices x 10 rules), ``ours-noacl`` (ACL hook answering allow: what the ACL costs),
``amqtt`` (plain amqtt with its TLS listener), ``mosquitto`` (Debian's C broker, if installed).
Each broker runs in its own process; the load generator runs in this one (uvloop).
Each figure is the median of ``--repeat`` rounds (default 3) run round-robin over the brokers.
Results go to stdout as a table and to benchmarks/results/broker.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.loadgen import Endpoint, connection_rate, throughput
from gateway_agent.pki import init_dev

BENCH_DEVICES = ["bench-pub", "bench-sub", *(f"bench-c{n}" for n in range(4))]
ACL_SMALL = """\
version: 1
attributes: [site, line]
everyone:
  - allow publish devices/{device}/status
roles:
  sensor:
    - allow publish bench/{site}/#
    - allow subscribe bench/{site}/#
    - allow publish devices/{device}/telemetry/#
    - allow subscribe devices/{device}/cmd/#
    - deny publish bench/{site}/forbidden/#
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_big_acl_and_registry(certs: Path, count: int) -> tuple[Path, Path]:
    registry = (certs / "registry.yaml").read_text()
    extra = ["devices:"] if "devices:" not in registry else []
    lines = [registry.rstrip("\n"), *extra]
    acl = [ACL_SMALL.rstrip("\n"), "devices:"]
    for n in range(count):
        name = f"synthetic-{n:05d}"
        lines += [f"  {name}:", f"    pins: [sha256:{secrets.token_hex(32)}]", "    roles: [sensor]",
                  f"    attributes: {{site: site-{n % 50}, line: line-{n % 7}}}"]
        acl.append(f"  {name}:")
        for r in range(10):
            verb = "publish" if r % 2 else "subscribe"
            acl.append(f"    - allow {verb} plants/site-{n % 50}/{name}/ch{r}/#")
    reg_path = certs / "registry-10k.yaml"
    reg_path.write_text("\n".join(lines) + "\n")
    acl_path = certs / "acl-10k.yaml"
    acl_path.write_text("\n".join(acl) + "\n")
    return reg_path, acl_path


def broker_settings(certs: Path, port: int, registry: Path, acl: Path) -> Path:
    path = certs / f"broker-{port}.yaml"
    path.write_text(f"""listener:
  bind: 127.0.0.1:{port}
  certfile: {certs / 'broker.crt'}
  keyfile: {certs / 'broker.key'}
  client_ca: {certs / 'ca-chain.pem'}
limits:
  max_connections: 10000
registry: {registry}
acl: {acl}
""")
    return path


def mosquitto_conf(certs: Path, port: int) -> Path:
    path = certs / f"mosquitto-{port}.conf"
    path.write_text(f"""listener {port} 127.0.0.1
cafile {certs / 'ca-chain.pem'}
certfile {certs / 'broker.crt'}
keyfile {certs / 'broker.key'}
require_certificate true
use_identity_as_username true
tls_version tlsv1.3
max_queued_messages 100000
set_tcp_nodelay true
log_type none
""" + ("user root\n" if os.geteuid() == 0 else ""))  # as root it drops to 'mosquitto': 0600 keys unreadable
    return path


@contextlib.contextmanager
def running(cmd: list[str], *, ready_port: int | None = None) -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    try:
        if ready_port is None:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("READY"):
                raise RuntimeError(f"broker did not start: {cmd}")
        else:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", ready_port), 0.2):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"broker did not start: {cmd}")
                time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


async def measure(port: int, certs: Path, *, seconds: float, messages: int) -> dict[str, float]:
    def ep(name: str) -> Endpoint:
        return Endpoint(port, certs / "ca-chain.pem", certs / "devices" / f"{name}.crt",
                        certs / "devices" / f"{name}.key")

    workers = [(ep(f"bench-c{n}"), f"bench-c{n}") for n in range(4)]
    await connection_rate(workers[:1], 0.5)  # warm-up
    count, elapsed = await connection_rate(workers, seconds)
    result = {"conn_per_s": count / elapsed}
    payload = b"x" * 64
    pub, sub = (ep("bench-pub"), "bench-pub"), (ep("bench-sub"), "bench-sub")
    for qos in (0, 1):
        received, elapsed = await throughput(pub, sub, topic="bench/plant-a/t", qos=qos, messages=messages,
                                             payload=payload)
        result[f"qos{qos}_msg_per_s"] = received / elapsed if elapsed > 0 else 0.0
        result[f"qos{qos}_delivered"] = received / messages
    return result


def run_variant(name: str, certs: Path, args: argparse.Namespace, registry: Path, acl: Path) -> dict[str, float]:
    port = free_port()
    py = sys.executable
    here = str(Path(__file__).resolve().parent / "broker_proc.py")
    if name in ("ours", "ours-noacl", "ours-acl10k"):
        cmd = [py, here, "ours" if name != "ours-noacl" else "ours-noacl",
               str(broker_settings(certs, port, registry, acl))]
        ready = None
    elif name == "amqtt":
        cmd, ready = [py, here, "amqtt", str(port), str(certs)], None
    else:
        cmd, ready = ["mosquitto", "-c", str(mosquitto_conf(certs, port))], port
    with running(cmd, ready_port=ready) as proc:
        import uvloop

        result = uvloop.run(measure(port, certs, seconds=args.seconds, messages=args.messages))
        result["rss_mib"] = rss_mib(proc.pid)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of the connection test")
    parser.add_argument("--messages", type=int, default=20000, help="messages per throughput test")
    parser.add_argument("--repeat", type=int, default=3, help="rounds over all brokers; the median is reported")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "broker.json")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.messages, args.repeat = 1.0, 2000, 1
    variants = ["ours", "ours-acl10k", "ours-noacl", "amqtt"]
    if shutil.which("mosquitto"):
        variants.append("mosquitto")
    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp)
        init_dev(certs, device_ids=BENCH_DEVICES, force=True)
        small_acl = certs / "acl.yaml"
        small_acl.write_text(ACL_SMALL)
        big_registry, big_acl = write_big_acl_and_registry(certs, 10_000)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        # round-robin, then the median: on a small shared machine one slow moment must not
        # decide a ratio
        for round_no in range(args.repeat):
            for name in variants:
                registry, acl = ((big_registry, big_acl) if name == "ours-acl10k"
                                 else (certs / "registry.yaml", small_acl))
                print(f"round {round_no + 1}/{args.repeat}: {name} ...", file=sys.stderr, flush=True)
                runs[name].append(run_variant(name, certs, args, registry, acl))
        results = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"results": results, "ratios": ratios(results), "quick": args.quick, "repeat": args.repeat,
              "messages": args.messages, "seconds": args.seconds}
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


METRICS = ("conn_per_s", "qos0_msg_per_s", "qos1_msg_per_s")


def ratios(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for other in ("amqtt", "mosquitto", "ours-noacl"):
        if other in results:
            out[f"ours/{other}"] = {m: results["ours"][m] / results[other][m] for m in METRICS
                                    if results[other][m]}
    if "ours-acl10k" in results and "ours-noacl" in results:
        out["ours-acl10k/ours-noacl"] = {m: results["ours-acl10k"][m] / results["ours-noacl"][m]
                                         for m in METRICS if results["ours-noacl"][m]}
    return out


def print_table(results: dict[str, dict[str, float]]) -> None:
    header = f"{'broker':<13}{'conn/s':>10}{'qos0 msg/s':>12}{'qos1 msg/s':>12}{'delivered q0/q1':>17}{'RSS MiB':>9}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        delivered = f"{r['qos0_delivered']:.0%}/{r['qos1_delivered']:.0%}"
        print(f"{name:<13}{r['conn_per_s']:>10.0f}{r['qos0_msg_per_s']:>12.0f}{r['qos1_msg_per_s']:>12.0f}"
              f"{delivered:>17}{r['rss_mib']:>9.1f}")
    print()
    for pair, values in ratios(results).items():
        print(f"{pair:<24}" + "  ".join(f"{m.replace('_per_s', '')}={v:.2f}x" for m, v in values.items()))


if __name__ == "__main__":
    main()
