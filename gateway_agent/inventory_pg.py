"""The certificate inventory on PostgreSQL, for sites where several agents share one database.

``PostgresInventory`` implements ``gateway_agent.inventory.Inventory`` with psycopg 3. It stores
exactly what ``SqliteInventory`` stores (same tables, same columns, same row conversions), with
timestamps as ``timestamptz``, so the daily scan is the design's own query::

    SELECT ... FROM devices
    WHERE current_not_after < $now + interval '90 days' AND current_state <> 'revoked'
    ORDER BY current_not_after

``$now`` is the agent's clock (an injected clock in tests), not the database's ``NOW()``.

- **Schema.** Plain numbered SQL files in ``gateway_agent/migrations/postgresql/``, each applied
  in its own transaction and recorded in ``schema_migrations`` (version, name, SHA-256). Agents
  that start together serialise on an advisory lock; a migration file edited after it was
  applied, or a database migrated by a newer agent, is a ``ConfigError`` (the schema only moves
  forward).
- **Location.** ``postgresql://user@host:port/db?schema=name``: ``schema`` (default ``public``)
  is ours, taken off the URL before libpq sees it; everything else is libpq's.
- **Transactions.** Each ``apply_many`` is one transaction; the device row's ``version`` makes a
  concurrent writer fail with ``StateError("stale_state")``, as on SQLite. With a ``fence`` (the
  HA leader's lease, ``gateway_agent.leadership``), the same transaction first checks that the
  lease is still held, so an agent that lost leadership cannot write (``StateError("not_leader")``).
- **Connection.** One connection, used from the agent's event-loop thread, as the SQLite backend
  is; a broken connection is replaced on the next call. Connect and statement timeouts bound
  every call. A connection the server ended (restart, or a session frozen inside a transaction
  past ``idle_in_transaction_session_timeout``) is ``FetchError("inventory_unreachable")``,
  raised in one place (``_reaching``), never a raw driver error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from edge_core.clock import as_utc
from edge_core.dsn import redact
from edge_core.errors import ConfigError, FetchError, StateError
from edge_core.expiry_scan import ExpiryRow
from edge_core.lifecycle import (
    IN_PROGRESS,
    CertState,
    DeviceLifecycle,
    RenewalState,
    Step,
    Transition,
)
from gateway_agent.inventory import (
    _DEVICE_COLUMNS,
    CertRecord,
    _cert_record_from,
    _device_from,
    _expiry_row,
    _transition_from,
    apply_step,
)

__all__ = ["Fence", "Migration", "PostgresInventory", "apply_migrations", "load_migrations", "split_schema"]

_SELECT_DEVICE = sql.SQL("SELECT {} FROM devices").format(sql.SQL(", ").join(map(sql.Identifier, _DEVICE_COLUMNS)))
#: Our transactions are a few statements long; a session idle inside one for this long is stuck.
_IDLE_IN_TX_MS = 2000
#: Driver errors that always mean the connection is gone (see ``PostgresInventory._reaching``).
_CONNECTION_LOST = (psycopg.OperationalError, psycopg.errors.IdleInTransactionSessionTimeout)
#: The migrations' advisory lock key: agents starting together migrate one at a time.
_MIGRATION_LOCK = 0x6564_6765_696E_7600  # "edgeinv\0"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Fence:
    """Writes are allowed only while ``holder`` holds lease ``name`` with ``token`` (unexpired)."""

    name: str
    holder: str
    token: int


def load_migrations(package: str = "gateway_agent.migrations", folder: str = "postgresql") -> list[Migration]:
    """``NNNN_name.sql`` files, in version order; versions must be 1, 2, 3, ... without gaps."""
    found = []
    for entry in resources.files(package).joinpath(folder).iterdir():
        if not entry.name.endswith(".sql"):
            continue
        number, _, rest = entry.name.partition("_")
        if not number.isdigit() or not rest:
            raise ConfigError(f"migration file {entry.name!r} must be named NNNN_name.sql")
        found.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise ConfigError(f"migrations must be numbered 1..n without gaps, found {[m.version for m in found]}")
    return found


def split_schema(url: str) -> tuple[str, str]:
    """``(libpq URL, schema)``: our ``schema`` query parameter taken off the URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"inventory URL {redact(url)!r} is not postgresql://")
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for key, value in query if key == "schema"]
    schema = schemas[-1] if schemas else "public"
    if not schema or len(schema) > 63 or not (schema[0].isalpha() or schema[0] == "_") or not all(
            c.isalnum() or c == "_" for c in schema):
        raise ConfigError(f"inventory schema {schema!r} must be a plain SQL identifier (letters, digits, _)")
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit(parts._replace(query=rest)), schema


def apply_migrations(conn: psycopg.Connection[Any], schema: str, migrations: Sequence[Migration]) -> int:
    """Bring ``schema`` up to the last migration; returns the resulting version."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name VARCHAR(128) NOT NULL, checksum CHAR(64) NOT NULL,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())")
        applied = {int(v): (n, c) for v, n, c in conn.execute(
            "SELECT version, name, checksum FROM schema_migrations ORDER BY version").fetchall()}
    known = {m.version: m for m in migrations}
    newest = max(applied, default=0)
    if newest > len(migrations):
        raise ConfigError(f"inventory schema {schema} is at version {newest}, newer than this agent's "
                          f"{len(migrations)}", hint="upgrade this agent; the schema never moves back")
    for version, (name, checksum) in applied.items():
        if known[version].checksum != checksum.strip():
            raise ConfigError(f"migration {version} ({name}) changed after it was applied to schema {schema}",
                              hint="never edit an applied migration; add a new numbered file instead")
    for migration in migrations:
        if migration.version in applied:
            continue
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
            again = conn.execute("SELECT 1 FROM schema_migrations WHERE version = %s",
                                 (migration.version,)).fetchone()
            if again is not None:  # another agent applied it meanwhile
                continue
            conn.execute(migration.sql.encode("utf-8"))
            conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                         (migration.version, migration.name, migration.checksum))
    return len(migrations)


class PostgresInventory:
    """``Inventory`` on PostgreSQL (see the module docstring). Use as a context manager or ``close()``."""

    def __init__(self, url: str, *, create: bool = True, connect_timeout: float = 5.0,
                 statement_timeout: float = 60.0) -> None:
        self._conninfo, self.schema = split_schema(url)
        self.url = redact(url)
        self._connect_timeout = connect_timeout
        self._statement_timeout = statement_timeout
        self.fence: Fence | None = None
        self._db = self._connect()
        if create:
            self.schema_version = apply_migrations(self._db, self.schema, load_migrations())
        else:
            found = self._db.execute("SELECT to_regclass('schema_migrations')").fetchone()
            if found is None or found[0] is None:
                self.close()
                raise ConfigError(f"no inventory in schema {self.schema} of {self.url}",
                                  hint="start the agent once (it migrates the schema) or check the URL")
            # An inventory an older agent made is brought forward, as SqliteInventory does: the
            # queries of this version read columns the later migrations add.
            self.schema_version = apply_migrations(self._db, self.schema, load_migrations())

    def _connect(self) -> psycopg.Connection[Any]:
        params: dict[str, Any] = {
            "connect_timeout": max(1, round(self._connect_timeout)),
            # A frozen agent (SIGSTOP, a stalled VM) must not keep row locks that block the
            # standby's takeover: the server ends a session left idle inside a transaction.
            "options": f"-c search_path={self.schema} -c statement_timeout={int(self._statement_timeout * 1000)}"
                       f" -c idle_in_transaction_session_timeout={_IDLE_IN_TX_MS} -c TimeZone=UTC",
        }
        if "application_name" not in self._conninfo:
            params["application_name"] = "gateway-agent"
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True, **params)
        except psycopg.OperationalError as exc:
            raise FetchError("inventory_unreachable", f"cannot connect to the inventory {self.url}: {exc}",
                             hint="check lifecycle.inventory and that PostgreSQL is up") from exc
        return conn

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PostgresInventory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------

    def _conn(self) -> psycopg.Connection[Any]:
        if self._db.closed or self._db.broken:
            self._db = self._connect()
        return self._db

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        """The one place a lost connection becomes ``FetchError("inventory_unreachable")``.

        Besides ``OperationalError``, the server reports a session it ended for idling inside a
        transaction as ``IdleInTransactionSessionTimeout`` (an ``InternalError``) on the next
        statement; any driver error that leaves the connection broken means the same.
        """
        try:
            yield
        except psycopg.Error as exc:
            if isinstance(exc, _CONNECTION_LOST) or self._db.broken or self._db.closed:
                raise FetchError("inventory_unreachable", f"inventory {self.url}: {exc}") from exc
            raise

    def _rows(self, query: sql.Composable | str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._reaching():
            return self._conn().execute(query, params).fetchall()  # type: ignore[arg-type]

    def _devices(self, where: str, params: Sequence[Any] = ()) -> list[DeviceLifecycle]:
        return [_device_from(row) for row in self._rows(_SELECT_DEVICE + sql.SQL(" " + where), params)]

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[Any]]:
        with self._reaching():
            conn = self._conn()
            with conn.transaction():
                if self.fence is not None:
                    self._check_fence(conn, self.fence)
                yield conn

    @staticmethod
    def _check_fence(conn: psycopg.Connection[Any], fence: Fence) -> None:
        held = conn.execute(
            "SELECT 1 FROM leader_lease WHERE name = %s AND holder = %s AND token = %s "
            "AND expires_at > clock_timestamp() FOR SHARE",
            (fence.name, fence.holder, fence.token)).fetchone()
        if held is None:
            raise StateError("not_leader", f"lease {fence.name} token {fence.token} is no longer held by "
                             f"{fence.holder}; this agent must not write")

    # -- reads ---------------------------------------------------------------------------

    def get(self, device_id: str) -> DeviceLifecycle | None:
        found = self._devices("WHERE device_id = %s", (device_id,))
        return found[0] if found else None

    def devices(self) -> Iterator[DeviceLifecycle]:
        # A server-side cursor: a million devices stream, they are not loaded at once.
        with self._reaching():
            conn = self._conn()
            with conn.transaction(), conn.cursor(name="devices_all") as cursor:
                cursor.itersize = 5000
                cursor.execute(_SELECT_DEVICE + sql.SQL(" ORDER BY device_id"))
                for row in cursor:
                    yield _device_from(row)

    def count(self) -> int:
        return int(self._rows("SELECT COUNT(*) FROM devices")[0][0])

    def expiring_devices(self, before: datetime) -> list[DeviceLifecycle]:
        return self._devices("WHERE current_not_after < %s AND current_state <> 'revoked' "
                             "ORDER BY current_not_after ASC, device_id ASC", (as_utc(before),))

    def expiring(self, now: datetime, within: timedelta) -> list[ExpiryRow]:
        """The design's query, ``cert_expiry < NOW() + INTERVAL '90 days'``, with the agent's ``now``."""
        now = as_utc(now)
        rows = self._rows(
            "SELECT device_id, current_serial, current_not_after, current_state, renewal_state "
            "FROM devices WHERE current_not_after < %s::timestamptz + %s::interval "
            "AND current_state <> 'revoked' ORDER BY current_not_after ASC, device_id ASC",
            (now, within))
        return [_expiry_row(row, now) for row in rows]

    def overlap_due(self, now: datetime) -> list[DeviceLifecycle]:
        return self._devices("WHERE overlap_until <= %s AND renewal_state = %s ORDER BY overlap_until, device_id",
                             (as_utc(now), RenewalState.OVERLAP.value))

    def in_progress(self) -> list[DeviceLifecycle]:
        states = sorted(state.value for state in IN_PROGRESS)
        return self._devices("WHERE renewal_state = ANY(%s) ORDER BY device_id", (states,))

    def forced_pending(self) -> list[DeviceLifecycle]:
        return self._devices("WHERE renew_forced = 1 AND renewal_state = ANY(%s) ORDER BY next_attempt_at, device_id",
                             ([RenewalState.FAILED.value, RenewalState.ROLLED_BACK.value],))

    def history(self, device_id: str) -> list[Transition]:
        rows = self._rows(
            "SELECT device_id, subject, serial, from_state, to_state, at, cause FROM transitions "
            "WHERE device_id = %s ORDER BY version, seq", (device_id,))
        return [_transition_from(row) for row in rows]

    def _cert_records(self, column: str, value: str) -> list[CertRecord]:
        rows = self._rows(
            sql.SQL("SELECT serial, device_id, pin, not_before, not_after, state, updated_at, revoked_at, "
                    "revoke_reason FROM certificates WHERE {} = %s ORDER BY not_before, serial").format(
                sql.Identifier(column)), (value,))
        return [_cert_record_from(row) for row in rows]

    def certificates(self, device_id: str) -> list[CertRecord]:
        return self._cert_records("device_id", device_id)

    def revoked_certificates(self) -> list[CertRecord]:
        return self._cert_records("state", CertState.REVOKED.value)

    # -- renewal claims (gateway_agent.leadership) -------------------------------------------

    def claim_device(self, device_id: str, fence: Fence, ttl: timedelta) -> bool:
        """Claim ``device_id`` for a renewal under ``fence``: only if unclaimed or its claim expired."""
        with self._reaching():
            conn = self._conn()
            with conn.transaction():
                self._check_fence(conn, fence)
                row = conn.execute(
                    "INSERT INTO renewal_claims (device_id, holder, token, claimed_at, expires_at) "
                    "VALUES (%s, %s, %s, clock_timestamp(), clock_timestamp() + %s) "
                    "ON CONFLICT (device_id) DO UPDATE SET holder = excluded.holder, token = excluded.token, "
                    "claimed_at = excluded.claimed_at, expires_at = excluded.expires_at "
                    "WHERE renewal_claims.expires_at <= clock_timestamp() RETURNING device_id",
                    (device_id, fence.holder, fence.token, ttl)).fetchone()
        return row is not None

    def release_claim(self, device_id: str, holder: str) -> None:
        self._rows("DELETE FROM renewal_claims WHERE device_id = %s AND holder = %s RETURNING device_id",
                   (device_id, holder))

    # -- writes --------------------------------------------------------------------------

    def apply(self, step: Step) -> DeviceLifecycle:
        return self.apply_many([step])[0]

    def apply_many(self, steps: Sequence[Step]) -> list[DeviceLifecycle]:
        """Apply several steps in one transaction: all stored or none."""
        with self._tx() as conn:
            return [self._apply(conn, step) for step in steps]

    def _apply(self, conn: psycopg.Connection[Any], step: Step) -> DeviceLifecycle:
        return apply_step(_PostgresWriter(conn), step)


class _PostgresWriter:
    """``inventory.StepWriter`` on a psycopg connection inside ``PostgresInventory._tx``."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    @staticmethod
    def _query(query: str) -> bytes:
        # apply_step's statements use sqlite3's "?" marks and contain no literal "?" or "%".
        return query.replace("?", "%s").encode("utf-8")

    def insert_device(self, query: str, params: Sequence[Any]) -> None:
        try:
            with self._conn.transaction():  # a savepoint: the error must not poison the outer transaction
                self._conn.execute(self._query(query), params)
        except psycopg.errors.UniqueViolation as exc:
            raise StateError("device_exists", f"device {params[0]} is already in the inventory") from exc

    def execute(self, query: str, params: Sequence[Any]) -> int:
        return self._conn.execute(self._query(query), params).rowcount

    def executemany(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._conn.cursor() as cursor:
            cursor.executemany(self._query(query), rows)
