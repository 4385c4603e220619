"""The command replay store shared by every broker of a site: Redis.

``RedisReplayStore`` implements ``edge_core.replay.ReplayCache``. One Lua script does the
check-and-insert atomically on the Redis server::

    epoch key   {prefix}:epoch      the moment this store started vouching (ms since 1970)
    nonce keys  {prefix}:n:<hex>    one per accepted command, ``SET NX PX <ttl>``

- **The TTL follows ``exp``.** An entry lives until ``exp + max_skew`` (the verifier's
  ``keep_until``), rounded up to the next second. The TTL is relative (``PX``), computed from
  the broker's clock, so the Redis server's wall clock does not matter; clock differences
  between brokers are what ``max_skew`` already covers.
- **Data loss is a restart.** The epoch key is created once (``SET NX``) and ``not_before`` is
  its value, so commands issued before the store began are refused (``issued_before_restart``),
  exactly as after a broker restart with the in-memory cache. If Redis loses its data (a
  restart without persistence, a ``FLUSHALL``, a failover to an empty replica), the script
  finds the epoch missing or different, sets a new one and answers "reset": that command is
  refused as unavailable and the next ones are judged against the new epoch.
- **Fail closed.** A connection error, a timeout or an error reply raises
  ``ReplayStoreUnavailable`` (reason ``replay_store_unavailable``); the first one raises the
  alarm ``replay_store.alarm`` and the first success after it ``replay_store.recovered``.
  After a failure, calls fail at once for ``retry_after`` seconds (one probe per period), so a
  dead store costs no time per command. ``OOM`` (Redis full, ``noeviction``) answers ``FULL``.
- **Eviction.** A Redis that evicts keys under memory pressure would silently reopen replays,
  so ``check_server`` refuses a ``maxmemory-policy`` other than ``noeviction``.

All keys of one store share the hash tag ``{prefix}``, so the script's two keys live in one
slot of a Redis Cluster. The client is redis-py's blocking client with one attempt per call
and short timeouts; the broker calls it from a worker thread (``CommandState.verify``).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from datetime import UTC, datetime
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from edge_core.clock import Clock, SystemClock, as_utc
from edge_core.dsn import redact
from edge_core.errors import ConfigError
from edge_core.events import SecurityEvents
from edge_core.replay import KEY_SIZE, ReplayStoreUnavailable, ReplayVerdict

__all__ = ["RedisReplayStore"]

# KEYS[1] epoch, KEYS[2] nonce; ARGV[1] expected epoch, ARGV[2] ttl ms, ARGV[3] now ms.
# Returns {1, epoch} recorded, {0, epoch} replayed, {-1, epoch} the epoch is not the expected one.
_REMEMBER = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  redis.call('SET', KEYS[1], ARGV[3])
  return {-1, ARGV[3]}
end
if epoch ~= ARGV[1] then
  return {-1, epoch}
end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[2]) then
  return {1, epoch}
end
return {0, epoch}
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisReplayStore:
    """A ``ReplayCache`` in Redis, shared by every broker configured with the same URL and prefix."""

    def __init__(self, url: str, *, prefix: str = "edge:replay", clock: Clock | None = None,
                 events: SecurityEvents | None = None, timeout: float = 0.25, retry_after: float = 1.0) -> None:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"replay store URL {redact(url)!r} is not redis://, rediss:// or unix://")
        if not prefix or "{" in prefix or "}" in prefix:
            raise ConfigError(f"replay key prefix {prefix!r} must be non-empty and free of braces")
        self.url = redact(url)
        self.prefix = prefix
        self.events = events or SecurityEvents("edge-broker.replay")
        self.retry_after = retry_after
        self.clock = clock or SystemClock()
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            health_check_interval=0, decode_responses=False)
        self._script = self._client.register_script(_REMEMBER)
        self._epoch_key = f"{{{prefix}}}:epoch"
        self._epoch: bytes | None = None
        self._down_until = 0.0
        self._alarmed = False
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------

    def check_server(self) -> None:
        """Refuse a Redis that may evict live nonces (tolerate one that hides its config); read the epoch."""
        policy: str | None = None
        try:
            found = {_text(k): _text(v) for k, v in dict(self._client.config_get("maxmemory-policy")).items()}
            policy = found.get("maxmemory-policy")
        except redis.ResponseError:
            self.events.emit("replay_store.unchecked", "config_hidden", level="warning", store=self.url,
                             detail="CONFIG GET is not allowed; make sure maxmemory-policy is noeviction")
        except redis.RedisError as exc:
            self._failed(exc)
            return  # not reachable yet: commands are refused until it is
        if policy is not None and policy != "noeviction":
            raise ConfigError(f"replay store {self.url} has maxmemory-policy {policy!r}",
                              hint="set maxmemory-policy noeviction: an evicted nonce would let its command replay")
        with contextlib.suppress(ReplayStoreUnavailable):  # the epoch starts now, not at the first command
            self._load_epoch()

    def close(self) -> None:
        self._client.close()

    # -- ReplayCache -----------------------------------------------------------------------

    @property
    def not_before(self) -> datetime:
        epoch = self._epoch or self._load_epoch()
        return datetime.fromtimestamp(int(epoch) / 1000, UTC)

    def remember(self, key: bytes, *, keep_until: datetime, now: datetime) -> ReplayVerdict:
        if len(key) != KEY_SIZE:
            raise ValueError(f"replay keys are {KEY_SIZE} bytes, not {len(key)}; use replay_key()")
        now_ts = as_utc(now).timestamp()
        until = math.ceil(as_utc(keep_until).timestamp())  # never die before the deadline
        if until < now_ts:
            raise ValueError("keep_until is already past; the verifier must refuse expired commands first")
        ttl_ms = max(1, math.ceil((until - now_ts) * 1000))
        expected = self._epoch or self._load_epoch()
        nonce_key = f"{{{self.prefix}}}:n:{key.hex()}"
        answer = self._call(lambda: self._script(keys=[self._epoch_key, nonce_key],
                                                 args=[expected, ttl_ms, int(now_ts * 1000)]))
        if isinstance(answer, ReplayVerdict):
            return answer
        code, epoch = int(answer[0]), bytes(answer[1])
        if code == -1:
            self._epoch = epoch
            self.events.emit("replay_store.reset", "epoch_changed", level="error", store=self.url,
                             epoch=datetime.fromtimestamp(int(epoch) / 1000, UTC).isoformat(),
                             detail="the store lost its nonces; commands issued before the new epoch are refused")
            raise ReplayStoreUnavailable(f"replay store {self.url} was reset; re-send the command")
        return ReplayVerdict.RECORDED if code == 1 else ReplayVerdict.REPLAYED

    # -- plumbing --------------------------------------------------------------------------

    def _load_epoch(self) -> bytes:
        now_ms = str(int(self.clock.now().timestamp() * 1000)).encode()

        def load() -> Any:
            self._client.set(self._epoch_key, now_ms, nx=True)
            return self._client.get(self._epoch_key)

        epoch = self._call(load)
        if not isinstance(epoch, bytes):  # deleted between SET NX and GET: the next call sets it
            raise ReplayStoreUnavailable(f"replay store {self.url} has no epoch yet")
        self._epoch = epoch
        return epoch

    def _call(self, fn: Any) -> Any:
        """One round trip; any failure becomes ``ReplayStoreUnavailable`` (and the alarm)."""
        if time.monotonic() < self._down_until:
            raise ReplayStoreUnavailable(f"replay store {self.url} is unreachable (retrying every "
                                         f"{self.retry_after:g}s)")
        try:
            result = fn()
        except redis.exceptions.OutOfMemoryError:
            self._recovered()  # it answered: full of live nonces (noeviction), so refuse, as a full cache does
            return ReplayVerdict.FULL
        except redis.ResponseError as exc:
            self._failed(exc)
            raise ReplayStoreUnavailable(f"replay store {self.url} refused: {exc}") from exc
        except redis.RedisError as exc:
            self._failed(exc)
            raise ReplayStoreUnavailable(f"replay store {self.url} is unreachable: {exc}") from exc
        self._recovered()
        return result

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self.retry_after
            first = not self._alarmed
            self._alarmed = True
        if first:
            self.events.emit("replay_store.alarm", "replay_store_unavailable", level="error", store=self.url,
                             detail=str(exc)[:200])

    def _recovered(self) -> None:
        with self._lock:
            was = self._alarmed
            self._alarmed = False
        if was:
            self.events.emit("replay_store.recovered", store=self.url)
