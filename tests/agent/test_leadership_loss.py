"""An agent that loses its lease in the middle of renewals (a freeze, a stalled VM) stops there.

Found by freezing an HA leader (``SIGSTOP``) mid-renewal and waking it after the standby took
over (``tests/scale/test_agent_ha.py``): the woken agent went on to store its next step, and
when one renewal failed outside its own handling, its siblings ran on alone after the lead had
ended. These tests pin each of those in memory; the PostgreSQL side (a session the server ended
while frozen) is in ``tests/scale/test_inventory_pg.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from edge_core.lifecycle import RenewalState
from gateway_agent.renewal import TestResult
from tests.agent.conftest import OpenInventory
from tests.agent.test_renewal import DAY, make_world


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as captured:
        yield captured


class _Lease:
    """``RenewalClaims`` of an agent whose lease can run out under it."""

    def __init__(self) -> None:
        self.leading = True

    def claim(self, device_id: str) -> bool:
        return self.leading

    def holds(self, device_id: str) -> bool:
        return self.leading

    def release(self, device_id: str) -> None:
        pass


async def test_a_renewal_whose_lease_ran_out_during_a_device_call_stores_nothing_more(
        tmp_path: Path, open_inv: OpenInventory, logs: list[MutableMapping[str, Any]]) -> None:
    world = make_world(tmp_path, {"pump-1": 30 * DAY}, inventory=open_inv())
    try:
        lease = _Lease()
        world.orchestrator.claims = lease
        real_test = world.channel.request_test

        async def frozen_meanwhile(device_id: str, serial: int) -> TestResult:
            result = await real_test(device_id, serial)
            lease.leading = False  # the agent was frozen while it waited; the standby leads now
            return result

        world.channel.request_test = frozen_meanwhile  # type: ignore[method-assign]
        outcome = await world.orchestrator.renew("pump-1")

        assert outcome.result == "error" and outcome.detail.startswith("not_leader")
        device = world.inventory.get("pump-1")
        assert device is not None and device.renewal is RenewalState.TESTING  # the last step it held
        assert world.channel.calls["request_switch"] == 0
        errors = [e for e in logs if e["event"] == "renewal.error"]
        assert [e.get("reason") for e in errors] == ["not_leader"]
    finally:
        world.inventory.close()


async def test_a_renewal_failing_outside_its_handling_cancels_the_rest_of_the_batch(
        tmp_path: Path, open_inv: OpenInventory) -> None:
    world = make_world(tmp_path, {"pump-1": 30 * DAY, "pump-2": 30 * DAY}, concurrency=2, inventory=open_inv())
    try:
        world.channel.latency = 0.05
        real_csr = world.channel.request_csr
        finished: list[str] = []

        async def broken_for_one(device_id: str, nonce: str) -> bytes:
            if device_id == "pump-1":
                raise RuntimeError("a bug, not a device problem")
            csr = await real_csr(device_id, nonce)
            finished.append(device_id)
            return csr

        world.channel.request_csr = broken_for_one  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            await world.orchestrator.renew_many(["pump-1", "pump-2"])
        await asyncio.sleep(0.2)  # long enough for an orphaned sibling to go on
        assert finished == []  # pump-2 was cancelled with the batch, not left running alone
        assert world.orchestrator.in_flight == 0
    finally:
        world.inventory.close()
