"""The wheel (python -m build), installed with pipx like an operator would; the Dockerfile."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(ROOT)], check=True,
                   capture_output=True, timeout=300)
    (built,) = out.glob("edge_gateway_security-*.whl")
    yield built


def test_wheel_carries_entry_points_types_and_example_files(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = z.read(f"{info}/entry_points.txt").decode()
        metadata = z.read(f"{info}/METADATA").decode()
    assert "edge-broker = broker_plugins.cli:main" in entry_points
    assert "gateway-agent = gateway_agent.cli:main" in entry_points
    for package in ("edge_core", "edge_runtime", "broker_plugins", "gateway_agent", "device_client"):
        assert f"{package}/py.typed" in names, package
    assert "broker_plugins/plugins/command_guard.py" in names
    data = info.replace(".dist-info", ".data") + "/data/share/edge-gateway"
    for shipped in ("configs/broker.yaml", "configs/agent.yaml", "configs/acl.yaml", "configs/operator.yaml",
                    "configs/operators.yaml", "systemd/edge-broker.service", "systemd/gateway-agent.service",
                    "monitoring/alerts.yml", "monitoring/grafana-dashboard.json"):
        assert f"{data}/{shipped}" in names, shipped
    assert "Requires-Dist: prometheus-client" in metadata
    assert not any(n.startswith(("tests/", "demo/", "benchmarks/")) for n in names)


def test_pipx_install_gives_working_commands(wheel: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PIPX_HOME": str(tmp_path / "pipx"), "PIPX_BIN_DIR": str(tmp_path / "bin"),
           "PIPX_MAN_DIR": str(tmp_path / "man")}
    subprocess.run([str(BIN / "pipx"), "install", str(wheel)], env=env, check=True, capture_output=True,
                   timeout=600)
    broker, agent = tmp_path / "bin" / "edge-broker", tmp_path / "bin" / "gateway-agent"
    for tool in (broker, agent):
        version = subprocess.run([str(tool), "--version"], capture_output=True, text=True, timeout=60, check=True)
        assert "edge-gateway-security" in version.stdout
    (share,) = (tmp_path / "pipx" / "venvs").glob("*/share/edge-gateway")
    check = subprocess.run([str(broker), "acl", "check", str(share / "configs" / "acl.yaml")], capture_output=True,
                           text=True, timeout=60, check=False, cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    pki = subprocess.run([str(agent), "pki", "init-dev", "--out", str(tmp_path / "pki"), "--devices", "1"],
                         capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)
    assert pki.returncode == 0, pki.stderr
    missing = subprocess.run([str(broker), "run"], capture_output=True, text=True, timeout=60, check=False,
                             cwd=tmp_path, env={**env, "EDGE_GATEWAY_CONFIG_DIR": str(tmp_path / "none")})
    assert missing.returncode == 4 and "Traceback" not in missing.stderr


def docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(BIN / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 10001:10001" in text and 'CMD ["edge-broker", "status", "--health"]' in text


@pytest.mark.skipif(not docker_answers(), reason="no Docker daemon answers here; hadolint checks the Dockerfile")
def test_image_builds_runs_read_only_as_non_root(tmp_path: Path) -> None:
    tag = f"edge-gateway-test:{os.getpid()}"
    subprocess.run(["docker", "build", "-t", tag, str(ROOT)], check=True, capture_output=True, timeout=900)
    try:
        user = subprocess.run(["docker", "run", "--rm", "--read-only", "--entrypoint", "id", tag, "-u"],
                              capture_output=True, text=True, timeout=120, check=True)
        assert user.stdout.strip() == "10001"
        version = subprocess.run(["docker", "run", "--rm", "--read-only", "--cap-drop", "ALL", tag, "--version"],
                                 capture_output=True, text=True, timeout=120, check=True)
        assert "edge-gateway-security" in version.stdout
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=120, check=False)
