"""Fixtures of the agent tests: the inventory on each backend in turn."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway_agent.inventory import SqliteInventory, open_inventory
from gateway_agent.inventory_pg import PostgresInventory

OpenInventory = Callable[[], SqliteInventory | PostgresInventory]


@pytest.fixture(params=["sqlite", "postgresql"])
def open_inv(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenInventory]:
    """Opens (another handle on) this test's inventory, on each backend in turn."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'inv.db'}"
        opened: list[SqliteInventory | PostgresInventory] = []

        def open_sqlite() -> SqliteInventory | PostgresInventory:
            opened.append(open_inventory(url))
            return opened[-1]

        yield open_sqlite
    else:
        from tests.support.stores import pg_schema

        with pg_schema() as pg:
            opened = []

            def open_pg() -> SqliteInventory | PostgresInventory:
                opened.append(open_inventory(pg))
                return opened[-1]

            yield open_pg
            for each in opened:
                each.close()
            return
    for each in opened:
        each.close()


@pytest.fixture
def inv(open_inv: OpenInventory) -> SqliteInventory | PostgresInventory:
    return open_inv()
