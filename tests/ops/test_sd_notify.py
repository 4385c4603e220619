"""The systemd notify protocol over a real unix datagram socket."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime.sd_notify import Notifier, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def messages(sock: socket.socket, n: int) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        data = sock.recv(4096).decode()
        out.append(dict(line.split("=", 1) for line in data.splitlines()))
    return out


def test_ready_reloading_stopping(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("serving on 127.0.0.1:8883")
    assert notifier.reloading()
    assert notifier.stopping()
    ready, reloading, stopping = messages(sock, 3)
    assert ready == {"READY": "1", "STATUS": "serving on 127.0.0.1:8883"}
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    assert stopping["STOPPING"] == "1"


def test_abstract_socket_address() -> None:
    name = f"edge-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready("up")
        assert messages(sock, 1)[0]["READY"] == "1"
    finally:
        sock.close()


def test_outside_systemd_everything_is_a_no_op(tmp_path: Path) -> None:
    notifier = Notifier({})
    assert not notifier.enabled and not notifier.ready("x") and notifier.watchdog is None
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert not gone.ready("x")  # systemd went away: no exception


def test_watchdog_interval_is_half_the_timeout_and_only_for_us() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({}) is None


async def test_watchdog_pings_from_the_event_loop(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})  # ping every 50 ms
    healthy = True
    notifier.start_watchdog(lambda: healthy)
    pings = await asyncio.to_thread(messages, sock, 3)
    assert pings == [{"WATCHDOG": "1"}] * 3
    healthy = False  # an unhealthy component stops feeding the watchdog, so systemd restarts it
    await asyncio.sleep(0.12)
    sock.setblocking(False)
    while True:  # drain what was sent before the flip
        try:
            sock.recv(4096)
        except BlockingIOError:
            break
    await asyncio.sleep(0.15)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)
    await notifier.stop_watchdog()


@pytest.mark.integration
def test_agent_process_speaks_notify_and_feeds_the_watchdog(tmp_path: Path,
                                                           notify_socket: tuple[socket.socket, str]) -> None:
    """``gateway-agent run`` as systemd runs it (Type=notify, WatchdogSec=1): READY, WATCHDOG,
    RELOADING/READY on SIGHUP, STOPPING on SIGTERM, exit 0, and every stderr line JSON."""
    import json
    import signal
    import subprocess
    import sys

    sock, path = notify_socket
    sock.settimeout(15)
    config = tmp_path / "agent.yaml"
    config.write_text("agent_id: gateway-agent\nstatus:\n  bind: 127.0.0.1:0\n")
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "gateway-agent"), "run", "-c", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen: list[dict[str, str]] = []

        def until(key: str) -> dict[str, str]:
            while True:
                (message,) = messages(sock, 1)
                seen.append(message)
                if key in message:
                    return message

        assert until("READY")["STATUS"].startswith("running")
        until("WATCHDOG")
        until("WATCHDOG")  # keeps pinging, every 0.5 s
        proc.send_signal(signal.SIGHUP)
        until("RELOADING")
        until("READY")
        proc.send_signal(signal.SIGTERM)
        until("STOPPING")
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0
    events = [json.loads(line)["event"] for line in stderr.splitlines()]
    assert "agent.sighup" in events and "agent.stopping" in events and events[-1] == "agent.stopped"
