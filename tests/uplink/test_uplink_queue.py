"""The store-and-forward queue on real SQLite: order, bounds, overflow policies, age, crash survival."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import aiomqtt
import pytest

from edge_core.events import SecurityEvents
from edge_core.uplink_rules import QueuePolicy, load_uplink_config
from gateway_agent.uplink import UplinkService, backoff_delay, enable_manual_ack
from gateway_agent.uplink_queue import StoreAndForwardQueue

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def _queue(tmp_path: Path, clock: Clock | None = None, **kw: object) -> StoreAndForwardQueue:
    policy = QueuePolicy(path=tmp_path / "q.db", **kw)  # type: ignore[arg-type]
    return StoreAndForwardQueue(policy, clock=clock or Clock())


def _msgs(start: int, stop: int, size: int = 10) -> list[tuple[str, bytes, int]]:
    return [("t", str(n).encode().rjust(size, b"0"), 1) for n in range(start, stop)]


def test_fifo_across_reopen_and_only_acknowledged_messages_leave(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    assert q.put_many(_msgs(0, 10)).stored == 10
    head = q.peek(0, 4)
    assert [int(m.payload) for m in head] == [0, 1, 2, 3]
    assert q.remove([head[1].seq, head[0].seq]) == 2  # acks may come in any order
    q.close()
    q = _queue(tmp_path)
    assert [int(m.payload) for m in q.peek(0, 100)] == list(range(2, 10))
    assert q.stats().depth == 8
    q.put_many(_msgs(10, 12))
    assert [int(m.payload) for m in q.peek(0, 100)] == list(range(2, 12))  # new numbers after old ones
    assert q.remove([12345]) == 0


def test_drop_oldest_keeps_the_newest_and_counts(tmp_path: Path) -> None:
    q = _queue(tmp_path, max_bytes=11 * 10)  # ten messages of 11 bytes (topic + payload)
    q.put_many(_msgs(0, 10))
    report = q.put_many(_msgs(10, 13))
    assert report.dropped_oldest == 3 and report.stored == 3
    assert [int(m.payload) for m in q.peek(0, 100)] == list(range(3, 13))
    assert q.stats().bytes == 110
    assert q.totals.dropped["drop_oldest"] == 3


def test_refuse_new_keeps_the_history(tmp_path: Path) -> None:
    q = _queue(tmp_path, max_bytes=110, overflow="refuse_new")
    q.put_many(_msgs(0, 9))
    report = q.put_many(_msgs(9, 12))
    assert report.stored == 1 and report.refused == 2
    assert [int(m.payload) for m in q.peek(0, 100)] == list(range(10))


def test_a_message_larger_than_the_queue_is_refused_not_looping(tmp_path: Path) -> None:
    q = _queue(tmp_path, max_bytes=50)
    report = q.put_many([("t", b"x" * 100, 1)])
    assert report.stored == 0 and report.refused == 1


def test_old_messages_expire(tmp_path: Path) -> None:
    clock = Clock()
    q = _queue(tmp_path, clock, max_age=timedelta(hours=1))
    q.put_many(_msgs(0, 5))
    clock.t += 1800
    q.put_many(_msgs(5, 7))
    assert q.stats().oldest_age_s == 1800
    clock.t += 1801
    assert q.expire() == 5
    assert [int(m.payload) for m in q.peek(0, 10)] == [5, 6]
    assert q.stats().bytes == 22


def test_the_drain_is_never_handed_an_expired_message(tmp_path: Path) -> None:
    """``peek_fresh`` (before every drain batch) expires first, without a write of its own to trigger it."""
    clock = Clock()
    q = _queue(tmp_path, clock, max_age=timedelta(hours=1))
    q.put_many(_msgs(0, 3))
    clock.t += 1800
    q.put_many(_msgs(3, 5))
    assert q.peek_fresh(0, 10) == (0, q.peek(0, 10))
    clock.t += 1801
    expired, fresh = q.peek_fresh(0, 10)
    assert expired == 3 and [int(m.payload) for m in fresh] == [3, 4]
    assert q.stats().depth == 2 and q.totals.dropped["expired"] == 3
    clock.t += 3600
    assert q.peek_fresh(0, 10) == (2, [])


@pytest.mark.integration
def test_committed_messages_survive_kill_9(tmp_path: Path) -> None:
    """A writer killed with SIGKILL mid-stream: every batch it reported committed is on disk, in order."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from edge_core.uplink_rules import QueuePolicy
        from gateway_agent.uplink_queue import StoreAndForwardQueue
        q = StoreAndForwardQueue(QueuePolicy(path=Path({str(tmp_path / 'q.db')!r})))
        n = 0
        while True:
            q.put_many([("t", str(i).encode(), 1) for i in range(n, n + 50)])
            n += 50
            print(n, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    committed = 0
    while committed < 2000:
        committed = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(5)
    proc.stdout.close()
    q = _queue(tmp_path)
    numbers = [int(m.payload) for m in q.peek(0, 10**6)]
    assert numbers == list(range(len(numbers)))
    assert len(numbers) >= committed
    assert len(numbers) % 50 == 0  # whole batches only: a transaction is all or nothing


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    low = [backoff_delay(n, initial=1, most=60, rng=lambda: 0.0) for n in range(10)]
    high = [backoff_delay(n, initial=1, most=60, rng=lambda: 1.0) for n in range(10)]
    assert low[:4] == [0.5, 1, 2, 4] and high[:4] == [1, 2, 4, 8]
    assert max(high) == 60 and min(low[7:]) == 30


async def test_aiomqtt_still_lets_us_acknowledge_by_hand() -> None:
    """The one aiomqtt internal the uplink uses (its paho client); fails if an upgrade moves it."""
    client = aiomqtt.Client("127.0.0.1", 1)
    paho = enable_manual_ack(client)
    assert paho._manual_ack is True
    assert callable(paho.ack)
    with pytest.raises(AttributeError):
        enable_manual_ack(object())  # type: ignore[arg-type]


class _FlakyCloud:
    """Stands in for the cloud client in ``_drain``: acknowledges every publish but the payloads in ``fail``."""

    def __init__(self, fail: set[bytes]) -> None:
        self.fail = fail
        self.seen: list[bytes] = []

    async def publish(self, topic: str, payload: bytes, **options: object) -> None:
        self.seen.append(payload)
        if payload in self.fail:
            raise aiomqtt.MqttError("publish timed out")


def _offline_service(tmp_path: Path) -> UplinkService:
    """The service with its queue open and no connection (the drain is driven by hand)."""
    path = tmp_path / "uplink.yaml"
    path.write_text(f"""version: 1
site: plant-a
gateway: gw-01
local: {{ca: ca.pem, cert: u.crt, key: u.key, client_id: gateway-uplink}}
cloud: {{host: 127.0.0.1, ca: ca.pem, cert: c.crt, key: c.key, inflight: 8}}
queue: {{path: {tmp_path / 'q.db'}}}
forward:
  - from: devices/+/telemetry/#
    to: sites/{{site}}/gateways/{{gateway}}/devices/{{1}}/telemetry/{{#}}
""")
    service = UplinkService(load_uplink_config(path), events=SecurityEvents("uplink-test"))
    service.queue = StoreAndForwardQueue(service.config.queue)
    return service


async def test_a_failed_publish_does_not_lose_the_acknowledgements_of_its_batch(tmp_path: Path) -> None:
    """Message 1 of a window fails, 0 and 2 are acknowledged: 0 and 2 leave the queue and count as forwarded."""
    service = _offline_service(tmp_path)
    queue = service.queue
    assert queue is not None
    queue.put_many(_msgs(0, 3, size=1))
    cloud = _FlakyCloud(fail={b"1"})
    never = asyncio.get_running_loop().create_future()
    with pytest.raises(aiomqtt.MqttError, match="publish failed"):
        await asyncio.wait_for(service._drain(cloud, never), 5)  # type: ignore[arg-type]
    assert cloud.seen == [b"0", b"1", b"2"]
    assert [m.payload for m in queue.peek(0, 10)] == [b"1"]
    assert service.counters.forwarded == 2

    # the next connection sends only the failed one again, and counts it as resent
    cloud = _FlakyCloud(fail=set())
    lost = asyncio.get_running_loop().create_future()
    drain = asyncio.create_task(service._drain(cloud, lost))  # type: ignore[arg-type]
    for _ in range(100):
        if queue.stats().depth == 0:
            break
        await asyncio.sleep(0.02)
    lost.set_exception(aiomqtt.MqttError("disconnected"))
    with pytest.raises(aiomqtt.MqttError, match="disconnected"):
        await asyncio.wait_for(drain, 5)
    assert cloud.seen == [b"1"]
    assert queue.stats().depth == 0
    assert service.counters.forwarded == 3 and service.counters.resent == 1
    queue.close()


def test_a_resent_leading_run_already_queued_is_not_queued_twice(tmp_path: Path) -> None:
    q = _queue(tmp_path)
    first = _msgs(0, 5)
    assert q.put_many(first, origins=[f"{n + 1}:x{n}" for n in range(5)]).stored == 5
    q.close()
    q = _queue(tmp_path)  # the uplink restarted (kill -9 after the commit, before its PUBACKs)
    # the broker resends 3, 4, 5 first (same packet ids), then new messages; a known origin
    # after the first unknown one is new traffic that happens to look alike, and is kept
    resent = [first[2], first[3], first[4], ("t", b"new-1", 1), first[0]]
    report = q.put_many(resent, origins=["3:x2", "4:x3", "5:x4", "6:n1", "1:x0"], skip_known_prefix=True)
    assert (report.duplicates, report.stored) == (3, 2)
    assert [m.payload for m in q.peek(0, 10)] == [m[1] for m in first] + [b"new-1", first[0][1]]
    # without skip_known_prefix (the session was not just resumed) nothing is skipped
    assert q.put_many(first[:1], origins=["1:x0"]).duplicates == 0
    q.close()


def test_a_queue_file_from_before_origins_opens_and_keeps_its_messages(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "q.db")
    db.executescript("CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
                     "payload BLOB NOT NULL, qos INTEGER NOT NULL, enqueued_at REAL NOT NULL, size INTEGER NOT NULL);"
                     "INSERT INTO messages (topic, payload, qos, enqueued_at, size) "
                     "VALUES ('t', x'6f6c64', 1, 1e6, 4);")
    db.close()
    q = _queue(tmp_path)
    assert [m.payload for m in q.peek(0, 10)] == [b"old"]
    assert q.put_many(_msgs(0, 1), origins=["1:a"], skip_known_prefix=True).stored == 1
    q.close()


class _Resumed:
    """The local session as ``_take`` reads it: messages with packet ids; PUBACKs recorded."""

    class _Message:
        def __init__(self, mid: int, topic: str, payload: bytes) -> None:
            self.mid, self.topic, self.payload, self.qos = mid, topic, payload, 1

    def __init__(self, messages: list[tuple[int, bytes]]) -> None:
        self.pending = [self._Message(mid, "devices/pump-1/telemetry/t", p) for mid, p in messages]
        self.acked: list[int] = []
        self.messages = self

    def __len__(self) -> int:
        return len(self.pending)

    def __aiter__(self) -> _Resumed:
        return self

    async def __anext__(self) -> object:
        if not self.pending:
            await asyncio.Event().wait()  # the session stays open, idle
        return self.pending.pop(0)

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append(mid)


async def test_the_uplink_queues_a_crash_redelivery_once_and_acknowledges_it(tmp_path: Path) -> None:
    service = _offline_service(tmp_path)
    queue = service.queue
    assert queue is not None

    async def take(session: _Resumed, resumed: bool) -> None:
        service._redelivery = resumed
        task = asyncio.create_task(service._take(session, session))  # type: ignore[arg-type]
        for _ in range(200):
            if not session.pending and len(session.acked) == session_total[id(session)]:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    first = _Resumed([(1, b"a"), (2, b"b"), (3, b"c")])
    session_total = {id(first): 3}
    await take(first, resumed=True)  # a fresh session: nothing known, all queued
    # killed after the commit, before the PUBACKs left: the broker resends 2 and 3, then new ones
    again = _Resumed([(2, b"b"), (3, b"c"), (4, b"d"), (5, b"e")])
    session_total[id(again)] = 4
    await take(again, resumed=True)
    assert [m.payload for m in queue.peek(0, 10)] == [b"a", b"b", b"c", b"d", b"e"]
    assert again.acked == [2, 3, 4, 5]  # every message is acknowledged, the resent ones too
    assert service.counters.local_redelivered == 2 and service.counters.received == 7
    assert service.events.count("uplink.redelivered", "already_queued") == 1
    queue.close()
