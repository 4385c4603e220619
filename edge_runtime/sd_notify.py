"""systemd's notify protocol (``Type=notify``, ``WatchdogSec=``), over the ``NOTIFY_SOCKET`` datagram socket.

``READY=1`` once the component serves, ``RELOADING=1`` ... ``READY=1`` around a reload,
``STOPPING=1`` when it drains, ``STATUS=`` a one-line summary, and ``WATCHDOG=1`` every
half ``WATCHDOG_USEC`` from a task on the event loop: if the loop stalls or dies, the pings
stop and systemd restarts the unit. Outside systemd (no ``NOTIFY_SOCKET``) every call is a
no-op, so the daemons run the same under Docker, a shell or the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = ["Notifier", "watchdog_interval"]


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between pings (half the watchdog timeout), or None when no watchdog is armed for us."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # armed for another process (e.g. our parent shell)
    return int(usec) / 1_000_000 / 2


class Notifier:
    """Sends notify messages; silent when not started by systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if raw.startswith("@"):
            self.address = b"\0" + raw[1:].encode()  # abstract namespace
        elif raw.startswith("/"):
            self.address = raw
        self.watchdog = watchdog_interval(env)
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """``send(READY=1, STATUS="serving")``; True if a datagram went out."""
        if self.address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.connect(self.address)
                sock.sendall(message)
            except OSError:
                return False  # systemd went away: nothing to tell, nothing to fail
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def reloading(self) -> bool:
        return self.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)

    def stopping(self, status: str = "draining") -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def start_watchdog(self, healthy: Callable[[], bool] | None = None) -> None:
        """Ping ``WATCHDOG=1`` while the loop runs (and ``healthy()``, if given, holds)."""
        if self.watchdog is None or self.address is None or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._pings(self.watchdog, healthy), name="sd-watchdog")

    async def _pings(self, interval: float, healthy: Callable[[], bool] | None) -> None:
        while True:
            if healthy is None or healthy():
                self.send(WATCHDOG=1)
            await asyncio.sleep(interval)

    async def stop_watchdog(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
