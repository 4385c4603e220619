"""``gateway-agent firmware``: keygen, root, sign, verify through main(), keys on SoftHSM2; exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway_agent.cli import main
from tests.firmware.release import SOFTHSM_MODULE

pytestmark = pytest.mark.integration


def settings(tmp_path: Path, token: str, prefix: str, *, unsafe: bool = False) -> Path:
    keys = (f"  unsafe_file_keys:\n    {prefix}-r1: k/{prefix}-r1.pem\n    {prefix}-r2: k/{prefix}-r2.pem\n"
            f"    {prefix}-root: k/{prefix}-root.pem\n" if unsafe else
            f"  pkcs11:\n    module: {SOFTHSM_MODULE}\n    token_label: {token}\n")
    path = tmp_path / "firmware.yaml"
    path.write_text(f"keys:\n{keys}  release: [{prefix}-r1, {prefix}-r2]\n  root: [{prefix}-root]\n"
                    "roots_dir: roots\n")
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_sign_and_verify_with_token_keys(tmp_path: Path, softhsm_token: str, label: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(settings(tmp_path, softhsm_token, label))
    code, out = run(capsys, "firmware", "keygen", "-c", cfg, f"{label}-r1", f"{label}-r2", f"{label}-root")
    assert code == 0 and out.count("keyid=") == 3
    code, out = run(capsys, "firmware", "root", "-c", cfg, "--version", "1", "--release-threshold", "2")
    assert code == 0 and (tmp_path / "roots" / "1.root.json").exists()
    image = tmp_path / "fw.bin"
    image.write_bytes(b"\x00firmware" * 5000)
    code, out = run(capsys, "firmware", "sign", "-c", cfg, "--image", str(image), "--class", "pump-ctl",
                    "--version", "7", "--out", str(tmp_path / "m.json"))
    assert code == 0, out
    code, out = run(capsys, "firmware", "verify", "-c", cfg, "--manifest", str(tmp_path / "m.json"),
                    "--image", str(image))
    assert code == 0 and out.startswith("ok pump-ctl v7") and "signers=2" in out
    # one line with the reason code for each refusal
    code, out = run(capsys, "firmware", "verify", "-c", cfg, "--manifest", str(tmp_path / "m.json"),
                    "--floor", "8")
    assert code == 1 and out.startswith("REFUSED reason=rolled_back")
    code, out = run(capsys, "firmware", "verify", "-c", cfg, "--manifest", str(tmp_path / "m.json"),
                    "--class", "valve-ctl")
    assert code == 1 and "reason=wrong_class" in out
    image.write_bytes(b"\x00firmware" * 4999 + b"\x01firmware")
    code, out = run(capsys, "firmware", "verify", "-c", cfg, "--manifest", str(tmp_path / "m.json"),
                    "--image", str(image))
    assert code == 1 and "reason=digest_mismatch" in out
    # a manifest with one signature removed is below the threshold
    env = json.loads((tmp_path / "m.json").read_bytes())
    env["signatures"] = env["signatures"][:1]
    (tmp_path / "one.json").write_text(json.dumps(env))
    code, out = run(capsys, "firmware", "verify", "-c", cfg, "--manifest", str(tmp_path / "one.json"))
    assert code == 1 and "reason=below_threshold" in out
    # roots are never rewritten; skipping a version is refused
    code, out = run(capsys, "firmware", "root", "-c", cfg, "--version", "1", "--release-threshold", "2")
    assert code == 4 and "never rewritten" in out
    code, out = run(capsys, "firmware", "root", "-c", cfg, "--version", "3", "--release-threshold", "2")
    assert code == 4 and "next root is version 2" in out


def test_unsafe_file_keys_work_and_warn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(settings(tmp_path, "-", "dev", unsafe=True))
    code, out = run(capsys, "firmware", "keygen", "-c", cfg, "dev-r1", "dev-r2", "dev-root")
    assert code == 0 and "UNSAFE" in out
    assert run(capsys, "firmware", "root", "-c", cfg, "--version", "1", "--release-threshold", "2")[0] == 0
    image = tmp_path / "fw.bin"
    image.write_bytes(b"dev build")
    code, out = run(capsys, "firmware", "sign", "-c", cfg, "--image", str(image), "--class", "pump-ctl",
                    "--version", "2", "--out", str(tmp_path / "m.json"))
    assert code == 0 and "unsafe_file_key" in out


def test_config_errors_name_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "firmware.yaml"
    path.write_text("keys:\n  release: [a]\n  root: [b]\n  colour: red\nroots_dir: roots\n")
    code, out = run(capsys, "firmware", "verify", "-c", str(path), "--manifest", "x")
    assert code == 4 and f"{path}:" in out and len(out.strip().splitlines()) <= 2
    code, out = run(capsys, "firmware", "verify", "-c", str(tmp_path / "missing.yaml"), "--manifest", "x")
    assert code == 4 and "cannot read firmware settings" in out


def test_two_holders_each_sign_once(tmp_path: Path, softhsm_token: str, label: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Threshold signing by separate people: each signs with only their own key; cosign merges."""
    cfg = str(settings(tmp_path, softhsm_token, label))
    alone = tmp_path / "alone.yaml"
    alone.write_text(Path(cfg).read_text().replace(f"release: [{label}-r1, {label}-r2]", f"release: [{label}-r1]"))
    second = tmp_path / "second.yaml"
    second.write_text(Path(cfg).read_text().replace(f"release: [{label}-r1, {label}-r2]", f"release: [{label}-r2]"))
    assert run(capsys, "firmware", "keygen", "-c", cfg, f"{label}-r1", f"{label}-r2", f"{label}-root")[0] == 0
    assert run(capsys, "firmware", "root", "-c", cfg, "--version", "1", "--release-threshold", "2")[0] == 0
    image = tmp_path / "fw.bin"
    image.write_bytes(b"two-person rule")
    manifest = tmp_path / "m.json"
    assert run(capsys, "firmware", "sign", "-c", str(alone), "--image", str(image), "--class", "pump-ctl",
               "--version", "3", "--out", str(manifest))[0] == 0
    code, out = run(capsys, "firmware", "verify", "-c", cfg, "--manifest", str(manifest))
    assert code == 1 and "reason=below_threshold" in out
    code, out = run(capsys, "firmware", "cosign", "-c", str(second), "--manifest", str(manifest))
    assert code == 0 and "2 signature(s)" in out
    assert run(capsys, "firmware", "cosign", "-c", str(second), "--manifest", str(manifest))[1].endswith(
        "2 signature(s)\n")  # signing twice adds nothing
    code, out = run(capsys, "firmware", "verify", "-c", cfg, "--manifest", str(manifest), "--image", str(image))
    assert code == 0 and "signers=2" in out


def test_a_single_key_root_needs_the_unsafe_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(settings(tmp_path, "-", "dev", unsafe=True))
    assert run(capsys, "firmware", "keygen", "-c", cfg, "dev-r1", "dev-r2", "dev-root")[0] == 0
    code, out = run(capsys, "firmware", "root", "-c", cfg, "--version", "1", "--release-threshold", "1")
    assert code == 4 and "one stolen release key" in out and not (tmp_path / "roots" / "1.root.json").exists()
    code, out = run(capsys, "firmware", "root", "-c", cfg, "--version", "1", "--release-threshold", "1",
                    "--unsafe-single-key")
    assert code == 0


def test_shipped_settings_load() -> None:
    from gateway_agent.firmware_settings import load_firmware_settings

    shipped = load_firmware_settings(Path(__file__).resolve().parents[2] / "configs" / "firmware.yaml")
    assert shipped.token is not None and shipped.token.pin_env == "FIRMWARE_TOKEN_PIN"
    assert shipped.publish is not None and shipped.publish.rollout.max_failures == 0
    assert shipped.release_keys == ("release-1", "release-2") and not shipped.unsafe_files


def test_image_server_is_https_with_device_certificates_only(tmp_path: Path) -> None:
    from edge_core.errors import ConfigError
    from gateway_agent.firmware_settings import load_firmware_settings

    shipped = (Path(__file__).resolve().parents[2] / "configs" / "firmware.yaml").read_text()
    loaded = load_firmware_settings(Path(__file__).resolve().parents[2] / "configs" / "firmware.yaml").publish
    assert loaded is not None and loaded.public_url.startswith("https://")
    assert loaded.http_client_ca.name == "ca-chain.pem"
    for old, new, problem in (
        ("public_url: https://", "public_url: http://", "must be an https URL"),
        ("    client_ca: ../certs-dev/ca-chain.pem", "", "client_ca"),
        ("    cert: ../certs-dev/broker.crt", "", "cert"),
    ):
        path = tmp_path / "firmware.yaml"
        path.write_text(shipped.replace(old, new))
        with pytest.raises(ConfigError) as err:
            load_firmware_settings(path)
        assert problem in str(err.value) and err.value.line is not None, str(err.value)
