"""Watched configuration files: what the registry, ACL, operators and CRL concerns share.

A concern hands each new version of its file(s) to its loader (all-or-nothing: a loader
that refuses keeps the last good state and logs ``config.reload_failed``). ``reload()``
re-reads every file now, for a SIGHUP handler; polling does the same every
``reload_interval``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from edge_core.errors import ConfigError
from edge_core.events import SecurityEvents
from edge_runtime.file_watch import WatchedFile

__all__ = ["FileWatches", "read_config_file"]


def read_config_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror}", source=str(path)) from exc


class FileWatches:
    """The file watchers of one concern."""

    def __init__(self, events: SecurityEvents) -> None:
        self._events = events
        self._watchers: list[WatchedFile] = []

    def watch(self, path: Path, loader: Callable[[bytes], Awaitable[None]], digest: str, *, interval: float) -> None:
        def unreadable(exc: OSError) -> None:
            self._events.emit("config.reload_failed", "unreadable", level="error", file=str(path),
                              detail=exc.strerror)

        watcher = WatchedFile(path, loader, interval=interval, on_error=unreadable, initial_digest=digest)
        watcher.start()
        self._watchers.append(watcher)

    async def check_now(self) -> bool:
        """Re-read every watched file now; True if any new version was loaded."""
        changed = False
        for watcher in self._watchers:
            changed = await watcher.check_now() or changed
        return changed

    async def stop(self) -> None:
        for watcher in self._watchers:
            await watcher.stop()
        self._watchers.clear()
