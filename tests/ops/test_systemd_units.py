"""The systemd units: notify with a watchdog, reload by SIGHUP, no restart loop on a bad config."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "configs" / "systemd"
BIN = Path(sys.executable).parent


def service(name: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser["Service"]


@pytest.mark.parametrize("name,tool,config", [("edge-broker.service", "edge-broker", "broker.yaml"),
                                              ("gateway-agent.service", "gateway-agent", "agent.yaml")])
def test_unit_is_notify_with_watchdog_and_hup_reload(name: str, tool: str, config: str) -> None:
    s = service(name)
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert int(s["WatchdogSec"]) >= 10
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["ExecStart"] == f"/usr/local/bin/{tool} run -c /etc/edge-gateway/{config}"
    assert set(s["RestartPreventExitStatus"].split()) == {"2", "4"}  # usage and config errors: no restart loop
    assert s["User"] == "edge" and s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("name,tool", [("edge-broker.service", "edge-broker"),
                                       ("gateway-agent.service", "gateway-agent")])
def test_systemd_analyze_verify(tmp_path: Path, name: str, tool: str) -> None:
    text = (UNITS / name).read_text().replace(f"/usr/local/bin/{tool}", str(BIN / tool))
    (tmp_path / name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True,
                            timeout=60, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Unknown key" not in output and "Failed to parse" not in output and "Invalid" not in output, output
