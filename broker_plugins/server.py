"""Assemble and run the hardened broker: the concerns, the engine, the listeners, status.

``EdgeBroker`` is an async context manager; ``edge-broker run`` and the tests use it the
same way::

    async with EdgeBroker(load_settings("configs/broker.yaml")) as broker:
        await broker.wait_closed()

Each concern owns its settings, state, reload and enforcement, in its own module:
``registry`` (``RegistryConcern``), ``acl`` (``AclConcern``), ``commands``
(``CommandConcern``), ``revocation`` (``RevocationConcern``) and the engine
(``broker.HardenedBroker`` with ``engine``). This module only wires them together in
order and serves the status endpoint. ``reload()`` re-reads every configuration file now
(for a SIGHUP handler); each concern also has its own ``reload()``.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import ssl
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Literal

from broker_plugins.acl import AclConcern
from broker_plugins.broker import HardenedBroker
from broker_plugins.commands import CommandConcern
from broker_plugins.engine.store import MemoryStore, SessionStore, SqliteStore
from broker_plugins.listener import DeviceListener
from broker_plugins.plugins import enabled_plugins
from broker_plugins.registry import RegistryConcern, load_registry
from broker_plugins.revocation import RevocationConcern
from broker_plugins.runtime import BrokerRuntime
from broker_plugins.settings import BrokerSettings
from broker_plugins.tls import server_context
from broker_plugins.watched import read_config_file
from edge_core.clock import Clock, SystemClock
from edge_core.command_config import check_command_configuration
from edge_core.errors import ConfigError
from edge_core.events import SecurityEvents
from edge_runtime.metrics import BROKER_ALARMS, Metrics
from edge_runtime.status_http import StatusServer
from edge_runtime.version import version

__all__ = ["EdgeBroker", "ReloadOutcome", "read_config_file"]

#: what a reload did; after "failed" the old state stays in force
ReloadOutcome = Literal["changed", "unchanged", "failed"]

AUTH_PLUGIN = "broker_plugins.plugins.device_auth.DeviceAuthPlugin"
_REFUSAL_SUFFIXES = (".rejected", ".denied", ".cut", ".reload_failed", ".removed", ".dropped")


def settle_heap() -> None:
    """Move the long-lived configuration (registry, compiled ACL, CRL index) out of the GC's sight.

    With 10,000 devices these are millions of objects; every full collection would walk
    them and stall the event loop. ``gc.freeze`` parks what exists now in a permanent
    generation. On each reload the previous freeze is lifted first, so replaced objects
    are collected.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


#: Seconds between moves of surviving objects (sessions, retained messages) out of the GC's sight.
FREEZE_INTERVAL = 1.0
#: Seconds between full collections of what was frozen (cyclic garbage frozen by mistake is freed).
SETTLE_INTERVAL = 900.0


async def keep_heap_settled() -> None:
    """Full collections walk every live object: with 100,000 retained messages that is a stall of
    a few hundred ms. Objects that survived a second are parked with ``gc.freeze`` (a list splice,
    no walk), so collections only see young objects; acyclic garbage is still freed by reference
    counting, and a full settle every ``SETTLE_INTERVAL`` frees any frozen cycle."""
    last_settle = time.monotonic()
    while True:
        await asyncio.sleep(FREEZE_INTERVAL)
        if time.monotonic() - last_settle >= SETTLE_INTERVAL:
            settle_heap()
            last_settle = time.monotonic()
        else:
            gc.freeze()


def open_store(settings: BrokerSettings, events: SecurityEvents) -> SessionStore:
    """The engine's persistence: SQLite when ``persistence:`` is configured, else memory (loudly)."""
    persistence = settings.persistence
    if persistence is None:
        events.emit("broker.no_persistence", "not_configured", level="warning",
                    detail="no 'persistence:' section: persistent sessions, queued QoS 1/2 messages "
                           "and retained messages are kept in memory only and lost on restart")
        return MemoryStore()

    def failed(exc: BaseException) -> None:
        events.emit("store.write_failed", type(exc).__name__, level="error", file=str(persistence.path),
                    detail=str(exc)[:200])

    return SqliteStore(persistence.path, synchronous=persistence.synchronous, on_error=failed)


class EdgeBroker:
    def __init__(
        self,
        settings: BrokerSettings,
        *,
        clock: Clock | None = None,
        events: SecurityEvents | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.events = events or SecurityEvents("edge-broker")
        self.runtime: BrokerRuntime | None = None
        self.broker: HardenedBroker | None = None
        self.registry: RegistryConcern | None = None
        self.acl: AclConcern | None = None
        self.commands: CommandConcern | None = None
        self.revocation: RevocationConcern | None = None
        self.listener: DeviceListener | None = None
        self.plaintext_listener: DeviceListener | None = None
        self.cert_test_listener: DeviceListener | None = None
        self.status_server: StatusServer | None = None
        self.metrics_registry = Metrics("edge_broker", self.events, version=version(), alarms=BROKER_ALARMS)
        self._ssl_context: ssl.SSLContext | None = None
        self._tls_digest = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = asyncio.Event()
        self._heap_task: asyncio.Task[None] | None = None
        self._entered = False
        self.started_at = 0.0

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> EdgeBroker:
        if self._entered:
            raise RuntimeError("EdgeBroker cannot be entered twice")
        self._entered = True
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def _start(self) -> None:
        s = self.settings
        runtime = self.runtime = BrokerRuntime(settings=s, registry=load_registry(s.registry_path), clock=self.clock,
                                               events=self.events)
        acl = self.acl = AclConcern(s.acl_path, runtime, settle=settle_heap)
        acl.start()
        self.registry = RegistryConcern(s.registry_path, runtime, on_change=acl.prune_subscriptions,
                                        settle=settle_heap)
        check_command_configuration(runtime.acl, commands_configured=s.commands is not None,
                                    disabled=s.commands_disabled, source=s.source)
        if s.commands_disabled:
            self.events.emit("broker.commands_disabled", "unverified_commands", level="warning",
                             detail="'commands: disabled': command topics are forwarded without verification")
        if s.commands is not None:
            self.commands = CommandConcern(s.commands, runtime)
            self.commands.start()
        if s.revocation is not None:
            self.revocation = RevocationConcern(s.revocation, runtime, settle=settle_heap)
            await self.revocation.start()
        plugins: dict[str, dict[str, Any]] = {AUTH_PLUGIN: {}}
        plugins.update(enabled_plugins(s))
        ssl_context = server_context(s.listener)  # fails early on bad TLS material
        self._ssl_context, self._tls_digest = ssl_context, self._tls_material_digest()
        self.broker = HardenedBroker(runtime, plugins, open_store(s, self.events))
        engine = self.broker.engine
        engine.restore()
        for concern in (self.registry, acl, self.revocation):
            if concern is not None:
                concern.engine = engine
        self.listener = DeviceListener(
            engine.protocol_factory(), host=s.listener.host, port=s.listener.port, ssl_context=ssl_context,
            limits=s.limits, events=self.events,
        )
        await self.listener.start()
        if s.plaintext_bind is not None:
            host, port = s.plaintext_bind
            self.events.emit("broker.unsafe_plaintext_listener", "configured", level="warning", bind=f"{host}:{port}",
                             detail="plaintext MQTT on loopback: no client certificates, so every CONNECT "
                                    "there is refused; use only for protocol diagnostics")
            self.plaintext_listener = DeviceListener(engine.protocol_factory(listener="plaintext"), host=host,
                                                     port=port, ssl_context=None, limits=s.limits, events=self.events)
            await self.plaintext_listener.start()
        if s.cert_test_bind is not None:
            host, port = s.cert_test_bind
            self.cert_test_listener = DeviceListener(
                engine.protocol_factory(listener="cert-test", test_only=True), host=host, port=port,
                ssl_context=ssl_context, limits=s.limits, events=self.events, listener_name="cert-test",
            )
            await self.cert_test_listener.start()
        for watched in (self.registry, acl, self.commands, self.revocation):
            if watched is not None:
                watched.watch(s.reload_interval)
        if s.status is not None:
            from broker_plugins.observability import install_observability

            self.status_server = StatusServer(s.status, status=self.status, metrics=self.metrics_registry.render)
            install_observability(self, self.status_server, self.metrics_registry)
            await self.status_server.start()
        from broker_plugins.sys_topics import SysTopicPublisher, broker_snapshot, publish_via

        self.sys_topics = SysTopicPublisher(lambda: broker_snapshot(self), publish_via(self))
        self._tasks.append(asyncio.create_task(self.sys_topics.run(), name="sys-topics"))
        settle_heap()
        self._heap_task = asyncio.create_task(keep_heap_settled(), name="heap")
        self.started_at = time.time()
        if self.status_server is not None:
            self.status_server.mark_started()
        self.events.emit("broker.started", host=s.listener.host, port=self.port, devices=len(runtime.registry))

    async def reload(self) -> dict[str, bool]:
        """Re-read every configuration file now (SIGHUP); which concerns loaded a new version."""
        changed: dict[str, bool] = {}
        for name, concern in (("registry", self.registry), ("acl", self.acl), ("commands", self.commands),
                              ("revocation", self.revocation)):
            if concern is not None:
                changed[name] = await concern.reload()
        return changed

    def reloaders(self) -> dict[str, Callable[[], Awaitable[ReloadOutcome]]]:
        """One reload per concern, for SIGHUP (``broker_plugins.signals.reload_all``)."""
        out: dict[str, Callable[[], Awaitable[ReloadOutcome]]] = {}
        for name, concern in (("registry", self.registry), ("acl", self.acl), ("operators", self.commands),
                              ("crl", self.revocation)):
            if concern is not None:
                out[name] = self._outcome_of(concern.reload)
        out["tls"] = self.reload_tls
        return out

    def _outcome_of(self, reload: Callable[[], Awaitable[bool]]) -> Callable[[], Awaitable[ReloadOutcome]]:
        """A concern's ``reload()`` says whether it saw a new version; a refused one logs a failure event."""
        async def outcome() -> ReloadOutcome:
            before = self._reload_failures()
            loaded = await reload()
            if self._reload_failures() > before:
                return "failed"
            return "changed" if loaded else "unchanged"

        return outcome

    def _reload_failures(self) -> int:
        return self.events.count("config.reload_failed") + self.events.count("crl.reload_failed")

    def _tls_material_digest(self) -> str:
        listener = self.settings.listener
        digest = hashlib.sha256()
        for path in (listener.certfile, listener.keyfile):
            digest.update(read_config_file(path, "TLS material"))
        return digest.hexdigest()

    async def reload_tls(self) -> ReloadOutcome:
        """Load a changed server certificate and key for new connections; live ones keep theirs.

        The new pair is first loaded into a fresh context (a key that does not match its
        certificate is refused there); only then does the live context take it.
        """
        listener = self.settings.listener
        try:
            digest = self._tls_material_digest()
            if digest == self._tls_digest:
                return "unchanged"
            server_context(listener)
        except (ConfigError, OSError, ssl.SSLError, ValueError) as exc:
            self.events.emit("config.reload_failed", "invalid", level="error", file=str(listener.certfile),
                             detail=f"TLS certificate/key: {exc}"[:300])
            return "failed"
        assert self._ssl_context is not None
        self._ssl_context.load_cert_chain(listener.certfile, listener.keyfile)
        self._tls_digest = digest
        self.events.emit("config.reloaded", "tls", file=str(listener.certfile), digest=digest[:12])
        return "changed"

    async def close(self) -> None:
        if self.broker is not None:
            self.broker.engine.withhold_wills()  # before the listeners drop every connection
        if self._heap_task is not None:
            self._heap_task.cancel()
            await asyncio.gather(self._heap_task, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for concern in (self.registry, self.acl, self.commands, self.revocation):
            if concern is not None:
                await concern.stop()
        for listener in (self.listener, self.plaintext_listener, self.cert_test_listener):
            if listener is not None:
                await listener.close()
        if self.status_server is not None:
            await self.status_server.close()
        if self.broker is not None:
            await self.broker.close()
        if self.commands is not None:
            self.commands.close()  # the replay store's connection, once no command can arrive
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def uptime(self) -> float:
        return time.time() - self.started_at if self.started_at else 0.0

    @property
    def port(self) -> int:
        assert self.listener is not None
        return self.listener.port

    # -- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        assert self.broker is not None and self.registry is not None and self.acl is not None
        engine = self.broker.engine
        return {
            "component": "edge-broker",
            "uptime_s": round(time.time() - self.started_at, 1),
            "listener": {"host": self.settings.listener.host, "port": self.port,
                         "active_connections": self.listener.active if self.listener else 0},
            "sessions": {"connected": len(engine.connected_sessions()), "known": len(engine.sessions)},
            "engine": engine.status(),
            "registry": self.registry.status(),
            "revocation": self.revocation.status() if self.revocation is not None else None,
            "acl": self.acl.status(),
            "events": self.events.snapshot(),
            "recent_refusals": [e for e in self.events.recent() if e["event"].endswith(_REFUSAL_SUFFIXES)][-20:],
        }
