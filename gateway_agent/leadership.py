"""Agent HA: which of the agents sharing one PostgreSQL inventory runs the scan and the renewals.

Two mechanisms, both rows in the inventory's schema (migration ``0002_leadership.sql``):

- **The leader lease** (``leader_lease``): one row per lease name, with the holder, an expiry and
  a fencing token. The holder renews it every ``ttl / 3`` on its own connection; a standby polls
  at the same pace and takes the row once it has expired, incrementing the token. Expiry is
  judged by the database's clock (``clock_timestamp()``), never by the agents' clocks. The holder
  considers itself leader only until ``ttl`` after it *sent* its last successful renewal, which is
  before the database lets anyone else take over. A standby takes over at most ``ttl + ttl / 3``
  after the leader's last renewal: that is the bound ``leader_lease_seconds`` configures.
  A clean shutdown releases the lease at once.
- **Fencing**: while leader, the agent's inventory carries a ``Fence`` (lease name, holder,
  token) and every write transaction first checks that this exact lease is still held
  (``inventory_pg.PostgresInventory``). An agent that was paused past its lease (GC, a stalled
  VM) and wakes up believing it leads cannot write: ``StateError("not_leader")``.
- **Per-device claims** (``renewal_claims``): before the orchestrator touches a device it claims
  it (``INSERT ... ON CONFLICT DO UPDATE ... WHERE expired``); the claim lives as long as the lease
  (the heartbeat extends the holder's claims) and is deleted when the renewal ends. A claim is
  taken only from nobody or from an expired holder, so two agents never renew one device at
  once, even in the window where an old leader has not yet noticed it lost the lease.

The heartbeat runs on psycopg's ``AsyncConnection`` (a dedicated connection, so a long scan
query never delays it), in a thread with an event loop of its own (``start``/``stop``): the
inventory is a blocking connection on the agent's loop, and a daily scan over a million devices
holds that loop for many seconds, longer than a lease. Claims use the inventory's own connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg

from edge_core.dsn import redact
from edge_core.events import SecurityEvents
from gateway_agent.inventory_pg import Fence, PostgresInventory, split_schema

__all__ = ["DatabaseClaims", "LeaderLease", "LeaseState", "holder_id"]

LEASE_NAME = "lifecycle"
#: How long ``stop`` waits for the heartbeat thread (its release is one bounded statement).
_STOP_JOIN_S = 10.0


def holder_id(agent_id: str) -> str:
    """Unique per process: a restarted agent is a new holder (it waits for its old lease to expire)."""
    return f"{agent_id}@{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True)
class LeaseState:
    holder: str
    token: int
    seconds_left: float


class LeaderLease:
    """The lease loop of one agent: ``start`` runs it in its own thread, ``stop`` ends it and
    releases the lease (or ``run`` until cancelled and ``release``, on the caller's loop)."""

    def __init__(self, url: str, *, holder: str, ttl: timedelta, events: SecurityEvents,
                 name: str = LEASE_NAME) -> None:
        self._conninfo, self.schema = split_schema(url)
        self.url = redact(url)
        self.name = name
        self.holder = holder
        self.ttl = ttl.total_seconds()
        self.interval = self.ttl / 3
        self.events = events
        self.token: int | None = None
        self.leader: LeaseState | None = None  # who leads, as last seen
        self.acquired_at: float | None = None  # monotonic, for the failover figure
        self._valid_until = 0.0
        self._changed = asyncio.Event()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._unreachable = False  # the last beat failed (a standby reports that once)
        self._caller: asyncio.AbstractEventLoop | None = None  # the agent's loop, where _changed lives
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        self._thread_task: asyncio.Task[None] | None = None
        self._thread_started = threading.Event()
        #: why the heartbeat thread ended, if not by ``stop`` (``raise_failure`` surfaces it)
        self.failure: BaseException | None = None

    # -- what the rest of the agent asks -----------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self.token is not None and time.monotonic() < self._valid_until

    @property
    def fence(self) -> Fence | None:
        return None if self.token is None else Fence(self.name, self.holder, self.token)

    async def wait_changed(self, at_most: float) -> None:
        """Sleep until leadership may have changed (or ``at_most`` seconds)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), at_most)
        self._changed.clear()

    def raise_failure(self) -> None:
        """Raise what ended the heartbeat thread, if it ended on its own."""
        if self.failure is not None:
            raise self.failure

    # -- the heartbeat's own thread ------------------------------------------------------------

    def start(self) -> None:
        """Run the heartbeat in a thread of its own (call from the agent's event loop)."""
        if self._thread is not None:
            raise RuntimeError("the lease heartbeat is already running")
        self._caller = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._thread_main, name=f"leader-lease-{self.name}", daemon=True)
        self._thread.start()
        self._thread_started.wait()

    def _thread_main(self) -> None:
        loop = self._thread_loop = asyncio.new_event_loop()
        try:
            self._thread_task = loop.create_task(self.run(), name="leader-lease")
            self._thread_started.set()
            loop.run_until_complete(self._thread_task)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - not swallowed: raise_failure re-raises it on the agent's loop
            self.failure = exc
            self._lose("heartbeat_failed", repr(exc))
        finally:
            self._thread_started.set()
            loop.run_until_complete(self.release())
            loop.close()

    async def stop(self) -> None:
        """End the heartbeat and release the lease (clean shutdown); waits for the thread."""
        thread, loop, task = self._thread, self._thread_loop, self._thread_task
        if thread is None:
            await self.release()
            return
        if loop is not None and task is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to cancel
                loop.call_soon_threadsafe(task.cancel)
        await asyncio.to_thread(thread.join, _STOP_JOIN_S)
        self._thread = None

    def _signal(self) -> None:
        """Wake ``wait_changed`` on the agent's loop, from whichever thread leadership changed in."""
        caller = self._caller
        if caller is None or caller.is_closed():
            self._changed.set()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is caller:
            self._changed.set()
        else:
            caller.call_soon_threadsafe(self._changed.set)

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                if self._conn is None or self._conn.closed or self._conn.broken:
                    self._conn = await psycopg.AsyncConnection.connect(
                        self._conninfo, autocommit=True, connect_timeout=max(1, round(self.interval)),
                        options=f"-c search_path={self.schema} "
                                f"-c statement_timeout={max(500, int(self.interval * 1000))} "
                                f"-c idle_in_transaction_session_timeout={max(500, int(self.interval * 1000))}")
                await self.beat(self._conn)
            except psycopg.Error as exc:
                if self.token is None and not self._unreachable:
                    # A standby that cannot reach the database cannot take over: say so once.
                    self.events.emit("leader.standby_unreachable", "database_unreachable", level="warning",
                                     lease=self.name, holder=self.holder, detail=str(exc)[:200])
                self._unreachable = True
                self._lose("database_unreachable", str(exc))
                if self._conn is not None:
                    await self._conn.close()
                    self._conn = None
            else:
                self._unreachable = False
            if self.is_leader:
                # sleep no longer than the validity left, so a lost lease is noticed in time
                await asyncio.sleep(max(0.0, min(self.interval, self._valid_until - time.monotonic())))
            else:
                await asyncio.sleep(self.interval)

    async def beat(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """One renewal (leader) or one attempt to take an expired lease (standby)."""
        sent = time.monotonic()
        ttl = timedelta(seconds=self.ttl)
        if self.token is not None:
            async with conn.transaction():
                row = await (await conn.execute(
                    "UPDATE leader_lease SET expires_at = clock_timestamp() + %s WHERE name = %s AND holder = %s "
                    "AND token = %s AND expires_at > clock_timestamp() RETURNING token",
                    (ttl, self.name, self.holder, self.token))).fetchone()
                if row is not None:
                    await conn.execute("UPDATE renewal_claims SET expires_at = clock_timestamp() + %s "
                                       "WHERE holder = %s AND token = %s", (ttl, self.holder, self.token))
            if row is not None:
                self._valid_until = sent + self.ttl
                self.leader = LeaseState(self.holder, self.token, self.ttl)
                return
            self._lose("lease_lost", "the lease expired before it was renewed")
        row = await (await conn.execute(
            "INSERT INTO leader_lease (name, holder, token, acquired_at, expires_at) "
            "VALUES (%s, %s, 1, clock_timestamp(), clock_timestamp() + %s) "
            "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, token = leader_lease.token + 1, "
            "acquired_at = excluded.acquired_at, expires_at = excluded.expires_at "
            "WHERE leader_lease.expires_at <= clock_timestamp() RETURNING token",
            (self.name, self.holder, ttl))).fetchone()
        if row is not None:
            self.token = int(row[0])
            self._valid_until = sent + self.ttl
            self.acquired_at = sent
            self.leader = LeaseState(self.holder, self.token, self.ttl)
            self.events.emit("leader.acquired", lease=self.name, holder=self.holder, token=self.token)
            self._signal()
            return
        found = await (await conn.execute(
            "SELECT holder, token, EXTRACT(EPOCH FROM expires_at - clock_timestamp()) FROM leader_lease "
            "WHERE name = %s", (self.name,))).fetchone()
        if found is not None:
            self.leader = LeaseState(str(found[0]), int(found[1]), float(found[2]))

    def _lose(self, reason: str, detail: str) -> None:
        if self.token is None:
            return
        self.events.emit("leader.lost", reason, level="warning", lease=self.name, holder=self.holder,
                         token=self.token, detail=detail[:200])
        self.token = None
        self._valid_until = 0.0
        self._signal()

    async def release(self) -> None:
        """Give the lease up now (clean shutdown): a standby takes over on its next poll."""
        token, conn = self.token, self._conn
        self.token = None
        self._valid_until = 0.0
        if conn is None or conn.closed:
            return
        with contextlib.suppress(psycopg.Error):
            if token is not None:
                async with conn.transaction():
                    await conn.execute("DELETE FROM renewal_claims WHERE holder = %s", (self.holder,))
                    await conn.execute("UPDATE leader_lease SET expires_at = clock_timestamp() "
                                       "WHERE name = %s AND holder = %s AND token = %s",
                                       (self.name, self.holder, token))
                self.events.emit("leader.released", lease=self.name, holder=self.holder, token=token)
        await conn.close()
        self._conn = None

    def status(self) -> dict[str, Any]:
        leader = self.leader
        return {"lease": self.name, "holder": self.holder, "leader": self.is_leader, "token": self.token,
                "lease_seconds": self.ttl,
                "current_leader": None if leader is None else {"holder": leader.holder, "token": leader.token}}


class DatabaseClaims:
    """Per-device renewal claims (``renewal.RenewalClaims``) under the current lease."""

    def __init__(self, inventory: PostgresInventory, lease: LeaderLease) -> None:
        self.inventory = inventory
        self.lease = lease

    def claim(self, device_id: str) -> bool:
        fence = self.lease.fence
        if fence is None or not self.lease.is_leader:
            return False
        return self.inventory.claim_device(device_id, fence, timedelta(seconds=self.lease.ttl))

    def holds(self, device_id: str) -> bool:
        # The claim lives exactly as long as the lease (the heartbeat extends both together).
        return self.lease.is_leader

    def release(self, device_id: str) -> None:
        self.inventory.release_claim(device_id, self.lease.holder)
