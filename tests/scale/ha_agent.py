"""One HA agent process for the failover tests: the real lifecycle runner, leader lease and
PostgreSQL inventory, with scripted devices instead of MQTT.

    python -m tests.scale.ha_agent --url URL --ca-dir DIR --devices DIR --log FILE --name A

The devices' state lives in files under ``--devices`` (the certificate in use, the stored
candidate), so a device keeps what it was told when the agent that told it dies, as a real
device would. Every device call is logged as two JSON lines (``begin``, ``end``) with the agent
name, so the test can prove no two agents ever worked on one device at once. Security events go
to ``--log`` as JSON lines too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AttributeOID, NameOID

from edge_core.clock import SystemClock
from edge_core.events import SecurityEvents
from edge_core.lifecycle import RenewalPolicy
from gateway_agent.agent_session import LifecycleRunner
from gateway_agent.renewal import TestResult
from gateway_agent.settings import LifecycleSettings


class ScriptedDevices:
    """``DeviceChannel`` over device state kept in files; ``test_delay`` makes a renewal take time."""

    def __init__(self, directory: Path, calls: Path, agent: str, test_delay: float) -> None:
        self.dir = directory
        self.calls = calls
        self.agent = agent
        self.test_delay = test_delay
        self._keys: dict[str, ec.EllipticCurvePrivateKey] = {}

    def _log(self, device_id: str, call: str, phase: str) -> None:
        line = json.dumps({"device": device_id, "agent": self.agent, "pid": os.getpid(), "call": call,
                           "phase": phase, "t": time.time()}) + "\n"
        fd = os.open(self.calls, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())  # one write per line: O_APPEND keeps lines whole across processes
        finally:
            os.close(fd)

    def _write(self, name: str, data: bytes) -> None:
        tmp = self.dir / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.dir / name)

    async def request_csr(self, device_id: str, nonce: str) -> bytes:
        self._log(device_id, "request_csr", "begin")
        key = ec.generate_private_key(ec.SECP256R1())
        self._keys[device_id] = key
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"urn:device:{device_id}")]),
                              critical=False)
               .add_attribute(AttributeOID.CHALLENGE_PASSWORD, nonce.encode())
               .sign(key, hashes.SHA256()))
        self._log(device_id, "request_csr", "end")
        return csr.public_bytes(serialization.Encoding.PEM)

    async def push_certificate(self, device_id: str, cert_pem: bytes, chain_pem: bytes) -> None:
        self._log(device_id, "push_certificate", "begin")
        self._write(f"{device_id}.candidate.pem", cert_pem)
        self._log(device_id, "push_certificate", "end")

    async def request_test(self, device_id: str, serial: int) -> TestResult:
        self._log(device_id, "request_test", "begin")
        await asyncio.sleep(self.test_delay)  # connecting to the test endpoint takes a while
        self._log(device_id, "request_test", "end")
        return TestResult(True)

    async def request_switch(self, device_id: str, serial: int) -> int:
        self._log(device_id, "request_switch", "begin")
        candidate = self.dir / f"{device_id}.candidate.pem"
        if candidate.exists() and x509.load_pem_x509_certificate(candidate.read_bytes()).serial_number == serial:
            self._write(f"{device_id}.serial", f"{serial:x}".encode())
        current = int((self.dir / f"{device_id}.serial").read_text(), 16)
        self._log(device_id, "request_switch", "end")
        return current


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--ca-dir", type=Path, required=True)
    parser.add_argument("--devices", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--lease", type=float, default=3.0)
    parser.add_argument("--test-delay", type=float, default=2.0)
    args = parser.parse_args(argv)
    stream = args.log.open("a", buffering=1)
    structlog.configure(processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"),
                                    structlog.processors.JSONRenderer()],
                        logger_factory=structlog.WriteLoggerFactory(stream))
    events = SecurityEvents(f"agent-{args.name}")
    settings = LifecycleSettings(
        inventory=args.url, ca_dir=args.ca_dir, registry=args.ca_dir / "registry.yaml",
        policy=RenewalPolicy(backoff_base=timedelta(seconds=1), backoff_max=timedelta(seconds=2), jitter=0.0),
        spool_dir=args.devices / f"spool-{args.name}", concurrency=4, scan_interval=timedelta(seconds=1),
        lifetime=timedelta(days=30), leader_lease=timedelta(seconds=args.lease))
    runner = LifecycleRunner(settings, clock=SystemClock(), events=events, broker_status_url=None,
                             agent_id=args.name)
    channel = ScriptedDevices(args.devices, args.devices / "calls.jsonl", args.name, args.test_delay)
    task = asyncio.create_task(runner.run(channel))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass
    finally:
        runner.inventory.close()
        events.emit("agent.stopped")


def _run() -> Any:
    return asyncio.run(main())


if __name__ == "__main__":
    _run()
