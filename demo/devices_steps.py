"""Demo steps: onboard a new device with one command, then revoke it; CA, registry, inventory agree.

Called once from ``demo/demo.py``; the demo's own helpers (run a CLI, narrate, connect,
read the broker's refusals) are handed in, so this module holds only the story.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DemoKit:
    run: Callable[..., str]
    step: Callable[[str], None]
    say: Callable[[str], None]
    try_connect: Callable[[Any], Awaitable[str]]
    device_config: Callable[..., Any]
    wait_for_refusal: Callable[[str, int, float], dict[str, Any]]
    count: Callable[[str], int]


async def devices_section(kit: DemoKit, agent: subprocess.Popen[str], agent_config: Path, ca_dir: Path) -> None:
    kit.step("5b. Onboarding: `devices add` enrols a new device in CA, registry and inventory; then it is revoked")
    config = ["-c", str(agent_config)]
    added = kit.run("gateway-agent", "devices", "add", "device-004", "--role", "sensor", "--attr", "site=plant-a",
                    "--attr", "line=line-1", *config).strip().splitlines()
    kit.say(added[0])
    kit.say(added[1].strip() + "  (printed for the device's provisioning record)")
    await asyncio.sleep(1.0)  # the broker re-reads the registry every 0.5 s
    outcome = await kit.try_connect(kit.device_config("device-004"))
    kit.say(f"device-004 connects with its new certificate: {outcome.split(' (')[0]}")
    rows = [json.loads(line) for line in kit.run("gateway-agent", "certs", "expiring", "--within", "31d", "--json",
                                                 *config).splitlines() if line.startswith("{")]
    listed = [r for r in rows if r["device_id"] == "device-004"]
    kit.say(f"`certs expiring` lists it from the first minute: {listed[0]['days_left']} days left, "
            f"{listed[0]['cert_state']}")

    kit.say(kit.run("gateway-agent", "pki", "revoke", "device-004", "--reason", "key_compromise", *config)
            .strip().splitlines()[0])
    kit.say(kit.run("gateway-agent", "pki", "crl", "--ca-dir", str(ca_dir)).strip().splitlines()[-1])
    before = kit.count("auth.rejected")
    agent.send_signal(signal.SIGHUP)  # the agent syncs and installs the new CRL for the broker
    deadline = time.monotonic() + 10
    outcome = "connected"
    while outcome == "connected" and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        outcome = await kit.try_connect(kit.device_config("device-004"))
    event = kit.wait_for_refusal("auth.rejected", before, 5.0)
    kit.say(f"device-004 reconnecting: {outcome.split(' (')[0]} -> auth.rejected reason={event['reason']}")
    refused = kit.run("gateway-agent", "certs", "renew", "device-004", *config).strip().splitlines()[-1]
    kit.say(f"`certs renew device-004`: {refused}")
    shown = kit.run("gateway-agent", "devices", "show", "device-004", *config).strip().splitlines()
    kit.say(next(line.strip() for line in shown if line.strip().startswith("CA:")))
    listed_after = kit.run("gateway-agent", "certs", "expiring", "--within", "31d", "--json", *config)
    kit.say(f"`certs expiring` no longer lists it: {'device-004' not in listed_after}")
