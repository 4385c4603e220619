"""The certificate inventory: one store for every device's certificates and lifecycle history.

``Inventory`` is the storage interface the renewal orchestrator and the CLI use;
``SqliteInventory`` implements it with the standard library's ``sqlite3`` (WAL, foreign keys).
The lifecycle decisions themselves live in ``edge_core.lifecycle``; this module only stores
``Step`` results, each state change together with its transition records in one transaction.

The broker's pin registry is fed from here (``export_registry`` / ``write_registry``): the
inventory decides which pins a device may use (current, plus candidate or retiring during a
renewal; never more than two), the admin's registry keeps deciding roles, attributes and
whether a device is admitted at all.

Schema notes (portable SQL; the same statements run on PostgreSQL):

- timestamps are ISO-8601 UTC text of fixed width (``2025-01-31T12:00:00.000000+00:00``), so
  text order is time order and the expiry index serves range scans. PostgreSQL: declare them
  ``timestamptz`` and bind ``datetime`` values directly; nothing else changes.
- serials are lowercase hex text (X.509 serials reach 159 bits, past any integer column).
- the transition history is keyed by ``(device_id, version, seq)``: ``version`` is the device row's
  optimistic-concurrency counter, so no auto-increment (SQLite ``AUTOINCREMENT`` vs PostgreSQL
  identity columns) is needed.
- upserts use ``INSERT ... ON CONFLICT (...) DO UPDATE``, which both databases accept.
- SQLite's ``BEGIN IMMEDIATE`` becomes ``BEGIN`` plus the ``version`` check in PostgreSQL; the
  check already makes a concurrent writer fail with ``StateError("stale_state")`` instead of
  overwriting.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from edge_core.clock import as_utc
from edge_core.errors import ConfigError, CredentialError, StateError
from edge_core.expiry_scan import ExpiryRow
from edge_core.files import atomic_write_text
from edge_core.identity import IdentityPolicy
from edge_core.lifecycle import (
    IN_PROGRESS,
    CertRef,
    CertState,
    DeviceLifecycle,
    RenewalState,
    Step,
    Transition,
    enroll,
    revoke_certificate,
)
from edge_core.registry import DeviceEntry, Registry, dump_registry, parse_registry
from edge_core.registry_edit import apply_entries
from gateway_agent.pki import load_cert

if TYPE_CHECKING:
    from gateway_agent.inventory_pg import PostgresInventory

__all__ = [
    "SCHEMA",
    "CertRecord",
    "ImportReport",
    "Inventory",
    "Reconciler",
    "SqliteInventory",
    "StepWriter",
    "apply_revocations",
    "apply_step",
    "export_registry",
    "import_from_registry",
    "iter_chunks",
    "open_inventory",
    "unlisted_revocations",
    "write_registry",
]

SCHEMA_VERSION = 2
#: Statements that bring an older schema to ``SCHEMA_VERSION`` (portable SQL), by the version they leave.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE devices ADD COLUMN renew_forced INTEGER NOT NULL DEFAULT 0",),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS inventory_meta (
    name  VARCHAR(64) PRIMARY KEY,
    value VARCHAR(256) NOT NULL
);

CREATE TABLE IF NOT EXISTS devices (
    device_id              VARCHAR(128) PRIMARY KEY,
    current_serial         VARCHAR(64)  NOT NULL,
    current_pin            VARCHAR(71)  NOT NULL,
    current_not_before     VARCHAR(32)  NOT NULL,
    current_not_after      VARCHAR(32)  NOT NULL,
    current_state          VARCHAR(16)  NOT NULL,
    candidate_serial       VARCHAR(64),
    candidate_pin          VARCHAR(71),
    candidate_not_before   VARCHAR(32),
    candidate_not_after    VARCHAR(32),
    candidate_state        VARCHAR(16),
    retiring_serial        VARCHAR(64),
    retiring_pin           VARCHAR(71),
    retiring_not_before    VARCHAR(32),
    retiring_not_after     VARCHAR(32),
    retiring_state         VARCHAR(16),
    renewal_state          VARCHAR(24)  NOT NULL,
    renewal_since          VARCHAR(32),
    attempts               INTEGER      NOT NULL DEFAULT 0,
    next_attempt_at        VARCHAR(32),
    overlap_until          VARCHAR(32),
    last_error             VARCHAR(512),
    version                INTEGER      NOT NULL,
    renew_forced           INTEGER      NOT NULL DEFAULT 0,
    CHECK (attempts >= 0),
    CHECK (version >= 1)
);
-- The daily scan: WHERE current_not_after < :horizon ORDER BY current_not_after.
CREATE INDEX IF NOT EXISTS devices_by_expiry ON devices (current_not_after);
CREATE INDEX IF NOT EXISTS devices_by_overlap_end ON devices (overlap_until);
CREATE INDEX IF NOT EXISTS devices_by_renewal_state ON devices (renewal_state);

CREATE TABLE IF NOT EXISTS certificates (
    serial         VARCHAR(64)  PRIMARY KEY,
    device_id      VARCHAR(128) NOT NULL REFERENCES devices (device_id),
    pin            VARCHAR(71)  NOT NULL,
    not_before     VARCHAR(32)  NOT NULL,
    not_after      VARCHAR(32)  NOT NULL,
    state          VARCHAR(16)  NOT NULL,
    updated_at     VARCHAR(32)  NOT NULL,
    revoked_at     VARCHAR(32),
    revoke_reason  VARCHAR(512)
);
CREATE INDEX IF NOT EXISTS certificates_by_device ON certificates (device_id);
CREATE INDEX IF NOT EXISTS certificates_by_state ON certificates (state);

CREATE TABLE IF NOT EXISTS transitions (
    device_id   VARCHAR(128) NOT NULL REFERENCES devices (device_id),
    version     INTEGER      NOT NULL,
    seq         INTEGER      NOT NULL,
    subject     VARCHAR(16)  NOT NULL,
    serial      VARCHAR(64),
    from_state  VARCHAR(24),
    to_state    VARCHAR(24)  NOT NULL,
    at          VARCHAR(32)  NOT NULL,
    cause       VARCHAR(512) NOT NULL,
    PRIMARY KEY (device_id, version, seq)
);
"""

_SLOTS = ("current", "candidate", "retiring")
_DEVICE_COLUMNS = (
    ["device_id"]
    + [f"{slot}_{part}" for slot in _SLOTS for part in ("serial", "pin", "not_before", "not_after", "state")]
    + ["renewal_state", "renewal_since", "attempts", "next_attempt_at", "overlap_until", "last_error",
       "version", "renew_forced"]
)
_SELECT_DEVICE = f"SELECT {', '.join(_DEVICE_COLUMNS)} FROM devices"  # noqa: S608 - fixed column list


@dataclass(frozen=True)
class CertRecord:
    """A row of the certificates table: every certificate any device ever held."""

    serial: int
    device_id: str
    pin: str
    not_before: datetime
    not_after: datetime
    state: CertState
    updated_at: datetime
    revoked_at: datetime | None
    revoke_reason: str | None


class Inventory(Protocol):
    """Where lifecycle state lives. Every write is a ``Step`` applied atomically."""

    def get(self, device_id: str) -> DeviceLifecycle | None: ...

    def devices(self) -> Iterator[DeviceLifecycle]: ...

    def count(self) -> int: ...

    def apply(self, step: Step) -> DeviceLifecycle:
        """Store ``step.after`` and its transitions in one transaction; returns the stored device
        (with its new ``version``). Raises ``StateError("stale_state")`` if the device changed
        since ``step.before`` was read, ``StateError("device_exists")`` on a second enrolment."""
        ...

    def apply_many(self, steps: Sequence[Step]) -> list[DeviceLifecycle]: ...

    def expiring_devices(self, before: datetime) -> list[DeviceLifecycle]:
        """Non-revoked devices whose current certificate expires before ``before``, soonest first."""
        ...

    def expiring(self, now: datetime, within: timedelta) -> list[ExpiryRow]: ...

    def overlap_due(self, now: datetime) -> list[DeviceLifecycle]: ...

    def in_progress(self) -> list[DeviceLifecycle]: ...

    def forced_pending(self) -> list[DeviceLifecycle]:
        """Devices with an operator's renewal that failed and waits for its retry."""
        ...

    def history(self, device_id: str) -> list[Transition]: ...

    def certificates(self, device_id: str) -> list[CertRecord]: ...

    def revoked_certificates(self) -> list[CertRecord]: ...


# --------------------------------------------------------------------------- conversions


def _ts(value: datetime) -> str:
    return as_utc(value).isoformat(timespec="microseconds")


def _opt_ts(value: datetime | None) -> str | None:
    return None if value is None else _ts(value)


def _dt(value: str | datetime) -> datetime:
    # SQLite hands back ISO text; PostgreSQL (timestamptz) a datetime already.
    if isinstance(value, datetime):
        return as_utc(value)
    return datetime.fromisoformat(value).astimezone(UTC)


def _opt_dt(value: str | datetime | None) -> datetime | None:
    return None if value is None else _dt(value)


def _serial(value: int) -> str:
    return f"{value:x}"


def _cert_columns(cert: CertRef | None) -> list[Any]:
    if cert is None:
        return [None] * 5
    return [_serial(cert.serial), cert.pin, _ts(cert.not_before), _ts(cert.not_after), cert.state.value]


def _cert_from(row: Sequence[Any], start: int) -> CertRef | None:
    serial, pin, not_before, not_after, state = row[start:start + 5]
    if serial is None:
        return None
    return CertRef(int(serial, 16), pin, _dt(not_before), _dt(not_after), CertState(state))


def _device_from(row: Sequence[Any]) -> DeviceLifecycle:
    current = _cert_from(row, 1)
    if current is None:  # the columns are NOT NULL; this only guards a hand-edited database
        raise StateError("corrupt_row", f"device {row[0]} has no current certificate")
    return DeviceLifecycle(
        device_id=row[0], current=current, candidate=_cert_from(row, 6), retiring=_cert_from(row, 11),
        renewal=RenewalState(row[16]), renewal_since=_opt_dt(row[17]), attempts=row[18],
        next_attempt_at=_opt_dt(row[19]), overlap_until=_opt_dt(row[20]), last_error=row[21],
        version=row[22], forced=bool(row[23]),
    )


def _device_values(device: DeviceLifecycle, version: int) -> list[Any]:
    return [
        device.device_id,
        *_cert_columns(device.current),
        *_cert_columns(device.candidate),
        *_cert_columns(device.retiring),
        device.renewal.value,
        _opt_ts(device.renewal_since),
        device.attempts,
        _opt_ts(device.next_attempt_at),
        _opt_ts(device.overlap_until),
        device.last_error,
        version,
        1 if device.forced else 0,
    ]


def _expiry_row(row: Sequence[Any], now: datetime) -> ExpiryRow:
    """``device_id, current_serial, current_not_after, current_state, renewal_state`` as a report row."""
    device_id, serial, not_after, state, renewal = row
    expiry = _dt(not_after)
    return ExpiryRow(device_id, int(serial, 16), expiry, (expiry - now) // timedelta(days=1), CertState(state),
                     RenewalState(renewal))


def _transition_from(row: Sequence[Any]) -> Transition:
    """``device_id, subject, serial, from_state, to_state, at, cause`` of the transitions table."""
    device_id, subject, serial, src, dst, at, cause = row
    return Transition(device_id, subject, None if serial is None else int(serial, 16), src, dst, _dt(at), cause)


def _cert_record_from(row: Sequence[Any]) -> CertRecord:
    """``serial, device_id, pin, not_before, not_after, state, updated_at, revoked_at, revoke_reason``."""
    serial, device_id, pin, nb, na, state, updated, revoked, why = row
    return CertRecord(int(serial, 16), device_id, pin, _dt(nb), _dt(na), CertState(state), _dt(updated),
                      _opt_dt(revoked), why)


# --------------------------------------------------------------------------- SQLite


class SqliteInventory:
    """``Inventory`` on a SQLite file. Use as a context manager or call ``close()``.

    The connection is used from one thread (the agent's event loop); each ``apply`` is a short
    ``BEGIN IMMEDIATE`` transaction, so a second process (the CLI) can read concurrently (WAL).
    """

    def __init__(self, path: Path | str, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise ConfigError(f"no inventory at {self.path}",
                              hint="pass --db with the agent's inventory file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        with self._tx():
            existing = self._db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'inventory_meta'").fetchone()
            found = None if existing is None else self._db.execute(
                "SELECT value FROM inventory_meta WHERE name = 'schema_version'").fetchone()
            if found is not None and found[0].isdigit() and int(found[0]) < SCHEMA_VERSION:
                for version in range(int(found[0]) + 1, SCHEMA_VERSION + 1):
                    for statement in MIGRATIONS.get(version, ()):
                        self._db.execute(statement)
                self._db.execute("UPDATE inventory_meta SET value = ? WHERE name = 'schema_version'",
                                 (str(SCHEMA_VERSION),))
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(
                "INSERT INTO inventory_meta (name, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (name) DO NOTHING", (str(SCHEMA_VERSION),))
        found = self._db.execute("SELECT value FROM inventory_meta WHERE name = 'schema_version'").fetchone()
        if found is None or int(found[0]) != SCHEMA_VERSION:
            raise ConfigError(f"inventory schema {found[0] if found else '?'} is not {SCHEMA_VERSION}",
                              source=str(self.path))

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SqliteInventory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # reads -----------------------------------------------------------------
    def get(self, device_id: str) -> DeviceLifecycle | None:
        row = self._db.execute(f"{_SELECT_DEVICE} WHERE device_id = ?", (device_id,)).fetchone()
        return None if row is None else _device_from(row)

    def devices(self) -> Iterator[DeviceLifecycle]:
        for row in self._db.execute(f"{_SELECT_DEVICE} ORDER BY device_id"):
            yield _device_from(row)

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM devices").fetchone()[0])

    def expiring_devices(self, before: datetime) -> list[DeviceLifecycle]:
        rows = self._db.execute(
            f"{_SELECT_DEVICE} WHERE current_not_after < ? AND current_state <> 'revoked' "
            "ORDER BY current_not_after ASC, device_id ASC",
            (_ts(before),),
        )
        return [_device_from(row) for row in rows]

    def expiring(self, now: datetime, within: timedelta) -> list[ExpiryRow]:
        """The design's query: ``WHERE cert_expiry < :now + 90 days ORDER BY cert_expiry ASC``."""
        now = as_utc(now)
        rows = self._db.execute(
            "SELECT device_id, current_serial, current_not_after, current_state, renewal_state "
            "FROM devices WHERE current_not_after < ? AND current_state <> 'revoked' "
            "ORDER BY current_not_after ASC, device_id ASC",
            (_ts(now + within),),
        )
        return [_expiry_row(row, now) for row in rows]

    def overlap_due(self, now: datetime) -> list[DeviceLifecycle]:
        rows = self._db.execute(
            f"{_SELECT_DEVICE} WHERE overlap_until <= ? AND renewal_state = ? "
            "ORDER BY overlap_until, device_id",
            (_ts(now), RenewalState.OVERLAP.value),
        )
        return [_device_from(row) for row in rows]

    def in_progress(self) -> list[DeviceLifecycle]:
        states = tuple(sorted(state.value for state in IN_PROGRESS))
        marks = ", ".join("?" * len(states))
        rows = self._db.execute(f"{_SELECT_DEVICE} WHERE renewal_state IN ({marks}) ORDER BY device_id",
                                states)
        return [_device_from(row) for row in rows]

    def forced_pending(self) -> list[DeviceLifecycle]:
        rows = self._db.execute(f"{_SELECT_DEVICE} WHERE renew_forced = 1 AND renewal_state IN (?, ?) "
                                "ORDER BY next_attempt_at, device_id",
                                (RenewalState.FAILED.value, RenewalState.ROLLED_BACK.value))
        return [_device_from(row) for row in rows]

    def history(self, device_id: str) -> list[Transition]:
        rows = self._db.execute(
            "SELECT device_id, subject, serial, from_state, to_state, at, cause FROM transitions "
            "WHERE device_id = ? ORDER BY version, seq",
            (device_id,),
        )
        return [_transition_from(row) for row in rows]

    def _cert_records(self, where: str, params: tuple[Any, ...]) -> list[CertRecord]:
        rows = self._db.execute(
            "SELECT serial, device_id, pin, not_before, not_after, state, updated_at, revoked_at, "  # noqa: S608
            f"revoke_reason FROM certificates WHERE {where} ORDER BY not_before, serial",
            params,
        )
        return [_cert_record_from(row) for row in rows]

    def certificates(self, device_id: str) -> list[CertRecord]:
        return self._cert_records("device_id = ?", (device_id,))

    def revoked_certificates(self) -> list[CertRecord]:
        """What the next CRL must list (the CRL builder reads this)."""
        return self._cert_records("state = ?", (CertState.REVOKED.value,))

    # writes ----------------------------------------------------------------
    def apply(self, step: Step) -> DeviceLifecycle:
        return self.apply_many([step])[0]

    def apply_many(self, steps: Sequence[Step]) -> list[DeviceLifecycle]:
        """Apply several steps in one transaction: all stored or none (bulk import, benchmarks)."""
        stored = []
        with self._tx() as db:
            for step in steps:
                stored.append(self._apply(db, step))
        return stored

    def _apply(self, db: sqlite3.Connection, step: Step) -> DeviceLifecycle:
        return apply_step(_SqliteWriter(db), step)


class _SqliteWriter:
    """``StepWriter`` on a sqlite3 connection inside ``SqliteInventory._tx``."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def insert_device(self, query: str, params: Sequence[Any]) -> None:
        try:
            self._db.execute(query, params)
        except sqlite3.IntegrityError as exc:
            raise StateError("device_exists", f"device {params[0]} is already in the inventory") from exc

    def execute(self, query: str, params: Sequence[Any]) -> int:
        return self._db.execute(query, params).rowcount

    def executemany(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        self._db.executemany(query, rows)


# --------------------------------------------------------------------------- one write path, two backends


class StepWriter(Protocol):
    """The statements ``apply_step`` runs, inside one backend's open transaction.

    Queries use ``?`` placeholders and bind timestamps as ISO-8601 text (``_ts``), which both
    SQLite (text columns) and PostgreSQL (``timestamptz`` columns) take as they are.
    """

    def insert_device(self, query: str, params: Sequence[Any]) -> None:
        """Insert a new device row; ``StateError("device_exists")`` if the id is taken."""
        ...

    def execute(self, query: str, params: Sequence[Any]) -> int:
        """Run one statement; the number of rows it changed."""
        ...

    def executemany(self, query: str, rows: Sequence[Sequence[Any]]) -> None: ...


_INSERT_DEVICE = (f"INSERT INTO devices ({', '.join(_DEVICE_COLUMNS)}) "  # noqa: S608 - fixed column list
                  f"VALUES ({', '.join('?' * len(_DEVICE_COLUMNS))})")
_UPDATE_DEVICE = (f"UPDATE devices SET {', '.join(f'{col} = ?' for col in _DEVICE_COLUMNS[1:])} "  # noqa: S608
                  "WHERE device_id = ? AND version = ?")
_UPSERT_CERTIFICATE = (
    "INSERT INTO certificates (serial, device_id, pin, not_before, not_after, state, updated_at, "
    "revoked_at, revoke_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (serial) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at, "
    "revoked_at = COALESCE(certificates.revoked_at, excluded.revoked_at), "
    "revoke_reason = COALESCE(certificates.revoke_reason, excluded.revoke_reason)")
_INSERT_TRANSITION = ("INSERT INTO transitions (device_id, version, seq, subject, serial, from_state, to_state, "
                      "at, cause) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")


def apply_step(db: StepWriter, step: Step) -> DeviceLifecycle:
    """Store one ``Step`` (device row, touched certificates, transitions); the device as stored.

    The one write path of every backend. The device row's ``version`` guards against a
    concurrent writer: a step computed from an older read fails with ``StateError("stale_state")``.
    """
    after = step.after
    if step.before is None:
        version = 1
        db.insert_device(_INSERT_DEVICE, _device_values(after, version))
    else:
        if step.before.device_id != after.device_id:
            raise StateError("illegal_transition", "a step must not change the device id")
        version = step.before.version + 1
        changed_rows = db.execute(_UPDATE_DEVICE, [*_device_values(after, version)[1:], after.device_id,
                                                   step.before.version])
        if changed_rows != 1:
            raise StateError("stale_state", f"device {after.device_id} changed since it was read "
                             f"(version {step.before.version}); read it again and redo the decision")
    # Only certificates a transition touched are written: new ones and changed states.
    changed = {t.serial: t for t in step.transitions if t.subject == "cert" and t.serial is not None}
    held = {c.serial: c for c in (after.current, after.candidate, after.retiring, *step.revoke) if c is not None}
    for serial, record in changed.items():
        cert = held.get(serial)
        if cert is None:
            raise StateError("illegal_transition", f"device {after.device_id}: transition names "
                             f"certificate {serial:x}, which the step does not hold")
        revoked = cert.state is CertState.REVOKED
        db.execute(_UPSERT_CERTIFICATE,
                   (_serial(cert.serial), after.device_id, cert.pin, _ts(cert.not_before), _ts(cert.not_after),
                    cert.state.value, _ts(record.at), _ts(record.at) if revoked else None,
                    record.cause if revoked else None))
    if step.transitions:
        db.executemany(_INSERT_TRANSITION,
                       [(t.device_id, version, seq, t.subject, None if t.serial is None else _serial(t.serial),
                         t.from_state, t.to_state, _ts(t.at), t.cause[:512])
                        for seq, t in enumerate(step.transitions)])
    return replace(after, version=version)


# --------------------------------------------------------------------------- backend selection


def open_inventory(url: str, *, create: bool = True) -> SqliteInventory | PostgresInventory:
    """The inventory at ``url``: ``sqlite:///<path>`` (or a plain path) or ``postgresql://...``.

    ``sqlite:///var/inv.db`` is relative, ``sqlite:////var/lib/edge/inv.db`` absolute (three
    slashes, then the path). PostgreSQL URLs are libpq's plus ``?schema=<name>``
    (``gateway_agent.inventory_pg``).
    """
    if url.startswith(("postgresql://", "postgres://")):
        from gateway_agent.inventory_pg import PostgresInventory

        return PostgresInventory(url, create=create)
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///") or url == "sqlite:///":
            raise ConfigError(f"inventory URL {url!r} must be sqlite:///<path>")
        return SqliteInventory(url.removeprefix("sqlite:///"), create=create)
    if "://" in url:
        raise ConfigError(f"inventory URL {url.split('://', maxsplit=1)[0]}:// is not supported",
                          hint="use sqlite:///<path> or postgresql://user@host/db")
    return SqliteInventory(url, create=create)


# --------------------------------------------------------------------------- registry export


def export_registry(inventory: Inventory, base: Registry) -> Registry:
    """The broker registry with every pin taken from the inventory.

    ``base`` (the admin's registry) keeps deciding who is admitted, with which roles and
    attributes; for every device the inventory knows, its pins are replaced by the inventory's
    (current, plus candidate or retiring during a renewal). A device whose certificate is revoked
    stays listed but ``enabled: false``. Devices absent from the inventory keep their base entry;
    inventory devices absent from ``base`` are not added (admission is the admin's decision).
    """
    known = {d.device_id: d for d in inventory.devices()}
    entries: dict[str, DeviceEntry] = {}
    for device_id, entry in base.devices.items():
        device = known.get(device_id)
        if device is None:
            entries[device_id] = entry
            continue
        revoked = device.current.state is CertState.REVOKED
        entries[device_id] = replace(entry, pins=device.pins(), enabled=entry.enabled and not revoked)
    # No digest yet: like parse_registry's, it is the hash of the file bytes (see write_registry).
    return Registry(devices=MappingProxyType(entries), source=base.source)


def write_registry(inventory: Inventory, base: Registry, path: Path | str) -> Registry:
    """Export and write atomically (temp file + ``os.replace``); the broker's reload picks it up.

    Returns the registry as written, with the digest ``parse_registry`` will compute for the file.
    """
    registry = export_registry(inventory, base)
    target = Path(path)
    try:
        current = target.read_text("utf-8")
    except FileNotFoundError:
        current = ""
    if current:
        # Round-trip: only the entries whose pins or enabled flag changed are touched; comments stay.
        changed = {d: e for d, e in registry.devices.items() if base.devices.get(d) != e}
        if not changed and base.digest == hashlib.sha256(current.encode("utf-8")).hexdigest():
            return replace(registry, source=str(path), digest=base.digest)
        text = apply_entries(current, changed, source=str(target))
    else:
        text = dump_registry(registry)
    atomic_write_text(path, text)
    return replace(registry, source=str(path), digest=hashlib.sha256(text.encode("utf-8")).hexdigest())


# --------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class ImportReport:
    enrolled: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = field(default=())  # (file or device, why)


def _cert_files(sources: Path | str | Sequence[Path | str]) -> list[Path]:
    paths = [sources] if isinstance(sources, str | Path) else list(sources)
    found: list[Path] = []
    for source in map(Path, paths):
        if source.is_dir():
            found.extend(sorted(source.glob("*.crt")) + sorted(source.glob("*.pem")))
        elif source.is_file():
            found.append(source)
    return found


def import_from_registry(
    inventory: Inventory,
    registry_path: Path | str,
    certs: Path | str | Sequence[Path | str],
    *,
    now: datetime,
    identity_policy: IdentityPolicy | None = None,
    overlap: timedelta = timedelta(days=7),
) -> ImportReport:
    """Enrol every registry device that the inventory does not know yet, from certificate files.

    ``certs`` is a directory (``devices/*.crt``, the CA's ``issued/`` ledger), a file, or several.
    A certificate counts only if its identity is in the registry and its pin is one of the
    device's registered pins; the others are skipped with the reason. A device may hold
    several (mid-rotation): the newest becomes current, the one before it stays pinned as
    retiring for ``overlap``, so no registered pin is lost on the agent's first registry write.
    Devices already in the inventory are left alone, so this runs on every scan (reconcile).
    Registry devices with no usable certificate are reported as ``no_certificate``.
    """
    policy = identity_policy or IdentityPolicy()
    now = as_utc(now)
    reg_path = Path(registry_path)
    registry = parse_registry(reg_path.read_bytes(), source=str(reg_path))
    enrolled: list[str] = []
    unchanged: list[str] = []
    skipped: list[tuple[str, str]] = []
    by_device: dict[str, dict[int, tuple[CertRef, str]]] = {}
    unpinned: set[str] = set()
    missing = {d for d in registry.devices if inventory.get(d) is None}
    if not missing:  # the common case on a daily reconcile: nothing to read
        return ImportReport((), tuple(sorted(registry.devices)), ())
    for crt in _cert_files(certs):
        try:
            cert = load_cert(crt)
            identity = policy.extract(cert)
        except CredentialError as exc:
            skipped.append((crt.name, exc.reason))
            continue
        entry = registry.get(identity)
        if entry is None:
            skipped.append((identity, "not_in_registry"))
            continue
        ref = CertRef.from_certificate(cert, CertState.ACTIVE)
        if not entry.pinned(ref.pin):
            unpinned.add(identity)  # an older certificate of the device, or not yet registered
            continue
        by_device.setdefault(identity, {})[ref.serial] = (ref, crt.name)
    steps: list[Step] = []
    for identity in sorted(registry.devices):
        held = by_device.get(identity)
        existing = inventory.get(identity)
        if existing is not None:
            unchanged.append(identity)
            continue
        if not held:
            if registry.devices[identity].enabled:
                skipped.append((identity, "pin_not_registered" if identity in unpinned else "no_certificate"))
            continue
        newest = sorted(held.values(), key=lambda item: (item[0].not_before, item[0].serial), reverse=True)
        current, name = newest[0]
        if now >= current.not_after:
            current = replace(current, state=CertState.EXPIRED)
        retiring = newest[1][0] if len(newest) > 1 else None
        steps.append(enroll(identity, current, now=now, cause=f"import:{name}", retiring=retiring,
                            overlap_until=None if retiring is None else now + overlap))
        enrolled.append(identity)
        skipped.extend((identity, "too_many_certificates") for _ in newest[2:])
    inventory.apply_many(steps)
    return ImportReport(tuple(enrolled), tuple(unchanged), tuple(skipped))


class _CrlReasons(Mapping[int, str]):
    """A CRL's serial set seen as serial -> "crl" (the reason is in the CRL, not needed here)."""

    def __init__(self, serials: AbstractSet[int]) -> None:
        self._serials = serials

    def __getitem__(self, serial: int) -> str:
        if serial not in self._serials:
            raise KeyError(serial)
        return "crl"

    def __iter__(self) -> Iterator[int]:
        return iter(self._serials)

    def __len__(self) -> int:
        return len(self._serials)

    def __contains__(self, serial: object) -> bool:
        return serial in self._serials


class Reconciler:
    """``import_from_registry`` on every scan, skipped while neither the registry nor the
    certificate files changed (registry clients without a certificate here, such as
    operators, would otherwise make every scan read every certificate again)."""

    def __init__(self, inventory: Inventory, registry_path: Path, certs: Sequence[Path], *,
                 overlap: timedelta = timedelta(days=7)) -> None:
        self.inventory = inventory
        self.registry_path = Path(registry_path)
        self.certs = [Path(p) for p in certs]
        self.overlap = overlap
        self._seen: tuple[str, tuple[str, ...]] | None = None

    def __call__(self, now: datetime) -> ImportReport:
        files = tuple(sorted(str(p) for p in _cert_files(self.certs)))
        key = (hashlib.sha256(self.registry_path.read_bytes()).hexdigest(), files)
        if key == self._seen:
            return ImportReport()
        report = import_from_registry(self.inventory, self.registry_path, self.certs, now=now, overlap=self.overlap)
        self._seen = key
        return report


def apply_revocations(inventory: Inventory, revoked: Mapping[int, str] | AbstractSet[int], *,
                      now: datetime) -> list[str]:
    """Record the CA's revocations in the inventory; returns the devices changed.

    ``revoked`` maps serial -> reason (the CA's revocation store) or is a set of serials
    (an accepted CRL's entries). So a device revoked at the CA is REVOKED here too: it
    leaves ``certs expiring`` and is never renewed again.
    """
    if not isinstance(revoked, Mapping):
        serials = revoked
        revoked = _CrlReasons(serials)
    changed: list[str] = []
    if not revoked:
        return changed
    for found in list(inventory.devices()):
        device: DeviceLifecycle | None = found
        while device is not None:
            hit = next((c for c in (device.current, device.candidate, device.retiring)
                        if c is not None and c.state is not CertState.REVOKED and c.serial in revoked), None)
            if hit is None:
                break
            step = revoke_certificate(device, hit.serial, now=now, cause=f"ca_revoked:{revoked[hit.serial]}")
            device = inventory.apply(step) if step.transitions else None
            if device is not None and device.device_id not in changed:
                changed.append(device.device_id)
    return changed


def unlisted_revocations(inventory: Inventory, listed: Container[int], *, now: datetime,
                         devices: Iterable[str] | None = None) -> list[CertRecord]:
    """Unexpired certificates the inventory holds REVOKED that the CA's list lacks (of ``devices``,
    or of all). A device revoked by its current certificate is revoked whole here, its retiring
    and candidate certificates too; the CA must list those as well, or the CRL that brokers and
    the MCU validation service read would still call them good."""
    records = (inventory.revoked_certificates() if devices is None
               else [r for d in devices for r in inventory.certificates(d) if r.state is CertState.REVOKED])
    return [r for r in records if r.serial not in listed and r.not_after > now]


def iter_chunks(items: Iterable[Step], size: int) -> Iterator[list[Step]]:
    """Group steps for ``apply_many`` so one bulk load is a handful of transactions."""
    chunk: list[Step] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
