"""The shared replay store on real Redis: one answer for every broker, TTL from ``exp``, and
fail closed when the store is gone (a private redis-server, killed; never the shared one)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker_plugins.commands import open_replay_store
from broker_plugins.replay_redis import RedisReplayStore
from broker_plugins.settings import CommandSettings, parse_settings
from edge_core.clock import ManualClock
from edge_core.errors import ConfigError
from edge_core.events import SecurityEvents
from edge_core.replay import KEY_SIZE, MemoryReplayCache, ReplayCache, ReplayStoreUnavailable, ReplayVerdict
from tests.broker.acl_fixture import write_acl
from tests.broker.test_commands import COMMAND_ACL, TOPIC, alice, pump, sign
from tests.conftest import StartBroker
from tests.support.broker import BrokerThread
from tests.support.pki import DevPki
from tests.support.stores import REDIS_URL, OwnRedis, free_port, redis_client

NOW = datetime.now(UTC).replace(microsecond=0)


def alice_signing_key(pki: DevPki) -> ec.EllipticCurvePrivateKey:
    key_ = serialization.load_pem_private_key((pki.root / "operators" / "alice-signing.key").read_bytes(), None)
    assert isinstance(key_, ec.EllipticCurvePrivateKey)
    return key_


def key(n: int) -> bytes:
    return n.to_bytes(KEY_SIZE, "big")


@pytest.fixture
def stores(redis_prefix: str) -> Iterator[tuple[RedisReplayStore, RedisReplayStore]]:
    clock = ManualClock(NOW)
    one = RedisReplayStore(REDIS_URL, prefix=redis_prefix, clock=clock)
    two = RedisReplayStore(REDIS_URL, prefix=redis_prefix, clock=clock)
    yield one, two
    one.close()
    two.close()


def test_is_a_replay_cache(stores: tuple[RedisReplayStore, RedisReplayStore]) -> None:
    store: ReplayCache = stores[0]
    assert store.not_before == NOW  # the store's epoch: created on first use, from the broker's clock


def test_a_nonce_recorded_by_one_broker_is_replayed_on_every_other(
        stores: tuple[RedisReplayStore, RedisReplayStore], redis_prefix: str) -> None:
    one, two = stores
    assert one.remember(key(1), keep_until=NOW + timedelta(seconds=60), now=NOW) is ReplayVerdict.RECORDED
    assert two.remember(key(1), keep_until=NOW + timedelta(seconds=60), now=NOW) is ReplayVerdict.REPLAYED
    assert one.remember(key(1), keep_until=NOW + timedelta(seconds=60), now=NOW) is ReplayVerdict.REPLAYED
    assert two.remember(key(2), keep_until=NOW + timedelta(seconds=60), now=NOW) is ReplayVerdict.RECORDED
    assert two.not_before == one.not_before
    # Another site (another prefix) is another store.
    other = RedisReplayStore(REDIS_URL, prefix=redis_prefix + "-b", clock=ManualClock(NOW))
    try:
        assert other.remember(key(1), keep_until=NOW + timedelta(seconds=60), now=NOW) is ReplayVerdict.RECORDED
    finally:
        client = redis_client()
        client.delete(*client.keys(f"{{{redis_prefix}-b}}:*"))
        other.close()


def test_the_ttl_follows_exp_rounded_up(stores: tuple[RedisReplayStore, RedisReplayStore],
                                        redis_prefix: str) -> None:
    one, _ = stores
    now = NOW + timedelta(milliseconds=250)
    one.remember(key(7), keep_until=NOW + timedelta(seconds=90, milliseconds=100), now=now)
    ttl_ms = redis_client().pttl(f"{{{redis_prefix}}}:n:{key(7).hex()}")
    # keep_until rounds up to the next whole second (91 s after NOW), measured from now (NOW + 0.25 s)
    assert 90_000 < ttl_ms <= 90_750


def test_entry_really_expires_in_redis(redis_prefix: str) -> None:
    clock = ManualClock(datetime.now(UTC))
    store = RedisReplayStore(REDIS_URL, prefix=redis_prefix, clock=clock)
    try:
        now = clock.now()
        until = now.replace(microsecond=0) + timedelta(seconds=1)  # lives until the next whole second
        assert store.remember(key(3), keep_until=until, now=now) is ReplayVerdict.RECORDED
        time.sleep((until - now).total_seconds() + 0.3)
        assert store.remember(key(3), keep_until=until + timedelta(seconds=5), now=until) is ReplayVerdict.RECORDED
    finally:
        store.close()


def test_a_store_that_lost_its_data_refuses_then_judges_by_the_new_epoch(
        stores: tuple[RedisReplayStore, RedisReplayStore], redis_prefix: str) -> None:
    one, two = stores
    events = SecurityEvents("test")
    one.events = events
    assert one.remember(key(1), keep_until=NOW + timedelta(seconds=60), now=NOW) is ReplayVerdict.RECORDED
    assert two.not_before == NOW
    client = redis_client()
    client.delete(*client.keys(f"{{{redis_prefix}}}:*"))  # what a Redis restart without persistence does
    later = NOW + timedelta(seconds=5)
    with pytest.raises(ReplayStoreUnavailable):
        one.remember(key(1), keep_until=NOW + timedelta(seconds=60), now=later)
    assert events.count("replay_store.reset", "epoch_changed") == 1
    assert one.not_before == later  # commands issued before the reset now fail issued_before_restart
    # The other broker learns the same on its next call: the store never answers "not seen" for it.
    with pytest.raises(ReplayStoreUnavailable):
        two.remember(key(9), keep_until=NOW + timedelta(seconds=60), now=later)
    assert two.not_before == later
    assert two.remember(key(9), keep_until=NOW + timedelta(seconds=60), now=later) is ReplayVerdict.RECORDED


def test_unreachable_store_fails_closed_fast_with_one_alarm() -> None:
    events = SecurityEvents("test")
    store = RedisReplayStore(f"redis://127.0.0.1:{free_port()}/0", prefix="p", clock=ManualClock(NOW),
                             events=events, retry_after=30)
    try:
        with pytest.raises(ReplayStoreUnavailable) as first:
            store.remember(key(1), keep_until=NOW + timedelta(seconds=60), now=NOW)
        assert first.value.reason == "replay_store_unavailable"
        started = time.monotonic()
        for n in range(100):
            with pytest.raises(ReplayStoreUnavailable):
                store.remember(key(n), keep_until=NOW + timedelta(seconds=60), now=NOW)
        assert time.monotonic() - started < 0.5  # no connect attempt per command while it is down
        assert events.count("replay_store.alarm", "replay_store_unavailable") == 1
    finally:
        store.close()


def test_a_killed_store_refuses_commands_and_recovers(tmp_path: Path) -> None:
    server = OwnRedis(str(tmp_path)).start()
    events = SecurityEvents("test")
    store = RedisReplayStore(server.url, prefix="site", clock=ManualClock(NOW), events=events, retry_after=0.2)
    try:
        assert store.remember(key(1), keep_until=NOW + timedelta(seconds=60), now=NOW) is ReplayVerdict.RECORDED
        server.kill()
        with pytest.raises(ReplayStoreUnavailable):
            store.remember(key(1), keep_until=NOW + timedelta(seconds=60), now=NOW)  # never "not seen"
        assert events.count("replay_store.alarm") == 1
        server.start()  # empty: the data is gone with the process
        time.sleep(0.3)
        with pytest.raises(ReplayStoreUnavailable):  # the epoch is new: judged as a reset, once
            store.remember(key(1), keep_until=NOW + timedelta(seconds=60), now=NOW + timedelta(seconds=1))
        assert events.count("replay_store.recovered") == 1
        assert events.count("replay_store.reset") == 1
        assert store.not_before == NOW + timedelta(seconds=1)
    finally:
        store.close()
        server.kill()


def test_an_evicting_redis_is_refused_at_start(tmp_path: Path) -> None:
    server = OwnRedis(str(tmp_path), "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru").start()
    try:
        settings = CommandSettings(operators_path=tmp_path / "ops.yaml", replay_store=server.url)
        with pytest.raises(ConfigError, match="allkeys-lru") as refused:
            open_replay_store(settings, clock=ManualClock(NOW), events=SecurityEvents("test"))
        assert "noeviction" in refused.value.diagnostics()
    finally:
        server.kill()


def test_a_full_redis_answers_full(tmp_path: Path) -> None:
    server = OwnRedis(str(tmp_path), "--maxmemory", "2mb", "--maxmemory-policy", "noeviction").start()
    store = RedisReplayStore(server.url, prefix="site", clock=ManualClock(NOW))
    try:
        client = redis.Redis(port=server.port)
        for size in (65536, 4096, 256, 16):  # fill it to the brim: coarse, then finer
            for n in range(1000):
                try:
                    client.set(f"ballast:{size}:{n}", b"x" * size)
                except redis.exceptions.OutOfMemoryError:
                    break
        client.close()
        assert store.remember(key(5), keep_until=NOW + timedelta(seconds=60), now=NOW) is ReplayVerdict.FULL
    finally:
        store.close()
        server.kill()


def test_broker_yaml_chooses_the_store(tmp_path: Path) -> None:
    def parse(commands: str) -> CommandSettings | None:
        text = ("listener:\n  certfile: c\n  keyfile: k\n  client_ca: ca\nregistry: r.yaml\n"
                f"commands:\n  operators: ops.yaml\n{commands}")
        return parse_settings(text, source="broker.yaml", base_dir=tmp_path).commands

    assert parse("").replay_store == "memory"  # type: ignore[union-attr]
    shared = parse("  replay_store: redis://10.0.0.5:6379/2\n  replay_prefix: site-a\n  replay_timeout: 0.1\n")
    assert shared is not None and shared.replay_store == "redis://10.0.0.5:6379/2"
    assert shared.replay_prefix == "site-a" and shared.replay_timeout == 0.1
    for bad, key in (("  replay_store: memcached://x\n", "replay_store"), ("  replay_prefix: '{x}'\n", "replay_prefix"),
                     ("  replay_timeout: 30\n", "replay_timeout")):
        with pytest.raises(ConfigError, match=key) as refused:
            parse(bad)
        assert refused.value.line == 8  # the offending key's own line


def test_memory_is_the_default(tmp_path: Path) -> None:
    store = open_replay_store(CommandSettings(operators_path=tmp_path / "ops.yaml"), clock=ManualClock(NOW),
                              events=SecurityEvents("test"))
    assert isinstance(store, MemoryReplayCache)


# --------------------------------------------------------------------------- through real brokers

@pytest.mark.integration
def test_two_brokers_share_one_store_and_fail_closed_without_it(
        start_broker: StartBroker, tmp_path: Path, pki: DevPki, redis_prefix: str) -> None:
    clock = ManualClock(datetime.now(UTC).replace(microsecond=0))
    acl = write_acl(tmp_path, COMMAND_ACL)

    def start(url: str) -> BrokerThread:
        return start_broker(acl=acl, clock=clock, extra=(
            f"commands:\n  operators: {pki.root / 'operators.yaml'}\n  replay_store: {url}\n"
            f"  replay_prefix: {redis_prefix}\n  replay_timeout: 0.2\n"))

    first, second = start(REDIS_URL), start(REDIS_URL)
    clock.advance(timedelta(seconds=31))  # past the store's epoch + skew
    key_ = alice_signing_key(pki)
    token = sign(key_, clock, ttl=120)
    for broker in (first, second):
        device, operator = pump(broker, pki), alice(broker, pki)
        operator.publish(TOPIC, token)
        if broker is first:
            assert device.expect().payload == token
            first.wait_event("command.accepted")
        else:
            second.wait_event("command.rejected", "replayed")
            assert json.loads(operator.expect().payload)["reason"] == "replayed"
            device.expect_none()
        device.close()
        operator.close()

    dead = start(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    device, operator = pump(dead, pki), alice(dead, pki)
    operator.publish(TOPIC, sign(key_, clock))
    dead.wait_event("command.rejected", "replay_store_unavailable")
    dead.wait_event("replay_store.alarm", "replay_store_unavailable")
    assert json.loads(operator.expect().payload)["reason"] == "replay_store_unavailable"
    device.expect_none()
    assert dead.events.count("command.accepted") == 0
    device.close()
    operator.close()


def test_redaction_hides_passwords_only() -> None:
    from edge_core.dsn import redact

    assert redact("rediss://:s3cret@10.0.0.5:6380/0") == "rediss://:***@10.0.0.5:6380/0"
    assert redact("postgresql://agent:pw@db/edge?schema=a") == "postgresql://agent:***@db/edge?schema=a"
    assert redact("redis://10.0.0.5:6379/0") == "redis://10.0.0.5:6379/0"
    store = RedisReplayStore("redis://:s3cret@127.0.0.1:1/0", clock=ManualClock(NOW))
    try:
        with pytest.raises(ReplayStoreUnavailable) as down:
            store.remember(key(1), keep_until=NOW + timedelta(seconds=60), now=NOW)
        assert "s3cret" not in str(down.value) and "s3cret" not in store.url
    finally:
        store.close()
