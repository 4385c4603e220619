"""Session queues and the persistence stores (the in-memory fake and SQLite in WAL mode)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from broker_plugins.engine.session import Message, Outgoing, Session
from broker_plugins.engine.store import MemoryStore, SessionStore, SqliteStore, StoredMessage


def item(qos: int, payload: bytes = b"x") -> Outgoing:
    return Outgoing(Message("t", payload, qos), qos)


def test_full_queue_drops_qos0_first() -> None:
    session = Session("s", clean=True)
    for _ in range(3):
        assert session.enqueue(item(0), 3, 1 << 20) is None
    dropped = session.enqueue(item(1), 3, 1 << 20)
    assert dropped is not None and dropped.qos == 0
    assert [i.qos for i in session.queue] == [0, 0, 1]
    newest = item(0)
    assert session.enqueue(newest, 3, 1 << 20) is newest  # a QoS 0 never evicts anything


def test_full_queue_of_qos1_refuses_the_new_message() -> None:
    session = Session("s", clean=False)
    for _ in range(2):
        session.enqueue(item(1), 2, 1 << 20)
    extra = item(2)
    assert session.enqueue(extra, 2, 1 << 20) is extra
    assert len(session.queue) == 2


def test_queue_is_bounded_in_bytes() -> None:
    session = Session("s", clean=True)
    big = item(1, b"x" * 1000)
    assert session.enqueue(big, 100, 1500) is None
    second = item(1, b"y" * 1000)
    assert session.enqueue(second, 100, 1500) is second
    assert session.queue_bytes == big.message.size


def test_packet_ids_skip_those_in_flight() -> None:
    session = Session("s", clean=True)
    session.inflight[1] = item(1)
    assert session.next_packet_id() == 2


async def exercise(store: SessionStore) -> None:
    store.save_session("pump-17", {"devices/pump-17/cmd/#": 1})
    store.add_message("pump-17", StoredMessage(1, "devices/pump-17/cmd/a", b"one", 1, False))
    store.add_message("pump-17", StoredMessage(2, "devices/pump-17/cmd/b", b"two", 2, False))
    store.mark_inflight("pump-17", 2, 17, True)
    store.add_message("pump-17", StoredMessage(3, "devices/pump-17/cmd/c", b"three", 1, False))
    store.remove_message("pump-17", 3)
    store.set_retained("devices/pump-17/status", b"up", 1, "pump-17")
    store.set_retained("devices/pump-17/gone", b"x", 0, "pump-17")
    store.delete_retained("devices/pump-17/gone")
    store.save_session("sensor-02", {})
    store.delete_session("sensor-02")
    done = asyncio.get_running_loop().create_future()
    store.after_commit(done.set_result)
    assert await asyncio.wait_for(done, 5) is None


def check_loaded(store: SessionStore) -> None:
    state = store.load()
    assert set(state.sessions) == {"pump-17"}
    stored = state.sessions["pump-17"]
    assert stored.subscriptions == {"devices/pump-17/cmd/#": 1}
    assert [(m.seq, m.payload, m.qos, m.packet_id, m.received) for m in stored.messages] == [
        (1, b"one", 1, 0, False), (2, b"two", 2, 17, True)]
    assert state.retained == {"devices/pump-17/status": (b"up", 1, "pump-17")}
    assert state.last_seq >= 2  # sequence numbers of stored rows are never reused


async def test_memory_store() -> None:
    store = MemoryStore()
    await exercise(store)
    check_loaded(store)


@pytest.mark.parametrize("synchronous", ["full", "normal"])
async def test_sqlite_store_survives_reopening(tmp_path: Path, synchronous: str) -> None:
    path = tmp_path / "broker.db"
    store = SqliteStore(path, synchronous=synchronous)  # type: ignore[arg-type]
    await exercise(store)
    await store.close()
    assert path.stat().st_mode & 0o777 == 0o600
    reopened = SqliteStore(path)
    check_loaded(reopened)
    assert reopened._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    await reopened.close()


async def test_sqlite_commit_is_durable_before_the_callback(tmp_path: Path) -> None:
    """What an acknowledgement promises: when after_commit fires, another reader sees the row."""
    path = tmp_path / "broker.db"
    store = SqliteStore(path)
    seen: list[int] = []

    def committed(error: BaseException | None) -> None:
        assert error is None
        with sqlite3.connect(path) as other:
            seen.append(other.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    for seq in range(1, 201):
        store.add_message("pump-17", StoredMessage(seq, "t", b"p", 1, False))
    store.after_commit(committed)
    assert store.pending()
    for _ in range(500):
        if seen:
            break
        await asyncio.sleep(0.01)
    assert seen == [200]
    await store.close()


async def test_sqlite_groups_writes_into_few_commits(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "broker.db")
    commits = 0
    original = store._write

    def counting(ops: list[tuple[str, tuple[object, ...]]]) -> None:
        nonlocal commits
        commits += 1
        original(ops)

    store._write = counting  # type: ignore[method-assign]
    for seq in range(1, 1001):
        store.add_message("pump-17", StoredMessage(seq, "t", b"p", 1, False))
        if seq % 100 == 0:
            await asyncio.sleep(0)
    done = asyncio.get_running_loop().create_future()
    store.after_commit(done.set_result)
    await done
    assert commits < 100
    await store.close()


async def test_sqlite_write_failure_reaches_the_callback(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    store = SqliteStore(tmp_path / "broker.db", on_error=errors.append)
    store._record("INSERT INTO no_such_table VALUES (1)", ())
    done = asyncio.get_running_loop().create_future()
    store.after_commit(done.set_result)
    assert isinstance(await done, sqlite3.Error)
    assert errors
    await store.close()


async def test_sqlite_close_commits_the_last_writes_of_aborted_connections(tmp_path: Path) -> None:
    """Shutdown aborts every connection, whose connection_lost runs a loop turn later and may
    still record; close commits that, and a write after close is an error, never a hang."""
    errors: list[BaseException] = []
    store = SqliteStore(tmp_path / "broker.db", on_error=errors.append)
    loop = asyncio.get_running_loop()
    loop.call_soon(store.save_session, "late", {"a/b": 1})  # a connection_lost callback, queued
    await asyncio.wait_for(store.close(), 5)
    store.save_session("after", {})  # the writer is gone
    assert [str(e) for e in errors] == ["the session store is closed; a write was not stored (INSERT)"]
    again = SqliteStore(tmp_path / "broker.db")
    assert set(again.load().sessions) == {"late"}
    await again.close()
