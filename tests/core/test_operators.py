"""operators.yaml parsing, grants, and the envelope policy's topic rules."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from edge_core.errors import ConfigError
from edge_core.operators import (
    DeviceProfile,
    EnvelopePolicy,
    Grant,
    OperatorKeys,
    load_public_key,
    parse_operators,
)
from edge_core.registry import parse_registry

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "operators.yaml"


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _indent(text: str, spaces: int) -> str:
    return "".join(" " * spaces + line + "\n" for line in text.splitlines())


PEM_A = _pem(ec.generate_private_key(ec.SECP256R1()))
PEM_B = _pem(ec.generate_private_key(ec.SECP256R1()))


def doc(operators: str, policy: str = "") -> str:
    return f"version: 1\n{policy}operators:\n{operators}"


def op(name: str = "alice", *, kid: str | None = None, pem: str = PEM_A,
       scope: str = "      - devices: [pump-17]\n", extra: str = "") -> str:
    kid_line = f"        kid: {kid}\n" if kid else ""
    return (f"  {name}:\n    keys:\n      - pem: |\n{_indent(pem, 10)}{kid_line}{extra}"
            f"    scope:\n{scope}")


def error(text: str, **kw: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_operators(text, source="ops.yaml", **kw)  # type: ignore[arg-type]
    assert info.value.source == "ops.yaml"
    return info.value


# --------------------------------------------------------------------------- the example file


def test_example_file_parses() -> None:
    config = parse_operators(EXAMPLE.read_text(), source=str(EXAMPLE))
    assert set(config.operators) == {"alice", "carol"}
    assert [k.kid for k in config.operators["alice"].keys] == ["alice-2025", "alice-2026"]
    assert [k.kid for k in config.operators["carol"].keys] == ["carol"]
    assert config.policy == EnvelopePolicy()
    keys = OperatorKeys.bind(config)
    assert keys.key("alice-2026") is not None and keys.key("alice") is None
    assert keys.may_command("alice", "pump-17")
    assert len(config.digest) == 64


# --------------------------------------------------------------------------- keys


def test_inline_key_default_kid_is_operator_id() -> None:
    config = parse_operators(doc(op()))
    (key,) = config.operators["alice"].keys
    assert key.kid == "alice" and key.operator == "alice"
    assert key.public_pem().decode() == PEM_A


def test_key_file_is_read_through_the_reader_relative_to_the_yaml(tmp_path: Path) -> None:
    seen: list[str] = []

    def read_key(path: str) -> bytes:
        seen.append(path)
        return PEM_B.encode()

    text = doc("  alice:\n    keys:\n      - file: keys/alice.pem\n    scope:\n      - devices: [pump-17]\n")
    config = parse_operators(text, source="/etc/edge/operators.yaml", read_key=read_key)
    assert seen == ["/etc/edge/keys/alice.pem"]
    assert config.operators["alice"].keys[0].public_pem().decode() == PEM_B


def test_key_file_without_reader_is_an_error() -> None:
    text = doc("  alice:\n    keys:\n      - file: alice.pem\n")
    err = error(text)
    assert err.line == 5 and "reader" in str(err)


def test_key_file_unreadable_names_the_line() -> None:
    def read_key(path: str) -> bytes:
        raise FileNotFoundError(2, "No such file or directory", path)

    err = error(doc("  alice:\n    keys:\n      - file: missing.pem\n"), read_key=read_key)
    assert err.line == 5 and "missing.pem" in str(err)


@pytest.mark.parametrize(
    ("pem", "message"),
    [
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a PEM public key"),
        (_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)), "only EC P-256"),
        (_pem(ec.generate_private_key(ec.SECP384R1())), "secp384r1"),
    ],
    ids=["garbage", "rsa", "p384"],
)
def test_bad_keys_are_refused_with_line(pem: str, message: str) -> None:
    err = error(doc(op(pem=pem)))
    assert err.line == 5 and message in str(err)


def test_pem_and_file_together_is_an_error() -> None:
    err = error(doc(op(extra="        file: x.pem\n")))
    assert "exactly one of 'pem' or 'file'" in str(err)


def test_several_keys_need_kids() -> None:
    keys = f"      - pem: |\n{_indent(PEM_A, 10)}      - pem: |\n{_indent(PEM_B, 10)}"
    text = doc(f"  alice:\n    keys:\n{keys}")
    assert "needs a 'kid'" in str(error(text))


def test_duplicate_kid_across_operators() -> None:
    text = doc(op("alice", kid="k1") + op("bob", kid="k1", pem=PEM_B))
    err = error(text)
    assert "kid 'k1' already used" in str(err) and err.line is not None and err.line > 10


def test_kid_may_not_shadow_another_operator() -> None:
    text = doc(op("alice", kid="bob") + op("bob", kid="bob-1", pem=PEM_B))
    assert "also the id of another operator" in str(error(text))


def test_bad_operator_id_and_unknown_keys() -> None:
    assert "operator id" in str(error(doc(op("al/ice"))))
    err = error(doc(op(extra="        colour: red\n")))
    assert "unknown key 'colour'" in str(err)
    assert "unknown key 'extra'" in str(error(doc(op()) + "extra: 1\n"))


def test_duplicate_operator_is_an_error() -> None:
    assert "duplicate key 'alice'" in str(error(doc(op() + op())))


def test_version_and_empty_file() -> None:
    assert "version 2" in str(error("version: 2\noperators: {}\n"))
    assert error("").line == 1


# --------------------------------------------------------------------------- scope


def test_empty_scope_entry_is_an_error() -> None:
    err = error(doc(op(scope="      - {}\n")))
    assert "would match every device" in str(err) and err.line == 11


@pytest.mark.parametrize(
    ("scope", "message"),
    [
        ("      - roles: [Pump]\n", "role 'Pump'"),
        ("      - devices: [pump/#]\n", "widen"),
        ("      - devices: [17]\n", "must be a string"),
        ("      - attributes: {Site: a}\n", "attribute name 'Site'"),
        ("      - attributes: {site: [a]}\n", "must be a string"),
        ("      - colour: red\n", "unknown key 'colour'"),
        ("      - pump-17\n", "must be a mapping"),
    ],
)
def test_bad_scope_entries(scope: str, message: str) -> None:
    err = error(doc(op(scope=scope)))
    assert message in str(err) and err.line == 11


def test_no_scope_means_no_devices() -> None:
    text = doc(f"  alice:\n    keys:\n      - pem: |\n{_indent(PEM_A, 10)}")
    keys = OperatorKeys.bind(parse_operators(text))
    assert not keys.may_command("alice", "pump-17")


REGISTRY = parse_registry(
    "version: 1\ndevices:\n"
    f"  pump-17:\n    pins: [sha256:{'a' * 64}]\n    roles: [pump]\n    attributes: {{site: plant-a}}\n"
    f"  pump-18:\n    pins: [sha256:{'b' * 64}]\n    roles: [pump]\n    attributes: {{site: plant-b}}\n"
    f"  valve-3:\n    pins: [sha256:{'c' * 64}]\n    roles: [valve]\n    attributes: {{site: plant-a}}\n"
)


def test_grants_against_registry_entries() -> None:
    scope = ("      - roles: [pump]\n        attributes: {site: plant-a}\n"
             "      - devices: [valve-9]\n")
    keys = OperatorKeys.bind(parse_operators(doc(op(scope=scope))), REGISTRY)
    assert keys.may_command("alice", "pump-17")  # role and attribute
    assert not keys.may_command("alice", "pump-18")  # role, wrong site
    assert not keys.may_command("alice", "valve-3")  # site, wrong role
    assert keys.may_command("alice", "valve-9")  # explicit id, not in registry
    assert not keys.may_command("alice", "ghost")  # unknown device
    assert not keys.may_command("nobody", "pump-17")  # unknown operator


def test_grant_conditions_are_anded() -> None:
    grant = Grant(devices=frozenset({"pump-17"}), roles=frozenset({"valve"}))
    assert not grant.matches("pump-17", REGISTRY.get("pump-17"))
    with pytest.raises(ConfigError):
        Grant()


def test_for_device_judges_against_the_device_profile() -> None:
    keys = OperatorKeys.bind(parse_operators(doc(op(scope="      - roles: [pump]\n"))))
    assert not keys.may_command("alice", "pump-17")
    mine = keys.for_device(DeviceProfile("pump-17", roles=frozenset({"pump"})))
    assert mine.may_command("alice", "pump-17")
    assert not mine.may_command("alice", "pump-18")


def test_load_public_key_roundtrip() -> None:
    key = load_public_key(PEM_A.encode(), what="k")
    assert isinstance(key, ec.EllipticCurvePublicKey)


# --------------------------------------------------------------------------- policy


def test_policy_section() -> None:
    policy = "policy:\n  max_ttl_seconds: 60\n  max_skew_seconds: 5\n  max_size_bytes: 2048\n" \
             "  command_topic: site/+/{device}/command/#\n  typ: acme-cmd+jwt\n"
    config = parse_operators(doc(op(), policy))
    assert config.policy == EnvelopePolicy(max_ttl=timedelta(seconds=60), max_skew=timedelta(seconds=5),
                                           max_size=2048, command_topic="site/+/{device}/command/#",
                                           typ="acme-cmd+jwt")


@pytest.mark.parametrize(
    "policy",
    [
        "policy:\n  max_ttl_seconds: 0\n",
        "policy:\n  max_ttl_seconds: 86401\n",
        "policy:\n  max_skew_seconds: -1\n",
        "policy:\n  max_size_bytes: 100\n",
        "policy:\n  command_topic: devices/cmd\n",
        "policy:\n  typ: 'a b'\n",
        "policy:\n  max_ttl_seconds: '300'\n",
        "policy:\n  ttl: 300\n",
    ],
)
def test_bad_policy_names_file_and_line(policy: str) -> None:
    err = error(doc(op(), policy))
    assert err.line in (2, 3)


@pytest.mark.parametrize(
    "template",
    ["devices/cmd", "devices/{device}/{device}", "devices/#/{device}", "$SYS/{device}",
     "devices//{device}", "devices/x{device}/cmd", "devices/{device}/c+"],
)
def test_bad_topic_templates(template: str) -> None:
    with pytest.raises(ConfigError):
        EnvelopePolicy(command_topic=template)


@pytest.mark.parametrize(
    ("topic", "device"),
    [
        ("devices/pump-17/cmd", "pump-17"),
        ("devices/pump-17/cmd/set_speed", "pump-17"),
        ("devices/pump-17/cmd/a/b/c", "pump-17"),
        ("devices/pump-17/telemetry", None),
        ("devices/pump-17", None),
        ("devices/+/cmd", None),
        ("devices/#", None),
        ("devices/pump 17/cmd", None),
        ("devices//cmd", None),
        ("other/pump-17/cmd", None),
        ("/devices/pump-17/cmd", None),
    ],
)
def test_device_from_topic(topic: str, device: str | None) -> None:
    policy = EnvelopePolicy()
    assert policy.device_from_topic(topic) == device
    assert policy.is_command_topic(topic) is (device is not None)


def test_topic_helpers() -> None:
    policy = EnvelopePolicy()
    assert policy.topic_for("pump-17") == "devices/pump-17/cmd"
    assert policy.topic_for("pump-17", "set_speed") == "devices/pump-17/cmd/set_speed"
    assert policy.subscription_filter("pump-17") == "devices/pump-17/cmd/#"
    assert policy.broker_filter() == "devices/+/cmd/#"
    with pytest.raises(ValueError, match="plain level"):
        policy.topic_for("pump-17", "a/b")
    exact = EnvelopePolicy(command_topic="cmd/{device}")
    assert exact.device_from_topic("cmd/pump-17") == "pump-17"
    assert exact.device_from_topic("cmd/pump-17/x") is None
    with pytest.raises(ValueError, match="no sub-topic"):
        exact.topic_for("pump-17", "x")
    plus = EnvelopePolicy(command_topic="site/+/{device}/cmd")
    assert plus.device_from_topic("site/plant-a/pump-17/cmd") == "pump-17"
    with pytest.raises(ValueError, match=r"\+"):
        plus.topic_for("pump-17")
