"""Broker settings: ``configs/broker.yaml`` validated at the edge into frozen objects.

Relative paths are resolved against the directory of the settings file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

from broker_plugins.revocation import RevocationSettings
from edge_core import yamlsrc
from edge_core.binds import is_loopback
from edge_core.crl_freshness import StalenessPolicy, parse_staleness
from edge_core.firmware_trust import FirmwareGuardSettings, parse_firmware_guard_settings
from edge_core.identity import IdentityPolicy
from edge_runtime.status_http import StatusSettings, parse_status_section, split_bind

__all__ = [
    "BrokerSettings", "CommandSettings", "Limits", "ListenerSettings", "PersistenceSettings", "load_settings",
    "parse_settings", "split_bind",
]


@dataclass(frozen=True)
class ListenerSettings:
    host: str
    port: int
    certfile: Path
    keyfile: Path
    client_ca: Path


@dataclass(frozen=True)
class Limits:
    """Per-client bounds of the engine; every refusal is an event with a reason code (README)."""

    tls_handshake_timeout: float = 5.0
    connect_timeout: float = 5.0
    max_connections: int = 1000
    max_packet_size: int = 256 * 1024
    outbound_queue_messages: int = 1000
    outbound_queue_bytes: int = 8 * 1024 * 1024
    write_timeout: float = 10.0
    max_subscriptions_per_client: int = 1000
    max_topic_length: int = 1024
    max_topic_levels: int = 32
    max_retained_per_device: int = 1000
    max_retained_total: int = 100_000
    decision_cache_bytes: int = 16 * 1024 * 1024
    max_inflight: int = 100


_FLOAT_LIMITS = ("tls_handshake_timeout", "connect_timeout", "write_timeout")


@dataclass(frozen=True)
class PersistenceSettings:
    """``persistence:``; without it the broker keeps sessions in memory only (``broker.no_persistence``)."""

    path: Path
    synchronous: Literal["full", "normal"] = "full"


@dataclass(frozen=True)
class CommandSettings:
    operators_path: Path
    replay_capacity: int = 1_000_000
    #: ``memory`` (this process only) or a Redis URL shared by every broker of the site
    replay_store: str = "memory"
    replay_prefix: str = "edge:replay"
    replay_timeout: float = 0.25


@dataclass(frozen=True)
class BrokerSettings:
    listener: ListenerSettings
    registry_path: Path
    acl_path: Path | None = None
    identity: IdentityPolicy = field(default_factory=IdentityPolicy)
    limits: Limits = field(default_factory=Limits)
    status: StatusSettings | None = None
    reload_interval: float = 0.5
    plaintext_bind: tuple[str, int] | None = None
    cert_test_bind: tuple[str, int] | None = None
    event_loop: str = "uvloop"
    commands: CommandSettings | None = None
    #: ``commands: disabled``: command topics are forwarded unverified, on the operator's word
    commands_disabled: bool = False
    revocation: RevocationSettings | None = None
    persistence: PersistenceSettings | None = None
    firmware: FirmwareGuardSettings | None = None
    source: str = "<settings>"


def _path_list(sec: yamlsrc.Section, key: str, base_dir: Path) -> tuple[Path, ...]:
    raw = sec.take(key, list, required=True)
    if not raw or not all(isinstance(item, str) for item in raw):
        raise sec.error(key, f"{sec.what}: '{key}' must be a non-empty list of file paths")
    return tuple((base_dir / item).resolve() for item in raw)


def load_settings(path: Path | str) -> BrokerSettings:
    return yamlsrc.load_settings_file(path, "settings", parse_settings)


def parse_settings(text: str | bytes, *, source: str, base_dir: Path) -> BrokerSettings:
    doc = yamlsrc.load(text, source=source)
    top = yamlsrc.Section(doc, source=source, what="broker settings")

    def path_of(sec: yamlsrc.Section, key: str, *, required: bool = True) -> Path:
        raw = sec.take(key, str, required=required)
        resolved = (base_dir / raw).resolve() if raw else Path()
        return resolved

    lsec = top.sub("listener", required=True)
    assert lsec is not None
    bind = lsec.take("bind", str, "127.0.0.1:8883")
    host, port = split_bind(bind, source=source, line=lsec.line_of("bind"))
    listener = ListenerSettings(
        host=host,
        port=port,
        certfile=path_of(lsec, "certfile"),
        keyfile=path_of(lsec, "keyfile"),
        client_ca=path_of(lsec, "client_ca"),
    )
    lsec.done()

    limits = Limits()
    limsec = top.sub("limits")
    if limsec is not None:
        values: dict[str, float | int] = {}
        for name in Limits.__dataclass_fields__:
            kind: type = float if name in _FLOAT_LIMITS else int
            values[name] = limsec.take(name, kind, getattr(limits, name))
            if values[name] <= 0:
                raise limsec.error(name, f"limits.{name} must be positive")
        limits = Limits(**values)  # type: ignore[arg-type]
        if limits.max_packet_size > 268_435_455:
            raise limsec.error("max_packet_size", "limits.max_packet_size exceeds the MQTT maximum 268435455")
        if limits.max_topic_length > 65535:
            raise limsec.error("max_topic_length", "limits.max_topic_length exceeds the MQTT maximum 65535")
        if limits.max_inflight > 65535:
            raise limsec.error("max_inflight", "limits.max_inflight exceeds the 65535 MQTT packet identifiers")
        limsec.done()

    persistence = None
    persec = top.sub("persistence")
    if persec is not None:
        sync = persec.take("synchronous", str, "full")
        if sync not in ("full", "normal"):
            raise persec.error("synchronous", "persistence.synchronous must be 'full' or 'normal'")
        persistence = PersistenceSettings(path=path_of(persec, "path"), synchronous=sync)  # type: ignore[arg-type]
        persec.done()

    identity = IdentityPolicy()
    isec = top.sub("identity")
    if isec is not None:
        src = isec.take("source", str, "san_uri")
        if src not in ("san_uri", "subject_cn"):
            raise isec.error("source", "identity.source must be 'san_uri' or 'subject_cn'")
        identity = IdentityPolicy(source=src, uri_prefix=isec.take("uri_prefix", str, "urn:device:"))  # type: ignore[arg-type]
        isec.done()

    registry_path = path_of(top, "registry")
    acl_raw = top.take("acl", str, None)
    acl_path = (base_dir / acl_raw).resolve() if acl_raw else None

    status = None
    ssec = top.sub("status")
    if ssec is not None:
        status = parse_status_section(ssec, base_dir=base_dir, default_bind="127.0.0.1:9464")

    plaintext_bind = None
    psec = top.sub("unsafe_plaintext_listener")
    if psec is not None:
        pbind = psec.take("bind", str, required=True)
        plaintext_bind = split_bind(pbind, source=source, line=psec.line_of("bind"))
        if not is_loopback(plaintext_bind[0]):
            raise psec.error("bind", "unsafe_plaintext_listener.bind must be a loopback address")
        psec.done()

    cert_test_bind = None
    tsec = top.sub("cert_test_listener")
    if tsec is not None:
        cert_test_bind = split_bind(tsec.take("bind", str, required=True), source=source, line=tsec.line_of("bind"))
        tsec.done()

    commands = None
    commands_disabled = top.data.get("commands") == "disabled"
    csec = None
    if commands_disabled:
        top.take("commands", str)
    elif isinstance(top.data.get("commands"), str):
        raise top.error("commands", "'commands' is a section (operators: ...) or the word 'disabled'")
    else:
        csec = top.sub("commands")
    if csec is not None:
        commands = CommandSettings(
            operators_path=path_of(csec, "operators"),
            replay_capacity=csec.take("replay_capacity", int, 1_000_000),
            replay_store=csec.take("replay_store", str, "memory"),
            replay_prefix=csec.take("replay_prefix", str, "edge:replay"),
            replay_timeout=csec.take("replay_timeout", float, 0.25),
        )
        if not 1000 <= commands.replay_capacity <= 50_000_000:
            raise csec.error("replay_capacity", "commands.replay_capacity must be 1000 .. 50000000")
        if commands.replay_store != "memory" and not commands.replay_store.startswith(
                ("redis://", "rediss://", "unix://")):
            raise csec.error("replay_store", "commands.replay_store must be 'memory' or a redis://, rediss:// "
                                             "or unix:// URL shared by the site's brokers")
        if not commands.replay_prefix or "{" in commands.replay_prefix or "}" in commands.replay_prefix:
            raise csec.error("replay_prefix", "commands.replay_prefix must be non-empty, without braces")
        if not 0.01 <= commands.replay_timeout <= 5.0:
            raise csec.error("replay_timeout", "commands.replay_timeout must be 0.01 .. 5 seconds")
        csec.done()

    revocation = None
    rsec = top.sub("revocation")
    if rsec is not None:
        files = _path_list(rsec, "crl_files", base_dir)
        issuers = _path_list(rsec, "issuers", base_dir)
        ssec = rsec.sub("staleness")
        staleness = parse_staleness(ssec) if ssec is not None else StalenessPolicy()
        max_skew = rsec.take("max_skew", float, 300.0)
        check_interval = rsec.take("check_interval", float, 5.0)
        if max_skew < 0 or not 0.1 <= check_interval <= 3600:
            raise rsec.error("check_interval", "revocation: max_skew >= 0 and check_interval 0.1 .. 3600 s")
        rsec.done()
        revocation = RevocationSettings(crl_files=files, issuers=issuers, staleness=staleness,
                                        max_skew=timedelta(seconds=max_skew), check_interval=check_interval,
                                        trust_bundle=listener.client_ca)

    # firmware offers (docs/firmware.md): verified by the firmware guard before forwarding
    fsec = top.sub("firmware")
    firmware = parse_firmware_guard_settings(fsec, base_dir) if fsec is not None else None

    reload_interval = top.take("reload_interval", float, 0.5)
    if not 0.05 <= reload_interval <= 2.0:
        raise top.error("reload_interval", "reload_interval must be between 0.05 and 2.0 seconds")
    event_loop = top.take("event_loop", str, "uvloop")
    if event_loop not in ("uvloop", "asyncio"):
        raise top.error("event_loop", "event_loop must be 'uvloop' or 'asyncio'")
    top.done()
    return BrokerSettings(
        listener=listener,
        registry_path=registry_path,
        acl_path=acl_path,
        identity=identity,
        limits=limits,
        status=status,
        reload_interval=reload_interval,
        plaintext_bind=plaintext_bind,
        cert_test_bind=cert_test_bind,
        event_loop=event_loop,
        commands=commands,
        commands_disabled=commands_disabled,
        revocation=revocation,
        persistence=persistence,
        firmware=firmware,
        source=source,
    )
