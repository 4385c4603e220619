"""What both command lines promise: -c on every verb with no working-directory default, one exit-code
table, one-line errors (no traceback), --version, and a quiet exit when stdout closes (``--json | head``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from broker_plugins.cli import main as broker_main
from gateway_agent.cli import main as agent_main

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
ZONE_VIOLATION = ROOT / "tests" / "zones" / "corpus" / "address_outside_zone.yaml"  # kind: zones
BROKER_VIOLATION = ROOT / "tests" / "zones" / "corpus" / "broker_on_zone3.yaml"  # kind: broker


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
                 ("gateway-agent", "command", "send", "--device", "d", "{}"),
                 ("gateway-agent", "zones", "check"), ("gateway-agent", "zones", "nft"),
                 ("gateway-agent", "firmware", "keygen", "release-1"),
                 ("gateway-agent", "firmware", "verify", "--manifest", "m.json")):
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


def closed_pipe_run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run with stdout a pipe whose reader is already gone, as ``... | head -0`` ends up."""
    read, write = os.pipe()
    os.close(read)
    try:
        return cli(*argv, stdout=write, env=env)
    finally:
        os.close(write)


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_a_closed_pipe_ends_quietly_with_the_commands_own_exit_code(tmp_path: Path, buffered: bool) -> None:
    acl = tmp_path / "acl.yaml"
    shutil.copy(CONFIGS / "acl.yaml", acl)  # more output than a pipe buffer holds
    refused = tmp_path / "refused.yaml"
    refused.write_text("version: 1\nroles:\n  sensor:\n    - allow publish #\n")  # '#' starts a YAML comment
    warned = tmp_path / "warned.yaml"
    warned.write_text("version: 1\nroles:\n  sensor:\n    - deny publish devices/{device}/#\n"
                      "    - allow publish devices/{device}/telemetry\n")  # shadowed_allow
    zones = str(CONFIGS / "zones.yaml")
    cases = [
        (("edge-broker", "acl", "check", str(acl), "--json"), 0),
        (("edge-broker", "acl", "check", str(refused), "--json"), 1),
        (("edge-broker", "acl", "check", str(warned), "--json"), 3),
        (("gateway-agent", "zones", "check", "-c", str(ZONE_VIOLATION), "--json"), 1),
        (("gateway-agent", "zones", "check", "-c", zones, "--broker", str(BROKER_VIOLATION), "--json"), 1),
        (("gateway-agent", "zones", "nft", "-c", zones), 0),
        (("edge-broker", "--help"), 0),
        (("gateway-agent", "zones", "check", "--help"), 0),
    ]
    # PYTHONUNBUFFERED set: the first write fails; unset: the output waits in a buffer until the end
    env = {"PYTHONUNBUFFERED": "" if buffered else "1"}
    for argv, code in cases:
        result = closed_pipe_run(*argv, env=env)
        assert result.returncode == code, (argv, result.stderr)
        assert "Broken pipe" not in result.stderr and "Traceback" not in result.stderr, (argv, result.stderr)
        if "--json" in argv or "--help" in argv:
            assert result.stderr == "", (argv, result.stderr)


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


def firmware_settings(directory: Path, extra: str = "") -> Path:
    """Development release-tool settings (file keys under k/, roots under roots/), relative to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "firmware.yaml"
    path.write_text("keys:\n  unsafe_file_keys:\n    dev-r1: k/dev-r1.pem\n  release: [dev-r1]\n  root: [dev-r1]\n"
                    f"roots_dir: roots\n{extra}")
    return path


def test_zones_and_firmware_find_their_config_in_the_config_dir(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("broker.yaml", "agent.yaml", "uplink.yaml"):
        shutil.copy(CONFIGS / name, etc / name)
    shutil.copy(ZONE_VIOLATION, etc / "zones.yaml")
    env = {"EDGE_GATEWAY_CONFIG_DIR": str(etc)}
    # run from the checkout, whose compliant configs/zones.yaml must not be the one read
    found = cli("gateway-agent", "zones", "check", env=env, cwd=ROOT)
    assert found.returncode == 1, found.stderr
    note, summary = found.stderr.splitlines()
    assert note == f"note: no -c/--config given: using {etc}/zones.yaml"
    assert summary.startswith("zones check: ") and "violation(s)" in summary, summary
    # its siblings in the config dir were checked, not the working directory's
    assert summary.endswith(f"({etc}/zones.yaml, {etc}/broker.yaml, {etc}/agent.yaml, {etc}/uplink.yaml)"), summary
    assert cli("gateway-agent", "zones", "nft", env=env, cwd=ROOT).returncode == 1
    shutil.copy(CONFIGS / "zones.yaml", etc / "zones.yaml")
    nft = cli("gateway-agent", "zones", "nft", env=env, cwd=tmp_path)
    assert nft.returncode == 0 and "table inet edge_zones" in nft.stdout, nft.stderr
    assert nft.stderr == f"note: no -c/--config given: using {etc}/zones.yaml\n"

    firmware_settings(etc)
    keygen = cli("gateway-agent", "firmware", "keygen", "dev-r1", env=env, cwd=ROOT)
    assert keygen.returncode == 0 and keygen.stdout.startswith("dev-r1 keyid="), keygen.stderr
    assert keygen.stderr.splitlines()[0] == f"note: no -c/--config given: using {etc}/firmware.yaml"
    assert (etc / "k" / "dev-r1.pem").is_file()  # paths in the settings are relative to the settings file


def test_zones_and_firmware_errors_are_one_line_with_the_tables_code(tmp_path: Path) -> None:
    zones = str(CONFIGS / "zones.yaml")
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("version: 1\ngateway: [gw\n")
    schema = tmp_path / "schema.yaml"
    schema.write_text("version: 1\ngateway: gw\nzones: [{id: 7}]\ninterfaces: {}\n")
    settings = firmware_settings(tmp_path / "fw")
    unknown_key = firmware_settings(tmp_path / "fw-unknown", "colour: red\n")
    module = tmp_path / "fw-module" / "firmware.yaml"
    module.parent.mkdir()
    module.write_text(f"keys:\n  pkcs11:\n    module: {tmp_path}/nope.so\n    token_label: release\n"
                      "  release: [r1, r2]\n  root: [root]\nroots_dir: roots\n")
    manifest = tmp_path / "m.json"
    manifest.write_text("{}")
    cfg = str(settings)
    missing = str(tmp_path / "missing.yaml")
    cases: list[tuple[tuple[str, ...], str]] = [
        (("zones", "check", "-c", missing), "missing.yaml: cannot read"),
        (("zones", "nft", "-c", missing), "missing.yaml: cannot read"),
        (("zones", "check", "--zones", str(tmp_path)), "cannot read"),
        (("zones", "check", "-c", str(syntax)), f"{syntax}:3: YAML syntax error"),
        (("zones", "nft", "-c", str(schema)), f"{schema}:3"),
        (("zones", "check", "-c", zones, "--broker", missing), "missing.yaml: cannot read"),
        (("zones", "check", "-c", zones, "--agent", str(syntax)), f"{syntax}:3: YAML syntax error"),
        (("firmware", "verify", "-c", missing, "--manifest", str(manifest)), "cannot read firmware settings"),
        (("firmware", "publish", "-c", str(tmp_path), "--manifest", str(manifest), "--image", str(manifest)),
         "cannot read firmware settings"),
        (("firmware", "verify", "-c", str(unknown_key), "--manifest", str(manifest)), "colour"),
        (("firmware", "verify", "-c", cfg, "--manifest", missing), "cannot read manifest"),
        (("firmware", "verify", "-c", cfg, "--manifest", str(manifest)), "no root in"),
        (("firmware", "sign", "-c", cfg, "--image", missing, "--class", "c", "--version", "1", "--out",
          str(tmp_path / "o.json")), "cannot read image"),
        (("firmware", "cosign", "-c", cfg, "--manifest", str(manifest)), "cannot load release key"),
        (("firmware", "keygen", "-c", cfg, "other"), "not under keys.unsafe_file_keys"),
        (("firmware", "keygen", "-c", str(module), "r1"), "PKCS#11 token 'release' not found"),
        (("firmware", "root", "-c", cfg, "--version", "1", "--release-threshold", "1"), "one stolen release key"),
        (("firmware", "publish", "-c", cfg, "--manifest", str(manifest), "--image", str(manifest)),
         "no 'publish' section"),
    ]
    for argv, says in cases:
        result = cli("gateway-agent", *argv, cwd=tmp_path)
        assert result.returncode == 4, (argv, result.stderr)
        line = one_error_line(result)
        assert says in line and "last good" not in line, (argv, line)
        assert result.stdout == "", (argv, result.stdout)


def test_zone_violations_exit_1_and_are_no_error() -> None:
    for argv in (("zones", "check", "-c", str(ZONE_VIOLATION)), ("zones", "nft", "-c", str(ZONE_VIOLATION)),
                 ("zones", "check", "-c", str(CONFIGS / "zones.yaml"), "--broker", str(BROKER_VIOLATION))):
        result = cli("gateway-agent", *argv)
        assert result.returncode == 1, (argv, result.stderr)
        assert "Traceback" not in result.stderr and "error:" not in result.stderr, result.stderr
    as_json = cli("gateway-agent", "zones", "check", "-c", str(ZONE_VIOLATION), "--json")
    (violation,) = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert violation["code"] == "address_outside_zone" and violation["file"] == str(ZONE_VIOLATION)
    assert as_json.returncode == 1 and as_json.stderr == ""


def _exit_codes(help_text: str) -> dict[int, str]:
    """The "Exit codes: 0 ..., 1 ..." sentence of a verb's --help, by code."""
    sentence = " ".join(help_text.split()).split("Exit codes: ", 1)[1]
    return {int(item.split(" ", 1)[0]): item.split(" ", 1)[1] for item in re.split(r"[,;] (?=\d+ )", sentence)}


def test_help_names_the_code_an_unreadable_file_exits_with(tmp_path: Path) -> None:
    gone = str(tmp_path / "gone.yaml")
    settings = str(firmware_settings(tmp_path / "fw"))
    for argv in (("edge-broker", "acl", "explain", "--device", "d", "--publish", "t", "--acl", gone,
                  "--registry", gone),
                 ("edge-broker", "acl", "check", gone),
                 ("gateway-agent", "zones", "check", "-c", gone),
                 ("gateway-agent", "zones", "nft", "-c", gone),
                 ("gateway-agent", "firmware", "verify", "-c", settings, "--manifest", gone)):
        codes = _exit_codes(cli(*argv[:3], "--help").stdout)
        result = cli(*argv)
        one_error_line(result)
        assert result.returncode == 4 and "unreadable" in codes[4], (argv, codes)
        assert not any("unreadable" in text for code, text in codes.items() if code != 4), (argv, codes)
