"""The agent's one MQTT session to the local broker, shared by its services.

The agent authenticates as one certificate identity, and the broker binds the client id
to it, so a second session would take the first one over. This service therefore owns
the single session and dispatches incoming messages: validation requests from MCUs
(``ValidationService.handle``), rotation responses from devices and the broker's connect
events (``MqttDeviceChannel.dispatch``). The lifecycle runner (daily scan, renewal requests,
overlap ends) runs beside the dispatcher on the same session. If the broker is not up
yet or goes away, the whole session fails and the daemon's supervisor starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt

from edge_core.clock import Clock
from edge_core.dsn import redact
from edge_core.errors import ConfigError, FetchError, StateError
from edge_core.events import SecurityEvents
from edge_core.identity import check_identity
from edge_core.registry import parse_registry
from edge_core.revocation import RevocationIndex
from edge_core.validation import REQUEST_FILTER
from edge_runtime.mqtt import suback_refused
from gateway_agent.commanding import BrokerEndpoint
from gateway_agent.inventory import ImportReport, Reconciler, open_inventory, write_registry
from gateway_agent.inventory_pg import PostgresInventory
from gateway_agent.leadership import DatabaseClaims, LeaderLease, holder_id
from gateway_agent.pki import FileCA
from gateway_agent.renewal import DeviceChannel, FileCABackend, RenewalOrchestrator, ScanReport
from gateway_agent.rotation_channel import MqttDeviceChannel
from gateway_agent.settings import LifecycleSettings
from gateway_agent.validation_service import ValidationService

__all__ = ["AgentSession", "LifecycleRunner", "request_renewal"]

_SPOOL_POLL = 1.0


def request_renewal(settings: LifecycleSettings, device_id: str) -> Path:
    """Queue a "renew now" for the running daemon (``gateway-agent certs renew``); returns the request file."""
    check_identity(device_id)
    spool = settings.spool_dir
    spool.mkdir(parents=True, exist_ok=True)
    path = spool / device_id
    tmp = spool / f".{device_id}.tmp"
    tmp.write_text("renew\n")
    os.replace(tmp, path)
    return path


class LifecycleRunner:
    """Daily scan, queued renewal requests and overlap ends, over the agent's session."""

    def __init__(self, settings: LifecycleSettings, *, clock: Clock, events: SecurityEvents,
                 broker_status_url: str | None, agent_id: str = "gateway-agent",
                 current_index: Callable[[], RevocationIndex] | None = None) -> None:
        self.settings = settings
        #: the CRLs the agent's sync accepted: every revoked serial in them reaches the inventory
        self.current_index = current_index
        self._fed_index: RevocationIndex | None = None
        self.clock = clock
        self.events = events
        self.broker_status_url = broker_status_url
        self.inventory = open_inventory(settings.inventory)
        self.spool = settings.spool_dir
        self.last_scan: ScanReport | None = None
        self._expected_digest: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        #: several agents on one PostgreSQL inventory: only the lease holder scans and renews
        self.lease: LeaderLease | None = None
        if isinstance(self.inventory, PostgresInventory):
            self.lease = LeaderLease(settings.inventory, holder=holder_id(agent_id), ttl=settings.leader_lease,
                                     events=events)
        ca = FileCA(settings.ca_dir)
        self._reconciler = Reconciler(self.inventory, settings.registry, [ca.issued_dir, ca.dir / "devices"],
                                      overlap=settings.policy.overlap)
        if self.inventory.count() == 0:
            try:
                report = self._reconcile(clock.now())
            except StateError as exc:
                if exc.reason != "device_exists":
                    raise
                events.emit("lifecycle.import_skipped", "imported_by_another_agent")  # HA agents starting together
            else:
                events.emit("lifecycle.imported", enrolled=len(report.enrolled), skipped=len(report.skipped))

    def _reconcile(self, now: datetime) -> ImportReport:
        """Enrol registry devices the inventory lacks, from the CA's ledger and ``devices/`` (every scan)."""
        return self._reconciler(now)

    # -- pins: the inventory feeds the broker's registry -------------------------------

    def _pins_changed(self, device_id: str) -> None:
        base = parse_registry(self.settings.registry.read_bytes(), source=str(self.settings.registry))
        written = write_registry(self.inventory, base, self.settings.registry)
        self._expected_digest = written.digest
        self.events.emit("registry.written", device=device_id, digest=written.digest[:12])

    async def _pins_ready(self, device_id: str) -> None:
        """Wait until the broker serves the registry we wrote (its status endpoint shows the digest)."""
        expected = self._expected_digest
        if expected is None or self.broker_status_url is None:
            return
        url = self.broker_status_url
        for _ in range(100):
            status = await asyncio.to_thread(_get_json, url)
            if str(status.get("registry", {}).get("digest", "")) == expected[:12]:
                return
            await asyncio.sleep(0.1)
        raise FetchError("broker_not_reloaded", f"the broker did not load registry {expected[:12]} within 10 s")

    # -- the loop -----------------------------------------------------------------------

    async def run(self, channel: DeviceChannel) -> None:
        """Lead the lifecycle (alone on SQLite; while holding the lease on PostgreSQL)."""
        if isinstance(channel, MqttDeviceChannel):
            channel.pins_ready = self._pins_ready
        if self.lease is None:
            await self._lead(channel)
            return
        self.lease.start()  # the heartbeat's own thread: a long scan on this loop never starves it
        leading: asyncio.Task[None] | None = None
        try:
            while True:
                self.lease.raise_failure()  # surface a failure of the heartbeat
                if not self.lease.is_leader:
                    await self.lease.wait_changed(self.lease.interval)
                    continue
                leading = asyncio.create_task(self._lead(channel), name="lifecycle-leader")
                while self.lease.is_leader:  # validity is a deadline, not an event: look often
                    done, _ = await asyncio.wait({leading}, timeout=min(_SPOOL_POLL, self.lease.interval / 2))
                    if done:
                        break
                if not leading.done():  # leadership lost: stop touching devices at once
                    leading.cancel()
                    self.events.emit("lifecycle.standby", "leadership_lost", level="warning")
                try:
                    await leading
                except asyncio.CancelledError:
                    if not leading.cancelled():
                        raise  # we are being cancelled ourselves
                except StateError as exc:
                    if exc.reason != "not_leader":
                        raise
                    self.events.emit("lifecycle.standby", "not_leader", level="warning", detail=str(exc))
        finally:
            if leading is not None and not leading.done():  # we are being cancelled ourselves (shutdown)
                leading.cancel()  # the leader stops (and unwires the online trigger) before the lease goes
                with contextlib.suppress(asyncio.CancelledError):
                    await leading
            await self._cancel_tasks()
            await self.lease.stop()  # heartbeat ended, then the lease released: nothing of ours runs on

    async def _lead(self, channel: DeviceChannel) -> None:
        ca = FileCA(self.settings.ca_dir, registry=self.settings.registry)
        claims = None
        if self.lease is not None and isinstance(self.inventory, PostgresInventory):
            self.inventory.fence = self.lease.fence  # writes from here on prove the lease is still ours
            claims = DatabaseClaims(self.inventory, self.lease)
        orchestrator = RenewalOrchestrator(
            self.inventory, channel, FileCABackend(ca, clock=ca.clock, registry=self.settings.registry),
            clock=self.clock, events=self.events, policy=self.settings.policy, concurrency=self.settings.concurrency,
            lifetime=self.settings.lifetime, on_pins_changed=self._pins_changed, reconcile=self._reconcile,
            claims=claims,
        )

        def online(device_id: str) -> None:
            task = asyncio.create_task(orchestrator.device_online(device_id), name=f"online-{device_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        if isinstance(channel, MqttDeviceChannel):
            channel.on_online = online  # the leader's only: a standby ignores devices coming online
        next_scan = self.clock.now()
        try:
            while True:
                now = self.clock.now()
                if now >= next_scan:
                    self.last_scan = await orchestrator.daily_scan(now)
                    next_scan = now + self.settings.scan_interval
                else:
                    await orchestrator.end_due_overlaps(now)
                    await orchestrator.retry_forced(now)
                await self._feed_crl(orchestrator, now)
                for request in sorted(self.spool.glob("*")) if self.spool.is_dir() else []:
                    if request.name.startswith("."):
                        continue
                    request.unlink(missing_ok=True)
                    self.events.emit("renewal.requested", device=request.name)
                    task = asyncio.create_task(orchestrator.renew(request.name, ignore_backoff=True, force=True))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                await asyncio.sleep(_SPOOL_POLL)
        finally:
            if isinstance(channel, MqttDeviceChannel) and channel.on_online is online:
                channel.on_online = None  # leadership lost or stopping: this orchestrator starts nothing more
            await self._cancel_tasks()
            # The fence stays: whatever still writes through this inventory after leadership
            # ended must prove a lease it no longer holds, and fails with not_leader.

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _feed_crl(self, orchestrator: RenewalOrchestrator, now: datetime) -> None:
        """Each newly accepted CRL: its revoked serials go into the inventory."""
        index = self.current_index() if self.current_index is not None else None
        if index is None or index is self._fed_index:
            return
        self._fed_index = index
        for serials in index.by_issuer.values():
            await orchestrator.sync_revocations(now, serials)

    def status(self) -> dict[str, Any]:
        scan = self.last_scan
        return {
            "inventory": redact(self.settings.inventory),
            "leadership": None if self.lease is None else self.lease.status(),
            "devices": self.inventory.count(),
            "in_progress": [d.device_id for d in self.inventory.in_progress()],
            "last_scan": None if scan is None else {
                "at": scan.now.isoformat(), "expiring": scan.expiring, "alarms": len(scan.alarms),
                "renewed": scan.count("switched")},
        }


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback URL from settings
        value = json.loads(response.read())
    return value if isinstance(value, dict) else {}


@dataclass
class AgentSession:
    endpoint: BrokerEndpoint
    client_id: str
    events: SecurityEvents
    validator: ValidationService | None = None
    lifecycle: LifecycleRunner | None = None
    channel_timeout: float = 20.0
    name: str = "session"
    connections: int = field(default=0)

    async def run(self) -> None:
        client = aiomqtt.Client(self.endpoint.host, self.endpoint.port, identifier=self.client_id,
                                tls_context=self.endpoint.tls_context(), protocol=aiomqtt.ProtocolVersion.V311,
                                clean_session=True, timeout=10)
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            raise FetchError("broker_unreachable", f"agent session cannot connect to "
                             f"{self.endpoint.host}:{self.endpoint.port}: {exc}") from exc
        self.connections += 1
        runner: asyncio.Task[None] | None = None
        channel: MqttDeviceChannel | None = None
        try:
            channel = MqttDeviceChannel(client, timeout=self.channel_timeout) if self.lifecycle else None
            if self.validator is not None:
                granted = await client.subscribe(REQUEST_FILTER, qos=1)
                if any(suback_refused(code) for code in granted):
                    raise ConfigError(f"the broker refused {REQUEST_FILTER}",
                                      hint="grant role gateway 'subscribe gateway/validation/+/request'")
            if channel is not None and self.lifecycle is not None:
                await channel.subscribe()
                runner = asyncio.create_task(self.lifecycle.run(channel), name="lifecycle")
            self.events.emit("agent.session_up", validation=self.validator is not None,
                             lifecycle=self.lifecycle is not None)
            async for message in client.messages:
                if runner is not None and runner.done():
                    runner.result()  # surface a lifecycle failure; the supervisor restarts the session
                if channel is not None and channel.dispatch(message):
                    continue
                if self.validator is not None and str(message.topic).startswith("gateway/validation/"):
                    payload = message.payload if isinstance(message.payload, bytes) else b""
                    reply = self.validator.handle(str(message.topic), payload)
                    if reply is not None:
                        await client.publish(reply[0], reply[1], qos=1)
        finally:
            if runner is not None:
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await runner
            if channel is not None:
                channel.forget_presence()
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"connections": self.connections}
        if self.validator is not None:
            out["validation"] = {"answered": self.events.count("validation.answered"),
                                 "refused": self.events.snapshot().get("validation.refused", {})}
        if self.lifecycle is not None:
            out["lifecycle"] = self.lifecycle.status()
        return out
