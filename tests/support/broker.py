"""A real hardened broker on loopback, in its own thread and event loop.

Tests drive it with real clients (paho-mqtt, mosquitto_pub/sub, raw TLS sockets) from
the test thread, and read its security events and state through ``call``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from broker_plugins.server import EdgeBroker
from broker_plugins.settings import BrokerSettings, load_settings
from edge_core.clock import Clock
from edge_core.events import SecurityEvents

T = TypeVar("T")


def write_settings(directory: Path, *, registry: Path, chain: Path, server_dir: Path,
                   acl: Path | None = None, limits: dict[str, Any] | None = None,
                   extra: str = "", bind: str = "127.0.0.1:0") -> Path:
    lines = [
        "listener:",
        f"  bind: {bind}",
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

    def lag_probe(self, interval: float = 0.005) -> LagProbe:
        """Start a task inside the broker's loop that measures how late its timer wakes up."""
        probe = LagProbe(interval)

        async def start() -> None:
            probe.task = asyncio.ensure_future(probe.run())

        self.call(start)
        return probe

    def stop_probe(self, probe: LagProbe) -> None:
        async def stop() -> None:
            if probe.task is not None:
                probe.task.cancel()

        self.call(stop)

    def wait_count(self, event: str, reason: str | None, count: int, *, timeout: float = 5.0) -> None:
        """Wait until the counter of (event, reason) reaches ``count`` (counters are unbounded, unlike recent)."""
        deadline = time.monotonic() + timeout
        while self.events.count(event, reason) < count:
            if time.monotonic() > deadline:
                seen = [(e["event"], e.get("reason")) for e in self.events.recent()][-15:]
                raise AssertionError(f"{event} reason={reason} counted {self.events.count(event, reason)}, "
                                     f"not {count}, within {timeout}s; recent: {seen}")
            time.sleep(0.02)

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


@dataclass
class LagProbe:
    """Event-loop lag as seen by a task sleeping ``interval`` over and over: the worst stall."""

    interval: float
    max_stall: float = 0.0
    samples: int = 0
    task: asyncio.Future[None] | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval)
            self.max_stall = max(self.max_stall, loop.time() - before - self.interval)
            self.samples += 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BrokerProcess:
    """``edge-broker run -c SETTINGS`` as a child process, for crash tests (SIGKILL mid-stream).

    The settings must bind a fixed port (see ``free_port``); ``start`` waits until it accepts.
    """

    def __init__(self, settings: Path, port: int, *, log: Path) -> None:
        self.settings = settings
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> BrokerProcess:
        with self.log.open("ab") as out:
            script = Path(sys.executable).with_name("edge-broker")  # the installed console script
            cmd = [str(script)] if script.exists() else [sys.executable, "-m", "broker_plugins.cli"]
            self.proc = subprocess.Popen(
                [*cmd, "run", "-c", str(self.settings)],
                stdout=out, stderr=out, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edge-broker exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"edge-broker did not listen on {self.port}: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def events(self, event: str, reason: str | None = None) -> list[dict[str, Any]]:
        """Security events from the broker's JSON log lines (the CLI logs one JSON object a line)."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == event and (reason is None or record.get("reason") == reason):
                    found.append(record)
        return found

    def wait_event(self, event: str, reason: str | None = None, *, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not (found := self.events(event, reason)):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {event} reason={reason} in {self.log} within {timeout}s")
            time.sleep(0.05)
        return found[0]

    def rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS for the broker process")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or power cut of the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
