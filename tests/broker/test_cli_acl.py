"""``edge-broker acl check`` and ``acl explain``, called through ``main(argv)``.

Every exit code documented in docs/acl.md has a test here; the decisions are those of
the worked example in docs/acl.md, against the shipped ``configs/acl.yaml``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog

from broker_plugins.cli import main

REPO = Path(__file__).resolve().parents[2]
SHIPPED_ACL = REPO / "configs" / "acl.yaml"
CORPUS = sorted((REPO / "tests" / "core" / "acl_corpus").glob("*.yaml"))


def _pin(char: str) -> str:
    return "sha256:" + char * 64


REGISTRY = f"""\
version: 1
devices:
  pump-17:
    pins: [{_pin("a")}]
    roles: [pump]
    attributes: {{site: plant-a, line: line-3}}
  op-1:
    pins: [{_pin("b")}]
    roles: [operator]
    attributes: {{site: plant-a}}
  sensor-01:
    pins: [{_pin("c")}]
    roles: [sensor]
    attributes: {{site: plant-a, line: line-3}}
  gw-1:
    pins: [{_pin("d")}]
    roles: [gateway]
  pump-99:
    pins: [{_pin("e")}]
    roles: [pump]
    attributes: {{site: plant-a, line: line-3}}
    enabled: false
  gateway-uplink:
    pins: [{_pin("f")}]
    roles: [uplink]
    attributes: {{site: plant-a}}
"""

CLEAN_ACL = """\
version: 1
everyone:
  - allow publish devices/{device}/status
roles:
  pump:
    - allow publish devices/{device}/telemetry/#
"""


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``main`` configures structlog and stdlib logging for the process; undo it after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


RunCli = Callable[..., Run]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> RunCli:
    """``edge-broker ARGV...`` in-process: the exit code and what it printed."""

    def call(*argv: str | Path) -> Run:
        capsys.readouterr()
        code = main([str(arg) for arg in argv])
        captured = capsys.readouterr()
        # "note: no -c/--config given: using ..." is tested in tests/ops; these tests read the error
        err = "".join(line for line in captured.err.splitlines(keepends=True) if not line.startswith("note: "))
        return Run(code, captured.out, err)

    return call


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 2
    return capsys.readouterr().err


def line_of(path: Path, text: str) -> int:
    """The 1-based line of ``path`` that holds ``text`` exactly once."""
    hits = [number for number, line in enumerate(path.read_text().splitlines(), 1) if text in line]
    assert len(hits) == 1, (text, hits)
    return hits[0]


def expectation(path: Path) -> tuple[int, str]:
    line, reason = path.read_text().splitlines()[0].removeprefix("# expect: ").split(" | ", 1)
    return int(line), reason


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(REGISTRY)
    return path


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``configs/broker.yaml`` naming a copy of the shipped ACL and a registry, deployed: the config
    directory (``$EDGE_GATEWAY_CONFIG_DIR``, else /etc/edge-gateway) holds it, so no ``-c`` is needed.
    The working directory is its parent, so rules print as ``configs/acl.yaml:LINE``."""
    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copy(SHIPPED_ACL, configs / "acl.yaml")
    (configs / "registry.yaml").write_text(REGISTRY)
    settings = configs / "broker.yaml"
    settings.write_text(
        "listener:\n"
        "  bind: 127.0.0.1:8883\n"
        "  certfile: certs/broker.crt\n"
        "  keyfile: certs/broker.key\n"
        "  client_ca: certs/ca-chain.pem\n"
        "registry: registry.yaml\n"
        "acl: acl.yaml\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGE_GATEWAY_CONFIG_DIR", str(configs))
    return settings


DEPLOYED_ACL = Path("configs/acl.yaml")  # relative to the deployment's working directory


def deciding_rule(verdict: str) -> tuple[int, str]:
    """The line and text of the rule a verdict line names; checks the file really has it there."""
    match = re.search(r"rule at configs/acl\.yaml:(\d+) `([^`]+)`$", verdict)
    assert match, verdict
    number, text = int(match.group(1)), match.group(2)
    assert DEPLOYED_ACL.read_text().splitlines()[number - 1].strip().startswith(f"- {text}"), (number, text)
    return number, text


# --- acl check ----------------------------------------------------------------------------------


def test_check_clean_file_exits_0(run: RunCli, tmp_path: Path) -> None:
    acl = tmp_path / "acl.yaml"
    acl.write_text(CLEAN_ACL)
    result = run("acl", "check", acl)
    assert result.code == 0, result.out
    assert result.lines[0].startswith(f"{acl}: ok: 2 rules, 0 warnings, 0 info")
    assert "--registry" in result.lines[0]  # says that registry-aware lints did not run
    assert len(result.lines) == 1


def test_check_info_findings_are_printed_but_exit_0(run: RunCli, tmp_path: Path) -> None:
    acl = tmp_path / "acl.yaml"
    acl.write_text(CLEAN_ACL + "    - allow publish devices/{device}/telemetry/#\n")
    result = run("acl", "check", acl)
    assert result.code == 0, result.out
    assert re.fullmatch(rf"{re.escape(str(acl))}:7: info: .*repeats line 6.* \[duplicate_rule\]", result.lines[0])
    assert result.lines[-1].startswith(f"{acl}: ok: 3 rules, 0 warnings, 1 info")


def test_check_shipped_acl_passes_with_its_warnings_acknowledged(run: RunCli, tmp_path: Path,
                                                                 registry: Path) -> None:
    acl = tmp_path / "acl.yaml"
    shutil.copy(SHIPPED_ACL, acl)
    result = run("acl", "check", acl, "--registry", registry)
    assert result.code == 0, result.out
    # The shipped file's deliberate cross-device grants (operator, gateway) are still shown, acknowledged.
    expected = sorted(
        n for n, text in enumerate(acl.read_text().splitlines(), 1)
        if "allow" in text and ("devices/+/" in text or "gateway/validation/+/" in text or "operators/+/" in text)
    )
    assert expected, "configs/acl.yaml no longer has cross-device grants; pick another warning"
    found = []
    for line in result.lines[:-1]:
        match = re.fullmatch(rf"{re.escape(str(acl))}:(\d+): warning: (.+) \[([a-z_]+)\] \(acknowledged\)", line)
        assert match, line
        found.append((int(match.group(1)), match.group(3)))
    assert found == [(number, "cross_device_scope") for number in expected]
    assert re.fullmatch(
        rf"{re.escape(str(acl))}: ok: \d+ rules, 0 warnings \({len(expected)} more acknowledged\), 0 info",
        result.lines[-1],
    )
    # Without the acknowledgements the same file fails the gate, one line per warning.
    acl.write_text("".join(line for line in SHIPPED_ACL.read_text().splitlines(keepends=True)
                           if "acl-check: ack" not in line))
    bare = run("acl", "check", acl, "--registry", registry)
    assert bare.code == 3, bare.out
    assert re.fullmatch(rf"{re.escape(str(acl))}: loads with warnings: \d+ rules, {len(expected)} warnings, 0 info",
                        bare.lines[-1])


def test_check_no_rules_is_a_warning(run: RunCli, tmp_path: Path) -> None:
    acl = tmp_path / "acl.yaml"
    acl.write_text("version: 1\neveryone: []\n")
    result = run("acl", "check", acl)
    assert result.code == 3
    assert result.lines[0].startswith(f"{acl}:1: warning: ")
    assert result.lines[0].endswith("[no_rules]")


def test_check_registry_enables_registry_lints(run: RunCli, tmp_path: Path, registry: Path) -> None:
    acl = tmp_path / "acl.yaml"
    acl.write_text(CLEAN_ACL + "  nobody-has-this:\n    - allow publish x/y\n")
    without = run("acl", "check", acl)
    assert without.code == 0, without.out
    with_registry = run("acl", "check", acl, "--registry", registry)
    assert with_registry.code == 3, with_registry.out
    assert with_registry.lines[0] == (
        f"{acl}:8: warning: no device in {registry} has role 'nobody-has-this', so its rules never apply [unknown_role]"
    )
    assert "--registry" not in with_registry.lines[-1]


@pytest.mark.parametrize("broken", CORPUS, ids=lambda path: path.stem)
def test_check_refused_file_exits_1_naming_file_line_and_reason(run: RunCli, broken: Path) -> None:
    line, reason = expectation(broken)
    result = run("acl", "check", broken)
    assert result.code == 1, result.out
    assert result.lines[0].startswith(f"{broken}:{line}: "), result.out
    assert reason in result.lines[0]
    assert result.lines[-1] == (
        f"{broken}: refused: a running broker keeps its last good policy, a starting one does not start"
    )


def test_check_unreadable_file_exits_4(run: RunCli, tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    result = run("acl", "check", missing)
    assert result.code == 4
    assert result.out == ""
    assert result.err.startswith(f"error: {missing}: cannot read ACL file: ")
    assert run("acl", "check", tmp_path).code == 4  # a directory is not a file


def test_check_unreadable_registry_exits_4(run: RunCli, tmp_path: Path) -> None:
    acl = tmp_path / "acl.yaml"
    acl.write_text(CLEAN_ACL)
    result = run("acl", "check", acl, "--registry", tmp_path / "nope.yaml")
    assert result.code == 4
    assert "cannot read registry" in result.err


def test_check_invalid_registry_exits_2_even_if_the_acl_is_refused(run: RunCli, tmp_path: Path) -> None:
    bad_registry = tmp_path / "registry.yaml"
    bad_registry.write_text("version: 1\ndevices:\n  pump-17:\n    pinz: []\n")
    acl = tmp_path / "acl.yaml"
    acl.write_text(CLEAN_ACL)
    result = run("acl", "check", acl, "--registry", bad_registry)
    assert result.code == 4
    assert result.err.startswith(f"error: {bad_registry}:4: ")
    # An unusable input wins over a verdict on the ACL: nothing was checked.
    assert run("acl", "check", CORPUS[0], "--registry", bad_registry).code == 4


def test_check_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--nope" in usage_error(capsys, "acl", "check", "acl.yaml", "--nope")
    assert "invalid choice" in usage_error(capsys, "acl", "frobnicate")


def test_check_json(run: RunCli, tmp_path: Path, registry: Path) -> None:
    acl = tmp_path / "acl.yaml"
    shutil.copy(SHIPPED_ACL, acl)
    result = run("acl", "check", acl, "--registry", registry, "--json")
    assert result.code == 0
    report = json.loads(result.out)
    assert report["status"] == "ok"
    assert report["exit"] == 0
    assert report["file"] == str(acl)
    assert report["registry"] == str(registry)
    assert report["error"] is None
    assert report["warnings"] == 0 and report["acknowledged"] == len(report["findings"]) > 0
    assert {finding["code"] for finding in report["findings"]} == {"cross_device_scope"}
    assert all(finding["severity"] == "warning" and finding["line"] > 0 and finding["acknowledged"]
               for finding in report["findings"])

    broken = next(path for path in CORPUS if path.stem == "hash_not_last")
    refused = run("acl", "check", broken, "--json")
    assert refused.code == 1
    report = json.loads(refused.out)
    assert report["status"] == "refused"
    assert report["error"]["line"] == expectation(broken)[0]
    assert report["error"]["source"] == str(broken)

    clean = tmp_path / "clean.yaml"
    clean.write_text(CLEAN_ACL)
    ok = run("acl", "check", clean, "--json")
    assert ok.code == 0
    assert json.loads(ok.out)["status"] == "ok"


# --- acl explain --------------------------------------------------------------------------------


def test_explain_matches_the_documented_example(run: RunCli, deployment: Path) -> None:
    deny_line = line_of(DEPLOYED_ACL, "- deny subscribe sites/{site}/admin/#")
    allow_line = line_of(DEPLOYED_ACL, "- allow subscribe sites/{site}/#")
    result = run("acl", "explain", "--device", "op-1", "--subscribe", "sites/plant-a/#", "-c", deployment)
    assert result.code == 0
    assert result.lines == [
        f"device op-1 subscribe 'sites/plant-a/#': allow: rule at configs/acl.yaml:{allow_line} "
        "`allow subscribe sites/{site}/#`",
        f"  overlaps deny  rule at configs/acl.yaml:{deny_line} `deny subscribe sites/{{site}}/admin/#` "
        "(role operator)",
        f"  covers   allow rule at configs/acl.yaml:{allow_line} `allow subscribe sites/{{site}}/#` (role operator)",
        "  granted; messages on topics an overlapping deny matches are withheld at delivery",
        "subject: device op-1; roles: operator; attributes: site=plant-a (from configs/registry.yaml)",
    ]
    receive = run("acl", "explain", "--device", "op-1", "--receive", "sites/plant-a/admin/users", "-c", deployment)
    assert receive.code == 1
    assert receive.lines[0].startswith("device op-1 receive 'sites/plant-a/admin/users': deny: ")


# The worked example of docs/acl.md: device, action, topic, exit code, and the deciding rule's
# text or the reason code when no rule decided.
WORKED_EXAMPLE = [
    ("pump-17", "--publish", "devices/pump-17/telemetry/flow", 0, "allow publish devices/{device}/telemetry/#"),
    ("pump-17", "--publish", "devices/pump-17/telemetry/debug/x", 1, "deny publish devices/pump-17/telemetry/debug/#"),
    ("pump-17", "--publish", "devices/pump-18/telemetry/flow", 1, "no_grant"),
    ("pump-17", "--subscribe", "devices/pump-17/cmd/#", 0, "allow subscribe devices/{device}/cmd/#"),
    ("pump-17", "--subscribe", "devices/pump-17/cmd", 0, "allow subscribe devices/{device}/cmd/#"),
    ("pump-17", "--subscribe", "devices/+/cmd/#", 1, "no_grant"),
    ("pump-17", "--subscribe", "#", 1, "no_grant"),
    (
        "pump-17",
        "--receive",
        "sites/plant-a/lines/line-3/setpoints/speed",
        0,
        "allow subscribe sites/{site}/lines/{line}/setpoints/+",
    ),
    ("pump-17", "--receive", "sites/plant-b/lines/line-3/setpoints/speed", 1, "no_grant"),
    ("pump-17", "--publish", "$SYS/broker/load", 1, "dollar_topic"),
    ("op-1", "--subscribe", "sites/plant-a/lines/#", 0, "allow subscribe sites/{site}/#"),
    ("op-1", "--receive", "sites/plant-a/admin/x", 1, "deny subscribe sites/{site}/admin/#"),
    ("pump-17", "--publish", "devices/pump-17/+", 1, "invalid_topic"),
    ("pump-17", "--receive", "devices/pump-17/cmd/+", 1, "invalid_topic"),  # delivery is of a topic name
    ("pump-17", "--subscribe", "devices/pump-17/cmd/+", 0, "allow subscribe devices/{device}/cmd/#"),
]


@pytest.mark.parametrize(("device", "flag", "topic", "code", "decided_by"), WORKED_EXAMPLE)
def test_explain_worked_example(
    run: RunCli, deployment: Path, device: str, flag: str, topic: str, code: int, decided_by: str
) -> None:
    result = run("acl", "explain", "--device", device, flag, topic)
    assert result.code == code, result.out
    verdict = result.lines[0]
    prefix = f"device {device} {flag.removeprefix('--')} {topic!r}: {'allow' if code == 0 else 'deny'}: "
    assert verdict.startswith(prefix), verdict
    if " " in decided_by:
        assert deciding_rule(verdict)[1] == decided_by
    else:
        assert verdict == prefix + decided_by


def test_explain_lists_the_rules_that_lost(run: RunCli, deployment: Path) -> None:
    result = run("acl", "explain", "--device", "pump-17", "--publish", "devices/pump-17/telemetry/debug/x")
    assert result.code == 1
    assert [line.split()[:2] for line in result.lines[1:3]] == [["matches", "deny"], ["matches", "allow"]]
    assert (
        deciding_rule(result.lines[2].removesuffix(" (role pump)"))[1] == "allow publish devices/{device}/telemetry/#"
    )
    assert result.lines[-1] == (
        "subject: device pump-17; roles: pump; attributes: line=line-3, site=plant-a (from configs/registry.yaml)"
    )


def test_explain_with_explicit_files_needs_no_settings(
    run: RunCli, tmp_path: Path, registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/broker.yaml here
    (tmp_path / "acl.yaml").write_text(CLEAN_ACL)
    explicit = ("--acl", "acl.yaml", "--registry", "registry.yaml")
    allowed = run("acl", "explain", "--device", "pump-17", "--publish", "devices/pump-17/telemetry/x", *explicit)
    assert allowed.code == 0, allowed.err
    assert allowed.lines[0].endswith(": allow: rule at acl.yaml:6 `allow publish devices/{device}/telemetry/#`")
    denied = run("acl", "explain", "--device", "pump-17", "--publish", "devices/pump-17/state", *explicit)
    assert denied.code == 1
    assert denied.lines[0].endswith(": deny: no_grant")
    assert denied.lines[1] == "  no rule of this device, its roles or 'everyone' takes part"


def test_explain_explicit_acl_overrides_the_settings(run: RunCli, deployment: Path) -> None:
    Path("other.yaml").write_text("version: 1\ndevices:\n  pump-17:\n    - deny publish devices/pump-17/telemetry/#\n")
    result = run(
        "acl", "explain", "--device", "pump-17", "--publish", "devices/pump-17/telemetry/flow", "--acl", "other.yaml"
    )
    assert result.code == 1
    assert result.lines[0].endswith(": deny: rule at other.yaml:4 `deny publish devices/pump-17/telemetry/#`")
    assert result.lines[-1].endswith("(from configs/registry.yaml)")  # the registry still comes from the settings


def test_explain_disabled_device_is_denied_with_a_note(run: RunCli, deployment: Path) -> None:
    result = run("acl", "explain", "--device", "pump-99", "--publish", "devices/pump-99/telemetry/flow")
    assert result.code == 1
    assert ": allow: rule at configs/acl.yaml:" in result.lines[0]  # what the ACL alone says
    assert result.lines[-1].startswith("note: pump-99 is disabled in configs/registry.yaml")


def test_explain_unknown_device_exits_4(run: RunCli, deployment: Path) -> None:
    result = run("acl", "explain", "--device", "pump-18", "--publish", "devices/pump-18/status")
    assert result.code == 4
    assert result.out == ""
    assert result.err.startswith("error: configs/registry.yaml: device 'pump-18' is not in the registry")


@pytest.mark.parametrize(
    "broken", [path for path in CORPUS if path.stem in ("hash_not_last", "yaml_syntax")], ids=lambda path: path.stem
)
def test_explain_refused_acl_exits_4(run: RunCli, deployment: Path, broken: Path) -> None:
    line, _ = expectation(broken)
    result = run("acl", "explain", "--device", "pump-17", "--publish", "x", "--acl", broken)
    assert result.code == 4
    assert result.out == ""
    assert result.err.startswith(f"error: {broken}:{line}: ")


def test_explain_refused_registry_exits_4(run: RunCli, deployment: Path) -> None:
    Path("configs/registry.yaml").write_text(REGISTRY.replace("roles: [pump]", "roles: [Pump!]", 1))
    result = run("acl", "explain", "--device", "pump-17", "--publish", "x")
    assert result.code == 4
    assert result.err.startswith("error: configs/registry.yaml:5: ")
    assert "role 'Pump!'" in result.err


def test_explain_unreadable_or_incomplete_settings_exit_4(run: RunCli, deployment: Path) -> None:
    missing = run("acl", "explain", "--device", "pump-17", "--publish", "x", "-c", "nope.yaml")
    assert missing.code == 4
    assert missing.err.startswith("error: nope.yaml: cannot read settings")
    deployment.write_text(deployment.read_text().replace("acl: acl.yaml\n", ""))
    no_acl = run("acl", "explain", "--device", "pump-17", "--publish", "x")
    assert no_acl.code == 4
    assert "names no 'acl:' file" in no_acl.err
    gone = run("acl", "explain", "--device", "pump-17", "--publish", "x", "--acl", "gone.yaml")
    assert gone.code == 4
    assert gone.err.startswith("error: gone.yaml: cannot read ACL file")


def test_explain_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert "one of the arguments" in usage_error(capsys, "acl", "explain", "--device", "pump-17")
    assert "not allowed with" in usage_error(
        capsys, "acl", "explain", "--device", "pump-17", "--publish", "a", "--subscribe", "a"
    )
    assert "--device" in usage_error(capsys, "acl", "explain", "--publish", "a")
    assert "expected one argument" in usage_error(capsys, "acl", "explain", "--device", "pump-17", "--receive")


def test_explain_json(run: RunCli, deployment: Path) -> None:
    result = run("acl", "explain", "--device", "op-1", "--subscribe", "sites/plant-a/admin/#", "--json")
    assert result.code == 1
    report = json.loads(result.out)
    deny_line = line_of(DEPLOYED_ACL, "- deny subscribe sites/{site}/admin/#")
    assert report["device"] == "op-1"
    assert report["roles"] == ["operator"]
    assert report["attributes"] == {"site": "plant-a"}
    assert (report["action"], report["topic"]) == ("subscribe", "sites/plant-a/admin/#")
    assert (report["verdict"], report["allowed"], report["reason"]) == ("deny", False, "denied_by_rule")
    assert report["rule"] == {
        "source": "configs/acl.yaml",
        "line": deny_line,
        "text": "deny subscribe sites/{site}/admin/#",
        "owner": "role operator",
    }
    assert [(m["relation"], m["effect"]) for m in report["matched"]] == [("covers", "deny"), ("covers", "allow")]
    assert len(report["acl"]["digest"]) == 64
    assert report["registry"]["source"] == "configs/registry.yaml"

    allowed = run("acl", "explain", "--device", "pump-17", "--publish", "devices/pump-17/state", "--json")
    assert allowed.code == 0
    assert json.loads(allowed.out)["verdict"] == "allow"
    disabled = json.loads(
        run("acl", "explain", "--device", "pump-99", "--publish", "devices/pump-99/state", "--json").out
    )
    assert (disabled["verdict"], disabled["allowed"], disabled["enabled"]) == ("deny", False, False)
