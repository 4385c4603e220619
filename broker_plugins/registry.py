"""The device registry concern: its file, its state in the runtime, reload and enforcement.

A new registry is swapped in whole; then live sessions it no longer admits (device
removed or disabled, pin gone, certificate expired) are cut (``session.cut`` with the
reason, ``source=registry``) and subscriptions it no longer grants are removed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from broker_plugins.engine.core import Engine
from broker_plugins.runtime import BrokerRuntime, admitted_of
from broker_plugins.watched import FileWatches, read_config_file
from edge_core.admission import still_admitted
from edge_core.errors import ConfigError
from edge_core.registry import Registry, parse_registry

__all__ = ["RegistryConcern", "load_registry"]


def load_registry(path: Path) -> Registry:
    return parse_registry(read_config_file(path, "device registry"), source=str(path))


class RegistryConcern:
    def __init__(self, path: Path, runtime: BrokerRuntime, *, on_change: Callable[[str], Awaitable[int]],
                 settle: Callable[[], None]) -> None:
        self.path = path
        self.runtime = runtime
        self.engine: Engine | None = None
        self._on_change = on_change  # prune subscriptions the new state no longer grants
        self._settle = settle
        self._watches = FileWatches(runtime.events)

    def watch(self, interval: float) -> None:
        self._watches.watch(self.path, self.load, self.runtime.registry.digest, interval=interval)

    async def reload(self) -> bool:
        """Re-read the registry file now (SIGHUP); True if a new version was loaded."""
        return await self._watches.check_now()

    async def stop(self) -> None:
        await self._watches.stop()

    async def load(self, data: bytes) -> None:
        runtime = self.runtime
        path = str(self.path)
        try:
            registry = parse_registry(data, source=path)
        except ConfigError as exc:
            runtime.events.emit("config.reload_failed", "invalid", level="error", file=path, line=exc.line,
                                detail=exc.reason, kept=runtime.registry.digest[:12])
            return
        runtime.registry = registry
        self._settle()
        runtime.events.emit("config.reloaded", "registry", file=path, devices=len(registry),
                            digest=registry.digest[:12])
        self.enforce(registry)
        await self._on_change("registry_reload")

    def enforce(self, registry: Registry) -> None:
        """Cut live sessions that the registry no longer admits (device removed, disabled, pin gone)."""
        engine = self.engine
        if engine is None:
            return
        now = self.runtime.clock.now()
        for session in engine.connected_sessions():
            admitted = admitted_of(session)
            if admitted is None:
                continue
            reason = still_admitted(admitted, registry, now)
            if reason is not None:
                engine.cut_session(session.client_id, reason, source="registry")

    def status(self) -> dict[str, object]:
        registry = self.runtime.registry
        return {"file": str(self.path), "devices": len(registry), "digest": registry.digest[:12]}
