"""Agent settings: ``configs/agent.yaml`` validated at the edge into frozen objects.

Relative paths are resolved against the directory of the settings file. Each service
section is optional; a missing section means that service does not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from edge_core import yamlsrc
from edge_core.errors import ConfigError
from edge_core.identity import check_identity
from edge_core.lifecycle import RenewalPolicy
from edge_runtime.status_http import StatusSettings, parse_status_section
from gateway_agent.crl_sync import CrlSyncSettings, parse_crl_settings

__all__ = ["AgentSettings", "BrokerLink", "LifecycleSettings", "ValidationSettings", "load_agent_settings"]


@dataclass(frozen=True)
class BrokerLink:
    """The agent's own mTLS session to the local broker (validation service, renewal)."""

    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    client_id: str


@dataclass(frozen=True)
class ValidationSettings:
    signing_key: Path
    key_id: str = "gateway"
    rate_per_minute: int = 60


@dataclass(frozen=True)
class LifecycleSettings:
    #: ``sqlite:///<absolute path>`` or ``postgresql://...`` (``gateway_agent.inventory.open_inventory``)
    inventory: str
    ca_dir: Path
    registry: Path
    policy: RenewalPolicy
    #: where ``gateway-agent certs renew`` queues requests for the running daemon
    spool_dir: Path
    concurrency: int = 8
    scan_interval: timedelta = timedelta(days=1)
    lifetime: timedelta = timedelta(days=30)
    broker_status_url: str | None = None
    #: PostgreSQL only: the leader lease; a standby takes over within ``lease * 4/3`` of the leader's death
    leader_lease: timedelta = timedelta(seconds=15)

    @property
    def shared(self) -> bool:
        """True when several agents may share the inventory (PostgreSQL): leadership applies."""
        return not self.inventory.startswith("sqlite:")


@dataclass(frozen=True)
class AgentSettings:
    agent_id: str
    status: StatusSettings | None
    crl: CrlSyncSettings | None
    broker: BrokerLink | None
    validation: ValidationSettings | None
    lifecycle: LifecycleSettings | None
    source: str


def load_agent_settings(path: Path | str) -> AgentSettings:
    return yamlsrc.load_settings_file(path, "agent settings", parse_agent_settings)


def _inventory_location(lsec: yamlsrc.Section, base_dir: Path) -> tuple[str, Path]:
    """``lifecycle.inventory`` as a URL (a plain path is a SQLite file) and the renew-request spool."""
    raw = lsec.take("inventory", str, required=True)
    spool = lsec.take("spool_dir", str, None)
    if raw.startswith(("postgresql://", "postgres://")):
        if spool is None:
            raise lsec.error("inventory", "a PostgreSQL inventory needs lifecycle.spool_dir (a local directory "
                                          "where `gateway-agent certs renew` queues requests)")
        try:
            from gateway_agent.inventory_pg import split_schema

            split_schema(raw)
        except ConfigError as exc:
            raise lsec.error("inventory", f"lifecycle.inventory: {exc.reason}") from exc
        return raw, (base_dir / spool).resolve()
    if raw.startswith("sqlite:"):
        if not raw.startswith("sqlite:///") or raw == "sqlite:///":
            raise lsec.error("inventory", "lifecycle.inventory must be sqlite:///<path> or postgresql://...")
        raw = raw.removeprefix("sqlite:///")
    elif "://" in raw:
        raise lsec.error("inventory", "lifecycle.inventory must be a file path, sqlite:///<path> or postgresql://...")
    db = (base_dir / raw).resolve()
    return f"sqlite:///{db}", (base_dir / spool).resolve() if spool else db.parent / "renew-requests"


def parse_agent_settings(text: bytes, *, source: str, base_dir: Path) -> AgentSettings:
    doc = yamlsrc.load(text, source=source)
    top = yamlsrc.Section(doc, source=source, what="agent settings")

    def path(sec: yamlsrc.Section, key: str) -> Path:
        return (base_dir / sec.take(key, str, required=True)).resolve()

    agent_id = top.take("agent_id", str, "gateway-agent")
    try:
        check_identity(agent_id)
    except Exception as exc:
        raise top.error("agent_id", f"agent_id: {exc}") from exc

    status = None
    ssec = top.sub("status")
    if ssec is not None:
        status = parse_status_section(ssec, base_dir=base_dir, default_bind="127.0.0.1:9465")

    crl_sec = top.sub("crl")
    crl = parse_crl_settings(crl_sec, base_dir) if crl_sec is not None else None

    broker = None
    bsec = top.sub("broker")
    if bsec is not None:
        broker = BrokerLink(host=bsec.take("host", str, "127.0.0.1"), port=bsec.take("port", int, 8883),
                            ca=path(bsec, "ca"), cert=path(bsec, "cert"), key=path(bsec, "key"), client_id=agent_id)
        bsec.done()

    validation = None
    vsec = top.sub("validation")
    if vsec is not None:
        validation = ValidationSettings(signing_key=path(vsec, "signing_key"),
                                        key_id=vsec.take("key_id", str, "gateway"),
                                        rate_per_minute=vsec.take("rate_per_minute", int, 60))
        vsec.done()
        if broker is None:
            raise top.error("validation", "the validation service needs a 'broker' section (its MQTT session)")

    lifecycle = None
    lsec = top.sub("lifecycle")
    if lsec is not None:
        defaults = RenewalPolicy()
        policy = RenewalPolicy(
            renew_before=timedelta(days=lsec.take("renew_before_days", float, defaults.renew_before.days)),
            overlap=timedelta(days=lsec.take("overlap_days", float, defaults.overlap.days)),
            expiring_within=timedelta(days=lsec.take("expiring_within_days", float, defaults.expiring_within.days)),
        )
        inventory, spool_dir = _inventory_location(lsec, base_dir)
        lifecycle = LifecycleSettings(
            inventory=inventory, ca_dir=path(lsec, "ca_dir"), registry=path(lsec, "registry"),
            policy=policy, spool_dir=spool_dir, concurrency=lsec.take("concurrency", int, 8),
            scan_interval=timedelta(hours=lsec.take("scan_interval_hours", float, 24.0)),
            lifetime=timedelta(days=lsec.take("certificate_days", float, 30.0)),
            broker_status_url=lsec.take("broker_status_url", str, None),
            leader_lease=timedelta(seconds=lsec.take("leader_lease_seconds", float, 15.0)),
        )
        if not 2.0 <= lifecycle.leader_lease.total_seconds() <= 600:
            raise lsec.error("leader_lease_seconds", "lifecycle.leader_lease_seconds must be 2 .. 600")
        url = lifecycle.broker_status_url
        if url is not None and not url.startswith(("http://127.", "http://localhost:", "http://[::1]:")):
            raise lsec.error("broker_status_url", "lifecycle.broker_status_url must be the broker's loopback "
                                                  "status endpoint, e.g. http://127.0.0.1:9464/status")
        lsec.done()
        if not 1 <= lifecycle.concurrency <= 256:
            raise top.error("lifecycle", "lifecycle.concurrency must be 1 .. 256")
    top.done()
    return AgentSettings(agent_id=agent_id, status=status, crl=crl, broker=broker,
                         validation=validation, lifecycle=lifecycle, source=source)
