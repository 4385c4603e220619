"""CRL freshness: how current the installed CRL of an issuer is, and what a stale one means.

``StalenessPolicy`` decides whether devices of an issuer may connect and whether operators
are alarmed; ``parse_staleness`` validates its config section. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from edge_core.clock import as_utc
from edge_core.crl import InstalledCrl
from edge_core.errors import ConfigError
from edge_core.yamlsrc import Section

__all__ = ["Freshness", "FreshnessState", "StalenessPolicy", "evaluate_freshness", "parse_staleness"]

FreshnessState = Literal["fresh", "expiring", "stale_too_old", "stale_past_next_update", "missing"]


@dataclass(frozen=True)
class Freshness:
    """How current the installed CRL of one issuer is, and what the policy makes of it.

    ``admit``: may devices of this issuer connect. ``alarm``: raise an operator alarm
    (``expiring`` alarms long before anything is refused).
    """

    state: FreshnessState
    admit: bool
    alarm: bool
    message: str
    age: timedelta | None = None
    expires_in: timedelta | None = None


@dataclass(frozen=True)
class StalenessPolicy:
    """What to do when the CRL of an issuer is stale.

    ``fail_open_alarm`` (the default) keeps devices connected and raises an alarm;
    ``fail_closed`` refuses every device of that issuer until a fresh CRL is installed.

    Why fail-open is the default: a stale CRL is a failure of the publishing path, not
    evidence of an attack, and it hits every device of a CA at the same moment -
    Mosquitto and EMQX users report whole fleets rejected at once when a CRL expired.
    In a plant that stops production and safety telemetry. The exposure is bounded:
    the last good CRL stays enforced, so every certificate revoked before it is still
    refused; only revocations published after the last successful fetch are missed,
    which is the same window as any network outage. And it never surprises the
    operator: ``expiring`` alarms once ``warn_fraction`` (75 %) of the CRL's validity
    window has passed, days before nextUpdate with a 7-day CRL. Sites whose threat model
    puts a stolen certificate above availability choose ``fail_closed`` explicitly;
    they must then publish CRLs more often than ``max_age``.

    ``max_age`` bounds the age of a CRL (now - thisUpdate) even when the CA gives it a
    long validity, so a CRL source that silently stopped updating is noticed.
    """

    mode: Literal["fail_closed", "fail_open_alarm"] = "fail_open_alarm"
    max_age: timedelta = timedelta(hours=24)
    warn_fraction: float = 0.75

    def __post_init__(self) -> None:
        if self.mode not in ("fail_closed", "fail_open_alarm"):
            raise ConfigError(f"CRL staleness mode must be 'fail_closed' or 'fail_open_alarm', "
                              f"not {self.mode!r}")
        if self.max_age <= timedelta(0):
            raise ConfigError("CRL max_age must be positive")
        if not 0.0 < self.warn_fraction < 1.0:
            raise ConfigError("CRL warn_fraction must be between 0 and 1")

    def evaluate(self, installed: InstalledCrl | None, now: datetime) -> Freshness:
        now = as_utc(now)
        closed = self.mode == "fail_closed"
        if installed is None:
            return Freshness("missing", admit=not closed, alarm=True,
                             message="no CRL installed for this issuer")
        age = now - installed.this_update
        expires_in = installed.next_update - now
        if expires_in <= timedelta(0):
            return Freshness("stale_past_next_update", admit=not closed, alarm=True, age=age,
                             expires_in=expires_in,
                             message=f"CRL {installed.crl_number} of {installed.issuer} expired at "
                                     f"{installed.next_update.isoformat()}")
        if age > self.max_age:
            return Freshness("stale_too_old", admit=not closed, alarm=True, age=age, expires_in=expires_in,
                             message=f"CRL {installed.crl_number} of {installed.issuer} is {age} old "
                                     f"(max {self.max_age})")
        window = installed.next_update - installed.this_update
        if age >= window * self.warn_fraction:
            return Freshness("expiring", admit=True, alarm=True, age=age, expires_in=expires_in,
                             message=f"CRL {installed.crl_number} of {installed.issuer} "
                                     f"expires in {expires_in}")
        return Freshness("fresh", admit=True, alarm=False, age=age, expires_in=expires_in,
                         message=f"CRL {installed.crl_number} of {installed.issuer} is fresh")


def evaluate_freshness(installed: InstalledCrl | None, now: datetime,
                       policy: StalenessPolicy | None = None) -> Freshness:
    """``policy.evaluate`` with the default policy when none is given."""
    return (policy or StalenessPolicy()).evaluate(installed, now)


def parse_staleness(section: Section) -> StalenessPolicy:
    """The ``staleness`` section (mode, max_age seconds, warn_fraction); errors name file and line."""
    defaults = StalenessPolicy()
    mode = section.take("mode", str, defaults.mode)
    if mode not in ("fail_closed", "fail_open_alarm"):
        raise section.error("mode", f"{section.what}: 'mode' must be fail_closed or fail_open_alarm, not {mode!r}")
    max_age = section.take("max_age", float, defaults.max_age.total_seconds())
    if max_age <= 0:
        raise section.error("max_age", f"{section.what}: 'max_age' must be positive")
    warn = section.take("warn_fraction", float, defaults.warn_fraction)
    section.done()
    try:
        return StalenessPolicy(mode=mode, max_age=timedelta(seconds=max_age), warn_fraction=warn)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise section.error(None, f"{section.what}: {exc.reason}") from exc
