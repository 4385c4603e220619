"""Replay protection for signed commands: which nonces (``jti``) were already used.

A command is accepted once. The verifier asks the cache to remember the command's
key (``replay_key(issuer, jti)``, a 16-byte digest) until the command can no longer
pass the freshness checks, that is until ``exp + max_skew``. After that moment the
time checks alone refuse the token, so the entry can go.

``ReplayCache`` is the small interface the verifier needs, so that several brokers can
share one store (``broker_plugins.replay_redis``: a Redis ``SET key NX PX`` inside a
Lua script). ``remember`` must be an atomic check-and-insert. A shared store that cannot
answer raises ``ReplayStoreUnavailable``; the verifier turns that into the refusal
``replay_store_unavailable`` (fail closed: a store that cannot say "seen" never means
"not seen").

``MemoryReplayCache`` is the in-process store. Its rules:

- bounded: it never holds more than ``capacity`` entries;
- it never evicts a live entry, because that would reopen a replay window. When it is
  full of live entries it answers ``FULL`` and the command is refused (fail closed);
- expired entries leave lazily: entries are grouped by the second they expire in, and
  a heap of those seconds says which group to drop next;
- restart semantics: it forgets everything when the process stops. It therefore
  carries ``not_before``, the moment it started, and the verifier refuses every
  command whose ``iat`` is earlier than ``not_before + max_skew`` (reason
  ``issued_before_restart``): such a command could have been accepted by the previous
  process, and nothing here would catch its replay. The cost is that commands issued
  shortly before a restart, or during the first ``max_skew`` seconds after it, must be
  re-sent. The alternative, persisting the cache, needs durable writes on every command
  and still loses entries on a crash between accept and fsync.

No I/O, no event loop: the clock is handed in on every call.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import math
import threading
from datetime import datetime
from typing import Protocol

from edge_core.clock import as_utc
from edge_core.errors import FetchError

__all__ = [
    "KEY_SIZE", "MemoryReplayCache", "ReplayCache", "ReplayStoreUnavailable", "ReplayVerdict", "replay_key",
]

#: Bytes per stored key: 128 bits keep accidental collisions negligible at any capacity.
KEY_SIZE = 16


class ReplayVerdict(enum.Enum):
    RECORDED = "recorded"  # first time seen; now remembered
    REPLAYED = "replayed"  # already seen and still live
    FULL = "full"  # not seen, but no room without evicting a live entry


class ReplayStoreUnavailable(FetchError):
    """The shared replay store could not answer (down, timed out, reset); commands are refused."""

    def __init__(self, message: str) -> None:
        super().__init__("replay_store_unavailable", message,
                         hint="check that the replay store (commands.replay_store) is reachable; "
                              "commands are refused until it answers")


class ReplayCache(Protocol):
    """What the envelope verifier needs from a nonce store."""

    @property
    def not_before(self) -> datetime | None:
        """Earliest moment this store vouches for; ``None`` if it never forgets.

        May raise ``ReplayStoreUnavailable`` (a shared store that has not been reached yet).
        """
        ...

    def remember(self, key: bytes, *, keep_until: datetime, now: datetime) -> ReplayVerdict:
        """Atomically: if ``key`` is live answer ``REPLAYED``, else store it until ``keep_until``.

        Raises ``ReplayStoreUnavailable`` when the answer is unknown; never guesses.
        """
        ...


def replay_key(issuer: str, jti: str) -> bytes:
    """The 16-byte store key of a command: one operator's nonce cannot block another's."""
    material = f"{len(issuer)}:{issuer}:{jti}".encode()
    return hashlib.blake2b(material, digest_size=KEY_SIZE, person=b"edge-cmd-jti").digest()


class MemoryReplayCache:
    """An in-memory, bounded, fail-closed nonce store (see the module docstring)."""

    def __init__(self, capacity: int, *, started_at: datetime) -> None:
        if capacity < 1:
            raise ValueError(f"replay cache capacity must be >= 1, not {capacity}")
        self.capacity = capacity
        self._not_before = as_utc(started_at)
        self._keys: set[bytes] = set()
        # second of expiry -> keys expiring in it; a heap of those seconds
        self._buckets: dict[int, list[bytes]] = {}
        self._heap: list[int] = []
        self._lock = threading.Lock()

    @property
    def not_before(self) -> datetime:
        return self._not_before

    def __len__(self) -> int:
        return len(self._keys)

    def remember(self, key: bytes, *, keep_until: datetime, now: datetime) -> ReplayVerdict:
        if len(key) != KEY_SIZE:
            raise ValueError(f"replay keys are {KEY_SIZE} bytes, not {len(key)}; use replay_key()")
        now_ts = as_utc(now).timestamp()
        # Round up: an entry may outlive its deadline by < 1 s, never die before it.
        until = math.ceil(as_utc(keep_until).timestamp())
        if until < now_ts:
            raise ValueError("keep_until is already past; the verifier must refuse expired commands first")
        with self._lock:
            self._evict(now_ts)
            if key in self._keys:
                return ReplayVerdict.REPLAYED
            if len(self._keys) >= self.capacity:
                return ReplayVerdict.FULL
            self._keys.add(key)
            bucket = self._buckets.get(until)
            if bucket is None:
                self._buckets[until] = [key]
                heapq.heappush(self._heap, until)
            else:
                bucket.append(key)
            return ReplayVerdict.RECORDED

    def expire(self, now: datetime) -> int:
        """Drop every entry whose deadline is past; returns how many left."""
        with self._lock:
            return self._evict(as_utc(now).timestamp())

    def _evict(self, now_ts: float) -> int:
        dropped = 0
        heap, buckets, keys = self._heap, self._buckets, self._keys
        while heap and heap[0] < now_ts:
            for key in buckets.pop(heapq.heappop(heap)):
                keys.discard(key)
                dropped += 1
        return dropped
