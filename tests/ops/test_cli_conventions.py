"""What both command lines promise: -c on every verb with no working-directory default, one exit-code
table, one-line errors (no traceback), --version, and a quiet exit when stdout closes (``--json | head``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from broker_plugins.cli import main as broker_main
from gateway_agent.cli import main as agent_main

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def cli(*argv: str, env: dict[str, str] | None = None, stdout: int | None = subprocess.PIPE,
        cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], stdout=stdout, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **(env or {})}, timeout=60, check=False, cwd=cwd)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "(fix: " in lines[0], lines[0]
    return lines[0]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    for main, prog in ((broker_main, "edge-broker"), (agent_main, "gateway-agent")):
        with pytest.raises(SystemExit) as exited:
            main(["--version"])
        assert exited.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{prog} ") and "edge-gateway-security" in out


def test_no_config_looks_in_the_config_dir_and_says_so(tmp_path: Path) -> None:
    empty = {"EDGE_GATEWAY_CONFIG_DIR": str(tmp_path)}
    for argv in (("edge-broker", "status"), ("edge-broker", "acl", "check"), ("gateway-agent", "status"),
                 ("gateway-agent", "crl", "sync"), ("gateway-agent", "pki", "revoke", "x"),
                 ("gateway-agent", "command", "send", "--device", "d", "{}")):
        result = cli(*argv, env=empty, cwd=ROOT)  # the checkout's configs/ are right here: never used
        assert result.returncode == 4, (argv, result.stderr)
        line = one_error_line(result)
        assert f"no -c/--config given, and {tmp_path}/" in line, line
    (tmp_path / "acl.yaml").write_text(
        "version: 1\nroles:\n  sensor:\n    - allow publish devices/{device}/telemetry/#\n"
        "  pump:\n    # acl-check: ack unknown_role - planned for next month\n"
        "    - allow publish devices/{device}/state\n")
    (tmp_path / "broker.yaml").write_text(
        "listener: {certfile: a, keyfile: b, client_ca: c}\nregistry: registry.yaml\nacl: acl.yaml\n")
    (tmp_path / "registry.yaml").write_text("version: 1\ndevices: {}\n")
    found = cli("edge-broker", "acl", "check", env=empty, cwd=tmp_path)
    assert found.stderr.splitlines()[0] == f"note: no -c/--config given: using {tmp_path}/broker.yaml"
    # an empty registry: neither role has a device; the pump warning is acknowledged in the file
    assert found.returncode == 3 and "1 warning (1 more acknowledged)" in found.stdout, found.stdout
    assert cli("edge-broker", "acl", "check", "--max-warnings", "1", env=empty, cwd=tmp_path).returncode == 0
    assert cli("edge-broker", "acl", "check", "--max-warnings", "0", env=empty, cwd=tmp_path).returncode == 3


def test_missing_input_files_are_one_line_exit_4(tmp_path: Path) -> None:
    assert cli("gateway-agent", "pki", "pin", str(tmp_path / "nope.crt")).returncode == 4
    for argv in (("gateway-agent", "pki", "pin", str(tmp_path / "nope.crt")),
                 ("gateway-agent", "pki", "pin", str(tmp_path)),
                 ("edge-broker", "status", "-c", str(tmp_path / "nope.yaml")),
                 ("edge-broker", "acl", "check", str(tmp_path / "nope.yaml")),
                 ("gateway-agent", "crl", "sync", "-c", str(tmp_path / "nope.yaml"))):
        result = cli(*argv)
        assert result.returncode == 4, (argv, result.stderr)
        one_error_line(result)


def test_daemon_start_up_errors_are_json_lines_and_never_promise_a_last_good_version(tmp_path: Path) -> None:
    bad = tmp_path / "broker.yaml"
    bad.write_text("listener: {certfile: a, keyfile: b, client_ca: c}\nregistry: r.yaml\nbogus: 1\n")
    for argv in (("edge-broker", "run", "-c", str(bad)), ("gateway-agent", "run", "-c", str(bad))):
        result = cli(*argv)
        assert result.returncode == 4, result.stderr
        (line,) = [json.loads(text) for text in result.stderr.splitlines()]  # stderr is not a terminal: JSON
        assert line["event"] == "cli.error" and line["exit"] == 4 and "unknown key" in str(line["detail"])
        assert "last good" not in result.stderr


def closed_pipe_run(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run with stdout a pipe whose reader is already gone, as ``... | head -0`` ends up."""
    read, write = os.pipe()
    os.close(read)
    try:
        return cli(*argv, stdout=write)
    finally:
        os.close(write)


def test_json_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    acl = tmp_path / "acl.yaml"
    shutil.copy(ROOT / "configs" / "acl.yaml", acl)
    for argv in (("edge-broker", "acl", "check", str(acl), "--json"), ("edge-broker", "--help")):
        result = closed_pipe_run(*argv)
        assert result.returncode == 0, result.stderr
        assert result.stderr == "", result.stderr


def test_status_of_a_stopped_broker_exits_5(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "broker.yaml"
    config.write_text(f"listener: {{certfile: a, keyfile: b, client_ca: c}}\nregistry: r.yaml\n"
                      f"status: {{bind: '127.0.0.1:{port}'}}\n")
    for flag in ((), ("--metrics",), ("--ready",), ("--health",)):
        result = cli("edge-broker", "status", "-c", str(config), *flag)
        assert result.returncode == 5
        assert "unreachable" in one_error_line(result)


def test_agent_status_port_in_use_is_one_json_line_exit_5(tmp_path: Path) -> None:
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        config = tmp_path / "agent.yaml"
        config.write_text(f"agent_id: gateway-agent\nstatus:\n  bind: 127.0.0.1:{port}\n")
        result = cli("gateway-agent", "run", "-c", str(config))
    assert result.returncode == 5, result.stderr
    assert "Traceback" not in result.stderr
    lines = [json.loads(text) for text in result.stderr.splitlines()]  # every line JSON, the error too
    (error,) = [line for line in lines if line["event"] == "cli.error"]
    assert "address already in use" in str(error["detail"]).lower() and "status.bind" in str(error["hint"])
