"""The agent daemon: CRL schedule and SIGHUP, status endpoint, clean SIGTERM, as a real process too."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from edge_core.revocation import split_crl_bundle
from gateway_agent.crl_issue import crl_path, issue_crl, revoke
from gateway_agent.daemon import Agent
from gateway_agent.pki import FileCA, init_dev
from gateway_agent.settings import load_agent_settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ca(tmp_path: Path) -> FileCA:
    ca = init_dev(tmp_path / "pki", device_ids=["pump-1"])
    issue_crl(ca)
    return ca


def write_config(tmp_path: Path, ca: FileCA, port: int) -> Path:
    config = tmp_path / "agent.yaml"
    config.write_text(f"""agent_id: gateway-agent
status:
  bind: 127.0.0.1:{port}
crl:
  sources: [{{file: {crl_path(ca)}}}]
  issuers: [{ca.dir / 'issuing-ca.crt'}]
  install_targets: [{tmp_path / 'broker-a' / 'crl.pem'}, {tmp_path / 'broker-b' / 'crl.pem'}]
  state: {tmp_path / 'state' / 'crl.json'}
  interval: 3600
""")
    return config


def get_status(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


async def test_agent_syncs_at_start_and_again_on_sighup(tmp_path: Path, ca: FileCA) -> None:
    port = free_port()
    settings = load_agent_settings(write_config(tmp_path, ca, port))
    target = tmp_path / "broker-a" / "crl.pem"
    async with Agent(settings) as agent:
        for _ in range(200):
            if target.exists():
                break
            await asyncio.sleep(0.02)
        assert len(split_crl_bundle(target.read_bytes())) == 1
        status = await asyncio.to_thread(get_status, port)
        crl = status["services"]["crl"]  # type: ignore[index]
        (issuer_status,) = crl["issuers"].values()
        assert issuer_status["crl_number"] == 1 and issuer_status["freshness"] == "fresh"

        revoke(ca, "pump-1")
        issue_crl(ca)
        agent._sighup()  # what `systemctl reload gateway-agent` sends
        for _ in range(200):
            installed = agent.crl.syncer.installed if agent.crl else {}
            if any(i.crl_number == 2 for i in installed.values()):
                break
            await asyncio.sleep(0.02)
        assert any(i.crl_number == 2 and i.count == 1 for i in agent.crl.syncer.installed.values())  # type: ignore[union-attr]
        assert (tmp_path / "broker-b" / "crl.pem").read_bytes() == target.read_bytes()
        assert agent.events.count("crl.installed") == 2


def test_gateway_agent_run_as_a_process_stops_cleanly_on_sigterm(tmp_path: Path, ca: FileCA) -> None:
    port = free_port()
    config = write_config(tmp_path, ca, port)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(bin_dir / "gateway-agent"), "run", "-c", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                status = get_status(port)
                break
            except OSError:
                assert time.monotonic() < deadline, "agent status endpoint never came up"
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.1)
        assert status["agent_id"] == "gateway-agent"
        cli = subprocess.run([str(bin_dir / "gateway-agent"), "status", "-c", str(config)],
                             capture_output=True, text=True, timeout=10, check=False)
        assert cli.returncode == 0 and json.loads(cli.stdout)["component"] == "gateway-agent"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert "agent.started" in names and "crl.installed" in names and names[-1] == "agent.stopped"


def test_status_of_an_agent_that_is_not_running_fails_with_1(tmp_path: Path, ca: FileCA) -> None:
    from gateway_agent.cli import main

    assert main(["status", "-c", str(write_config(tmp_path, ca, free_port()))]) == 1
