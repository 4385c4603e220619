"""``edge-broker acl``: check an ACL file before deploying it, and explain a decision.

``acl check [FILE] [-c broker.yaml] [--registry REG] [--max-warnings N] [--json]`` loads
FILE (default: the ACL the broker settings name) as the broker would and lints it, against
the settings' registry when ``-c`` is given or FILE is omitted. A warning is acknowledged
by a comment on its line, or on a comment line just above it, naming its code:
``# acl-check: ack cross_device_scope - operators read every device on purpose``.
Exit codes: 0 loads with at most N unacknowledged warnings (default 0; info findings
allowed); 1 FILE is refused; 2 usage error; 3 more than N unacknowledged warnings; 4 FILE,
REG or the settings unreadable or invalid.

``acl explain --device ID (--publish|--subscribe|--receive) TOPIC [-c broker.yaml]
[--acl FILE] [--registry REG] [--json]`` prints the decision and every rule that took part.
Exit codes: 0 allowed; 1 denied (also a device the registry disables); 2 usage error;
4 unknown device, or a file that is unreadable or refused.

Without ``-c`` the settings are ``/etc/edge-gateway/broker.yaml`` (never the working directory).

Only this module prints; ``edge_core.acl`` decides. See docs/acl.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Final

from broker_plugins.settings import load_settings
from edge_core.acl import Action, Explanation, Policy, Subject
from edge_core.acl_file import parse_policy
from edge_core.acl_lint import Finding, lint_policy
from edge_core.errors import ConfigError
from edge_core.registry import DeviceEntry, Registry, parse_registry
from edge_runtime.cli_support import EXIT_CONFIG, EXIT_REFUSED, EXIT_USAGE, EXIT_WARNINGS, report, resolve_config

__all__ = [
    "CHECK_CLEAN",
    "CHECK_REFUSED",
    "CHECK_UNUSABLE",
    "CHECK_WARNINGS",
    "EXPLAIN_ALLOWED",
    "EXPLAIN_DENIED",
    "EXPLAIN_UNUSABLE",
    "add_parser",
]

CHECK_CLEAN: Final = 0
CHECK_REFUSED: Final = EXIT_REFUSED
CHECK_UNUSABLE: Final = EXIT_CONFIG
CHECK_WARNINGS: Final = EXIT_WARNINGS
EXPLAIN_ALLOWED: Final = 0
EXPLAIN_DENIED: Final = EXIT_REFUSED
EXPLAIN_UNUSABLE: Final = EXIT_CONFIG

_SETTINGS_NAME: Final = "broker.yaml"
_ACK: Final = re.compile(r"#\s*acl-check:\s*ack\s+([a-z_]+(?:\s*,\s*[a-z_]+)*)")
_ACTIONS: Final[tuple[Action, ...]] = ("publish", "subscribe", "receive")


def add_parser(sub: Any) -> None:
    acl = sub.add_parser("acl", help="check an ACL file, explain a decision (see docs/acl.md)")
    verbs = acl.add_subparsers(dest="verb", required=True)

    check = verbs.add_parser(
        "check",
        help="load an ACL file as the broker would and lint it",
        description="Exit codes: 0 clean (at most --max-warnings unacknowledged warnings; info allowed), "
        "1 file refused, 2 usage error, 3 more unacknowledged warnings than --max-warnings, 4 unreadable or "
        "invalid input. Acknowledge a warning with '# acl-check: ack CODE - why' on its line.",
    )
    check.add_argument("file", type=Path, metavar="FILE", nargs="?", default=None,
                       help="the ACL file (default: the one the broker settings name)")
    check.add_argument("-c", "--config", type=Path, default=None, metavar="FILE",
                       help=f"broker settings naming the ACL and registry (default /etc/edge-gateway/{_SETTINGS_NAME}"
                            " if FILE is omitted)")
    check.add_argument("--registry", type=Path, metavar="REG", help="device registry, for registry-aware lints")
    check.add_argument("--max-warnings", type=int, default=0, metavar="N",
                       help="exit 0 with up to N unacknowledged warnings (default 0)")
    check.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    check.set_defaults(func=_check)

    explain = verbs.add_parser(
        "explain",
        help="the decision for one device and topic, and every rule that took part",
        description="Exit codes: 0 allowed, 1 denied (also a device the registry disables), 2 usage error, "
        "4 unknown device, or a file that is unreadable or refused.",
    )
    explain.add_argument("--device", required=True, metavar="ID", help="device id as in the registry")
    action = explain.add_mutually_exclusive_group(required=True)
    action.add_argument("--publish", metavar="TOPIC", help="a PUBLISH to this topic name")
    action.add_argument("--subscribe", metavar="FILTER", help="a SUBSCRIBE to this topic filter")
    action.add_argument("--receive", metavar="TOPIC", help="the delivery of a message on this topic name")
    explain.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help=f"broker settings naming the ACL and registry (default /etc/edge-gateway/{_SETTINGS_NAME})",
    )
    explain.add_argument("--acl", type=Path, metavar="FILE", help="ACL file (instead of the one in settings)")
    explain.add_argument("--registry", type=Path, metavar="REG", help="registry (instead of the one in settings)")
    explain.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    explain.set_defaults(func=_explain)


# --- check ------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    if args.max_warnings < 0:
        print("error: --max-warnings must be 0 or more", file=sys.stderr)
        return EXIT_USAGE
    try:
        path, registry_path = _check_inputs(args.file, args.config, args.registry)
        shown = str(path)  # as the admin typed it (or relative to here), so editors can jump to FILE:LINE
        raw = _read(path, "ACL file")
        registry = _load_registry(registry_path) if registry_path is not None else None
    except ConfigError as exc:
        return _unusable(exc, CHECK_UNUSABLE)
    try:
        policy = parse_policy(raw, source=shown)
    except ConfigError as refusal:
        _print_refused(shown, refusal, as_json=args.json)
        return CHECK_REFUSED
    findings = lint_policy(policy, registry)
    acks = acknowledged(raw)
    acked = [f for f in findings if f.severity == "warning" and f.code in acks.get(f.line, ())]
    warnings = sum(1 for finding in findings if finding.severity == "warning") - len(acked)
    code = CHECK_WARNINGS if warnings > args.max_warnings else CHECK_CLEAN
    if args.json:
        print(
            json.dumps(
                {
                    "file": shown,
                    "status": "warnings" if warnings else "ok",
                    "exit": code,
                    "rules": len(policy.rules),
                    "digest": policy.digest,
                    "registry": registry.source if registry is not None else None,
                    "warnings": warnings,
                    "acknowledged": len(acked),
                    "max_warnings": args.max_warnings,
                    "findings": [_finding_json(finding, acknowledged=finding in acked) for finding in findings],
                    "error": None,
                },
                indent=2,
            )
        )
        return code
    for finding in findings:
        # FILE:LINE: severity: message [code], as documented; acknowledged ones say so
        print(f"{finding} (acknowledged)" if finding in acked else finding)
    infos = len(findings) - warnings - len(acked)
    status = "loads with warnings" if warnings else "ok"
    summary = (f"{shown}: {status}: {len(policy.rules)} rules, {_count(warnings, 'warning')}"
               f"{f' ({len(acked)} more acknowledged)' if acked else ''}, {infos} info")
    if warnings and code == CHECK_CLEAN:
        summary += f" (within --max-warnings {args.max_warnings})"
    if registry is None:
        summary += " (pass --registry REG or -c SETTINGS to check roles, devices and attributes too)"
    print(summary)
    return code


def _check_inputs(file: Path | None, config: Path | None, registry: Path | None) -> tuple[Path, Path | None]:
    """The ACL file and registry to check: as given, else from the broker settings."""
    if file is not None and config is None:
        return file, registry
    settings = load_settings(resolve_config(config, _SETTINGS_NAME))
    if file is None:
        if settings.acl_path is None:
            raise ConfigError("names no 'acl:' file", source=settings.source,
                              hint="add 'acl: acl.yaml' to the settings, or pass the ACL FILE")
        file = _near(settings.acl_path)
    return file, registry if registry is not None else _near(settings.registry_path)


def acknowledged(raw: bytes) -> dict[int, frozenset[str]]:
    """Line number -> the warning codes an ``# acl-check: ack CODE[, CODE]`` comment acknowledges there.

    The comment sits at the end of the finding's line, or alone on the line above it.
    """
    lines = raw.decode("utf-8", "replace").splitlines()
    out: dict[int, set[str]] = {}
    for number, text in enumerate(lines, start=1):
        match = _ACK.search(text)
        if match is None:
            continue
        codes = {code.strip() for code in match.group(1).split(",")}
        out.setdefault(number, set()).update(codes)
        if text.lstrip().startswith("#"):  # a comment line: it acknowledges the line below
            out.setdefault(number + 1, set()).update(codes)
    return {line: frozenset(codes) for line, codes in out.items()}


def _print_refused(shown: str, refusal: ConfigError, *, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {
                    "file": shown,
                    "status": "refused",
                    "exit": CHECK_REFUSED,
                    "findings": [],
                    "error": {"source": refusal.source, "line": refusal.line, "reason": refusal.reason},
                },
                indent=2,
            )
        )
        return
    print(refusal)  # FILE:LINE: reason
    print(f"{shown}: refused: a running broker keeps its last good policy, a starting one does not start")


def _finding_json(finding: Finding, *, acknowledged: bool = False) -> dict[str, Any]:
    return {
        "severity": finding.severity,
        "acknowledged": acknowledged,
        "code": finding.code,
        "source": finding.source,
        "line": finding.line,
        "message": finding.message,
    }


# --- explain ----------------------------------------------------------------------------


def _explain(args: argparse.Namespace) -> int:
    action, topic = next((name, getattr(args, name)) for name in _ACTIONS if getattr(args, name) is not None)
    try:
        policy, registry = _load_for_explain(args.config, args.acl, args.registry)
        entry = _entry(registry, args.device)
    except ConfigError as exc:
        return _unusable(exc, EXPLAIN_UNUSABLE)
    explanation = policy.explain(Subject.from_entry(entry), action, topic)
    allowed = explanation.decision.allowed and entry.enabled
    if args.json:
        print(json.dumps(_explanation_json(explanation, policy, registry, enabled=entry.enabled), indent=2))
    else:
        print(explanation.render())
        print(_subject_line(explanation.subject, registry))
        if not entry.enabled:
            print(
                f"note: {entry.device_id} is disabled in {registry.source}: the broker refuses its "
                "connection before any ACL decision, so the answer is deny"
            )
    return EXPLAIN_ALLOWED if allowed else EXPLAIN_DENIED


def _load_for_explain(config: Path | None, acl: Path | None, registry: Path | None) -> tuple[Policy, Registry]:
    """The ACL and registry named on the command line, else those of the broker settings."""
    if acl is None or registry is None:
        settings = load_settings(resolve_config(config, _SETTINGS_NAME))
        if acl is None:
            if settings.acl_path is None:
                raise ConfigError(
                    "names no 'acl:' file, so the broker denies every publish and subscribe",
                    source=settings.source,
                    hint="add 'acl: acl.yaml' to the settings, or pass --acl FILE",
                )
            acl = _near(settings.acl_path)
        registry = registry if registry is not None else _near(settings.registry_path)
    policy = parse_policy(_read(acl, "ACL file"), source=str(acl))
    return policy, _load_registry(registry)


def _entry(registry: Registry, device: str) -> DeviceEntry:
    entry = registry.get(device)
    if entry is None:
        raise ConfigError(
            f"device {device!r} is not in the registry",
            source=registry.source,
            hint="use the device id from its certificate, as listed under 'devices:' in the registry",
        )
    return entry


def _subject_line(subject: Subject, registry: Registry) -> str:
    roles = ", ".join(sorted(subject.roles)) or "none"
    attributes = ", ".join(f"{name}={value}" for name, value in sorted(subject.attributes.items())) or "none"
    return f"subject: device {subject.device}; roles: {roles}; attributes: {attributes} (from {registry.source})"


def _explanation_json(explanation: Explanation, policy: Policy, registry: Registry, *, enabled: bool) -> dict[str, Any]:
    decision = explanation.decision
    rule = decision.rule
    return {
        "device": explanation.subject.device,
        "roles": sorted(explanation.subject.roles),
        "attributes": dict(sorted(explanation.subject.attributes.items())),
        "enabled": enabled,
        "action": explanation.action,
        "topic": explanation.topic,
        "verdict": "allow" if decision.allowed and enabled else "deny",
        "allowed": decision.allowed and enabled,
        "reason": decision.reason,
        "rule": None
        if rule is None
        else {
            "source": rule.source,
            "line": rule.line,
            "text": rule.text,
            "owner": rule.owner,
        },
        "matched": [
            {
                "relation": matched.relation,
                "effect": matched.rule.effect,
                "source": matched.rule.ref.source,
                "line": matched.rule.ref.line,
                "text": matched.rule.ref.text,
                "owner": matched.rule.ref.owner,
            }
            for matched in explanation.matched
        ],
        "acl": {"source": policy.source, "digest": policy.digest},
        "registry": {"source": registry.source, "digest": registry.digest},
    }


# --- shared -----------------------------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read {what}: {exc.strerror or exc}", source=str(path), hint="check the path and its permissions"
        ) from exc


def _load_registry(path: Path) -> Registry:
    return parse_registry(_read(path, "registry"), source=str(path))


def _near(path: Path) -> Path:
    """A path from the settings (always absolute) relative to the working directory when inside
    it, so that rules print as ``configs/acl.yaml:52`` like in docs/acl.md."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def _unusable(exc: ConfigError, code: int) -> int:
    hint = exc.hint if exc.hint != ConfigError.hint else "correct the file, then run the check again"
    return report(" ".join(str(exc).split()), code=code, hint=hint)


def _count(number: int, word: str) -> str:
    return f"{number} {word}" if number == 1 else f"{number} {word}s"
