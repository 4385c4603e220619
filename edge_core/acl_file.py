"""The admin's ACL file: YAML validated into a frozen ``edge_core.acl.Policy``, or one error.

``parse_policy`` raises one ``ConfigError`` naming file, line and reason (see ``docs/acl.md``
for the format). No I/O: the text is handed in.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from edge_core import yamlsrc
from edge_core.acl import (
    ATTRIBUTE_RE,
    DEVICE_VARIABLE,
    EFFECTS,
    Effect,
    OwnerKind,
    Permission,
    Policy,
    Rule,
    RuleRef,
    gc_paused,
)
from edge_core.errors import ConfigError, CredentialError
from edge_core.identity import check_identity

__all__ = ["parse_policy"]

# Same shape as the registry accepts, so every registry role can be named here.
_ROLE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_PERMISSION_WORDS: Final[Mapping[str, frozenset[Permission]]] = MappingProxyType(
    {
        "publish": frozenset({"publish"}),
        "subscribe": frozenset({"subscribe"}),
        "both": frozenset({"publish", "subscribe"}),
    }
)


_SECTIONS_HINT = (
    "add 'everyone:', 'roles:' or 'devices:' with rules like 'allow publish devices/{device}/status'"
)


def parse_policy(text: str | bytes, *, source: str = "<acl>") -> Policy:
    """Validate an ACL file into a ``Policy``; raise ``ConfigError`` naming file, line and reason."""
    with gc_paused():
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
        if not isinstance(name, str) or not ATTRIBUTE_RE.match(name) or name == DEVICE_VARIABLE:
            raise ConfigError(
                f"attribute {name!r} must match {ATTRIBUTE_RE.pattern} and not be '{DEVICE_VARIABLE}' "
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
    if not words or words[0] not in EFFECTS:
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
