"""End-to-end demo of the gateway security stack, on loopback.

Run it with ``demo/run.sh`` (it installs the project first). Every step uses the real
programs: ``gateway-agent`` for the PKI and commands, ``edge-broker run`` for the broker,
the reference device client for devices, and the broker's status endpoint for reasons.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography import x509
from cryptography.hazmat.primitives import serialization

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devices_steps import DemoKit, devices_section  # noqa: E402 - demo/ is the script directory
from firmware_steps import firmware_section  # noqa: E402 - demo/ is the script directory
from uplink_steps import uplink_section  # noqa: E402

from device_client.client import DeviceClient, DeviceConfig  # noqa: E402
from device_client.commands import DeviceCommandVerifier  # noqa: E402
from device_client.credential_store import CredentialStore  # noqa: E402
from device_client.rotation import DeviceRotation  # noqa: E402
from device_client.validation import check_certificate  # noqa: E402
from edge_core.clock import SystemClock  # noqa: E402
from edge_core.operators import OperatorKeys, parse_operators  # noqa: E402
from edge_core.registry import parse_registry  # noqa: E402
from edge_runtime.logsetup import configure_logging  # noqa: E402
from gateway_agent.commanding import BrokerEndpoint, load_signing_key, send_command  # noqa: E402
from gateway_agent.pki import cert_pem, issue_leaf, key_pem, new_intermediate, new_root  # noqa: E402

CERTS = ROOT / "certs-dev"
CONFIG = ROOT / "configs" / "broker.yaml"
BIN = Path(sys.executable).parent
PORT = 8883
STATUS = "http://127.0.0.1:9464/status"


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def say(text: str) -> None:
    print(f"   {text}", flush=True)


STDERR_LINES: list[tuple[str, str]] = []  # (where, line) of every CLI call: checked to be JSON at the end


def run(*args: str) -> str:
    out = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, cwd=ROOT, check=False)
    STDERR_LINES.extend((" ".join(args[:3]), line) for line in out.stderr.splitlines())
    if out.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(args)} failed (exit {out.returncode}):\n{out.stderr}")
    return out.stdout + out.stderr


def status() -> dict[str, Any]:
    with urllib.request.urlopen(STATUS, timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def last_refusal(event: str, after: int = 0) -> dict[str, Any] | None:
    found = [e for e in status()["recent_refusals"] if e["event"] == event]
    return found[-1] if len(found) > after else None


def wait_for_refusal(event: str, before: int, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in status()["recent_refusals"] if e["event"] == event]
        if len(found) > before:
            return found[-1]
        time.sleep(0.1)
    raise SystemExit(f"expected a {event} event from the broker")


def count(event: str) -> int:
    return len([e for e in status()["recent_refusals"] if e["event"] == event])


def device_config(name: str, cert: Path | None = None, key: Path | None = None) -> DeviceConfig:
    return DeviceConfig(device_id=name, host="127.0.0.1", port=PORT, ca=CERTS / "ca-chain.pem",
                        cert=cert or CERTS / "devices" / f"{name}.crt", key=key or CERTS / "devices" / f"{name}.key")


async def try_connect(config: DeviceConfig) -> str:
    try:
        async with DeviceClient(config):
            return "connected"
    except (aiomqtt.MqttError, ssl.SSLError, OSError) as exc:
        return f"refused ({exc})"


def verifier_for(device: str) -> DeviceCommandVerifier:
    operators = parse_operators((CERTS / "operators.yaml").read_text(), source="operators.yaml")
    registry = parse_registry((CERTS / "registry.yaml").read_bytes())
    entry = registry.get(device)
    assert entry is not None
    return DeviceCommandVerifier(device, OperatorKeys.bind(operators, registry), operators.policy, SystemClock(),
                                 profile=entry)


def rogue_credentials() -> tuple[Path, Path]:
    """A certificate for device-001 issued by a CA nobody configured."""
    now = datetime.now(UTC)
    issuing = new_intermediate(new_root("Rogue Root", now), "Rogue Issuing", now)
    issued = issue_leaf(issuing, identity="device-001", now=now)
    out = CERTS / "rogue"
    out.mkdir(exist_ok=True)
    (out / "device-001.crt").write_bytes(cert_pem(issued.cert) + cert_pem(issuing.cert))
    assert issued.key is not None
    (out / "device-001.key").write_bytes(key_pem(issued.key))
    (out / "device-001.key").chmod(0o600)
    return out / "device-001.crt", out / "device-001.key"


async def commands_section(broker_started: float, verifier: DeviceCommandVerifier) -> None:
    step("4. A signed command: delivered, verified by the device, then replayed and refused")
    wait = 31 - (time.monotonic() - broker_started)
    if wait > 0:
        say("(broker and device refuse commands issued in the first 30 s after they start, so no")
        say(f" command seen before a restart can be replayed after it: waiting {wait:.0f} s)")
        await asyncio.sleep(wait)
    device = DeviceClient(device_config("device-001"), verifier=verifier)
    async with device:
        outcomes = device.commands()
        # configs/operator.yaml: operator alice, her signing key and TLS credentials, the broker
        sent = await asyncio.to_thread(
            run, "gateway-agent", "command", "send", "-c", "configs/operator.yaml", "--device", "device-001",
            "--subtopic", "valve", '{"op":"open","valve":3}',
        )
        say(f"operator alice: {sent.strip().splitlines()[-1]}")
        outcome = await asyncio.wait_for(anext(outcomes), 10)
        assert outcome.command is not None
        say(f"device-001 verified it itself: op={dict(outcome.command.body)} from {outcome.command.issuer}, "
            f"expires {outcome.command.expires_at:%H:%M:%S}")
        verdict = await asyncio.to_thread(_replay, outcome.payload)
        say(f"an attacker replays the captured envelope: {verdict}")
        event = wait_for_refusal("command.rejected", 0)
        say(f"broker: command.rejected reason={event['reason']} jti={event['jti']} (device got nothing)")


def _replay(token: bytes) -> str:
    """Re-publish the exact envelope the device received (as if captured off the wire)."""
    result = send_command(
        BrokerEndpoint("127.0.0.1", PORT, CERTS / "ca-chain.pem", CERTS / "operators" / "alice.crt",
                       CERTS / "operators" / "alice.key"),
        operator="alice", signing_key=load_signing_key(CERTS / "operators" / "alice-signing.key"),
        device="device-001", body={}, ttl=timedelta(seconds=30), subtopic="valve", token=token, wait=2.0,
    )
    return f"rejection notice to alice: reason={result.rejected}"


async def revocation_section(agent: subprocess.Popen[str]) -> None:
    step("5. Revocation: a connected device's certificate is revoked and it is cut off")
    device = DeviceClient(device_config("device-003"))
    async with device:
        say("device-003 is connected")
        say(run("gateway-agent", "pki", "revoke", "device-003", "--ca-dir", str(CERTS)).strip().splitlines()[0])
        say(run("gateway-agent", "pki", "crl", "--ca-dir", str(CERTS)).strip().splitlines()[-1])
        before = count("session.cut")
        started = time.monotonic()
        agent.send_signal(signal.SIGHUP)  # `systemctl reload gateway-agent`: sync the CRL now
        say("gateway-agent: SIGHUP -> fetch, verify, install the new CRL for the broker")
        event = await asyncio.to_thread(wait_for_refusal, "session.cut", before, 10.0)
        # two paths cut it, whichever comes first: the CRL (reason revoked, with the serial) or the
        # registry, where `pki revoke <device>` also disabled the device (reason device_disabled)
        which = f"serial={event['serial']}" if "serial" in event else f"source={event.get('source', '?')}"
        say(f"broker: session.cut reason={event['reason']} device={event['device']} {which} "
            f"({(time.monotonic() - started) * 1000:.0f} ms after the CA published the CRL)")
    outcome = await try_connect(device_config("device-003"))
    event = wait_for_refusal("auth.rejected", count("auth.rejected") - 1)
    say(f"device-003 reconnecting: {outcome.split(' (')[0]} -> auth.rejected reason={event['reason']}")


async def validation_section() -> None:
    step("6. An MCU that cannot parse CRLs asks the gateway: signed answers it can check with one ECDSA verify")
    public = serialization.load_pem_public_key((CERTS / "agent" / "validation.pub").read_bytes())
    async with DeviceClient(device_config("device-001")) as device:
        for peer in ("device-002", "device-003"):
            der = x509.load_pem_x509_certificate((CERTS / "devices" / f"{peer}.crt").read_bytes()).public_bytes(
                serialization.Encoding.DER)
            answer = await check_certificate(device, der, gateway_public_key=public, timeout=5)  # type: ignore[arg-type]
            say(f"device-001 asks about {peer}'s certificate: {answer.status} "
                f"(CRL {answer.crl_number}, thisUpdate {answer.this_update:%H:%M:%S}, signed by {answer.gateway}, "
                f"nonce echoed)")


def agent_events(name: str) -> list[dict[str, Any]]:
    events = []
    for line in (ROOT / "demo-agent.log").read_text().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == name:
                events.append(event)
    return events


async def wait_agent_event(name: str, device: str, limit_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        found = [e for e in agent_events(name) if e.get("device") == device]
        if found:
            return found[-1]
        await asyncio.sleep(0.2)
    raise SystemExit(f"expected {name} for {device} from the agent; see demo-agent.log")


def pins_of(device: str) -> int:
    entry = parse_registry((CERTS / "registry.yaml").read_bytes()).get(device)
    return len(entry.pins) if entry else 0


async def renewal_section(agent_config: Path, overlap_s: float) -> None:
    step("7. Certificate renewal: CSR over the device's own session, test endpoint, switch, overlap, revocation")
    factory = CERTS / "devices" / "device-002.crt"
    old_serial = x509.load_pem_x509_certificate(factory.read_bytes()).serial_number
    rotation = DeviceRotation(device_config("device-002"), CredentialStore(ROOT / "var" / "device-002"),
                              test_endpoint=("127.0.0.1", 8884))
    device_task = asyncio.create_task(rotation.run())
    try:
        await asyncio.wait_for(rotation.wait_connected(old_serial), 10)
        say(f"device-002 runs the reference rotation client; connected with serial {old_serial:x}")
        say(run("gateway-agent", "certs", "renew", "device-002", "-c", str(agent_config)).strip())
        switched = await wait_agent_event("renewal.switched", "device-002", 30)
        new_serial = int(switched["serial"], 16)
        say("agent: asked for a CSR (fresh key made on the device), checked it, CA issued, pushed")
        say(f"device: tested the new certificate on the test endpoint :8884, switched, reported {new_serial:x}")
        await asyncio.wait_for(rotation.wait_connected(new_serial), 15)
        say(f"device-002 reconnected with the new certificate; registry pins now: {pins_of('device-002')} "
            f"(overlap: old and new both valid)")
        say(f"(the demo's overlap is {overlap_s:.0f} s instead of 7 days)")
        revoked = await wait_agent_event("cert.revoked", "device-002", overlap_s + 30)
        say(f"agent: overlap over, old certificate {revoked['serial']} revoked (it goes into the next CRL); "
            f"pins now: {pins_of('device-002')}")
        await asyncio.sleep(1.0)  # the broker re-reads the registry every 0.5 s
        outcome = await try_connect(device_config("device-002", factory, CERTS / "devices" / "device-002.key"))
        event = wait_for_refusal("auth.rejected", count("auth.rejected") - 1)
        say(f"the old certificate now: {outcome.split(' (')[0]} -> auth.rejected reason={event['reason']}")
        say("`gateway-agent certs history device-002 --db var/agent/inventory.db` shows every transition")
    finally:
        device_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await device_task


async def main(started: float, verifier: DeviceCommandVerifier, agent: subprocess.Popen[str],
               agent_config: Path, overlap_s: float) -> None:
    step("3. Who may connect")
    async with DeviceClient(device_config("device-001")) as good:
        await good.publish("devices/device-001/telemetry/temp", b"21.5")
        say("device-001 (pinned cert, client id = cert identity): connected, published telemetry")
    cert, key = rogue_credentials()
    outcome = await try_connect(device_config("device-001", cert, key))
    event = wait_for_refusal("tls.rejected", 0)
    say(f"rogue device-001 (cert from another CA): {outcome.split(' (')[0]} -> tls.rejected reason={event['reason']}")
    spoof = device_config("device-001", CERTS / "devices" / "device-002.crt", CERTS / "devices" / "device-002.key")
    outcome = await try_connect(spoof)
    event = wait_for_refusal("auth.rejected", 0)
    say(f"device-002's cert claiming client id device-001: {outcome} -> auth.rejected reason={event['reason']}")

    await commands_section(started, verifier)
    await revocation_section(agent)
    kit = DemoKit(run, step, say, try_connect, device_config, wait_for_refusal, count)
    await devices_section(kit, agent, agent_config, CERTS)
    await validation_section()
    await firmware_section(run=run, say=say, step=step, wait_for_refusal=wait_for_refusal, count=count)
    await renewal_section(agent_config, overlap_s)
    await asyncio.to_thread(uplink_section, root=ROOT, certs=CERTS, bin_dir=BIN, device=device_config("device-001"),
                            wait_for_refusal=wait_for_refusal, count=count)

    step("Broker counters (edge-broker status)")
    for name, reasons in status()["events"].items():
        if name.endswith((".rejected", ".denied", ".cut")):
            say(f"{name}: " + ", ".join(f"{r or '-'}={n}" for r, n in reasons.items()))


def start(args: list[str], log: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(ROOT / log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.DEVNULL, stderr=out)


def wait_until_up(check: str) -> None:
    for _ in range(150):
        try:
            with urllib.request.urlopen(check, timeout=2):  # noqa: S310 - fixed loopback URL
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{check} did not come up; see demo-*.log")


def run_demo() -> None:
    # the narration (stdout) is the demo's output; the device side's own warnings go to stderr as
    # JSON lines like every daemon's, and its events below warnings stay quiet
    configure_logging(level="WARNING", console=False)
    step("1. Dev PKI: root CA, issuing CA, broker cert, 3 devices, operator alice, registry with pins, CRL 1")
    # a new dev CA starts again at CRL number 1: forget the previous run's anti-rollback state with it
    shutil.rmtree(ROOT / "var", ignore_errors=True)
    (ROOT / "demo-uplink.log").unlink(missing_ok=True)  # appended to across the uplink's restarts: start empty
    say(run("gateway-agent", "pki", "init-dev", "--out", str(CERTS), "--devices", "3", "--force").splitlines()[0])
    verifier = verifier_for("device-001")  # device-001 "boots": its own replay cache starts now

    step("2. Start gateway-agent (CRL sync, MCU validation, lifecycle) and the hardened broker")
    # the demo shortens the rotation overlap from 7 days to seconds; everything else is configs/agent.yaml
    overlap_s = 20.0
    agent_config = ROOT / "var" / "demo-agent.yaml"  # var/ and configs/ are siblings: relative paths still hold
    agent_config.parent.mkdir(parents=True, exist_ok=True)
    agent_config.write_text((ROOT / "configs" / "agent.yaml").read_text().replace(
        "overlap_days: 7 ", f"overlap_days: {overlap_s / 86400:.8f} "))
    agent = start(["gateway-agent", "run", "-c", str(agent_config)], "demo-agent.log")
    broker = None
    try:
        wait_until_up("http://127.0.0.1:9465/status")
        deadline = time.monotonic() + 10
        while not (ROOT / "var" / "broker" / "crl.pem").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        say("gateway-agent: CRL 1 verified and installed for the broker (var/broker/crl.pem)")
        broker = start(["edge-broker", "run", "-c", "configs/broker.yaml"], "demo-broker.log")
        wait_until_up(STATUS)
        started = time.monotonic()  # the broker's replay cache began before its status endpoint came up
        say(f"edge-broker: TLS 1.3 mTLS on 127.0.0.1:{PORT}, pins, ACL, command guard, CRL enforcement")
        say("structured logs: demo-broker.log, demo-agent.log (JSON lines)")
        asyncio.run(main(started, verifier, agent, agent_config, overlap_s))
    finally:
        for proc in (broker, agent):
            if proc is not None:
                proc.terminate()
                proc.wait(15)
    step("Logs: every line the daemons wrote to stderr is one JSON object")
    say(check_json_lines())
    print("\ndemo complete")


def check_json_lines() -> str:
    """Every line the daemons wrote to stderr is one JSON object (`journalctl -o cat | jq` works);
    a one-shot command's stderr holds JSON events, or its one documented human line
    (`error: ...`, `note: ...`), which the demo shows above when it demonstrates a refusal."""
    counts = {}
    for log in ("demo-broker.log", "demo-agent.log", "demo-uplink.log"):
        lines = (ROOT / log).read_text().splitlines() if (ROOT / log).exists() else []
        counts[log] = len(lines)
        for number, line in enumerate(lines, 1):
            _must_be_json(line, f"{log}:{number}")
    human = 0
    for where, line in STDERR_LINES:
        if line.startswith(("error: ", "note: ")):
            human += 1
        else:
            _must_be_json(line, where)
    return (f"daemons: {counts['demo-broker.log']} broker, {counts['demo-agent.log']} agent and "
            f"{counts['demo-uplink.log']} uplink lines, all JSON; commands: {len(STDERR_LINES) - human} JSON "
            f"events and {human} one-line errors")


def _must_be_json(line: str, where: str) -> None:
    try:
        value = json.loads(line)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise SystemExit(f"{where}: a stderr line that is not one JSON object: {line[:200]!r}")


if __name__ == "__main__":
    run_demo()
