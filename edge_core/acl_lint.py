"""ACL lint: what is legal in an ACL file but probably wrong, with the registry when given.

``lint_policy`` returns ``Finding`` values with stable codes, sorted by line; it never refuses
a policy (``edge_core.acl_file.parse_policy`` does that). No I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edge_core import topics
from edge_core.acl import DEVICE_VARIABLE, Policy, Rule, Severity, Subject, is_bindable
from edge_core.registry import Registry

__all__ = ["Finding", "lint_policy"]



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
            if not any(is_bindable(entry.attributes.get(name)) for entry in holders)
        )
        if missing:
            report(
                "warning",
                "attribute_never_set",
                rule.ref.line,
                f"`{rule.ref.text}` never applies: no device it is written for has attribute '{missing[0]}'",
            )
