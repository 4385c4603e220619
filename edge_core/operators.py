"""Who may command which device, with which key, under which envelope policy.

Admins edit one YAML file (annotated example: ``configs/operators.yaml``)::

    version: 1
    policy:                              # optional; these are the defaults
      max_ttl_seconds: 300
      max_skew_seconds: 30
      max_size_bytes: 4096
      command_topic: "devices/{device}/cmd/#"
      typ: edge-cmd+jwt
    operators:
      alice:
        keys:
          - kid: alice-2025              # optional when the operator has one key (kid = operator id)
            pem: |                       # inline SubjectPublicKeyInfo PEM, EC P-256 ...
              -----BEGIN PUBLIC KEY-----
              ...
          - kid: alice-2026
            file: keys/alice-2026.pem    # ... or a file, relative to this YAML file
        scope:                           # a list of grants; a device matching any grant may be commanded
          - devices: [pump-17]           # explicit device ids
          - roles: [valve]               # the device has at least one of these roles
            attributes: {site: plant-a}  # and all of these registry attributes

Inside one grant every key given must hold; an empty grant is an error (it would
match everything). An operator without grants may command nothing.

``parse_operators`` validates the whole file into a frozen ``OperatorConfig`` or
raises one ``ConfigError`` naming file and line. It reads no files itself: key files
are read by the ``read_key`` callable the adapter hands in, so the core stays I/O free.
``OperatorKeys`` binds a config to the device facts (the registry on the broker, the
device's own profile on the device) and answers the two questions the verifier asks:
which key has this ``kid``, and may this operator command this device.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import PurePath
from types import MappingProxyType
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge_core import yamlsrc
from edge_core.errors import ConfigError, CredentialError
from edge_core.identity import check_identity
from edge_core.registry import Registry

__all__ = [
    "DeviceFacts",
    "DeviceProfile",
    "EnvelopePolicy",
    "Grant",
    "KeyReader",
    "Operator",
    "OperatorConfig",
    "OperatorKey",
    "OperatorKeys",
    "load_public_key",
    "parse_operators",
]

#: Reads a key file the config names; gets the path already resolved against the YAML file.
KeyReader = Callable[[str], bytes]

_ROLE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_ATTR_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_TYP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")
_MAX_TTL_LIMIT = timedelta(days=1)
_MAX_SKEW_LIMIT = timedelta(minutes=5)
_SIZE_LIMITS = (256, 65536)


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class EnvelopePolicy:
    """Limits every command envelope must respect, and where commands are published.

    ``command_topic`` is an MQTT topic template with exactly one ``{device}`` level;
    it may hold ``+`` levels and may end in ``#`` (then any sub-topic, or none, is a
    command topic, as with an MQTT filter).
    """

    max_ttl: timedelta = timedelta(seconds=300)
    max_skew: timedelta = timedelta(seconds=30)
    max_size: int = 4096
    command_topic: str = "devices/{device}/cmd/#"
    typ: str = "edge-cmd+jwt"
    _levels: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not timedelta(seconds=1) <= self.max_ttl <= _MAX_TTL_LIMIT:
            raise ConfigError(f"max_ttl {self.max_ttl} must be between 1 s and {_MAX_TTL_LIMIT}")
        if self.max_ttl.total_seconds() != int(self.max_ttl.total_seconds()):
            raise ConfigError("max_ttl must be whole seconds (NumericDate claims are integers)")
        if not timedelta(0) <= self.max_skew <= _MAX_SKEW_LIMIT:
            raise ConfigError(f"max_skew {self.max_skew} must be between 0 and {_MAX_SKEW_LIMIT}")
        if self.max_skew.total_seconds() != int(self.max_skew.total_seconds()):
            raise ConfigError("max_skew must be whole seconds")
        low, high = _SIZE_LIMITS
        if not low <= self.max_size <= high:
            raise ConfigError(f"max_size {self.max_size} must be between {low} and {high} bytes")
        if not _TYP_RE.match(self.typ):
            raise ConfigError(f"typ {self.typ!r} must be a short media type such as 'edge-cmd+jwt'")
        object.__setattr__(self, "_levels", _parse_template(self.command_topic))

    def device_from_topic(self, topic: str) -> str | None:
        """The device a concrete topic commands, or ``None`` if it is not a command topic."""
        if any(c in topic for c in "+#\x00"):
            return None
        levels = topic.split("/")
        pattern = self._levels
        wild_tail = pattern[-1] == "#"
        fixed = pattern[:-1] if wild_tail else pattern
        if len(levels) < len(fixed) or (not wild_tail and len(levels) != len(fixed)):
            return None
        device: str | None = None
        for want, got in zip(fixed, levels, strict=False):
            if want == "{device}":
                device = got
            elif want not in ("+", got):
                return None
        if device is None:
            return None
        try:
            return check_identity(device)
        except CredentialError:
            return None

    def is_command_topic(self, topic: str) -> bool:
        return self.device_from_topic(topic) is not None

    def subscription_filter(self, device: str) -> str:
        """The MQTT filter a device subscribes to for its own commands."""
        return "/".join(check_identity(device) if lv == "{device}" else lv for lv in self._levels)

    def broker_filter(self) -> str:
        """The MQTT filter matching every device's command topics (for the broker guard)."""
        return "/".join("+" if lv == "{device}" else lv for lv in self._levels)

    def topic_for(self, device: str, *subtopic: str) -> str:
        """A concrete command topic for ``device``; ``subtopic`` levels fill a trailing ``#``."""
        if "+" in self._levels:
            raise ValueError(f"command topic {self.command_topic!r} has '+' levels; build the topic yourself")
        levels = [check_identity(device) if lv == "{device}" else lv for lv in self._levels]
        if levels[-1] == "#":
            levels.pop()
        elif subtopic:
            raise ValueError(f"command topic {self.command_topic!r} takes no sub-topic")
        for part in subtopic:
            if not part or any(c in part for c in "+#/\x00"):
                raise ValueError(f"sub-topic level {part!r} must be a non-empty plain level")
        return "/".join([*levels, *subtopic])


def _parse_template(template: str) -> tuple[str, ...]:
    levels = tuple(template.split("/"))
    if template.startswith("$") or any(not lv for lv in levels):
        raise ConfigError(f"command topic {template!r} must not start with '$' or have empty levels")
    if levels.count("{device}") != 1:
        raise ConfigError(f"command topic {template!r} needs exactly one whole level '{{device}}'")
    for index, level in enumerate(levels):
        if level == "#" and index != len(levels) - 1:
            raise ConfigError(f"command topic {template!r}: '#' may only be the last level")
        if level not in ("{device}", "+", "#") and any(c in level for c in "{}+#\x00"):
            raise ConfigError(f"command topic {template!r}: level {level!r} mixes wildcards or braces")
    return levels


# --------------------------------------------------------------------------- scope


class DeviceFacts(Protocol):
    """What a grant looks at; ``edge_core.registry.DeviceEntry`` and ``DeviceProfile`` fit."""

    @property
    def device_id(self) -> str: ...

    @property
    def roles(self) -> frozenset[str]: ...

    @property
    def attributes(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class DeviceProfile:
    """The facts a device knows about itself (it has no registry entry or pins)."""

    device_id: str
    roles: frozenset[str] = frozenset()
    attributes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        check_identity(self.device_id)
        object.__setattr__(self, "roles", frozenset(self.roles))
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))


@dataclass(frozen=True)
class Grant:
    """One scope entry. Every condition given must hold; a grant with none is refused."""

    devices: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    attributes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not (self.devices or self.roles or self.attributes):
            raise ConfigError("a grant needs at least one of devices, roles, attributes")
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))

    def matches(self, device_id: str, facts: DeviceFacts | None) -> bool:
        if self.devices and device_id not in self.devices:
            return False
        if self.roles or self.attributes:
            if facts is None or facts.device_id != device_id:
                return False  # unknown device: role and attribute grants cannot match
            if self.roles and not (self.roles & facts.roles):
                return False
            if any(facts.attributes.get(k) != v for k, v in self.attributes.items()):
                return False
        return True


# --------------------------------------------------------------------------- operators


@dataclass(frozen=True)
class OperatorKey:
    kid: str
    operator: str
    public_key: ec.EllipticCurvePublicKey

    def __post_init__(self) -> None:
        if not isinstance(self.public_key.curve, ec.SECP256R1):
            raise ConfigError(f"key {self.kid}: ES256 needs a P-256 key, not {self.public_key.curve.name}")

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@dataclass(frozen=True)
class Operator:
    operator_id: str
    keys: tuple[OperatorKey, ...]
    grants: tuple[Grant, ...] = ()

    def may_command(self, device_id: str, facts: DeviceFacts | None) -> bool:
        """Deny by default: no grants means no devices."""
        return any(grant.matches(device_id, facts) for grant in self.grants)


@dataclass(frozen=True)
class OperatorKeys:
    """Operator keys and scopes bound to device facts; what ``verify_envelope`` consults."""

    operators: Mapping[str, Operator]
    devices: Mapping[str, DeviceFacts] = field(default_factory=lambda: MappingProxyType({}))
    _by_kid: Mapping[str, OperatorKey] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_kid: dict[str, OperatorKey] = {}
        for operator_id, operator in self.operators.items():
            if operator.operator_id != operator_id:
                raise ValueError(f"operator {operator.operator_id!r} filed under {operator_id!r}")
            for key in operator.keys:
                if key.kid in by_kid:
                    raise ValueError(f"kid {key.kid!r} is used twice")
                by_kid[key.kid] = key
        object.__setattr__(self, "operators", MappingProxyType(dict(self.operators)))
        object.__setattr__(self, "_by_kid", MappingProxyType(by_kid))

    @classmethod
    def bind(cls, config: OperatorConfig, registry: Registry | None = None) -> OperatorKeys:
        """For the broker: the operators of ``config`` judged against the device registry."""
        devices: Mapping[str, DeviceFacts] = registry.devices if registry is not None else {}
        return cls(operators=config.operators, devices=devices)

    def for_device(self, profile: DeviceFacts) -> OperatorKeys:
        """For a device: the same operators judged against the device's own profile."""
        return OperatorKeys(operators=self.operators, devices={profile.device_id: profile})

    def key(self, kid: str) -> OperatorKey | None:
        return self._by_kid.get(kid)

    def may_command(self, operator_id: str, device_id: str) -> bool:
        operator = self.operators.get(operator_id)
        return operator is not None and operator.may_command(device_id, self.devices.get(device_id))


@dataclass(frozen=True)
class OperatorConfig:
    operators: Mapping[str, Operator]
    policy: EnvelopePolicy = field(default_factory=EnvelopePolicy)
    source: str = "<operators>"
    digest: str = ""


# --------------------------------------------------------------------------- parsing


def load_public_key(pem: bytes, *, what: str) -> ec.EllipticCurvePublicKey:
    """An EC P-256 public key from SubjectPublicKeyInfo PEM; ``ValueError`` with a reason otherwise."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what}: not a PEM public key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise TypeError(f"{what}: only EC P-256 keys are allowed (ES256), not {type(key).__name__}")
    if key.curve.name != "secp256r1":
        raise ValueError(f"{what}: only EC P-256 keys are allowed (ES256), not curve {key.curve.name}")
    return key


def parse_operators(
    text: str | bytes, *, source: str = "<operators>", read_key: KeyReader | None = None
) -> OperatorConfig:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    doc = yamlsrc.load(raw, source=source)
    if doc is None:
        raise ConfigError("operators file is empty; it needs 'version: 1' and 'operators:'",
                          source=source, line=1)
    top = yamlsrc.Section(doc, source=source, what="operators file")
    version = top.take("version", int, required=True)
    if version != 1:
        raise top.error("version", f"operators file version {version} is not supported; use 1")
    policy_sec = top.sub("policy")
    operators_sec = top.sub("operators")
    top.done()
    policy = _parse_policy(policy_sec) if policy_sec is not None else EnvelopePolicy()
    operators: dict[str, Operator] = {}
    kid_lines: dict[str, int | None] = {}
    if operators_sec is not None:
        for operator_id, body, line in operators_sec.items():
            operator = _parse_operator(operator_id, body, source=source, line=line, read_key=read_key,
                                       kid_lines=kid_lines)
            operators[operator_id] = operator
    for kid, line in kid_lines.items():
        if kid in operators and all(k.kid != kid for k in operators[kid].keys):
            raise ConfigError(f"kid '{kid}' is also the id of another operator; pick a distinct key id",
                              source=source, line=line)
    return OperatorConfig(operators=MappingProxyType(operators), policy=policy, source=source,
                          digest=hashlib.sha256(raw).hexdigest())


def _parse_policy(sec: yamlsrc.Section) -> EnvelopePolicy:
    defaults = EnvelopePolicy()
    ttl = sec.take("max_ttl_seconds", int, int(defaults.max_ttl.total_seconds()))
    skew = sec.take("max_skew_seconds", int, int(defaults.max_skew.total_seconds()))
    size = sec.take("max_size_bytes", int, defaults.max_size)
    topic = sec.take("command_topic", str, defaults.command_topic)
    typ = sec.take("typ", str, defaults.typ)
    sec.done()
    try:
        return EnvelopePolicy(max_ttl=timedelta(seconds=ttl), max_skew=timedelta(seconds=skew),
                              max_size=size, command_topic=topic, typ=typ)
    except ConfigError as exc:
        raise ConfigError(f"policy: {exc.reason}", source=sec.source, line=sec.line) from exc


def _parse_operator(
    operator_id: str,
    body: Any,
    *,
    source: str,
    line: int | None,
    read_key: KeyReader | None,
    kid_lines: dict[str, int | None],
) -> Operator:
    try:
        check_identity(operator_id)
    except CredentialError as exc:
        raise ConfigError(f"operator id: {exc}", source=source, line=line) from exc
    what = f"operator '{operator_id}'"
    sec = yamlsrc.Section(body, source=source, line=line, what=what)
    keys_raw = sec.take("keys", list, required=True)
    scope_raw = sec.take("scope", list, [])
    sec.done()
    if not keys_raw:
        raise sec.error("keys", f"{what}: needs at least one key")
    keys: list[OperatorKey] = []
    for index, entry in enumerate(keys_raw):
        key_line = _item_line(keys_raw, index, sec.line_of("keys"))
        kid, key = _parse_key(entry, operator_id=operator_id, many=len(keys_raw) > 1, source=source,
                              line=key_line, read_key=read_key)
        if kid in kid_lines:
            raise ConfigError(f"{what}: kid '{kid}' already used at line {kid_lines[kid]}",
                              source=source, line=key_line)
        kid_lines[kid] = key_line
        keys.append(OperatorKey(kid=kid, operator=operator_id, public_key=key))
    grants = tuple(
        _parse_grant(g, what=what, source=source, line=_item_line(scope_raw, i, sec.line_of("scope")))
        for i, g in enumerate(scope_raw)
    )
    return Operator(operator_id=operator_id, keys=tuple(keys), grants=grants)


def _parse_key(
    entry: Any, *, operator_id: str, many: bool, source: str, line: int | None, read_key: KeyReader | None
) -> tuple[str, ec.EllipticCurvePublicKey]:
    what = f"operator '{operator_id}' key"
    sec = yamlsrc.Section(entry, source=source, line=line, what=what)
    kid = sec.take("kid", str, None)
    pem = sec.take("pem", str, None)
    path = sec.take("file", str, None)
    sec.done()
    if kid is None:
        if many:
            raise sec.error(None, f"{what}: an operator with several keys needs a 'kid' on each")
        kid = operator_id
    try:
        check_identity(kid)
    except CredentialError as exc:
        raise sec.error("kid", f"{what}: kid: {exc}") from exc
    if (pem is None) == (path is None):
        raise sec.error(None, f"{what} '{kid}': give exactly one of 'pem' or 'file'")
    if path is not None:
        if read_key is None:
            raise sec.error("file", f"{what} '{kid}': key files need a reader; load the file with "
                                    "the adapter's read_key or inline the PEM")
        resolved = _resolve(path, source)
        try:
            data = read_key(resolved)
        except OSError as exc:
            raise sec.error("file", f"{what} '{kid}': cannot read {resolved}: {exc.strerror or exc}") from exc
        where = "file"
    else:
        data = (pem or "").encode("ascii", "replace")
        where = "pem"
    try:
        return kid, load_public_key(data, what=f"{what} '{kid}'")
    except (ValueError, TypeError) as exc:
        raise sec.error(where, str(exc)) from exc


def _resolve(path: str, source: str) -> str:
    candidate = PurePath(path)
    if candidate.is_absolute() or source.startswith("<"):
        return str(candidate)
    return str(PurePath(source).parent / candidate)


def _parse_grant(entry: Any, *, what: str, source: str, line: int | None) -> Grant:
    sec = yamlsrc.Section(entry, source=source, line=line, what=f"{what} scope entry")
    devices_raw = sec.take("devices", list, [])
    roles_raw = sec.take("roles", list, [])
    attrs = sec.sub("attributes")
    sec.done()
    devices: set[str] = set()
    for index, device in enumerate(devices_raw):
        item_line = _item_line(devices_raw, index, sec.line_of("devices"))
        if not isinstance(device, str):
            raise ConfigError(f"{what}: device {device!r} must be a string", source=source, line=item_line)
        try:
            devices.add(check_identity(device))
        except CredentialError as exc:
            raise ConfigError(f"{what}: device {device!r}: {exc}", source=source, line=item_line) from exc
    roles: set[str] = set()
    for index, role in enumerate(roles_raw):
        if not isinstance(role, str) or not _ROLE_RE.match(role):
            raise ConfigError(f"{what}: role {role!r} must match {_ROLE_RE.pattern}", source=source,
                              line=_item_line(roles_raw, index, sec.line_of("roles")))
        roles.add(role)
    attributes: dict[str, str] = {}
    if attrs is not None:
        for key, value, attr_line in attrs.items():
            if not _ATTR_KEY_RE.match(key):
                raise ConfigError(f"{what}: attribute name {key!r} must match {_ATTR_KEY_RE.pattern}",
                                  source=source, line=attr_line)
            if not isinstance(value, str | int) or isinstance(value, bool):
                raise ConfigError(f"{what}: attribute '{key}' must be a string",
                                  source=source, line=attr_line)
            attributes[key] = str(value)
    if not (devices or roles or attributes):
        raise sec.error(None, f"{what}: a scope entry needs devices, roles or attributes "
                              "(an empty entry would match every device)")
    return Grant(devices=frozenset(devices), roles=frozenset(roles), attributes=attributes)


def _item_line(seq: Any, index: int, fallback: int | None) -> int | None:
    lines = getattr(seq, "item_lines", None)
    return lines[index] if lines and index < len(lines) else fallback
