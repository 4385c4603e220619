"""The topic ACL: format, precedence, subscription containment, $ topics, explain, lint."""

from __future__ import annotations

import dataclasses
import hashlib
import textwrap
from pathlib import Path
from types import MappingProxyType

import pytest

from edge_core.acl import (
    REASONS,
    Decision,
    Policy,
    Subject,
    lint_policy,
    parse_policy,
)
from edge_core.errors import ConfigError
from edge_core.registry import DeviceEntry, Registry

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "acl.yaml"
PIN = "sha256:" + "ab" * 32


def policy_of(body: str, *, attributes: str = "[site, line]") -> Policy:
    text = f"version: 1\nattributes: {attributes}\n" + textwrap.dedent(body)
    return parse_policy(text, source="acl.yaml")


def line_of(policy: Policy, text: str) -> int:
    return next(rule.ref.line for rule in policy.rules if rule.ref.text == text)


PUMP = Subject("pump-17", frozenset({"pump"}), {"site": "plant-a", "line": "line-3"})
OPERATOR = Subject("op-1", frozenset({"operator"}), {"site": "plant-a"})

PUMP_RULES = """
roles:
  pump:
    - allow publish devices/{device}/telemetry/#
    - allow subscribe devices/{device}/cmd/#
    - allow subscribe sites/{site}/lines/{line}/setpoints/+
"""


# --- default deny and precedence ---------------------------------------------------------


def test_a_policy_without_rules_denies_everything() -> None:
    policy = policy_of("roles: {}\n")
    assert policy.rules == ()
    for decision in (
        policy.check_publish(PUMP, "devices/pump-17/telemetry"),
        policy.check_receive(PUMP, "a"),
        policy.check_subscribe(PUMP, "devices/pump-17/cmd"),
    ):
        assert decision == Decision(False, "no_grant")


def test_rules_of_other_roles_and_devices_do_not_apply() -> None:
    policy = policy_of(
        """
        roles:
          sensor: [allow publish shared/x]
        devices:
          pump-18: [allow publish shared/y]
        """
    )
    assert not policy.check_publish(PUMP, "shared/x").allowed
    assert not policy.check_publish(PUMP, "shared/y").allowed
    assert policy.check_publish(Subject("pump-18"), "shared/y").allowed


@pytest.mark.parametrize("deny_first", [True, False])
def test_any_matching_deny_wins_whatever_the_order_or_owner(deny_first: bool) -> None:
    deny = "    - deny publish devices/{device}/telemetry/debug/#\n"
    allow = "    - allow publish devices/{device}/telemetry/#\n"
    body = "roles:\n  pump:\n" + (deny + allow if deny_first else allow + deny)
    body += "devices:\n  pump-17:\n    - allow publish devices/pump-17/telemetry/debug/x\n"
    policy = policy_of(body)
    refused = policy.check_publish(PUMP, "devices/pump-17/telemetry/debug/x")
    assert not refused.allowed
    assert refused.reason == "denied_by_rule"
    assert refused.rule is not None
    assert refused.rule.text == "deny publish devices/{device}/telemetry/debug/#"
    assert policy.check_publish(PUMP, "devices/pump-17/telemetry/temp").allowed


def test_everyone_rules_apply_to_every_device_and_deny_from_there_wins() -> None:
    policy = policy_of(
        """
        everyone:
          - allow publish devices/{device}/status
          - deny publish devices/+/status/forged
        devices:
          pump-17: [allow publish devices/pump-17/status/#]
        """
    )
    assert policy.check_publish(Subject("anyone-1"), "devices/anyone-1/status").allowed
    assert not policy.check_publish(Subject("anyone-1"), "devices/pump-17/status").allowed
    assert policy.check_publish(PUMP, "devices/pump-17/status/ok").allowed
    assert policy.check_publish(PUMP, "devices/pump-17/status/forged").reason == "denied_by_rule"


def test_publish_and_subscribe_are_separate_permissions_and_both_means_both() -> None:
    policy = policy_of(
        """
        devices:
          pump-17:
            - allow publish only/pub
            - allow subscribe only/sub
            - allow both shared/+
        """
    )
    assert policy.check_publish(PUMP, "only/pub").allowed
    assert not policy.check_receive(PUMP, "only/pub").allowed
    assert policy.check_receive(PUMP, "only/sub").allowed
    assert not policy.check_publish(PUMP, "only/sub").allowed
    assert policy.check_publish(PUMP, "shared/x").allowed
    assert policy.check_receive(PUMP, "shared/x").allowed


def test_decision_names_the_rule_file_line_and_text() -> None:
    policy = policy_of(PUMP_RULES)
    decision = policy.check_publish(PUMP, "devices/pump-17/telemetry/temp")
    assert decision.allowed
    assert decision.reason == "allowed"
    assert decision.rule is not None
    assert (decision.rule.source, decision.rule.line) == ("acl.yaml", 6)
    assert decision.rule.owner == "role pump"
    assert str(decision) == "allow: rule at acl.yaml:6 `allow publish devices/{device}/telemetry/#`"
    assert str(policy.check_publish(PUMP, "elsewhere")) == "deny: no_grant"


def test_first_rule_in_file_order_is_reported_when_several_match() -> None:
    policy = policy_of(
        """
        devices:
          pump-17:
            - allow publish a/+
            - allow publish a/#
            - deny publish +/b
            - deny publish a/b
        """
    )
    allowed = policy.check_publish(PUMP, "a/c")
    denied = policy.check_publish(PUMP, "a/b")
    assert allowed.rule is not None and allowed.rule.text == "allow publish a/+"
    assert denied.rule is not None and denied.rule.text == "deny publish +/b"


def test_decision_reasons_are_the_documented_codes() -> None:
    assert set(REASONS) == {"allowed", "no_grant", "denied_by_rule", "invalid_topic", "dollar_topic"}
    with pytest.raises(ValueError, match="unknown decision reason"):
        Decision(False, "nope")


# --- variables ------------------------------------------------------------------------------


def test_variables_bind_identity_and_attributes_as_whole_levels() -> None:
    policy = policy_of(PUMP_RULES)
    assert policy.check_receive(PUMP, "sites/plant-a/lines/line-3/setpoints/speed").allowed
    assert not policy.check_receive(PUMP, "sites/plant-b/lines/line-3/setpoints/speed").allowed
    assert not policy.check_receive(PUMP, "sites/plant-a/lines/line-4/setpoints/speed").allowed
    assert not policy.check_publish(PUMP, "devices/pump-18/telemetry/temp").allowed


def test_a_missing_attribute_gives_no_grant_from_that_rule() -> None:
    policy = policy_of(PUMP_RULES)
    no_line = Subject("pump-17", frozenset({"pump"}), {"site": "plant-a"})
    assert not policy.check_receive(no_line, "sites/plant-a/lines/line-3/setpoints/speed").allowed
    assert policy.check_receive(no_line, "devices/pump-17/cmd/stop").allowed


@pytest.mark.parametrize("value", ["+", "#", "a/b", "a\x00", "$SYS", ""])
def test_unsafe_values_never_widen_a_rule(value: str) -> None:
    policy = policy_of(PUMP_RULES)
    device = Subject(value or "x", frozenset({"pump"}), {"site": value, "line": value})
    if value:
        assert not policy.check_subscribe(device, f"devices/{value}/cmd/#").allowed
        assert not policy.check_subscribe(device, "devices/+/cmd/#").allowed
        assert not policy.check_subscribe(device, "devices/#").allowed
    for topic in ("devices/a/cmd/x", "devices/a/b/cmd/x", "devices//cmd/x", "$SYS/cmd/x"):
        assert not policy.check_receive(device, topic).allowed
    assert not policy.check_subscribe(device, "sites/+/lines/+/setpoints/+").allowed
    assert not policy.check_receive(device, "sites/a/lines/b/setpoints/c").allowed


def test_attribute_named_device_cannot_override_the_identity() -> None:
    policy = policy_of(PUMP_RULES)
    impostor = Subject("pump-17", frozenset({"pump"}), {"device": "pump-18"})
    assert policy.check_publish(impostor, "devices/pump-17/telemetry/t").allowed
    assert not policy.check_publish(impostor, "devices/pump-18/telemetry/t").allowed


def test_subject_from_registry_entry_and_is_frozen() -> None:
    entry = DeviceEntry("pump-17", (PIN,), frozenset({"pump"}), {"site": "plant-a", "line": "line-3"})
    subject = Subject.from_entry(entry)
    assert subject == PUMP
    assert isinstance(subject.attributes, MappingProxyType)
    with pytest.raises(dataclasses.FrozenInstanceError):
        subject.device = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="non-empty"):
        Subject("")


# --- subscriptions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "allowed"),
    [
        ("devices/pump-17/cmd/#", True),
        ("devices/pump-17/cmd/+", True),
        ("devices/pump-17/cmd/stop", True),
        ("devices/pump-17/cmd", True),  # 'cmd/#' also matches its parent
        ("devices/pump-17/+", False),
        ("devices/+/cmd/#", False),
        ("devices/#", False),
        ("#", False),
        ("+/+/+/+", False),
        ("sites/plant-a/lines/line-3/setpoints/+", True),
        ("sites/plant-a/lines/line-3/setpoints/#", False),
        ("sites/plant-a/lines/+/setpoints/+", False),
    ],
)
def test_subscribe_is_granted_only_if_one_grant_covers_every_topic(topic_filter: str, allowed: bool) -> None:
    decision = policy_of(PUMP_RULES).check_subscribe(PUMP, topic_filter)
    assert decision.allowed is allowed
    assert decision.reason == ("allowed" if allowed else "no_grant")


def test_subscribe_is_granted_when_an_allow_covers_it_and_overlapping_denies_withhold_deliveries() -> None:
    policy = policy_of(
        """
        roles:
          operator:
            - allow subscribe sites/{site}/#
            - deny subscribe sites/{site}/admin/#
            - deny subscribe sites/+/vault/secret
        """
    )
    for topic_filter in ("sites/plant-a/#", "sites/plant-a/+/#", "sites/plant-a/lines/#", "sites/plant-a/+/secret",
                         "sites/plant-a/vault/+"):
        assert policy.check_subscribe(OPERATOR, topic_filter).allowed, topic_filter
    # ... and the denied part is withheld message by message
    assert not policy.check_receive(OPERATOR, "sites/plant-a/admin/users").allowed
    assert not policy.check_receive(OPERATOR, "sites/plant-a/vault/secret").allowed
    assert policy.check_receive(OPERATOR, "sites/plant-a/lines/l1").allowed
    assert [r.pattern for r in policy.overlapping_denies(OPERATOR, "sites/plant-a/#")] == [
        "sites/{site}/admin/#", "sites/+/vault/secret"]
    # a deny that covers the whole filter refuses it: nothing could ever be delivered
    for topic_filter in ("sites/plant-a/admin", "sites/plant-a/admin/#", "sites/plant-a/vault/secret"):
        assert policy.check_subscribe(OPERATOR, topic_filter).reason == "denied_by_rule", topic_filter
    assert policy.check_subscribe(OPERATOR, "+/+/vault/#").reason == "no_grant"


def test_dollar_levels_below_the_first_are_ordinary_for_overlap() -> None:
    policy = policy_of('devices:\n  pump-17: ["allow subscribe a/#", "deny subscribe a/b/$x"]\n')
    assert policy.check_subscribe(PUMP, "a/#").allowed
    assert not policy.check_receive(PUMP, "a/b/$x").allowed
    assert policy.check_subscribe(PUMP, "a/b/$x").reason == "denied_by_rule"
    assert policy.check_subscribe(PUMP, "a/c/#").allowed


def test_deny_with_a_missing_attribute_withholds_nothing() -> None:
    policy = policy_of(
        """
        roles:
          operator:
            - allow subscribe plant/#
            - deny subscribe plant/{line}/private
        """
    )
    assert policy.check_subscribe(OPERATOR, "plant/#").allowed  # OPERATOR has no 'line'
    assert policy.check_receive(OPERATOR, "plant/l1/private").allowed
    with_line = Subject("op-2", frozenset({"operator"}), {"line": "l1"})
    assert policy.check_subscribe(with_line, "plant/#").allowed
    assert not policy.check_receive(with_line, "plant/l1/private").allowed
    assert policy.check_subscribe(with_line, "plant/l1/private").reason == "denied_by_rule"


def test_invalid_topics_and_filters_are_decisions_not_exceptions() -> None:
    policy = policy_of('devices:\n  pump-17: ["allow both #"]\n')
    for topic in ("", "a/+", "a/#", "a\x00", "x" * 65536):
        assert policy.check_publish(PUMP, topic) == Decision(False, "invalid_topic")
        assert policy.check_receive(PUMP, topic).reason == "invalid_topic"
    for topic_filter in ("", "a/#/b", "a+", "a\x00"):
        assert policy.check_subscribe(PUMP, topic_filter).reason == "invalid_topic"
    assert policy.check_publish(PUMP, b"a/b").reason == "invalid_topic"  # type: ignore[arg-type]


def test_long_and_unicode_topics() -> None:
    policy = policy_of("devices:\n  pump-17:\n    - allow both 温度/{device}/#\n")
    long_topic = "温度/pump-17/" + "é" * ((65535 - len("温度/pump-17/".encode())) // 2)
    assert len(long_topic.encode()) <= 65535
    assert policy.check_publish(PUMP, long_topic).allowed
    assert policy.check_publish(PUMP, long_topic + "é").reason == "invalid_topic"
    deep = "温度/pump-17/" + "/".join(["ü"] * 5000)
    assert policy.check_receive(PUMP, deep).allowed
    assert policy.check_subscribe(PUMP, "温度/pump-17/+/🌡/#").allowed


# --- $ topics --------------------------------------------------------------------------------


def test_leading_wildcards_never_reach_dollar_topics() -> None:
    policy = policy_of('devices:\n  pump-17: ["allow both #", "allow both +/broker/#"]\n')
    assert policy.check_publish(PUMP, "anything/at/all").allowed
    for topic in ("$SYS/broker/load", "$SYS", "$share/x"):
        assert policy.check_publish(PUMP, topic) == Decision(False, "dollar_topic")
        assert policy.check_receive(PUMP, topic).reason == "dollar_topic"
    assert policy.check_subscribe(PUMP, "$SYS/#").reason == "dollar_topic"
    assert policy.check_subscribe(PUMP, "+/broker/#").allowed  # does not include $SYS/broker


def test_dollar_topics_need_an_explicit_dollar_first_level() -> None:
    policy = policy_of(
        """
        roles:
          gateway:
            - allow subscribe $SYS/broker/clients/#
            - deny subscribe $SYS/broker/clients/secret
            - allow subscribe +/#
        """
    )
    gateway = Subject("gw-1", frozenset({"gateway"}))
    assert policy.check_receive(gateway, "$SYS/broker/clients/connected").allowed
    assert policy.check_subscribe(gateway, "$SYS/broker/clients/connected/#").allowed
    for overlapping in ("$SYS/broker/clients/#", "$SYS/broker/clients/+"):
        assert policy.check_subscribe(gateway, overlapping).allowed  # .../secret is withheld at delivery
    assert not policy.check_receive(gateway, "$SYS/broker/clients/secret").allowed
    assert policy.check_subscribe(gateway, "$SYS/broker/clients/secret").reason == "denied_by_rule"
    assert policy.check_subscribe(gateway, "$SYS/+/clients/secret").reason == "dollar_topic"  # no allow covers
    assert policy.check_subscribe(gateway, "$SYS/broker/#").reason == "dollar_topic"
    assert policy.check_subscribe(gateway, "$SYS/load/#").reason == "dollar_topic"
    assert not policy.check_receive(gateway, "$SYS/broker/load").allowed
    # '+/#' is not refused by the $SYS deny: the two can never match the same topic
    assert policy.check_subscribe(gateway, "+/#").allowed


# --- explain -----------------------------------------------------------------------------------


def test_explain_lists_every_rule_that_took_part_denies_first() -> None:
    policy = policy_of(
        """
        everyone:
          - allow subscribe sites/{site}/#
        roles:
          operator:
            - allow subscribe sites/+/lines/#
            - deny subscribe sites/{site}/admin/#
            - allow subscribe unrelated/#
        """
    )
    explanation = policy.explain(OPERATOR, "receive", "sites/plant-a/admin/users")
    assert explanation.decision == policy.check_receive(OPERATOR, "sites/plant-a/admin/users")
    texts = [matched.rule.ref.text for matched in explanation.matched]
    assert texts == ["deny subscribe sites/{site}/admin/#", "allow subscribe sites/{site}/#"]
    rendered = explanation.render()
    assert rendered.startswith("device op-1 receive 'sites/plant-a/admin/users': deny: rule at acl.yaml:")
    assert "(role operator)" in rendered
    assert "(everyone)" in rendered

    partial = policy.explain(OPERATOR, "subscribe", "sites/+/#")
    assert not partial.decision.allowed
    assert {(m.relation, m.rule.ref.text) for m in partial.matched} == {
        ("overlaps", "deny subscribe sites/{site}/admin/#"),
        ("overlaps", "allow subscribe sites/{site}/#"),
        ("overlaps", "allow subscribe sites/+/lines/#"),
    }


def test_explain_of_a_topic_no_rule_touches() -> None:
    explanation = policy_of(PUMP_RULES).explain(PUMP, "publish", "nowhere")
    assert explanation.matched == ()
    assert "no rule" in explanation.render()
    with pytest.raises(ValueError, match="action"):
        policy_of(PUMP_RULES).explain(PUMP, "delete", "x")  # type: ignore[arg-type]


# --- the policy object -----------------------------------------------------------------------


def test_policy_carries_source_and_sha256_digest_of_the_file() -> None:
    text = EXAMPLE.read_bytes()
    policy = parse_policy(text, source=str(EXAMPLE))
    assert policy.digest == hashlib.sha256(text).hexdigest()
    assert policy.source == str(EXAMPLE)
    assert policy.attributes == frozenset({"site", "line"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.source = "other"  # type: ignore[misc]
    assert parse_policy(text.decode(), source="x").digest == policy.digest


def test_example_config_teaches_what_the_docs_claim() -> None:
    policy = parse_policy(EXAMPLE.read_bytes(), source="configs/acl.yaml")
    assert not policy.check_subscribe(PUMP, "#").allowed
    assert policy.check_subscribe(PUMP, "devices/pump-17/cmd/#").allowed
    assert policy.check_publish(PUMP, "devices/pump-17/telemetry/flow").allowed
    assert policy.check_publish(PUMP, "devices/pump-17/telemetry/debug/x").reason == "denied_by_rule"
    assert policy.check_subscribe(OPERATOR, "sites/plant-a/#").allowed  # the admin deny withholds deliveries
    assert not policy.check_receive(OPERATOR, "sites/plant-a/admin/x").allowed
    assert policy.check_subscribe(OPERATOR, "sites/plant-a/lines/#").allowed
    gateway = Subject("gw-1", frozenset({"gateway"}))
    assert policy.check_subscribe(gateway, "$SYS/broker/clients/#").allowed
    assert policy.check_subscribe(gateway, "$SYS/#").reason == "dollar_topic"
    codes = {finding.code for finding in lint_policy(policy)}
    assert codes == {"cross_device_scope"}


def test_a_failed_parse_raises_and_leaves_nothing_half_built() -> None:
    good = policy_of(PUMP_RULES)
    with pytest.raises(ConfigError) as raised:
        policy_of(PUMP_RULES + "    - allow publish a/#/b\n")
    assert raised.value.line == 9
    assert good.check_publish(PUMP, "devices/pump-17/telemetry/t").allowed


def test_policy_built_directly_still_checks_variables() -> None:
    rules = policy_of(PUMP_RULES).rules
    with pytest.raises(ConfigError, match=r"variable \{site\} is not defined") as raised:
        Policy(rules=rules, attributes=frozenset({"line"}), source="acl.yaml")
    assert raised.value.source == "acl.yaml"
    assert raised.value.line == 8


# --- lint --------------------------------------------------------------------------------------


def registry_of(*entries: DeviceEntry) -> Registry:
    return Registry(devices=MappingProxyType({e.device_id: e for e in entries}), source="registry.yaml")


def codes(policy: Policy, registry: Registry | None = None) -> list[tuple[str, int]]:
    return [(finding.code, finding.line) for finding in lint_policy(policy, registry)]


def test_lint_clean_policy_has_no_findings() -> None:
    registry = registry_of(
        DeviceEntry("pump-17", (PIN,), frozenset({"pump"}), {"site": "plant-a", "line": "line-3"})
    )
    assert lint_policy(policy_of(PUMP_RULES), registry) == []


def test_lint_empty_policy() -> None:
    findings = lint_policy(policy_of("roles: {}\n"))
    assert [(f.severity, f.code) for f in findings] == [("warning", "no_rules")]


def test_lint_rules_that_can_never_apply() -> None:
    policy = policy_of(
        """
        roles:
          pump:
            - allow subscribe sites/{site}/lines/{line}/x
          ghost:
            - allow publish ghost/x
        devices:
          pump-99:
            - allow publish p/x
          pump-17:
            - allow publish +/$SYS/x
        """
    )
    registry = registry_of(DeviceEntry("pump-17", (PIN,), frozenset({"pump"}), {"site": "plant-a"}))
    assert codes(policy, registry) == [
        ("attribute_never_set", 6),
        ("unknown_role", 8),
        ("unknown_device", 11),
        ("dollar_under_wildcard", 13),
    ]
    finding = lint_policy(policy, registry)[0]
    assert str(finding).startswith("acl.yaml:6: warning: ")
    assert "'line'" in finding.message


def test_lint_allow_fully_shadowed_by_a_deny() -> None:
    policy = policy_of(
        """
        everyone:
          - deny both secret/#
        roles:
          pump:
            - allow publish secret/{device}/x
            - deny subscribe cmd/+
            - allow subscribe cmd/{device}
            - allow both cmd/{device}
            - deny publish a/{site}
            - allow publish a/plant-a
        devices:
          pump-17:
            - allow subscribe cmd/pump-17
        """
    )
    # 'allow both cmd/{device}' still allows publish; 'a/{site}' may not cover 'a/plant-a'
    assert codes(policy) == [("shadowed_allow", 8), ("shadowed_allow", 10)]
    registry = registry_of(DeviceEntry("pump-17", (PIN,), frozenset({"pump"}), {"site": "plant-a"}))
    assert ("shadowed_allow", 16) in codes(policy, registry)


def test_lint_grants_that_cross_device_scopes() -> None:
    policy = policy_of(
        """
        roles:
          sensor:
            - allow publish devices/{device}/telemetry
            - allow subscribe devices/+/cmd/#
            - allow subscribe devices/#
            - allow subscribe +/pump-17/cmd
            - deny subscribe devices/+/secret
            - allow subscribe devices/pump-17/cmd
        devices:
          pump-17:
            - allow subscribe devices/+/peer
        """
    )
    assert codes(policy) == [("cross_device_scope", 7), ("cross_device_scope", 8)]


def test_lint_duplicates() -> None:
    policy = policy_of("roles:\n  pump:\n    - allow publish a\n    - allow publish a\n")
    assert [(f.severity, f.code, f.line) for f in lint_policy(policy)] == [("info", "duplicate_rule", 6)]


# --- the corpus of broken files ----------------------------------------------------------------

CORPUS = sorted((Path(__file__).parent / "acl_corpus").glob("*.yaml"))


def expectation(path: Path) -> tuple[int, str]:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} needs '# expect: LINE | REASON' first"
    line, reason = first.removeprefix("# expect: ").split(" | ", 1)
    return int(line), reason


def test_the_corpus_is_there() -> None:
    assert len(CORPUS) >= 25


@pytest.mark.parametrize("path", CORPUS, ids=lambda path: path.stem)
def test_broken_acl_files_are_refused_with_file_and_line(path: Path) -> None:
    line, reason = expectation(path)
    with pytest.raises(ConfigError) as raised:
        parse_policy(path.read_bytes(), source=path.name)
    error = raised.value
    assert (error.source, error.line) == (path.name, line), str(error)
    assert reason in error.reason, str(error)
    assert str(error).startswith(f"{path.name}:{line}: ")
