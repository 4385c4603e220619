"""Persistence of what must survive a restart: persistent sessions, their subscriptions,
their queued and in-flight QoS 1/2 messages, and retained messages.

``SessionStore`` is the interface the engine writes through. Writes are *recorded*
synchronously (the engine never awaits a write per message) and made durable in
groups: ``after_commit(callback)`` runs ``callback`` once everything recorded so far is
on disk. The engine sends a PUBACK (or PUBREC) only from such a callback whenever the
PUBLISH caused a write, so an acknowledged message is a stored message.

- ``MemoryStore``: the in-memory fake (unit tests, and a broker without ``persistence:``,
  which logs ``broker.no_persistence``); a commit is immediate and nothing survives.
- ``SqliteStore``: one SQLite file in WAL mode. A single writer thread commits each group
  of writes in one transaction (group commit: one fsync for all the PUBLISHes that
  arrived while the previous commit ran). fsync policy: ``synchronous: full`` (default)
  fsyncs the WAL at every commit, so an acknowledged message survives power loss;
  ``normal`` fsyncs only at checkpoints, so it survives a crash of the broker process but
  the last commits may be lost on power loss. The file is opened with ``0600``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

__all__ = ["MemoryStore", "SessionStore", "SqliteStore", "StoredMessage", "StoredSession", "StoredState"]

Synchronous = Literal["full", "normal"]
CommitCallback = Callable[[BaseException | None], None]


@dataclass
class StoredMessage:
    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    packet_id: int = 0  # non-zero: in flight when the broker stopped
    received: bool = False  # QoS 2: PUBREC had been received


@dataclass
class StoredSession:
    client_id: str
    subscriptions: dict[str, int] = field(default_factory=dict)
    messages: list[StoredMessage] = field(default_factory=list)


@dataclass
class StoredState:
    sessions: dict[str, StoredSession] = field(default_factory=dict)
    retained: dict[str, tuple[bytes, int, str]] = field(default_factory=dict)  # topic -> payload, qos, owner
    last_seq: int = 0


class SessionStore(Protocol):
    durable: bool

    def load(self) -> StoredState: ...
    def save_session(self, client_id: str, subscriptions: dict[str, int]) -> None: ...
    def delete_session(self, client_id: str) -> None: ...
    def add_message(self, client_id: str, message: StoredMessage) -> None: ...
    def mark_inflight(self, client_id: str, seq: int, packet_id: int, received: bool) -> None: ...
    def remove_message(self, client_id: str, seq: int) -> None: ...
    def set_retained(self, topic: str, payload: bytes, qos: int, owner: str) -> None: ...
    def delete_retained(self, topic: str) -> None: ...
    def pending(self) -> bool: ...
    def after_commit(self, callback: CommitCallback) -> None: ...
    async def close(self) -> None: ...


class MemoryStore:
    """The in-memory fake: same interface, commits at once, forgets everything on exit."""

    durable = False

    def __init__(self) -> None:
        self.state = StoredState()

    def load(self) -> StoredState:
        return self.state

    def save_session(self, client_id: str, subscriptions: dict[str, int]) -> None:
        stored = self.state.sessions.setdefault(client_id, StoredSession(client_id))
        stored.subscriptions = dict(subscriptions)

    def delete_session(self, client_id: str) -> None:
        self.state.sessions.pop(client_id, None)

    def add_message(self, client_id: str, message: StoredMessage) -> None:
        self.state.sessions.setdefault(client_id, StoredSession(client_id)).messages.append(message)
        self.state.last_seq = max(self.state.last_seq, message.seq)

    def mark_inflight(self, client_id: str, seq: int, packet_id: int, received: bool) -> None:
        stored = self.state.sessions.get(client_id)
        for message in stored.messages if stored else ():
            if message.seq == seq:
                message.packet_id, message.received = packet_id, received

    def remove_message(self, client_id: str, seq: int) -> None:
        stored = self.state.sessions.get(client_id)
        if stored is not None:
            stored.messages = [m for m in stored.messages if m.seq != seq]

    def set_retained(self, topic: str, payload: bytes, qos: int, owner: str) -> None:
        self.state.retained[topic] = (payload, qos, owner)

    def delete_retained(self, topic: str) -> None:
        self.state.retained.pop(topic, None)

    def pending(self) -> bool:
        return False

    def after_commit(self, callback: CommitCallback) -> None:
        callback(None)

    async def close(self) -> None:
        return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (client_id TEXT PRIMARY KEY, subscriptions TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    client_id TEXT NOT NULL, seq INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
    qos INTEGER NOT NULL, retain INTEGER NOT NULL, packet_id INTEGER NOT NULL DEFAULT 0,
    received INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (client_id, seq));
CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL,
    owner TEXT NOT NULL);
"""

_Op = tuple[str, tuple[object, ...]]


class SqliteStore:
    """SQLite in WAL mode with group commit in one writer thread."""

    durable = True

    def __init__(self, path: Path, *, synchronous: Synchronous = "full",
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.path = path
        self.synchronous = synchronous
        self._on_error = on_error
        self._ops: list[_Op] = []
        self._callbacks: list[CommitCallback] = []
        self._committing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-broker-store")
        self._lock = threading.Lock()
        self._idle: asyncio.Event | None = None
        #: the error of the last commit, None once a commit succeeds again (readiness reads it)
        self.last_error: BaseException | None = None
        self._closed = False
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.executescript(_SCHEMA)

    # -- start-up ---------------------------------------------------------------------

    def load(self) -> StoredState:
        import json

        state = StoredState()
        with self._lock:
            for client_id, subs in self._db.execute("SELECT client_id, subscriptions FROM sessions"):
                state.sessions[client_id] = StoredSession(client_id, {str(k): int(v) for k, v in
                                                                      json.loads(subs).items()})
            rows = self._db.execute("SELECT client_id, seq, topic, payload, qos, retain, packet_id, received "
                                    "FROM messages ORDER BY client_id, seq")
            for client_id, seq, topic, payload, qos, retain, packet_id, received in rows:
                stored = state.sessions.get(client_id)
                if stored is None:
                    continue  # a message row left by a session deleted in the same crash window
                stored.messages.append(StoredMessage(seq, topic, bytes(payload), qos, bool(retain), packet_id,
                                                     bool(received)))
                state.last_seq = max(state.last_seq, seq)
            for topic, payload, qos, owner in self._db.execute("SELECT topic, payload, qos, owner FROM retained"):
                state.retained[topic] = (bytes(payload), qos, owner)
        return state

    # -- recording writes -----------------------------------------------------------------

    def save_session(self, client_id: str, subscriptions: dict[str, int]) -> None:
        import json

        self._record("INSERT OR REPLACE INTO sessions VALUES (?, ?)",
                     (client_id, json.dumps(subscriptions, sort_keys=True)))

    def delete_session(self, client_id: str) -> None:
        self._record("DELETE FROM sessions WHERE client_id = ?", (client_id,))
        self._record("DELETE FROM messages WHERE client_id = ?", (client_id,))

    def add_message(self, client_id: str, message: StoredMessage) -> None:
        self._record("INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (client_id, message.seq, message.topic, message.payload, message.qos, int(message.retain),
                      message.packet_id, int(message.received)))

    def mark_inflight(self, client_id: str, seq: int, packet_id: int, received: bool) -> None:
        self._record("UPDATE messages SET packet_id = ?, received = ? WHERE client_id = ? AND seq = ?",
                     (packet_id, int(received), client_id, seq))

    def remove_message(self, client_id: str, seq: int) -> None:
        self._record("DELETE FROM messages WHERE client_id = ? AND seq = ?", (client_id, seq))

    def set_retained(self, topic: str, payload: bytes, qos: int, owner: str) -> None:
        self._record("INSERT OR REPLACE INTO retained VALUES (?, ?, ?, ?)", (topic, payload, qos, owner))

    def delete_retained(self, topic: str) -> None:
        self._record("DELETE FROM retained WHERE topic = ?", (topic,))

    def _record(self, sql: str, args: tuple[object, ...]) -> None:
        if self._closed:
            # Nothing may be recorded once the writer is gone: said loudly, never a hang.
            verb = sql.split(maxsplit=1)[0]
            error = RuntimeError(f"the session store is closed; a write was not stored ({verb})")
            self.last_error = error
            if self._on_error is not None:
                self._on_error(error)
            return
        self._ops.append((sql, args))
        if not self._committing:
            self._start_commit()

    # -- group commit ---------------------------------------------------------------------

    def pending(self) -> bool:
        return bool(self._ops) or self._committing

    def after_commit(self, callback: CommitCallback) -> None:
        """Run ``callback`` once every write recorded so far is durable (or failed)."""
        if not self.pending():
            callback(None)
            return
        self._callbacks.append(callback)

    def _start_commit(self) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._committing = True
        # run on the next loop turn so every write of this turn joins the same transaction
        loop.call_soon(self._commit_batch)

    def _commit_batch(self) -> None:
        assert self._loop is not None
        ops, self._ops = self._ops, []
        callbacks, self._callbacks = self._callbacks, []
        future = self._loop.run_in_executor(self._executor, self._write, ops)
        future.add_done_callback(lambda done: self._committed(done, callbacks))

    def _write(self, ops: list[_Op]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in ops:
                    self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _committed(self, done: asyncio.Future[None], callbacks: list[CommitCallback]) -> None:
        error = done.exception()
        self.last_error = error
        if error is not None and self._on_error is not None:
            self._on_error(error)
        # callbacks registered while this batch was committing wait for the next one
        if self._ops:
            self._commit_batch()
        else:
            self._committing = False
            later, self._callbacks = self._callbacks, []
            callbacks.extend(later)
            if self._idle is not None:
                self._idle.set()
        for callback in callbacks:
            callback(error)

    async def close(self) -> None:
        """Commit what was recorded, then stop. Connections aborted just before close record
        their last writes from ``connection_lost`` callbacks on the next loop turn: one turn is
        given to them, and every commit they start is awaited."""
        await asyncio.sleep(0)
        while self._committing:
            self._idle = asyncio.Event()
            await self._idle.wait()
            await asyncio.sleep(0)
        self._closed = True
        self._executor.shutdown(wait=True)
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()
