"""Uplink configuration and topic rules: which local topics go to the cloud, and which cloud topics come down.

Plain core: parsing ``configs/uplink.yaml`` into frozen objects and mapping one topic through
the rules. No network, no event loop; the uplink service (``gateway_agent/uplink.py``) does
the I/O.

A rule maps a filter to a template, level by level::

    from: devices/+/telemetry/#
    to:   sites/{site}/gateways/{gateway}/devices/{1}/telemetry/{#}

``{1}``, ``{2}``, ... are the levels the first, second, ... ``+`` of ``from`` matched; ``{#}``
is what its trailing ``#`` matched (zero or more levels); ``{site}`` and ``{gateway}`` are
this gateway's names (in ``from`` and ``to``). Every placeholder is a whole level. The first rule (in file order)
whose filter matches a topic decides it.

Downlink rules may only target ``devices/<id>/cmd/...``: the local broker's command guard
verifies every message there as a signed operator envelope, so nothing the cloud sends
reaches a device without an operator's signature. A rule that would loop (a forwarded
topic matched by a downlink filter, or a downlink target matched by a forward filter) is
refused at load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from edge_core import yamlsrc
from edge_core.binds import loopback_bind
from edge_core.errors import ConfigError, CredentialError
from edge_core.identity import check_identity
from edge_core.topics import MULTI_LEVEL, SEPARATOR, SINGLE_LEVEL, TopicFilter, filters_overlap, topic_name_problem

__all__ = [
    "OVERFLOW_POLICIES",
    "CloudLink",
    "LocalLink",
    "MqttTlsLink",
    "QueuePolicy",
    "TopicRule",
    "UplinkConfig",
    "load_uplink_config",
    "parse_uplink_config",
]

OVERFLOW_POLICIES = ("drop_oldest", "refuse_new")
DURABILITY = ("fsync", "process")
_PLACEHOLDER = re.compile(r"^\{([^{}]*)\}$")
_NAMED = ("site", "gateway")
#: the levels a downlink target must start with: a device's command topic
_COMMAND_LEVEL = "cmd"


@dataclass(frozen=True)
class TopicRule:
    """One ``from`` filter and its ``to`` template; ``line`` is where the rule sits in the file."""

    source: TopicFilter
    target: tuple[str, ...]
    line: int | None

    def apply(self, topic: str, names: dict[str, str]) -> str | None:
        """The mapped topic, or None if ``source`` does not match ``topic``."""
        levels = topic.split(SEPARATOR)
        pattern = self.source.levels
        plus: list[str] = []
        rest: list[str] = []
        for index, level in enumerate(pattern):
            if level == MULTI_LEVEL:
                rest = levels[index:]
                break
            if index >= len(levels):
                return None
            if level == SINGLE_LEVEL:
                plus.append(levels[index])
            elif level != levels[index]:
                return None
        else:
            if len(levels) != len(pattern):
                return None
        if topic.startswith("$") and pattern[0] in (SINGLE_LEVEL, MULTI_LEVEL):
            return None  # as in MQTT: leading wildcards never match $ topics
        return SEPARATOR.join(self._fill(names, rest, plus))

    def as_filter(self, names: dict[str, str]) -> TopicFilter:
        """Every topic this rule can produce, as a filter (placeholders become wildcards)."""
        return TopicFilter(SEPARATOR.join(self._fill(names, [MULTI_LEVEL], None)))

    def _fill(self, names: dict[str, str], rest: list[str], plus: list[str] | None) -> list[str]:
        """The target's levels with placeholders replaced; ``plus=None`` puts ``+`` for each ``{n}``."""
        out: list[str] = []
        for level in self.target:
            match = _PLACEHOLDER.match(level)
            name = match.group(1) if match is not None else None
            if name is None:
                out.append(level)
            elif name == MULTI_LEVEL:
                out.extend(rest)
            elif name.isdigit():
                out.append(SINGLE_LEVEL if plus is None else plus[int(name) - 1])
            else:
                out.append(names[name])
        return out


@dataclass(frozen=True)
class MqttTlsLink:
    """An MQTT 3.1.1 session over TLS 1.3 with a client certificate."""

    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    client_id: str
    keepalive: int = 30


@dataclass(frozen=True)
class LocalLink(MqttTlsLink):
    """The uplink's own mTLS session to the local broker: an identity in the registry."""


@dataclass(frozen=True)
class CloudLink(MqttTlsLink):
    """The outbound connection to the cloud broker (the cloud's CA, the gateway's cloud certificate)."""

    inflight: int = 32
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    publish_timeout: float = 30.0


@dataclass(frozen=True)
class QueuePolicy:
    path: Path
    max_bytes: int = 256 * 1024 * 1024
    max_age: timedelta = timedelta(days=7)
    overflow: str = "drop_oldest"
    alarm_fraction: float = 0.8
    durability: str = "fsync"


@dataclass(frozen=True)
class UplinkConfig:
    site: str
    gateway: str
    local: LocalLink
    cloud: CloudLink
    queue: QueuePolicy
    forward: tuple[TopicRule, ...]
    downlink: tuple[TopicRule, ...]
    status_bind: tuple[str, int] | None
    max_payload: int
    source: str

    @property
    def names(self) -> dict[str, str]:
        return {"site": self.site, "gateway": self.gateway}

    def cloud_topic(self, local_topic: str) -> str | None:
        """Where a local message goes in the cloud (first matching forward rule), or None."""
        for rule in self.forward:
            mapped = rule.apply(local_topic, self.names)
            if mapped is not None:
                return mapped
        return None

    def local_topic(self, cloud_topic: str) -> str | None:
        """Where a cloud message goes on the local broker (first matching downlink rule), or None."""
        for rule in self.downlink:
            mapped = rule.apply(cloud_topic, self.names)
            if mapped is not None:
                return mapped
        return None

    def forward_filters(self) -> list[str]:
        return [rule.source.value for rule in self.forward]

    def downlink_filters(self) -> list[str]:
        return [rule.source.value for rule in self.downlink]


def load_uplink_config(path: Path | str) -> UplinkConfig:
    return yamlsrc.load_settings_file(path, "uplink settings", parse_uplink_config)


def _positive(sec: yamlsrc.Section, key: str, kind: type[int] | type[float], default: float,
              *, most: float | None = None) -> float:
    value: float = sec.take(key, kind, default)
    if value <= 0 or (most is not None and value > most):
        bound = f"> 0 and <= {most}" if most is not None else "> 0"
        raise sec.error(key, f"{sec.what}.{key} must be {bound}, not {value}")
    return float(value)


def _port(sec: yamlsrc.Section, default: int) -> int:
    port = sec.take("port", int, default)
    if not 1 <= port <= 65535:
        raise sec.error("port", f"{sec.what}.port must be 1 .. 65535, not {port}")
    return port


def _template(value: str, *, source: TopicFilter, what: str, line: int | None, src: str) -> tuple[str, ...]:
    def bad(reason: str) -> ConfigError:
        return ConfigError(f"{what}: 'to: {value}': {reason}", source=src, line=line)

    if not value:
        raise bad("must not be empty")
    plus_count = source.levels.count(SINGLE_LEVEL)
    ends_multi = source.levels[-1] == MULTI_LEVEL
    levels = tuple(value.split(SEPARATOR))
    for index, level in enumerate(levels):
        if SINGLE_LEVEL in level or (MULTI_LEVEL in level and not _PLACEHOLDER.match(level)):
            raise bad(f"level {level!r} holds a wildcard; a target is a topic name, use {{1}} or {{#}}")
        if "{" in level or "}" in level:
            match = _PLACEHOLDER.match(level)
            if match is None:
                raise bad(f"level {level!r}: a placeholder must be a whole level, e.g. 'devices/{{1}}/x'")
            name = match.group(1)
            if name == MULTI_LEVEL:
                if not ends_multi:
                    raise bad("{#} needs a 'from' filter that ends in '#'")
                if index != len(levels) - 1:
                    raise bad("{#} must be the last level")
            elif name.isdigit():
                if not 1 <= int(name) <= plus_count:
                    raise bad(f"{{{name}}} refers to '+' number {name}, but 'from' has {plus_count}")
            elif name not in _NAMED:
                raise bad(f"unknown placeholder {{{name}}}; use {{1}}.., {{#}}, {{site}} or {{gateway}}")
    if levels[0].startswith("$"):
        raise bad("a target must not be a '$' topic")
    literal = SEPARATOR.join("x" if _PLACEHOLDER.match(level) else level for level in levels)
    problem = topic_name_problem(literal)
    if problem is not None:
        raise bad(problem)
    return levels


def _bind_names(text: str, names: dict[str, str]) -> str:
    """``{site}``/``{gateway}`` levels of a ``from`` filter replaced by their values; other braces refused."""
    out = []
    for level in text.split(SEPARATOR):
        match = _PLACEHOLDER.match(level)
        if match is not None and match.group(1) in names:
            out.append(names[match.group(1)])
        elif "{" in level or "}" in level:
            raise ValueError(f"level {level!r}: a 'from' filter may only use {{site}} and {{gateway}} as whole levels")
        else:
            out.append(level)
    return SEPARATOR.join(out)


def _rules(top: yamlsrc.Section, key: str, *, source: str, downlink: bool,
           names: dict[str, str]) -> tuple[TopicRule, ...]:
    raw = top.take(key, list, [])
    if not raw and not downlink:
        raise top.error(key if key in top.data else None, "uplink settings: 'forward' needs at least one rule")
    lines = getattr(raw, "item_lines", [None] * len(raw))
    rules: list[TopicRule] = []
    for index, item in enumerate(raw):
        line = lines[index]
        sec = yamlsrc.Section(item, source=source, line=line, what=f"{key}[{index}]")
        text = sec.take("from", str, required=True)
        try:
            flt = TopicFilter(_bind_names(text, names))
        except ValueError as exc:
            raise sec.error("from", f"{sec.what}: 'from: {text}': {exc}") from exc
        if text.startswith("$") or text.startswith(MULTI_LEVEL):
            raise sec.error("from", f"{sec.what}: 'from: {text}' is too wide; name the topics to carry "
                                    "(a '$' or bare '#' filter would carry the broker's own topics)")
        target_text = sec.take("to", str, required=True)
        target = _template(target_text, source=flt, what=sec.what, line=sec.line_of("to"), src=source)
        if downlink and (len(target) < 4 or target[0] != "devices" or target[2] != _COMMAND_LEVEL):
            raise sec.error("to", f"{sec.what}: 'to: {target_text}': a downlink may only target a device's "
                                  "command topics 'devices/<id>/cmd/<name>', which the broker verifies as "
                                  "signed operator envelopes")
        sec.done()
        rules.append(TopicRule(flt, target, line))
    return tuple(rules)


def _resolve(base_dir: Path, sec: yamlsrc.Section, key: str) -> Path:
    return (base_dir / sec.take(key, str, required=True)).resolve()


def parse_uplink_config(text: bytes, *, source: str, base_dir: Path) -> UplinkConfig:
    """Validate the whole file into one frozen object, or raise ``ConfigError`` with file and line."""
    doc = yamlsrc.load(text, source=source)
    top = yamlsrc.Section(doc, source=source, what="uplink settings")
    version = top.take("version", int, required=True)
    if version != 1:
        raise top.error("version", f"uplink settings: version {version} is not supported (only 1)")
    names: dict[str, str] = {}
    for key in _NAMED:
        value = top.take(key, str, required=True)
        try:
            check_identity(value)
        except (ValueError, CredentialError) as exc:
            raise top.error(key, f"uplink settings: {key}: {exc}") from exc
        names[key] = value

    status_bind = None
    ssec = top.sub("status")
    if ssec is not None:
        status_bind = loopback_bind(ssec.take("bind", str, "127.0.0.1:9466"), ssec, "bind", who="the uplink")
        ssec.done()

    lsec = top.sub("local", required=True)
    assert lsec is not None
    local_host = lsec.take("host", str, "127.0.0.1")
    local = LocalLink(host=local_host, port=_port(lsec, 8883), ca=_resolve(base_dir, lsec, "ca"),
                      cert=_resolve(base_dir, lsec, "cert"), key=_resolve(base_dir, lsec, "key"),
                      client_id=lsec.take("client_id", str, required=True),
                      keepalive=int(_positive(lsec, "keepalive", int, 30, most=3600)))
    try:
        check_identity(local.client_id)
    except (ValueError, CredentialError) as exc:
        raise lsec.error("client_id", f"local.client_id: {exc}") from exc
    lsec.done()

    csec = top.sub("cloud", required=True)
    assert csec is not None
    cloud = CloudLink(
        host=csec.take("host", str, required=True), port=_port(csec, 8883), ca=_resolve(base_dir, csec, "ca"),
        cert=_resolve(base_dir, csec, "cert"), key=_resolve(base_dir, csec, "key"),
        client_id=csec.take("client_id", str, names["gateway"]),
        keepalive=int(_positive(csec, "keepalive", int, 30, most=3600)),
        inflight=int(_positive(csec, "inflight", int, 32, most=1000)),
        backoff_initial=_positive(csec, "backoff_initial", float, 1.0, most=3600),
        backoff_max=_positive(csec, "backoff_max", float, 60.0, most=3600),
        publish_timeout=_positive(csec, "publish_timeout", float, 30.0, most=600),
    )
    if cloud.backoff_max < cloud.backoff_initial:
        raise csec.error("backoff_max", "cloud.backoff_max must be >= cloud.backoff_initial")
    csec.done()

    qsec = top.sub("queue", required=True)
    assert qsec is not None
    queue = QueuePolicy(
        path=_resolve(base_dir, qsec, "path"),
        max_bytes=int(_positive(qsec, "max_bytes", int, 256 * 1024 * 1024)),
        max_age=timedelta(seconds=_positive(qsec, "max_age", int, 7 * 86400)),
        overflow=qsec.take("overflow", str, "drop_oldest"),
        alarm_fraction=_positive(qsec, "alarm_fraction", float, 0.8, most=1.0),
        durability=qsec.take("durability", str, "fsync"),
    )
    if queue.overflow not in OVERFLOW_POLICIES:
        raise qsec.error("overflow", f"queue.overflow must be one of {', '.join(OVERFLOW_POLICIES)}, "
                                     f"not {queue.overflow!r}")
    if queue.durability not in DURABILITY:
        raise qsec.error("durability", f"queue.durability must be one of {', '.join(DURABILITY)}, "
                                       f"not {queue.durability!r}")
    qsec.done()

    max_payload = int(_positive(top, "max_payload", int, 256 * 1024, most=16 * 1024 * 1024))
    forward = _rules(top, "forward", source=source, downlink=False, names=names)
    downlink = _rules(top, "downlink", source=source, downlink=True, names=names)
    top.done()
    _check_loops(forward, downlink, names, source)
    return UplinkConfig(site=names["site"], gateway=names["gateway"], local=local, cloud=cloud, queue=queue,
                        forward=forward, downlink=downlink, status_bind=status_bind, max_payload=max_payload,
                        source=source)


def _check_loops(forward: tuple[TopicRule, ...], downlink: tuple[TopicRule, ...], names: dict[str, str],
                 source: str) -> None:
    """A message must never come back the way it went (cloud echo, or a command forwarded up and down)."""
    for up in forward:
        produced = up.as_filter(names)
        for down in downlink:
            if filters_overlap(produced.levels, down.source.levels):
                raise ConfigError(f"forward rule 'from: {up.source}' produces cloud topics ({produced}) that "
                                  f"downlink rule 'from: {down.source}' (line {down.line}) would bring back down",
                                  source=source, line=up.line)
            if filters_overlap(up.source.levels, down.as_filter(names).levels):
                raise ConfigError(f"downlink rule 'from: {down.source}' targets local topics that forward rule "
                                  f"'from: {up.source}' (line {up.line}) would send up again",
                                  source=source, line=down.line)
