"""Assemble and run the hardened broker: runtime, amqtt broker, listeners, reloads, status.

``EdgeBroker`` is an async context manager; ``edge-broker run`` and the tests use it the
same way::

    async with EdgeBroker(load_settings("configs/broker.yaml")) as broker:
        await broker.wait_closed()
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from broker_plugins.broker import HardenedBroker
from broker_plugins.cert_test_endpoint import CertificateTestEndpoint
from broker_plugins.commands import CommandState
from broker_plugins.listener import DeviceListener
from broker_plugins.plugins import enabled_plugins
from broker_plugins.revocation import RevocationState, load_issuer_certs
from broker_plugins.runtime import BrokerRuntime, admitted_of
from broker_plugins.settings import BrokerSettings
from broker_plugins.tls import server_context
from edge_core.acl import Policy, parse_policy
from edge_core.admission import still_admitted
from edge_core.clock import Clock, SystemClock
from edge_core.command_config import check_command_configuration
from edge_core.errors import ConfigError, CredentialError
from edge_core.events import SecurityEvents
from edge_core.operators import OperatorConfig, parse_operators
from edge_core.registry import Registry, parse_registry
from edge_runtime.file_watch import WatchedFile
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


def read_config_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror}", source=str(path)) from exc


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
        self.listener: DeviceListener | None = None
        self.plaintext_listener: DeviceListener | None = None
        self.cert_test_listener: DeviceListener | None = None
        self.status_server: StatusServer | None = None
        self.metrics_registry = Metrics("edge_broker", self.events, version=version(), alarms=BROKER_ALARMS)
        self._ssl_context: ssl.SSLContext | None = None
        self._tls_digest = ""
        self._watchers: list[WatchedFile] = []
        self._watched: dict[Path, WatchedFile] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = asyncio.Event()
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
        registry = parse_registry(read_config_file(s.registry_path, "device registry"),
                                  source=str(s.registry_path))
        self.runtime = BrokerRuntime(settings=s, registry=registry, clock=self.clock, events=self.events)
        if s.acl_path is not None:
            self.runtime.acl = parse_policy(read_config_file(s.acl_path, "ACL file"), source=str(s.acl_path))
        else:
            self.events.emit("broker.no_acl", "not_configured", level="warning",
                             detail="no 'acl:' file configured: every publish and subscribe is denied")
        check_command_configuration(self.runtime.acl if isinstance(self.runtime.acl, Policy) else None,
                                    commands_configured=s.commands is not None, disabled=s.commands_disabled,
                                    source=s.source)
        if s.commands_disabled:
            self.events.emit("broker.commands_disabled", "unverified_commands", level="warning",
                             detail="'commands: disabled': command topics are forwarded without verification")
        if s.commands is not None:
            operators = self._parse_operators(read_config_file(s.commands.operators_path, "operators file"))
            self.runtime.commands = CommandState.start(operators, capacity=s.commands.replay_capacity,
                                                       clock=self.clock)
        if s.revocation is not None:
            self.runtime.revocation = RevocationState(s.revocation, load_issuer_certs(s.revocation.issuers))
            await self._reload_crl(b"")
        plugins: dict[str, dict[str, Any]] = {AUTH_PLUGIN: {}}
        plugins.update(enabled_plugins(s))
        self.broker = HardenedBroker(self.runtime, plugins)
        ssl_context = server_context(s.listener)  # fails early on bad TLS material
        self._ssl_context, self._tls_digest = ssl_context, self._tls_material_digest()
        await self.broker.start()
        self.listener = DeviceListener(
            self.broker, host=s.listener.host, port=s.listener.port, ssl_context=ssl_context,
            limits=s.limits, events=self.events,
        )
        await self.listener.start()
        if s.plaintext_bind is not None:
            self.events.emit("broker.unsafe_plaintext_listener", "configured", level="warning",
                             bind=f"{s.plaintext_bind[0]}:{s.plaintext_bind[1]}",
                             detail="plaintext MQTT on loopback: no client certificates, so every CONNECT "
                                    "there is refused; use only for protocol diagnostics")
            self.plaintext_listener = DeviceListener(
                self.broker, host=s.plaintext_bind[0], port=s.plaintext_bind[1], ssl_context=None,
                limits=s.limits, events=self.events,
            )
            await self.plaintext_listener.start()
        if s.cert_test_bind is not None:
            self.cert_test_listener = DeviceListener(
                CertificateTestEndpoint(self.broker), host=s.cert_test_bind[0], port=s.cert_test_bind[1],
                ssl_context=ssl_context, limits=s.limits, events=self.events, listener_name="cert-test",
            )
            await self.cert_test_listener.start()
        self._watch(s.registry_path, self._reload_registry, registry.digest)
        if s.acl_path is not None and self.runtime.acl is not None:
            self._watch(s.acl_path, self._reload_acl, self.runtime.acl.digest)
        if s.commands is not None and self.runtime.commands is not None:
            self._watch(s.commands.operators_path, self._reload_operators, self.runtime.commands.config.digest)
        if s.revocation is not None:
            for crl_file in s.revocation.crl_files:
                # start from the bytes already loaded: no second parse of a large CRL at start-up
                self._watch(crl_file, self._reload_crl,
                            self.runtime.revocation.file_digests.get(str(crl_file), ""))
            self._tasks.append(asyncio.create_task(self._freshness_loop(s.revocation.check_interval),
                                                   name="crl-freshness"))
        if s.status is not None:
            from broker_plugins.observability import install_observability

            self.status_server = StatusServer(s.status, status=self.status, metrics=self.metrics_registry.render)
            install_observability(self, self.status_server, self.metrics_registry)
            await self.status_server.start()
        from broker_plugins.sys_topics import SysTopicPublisher, broker_snapshot, publish_via

        self.sys_topics = SysTopicPublisher(lambda: broker_snapshot(self), publish_via(self))
        self._tasks.append(asyncio.create_task(self.sys_topics.run(), name="sys-topics"))
        settle_heap()
        self.started_at = time.time()
        if self.status_server is not None:
            self.status_server.mark_started()
        self.events.emit("broker.started", host=s.listener.host, port=self.port, devices=len(registry))

    def _watch(self, path: Path, loader: Any, digest: str) -> None:
        def unreadable(exc: OSError) -> None:
            self.events.emit("config.reload_failed", "unreadable", level="error", file=str(path),
                             detail=exc.strerror)

        watcher = WatchedFile(path, loader, interval=self.settings.reload_interval, on_error=unreadable,
                              initial_digest=digest)
        watcher.start()
        self._watchers.append(watcher)
        self._watched[path] = watcher

    async def close(self) -> None:
        for watcher in self._watchers:
            await watcher.stop()
        self._watchers.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for listener in (self.listener, self.plaintext_listener, self.cert_test_listener):
            if listener is not None:
                await listener.close()
        if self.status_server is not None:
            await self.status_server.close()
        if self.broker is not None and self.broker.transitions.state == "started":
            await self.broker.shutdown()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def uptime(self) -> float:
        return time.time() - self.started_at if self.started_at else 0.0

    @property
    def port(self) -> int:
        assert self.listener is not None
        return self.listener.port

    # -- reloads -----------------------------------------------------------------------

    async def _reload_registry(self, data: bytes) -> ReloadOutcome:
        assert self.runtime is not None
        path = str(self.settings.registry_path)
        if hashlib.sha256(data).hexdigest() == self.runtime.registry.digest:
            return "unchanged"
        try:
            registry = parse_registry(data, source=path)
        except ConfigError as exc:
            self.events.emit("config.reload_failed", "invalid", level="error", file=path, line=exc.line,
                             detail=exc.reason, kept=self.runtime.registry.digest[:12])
            return "failed"
        self.runtime.registry = registry
        settle_heap()
        self.events.emit("config.reloaded", "registry", file=path, devices=len(registry),
                         digest=registry.digest[:12])
        await self.enforce_registry(registry)
        await self.prune_subscriptions("registry_reload")
        return "changed"

    async def _reload_acl(self, data: bytes) -> ReloadOutcome:
        assert self.runtime is not None and self.settings.acl_path is not None
        path = str(self.settings.acl_path)
        old = self.runtime.acl
        if old is not None and hashlib.sha256(data).hexdigest() == old.digest:
            return "unchanged"
        try:
            policy = parse_policy(data, source=path)
        except ConfigError as exc:
            self.events.emit("config.reload_failed", "invalid", level="error", file=path, line=exc.line,
                             detail=exc.reason, kept=old.digest[:12] if old else None)
            return "failed"
        self.runtime.acl = policy
        settle_heap()
        self.events.emit("config.reloaded", "acl", file=path, digest=policy.digest[:12])
        await self.prune_subscriptions("acl_reload")
        return "changed"

    def _parse_operators(self, data: bytes) -> OperatorConfig:
        assert self.settings.commands is not None
        path = self.settings.commands.operators_path

        def read_key(key_path: str) -> bytes:
            return read_config_file(Path(key_path), "operator key file")

        return parse_operators(data, source=str(path), read_key=read_key)

    async def _reload_operators(self, data: bytes) -> ReloadOutcome:
        assert self.runtime is not None and self.settings.commands is not None
        state = self.runtime.commands
        assert isinstance(state, CommandState)
        path = str(self.settings.commands.operators_path)
        if hashlib.sha256(data).hexdigest() == state.config.digest:
            return "unchanged"
        try:
            config = self._parse_operators(data)
        except ConfigError as exc:
            self.events.emit("config.reload_failed", "invalid", level="error", file=path, line=exc.line,
                             detail=exc.reason, kept=state.config.digest[:12])
            return "failed"
        state.config = config  # the replay cache is kept: nonces already seen stay seen
        self.events.emit("config.reloaded", "operators", file=path, operators=len(config.operators),
                         digest=config.digest[:12])
        return "changed"

    async def _reload_crl(self, _changed: bytes) -> ReloadOutcome:
        """Re-read every configured CRL file (any one changed); all-or-nothing, then enforce."""
        assert self.runtime is not None
        state = self.runtime.revocation
        assert isinstance(state, RevocationState)
        started = time.monotonic()
        try:
            index = await state.reload(self.clock.now())
        except CredentialError as exc:
            self.events.emit("crl.reload_failed", exc.reason, level="error", detail=str(exc)[:300],
                             kept=sorted(f"{i}#{c.crl_number}" for i, c in state.index.installed.items()))
            return "failed"
        if index.installed == state.index.installed:
            return "unchanged"
        state.index = index
        settle_heap()
        for issuer, installed in index.installed.items():
            self.events.emit("crl.loaded", issuer=issuer, crl_number=installed.crl_number, revoked=installed.count,
                             next_update=installed.next_update.isoformat(),
                             load_ms=round((time.monotonic() - started) * 1000, 1))
        await self.enforce_revocation()
        return "changed"

    def reloaders(self) -> dict[str, Callable[[], Awaitable[ReloadOutcome]]]:
        """One reload per concern, for SIGHUP (``broker_plugins.signals.reload_all``)."""
        out: dict[str, Callable[[], Awaitable[ReloadOutcome]]] = {
            "registry": lambda: self._reload_file(self.settings.registry_path, "device registry",
                                                  self._reload_registry),
        }
        if self.settings.acl_path is not None and self.runtime is not None and self.runtime.acl is not None:
            acl_path = self.settings.acl_path
            out["acl"] = lambda: self._reload_file(acl_path, "ACL file", self._reload_acl)
        if self.settings.commands is not None:
            operators_path = self.settings.commands.operators_path
            out["operators"] = lambda: self._reload_file(operators_path, "operators file", self._reload_operators)
        if self.settings.revocation is not None:
            out["crl"] = self._reload_crl_files
        out["tls"] = self.reload_tls
        return out

    async def _reload_file(self, path: Path, what: str,
                           loader: Callable[[bytes], Awaitable[ReloadOutcome]]) -> ReloadOutcome:
        try:
            data = await asyncio.to_thread(read_config_file, path, what)
        except ConfigError as exc:
            self.events.emit("config.reload_failed", "unreadable", level="error", file=str(path), detail=exc.reason)
            return "failed"
        watcher = self._watched.get(path)
        if watcher is not None:  # the poller need not load the same bytes again
            watcher.digest = hashlib.sha256(data).hexdigest()
        return await loader(data)

    async def _reload_crl_files(self) -> ReloadOutcome:
        return await self._reload_crl(b"")

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

    async def enforce_revocation(self) -> int:
        """Cut live sessions whose certificate is revoked (or, under fail_closed, whose CRL is stale)."""
        assert self.runtime is not None
        state = self.runtime.revocation
        if not isinstance(state, RevocationState) or self.broker is None:
            return 0  # at start-up there are no sessions yet
        now = self.clock.now()
        cut = 0
        for session in self.broker.connected_sessions():
            admitted = admitted_of(session)
            if admitted is None or session.client_id is None:
                continue
            reason = state.verdict(admitted, now)
            if reason is not None:
                await self.broker.cut_session(session.client_id, reason, serial=f"{admitted.cert.serial:x}",
                                              drop_state=reason != "crl_stale")
                cut += 1
        return cut

    async def _freshness_loop(self, interval: float) -> None:
        assert self.runtime is not None
        state = self.runtime.revocation
        assert isinstance(state, RevocationState)
        while True:
            self.check_freshness()
            if state.settings.staleness.mode == "fail_closed":
                await self.enforce_revocation()
            await asyncio.sleep(interval)

    def check_freshness(self) -> None:
        """Raise ``crl.alarm`` when an issuer's CRL freshness changes (and ``crl.recovered``)."""
        assert self.runtime is not None
        state = self.runtime.revocation
        if not isinstance(state, RevocationState):
            return
        for issuer, fresh in state.alarm_changes(self.clock.now()):
            if fresh.alarm:
                self.events.emit("crl.alarm", fresh.state, level="error" if not fresh.admit else "warning",
                                 issuer=issuer, admit=fresh.admit, detail=fresh.message,
                                 policy=state.settings.staleness.mode)
            else:
                self.events.emit("crl.recovered", fresh.state, issuer=issuer, detail=fresh.message)

    async def prune_subscriptions(self, reason: str) -> int:
        """Remove live subscriptions the current policy no longer grants; each removal is logged."""
        assert self.runtime is not None and self.broker is not None
        runtime = self.runtime
        policy = runtime.acl

        def revoked(session: Any, topic_filter: str) -> bool:
            admitted = admitted_of(session)
            if admitted is None or not isinstance(policy, Policy):
                return True
            subject = runtime.subject_of(admitted.identity)
            return subject is None or not policy.check_subscribe(subject, topic_filter).allowed

        return await self.broker.remove_subscriptions(revoked, reason)

    async def enforce_registry(self, registry: Registry) -> None:
        """Cut live sessions that the registry no longer admits (device removed, disabled, pin gone)."""
        assert self.broker is not None
        now = self.clock.now()
        for session in self.broker.connected_sessions():
            admitted = admitted_of(session)
            if admitted is None or session.client_id is None:
                continue
            reason = still_admitted(admitted, registry, now)
            if reason is not None:
                await self.broker.cut_session(session.client_id, reason, source="registry")

    # -- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        assert self.runtime is not None and self.broker is not None
        sessions = self.broker.connected_sessions()
        return {
            "component": "edge-broker",
            "uptime_s": round(time.time() - self.started_at, 1),
            "listener": {"host": self.settings.listener.host, "port": self.port,
                         "active_connections": self.listener.active if self.listener else 0},
            "sessions": {"connected": len(sessions), "known": len(self.broker.sessions)},
            "registry": {"file": str(self.settings.registry_path), "devices": len(self.runtime.registry),
                         "digest": self.runtime.registry.digest[:12]},
            "revocation": self._revocation_status(),
            "acl": {"file": str(self.settings.acl_path) if self.settings.acl_path else None,
                    "digest": self.runtime.acl.digest[:12] if self.runtime.acl else None},
            "events": self.events.snapshot(),
            "recent_refusals": [e for e in self.events.recent() if e["event"].endswith(_REFUSAL_SUFFIXES)][-20:],
        }

    def _revocation_status(self) -> dict[str, Any] | None:
        state = self.runtime.revocation if self.runtime else None
        if not isinstance(state, RevocationState):
            return None
        now = self.clock.now()
        return {
            "policy": state.settings.staleness.mode,
            "issuers": {
                issuer: {
                    "state": (fresh := state.freshness(issuer, now)).state,
                    "admit": fresh.admit,
                    "crl_number": (inst := state.index.installed.get(issuer)) and inst.crl_number,
                    "revoked": inst.count if inst else None,
                    "next_update": inst.next_update.isoformat() if inst else None,
                }
                for issuer in state.issuer_names
            },
        }
