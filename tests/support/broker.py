"""A real hardened broker on loopback, in its own thread and event loop.

Tests drive it with real clients (paho-mqtt, mosquitto_pub/sub, raw TLS sockets) from
the test thread, and read its security events and state through ``call``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from broker_plugins.server import EdgeBroker
from broker_plugins.settings import BrokerSettings, load_settings
from edge_core.clock import Clock
from edge_core.events import SecurityEvents

T = TypeVar("T")


def write_settings(directory: Path, *, registry: Path, chain: Path, server_dir: Path,
                   acl: Path | None = None, limits: dict[str, Any] | None = None,
                   extra: str = "") -> Path:
    lines = [
        "listener:",
        "  bind: 127.0.0.1:0",
        f"  certfile: {server_dir / 'broker.crt'}",
        f"  keyfile: {server_dir / 'broker.key'}",
        f"  client_ca: {chain}",
        f"registry: {registry}",
        "reload_interval: 0.1",
        "status:",
        "  bind: 127.0.0.1:0",
    ]
    if acl is not None:
        lines.append(f"acl: {acl}")
    if limits:
        lines.append("limits:")
        lines.extend(f"  {k}: {v}" for k, v in limits.items())
    if "commands:" not in extra:
        # The test ACLs open command topics; tests without operator keys say so explicitly.
        lines.append("commands: disabled")
    path = directory / "broker.yaml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


class BrokerThread:
    def __init__(self, settings: BrokerSettings | Path, *, clock: Clock | None = None,
                 loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> None:
        self.settings = settings if isinstance(settings, BrokerSettings) else load_settings(settings)
        self.clock = clock
        self.loop = loop_factory() if loop_factory else asyncio.new_event_loop()
        self.edge: EdgeBroker | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="broker", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())
        self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            async with EdgeBroker(self.settings, clock=self.clock) as edge:
                self.edge = edge
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:  # surfaced to the test thread by start()
            self.error = exc
        finally:
            self._ready.set()

    def start(self) -> BrokerThread:
        self._thread.start()
        if not self._ready.wait(20):
            raise TimeoutError("broker did not start")
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)

    def __enter__(self) -> BrokerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self.edge is not None
        return self.edge.port

    @property
    def events(self) -> SecurityEvents:
        assert self.edge is not None
        return self.edge.events

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)  # type: ignore[arg-type]

    def sync(self, fn: Callable[[], T], timeout: float = 10) -> T:
        async def wrapper() -> T:
            return fn()
        return self.call(wrapper, timeout)

    def wait_event(self, event: str, reason: str | None = None, *, timeout: float = 5.0,
                   count: int = 1) -> list[dict[str, Any]]:
        """Wait until ``count`` events (with ``reason``) were emitted; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events.recent(event) if reason is None or e.get("reason") == reason]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                seen = [(e["event"], e.get("reason")) for e in self.events.recent()][-15:]
                raise AssertionError(f"no {event} reason={reason} within {timeout}s; recent: {seen}")
            time.sleep(0.02)
