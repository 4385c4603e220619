"""The inventory on both backends (SQLite file, PostgreSQL schema), registry export, bootstrap
import and the ``certs`` CLI, on real files and the machine's real PostgreSQL."""

from __future__ import annotations

import hashlib
import itertools
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog

from edge_core.clock import ManualClock
from edge_core.errors import StateError
from edge_core.lifecycle import (
    CertRef,
    CertState,
    DeviceLifecycle,
    RenewalPolicy,
    RenewalState,
    Step,
    Transition,
    begin_renewal,
    begin_switch,
    begin_test,
    candidate_issued,
    end_overlap,
    enroll,
    fail_renewal,
    refresh,
    revoke_device,
    switched,
)
from edge_core.registry import DeviceEntry, Registry, parse_registry
from gateway_agent.cli import main as cli_main
from gateway_agent.cli_certs import parse_duration
from gateway_agent.inventory import (
    SCHEMA,
    SqliteInventory,
    export_registry,
    import_from_registry,
    open_inventory,
    write_registry,
)
from gateway_agent.inventory_pg import PostgresInventory, apply_migrations, load_migrations, split_schema
from gateway_agent.pki import init_dev
from tests.agent.conftest import OpenInventory

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
POLICY = RenewalPolicy()
_serials = itertools.count(0xA000_0000_0000_0000_0000_0000_0000_0000_0000_0001)  # 160-bit


def pin(n: int) -> str:
    return "sha256:" + hashlib.sha256(str(n).encode()).hexdigest()


def cert(days_left: float, *, now: datetime = T0, state: CertState = CertState.ACTIVE) -> CertRef:
    serial = next(_serials)
    not_after = now + timedelta(days=days_left)
    return CertRef(serial, pin(serial), not_after - 365 * DAY, not_after, state)


def add(inv: SqliteInventory, device_id: str, days_left: float, now: datetime = T0) -> DeviceLifecycle:
    return inv.apply(enroll(device_id, cert(days_left, now=now), now=now, cause="test"))


def overlap_device(inv: SqliteInventory, device_id: str) -> tuple[DeviceLifecycle, CertRef, CertRef]:
    dev = add(inv, device_id, 60)
    old = dev.current
    dev = inv.apply(begin_renewal(dev, now=T0, cause="due"))
    new = cert(365, state=CertState.ISSUED)
    dev = inv.apply(candidate_issued(dev, new, now=T0))
    dev = inv.apply(begin_test(dev, now=T0))
    dev = inv.apply(begin_switch(dev, now=T0))
    dev = inv.apply(switched(dev, new.serial, now=T0, policy=POLICY))
    return dev, old, new


# --------------------------------------------------------------------------- storage


def test_database_is_wal_with_foreign_keys(tmp_path: Path) -> None:
    with SqliteInventory(tmp_path / "x.db") as inv:
        assert inv._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert inv._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    with SqliteInventory(tmp_path / "x.db") as again:  # reopening keeps the schema
        assert again.count() == 0


def test_round_trip_of_every_field(inv: SqliteInventory, open_inv: OpenInventory) -> None:
    dev = add(inv, "pump-1", 60)
    assert dev.version == 1
    dev = inv.apply(begin_renewal(dev, now=T0, cause="due"))
    new = cert(365, state=CertState.ISSUED)
    dev = inv.apply(candidate_issued(dev, new, now=T0 + timedelta(seconds=1)))
    assert dev.version == 3
    stored = inv.get("pump-1")
    assert stored == dev
    assert stored is not None and stored.candidate == new
    assert new.serial.bit_length() == 160
    other = open_inv()
    assert other.get("pump-1") == dev
    assert inv.get("nobody") is None


def test_every_step_is_recorded_in_history(inv: SqliteInventory) -> None:
    _dev, old, new = overlap_device(inv, "pump-1")
    history = inv.history("pump-1")
    assert [(t.subject, t.from_state, t.to_state) for t in history] == [
        ("cert", None, "active"),
        ("renewal", "idle", "renewal_requested"),
        ("renewal", "renewal_requested", "renewal_issued"),
        ("cert", None, "issued"),
        ("renewal", "renewal_issued", "renewal_testing"),
        ("renewal", "renewal_testing", "renewal_switching"),
        ("renewal", "renewal_switching", "overlap"),
        ("cert", "issued", "active"),
    ]
    assert history[0].serial == old.serial and history[-1].serial == new.serial
    assert all(isinstance(t, Transition) and t.at.tzinfo is not None for t in history)
    certs = {c.serial: c for c in inv.certificates("pump-1")}
    assert certs[old.serial].state is CertState.ACTIVE
    assert certs[new.serial].state is CertState.ACTIVE


def test_state_and_history_change_together_or_not_at_all(inv: SqliteInventory) -> None:
    dev = add(inv, "pump-1", 60)
    good = begin_renewal(dev, now=T0, cause="due")
    ghost = Transition("pump-1", "cert", 12345, "active", "revoked", T0, "bogus")
    bad = Step(good.before, good.after, (*good.transitions, ghost))
    with pytest.raises(StateError) as err:
        inv.apply(bad)
    assert err.value.reason == "illegal_transition"
    assert inv.get("pump-1") == dev
    assert len(inv.history("pump-1")) == 1


def test_concurrent_writer_gets_stale_state(inv: SqliteInventory) -> None:
    dev = add(inv, "pump-1", 60)
    inv.apply(begin_renewal(dev, now=T0, cause="due"))
    with pytest.raises(StateError) as err:
        inv.apply(revoke_device(dev, now=T0, cause="compromised"))  # decided on the old version
    assert err.value.reason == "stale_state"
    assert inv.get("pump-1").renewal is RenewalState.REQUESTED  # type: ignore[union-attr]


def test_second_enrolment_is_refused(inv: SqliteInventory) -> None:
    add(inv, "pump-1", 60)
    with pytest.raises(StateError) as err:
        add(inv, "pump-1", 90)
    assert err.value.reason == "device_exists"


def test_apply_many_is_all_or_nothing(inv: SqliteInventory) -> None:
    steps = [enroll("a", cert(10), now=T0, cause="t"), enroll("a", cert(20), now=T0, cause="t")]
    with pytest.raises(StateError):
        inv.apply_many(steps)
    assert inv.count() == 0


def test_expiring_is_the_design_query_soonest_first(inv: SqliteInventory) -> None:
    for device_id, days in [("far", 200), ("b", 30.5), ("a", 3), ("gone", -4), ("edge", 89.9), ("out", 90)]:
        add(inv, device_id, days)
    revoked = add(inv, "revoked", 1)
    inv.apply(revoke_device(revoked, now=T0, cause="compromised"))
    rows = inv.expiring(T0, 90 * DAY)
    assert [(r.device_id, r.days_left) for r in rows] == [("gone", -4), ("a", 3), ("b", 30), ("edge", 89)]
    assert rows[0].cert_state is CertState.ACTIVE and rows[0].renewal is RenewalState.IDLE
    assert [d.device_id for d in inv.expiring_devices(T0 + 31 * DAY)] == ["gone", "a", "b"]
    if isinstance(inv, SqliteInventory):
        plan = inv._db.execute(
            "EXPLAIN QUERY PLAN SELECT device_id FROM devices WHERE current_not_after < ? "
            "ORDER BY current_not_after", ("x",)).fetchall()
    else:  # the seed's own form of the query; with the table this small, force the planner's hand
        inv._db.execute("SET enable_seqscan = off")
        plan = inv._db.execute(
            "EXPLAIN SELECT device_id FROM devices WHERE current_not_after < NOW() + INTERVAL '90 days' "
            "ORDER BY current_not_after").fetchall()
    assert "devices_by_expiry" in " ".join(str(row) for row in plan)


def test_overlap_and_in_progress_queries(inv: SqliteInventory) -> None:
    overlap_device(inv, "o")
    inv.apply(begin_renewal(add(inv, "r", 50), now=T0, cause="due"))
    add(inv, "idle", 50)
    assert inv.overlap_due(T0 + 6 * DAY) == []
    assert [d.device_id for d in inv.overlap_due(T0 + 7 * DAY)] == ["o"]
    assert [d.device_id for d in inv.in_progress()] == ["r"]


def test_forced_pending_lists_failed_operator_renewals_soonest_retry_first(inv: SqliteInventory,
                                                                          open_inv: OpenInventory) -> None:
    """``certs renew`` that failed stays flagged (``renew_forced``) until a retry succeeds."""
    late = inv.apply(begin_renewal(add(inv, "pump-late", 200), now=T0, cause="forced"))
    soon = inv.apply(begin_renewal(add(inv, "pump-soon", 200), now=T0, cause="forced"))
    due = inv.apply(begin_renewal(add(inv, "pump-due", 20), now=T0, cause="due"))
    for device, wait in ((late, 0.9), (soon, 0.1), (due, 0.5)):
        inv.apply(fail_renewal(device, now=T0, error="device_offline", policy=POLICY, rand=wait))
    pending = inv.forced_pending()
    assert [d.device_id for d in pending] == ["pump-soon", "pump-late"]  # the scheduled renewal is not forced
    assert all(d.forced and d.renewal is RenewalState.FAILED for d in pending)
    assert [d.device_id for d in open_inv().forced_pending()] == ["pump-soon", "pump-late"]  # stored, not cached
    add(inv, "pump-idle", 200)
    assert "pump-idle" not in {d.device_id for d in inv.forced_pending()}


def _downgrade_to_before_renew_forced(url: str) -> None:
    """Make ``url`` an inventory as an agent before ``renew_forced`` left it, with one device."""
    if url.startswith("sqlite:///"):
        with SqliteInventory(url.removeprefix("sqlite:///")) as fresh:
            add(fresh, "pump-old", 40)
        db = sqlite3.connect(url.removeprefix("sqlite:///"))
        db.execute("ALTER TABLE devices DROP COLUMN renew_forced")
        db.execute("UPDATE inventory_meta SET value = '1' WHERE name = 'schema_version'")
        db.commit()
        db.close()
        return
    import psycopg
    from psycopg import sql

    conninfo, schema = split_schema(url)
    before = [m for m in load_migrations() if m.name != "renew_forced"]
    assert len(before) == len(load_migrations()) - 1
    with psycopg.connect(conninfo, autocommit=True) as conn:
        apply_migrations(conn, schema, before)
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        row = _device_row_values(add_step("pump-old", 40))
        conn.execute(sql.SQL("INSERT INTO devices ({}) VALUES ({})").format(
            sql.SQL(", ").join(map(sql.Identifier, row)), sql.SQL(", ").join(sql.Placeholder() * len(row))),
            list(row.values()))


def add_step(device_id: str, days_left: float) -> Step:
    return enroll(device_id, cert(days_left), now=T0, cause="test")


def _device_row_values(step: Step) -> dict[str, object]:
    from gateway_agent.inventory import _DEVICE_COLUMNS, _device_values

    return dict(zip(_DEVICE_COLUMNS[:-1], _device_values(step.after, 1)[:-1], strict=True))


@pytest.mark.parametrize("create", [True, False])
def test_an_older_inventory_is_brought_forward_on_open(tmp_path: Path, create: bool) -> None:
    """Each backend probes its own schema version (``inventory_meta`` found via ``sqlite_master``;
    ``schema_migrations`` via ``to_regclass``) and adds ``renew_forced`` to an older inventory,
    the agent's and the CLI's (``create=False``) opening alike; its devices keep their state."""
    from tests.support.stores import pg_schema

    with pg_schema() as pg:
        for url in (f"sqlite:///{tmp_path / 'old.db'}", pg):
            _downgrade_to_before_renew_forced(url)
            with open_inventory(url, create=create) as inv:
                device = inv.get("pump-old")
                assert device is not None and not device.forced
                assert inv.forced_pending() == []
                started = inv.apply(begin_renewal(device, now=T0, cause="forced"))
                failed = inv.apply(fail_renewal(started, now=T0, error="device_offline", policy=POLICY, rand=0.5))
                assert [d.device_id for d in inv.forced_pending()] == ["pump-old"] and failed.forced
            if isinstance(inv, PostgresInventory):
                assert inv.schema_version == len(load_migrations())


def test_revoked_certificates_feed_the_crl(inv: SqliteInventory) -> None:
    dev, old, _new = overlap_device(inv, "pump-1")
    step = end_overlap(dev, now=T0 + 8 * DAY)
    inv.apply(step)
    (revoked,) = inv.revoked_certificates()
    assert revoked.serial == old.serial and revoked.device_id == "pump-1"
    assert revoked.revoked_at == T0 + 8 * DAY and revoked.revoke_reason == "overlap_ended"
    failed = inv.apply(begin_renewal(add(inv, "v", 50), now=T0, cause="due"))
    failed = inv.apply(candidate_issued(failed, cert(365, state=CertState.ISSUED), now=T0))
    inv.apply(fail_renewal(failed, now=T0, error="device_offline", policy=POLICY, rand=0.5))
    assert {c.revoke_reason for c in inv.revoked_certificates()} == {"overlap_ended", "device_offline"}


def test_refresh_steps_are_stored(inv: SqliteInventory) -> None:
    dev = add(inv, "pump-1", 20)
    dev = inv.apply(refresh(dev, now=T0, policy=POLICY))
    assert dev.current.state is CertState.EXPIRING
    assert inv.certificates("pump-1")[0].state is CertState.EXPIRING


# --------------------------------------------------------------------------- registry export


def _base() -> Registry:
    entries = {
        "pump-1": DeviceEntry("pump-1", (pin(1),), frozenset({"pump"}), {"site": "plant-a"}),
        "valve-2": DeviceEntry("valve-2", (pin(2),), frozenset({"valve"})),
        "manual-3": DeviceEntry("manual-3", (pin(3),), frozenset({"sensor"})),
    }
    return Registry(devices=entries, source="registry.yaml")


def test_export_takes_pins_from_the_inventory(inv: SqliteInventory, tmp_path: Path) -> None:
    dev, old, new = overlap_device(inv, "pump-1")
    valve = add(inv, "valve-2", 50)
    inv.apply(revoke_device(valve, now=T0, cause="compromised"))
    add(inv, "stranger", 50)
    exported = export_registry(inv, _base())
    pump = exported.get("pump-1")
    assert pump is not None and pump.pins == (new.pin, old.pin)
    assert pump.roles == frozenset({"pump"}) and dict(pump.attributes) == {"site": "plant-a"}
    assert exported.get("valve-2").enabled is False  # type: ignore[union-attr]
    assert exported.get("manual-3") == _base().get("manual-3")
    assert exported.get("stranger") is None

    path = tmp_path / "broker" / "registry.yaml"
    written = write_registry(inv, _base(), path)
    parsed = parse_registry(path.read_bytes(), source=str(path))
    assert parsed.devices == written.devices
    assert parsed.digest == written.digest and exported.devices == written.devices
    assert not list(path.parent.glob(".*.tmp"))

    inv.apply(end_overlap(dev, now=T0 + 8 * DAY))
    assert export_registry(inv, _base()).get("pump-1").pins == (new.pin,)  # type: ignore[union-attr]


def test_candidate_is_pinned_while_it_is_tested(inv: SqliteInventory) -> None:
    dev = add(inv, "pump-1", 60)
    dev = inv.apply(begin_renewal(dev, now=T0, cause="due"))
    new = cert(365, state=CertState.ISSUED)
    dev = inv.apply(candidate_issued(dev, new, now=T0))
    assert export_registry(inv, _base()).get("pump-1").pins == (dev.current.pin, new.pin)  # type: ignore[union-attr]
    inv.apply(fail_renewal(dev, now=T0, error="device_offline", policy=POLICY, rand=0.5))
    assert export_registry(inv, _base()).get("pump-1").pins == (dev.current.pin,)  # type: ignore[union-attr]


# --------------------------------------------------------------------------- bootstrap


def test_import_from_dev_pki(tmp_path: Path, inv: SqliteInventory) -> None:
    clock = ManualClock(T0)
    ca = init_dev(tmp_path / "pki", devices=3, clock=clock)
    report = import_from_registry(inv, ca.registry_path, ca.dir / "devices", now=clock.now())
    assert report.enrolled == ("device-001", "device-002", "device-003")
    dev = inv.get("device-002")
    assert dev is not None and dev.current.state is CertState.ACTIVE
    assert dev.current.not_after - dev.current.not_before == timedelta(days=30)
    registry = parse_registry(ca.registry_path.read_bytes())
    assert export_registry(inv, registry).devices == registry.devices

    again = import_from_registry(inv, ca.registry_path, ca.dir / "devices", now=clock.now())
    assert again.enrolled == () and len(again.unchanged) == 3

    ca.issue_device("device-009")  # a certificate nobody registered
    (ca.dir / "devices" / "junk.crt").write_text("not a certificate")
    text = ca.registry_path.read_text().replace(registry.get("device-001").pins[0], pin(7))  # type: ignore[union-attr]
    ca.registry_path.write_text(text)
    inv2 = SqliteInventory(tmp_path / "fresh.db")
    try:
        report = import_from_registry(inv2, ca.registry_path, ca.dir / "devices", now=clock.now())
    finally:
        inv2.close()
    assert report.enrolled == ("device-002", "device-003")
    assert dict(report.skipped) == {
        "device-001": "pin_not_registered", "device-009": "not_in_registry", "junk.crt": "cert_unparseable",
        # registry clients whose certificates live elsewhere are reported, never silently absent
        "alice": "no_certificate", "gateway-agent": "no_certificate",
    }


# --------------------------------------------------------------------------- CLI


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """``cli.main`` configures structlog for the process; undo it so later tests log normally."""
    yield
    structlog.reset_defaults()


def _cli_db(inv_url: str) -> str:
    now = datetime.now(UTC)
    with open_inventory(inv_url) as inv:
        add(inv, "late", 45.5, now=now)
        add(inv, "soon", 3.5, now=now)
        add(inv, "fine", 300, now=now)
    return inv_url


def test_cli_expiring_json(inv_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    db = _cli_db(inv_url)
    assert cli_main(["certs", "expiring", "--within", "90d", "--json", "--db", db]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(row["device_id"], row["days_left"]) for row in lines] == [("soon", 3), ("late", 45)]
    assert cli_main(["certs", "expiring", "--within", "1w", "--json", "--db", db]) == 0
    assert [json.loads(x)["device_id"] for x in capsys.readouterr().out.splitlines()] == ["soon"]


def test_cli_expiring_table_and_history(inv_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    db = _cli_db(inv_url)
    assert cli_main(["certs", "expiring", "--db", db]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["DEVICE", "DAYS", "LEFT"]
    assert [line.split()[0] for line in out[1:]] == ["soon", "late"]
    assert cli_main(["certs", "history", "soon", "--db", db]) == 0
    assert "(new) -> active" in capsys.readouterr().out
    assert cli_main(["certs", "history", "soon", "--json", "--db", db]) == 0
    assert json.loads(capsys.readouterr().out)["to"] == "active"


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["certs", "expiring", "--db", str(tmp_path / "missing.db")]) == 4  # missing input: exit 4
    assert "no inventory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli_main(["certs", "expiring", "--within", "soon"])
    assert exit_.value.code == 2
    assert parse_duration("36h") == timedelta(hours=36) and parse_duration("7") == timedelta(days=7)


def test_schema_is_portable_sql() -> None:
    upper = SCHEMA.upper()
    for sqlite_only in ("AUTOINCREMENT", "WITHOUT ROWID", "BLOB", " REAL", "STRICT", "PRAGMA"):
        assert sqlite_only not in upper
    # PostgreSQL accepts the same statements; sqlite must too.
    db = sqlite3.connect(":memory:")
    db.executescript(SCHEMA)
    db.close()


def test_device_replace_keeps_invariants() -> None:
    dev = enroll("pump-1", cert(10), now=T0, cause="t").after
    with pytest.raises(ValueError, match="candidate"):
        replace(dev, renewal=RenewalState.TESTING)
