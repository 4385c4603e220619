"""Poll a file for changes and hand each new version to a loader, all-or-nothing.

Polling (stat every ``interval`` seconds) works on every filesystem, survives editors
that replace files by rename, and needs no extra dependency. A version is loaded once:
the SHA-256 of the bytes decides whether anything changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

__all__ = ["WatchedFile"]


class WatchedFile:
    """Calls ``on_change(data)`` for each new content of ``path``; ``on_error`` for unreadable files."""

    def __init__(
        self,
        path: Path,
        on_change: Callable[[bytes], Awaitable[object]],
        *,
        interval: float = 0.5,
        on_error: Callable[[OSError], None] | None = None,
        initial_digest: str | None = None,
    ) -> None:
        self.path = Path(path)
        self._on_change = on_change
        self._on_error = on_error
        self.interval = interval
        self._stat: tuple[int, int, int] | None = None
        self.digest = initial_digest
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("watcher already started")
        self._task = asyncio.create_task(self._run(), name=f"watch:{self.path.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def check_now(self) -> bool:
        """Check once; returns True when a new version was handed to ``on_change``."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self._on_error is not None and self._stat is not None:
                self._on_error(exc)
            self._stat = None
            return False
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key == self._stat:
            return False
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            if self._on_error is not None:
                self._on_error(exc)
            return False
        self._stat = key
        digest = hashlib.sha256(data).hexdigest()
        if digest == self.digest:
            return False
        self.digest = digest
        await self._on_change(data)
        return True

    async def _run(self) -> None:
        while True:
            await self.check_now()
            await asyncio.sleep(self.interval)
