"""The uplink's store-and-forward queue: SQLite in WAL mode, bounded in bytes and age.

Every message the uplink takes from the local broker is written here (and only then
acknowledged to the broker); it leaves only when the cloud broker's PUBACK for it arrived.
Messages carry a sequence number from ``AUTOINCREMENT``, so order is the order of arrival,
also across restarts, and a number is never reused.

Bounds and overflow (see docs/uplink.md):

- ``max_age``: a message older than this is dropped (``expired``), at every write and before
  every batch the drain takes (``peek_fresh``);
- ``max_bytes`` (topic + payload bytes of the queued messages): when a new batch does not fit,
  ``drop_oldest`` (default) drops the oldest messages until it does, so the freshest plant data
  survives a long outage; ``refuse_new`` keeps the history and drops the new messages instead.

Durability: ``fsync`` (``synchronous=FULL``) survives power loss; ``process``
(``synchronous=NORMAL``) survives a crash of the process but may lose the last commits on
power loss. Writes are batched by the caller (one transaction per batch), so ``fsync``
costs one flush per batch, not per message.

Redelivery: each message keeps its ``origin``, the local broker's packet id and a digest of
its local topic and payload. A broker resends the messages it had not seen acknowledged, with
their packet ids, first thing when the uplink's persistent session resumes; if the uplink died
after committing them and before its PUBACKs left, ``put_many(..., skip_known_prefix=True)``
recognises that leading run by origin and does not queue it twice (``PutReport.duplicates``).

One object is used from worker threads (``asyncio.to_thread``): every call holds a lock.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edge_core.uplink_rules import QueuePolicy

__all__ = ["PutReport", "QueueStats", "Queued", "StoreAndForwardQueue"]

#: a row as inserted: topic, payload, qos, enqueued_at, size, origin
_Row = tuple[str, bytes, int, float, int, str | None]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    enqueued_at REAL NOT NULL,
    size INTEGER NOT NULL,
    origin TEXT
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Queued:
    seq: int
    topic: str
    payload: bytes
    qos: int
    enqueued_at: float


@dataclass(frozen=True)
class PutReport:
    stored: int
    #: messages dropped to make room (drop_oldest), refused (refuse_new), or too large for the queue at all
    dropped_oldest: int = 0
    refused: int = 0
    expired: int = 0
    #: leading messages of the batch already queued (a local redelivery after a crash): not stored again
    duplicates: int = 0


@dataclass(frozen=True)
class QueueStats:
    depth: int
    bytes: int
    oldest_age_s: float
    file_bytes: int


@dataclass
class _Totals:
    dropped: dict[str, int] = field(default_factory=lambda: {"drop_oldest": 0, "refuse_new": 0, "expired": 0})


class StoreAndForwardQueue:
    def __init__(self, policy: QueuePolicy, *, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.clock = clock
        self.totals = _Totals()
        self._lock = threading.Lock()
        policy.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(policy.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._synchronous = "FULL" if policy.durability == "fsync" else "NORMAL"
        self._db.execute(f"PRAGMA synchronous={self._synchronous}")
        self._db.executescript(_SCHEMA)
        columns = {str(r[1]) for r in self._db.execute("PRAGMA table_info(messages)")}
        if "origin" not in columns:  # a queue file written before origins were kept
            self._db.execute("ALTER TABLE messages ADD COLUMN origin TEXT")
        self._db.execute("CREATE INDEX IF NOT EXISTS messages_origin ON messages(origin)")
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
        self._depth, self._bytes = int(row[0]), int(row[1])

    # -- writing -----------------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[str, bytes, int]], *, origins: Sequence[str | None] | None = None,
                 skip_known_prefix: bool = False) -> PutReport:
        """Store a batch in one transaction (in order). Returns what happened to make room.

        ``origins`` (one per item, None for a QoS 0 message) are kept with the rows. With
        ``skip_known_prefix``, the leading items whose origin is already queued are redeliveries
        and are skipped; the first unknown one ends the run (``PutReport.duplicates`` < len).
        """
        if not items:
            return PutReport(stored=0)
        now = self.clock()
        tags = list(origins) if origins is not None else [None] * len(items)
        if len(tags) != len(items):
            raise ValueError("one origin per item")
        rows = [(topic, payload, qos, now, len(topic.encode("utf-8")) + len(payload), tag)
                for (topic, payload, qos), tag in zip(items, tags, strict=True)]
        limit = self.policy.max_bytes
        refused = 0
        duplicates = 0
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                if skip_known_prefix:
                    while duplicates < len(rows) and rows[duplicates][5] is not None and cur.execute(
                            "SELECT 1 FROM messages WHERE origin = ? LIMIT 1", (rows[duplicates][5],)).fetchone():
                        duplicates += 1
                    rows = rows[duplicates:]
                expired = self._expire_locked(cur, now)
                too_big = [r for r in rows if r[4] > limit]
                rows = [r for r in rows if r[4] <= limit]
                refused += len(too_big)
                incoming = sum(r[4] for r in rows)
                dropped = 0
                if self._bytes + incoming > limit:
                    if self.policy.overflow == "drop_oldest":
                        dropped, rows = self._make_room_locked(cur, rows, limit)
                    else:
                        kept: list[_Row] = []
                        room = limit - self._bytes
                        for r in rows:
                            if r[4] <= room:
                                kept.append(r)
                                room -= r[4]
                            else:
                                refused += 1
                        rows = kept
                cur.executemany("INSERT INTO messages (topic, payload, qos, enqueued_at, size, origin) "
                                "VALUES (?, ?, ?, ?, ?, ?)", rows)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            self._depth += len(rows)
            self._bytes += sum(r[4] for r in rows)
            self.totals.dropped["drop_oldest"] += dropped
            self.totals.dropped["refuse_new"] += refused
            self.totals.dropped["expired"] += expired
        return PutReport(stored=len(rows), dropped_oldest=dropped, refused=refused, expired=expired,
                         duplicates=duplicates)

    def _make_room_locked(self, cur: sqlite3.Cursor, rows: list[_Row],
                          limit: int) -> tuple[int, list[_Row]]:
        """Drop the oldest queued messages (then the oldest of the batch) until the batch fits."""
        need = self._bytes + sum(r[4] for r in rows) - limit
        dropped = 0
        freed = 0
        cursor_seq = 0
        while freed < need:
            chunk = cur.execute("SELECT seq, size FROM messages WHERE seq > ? ORDER BY seq LIMIT 512",
                                (cursor_seq,)).fetchall()
            if not chunk:
                break
            last = 0
            for seq, size in chunk:
                last = seq
                freed += size
                dropped += 1
                if freed >= need:
                    break
            cur.execute("DELETE FROM messages WHERE seq <= ?", (last,))
            cursor_seq = last
        self._depth -= dropped
        self._bytes -= freed
        while freed < need and rows:  # the batch alone is larger than the queue: keep its newest part
            freed += rows[0][4]
            rows = rows[1:]
            dropped += 1
        return dropped, rows

    def _expire_locked(self, cur: sqlite3.Cursor, now: float) -> int:
        cutoff = now - self.policy.max_age.total_seconds()
        # the oldest message is the first by number: one index lookup on every write, a scan only when due
        head = cur.execute("SELECT enqueued_at FROM messages ORDER BY seq LIMIT 1").fetchone()
        if head is None or float(head[0]) >= cutoff:
            return 0
        row = cur.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE enqueued_at < ?",
                          (cutoff,)).fetchone()
        if row[0]:
            cur.execute("DELETE FROM messages WHERE enqueued_at < ?", (cutoff,))
            self._depth -= int(row[0])
            self._bytes -= int(row[1])
        return int(row[0])

    def expire(self) -> int:
        """Drop messages older than ``max_age``; returns how many."""
        with self._lock:
            return self._expire_due_locked()

    def _expire_due_locked(self) -> int:
        """Expire if the oldest message is due: one index lookup, a write transaction only when needed."""
        now = self.clock()
        head = self._db.execute("SELECT enqueued_at FROM messages ORDER BY seq LIMIT 1").fetchone()
        if head is None or float(head[0]) >= now - self.policy.max_age.total_seconds():
            return 0
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            n = self._expire_locked(cur, now)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        self.totals.dropped["expired"] += n
        return n

    # -- reading and removing ---------------------------------------------------------------

    def peek(self, after: int, limit: int) -> list[Queued]:
        """The next ``limit`` messages with a sequence number above ``after``, oldest first."""
        with self._lock:
            return self._peek_locked(after, limit)

    def _peek_locked(self, after: int, limit: int) -> list[Queued]:
        rows = self._db.execute("SELECT seq, topic, payload, qos, enqueued_at FROM messages WHERE seq > ? "
                                "ORDER BY seq LIMIT ?", (after, limit)).fetchall()
        return [Queued(int(r[0]), str(r[1]), bytes(r[2]), int(r[3]), float(r[4])) for r in rows]

    def peek_fresh(self, after: int, limit: int) -> tuple[int, list[Queued]]:
        """Drop what is older than ``max_age``, then ``peek``: nothing expired is ever handed out.

        Returns how many expired, and the messages. The check is one index lookup of the oldest
        message, so the drain calls it before every batch.
        """
        with self._lock:
            return self._expire_due_locked(), self._peek_locked(after, limit)

    def remove(self, seqs: Iterable[int]) -> int:
        """Delete delivered messages (the cloud acknowledged them). Unknown numbers are ignored."""
        keys = [(s,) for s in seqs]
        if not keys:
            return 0
        with self._lock:
            cur = self._db.cursor()
            # a lost deletion only means a duplicate, never a loss: no fsync of its own (the next
            # write's commit, or a checkpoint, makes it durable)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.total_changes
                size = 0
                for (seq,) in keys:
                    row = cur.execute("SELECT size FROM messages WHERE seq = ?", (seq,)).fetchone()
                    if row is not None:
                        size += int(row[0])
                        cur.execute("DELETE FROM messages WHERE seq = ?", (seq,))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            finally:
                cur.execute(f"PRAGMA synchronous={self._synchronous}")
            removed = self._db.total_changes - before
            self._depth -= removed
            self._bytes -= size
            return removed

    def get_meta(self, key: str) -> str | None:
        """A small value the uplink keeps beside its queue (e.g. the filters its session holds)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                             "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def stats(self) -> QueueStats:
        with self._lock:
            row = self._db.execute("SELECT enqueued_at FROM messages ORDER BY seq LIMIT 1").fetchone()
            depth, size = self._depth, self._bytes
        oldest = 0.0 if row is None or row[0] is None else max(0.0, self.clock() - float(row[0]))
        files = [self.policy.path, Path(f"{self.policy.path}-wal")]
        return QueueStats(depth=depth, bytes=size, oldest_age_s=oldest,
                          file_bytes=sum(p.stat().st_size for p in files if p.exists()))

    def close(self) -> None:
        with self._lock:
            self._db.close()
