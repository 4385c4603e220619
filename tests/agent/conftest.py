"""Fixtures of the agent tests: the inventory on each backend in turn."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway_agent.inventory import SqliteInventory, open_inventory
from gateway_agent.inventory_pg import PostgresInventory

OpenInventory = Callable[[], SqliteInventory | PostgresInventory]


@pytest.fixture(params=["sqlite", "postgresql"])
def inv_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """This test's inventory URL, on each backend in turn (a SQLite file, a PostgreSQL schema)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'inv.db'}"
        return
    from tests.support.stores import pg_schema

    with pg_schema() as pg:
        yield pg


@pytest.fixture
def open_inv(inv_url: str) -> Iterator[OpenInventory]:
    """Opens (another handle on) this test's inventory; every handle is closed afterwards."""
    opened: list[SqliteInventory | PostgresInventory] = []

    def open_one() -> SqliteInventory | PostgresInventory:
        opened.append(open_inventory(inv_url))
        return opened[-1]

    yield open_one
    for each in opened:
        each.close()


@pytest.fixture
def inv(open_inv: OpenInventory) -> SqliteInventory | PostgresInventory:
    return open_inv()
