"""The device registry concern: its file, its state in the runtime, reload and enforcement.

A new registry is swapped in whole; then live sessions it no longer admits (device
removed or disabled, pin gone, certificate expired) are cut (``session.cut`` with the
reason, ``source=registry``) and subscriptions it no longer grants are removed. Between
reloads the clock moves: a sweep cuts every live session whose certificate has expired
(``cert_expired``, ``source=clock``) within ``EXPIRY_SWEEP_S`` of its ``notAfter``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

from broker_plugins.engine.core import Engine
from broker_plugins.runtime import BrokerRuntime, cut_refused_sessions
from broker_plugins.watched import FileWatches, read_config_file
from edge_core.admission import Admitted
from edge_core.errors import ConfigError
from edge_core.registry import Registry, parse_registry

__all__ = ["EXPIRY_SWEEP_S", "RegistryConcern", "load_registry"]

#: How often live sessions are checked against their certificate's ``notAfter`` (a comparison
#: per session; the full verdict only for those past it).
EXPIRY_SWEEP_S = 1.0


def _expired(admitted: Admitted, now: datetime) -> bool:
    return now >= admitted.cert.not_after


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
        self._sweep: asyncio.Task[None] | None = None

    def watch(self, interval: float) -> None:
        self._watches.watch(self.path, self.load, self.runtime.registry.digest, interval=interval)
        self._sweep = asyncio.create_task(self._expiry_sweep(EXPIRY_SWEEP_S), name="certificate-expiry")

    async def reload(self) -> bool:
        """Re-read the registry file now (SIGHUP); True if a new version was loaded."""
        return await self._watches.check_now()

    async def stop(self) -> None:
        await self._watches.stop()
        if self._sweep is not None:
            self._sweep.cancel()
            await asyncio.gather(self._sweep, return_exceptions=True)
            self._sweep = None

    async def _expiry_sweep(self, interval: float) -> None:
        """Cut live sessions whose certificate expired since they connected (no reload needed)."""
        while True:
            await asyncio.sleep(interval)
            if self.engine is not None:
                cut_refused_sessions(self.runtime, self.engine, "clock", only=_expired)

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
        self.enforce()
        await self._on_change("registry_reload")

    def enforce(self) -> None:
        """Cut live sessions that the new registry no longer admits (device removed, disabled, pin gone)."""
        if self.engine is not None:
            cut_refused_sessions(self.runtime, self.engine, "registry")

    def status(self) -> dict[str, object]:
        registry = self.runtime.registry
        return {"file": str(self.path), "devices": len(registry), "digest": registry.digest[:12]}
