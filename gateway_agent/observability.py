"""What the agent tells its operators: gauges for ``/metrics`` and the checks behind ``/readyz``.

Readiness:

- ``crl``: the first sync has run; under ``fail_closed`` every issuer's installed CRL is
  fresh (a stale one means the brokers it feeds refuse that issuer's devices);
- ``stores``: the directories the agent writes (CRL install targets, its CRL state, the
  inventory) are writable.

Certificate gauges come from the inventory, read off the event loop every
``CERT_REFRESH_S`` seconds (a scrape only reads the cached counts).
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

from edge_runtime.metrics import Metrics
from edge_runtime.status_http import NotReady, StatusServer

if TYPE_CHECKING:
    from gateway_agent.daemon import Agent, CrlService
    from gateway_agent.settings import AgentSettings

__all__ = ["CERT_REFRESH_S", "CertificateGauges", "install_observability", "writable_dirs"]

CERT_REFRESH_S: Final = 300.0


def writable_dirs(settings: AgentSettings) -> list[Path]:
    dirs: set[Path] = set()
    if settings.crl is not None:
        dirs.update(t.parent for t in settings.crl.install_targets)
        dirs.add(settings.crl.state_path.parent)
    if settings.lifecycle is not None:
        inventory = settings.lifecycle.inventory
        if not inventory.startswith(("postgresql://", "postgres://")):  # a SQLite file: its directory
            dirs.add(Path(inventory.removeprefix("sqlite:///")).parent)
    return sorted(dirs)


class CertificateGauges:
    """Counts of device certificates by state and the days to the soonest expiry, from the inventory."""

    def __init__(self, inventory: str, agent: Agent) -> None:
        self.inventory = inventory  # a URL: sqlite:///<path> or postgresql://...
        self.agent = agent
        self.by_state: dict[str, float] | None = None
        self.soonest_days: float | None = None

    def refresh(self) -> None:
        from gateway_agent.inventory import open_inventory

        if self.inventory.startswith("sqlite:///") and not Path(self.inventory.removeprefix("sqlite:///")).exists():
            return
        with open_inventory(self.inventory, create=False) as inventory:
            rows = inventory.expiring(self.agent.clock.now(), timedelta(days=36500))
        states = Counter(row.cert_state.value for row in rows)
        self.by_state = {state: float(n) for state, n in states.items()}
        active = [row.days_left for row in rows if row.cert_state.value in ("active", "expiring")]
        self.soonest_days = float(min(active)) if active else None

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception as exc:  # noqa: BLE001 - a failed count is reported, the gauges keep the last values
                self.agent.events.emit("agent.metrics_failed", type(exc).__name__, level="warning",
                                       detail=str(exc)[:200])
            await asyncio.sleep(CERT_REFRESH_S)


def install_observability(agent: Agent, server: StatusServer | None, metrics: Metrics) -> list[asyncio.Task[None]]:
    """Register the agent's gauges and readiness checks; returns background tasks to cancel on close."""
    tasks: list[asyncio.Task[None]] = []
    metrics.gauge("services", lambda: float(len(agent.services)))
    metrics.gauge("crl_next_update_timestamp_seconds", lambda: _crl_next_update(agent.crl))
    metrics.gauge("crl_this_update_timestamp_seconds", lambda: _crl_this_update(agent.crl))
    metrics.gauge("crl_fresh", lambda: _crl_fresh(agent.crl, agent))
    for service in agent.services:  # services with figures of their own (the uplink's queue) report them
        read = getattr(service, "gauges", None)
        if callable(read):
            metrics.values(read)
    lifecycle = agent.settings.lifecycle
    if lifecycle is not None:
        certs = CertificateGauges(lifecycle.inventory, agent)
        metrics.gauge("certificates", lambda: certs.by_state)
        metrics.gauge("certificate_soonest_expiry_days", lambda: certs.soonest_days)
        tasks.append(asyncio.create_task(certs.run(), name="agent:cert-gauges"))
    if server is not None:
        server.add_readiness_check("crl", lambda: _crl_ready(agent))
        server.add_readiness_check("stores", lambda: _stores_writable(agent.settings))
    return tasks


def _crl_next_update(crl: CrlService | None) -> dict[str, float] | None:
    if crl is None:
        return None
    return {issuer: installed.next_update.timestamp() for issuer, installed in crl.syncer.installed.items()}


def _crl_this_update(crl: CrlService | None) -> dict[str, float] | None:
    if crl is None:
        return None
    return {issuer: installed.this_update.timestamp() for issuer, installed in crl.syncer.installed.items()}


def _crl_fresh(crl: CrlService | None, agent: Agent) -> dict[str, float] | None:
    if crl is None:
        return None
    now = agent.clock.now()
    return {issuer: float(crl.syncer.staleness.evaluate(installed, now).admit)
            for issuer, installed in crl.syncer.installed.items()}


def _crl_ready(agent: Agent) -> None:
    crl = agent.crl
    if crl is None:
        return
    if crl.last_report is None:
        raise NotReady("the first CRL sync has not finished")
    staleness = crl.syncer.staleness
    if staleness.mode != "fail_closed":
        return
    now = agent.clock.now()
    if not crl.syncer.installed:
        raise NotReady("fail_closed and no CRL is installed yet")
    stale = [f"{issuer}: {fresh.state}" for issuer, installed in crl.syncer.installed.items()
             if not (fresh := staleness.evaluate(installed, now)).admit]
    if stale:
        raise NotReady("fail_closed and the CRL is not fresh: " + "; ".join(stale))


def _stores_writable(settings: AgentSettings) -> None:
    bad = [str(d) for d in writable_dirs(settings) if not os.access(d, os.W_OK | os.X_OK)]
    if bad:
        raise NotReady("not writable: " + ", ".join(bad))
