"""Agent HA on the real PostgreSQL: two agent processes, one inventory; the leader is killed
(``kill -9``) or frozen (``SIGSTOP``) in the middle of renewals, and the standby finishes them.

Proved here: the standby takes over within the configured bound, no two agents ever work on
one device at once (device-side call log), each device is renewed exactly once, and a frozen
ex-leader that wakes up neither writes to the inventory nor touches a device again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edge_core.clock import ManualClock
from edge_core.lifecycle import RenewalState
from gateway_agent.inventory_pg import PostgresInventory
from gateway_agent.pki import init_dev

pytestmark = pytest.mark.integration

LEASE = 3.0  # seconds; a standby must lead within LEASE * 4/3 of the leader's last renewal
DEVICES = 6
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Site:
    url: str
    ca_dir: Path
    devices: Path
    tmp: Path
    originals: dict[str, int]
    procs: dict[str, subprocess.Popen[bytes]]

    def start(self, name: str, *, test_delay: float = 2.0) -> subprocess.Popen[bytes]:
        with (self.tmp / f"{name}.stderr").open("wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.scale.ha_agent", "--url", self.url, "--ca-dir", str(self.ca_dir),
                 "--devices", str(self.devices), "--log", str(self.tmp / f"{name}.jsonl"), "--name", name,
                 "--lease", str(LEASE), "--test-delay", str(test_delay)],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        self.procs[name] = proc
        return proc

    def events(self, name: str, event: str | None = None) -> list[dict[str, Any]]:
        path = self.tmp / f"{name}.jsonl"
        if not path.exists():
            return []
        out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [e for e in out if event is None or e.get("event") == event]

    def calls(self) -> list[dict[str, Any]]:
        path = self.devices / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def wait(self, what: str, check: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = check()
            if found:
                return found
            for name, proc in self.procs.items():
                if proc.poll() not in (None, -signal.SIGKILL, -signal.SIGTERM, 0):
                    pytest.fail(f"agent {name} died: {(self.tmp / f'{name}.stderr').read_text()[-2000:]}")
            time.sleep(0.05)
        pytest.fail(f"timed out after {timeout}s waiting for {what}\n{self.tails()}")

    def tails(self) -> str:
        """The last events and stderr of every agent, for a failure message."""
        out = []
        for name in self.procs:
            for suffix in ("jsonl", "stderr"):
                path = self.tmp / f"{name}.{suffix}"
                text = path.read_text(errors="replace") if path.exists() else ""
                out.append(f"--- {name}.{suffix} (last 12 lines)\n" + "\n".join(text.splitlines()[-12:]))
        return "\n".join(out)


@pytest.fixture
def site(tmp_path: Path, pg_url: str) -> Iterator[Site]:
    now = datetime.now(UTC)
    # Device certificates issued 25 days ago for 30 days: all due (renewal starts 10 days ahead).
    ca = init_dev(tmp_path / "ca", devices=DEVICES, clock=ManualClock(now - timedelta(days=25)),
                  device_lifetime=timedelta(days=30))
    devices = tmp_path / "devices"
    devices.mkdir()
    from cryptography import x509

    originals = {}
    for crt in sorted((ca.dir / "devices").glob("*.crt")):
        serial = x509.load_pem_x509_certificate(crt.read_bytes()).serial_number
        originals[crt.stem] = serial
        (devices / f"{crt.stem}.serial").write_text(f"{serial:x}")
    s = Site(pg_url, ca.dir, devices, tmp_path, originals, {})
    yield s
    for proc in s.procs.values():
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=10)


def _leader(site: Site, name: str) -> bool:
    return bool(site.events(name, "leader.acquired"))


def _busy_on(site: Site, agent: str, call: str) -> list[str]:
    """Devices on which ``agent`` has begun ``call`` and not ended it."""
    open_: dict[str, int] = {}
    for c in site.calls():
        if c["agent"] == agent and c["call"] == call:
            open_[c["device"]] = open_.get(c["device"], 0) + (1 if c["phase"] == "begin" else -1)
    return [d for d, n in open_.items() if n > 0]


def _all_renewed(site: Site) -> bool:
    with PostgresInventory(site.url, create=False) as inv:
        devices = list(inv.devices())
    return len(devices) == DEVICES and all(
        d.renewal is RenewalState.OVERLAP and d.current.serial != site.originals[d.device_id] for d in devices)


def _intervals(site: Site, cut: dict[str, float]) -> dict[str, list[tuple[float, float, str]]]:
    """Per device, (start, end, agent) of every call; a call cut off by a kill ends at ``cut[agent]``."""
    out: dict[str, list[tuple[float, float, str]]] = {}
    started: dict[tuple[str, str, str], float] = {}
    for c in site.calls():
        k = (c["device"], c["agent"], c["call"])
        if c["phase"] == "begin":
            started[k] = c["t"]
        else:
            out.setdefault(c["device"], []).append((started.pop(k), c["t"], c["agent"]))
    for (device, agent, _call), t in started.items():
        out.setdefault(device, []).append((t, cut.get(agent, float("inf")), agent))
    return out


def _check_renewed_once(site: Site) -> None:
    with PostgresInventory(site.url, create=False) as inv:
        for device_id, original in site.originals.items():
            switches = [t for t in inv.history(device_id) if t.to_state == RenewalState.OVERLAP.value]
            assert len(switches) == 1, f"{device_id} renewed {len(switches)} times"
            current = inv.get(device_id)
            assert current is not None and current.current.serial != original
            on_device = int((site.devices / f"{device_id}.serial").read_text(), 16)
            assert on_device == current.current.serial  # the device uses what the inventory says


def test_leader_killed_mid_renewal_the_standby_finishes_each_device_once(site: Site) -> None:
    a = site.start("A")
    site.wait("A to lead", lambda: _leader(site, "A"), 30)
    site.start("B")
    busy = site.wait("A to be mid-renewal", lambda: _busy_on(site, "A", "request_test"), 30)
    os.kill(a.pid, signal.SIGKILL)
    killed_at = time.time()
    a.wait(timeout=10)

    acquired = site.wait("B to take over", lambda: site.events("B", "leader.acquired"), 20)[0]
    takeover = datetime.fromisoformat(acquired["timestamp"]).timestamp() - killed_at
    assert takeover <= LEASE * 4 / 3 + 1.0, f"takeover took {takeover:.2f}s"
    site.wait("every device renewed", lambda: _all_renewed(site), 60)

    _check_renewed_once(site)
    with PostgresInventory(site.url, create=False) as inv:
        interrupted = {c.device_id for c in inv.revoked_certificates() if c.revoke_reason == "interrupted"}
    assert set(busy) <= interrupted  # A's unused candidates were revoked by B before it renewed again
    for device, spans in _intervals(site, {"A": killed_at}).items():
        a_spans = [s for s in spans if s[2] == "A"]
        b_spans = [s for s in spans if s[2] == "B"]
        assert all(b[0] >= a[1] for a in a_spans for b in b_spans), f"{device}: A and B overlapped"

    site.procs["B"].send_signal(signal.SIGTERM)
    site.procs["B"].wait(timeout=15)
    assert site.events("B", "leader.released")


def test_frozen_leader_wakes_up_fenced_and_never_touches_a_device_again(site: Site) -> None:
    a = site.start("A", test_delay=3.0)
    site.wait("A to lead", lambda: _leader(site, "A"), 30)
    site.start("B", test_delay=0.2)
    busy = site.wait("A to be mid-renewal", lambda: _busy_on(site, "A", "request_test"), 30)
    os.kill(a.pid, signal.SIGSTOP)  # a stalled VM, a long GC pause: A still believes it leads
    site.wait("B to take over", lambda: site.events("B", "leader.acquired"), 20)
    taken_at = time.time()
    site.wait("every device renewed by B", lambda: _all_renewed(site), 60)
    os.kill(a.pid, signal.SIGCONT)
    site.wait("A to notice", lambda: site.events("A", "leader.lost") or site.events("A", "lifecycle.standby"), 20)
    time.sleep(LEASE)  # give a misbehaving A every chance to act

    late = [c for c in site.calls() if c["agent"] == "A" and c["phase"] == "begin" and c["t"] > taken_at]
    assert late == [], f"A began device calls after losing the lease: {late}"
    _check_renewed_once(site)
    assert set(busy) <= {e.get("device") for e in site.events("B", "cert.revoked")}
    assert not [e for e in site.events("A", "renewal.switched") if e["device"] in busy]
    # Woken, A is cancelled by its own deadline check, or refused at its next step: by the claim
    # check, or because the server ended the session it froze in mid-transaction (so that its
    # row locks could not block B). Never anything else.
    assert all(e["reason"] in ("not_leader", "inventory_unreachable") for e in site.events("A", "renewal.error"))
