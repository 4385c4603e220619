"""What only the PostgreSQL inventory has: numbered migrations, reconnects, the lease, fencing and
per-device claims, and the URL in ``agent.yaml`` that picks the backend. The shared behaviour of
both backends is in ``tests/agent/test_inventory.py`` (parametrized over both)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from edge_core.errors import ConfigError, FetchError, StateError
from edge_core.events import SecurityEvents
from edge_core.lifecycle import begin_renewal
from gateway_agent.inventory import SqliteInventory, open_inventory
from gateway_agent.inventory_pg import (
    Fence,
    Migration,
    PostgresInventory,
    apply_migrations,
    load_migrations,
    split_schema,
)
from gateway_agent.leadership import DatabaseClaims, LeaderLease
from gateway_agent.settings import parse_agent_settings
from tests.agent.test_inventory import add
from tests.support.stores import free_port

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def test_migrations_are_numbered_files_recorded_with_their_checksum(pg_url: str) -> None:
    files = load_migrations()
    assert [m.version for m in files] == list(range(1, len(files) + 1))
    with PostgresInventory(pg_url) as inv:
        rows = inv._rows("SELECT version, name, checksum FROM schema_migrations ORDER BY version")
        assert [(v, n, c.strip()) for v, n, c in rows] == [(m.version, m.name, m.checksum) for m in files]
        assert inv.schema_version == len(files)
    with PostgresInventory(pg_url) as again:  # a second start applies nothing
        assert again.count() == 0


def test_an_edited_or_newer_schema_is_refused(pg_url: str) -> None:
    conninfo, schema = split_schema(pg_url)
    PostgresInventory(pg_url).close()
    files = load_migrations()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        edited = [Migration(1, files[0].name, files[0].sql + "\n-- edited"), *files[1:]]
        with pytest.raises(ConfigError, match="changed after it was applied"):
            apply_migrations(conn, schema, edited)
        with pytest.raises(ConfigError, match="newer than this agent") as newer:
            apply_migrations(conn, schema, files[:1])
        assert "never moves back" in newer.value.diagnostics()


def test_agents_starting_together_migrate_once(pg_url: str) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            PostgresInventory(pg_url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with PostgresInventory(pg_url) as inv:
        assert len(inv._rows("SELECT version FROM schema_migrations")) == len(load_migrations())


def test_a_migration_that_fails_leaves_nothing_behind(pg_url: str) -> None:
    conninfo, schema = split_schema(pg_url)
    files = load_migrations()
    broken = [*files, Migration(len(files) + 1, "broken", "CREATE TABLE half_done (x INT); SELECT 1/0;")]
    with psycopg.connect(conninfo, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            apply_migrations(conn, schema, broken)
        conn.execute(f'SET search_path TO "{schema}"')
        assert conn.execute("SELECT to_regclass('half_done')").fetchone() == (None,)
        assert conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone() == (len(files),)


def test_missing_inventory_and_bad_urls_are_config_errors(pg_url: str) -> None:
    with pytest.raises(ConfigError, match="no inventory in schema"):
        PostgresInventory(pg_url, create=False)
    with pytest.raises(ConfigError, match="plain SQL identifier"):
        split_schema("postgresql://h/db?schema=a;drop")
    with pytest.raises(ConfigError, match="not supported"):
        open_inventory("mysql://h/db")
    with pytest.raises(FetchError) as down:
        PostgresInventory("postgresql://postgres@127.0.0.1:1/test", connect_timeout=1)
    assert down.value.reason == "inventory_unreachable"


def test_password_never_appears_in_what_we_log(pg_url: str) -> None:
    with PostgresInventory(pg_url) as inv:
        assert ":***@" not in inv.url  # no password here
    with pytest.raises(FetchError) as down:
        PostgresInventory("postgresql://agent:s3cret@127.0.0.1:1/test", connect_timeout=1)
    assert "s3cret" not in str(down.value)


def test_a_dropped_connection_is_replaced_on_the_next_call(pg_url: str) -> None:
    with PostgresInventory(pg_url) as inv:
        add(inv, "pump-1", 60)  # type: ignore[arg-type]
        pid = inv._db.info.backend_pid
        with psycopg.connect(split_schema(pg_url)[0], autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(FetchError):
            inv.get("pump-1")  # the call in flight fails loudly...
        assert inv.get("pump-1") is not None  # ...the next one reconnects
        assert inv._db.info.backend_pid != pid


def test_a_session_ended_while_frozen_in_a_transaction_is_unreachable_not_a_crash(pg_url: str) -> None:
    """An agent frozen (SIGSTOP) between two statements of one transaction wakes to a session the
    server ended for idling: the driver reports that as an ``InternalError`` on the next
    statement, which must reach the agent as ``inventory_unreachable`` like any lost connection."""
    with PostgresInventory(pg_url) as inv:
        add(inv, "pump-1", 60)  # type: ignore[arg-type]
        pid = inv._db.info.backend_pid
        inv._db.execute("SET idle_in_transaction_session_timeout = 50")
        inv._db.execute("BEGIN")  # ...and here the process was frozen
        deadline = time.monotonic() + 10
        with psycopg.connect(split_schema(pg_url)[0], autocommit=True) as admin:
            while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
                assert time.monotonic() < deadline, "the server never ended the idle transaction"
                time.sleep(0.02)
        with pytest.raises(FetchError) as lost:
            list(inv.devices())  # the woken agent's next read
        assert lost.value.reason == "inventory_unreachable"
        assert inv.get("pump-1") is not None  # the next call reconnects
        assert inv._db.info.backend_pid != pid


def test_writes_under_a_fence_need_the_lease(pg_url: str) -> None:
    with PostgresInventory(pg_url) as inv:
        dev = add(inv, "pump-1", 60)  # type: ignore[arg-type]
        inv._rows("INSERT INTO leader_lease (name, holder, token, acquired_at, expires_at) "
                  "VALUES ('lifecycle', 'a', 7, now(), now() + interval '1 hour') RETURNING token")
        inv.fence = Fence("lifecycle", "a", 6)  # an older token: someone took over since
        with pytest.raises(StateError) as refused:
            inv.apply(begin_renewal(dev, now=T0, cause="due"))
        assert refused.value.reason == "not_leader"
        inv.fence = Fence("lifecycle", "a", 7)
        assert inv.apply(begin_renewal(dev, now=T0, cause="due")).version == 2


async def _lease_conn(pg_url: str) -> psycopg.AsyncConnection[Any]:
    conninfo, schema = split_schema(pg_url)
    return await psycopg.AsyncConnection.connect(conninfo, autocommit=True, options=f"-c search_path={schema}")


async def test_one_leader_then_the_next_after_expiry_with_a_higher_token(pg_url: str) -> None:
    PostgresInventory(pg_url).close()
    events = SecurityEvents("test")
    one = LeaderLease(pg_url, holder="one", ttl=timedelta(seconds=2), events=events)
    two = LeaderLease(pg_url, holder="two", ttl=timedelta(seconds=2), events=events)
    async with await _lease_conn(pg_url) as conn:
        await one.beat(conn)
        await two.beat(conn)
        assert one.is_leader and not two.is_leader and one.token == 1
        assert two.leader is not None and two.leader.holder == "one"
        await one.beat(conn)  # a renewal keeps the token
        assert one.token == 1
        await asyncio.sleep(2.2)  # one stops renewing (dies)
        assert not one.is_leader  # it knows by its own deadline, before anyone tells it
        await two.beat(conn)
        assert two.is_leader and two.token == 2
        await one.beat(conn)  # the old leader comes back: the renewal fails, it stands by
        assert not one.is_leader and one.token is None
        assert events.count("leader.lost", "lease_lost") == 1
        two._conn = conn
        await two.release()
    three = LeaderLease(pg_url, holder="three", ttl=timedelta(seconds=2), events=events)
    async with await _lease_conn(pg_url) as conn:
        await three.beat(conn)  # released: taken at once, no wait for expiry
        assert three.is_leader and three.token == 3


async def test_claims_are_exclusive_and_die_with_the_lease(pg_url: str) -> None:
    inv = PostgresInventory(pg_url)
    other = PostgresInventory(pg_url)
    try:
        add(inv, "pump-1", 60)  # type: ignore[arg-type]
        events = SecurityEvents("test")
        lease = LeaderLease(pg_url, holder="one", ttl=timedelta(seconds=2), events=events)
        async with await _lease_conn(pg_url) as conn:
            await lease.beat(conn)
            claims = DatabaseClaims(inv, lease)
            assert claims.claim("pump-1") and claims.holds("pump-1")
            assert not claims.claim("pump-1")  # not twice, not even by the same agent
            # Another agent with a forged fence cannot take a live claim...
            assert lease.fence is not None
            with pytest.raises(StateError):
                other.claim_device("pump-1", Fence("lifecycle", "two", 99), timedelta(seconds=2))
            await asyncio.sleep(2.2)  # ...but once the holder's lease (and so its claim) ran out:
            assert not claims.holds("pump-1")
            successor = LeaderLease(pg_url, holder="two", ttl=timedelta(seconds=2), events=events)
            await successor.beat(conn)
            assert DatabaseClaims(other, successor).claim("pump-1")
            assert not claims.claim("pump-1")  # the old holder is refused
    finally:
        inv.close()
        other.close()


def test_agent_yaml_picks_the_backend_by_url(tmp_path: Path) -> None:
    def lifecycle(inventory: str, extra: str = "") -> str:
        return (f"lifecycle:\n  inventory: {inventory}\n  ca_dir: ca\n  registry: registry.yaml\n{extra}")

    def parse(text: str) -> object:
        return parse_agent_settings(text.encode(), source="agent.yaml", base_dir=tmp_path)

    plain = parse(lifecycle("var/inv.db")).lifecycle  # type: ignore[attr-defined]
    assert plain.inventory == f"sqlite:///{tmp_path / 'var' / 'inv.db'}" and not plain.shared
    assert plain.spool_dir == tmp_path / "var" / "renew-requests"
    url = parse(lifecycle("sqlite:///var/inv.db")).lifecycle  # type: ignore[attr-defined]
    assert url.inventory == plain.inventory
    pg = parse(lifecycle("postgresql://edge@db.site/edge?schema=gw1",
                         "  spool_dir: var/spool\n  leader_lease_seconds: 10\n")).lifecycle  # type: ignore[attr-defined]
    assert pg.shared and pg.leader_lease == timedelta(seconds=10) and pg.spool_dir == tmp_path / "var" / "spool"
    with pytest.raises(ConfigError, match="spool_dir") as no_spool:
        parse(lifecycle("postgresql://edge@db.site/edge"))
    assert no_spool.value.line == 2
    with pytest.raises(ConfigError, match="must be a file path"):
        parse(lifecycle("mysql://db/edge"))
    with pytest.raises(ConfigError, match="plain SQL identifier"):
        parse(lifecycle("postgresql://db/edge?schema=x-y", "  spool_dir: s\n"))
    with open_inventory(plain.inventory) as opened:
        assert isinstance(opened, SqliteInventory)


async def test_a_standby_that_cannot_reach_the_database_says_so_once() -> None:
    """A standby that cannot reach PostgreSQL cannot take over: ops see it (once, not every beat)."""
    events = SecurityEvents("test")
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/test?schema=nowhere"  # nothing listens
    lease = LeaderLease(url, holder="standby", ttl=timedelta(seconds=0.6), events=events)
    task = asyncio.create_task(lease.run())
    try:
        deadline = time.monotonic() + 10
        while events.count("leader.standby_unreachable", "database_unreachable") == 0:
            assert time.monotonic() < deadline, "no leader.standby_unreachable event"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # several more failed beats
        assert events.count("leader.standby_unreachable", "database_unreachable") == 1
        assert not lease.is_leader
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_heartbeat_keeps_the_lease_while_the_agents_loop_is_blocked(pg_url: str) -> None:
    """The inventory is a blocking connection on the agent's loop, and a daily scan over a million
    devices holds that loop for longer than a lease: the heartbeat's own thread keeps leading."""
    PostgresInventory(pg_url).close()
    events = SecurityEvents("test")
    lease = LeaderLease(pg_url, holder="busy", ttl=timedelta(seconds=2), events=events)
    lease.start()
    try:
        await lease.wait_changed(5)  # woken from the heartbeat's thread when it acquires
        assert lease.is_leader
        time.sleep(5)  # noqa: ASYNC251 - the point: a synchronous scan holds this loop for 2.5 leases
        assert lease.is_leader and events.count("leader.lost") == 0
        rival = LeaderLease(pg_url, holder="rival", ttl=timedelta(seconds=2), events=events)
        async with await _lease_conn(pg_url) as conn:
            await rival.beat(conn)
        assert not rival.is_leader and rival.leader is not None and rival.leader.holder == "busy"
    finally:
        await lease.stop()
    assert not lease.is_leader and events.count("leader.released") == 1
    lease.raise_failure()  # the heartbeat ended by stop, not by a failure
