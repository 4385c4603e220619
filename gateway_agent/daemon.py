"""``gateway-agent run``: the long-lived agent on the gateway.

Services, each optional and each driven by its section of ``configs/agent.yaml``:

- CRL sync: fetch (outbound only), verify, install to every broker target, on a
  schedule (default hourly with jitter) and at once on SIGHUP;
- validation service for MCUs, on the local broker (see docs/validation.md);
- certificate lifecycle: daily expiry scan and renewal (see docs/rotation.md).

The status endpoint serves ``/healthz``, ``/readyz`` (gateway_agent/observability.py),
``/status`` (JSON) and ``/metrics`` (Prometheus). SIGHUP syncs the CRL at once; SIGTERM
and SIGINT stop every service and exit cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_core.clock import Clock, SystemClock
from edge_core.crl import split_crl_bundle
from edge_core.crl_trust import accept_crl
from edge_core.events import SecurityEvents
from edge_core.revocation import RevocationIndex
from edge_runtime.metrics import AGENT_ALARMS, Metrics
from edge_runtime.sd_notify import Notifier
from edge_runtime.status_http import StatusServer
from edge_runtime.version import version
from gateway_agent.crl_sync import CrlSyncer, SyncReport
from gateway_agent.settings import AgentSettings

__all__ = ["Agent", "AgentService", "CrlService"]


class AgentService(Protocol):
    name: str

    async def run(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


def _index_from_bundle(bundle: bytes, issuers: list[Any], now: Any) -> RevocationIndex:
    """The revocation index of what was installed (already verified once; checked again, cheaply)."""
    return RevocationIndex.from_updates(
        accept_crl(block, issuers=issuers, installed=None, now=now) for block in split_crl_bundle(bundle)
    )


@dataclass
class CrlService:
    syncer: CrlSyncer
    clock: Clock
    name: str = "crl"
    last_report: SyncReport | None = None
    last_sync_at: str | None = None
    #: the revoked serials now in force (the validation service answers from it)
    index: RevocationIndex = field(default_factory=RevocationIndex)
    #: completed syncs: each has installed its CRLs, its report and the index
    syncs: int = 0
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _synced: asyncio.Condition = field(default_factory=asyncio.Condition)

    def sync_soon(self) -> None:
        self._wake.set()

    async def wait_synced(self, count: int) -> SyncReport:
        """Return once ``count`` syncs have completed (for callers that must see a sync's result)."""
        async with self._synced:
            await self._synced.wait_for(lambda: self.syncs >= count)
        assert self.last_report is not None
        return self.last_report

    async def _refresh_index(self) -> None:
        target = self.syncer.install_targets[0]
        try:
            bundle = await asyncio.to_thread(target.read_bytes)
        except FileNotFoundError:
            return
        self.index = await asyncio.to_thread(_index_from_bundle, bundle, self.syncer.issuers, self.clock.now())

    async def run(self) -> None:
        while True:
            self._wake.clear()
            # blocking HTTP and a large CRL parse: off the event loop
            self.last_report = await asyncio.to_thread(self.syncer.sync_once)
            self.last_sync_at = self.clock.now().isoformat()
            if self.last_report.changed or not self.index.installed:
                await self._refresh_index()
            async with self._synced:
                self.syncs += 1
                self._synced.notify_all()
            delay = self.syncer.next_delay(random.random())  # noqa: S311 - jitter, not a secret
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    def status(self) -> dict[str, Any]:
        now = self.clock.now()
        issuers = {}
        for issuer, installed in self.syncer.installed.items():
            fresh = self.syncer.staleness.evaluate(installed, now)
            issuers[issuer] = {"crl_number": installed.crl_number, "revoked": installed.count,
                               "this_update": installed.this_update.isoformat(),
                               "next_update": installed.next_update.isoformat(),
                               "freshness": fresh.state, "alarm": fresh.alarm}
        report = self.last_report
        return {
            "last_sync_at": self.last_sync_at,
            "last_sync_ok": report.ok if report else None,
            "sources": [{"source": r.source, "outcome": r.outcome, "reason": r.reason} for r in report.results]
            if report else [],
            "issuers": issuers,
            "targets": [str(t) for t in self.syncer.install_targets],
            "policy": self.syncer.staleness.mode,
        }


class Agent:
    """The agent daemon: services plus the status endpoint. An async context manager."""

    def __init__(self, settings: AgentSettings, *, clock: Clock | None = None,
                 events: SecurityEvents | None = None,
                 extra_services: list[Callable[[Agent], Awaitable[AgentService | None]]] | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.events = events or SecurityEvents("gateway-agent")
        self.services: list[AgentService] = []
        self._factories = extra_services or []
        self._tasks: list[asyncio.Task[None]] = []
        self._status: StatusServer | None = None
        #: ``/metrics``; services add their gauges with ``agent.metrics.gauge(name, reader)``
        self.metrics = Metrics("gateway_agent", self.events, version=version(), alarms=AGENT_ALARMS)
        self._stopped = asyncio.Event()
        self._entered = False
        self.started_at = 0.0

    @property
    def status_server(self) -> StatusServer | None:
        return self._status

    @property
    def crl(self) -> CrlService | None:
        return next((s for s in self.services if isinstance(s, CrlService)), None)

    async def __aenter__(self) -> Agent:
        if self._entered:
            raise RuntimeError("Agent cannot be entered twice")
        self._entered = True
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self) -> None:
        s = self.settings
        if s.crl is not None:
            self.services.append(CrlService(CrlSyncer.from_settings(s.crl, self.clock, self.events), self.clock))
        for factory in self._factories:
            service = await factory(self)
            if service is not None:
                self.services.append(service)
        for service in self.services:
            self._tasks.append(asyncio.create_task(self._supervise(service), name=f"agent:{service.name}"))
        from gateway_agent.observability import install_observability

        if s.status is not None:
            self._status = StatusServer(s.status, status=self.status, metrics=self.metrics.render)
        self._tasks.extend(install_observability(self, self._status, self.metrics))
        if self._status is not None:
            await self._status.start()
        self.started_at = time.time()
        if self._status is not None:
            self._status.mark_started()
        self.events.emit("agent.started", agent=s.agent_id, services=[svc.name for svc in self.services])

    async def _supervise(self, service: AgentService) -> None:
        """Run a service; if it fails, log why and restart it after a pause (never silently)."""
        backoff = 1.0
        while True:
            started = time.monotonic()
            try:
                await service.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failing service is reported and restarted
                if time.monotonic() - started > 60:
                    backoff = 1.0  # it ran fine for a while: this is a new failure, retry quickly
                self.events.emit("agent.service_failed", type(exc).__name__, level="error", service=service.name,
                                 detail=str(exc)[:300], retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
            else:
                return

    def install_signal_handlers(self, notifier: Notifier | None = None) -> None:
        """SIGHUP: sync the CRL now; SIGTERM/SIGINT: stop. Other signals keep their default.

        With a ``notifier`` (systemd ``Type=notify``) each is reported: RELOADING/READY, STOPPING.
        """
        notify = notifier or Notifier({})
        loop = asyncio.get_running_loop()

        def stop(signum: int) -> None:
            self.events.emit("agent.stopping", signal.Signals(signum).name)
            notify.stopping()
            self._stopped.set()

        def hup() -> None:
            notify.reloading()
            self._sighup()
            notify.ready("CRL sync requested")

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop, sig)
        loop.add_signal_handler(signal.SIGHUP, hup)

    def _sighup(self) -> None:
        self.events.emit("agent.sighup", detail="CRL sync requested" if self.crl is not None else "no CRL service")
        if self.crl is not None:
            self.crl.sync_soon()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def serve(self, notify: Notifier, status: str) -> None:
        """Tell systemd we are ready, feed its watchdog, and run until a stop signal."""
        notify.ready(status)
        notify.start_watchdog()
        try:
            await self.wait_stopped()
        finally:
            await notify.stop_watchdog()

    def stop(self) -> None:
        self._stopped.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for service in self.services:
            closer = getattr(service, "close", None)
            if closer is not None:
                await closer()
        if self._status is not None:
            await self._status.close()
        self.events.emit("agent.stopped", agent=self.settings.agent_id)

    def status(self) -> dict[str, Any]:
        alarms = [e for e in self.events.recent() if e["event"].endswith((".alarm", ".stale", ".rejected",
                                                                          ".fetch_failed", ".failed"))]
        return {
            "component": "gateway-agent",
            "agent_id": self.settings.agent_id,
            "uptime_s": round(time.time() - self.started_at, 1),
            "services": {svc.name: svc.status() for svc in self.services},
            "events": self.events.snapshot(),
            "recent_alarms": alarms[-20:],
        }
