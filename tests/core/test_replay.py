"""MemoryReplayCache: bounded, never evicts a live entry, forgets expired ones."""

from __future__ import annotations

import gc
import tracemalloc
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_core.replay import KEY_SIZE, MemoryReplayCache, ReplayCache, ReplayVerdict, replay_key

NOW = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)


def key(n: int) -> bytes:
    return n.to_bytes(KEY_SIZE, "big")


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def test_is_a_replay_cache() -> None:
    cache: ReplayCache = MemoryReplayCache(4, started_at=NOW)
    assert cache.not_before == NOW


def test_records_then_refuses_replay_until_deadline_inclusive() -> None:
    cache = MemoryReplayCache(4, started_at=NOW)
    assert cache.remember(key(1), keep_until=at(10), now=NOW) is ReplayVerdict.RECORDED
    assert cache.remember(key(1), keep_until=at(10), now=at(5)) is ReplayVerdict.REPLAYED
    assert cache.remember(key(1), keep_until=at(10), now=at(10)) is ReplayVerdict.REPLAYED
    assert len(cache) == 1
    assert cache.remember(key(1), keep_until=at(20), now=at(11)) is ReplayVerdict.RECORDED


def test_fractional_deadline_rounds_up_never_down() -> None:
    cache = MemoryReplayCache(4, started_at=NOW)
    cache.remember(key(1), keep_until=at(10.2), now=NOW)
    assert cache.remember(key(1), keep_until=at(20), now=at(10.9)) is ReplayVerdict.REPLAYED


def test_full_of_live_entries_fails_closed_and_evicts_nothing() -> None:
    cache = MemoryReplayCache(3, started_at=NOW)
    for n in range(3):
        assert cache.remember(key(n), keep_until=at(100), now=NOW) is ReplayVerdict.RECORDED
    for n in range(3, 1000):  # a flood
        assert cache.remember(key(n), keep_until=at(1), now=NOW) is ReplayVerdict.FULL
    assert len(cache) == 3
    for n in range(3):
        assert cache.remember(key(n), keep_until=at(100), now=at(50)) is ReplayVerdict.REPLAYED


def test_room_comes_back_when_entries_expire() -> None:
    cache = MemoryReplayCache(2, started_at=NOW)
    cache.remember(key(1), keep_until=at(10), now=NOW)
    cache.remember(key(2), keep_until=at(20), now=NOW)
    assert cache.remember(key(3), keep_until=at(30), now=at(10)) is ReplayVerdict.FULL
    assert cache.remember(key(3), keep_until=at(30), now=at(11)) is ReplayVerdict.RECORDED
    assert cache.remember(key(2), keep_until=at(20), now=at(11)) is ReplayVerdict.REPLAYED


def test_expire_drops_lazily_by_bucket() -> None:
    cache = MemoryReplayCache(1000, started_at=NOW)
    for n in range(300):
        cache.remember(key(n), keep_until=at(n % 30), now=NOW)
    assert cache.expire(at(9.5)) == 100  # seconds 0..9
    assert len(cache) == 200
    assert cache.expire(at(100)) == 200
    assert len(cache) == 0


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="capacity"):
        MemoryReplayCache(0, started_at=NOW)
    cache = MemoryReplayCache(1, started_at=NOW)
    with pytest.raises(ValueError, match="16 bytes"):
        cache.remember(b"short", keep_until=at(1), now=NOW)
    with pytest.raises(ValueError, match="past"):
        cache.remember(key(1), keep_until=at(1), now=at(2))
    with pytest.raises(ValueError, match="naive"):
        MemoryReplayCache(1, started_at=NOW.replace(tzinfo=None))


def test_replay_key_is_16_bytes_and_separates_issuers() -> None:
    assert len(replay_key("alice", "x" * 22)) == KEY_SIZE
    assert replay_key("alice", "x" * 22) == replay_key("alice", "x" * 22)
    assert replay_key("alice", "x" * 22) != replay_key("bob", "x" * 22)
    assert replay_key("a:b", "c") != replay_key("a", "b:c")


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(min_value=1, max_value=6),
    ops=st.lists(
        st.tuples(st.integers(0, 9), st.integers(0, 20), st.integers(0, 5)),  # key, lifetime, advance
        max_size=60,
    ),
)
def test_matches_a_simple_model(capacity: int, ops: list[tuple[int, int, int]]) -> None:
    cache = MemoryReplayCache(capacity, started_at=NOW)
    model: dict[int, int] = {}  # key -> deadline (seconds after NOW)
    t = 0
    for k, life, advance in ops:
        t += advance
        live = {kk: d for kk, d in model.items() if d >= t}
        verdict = cache.remember(key(k), keep_until=at(t + life), now=at(t))
        if k in live:
            assert verdict is ReplayVerdict.REPLAYED
        elif len(live) >= capacity:
            assert verdict is ReplayVerdict.FULL
        else:
            assert verdict is ReplayVerdict.RECORDED
            live[k] = t + life
        model = live
        assert len(cache) <= capacity


def test_memory_per_entry_is_compact() -> None:
    """100k live entries; the benchmark measures 1M. Budget: < 200 bytes per entry."""
    n = 100_000
    gc.collect()
    tracemalloc.start()
    try:
        cache = MemoryReplayCache(n, started_at=NOW)
        for i in range(n):
            cache.remember(replay_key("alice", f"{i:022d}"), keep_until=at(i % 330), now=NOW)
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(cache) == n
    assert used / n < 200, f"{used / n:.0f} bytes per entry"
