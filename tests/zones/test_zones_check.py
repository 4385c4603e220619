"""``gateway-agent zones check``: the shipped configs pass; every file of the bad corpus fails with its reason."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge_core import zones
from edge_core.errors import ConfigError
from gateway_agent.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
CORPUS = sorted((Path(__file__).parent / "corpus").glob("*.yaml"))
_HEADER = re.compile(r"# kind: (\w+)\n# expect: (\w+) line (\d+)\n")


def test_shipped_configs_are_compliant(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zones", "check", "--zones", str(CONFIGS / "zones.yaml")]) == 0
    err = capsys.readouterr().err
    assert "compliant" in err
    for name in ("broker.yaml", "agent.yaml", "uplink.yaml", "firmware.yaml"):
        assert name in err  # all four were checked, not skipped


@pytest.mark.parametrize("bad", CORPUS, ids=[p.stem for p in CORPUS])
def test_bad_config_fails_with_its_reason(bad: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header = _HEADER.match(bad.read_text())
    assert header is not None, f"{bad.name}: missing '# kind:' / '# expect:' header"
    kind, code, line = header.groups()
    if kind == "zones":
        argv = ["zones", "check", "--zones", str(bad)]
    else:
        argv = ["zones", "check", "--zones", str(CONFIGS / "zones.yaml"), f"--{kind}", str(bad)]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert f"{bad}:{line}: " in out and f"[{code}]" in out, out
    wanted = [row for row in out.splitlines() if row.startswith(f"{bad}:{line}: ") and row.endswith(f"[{code}]")]
    assert wanted, f"expected {code} at line {line}, got:\n{out}"


def test_broken_file_is_exit_4_not_a_violation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "zones.yaml"
    bad.write_text("version: 1\ngateway: gw\nzones: [{id: 7}]\ninterfaces: {}\n")
    assert main(["zones", "check", "-c", str(bad)]) == 4
    assert f"{bad}:3" in capsys.readouterr().err
    assert main(["zones", "check", "-c", str(tmp_path / "missing.yaml")]) == 4
    assert main(["zones", "check", "-c", str(CONFIGS / "zones.yaml"), "--broker", str(tmp_path / "x")]) == 4
    assert main(["zones", "nft", "-c", str(bad)]) == 4


def test_unknown_key_in_zones_names_file_and_line(tmp_path: Path) -> None:
    text = (CONFIGS / "zones.yaml").read_text().replace("gateway: gw-01", "gateway: gw-01\nfirewall: off")
    with pytest.raises(ConfigError) as err:
        zones.parse_zones(text.encode(), source="z.yaml")
    assert err.value.line == 10
    assert "unknown key 'firewall'" in str(err.value)


def test_every_violation_is_reported_not_only_the_first() -> None:
    text = (CONFIGS / "zones.yaml").read_text() + (
        "  - {name: a, from: 3, to: 2, protocol: mqtt-tls, port: 8883}\n"
        "  - {name: b, from: 2, to: 0, protocol: https, port: 443}\n"
        "  - {name: c, from: 2, to: 3, protocol: http, port: 80}\n")
    found = zones.check_model(zones.parse_zones(text.encode(), source="z.yaml"))
    assert [v.code for v in found] == ["inbound_from_zone3", "zone0_conduit", "plaintext_conduit"]


def test_nft_refuses_a_non_compliant_zone_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rules.nft"
    assert main(["zones", "nft", "--zones", str(CORPUS[0]), "-o", str(out)]) == 1
    assert not out.exists()
    assert main(["zones", "nft", "--zones", str(CONFIGS / "zones.yaml"), "-o", str(out)]) == 0
    text = out.read_text()
    assert "policy drop" in text and 'iifname "eth0"' in text and "tcp dport 8883" in text
    assert 'iifname "eth1"' not in text  # nothing is opened inbound on the Zone 3 interface


def test_user_binding_only_on_outbound_conduits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (CONFIGS / "zones.yaml").read_text()
    bound = text.replace("# user: edge-uplink", "user: edge-uplink")
    model = zones.parse_zones(bound.encode(), source="z.yaml")
    assert 'meta skuid "edge-uplink" tcp dport 8883' in zones.render_nftables(model)
    bad = tmp_path / "zones.yaml"
    bad.write_text(text.replace("    port: 8884\n", "    port: 8884\n    user: edge-broker\n"))
    assert main(["zones", "check", "--zones", str(bad)]) == 4
    assert "only an outbound conduit" in capsys.readouterr().err


def test_firmware_images_conduit_is_the_only_https_into_the_dmz(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    text = (CONFIGS / "zones.yaml").read_text()
    model = zones.parse_zones(text.encode(), source="z.yaml")
    (images,) = [c for c in model.conduits if c.purpose == "firmware-images"]
    assert (images.source_zone, images.target_zone, images.protocol, images.port) == (1, 2, "https", 8470)
    assert zones.check_model(model) == []
    # the same conduit without its declared purpose is an HTTPS inbound like any other: refused
    bare = text.replace("    purpose: firmware-images\n", "")
    found = zones.check_model(zones.parse_zones(bare.encode(), source="z.yaml"))
    assert [v.code for v in found] == ["wrong_protocol"] and "purpose: firmware-images" in found[0].message
    # the purpose fits one direction and protocol only; anything else is refused with file and line
    for old, new in (("    purpose: firmware-images", "    purpose: web-ui"),
                     ("    protocol: https               #", "    protocol: mqtt-tls            #")):
        bad = tmp_path / "zones.yaml"
        bad.write_text(text.replace(old, new))
        assert main(["zones", "check", "--zones", str(bad)]) == 4  # an invalid file: exit 4 (docs/ops.md)
        assert f"{bad}:" in capsys.readouterr().err


def test_image_server_on_the_zone1_address_of_its_conduit_passes() -> None:
    model = zones.parse_zones((CONFIGS / "zones.yaml").read_bytes(), source="zones.yaml")
    site = zones.load_yaml(b"publish:\n  broker: {host: 127.0.0.1}\n  http:\n    bind: 10.10.1.10:8470\n"
                           b"    public_url: https://10.10.1.10:8470\n", source="firmware.yaml")
    assert zones.check_firmware(model, site, source="firmware.yaml") == []
    named = zones.load_yaml(b"publish:\n  http:\n    bind: 10.10.1.10:8470\n"
                            b"    public_url: https://gateway.plant.example:8470\n", source="firmware.yaml")
    assert zones.check_firmware(model, named, source="firmware.yaml") == []


def test_nft_opens_the_image_port_from_zone1_only() -> None:
    model = zones.parse_zones((CONFIGS / "zones.yaml").read_bytes(), source="zones.yaml")
    inbound = [row for row in zones.render_nftables(model).splitlines() if "ct state new accept" in row
               and "iifname" in row]
    assert [row.split("tcp dport ")[1].split()[0] for row in inbound] == ["8883", "8884", "8470"]
    assert all('iifname "eth0" ip saddr { 10.10.1.0/24 } ip daddr { 10.10.1.10 }' in row for row in inbound)
    assert 'comment "firmware-images: Zone 1 -> 2 https"' in inbound[2]
