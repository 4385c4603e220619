"""CRL benchmark: parse + verify + index a large CRL, lookups, and event-loop stalls.

    python benchmarks/bench_crl.py [--entries N] [--quick]

The CRL is generated once with ``openssl ca -gencrl`` from an index.txt of N revoked
lines (about 5 s for a million; cryptography's builder takes minutes) and cached under
``benchmarks/.cache/``. Only the work a gateway does is timed:

- parse: DER split and header (``edge_core.crl`` internals, as ``accept_crl`` runs them)
- verify: signature over tbsCertList
- index: walking the entries into ``RevokedSerials``
- accept_crl end to end, peak Python memory (tracemalloc) and RSS growth
- lookup ns/op of ``RevocationIndex.is_revoked``
- the longest stall of an asyncio loop running a 1 ms ticker while ``accept_crl`` runs
  in ``asyncio.to_thread`` (target < 50 ms), and for comparison cryptography's own
  ``load_der_x509_crl`` + ``is_signature_valid`` in a thread (which holds the GIL).

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_core import crl as crl_parse
from edge_core.crl_trust import accept_crl
from edge_core.revocation import RevocationIndex

CACHE = Path(__file__).resolve().parent / ".cache"

_CNF = """
[ ca ]
default_ca = bench
[ bench ]
database = {d}/index.txt
certificate = {d}/ca.crt
private_key = {d}/ca.key
crlnumber = {d}/crlnumber
default_md = sha256
default_crl_days = 7
crl_extensions = crl_ext
[ crl_ext ]
authorityKeyIdentifier = keyid:always
"""


def generate(entries: int) -> tuple[bytes, x509.Certificate, float]:
    work = CACHE / f"crl-{entries}"
    der_path, ca_path = work / "crl.der", work / "ca.crt"
    if der_path.exists() and ca_path.exists():
        return der_path.read_bytes(), x509.load_pem_x509_certificate(ca_path.read_bytes()), 0.0
    if shutil.which("openssl") is None:
        sys.exit("openssl CLI is needed to generate the benchmark CRL")
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", work / "ca.key"],
                   check=True)
    subprocess.run(["openssl", "req", "-new", "-x509", "-key", work / "ca.key", "-subj", "/O=Bench/CN=Bench CA",
                    "-days", "3650", "-out", ca_path], check=True)
    with (work / "index.txt").open("w") as index:
        for i in range(entries):
            reason = ",keyCompromise" if i % 3 == 0 else ""
            index.write(f"R\t300101000000Z\t250101000000Z{reason}\t{0x10000000 + i * 7:X}\tunknown\t/CN=d{i}\n")
    (work / "index.txt.attr").write_text("unique_subject = no\n")
    (work / "crlnumber").write_text("01\n")
    (work / "ca.cnf").write_text(_CNF.format(d=work))
    subprocess.run(["openssl", "ca", "-gencrl", "-batch", "-config", work / "ca.cnf", "-out", work / "crl.pem"],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "crl", "-in", work / "crl.pem", "-outform", "DER", "-out", der_path], check=True)
    (work / "index.txt").unlink()
    return der_path.read_bytes(), x509.load_pem_x509_certificate(ca_path.read_bytes()), time.perf_counter() - start


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


async def max_stall(work: Callable[[], Any]) -> tuple[float, float]:
    """Run ``work`` in a thread while a 1 ms ticker runs; return (longest tick gap, work seconds)."""
    worst = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.001)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    start = time.perf_counter()
    await asyncio.to_thread(work)
    elapsed = time.perf_counter() - start
    done = True
    await task
    return worst, elapsed


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="100,000 entries, fewer repetitions")
    parser.add_argument("--no-baseline", action="store_true", help="skip the cryptography-in-a-thread comparison")
    args = parser.parse_args()
    entries = 100_000 if args.quick else args.entries

    der, ca, gen_s = generate(entries)
    now = datetime.now(UTC)
    rss_before = rss_mb()

    split, parse_s = timed(lambda: crl_parse._split(der))
    skeleton, header_s = timed(lambda: x509.load_der_x509_crl(split.skeleton))
    ok, verify_s = timed(lambda: crl_parse._verify_signature(der, split, skeleton, ca))
    assert ok, "benchmark CRL does not verify"
    (serials, count), index_s = timed(lambda: crl_parse._walk_entries(der, *split.revoked))
    assert count == entries, (count, entries)
    del serials

    update, accept_s = timed(lambda: accept_crl(der, issuers=[ca], installed=None, now=now))
    rss_after = rss_mb()
    tracemalloc.start()  # a second run: tracemalloc slows allocation-heavy code ~10x
    accept_crl(der, issuers=[ca], installed=None, now=now)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    index = RevocationIndex().with_update(update)
    issuer = update.issuer
    probes = [0x10000000 + i * 7 for i in range(0, entries, max(1, entries // 50_000))]
    probes += [p + 1 for p in probes]  # half hits, half misses
    rounds = 3 if args.quick else 10
    is_revoked = index.is_revoked
    start = time.perf_counter()
    for _ in range(rounds):
        for p in probes:
            is_revoked(issuer, p)
    lookup_ns = (time.perf_counter() - start) / (rounds * len(probes)) * 1e9

    stall, stall_work = asyncio.run(max_stall(lambda: accept_crl(der, issuers=[ca], installed=None, now=now)))
    baseline_stall = None
    if not args.no_baseline:
        def crypto_only() -> None:
            crl = x509.load_der_x509_crl(der)
            crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
        baseline_stall, _ = asyncio.run(max_stall(crypto_only))

    result = {
        "entries": entries,
        "der_bytes": len(der),
        "generate_s": round(gen_s, 2),
        "parse_ms": round((parse_s + header_s) * 1e3, 2),
        "verify_ms": round(verify_s * 1e3, 2),
        "index_ms": round(index_s * 1e3, 1),
        "accept_total_ms": round(accept_s * 1e3, 1),
        "peak_tracemalloc_mb": round(peak / 2**20, 1),
        "rss_growth_mb": round(rss_after - rss_before, 1),  # max RSS, first accept
        "lookup_ns": round(lookup_ns, 1),
        "max_loop_stall_ms": round(stall * 1e3, 2),
        "accept_in_thread_ms": round(stall_work * 1e3, 1),
        "cryptography_in_thread_stall_ms": None if baseline_stall is None else round(baseline_stall * 1e3, 1),
        "targets": {"max_loop_stall_ms": 50, "lookup_ns": 5000},
        "ok": stall < 0.050 and lookup_ns < 5000,
    }
    width = max(len(k) for k in result)
    for key, value in result.items():
        if key != "targets":
            print(f"{key:<{width}}  {value}")
    print(json.dumps(result, sort_keys=True))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
