from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_core.clock import Clock
from edge_runtime.logsetup import reset_logging
from tests.support.broker import BrokerThread, write_settings
from tests.support.pki import DevPki, make_pki


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """CLIs configure structlog globally (to stderr); never let one test's stream leak into the next."""
    yield
    reset_logging()  # also drops the root handler a CLI run installed on this test's captured stderr


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def registry_file(tmp_path: Path, pki: DevPki) -> Path:
    """A per-test copy of the dev registry that the test may edit."""
    path = tmp_path / "registry.yaml"
    shutil.copy(pki.ca.registry_path, path)
    return path


StartBroker = Callable[..., BrokerThread]


@pytest.fixture
def start_broker(tmp_path: Path, pki: DevPki, registry_file: Path) -> Iterator[StartBroker]:
    started: list[BrokerThread] = []

    def start(*, acl: Path | None = None, limits: dict[str, Any] | None = None, clock: Clock | None = None,
              extra: str = "", uvloop: bool = False) -> BrokerThread:
        settings = write_settings(tmp_path, registry=registry_file, chain=pki.chain, server_dir=pki.root,
                                  acl=acl, limits=limits, extra=extra)
        factory = None
        if uvloop:
            import uvloop as uv

            factory = uv.new_event_loop
        broker = BrokerThread(settings, clock=clock, loop_factory=factory).start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL inventory URL with a schema private to this test (dropped afterwards)."""
    from tests.support.stores import pg_schema

    with pg_schema() as url:
        yield url


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A Redis key prefix private to this test (its keys are deleted afterwards)."""
    from tests.support.stores import redis_prefix as prefix

    with prefix() as value:
        yield value
