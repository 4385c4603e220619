"""Properties: the compiled ACL decides exactly as a naive scan with the reference matcher,
and the reference containment/overlap functions agree with brute-force enumeration."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from edge_core import topics
from edge_core.acl import Decision, Permission, Policy, Rule, RuleRef, Subject

# Levels chosen to collide: subject values, '$' levels, empty levels and non-ASCII text.
LITERALS = ["a", "b", "", "$SYS", "$x", "pump-1", "site-a", "ü", "温度"]
VARIABLES = ["{device}", "{site}", "{line}"]

literal_level = st.sampled_from(LITERALS)


@st.composite
def topic_names(draw: st.DrawFn) -> str:
    levels = draw(st.lists(literal_level, min_size=1, max_size=5))
    name = "/".join(levels)
    return name if name else "a"  # a topic is at least one character


@st.composite
def plain_filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.one_of(literal_level, st.just("+")), min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    text = "/".join(levels)
    return text if text else "a"


@st.composite
def rule_patterns(draw: st.DrawFn) -> str:
    levels = draw(
        st.lists(st.one_of(literal_level, st.just("+"), st.sampled_from(VARIABLES)), min_size=1, max_size=4)
    )
    if draw(st.booleans()):
        levels.append("#")
    text = "/".join(levels)
    return text if text else "a"


OWNERS = [("everyone", ""), ("role", "pump"), ("role", "sensor"), ("device", "pump-1"), ("device", "a")]
PERMISSIONS: list[frozenset[Permission]] = [
    frozenset({"publish"}),
    frozenset({"subscribe"}),
    frozenset({"publish", "subscribe"}),
]


@st.composite
def rules(draw: st.DrawFn) -> list[Rule]:
    count = draw(st.integers(min_value=0, max_value=12))
    drawn = []
    for order in range(count):
        kind, owner = draw(st.sampled_from(OWNERS))
        effect = draw(st.sampled_from(["allow", "allow", "deny"]))
        pattern = draw(rule_patterns())
        ref = RuleRef(source="acl.yaml", line=order + 1, text=f"{effect} x {pattern}", owner=owner)
        drawn.append(
            Rule(effect, draw(st.sampled_from(PERMISSIONS)), pattern, kind, owner, ref, order)  # type: ignore[arg-type]
        )
    return drawn


# Device and attribute values include unsafe ones that must never match anything.
VALUES = ["pump-1", "a", "site-a", "ü", "+", "#", "a/b", "$SYS", "", "x\x00"]


@st.composite
def subjects(draw: st.DrawFn) -> Subject:
    device = draw(st.sampled_from([v for v in VALUES if v]))
    roles = draw(st.frozensets(st.sampled_from(["pump", "sensor", "other"]), max_size=2))
    attributes = draw(st.dictionaries(st.sampled_from(["site", "line", "device"]), st.sampled_from(VALUES)))
    return Subject(device, roles, attributes)


def naive_decision(policy: Policy, subject: Subject, action: str, topic: str) -> Decision:
    """The specification, written as plainly as possible: scan every rule."""
    permission = "publish" if action == "publish" else "subscribe"
    target = topic.split("/")
    denies: list[Rule] = []
    allows: list[Rule] = []
    for rule in policy.rules:
        if not rule.applies_to(subject) or permission not in rule.permissions:
            continue
        resolved = rule.resolve(subject)
        if resolved is None:
            continue
        if action == "subscribe":
            # granted when an allow covers the filter; refused only when a deny covers it too
            hit = topics.filter_covers(resolved, target)
        else:
            hit = topics.filter_matches(resolved, target)
        if hit:
            (denies if rule.effect == "deny" else allows).append(rule)
    if denies:
        return Decision(False, "denied_by_rule", min(denies, key=lambda r: r.order).ref)
    if allows:
        return Decision(True, "allowed", min(allows, key=lambda r: r.order).ref)
    return Decision(False, "dollar_topic" if topic.startswith("$") else "no_grant")


def build(drawn: list[Rule]) -> Policy:
    return Policy(rules=tuple(drawn), attributes=frozenset({"site", "line"}), source="acl.yaml")


@settings(max_examples=400, deadline=None)
@given(rules(), subjects(), topic_names())
def test_compiled_topic_decisions_equal_the_naive_scan(
    drawn: list[Rule], subject: Subject, topic: str
) -> None:
    policy = build(drawn)
    assert policy.check_publish(subject, topic) == naive_decision(policy, subject, "publish", topic)
    assert policy.check_receive(subject, topic) == naive_decision(policy, subject, "receive", topic)


@settings(max_examples=400, deadline=None)
@given(rules(), subjects(), plain_filters())
def test_compiled_subscribe_decisions_equal_the_naive_scan(
    drawn: list[Rule], subject: Subject, topic_filter: str
) -> None:
    policy = build(drawn)
    expected = naive_decision(policy, subject, "subscribe", topic_filter)
    assert policy.check_subscribe(subject, topic_filter) == expected


@settings(max_examples=200, deadline=None)
@given(rules(), subjects(), topic_names())
def test_explain_agrees_with_the_decision(drawn: list[Rule], subject: Subject, topic: str) -> None:
    policy = build(drawn)
    explanation = policy.explain(subject, "receive", topic)
    assert explanation.decision == policy.check_receive(subject, topic)
    if explanation.decision.rule is not None:
        assert explanation.matched[0].rule.ref == explanation.decision.rule


@settings(max_examples=300, deadline=None)
@given(subjects(), plain_filters())
def test_a_granted_subscription_delivers_exactly_the_receivable_topics(subject: Subject, topic_filter: str) -> None:
    """The promise the broker relies on: SUBACK granted => every topic the filter matches is
    either receivable or matched by an overlapping deny (withheld at delivery); refused =>
    no topic the filter matches would be delivered through an allow that covers it."""
    policy = build(
        [
            Rule("allow", frozenset({"subscribe"}), "a/#", "everyone", "", RuleRef("x", 1, "t", "e"), 1),
            Rule("deny", frozenset({"subscribe"}), "a/+/b", "everyone", "", RuleRef("x", 2, "t", "e"), 2),
            Rule(
                "allow", frozenset({"subscribe"}), "{device}/#", "everyone", "", RuleRef("x", 3, "t", "e"), 3
            ),
        ]
    )
    levels = topic_filter.split("/")
    matched = [t for t in universe(levels, levels, extra=[subject.device]) if topics.filter_matches(levels, t)]
    if not policy.check_subscribe(subject, topic_filter).allowed:
        return
    denies = [r.levels for r in policy.overlapping_denies(subject, topic_filter)]
    for topic in matched:
        withheld = any(topics.filter_matches(deny, topic) for deny in denies)
        assert policy.check_receive(subject, "/".join(topic)).allowed is not withheld, topic


def universe(first: Sequence[str], second: Sequence[str], extra: Sequence[str] = ()) -> list[list[str]]:
    """Every topic that can tell two filters apart: their literals plus one fresh level
    (and a fresh '$' level), up to one level longer than the longer filter."""
    alphabet = {level for level in (*first, *second, *extra) if level not in ("+", "#") and "/" not in level}
    alphabet |= {"fresh", "$fresh"}
    depth = max(len(first), len(second)) + 1
    found = []
    for length in range(1, depth + 1):
        for combo in itertools.product(sorted(alphabet), repeat=length):
            if all(level not in ("+", "#") and "\x00" not in level for level in combo):
                found.append(list(combo))
    return found


@settings(max_examples=400, deadline=None)
@given(plain_filters(), plain_filters())
def test_containment_and_overlap_agree_with_enumeration(general: str, specific: str) -> None:
    left, right = general.split("/"), specific.split("/")
    space = universe(left, right)
    matched_left = [t for t in space if topics.filter_matches(left, t)]
    matched_right = [t for t in space if topics.filter_matches(right, t)]
    expected_cover = all(topics.filter_matches(left, t) for t in matched_right)
    expected_overlap = any(topics.filter_matches(right, t) for t in matched_left)
    assert topics.filter_covers(left, right) is expected_cover
    assert topics.filters_overlap(left, right) is expected_overlap


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=30))
def test_topic_validation_never_crashes_and_names_agree(value: str) -> None:
    name_ok = topics.topic_name_problem(value) is None
    filter_ok = topics.topic_filter_problem(value) is None
    if name_ok:
        assert filter_ok  # every topic name is also a filter that matches exactly itself
        levels = value.split("/")
        assert topics.filter_matches(levels, levels)
