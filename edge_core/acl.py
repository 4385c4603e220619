"""Per-device topic ACL: parse, compile, decide, explain, lint.

The admin writes one YAML file (see ``configs/acl.yaml`` and ``docs/acl.md``)::

    version: 1
    attributes: [site, line]          # registry attributes that filters may use
    everyone:                         # rules for every authenticated device
      - allow publish devices/{device}/status
    roles:
      sensor:
        - allow publish devices/{device}/telemetry/#
      operator:
        - allow subscribe sites/{site}/#
        - deny subscribe sites/{site}/admin/#
    devices:
      pump-17:
        - allow subscribe devices/pump-17/cmd/#

Semantics, in order of importance:

1. Default deny: nothing is allowed unless a rule allows it.
2. Any matching ``deny`` wins over any ``allow``, whatever their order or owner.
3. ``subscribe`` means receive: it grants SUBSCRIBE and the delivery of messages.
   A SUBSCRIBE is granted only if one allow rule covers every topic the filter can
   match and no deny rule can match any of them; otherwise it is refused, never
   granted-then-filtered.
4. ``{device}`` and ``{attribute}`` are whole levels bound from the authenticated
   identity and the registry. A value that is empty, starts with ``$`` or contains
   ``/``, ``+``, ``#`` or NUL never matches; a missing attribute means the rule does
   not apply to that device.
5. ``$`` topics are reachable only through rules whose first level is that ``$`` level.

``parse_policy`` validates the whole file into a frozen ``Policy`` or raises one
``ConfigError`` naming file, line and reason. Decisions are plain, synchronous and do
not raise on bad input: a bad topic is a ``Decision`` with reason ``invalid_topic``.
Their cost depends on the topic's length and on the rules of the subject's own roles
and device, never on how many devices the file lists: rules are compiled into one
trie per owner (role, device, everyone) and per permission.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal

from edge_core import topics, yamlsrc
from edge_core.errors import ConfigError, CredentialError
from edge_core.identity import check_identity
from edge_core.registry import DeviceEntry, Registry

__all__ = [
    "REASONS",
    "Action",
    "Decision",
    "Effect",
    "Explanation",
    "Finding",
    "MatchedRule",
    "Permission",
    "Policy",
    "Rule",
    "RuleRef",
    "Subject",
    "lint_policy",
    "parse_policy",
]

Effect = Literal["allow", "deny"]
Permission = Literal["publish", "subscribe"]
Action = Literal["publish", "receive", "subscribe"]
OwnerKind = Literal["everyone", "role", "device"]
Severity = Literal["warning", "info"]

#: Stable reason codes of ``Decision.reason``. Never renamed, only added to.
REASONS: Final = ("allowed", "no_grant", "denied_by_rule", "invalid_topic", "dollar_topic")

DEVICE_VARIABLE: Final = "device"
# Same shapes as the registry accepts, so every registry role and attribute can be named here.
_ROLE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_ATTRIBUTE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_VARIABLE_RE = re.compile(r"^\{([^{}]*)\}$")
_EFFECTS: Final = ("allow", "deny")
_PERMISSION_WORDS: Final[Mapping[str, frozenset[Permission]]] = MappingProxyType(
    {
        "publish": frozenset({"publish"}),
        "subscribe": frozenset({"subscribe"}),
        "both": frozenset({"publish", "subscribe"}),
    }
)
_UNSAFE_VALUE_CHARS: Final = ("/", "+", "#", "\x00")
_PUBLISH, _SUBSCRIBE = 0, 1


def _is_bindable(value: object) -> bool:
    """A value may stand for one literal level: never a wildcard, separator or ``$`` level."""
    return (
        isinstance(value, str)
        and value != ""
        and not value.startswith("$")
        and not any(char in value for char in _UNSAFE_VALUE_CHARS)
    )


@dataclass(frozen=True)
class Subject:
    """Who is asking: the authenticated identity, its roles and registry attributes."""

    device: str
    roles: frozenset[str] = frozenset()
    attributes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # The values filters may bind to; unsafe values are left out so they match nothing.
    bindings: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device:
            raise ValueError("subject device must be a non-empty str")
        object.__setattr__(self, "roles", frozenset(self.roles))
        attributes = dict(self.attributes)
        object.__setattr__(self, "attributes", MappingProxyType(attributes))
        bindings = {
            name: value
            for name, value in attributes.items()
            if name != DEVICE_VARIABLE and _is_bindable(value)
        }
        if _is_bindable(self.device):
            bindings[DEVICE_VARIABLE] = self.device
        object.__setattr__(self, "bindings", bindings)

    @classmethod
    def from_entry(cls, entry: DeviceEntry) -> Subject:
        return cls(device=entry.device_id, roles=entry.roles, attributes=entry.attributes)


@dataclass(frozen=True)
class RuleRef:
    """Where a rule was written and how, for explanations and logs."""

    source: str
    line: int
    text: str
    owner: str  # "everyone", "role sensor" or "device pump-17"

    def __str__(self) -> str:
        return f"rule at {self.source}:{self.line} `{self.text}`"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    rule: RuleRef | None = None

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown decision reason {self.reason!r}")

    def __str__(self) -> str:
        verdict = "allow" if self.allowed else "deny"
        return f"{verdict}: {self.rule}" if self.rule is not None else f"{verdict}: {self.reason}"


_NO_GRANT: Final = Decision(False, "no_grant")
_DOLLAR_TOPIC: Final = Decision(False, "dollar_topic")
_INVALID_TOPIC: Final = Decision(False, "invalid_topic")


def _split_pattern(pattern: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """Levels and variable names of an ACL filter; ``ValueError`` says what is wrong."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("the topic filter is empty")
    levels = tuple(pattern.split(topics.SEPARATOR))
    variables: set[str] = set()
    for level in levels:
        match = _VARIABLE_RE.match(level)
        if match is not None:
            name = match.group(1)
            if not _ATTRIBUTE_RE.match(name):
                raise ValueError(f"variable {level!r} must be a name like {{device}} or {{site}}")
            variables.add(name)
        elif "{" in level or "}" in level:
            raise ValueError(
                f"level {level!r}: a variable must occupy a whole level, like devices/{{device}}/status"
            )
    problem = topics.topic_filter_problem(pattern)
    if problem is not None:
        raise ValueError(f"topic filter {pattern!r}: {problem}")
    return levels, frozenset(variables)


@dataclass(frozen=True)
class Rule:
    """One line of the ACL: ``allow|deny publish|subscribe|both FILTER`` for one owner."""

    effect: Effect
    permissions: frozenset[Permission]
    pattern: str
    owner_kind: OwnerKind
    owner: str  # role name or device id; "" for everyone
    ref: RuleRef
    order: int = 0  # position in the file; earlier rules are reported first
    levels: tuple[str, ...] = field(init=False, repr=False)
    variables: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.effect not in _EFFECTS:
            raise ValueError(f"effect must be 'allow' or 'deny', not {self.effect!r}")
        if not self.permissions or not self.permissions <= {"publish", "subscribe"}:
            raise ValueError(f"permissions must be publish and/or subscribe, not {set(self.permissions)}")
        if self.owner_kind not in ("everyone", "role", "device"):
            raise ValueError(f"owner kind {self.owner_kind!r} is not everyone, role or device")
        levels, variables = _split_pattern(self.pattern)
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "variables", variables)

    def applies_to(self, subject: Subject) -> bool:
        if self.owner_kind == "everyone":
            return True
        if self.owner_kind == "role":
            return self.owner in subject.roles
        return self.owner == subject.device

    def resolve(self, subject: Subject) -> tuple[str, ...] | None:
        """The filter levels with variables bound, or None if a value is missing or unsafe."""
        if not self.variables:
            return self.levels
        resolved: list[str] = []
        for level in self.levels:
            match = _VARIABLE_RE.match(level)
            if match is None:
                resolved.append(level)
                continue
            value = subject.bindings.get(match.group(1))
            if value is None:
                return None
            resolved.append(value)
        return tuple(resolved)


# --- the compiled form ------------------------------------------------------------------


class _Hit:
    """A rule as stored in the trie, with its decision made once at compile time."""

    __slots__ = ("decision", "order", "rule")

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.order = rule.order
        allowed = rule.effect == "allow"
        self.decision = Decision(allowed, "allowed" if allowed else "denied_by_rule", rule.ref)


_NO_CHILDREN: Final[dict[str, Any]] = {}  # shared and never written: most nodes are leaves


class _Node:
    __slots__ = (
        "deny_below",
        "end_allow",
        "end_deny",
        "hash_allow",
        "hash_deny",
        "literal",
        "plus",
        "variables",
    )

    def __init__(self) -> None:
        self.literal: dict[str, _Node] = _NO_CHILDREN
        self.plus: _Node | None = None
        self.variables: tuple[tuple[str, _Node], ...] = ()
        self.end_allow: _Hit | None = None  # filters ending exactly here
        self.end_deny: _Hit | None = None
        self.hash_allow: _Hit | None = None  # filters ending in '#' here
        self.hash_deny: _Hit | None = None
        self.deny_below = False  # any deny here or in the subtree; prunes overlap searches

    def child(self, level: str) -> _Node:
        if level == topics.SINGLE_LEVEL:
            if self.plus is None:
                self.plus = _Node()
            return self.plus
        match = _VARIABLE_RE.match(level)
        if match is not None:
            name = match.group(1)
            for existing_name, existing in self.variables:
                if existing_name == name:
                    return existing
            node = _Node()
            self.variables = (*self.variables, (name, node))
            return node
        if self.literal is _NO_CHILDREN:
            self.literal = {}
        existing_child = self.literal.get(level)
        if existing_child is None:
            existing_child = self.literal[level] = _Node()
        return existing_child


def _earlier(current: _Hit | None, candidate: _Hit | None) -> _Hit | None:
    if candidate is None:
        return current
    if current is None or candidate.order < current.order:
        return candidate
    return current


def _insert(root: _Node, rule: Rule, hit: _Hit) -> None:
    node = root
    path = [root]
    hashed = rule.levels[-1] == topics.MULTI_LEVEL
    for level in rule.levels[:-1] if hashed else rule.levels:
        node = node.child(level)
        path.append(node)
    deny = rule.effect == "deny"
    if hashed:
        if deny:
            node.hash_deny = _earlier(node.hash_deny, hit)
        else:
            node.hash_allow = _earlier(node.hash_allow, hit)
    elif deny:
        node.end_deny = _earlier(node.end_deny, hit)
    else:
        node.end_allow = _earlier(node.end_allow, hit)
    if deny:
        for visited in path:
            visited.deny_below = True


_Roots = tuple[_Node | None, _Node | None]  # indexed by _PUBLISH, _SUBSCRIBE


@dataclass(frozen=True)
class _Index:
    everyone: _Roots
    roles: Mapping[str, _Roots]
    devices: Mapping[str, _Roots]


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Building 100k-rule tries allocates only acyclic objects, yet the cyclic collector
    rescans the growing heap again and again (5x the compile time); pause it meanwhile."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _compile(rules: Iterable[Rule]) -> _Index:
    everyone: list[_Node | None] = [None, None]
    roles: dict[str, list[_Node | None]] = {}
    devices: dict[str, list[_Node | None]] = {}
    for rule in rules:
        if rule.owner_kind == "everyone":
            roots = everyone
        elif rule.owner_kind == "role":
            roots = roles.setdefault(rule.owner, [None, None])
        else:
            roots = devices.setdefault(rule.owner, [None, None])
        hit = _Hit(rule)
        for permission in rule.permissions:
            slot = _PUBLISH if permission == "publish" else _SUBSCRIBE
            root = roots[slot]
            if root is None:
                root = roots[slot] = _Node()
            _insert(root, rule, hit)
    return _Index(
        everyone=(everyone[0], everyone[1]),
        roles={name: (pair[0], pair[1]) for name, pair in roles.items()},
        devices={name: (pair[0], pair[1]) for name, pair in devices.items()},
    )


def _match_topic(
    root: _Node, levels: list[str], bindings: Mapping[str, str], dollar: bool, found: list[_Hit | None]
) -> None:
    """Walk the trie along a topic; keep the earliest matching deny and allow in ``found``."""
    frontier = [root]
    leading_wildcards = not dollar  # '+'/'#' at the first level never match a '$' topic
    for level in levels:
        following: list[_Node] = []
        for node in frontier:
            if leading_wildcards:
                if node.hash_deny is not None:
                    found[0] = _earlier(found[0], node.hash_deny)
                if node.hash_allow is not None:
                    found[1] = _earlier(found[1], node.hash_allow)
                if node.plus is not None:
                    following.append(node.plus)
            child = node.literal.get(level)
            if child is not None:
                following.append(child)
            for name, variable_child in node.variables:
                if bindings.get(name) == level:
                    following.append(variable_child)
        if not following:
            return
        frontier = following
        leading_wildcards = True
    for node in frontier:
        # Filters ending here match; so do 'x/#' filters, which also match their parent 'x'.
        found[0] = _earlier(_earlier(found[0], node.end_deny), node.hash_deny)
        found[1] = _earlier(_earlier(found[1], node.end_allow), node.hash_allow)


def _find_cover(
    node: _Node, levels: list[str], index: int, bindings: Mapping[str, str], best: _Hit | None,
    deny: bool = False,
) -> _Hit | None:
    """Earliest allow (or, with ``deny``, deny) whose filter matches every topic the subscription filter matches."""
    if deny and not node.deny_below:
        return best
    dollar_first = index == 0 and levels[0].startswith("$")
    hash_hit = node.hash_deny if deny else node.hash_allow
    if hash_hit is not None and not dollar_first:
        best = _earlier(best, hash_hit)
    if index == len(levels):
        return _earlier(best, node.end_deny if deny else node.end_allow)
    level = levels[index]
    if level == topics.MULTI_LEVEL:
        return best  # only a '#' rule, checked above, covers a '#'
    if level == topics.SINGLE_LEVEL:
        # only '+' covers '+'; literals and variables are single values
        return best if node.plus is None else _find_cover(node.plus, levels, index + 1, bindings, best, deny)
    child = node.literal.get(level)
    if child is not None:
        best = _find_cover(child, levels, index + 1, bindings, best, deny)
    for name, variable_child in node.variables:
        if bindings.get(name) == level:
            best = _find_cover(variable_child, levels, index + 1, bindings, best, deny)
    if node.plus is not None and not dollar_first:
        best = _find_cover(node.plus, levels, index + 1, bindings, best, deny)
    return best


# --- the policy -------------------------------------------------------------------------


@dataclass(frozen=True)
class MatchedRule:
    """A rule that took part in a decision. ``relation`` is ``matches`` (a topic),
    ``covers`` (a subscription filter) or ``overlaps`` (part of a subscription filter)."""

    rule: Rule
    relation: Literal["matches", "covers", "overlaps"]

    def __str__(self) -> str:
        return f"{self.relation:8} {self.rule.effect:5} {self.rule.ref} ({self.rule.ref.owner})"


@dataclass(frozen=True)
class Explanation:
    """A decision and every rule that took part in it, denies first, then in file order."""

    subject: Subject
    action: Action
    topic: str
    decision: Decision
    matched: tuple[MatchedRule, ...]

    def render(self) -> str:
        lines = [f"device {self.subject.device} {self.action} {self.topic!r}: {self.decision}"]
        lines.extend(f"  {matched}" for matched in self.matched)
        if self.action == "subscribe" and self.decision.allowed and any(
            m.relation == "overlaps" and m.rule.effect == "deny" for m in self.matched
        ):
            lines.append("  granted; messages on topics an overlapping deny matches are withheld at delivery")
        if not self.matched:
            lines.append("  no rule of this device, its roles or 'everyone' takes part")
        return "\n".join(lines)


@dataclass(frozen=True)
class Policy:
    """A compiled ACL. Immutable: a reload builds a new Policy and swaps it in whole."""

    rules: tuple[Rule, ...]
    attributes: frozenset[str] = frozenset()
    source: str = "<acl>"
    digest: str = ""
    _index: _Index = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(sorted(self.rules, key=lambda rule: rule.order)))
        object.__setattr__(self, "attributes", frozenset(self.attributes))
        declared = self.attributes | {DEVICE_VARIABLE}
        for rule in self.rules:
            undefined = sorted(rule.variables - declared)
            if undefined:
                raise ConfigError(
                    f"rule `{rule.ref.text}`: variable {{{undefined[0]}}} is not defined; "
                    f"use {{device}} or declare it under 'attributes:' (declared: {sorted(self.attributes)})",
                    source=rule.ref.source,
                    line=rule.ref.line,
                )
        with _cyclic_gc_paused():
            object.__setattr__(self, "_index", _compile(self.rules))

    def _roots(self, subject: Subject, slot: int) -> list[_Node]:
        index = self._index
        roots: list[_Node] = []
        root = index.everyone[slot]
        if root is not None:
            roots.append(root)
        for role in subject.roles:
            pair = index.roles.get(role)
            if pair is not None and (root := pair[slot]) is not None:
                roots.append(root)
        pair = index.devices.get(subject.device)
        if pair is not None and (root := pair[slot]) is not None:
            roots.append(root)
        return roots

    def _check_topic(self, subject: Subject, topic: str, slot: int) -> Decision:
        if not isinstance(topic, str) or topics.topic_name_problem(topic) is not None:
            return _INVALID_TOPIC
        levels = topic.split(topics.SEPARATOR)
        dollar = topic.startswith("$")
        found: list[_Hit | None] = [None, None]
        for root in self._roots(subject, slot):
            _match_topic(root, levels, subject.bindings, dollar, found)
        deny, allow = found
        if deny is not None:
            return deny.decision
        if allow is not None:
            return allow.decision
        return _DOLLAR_TOPIC if dollar else _NO_GRANT

    def check_publish(self, subject: Subject, topic: str) -> Decision:
        """May ``subject`` publish to ``topic`` (a topic name)?"""
        return self._check_topic(subject, topic, _PUBLISH)

    def check_receive(self, subject: Subject, topic: str) -> Decision:
        """May ``subject`` be delivered a message on ``topic`` (live, retained, will or queued)?"""
        return self._check_topic(subject, topic, _SUBSCRIBE)

    def check_subscribe(self, subject: Subject, topic_filter: str) -> Decision:
        """May ``subject`` subscribe to ``topic_filter``? Granted when an allow rule covers the
        filter (matches every topic it can match) and no deny rule covers it. A deny that
        covers only part of a granted filter does not refuse it: the broker withholds those
        messages at delivery (``check_receive``), as ``overlapping_denies`` lists."""
        if not isinstance(topic_filter, str) or topics.topic_filter_problem(topic_filter) is not None:
            return _INVALID_TOPIC
        levels = topic_filter.split(topics.SEPARATOR)
        bindings = subject.bindings
        roots = self._roots(subject, _SUBSCRIBE)
        deny: _Hit | None = None
        for root in roots:
            deny = _find_cover(root, levels, 0, bindings, deny, deny=True)
        if deny is not None:
            return deny.decision
        allow: _Hit | None = None
        for root in roots:
            allow = _find_cover(root, levels, 0, bindings, allow)
        if allow is not None:
            return allow.decision
        return _DOLLAR_TOPIC if topic_filter.startswith("$") else _NO_GRANT

    def overlapping_denies(self, subject: Subject, topic_filter: str) -> tuple[Rule, ...]:
        """Deny rules that withhold part of what ``topic_filter`` matches (enforced per delivery)."""
        if topics.topic_filter_problem(topic_filter) is not None:
            return ()
        target = topic_filter.split(topics.SEPARATOR)
        found = []
        for rule in self.rules_for(subject):
            resolved = rule.resolve(subject)
            if rule.effect == "deny" and "subscribe" in rule.permissions and resolved is not None \
                    and topics.filters_overlap(resolved, target) and not topics.filter_covers(resolved, target):
                found.append(rule)
        return tuple(found)

    def check(self, subject: Subject, action: Action, topic: str) -> Decision:
        if action == "publish":
            return self.check_publish(subject, topic)
        if action == "receive":
            return self.check_receive(subject, topic)
        if action == "subscribe":
            return self.check_subscribe(subject, topic)
        raise ValueError(f"action must be publish, receive or subscribe, not {action!r}")

    def rules_for(self, subject: Subject) -> tuple[Rule, ...]:
        """The rules that apply to ``subject`` (everyone, its roles, its device), in file order."""
        return tuple(rule for rule in self.rules if rule.applies_to(subject))

    def explain(self, subject: Subject, action: Action, topic: str) -> Explanation:
        """The decision and every rule that took part, found by the slow reference matcher."""
        decision = self.check(subject, action, topic)
        permission: Permission = "publish" if action == "publish" else "subscribe"
        matched: list[MatchedRule] = []
        if decision.reason != "invalid_topic":
            target = topic.split(topics.SEPARATOR)
            for rule in self.rules_for(subject):
                resolved = rule.resolve(subject)
                if permission not in rule.permissions or resolved is None:
                    continue
                if action != "subscribe":
                    if topics.filter_matches(resolved, target):
                        matched.append(MatchedRule(rule, "matches"))
                elif topics.filter_covers(resolved, target):
                    matched.append(MatchedRule(rule, "covers"))
                elif topics.filters_overlap(resolved, target):
                    # an overlapping deny withholds those messages at delivery; it does not refuse
                    matched.append(MatchedRule(rule, "overlaps"))
        rank = {"deny": 0, "allow": 1}
        matched.sort(key=lambda m: (rank[m.rule.effect], m.relation == "overlaps", m.rule.order))
        return Explanation(subject, action, topic, decision, tuple(matched))


# --- parsing ----------------------------------------------------------------------------

_SECTIONS_HINT = (
    "add 'everyone:', 'roles:' or 'devices:' with rules like 'allow publish devices/{device}/status'"
)


def parse_policy(text: str | bytes, *, source: str = "<acl>") -> Policy:
    """Validate an ACL file into a ``Policy``; raise ``ConfigError`` naming file, line and reason."""
    with _cyclic_gc_paused():
        return _parse_policy(text.encode("utf-8") if isinstance(text, str) else text, source)


def _parse_policy(raw: bytes, source: str) -> Policy:
    document = yamlsrc.load(raw, source=source)
    if document is None:
        raise ConfigError(
            f"ACL file is empty; it needs 'version: 1'; {_SECTIONS_HINT}", source=source, line=1
        )
    top = yamlsrc.Section(document, source=source, what="acl")
    version = top.take("version", int, required=True)
    if version != 1:
        raise top.error("version", f"ACL version {version} is not supported; use 1")
    attributes = _parse_attributes(top.take("attributes", list, []), top)
    if not any(key in document for key in ("everyone", "roles", "devices")):
        raise ConfigError(f"ACL file has no rules; {_SECTIONS_HINT}", source=source, line=top.line)
    rules: list[Rule] = []
    everyone = top.take("everyone", object, None)
    if everyone is not None:
        if not isinstance(everyone, list):
            raise top.error("everyone", "'everyone' must be a list of rules")
        rules.extend(_parse_rules(everyone, "everyone", "", source=source, line=top.line_of("everyone")))
    for kind in ("roles", "devices"):
        section = top.sub(kind)
        if section is None:
            continue
        for owner, body, line in section.items():
            owner_kind: OwnerKind = "role" if kind == "roles" else "device"
            _check_owner(owner_kind, owner, source=source, line=line)
            if body is None:
                continue
            if not isinstance(body, list):
                raise ConfigError(
                    f"{owner_kind} '{owner}': must be a list of rules "
                    "like '- allow publish devices/{device}/status'",
                    source=source,
                    line=line,
                )
            rules.extend(_parse_rules(body, owner_kind, owner, source=source, line=line))
    top.done()
    return Policy(
        rules=tuple(rules), attributes=attributes, source=source, digest=hashlib.sha256(raw).hexdigest()
    )


def _parse_attributes(names: list[Any], top: yamlsrc.Section) -> frozenset[str]:
    declared: set[str] = set()
    for index, name in enumerate(names):
        line = _item_line(names, index, top.line_of("attributes"))
        if not isinstance(name, str) or not _ATTRIBUTE_RE.match(name) or name == DEVICE_VARIABLE:
            raise ConfigError(
                f"attribute {name!r} must match {_ATTRIBUTE_RE.pattern} and not be '{DEVICE_VARIABLE}' "
                "({device} is always defined)",
                source=top.source,
                line=line,
            )
        if name in declared:
            raise ConfigError(f"attribute '{name}' declared twice", source=top.source, line=line)
        declared.add(name)
    return frozenset(declared)


def _check_owner(kind: OwnerKind, owner: str, *, source: str, line: int | None) -> None:
    if kind == "role" and not _ROLE_RE.match(owner):
        raise ConfigError(f"role {owner!r} must match {_ROLE_RE.pattern}", source=source, line=line)
    if kind == "device":
        try:
            check_identity(owner)
        except CredentialError as exc:
            raise ConfigError(f"device id: {exc}", source=source, line=line) from exc


def _parse_rules(
    items: list[Any], kind: OwnerKind, owner: str, *, source: str, line: int | None
) -> list[Rule]:
    label = "everyone" if kind == "everyone" else f"{kind} {owner}"
    rules = []
    for index, item in enumerate(items):
        item_line = _item_line(items, index, line) or 1
        rules.append(_parse_rule(item, kind, owner, label, source=source, line=item_line, position=index))
    return rules


def _parse_rule(
    item: Any, kind: OwnerKind, owner: str, label: str, *, source: str, line: int, position: int
) -> Rule:
    def refuse(reason: str) -> ConfigError:
        return ConfigError(f"{label}: {reason}", source=source, line=line)

    if not isinstance(item, str):
        raise refuse(f"a rule must be a string like 'allow publish devices/{{device}}/status', not {item!r}")
    words = item.split(None, 2)
    if not words or words[0] not in _EFFECTS:
        raise refuse(f"rule {item!r} must start with 'allow' or 'deny'")
    if len(words) < 2 or words[1] not in _PERMISSION_WORDS:
        raise refuse(f"rule {item!r}: the second word must be one of {', '.join(_PERMISSION_WORDS)}")
    if len(words) < 3:
        raise refuse(
            f"rule {item!r} has no topic filter (a filter starting with '#' must be quoted, "
            "because YAML reads ' #' as a comment: - \"allow subscribe #\")"
        )
    effect: Effect = "allow" if words[0] == "allow" else "deny"
    pattern = words[2]
    try:
        return Rule(
            effect=effect,
            permissions=_PERMISSION_WORDS[words[1]],
            pattern=pattern,
            owner_kind=kind,
            owner=owner,
            ref=RuleRef(source=source, line=line, text=f"{words[0]} {words[1]} {pattern}", owner=label),
            order=line * 10_000 + position,  # position in the file, for reporting the first rule
        )
    except ValueError as exc:
        raise refuse(f"rule {item!r}: {exc}") from exc


def _item_line(sequence: Any, index: int, fallback: int | None) -> int | None:
    lines = getattr(sequence, "item_lines", None)
    return lines[index] if lines and index < len(lines) else fallback


# --- lint -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """Something legal but probably wrong in an ACL file. ``code`` is stable."""

    severity: Severity
    code: str
    source: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.severity}: {self.message} [{self.code}]"


_Reporter = Callable[[Severity, str, int, str], None]


def lint_policy(policy: Policy, registry: Registry | None = None) -> list[Finding]:
    """Findings about ``policy``, with the registry when given, sorted by line."""
    findings: list[Finding] = []

    def report(severity: Severity, code: str, line: int, message: str) -> None:
        findings.append(Finding(severity, code, policy.source, line, message))

    if not policy.rules:
        report("warning", "no_rules", 1, "the ACL has no rules, so every publish and subscribe is denied")
    _lint_duplicates(policy, report)
    _lint_dollar_under_wildcard(policy, report)
    _lint_shadowed(policy, registry, report)
    _lint_cross_device(policy, report)
    if registry is not None:
        _lint_against_registry(policy, registry, report)
    return sorted(findings, key=lambda finding: (finding.line, finding.code))


def _lint_duplicates(policy: Policy, report: _Reporter) -> None:
    seen: dict[tuple[str, str, str], Rule] = {}
    for rule in policy.rules:
        key = (rule.owner_kind, rule.owner, rule.ref.text)
        first = seen.setdefault(key, rule)
        if first is not rule:
            report(
                "info",
                "duplicate_rule",
                rule.ref.line,
                f"`{rule.ref.text}` repeats line {first.ref.line} for {rule.ref.owner}",
            )


def _lint_dollar_under_wildcard(policy: Policy, report: _Reporter) -> None:
    for rule in policy.rules:
        if rule.levels[0] in (topics.SINGLE_LEVEL, topics.MULTI_LEVEL) and any(
            level.startswith("$") for level in rule.levels[1:]
        ):
            report(
                "warning",
                "dollar_under_wildcard",
                rule.ref.line,
                f"`{rule.ref.text}` never matches a $ topic such as $SYS/...: a leading '+' or '#' "
                "skips $ topics and '$' is special only at the first level; write the $ level first",
            )


def _deny_applies_wherever(deny: Rule, allow: Rule, registry: Registry | None) -> bool:
    """Does ``deny`` apply to every subject that ``allow`` applies to?"""
    if deny.owner_kind == "everyone":
        return True
    if (deny.owner_kind, deny.owner) == (allow.owner_kind, allow.owner):
        return True
    if deny.owner_kind == "role" and allow.owner_kind == "device" and registry is not None:
        entry = registry.get(allow.owner)
        return entry is not None and deny.owner in entry.roles
    return False


def _lint_shadowed(policy: Policy, registry: Registry | None, report: _Reporter) -> None:
    denies = [rule for rule in policy.rules if rule.effect == "deny"]
    for allow in policy.rules:
        if allow.effect != "allow":
            continue
        shadow: Rule | None = None
        for permission in allow.permissions:
            shadow = next(
                (
                    deny
                    for deny in denies
                    if permission in deny.permissions
                    and _deny_applies_wherever(deny, allow, registry)
                    # variables compare as literal names: {site} is covered by '+' or {site}
                    and topics.filter_covers(deny.levels, allow.levels)
                ),
                None,
            )
            if shadow is None:
                break
        if shadow is not None:
            report(
                "warning",
                "shadowed_allow",
                allow.ref.line,
                f"`{allow.ref.text}` can never allow anything: deny at line {shadow.ref.line} "
                f"`{shadow.ref.text}` covers it, and any deny wins",
            )


def _lint_cross_device(policy: Policy, report: _Reporter) -> None:
    device_variable = "{" + DEVICE_VARIABLE + "}"
    scopes: dict[tuple[str, ...], Rule] = {}
    for rule in policy.rules:
        for position, level in enumerate(rule.levels):
            if level == device_variable:
                scopes.setdefault(rule.levels[:position], rule)
    for rule in policy.rules:
        if rule.effect != "allow" or rule.owner_kind == "device":
            continue
        for prefix, scoped in scopes.items():
            if _reaches_all_devices(rule.levels, prefix):
                scope = topics.SEPARATOR.join((*prefix, device_variable))
                report(
                    "warning",
                    "cross_device_scope",
                    rule.ref.line,
                    f"{rule.ref.owner} `{rule.ref.text}` reaches every device's {scope}/... topics, "
                    f"which line {scoped.ref.line} scopes per device; use {device_variable} at that "
                    "level unless this owner must see all devices",
                )
                break


def _reaches_all_devices(levels: tuple[str, ...], prefix: tuple[str, ...]) -> bool:
    """Does a filter follow ``prefix`` and then take any value at the {device} level?"""
    for position, scope_level in enumerate((*prefix, None)):
        if position >= len(levels):
            return False
        level = levels[position]
        if level == topics.MULTI_LEVEL:
            return True
        if scope_level is None:
            return level == topics.SINGLE_LEVEL
        if level not in (topics.SINGLE_LEVEL, scope_level) and scope_level != topics.SINGLE_LEVEL:
            return False
    return False


def _lint_against_registry(policy: Policy, registry: Registry, report: _Reporter) -> None:
    held_roles = {role for entry in registry.devices.values() for role in entry.roles}
    reported_owners: set[tuple[str, str]] = set()
    for rule in policy.rules:
        owner = (rule.owner_kind, rule.owner)
        if rule.owner_kind == "role" and rule.owner not in held_roles:
            if owner not in reported_owners:
                report(
                    "warning",
                    "unknown_role",
                    rule.ref.line,
                    f"no device in {registry.source} has role '{rule.owner}', so its rules never apply",
                )
            reported_owners.add(owner)
            continue
        if rule.owner_kind == "device" and registry.get(rule.owner) is None:
            if owner not in reported_owners:
                report(
                    "warning",
                    "unknown_device",
                    rule.ref.line,
                    f"device '{rule.owner}' is not in {registry.source}, so its rules never apply",
                )
            reported_owners.add(owner)
            continue
        attributes = rule.variables - {DEVICE_VARIABLE}
        if not attributes:
            continue
        holders = [entry for entry in registry.devices.values() if rule.applies_to(Subject.from_entry(entry))]
        missing = sorted(
            name
            for name in attributes
            if not any(_is_bindable(entry.attributes.get(name)) for entry in holders)
        )
        if missing:
            report(
                "warning",
                "attribute_never_set",
                rule.ref.line,
                f"`{rule.ref.text}` never applies: no device it is written for has attribute '{missing[0]}'",
            )
