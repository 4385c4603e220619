"""Prometheus metrics of a component, through ``prometheus_client``: HELP and TYPE on every family.

- ``<ns>_events_total{event,reason}``: a counter per security event and reason code, read
  from ``SecurityEvents`` at scrape time (one source of truth: the counts ``status`` shows).
  The alarm pairs a component lists in ``alarms`` are exposed from the start at 0, so an
  alert rule's ``increase()`` sees their first occurrence;
- gauges the component fills in by registering a reader (``Metrics.gauge``), and counters it
  keeps itself (``Metrics.counter``). The names a
  site's dashboards and alert rules rely on are listed in ``GAUGES`` with their help text;
  a gauge nobody fills in is absent, never a made-up zero;
- ``<ns>_build_info{version}`` and the process collector (``process_*``: memory, CPU, fds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_core.events import SecurityEvents

__all__ = ["AGENT_ALARMS", "BROKER_ALARMS", "CONTENT_TYPE", "COUNTERS", "GAUGES", "GaugeReading", "Metrics"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: The gauges our dashboards and alert rules use: name -> (help, label names).
GAUGES: Final[Mapping[str, tuple[str, tuple[str, ...]]]] = {
    "connections": ("Open device connections on a listener (TLS accepted, not yet closed)", ("listener",)),
    "sessions": ("MQTT sessions: connected now, or known (connected plus offline persistent)", ("state",)),
    "queue_depth": ("Messages waiting in a queue (offline sessions' queues, the delivery queue)", ("queue",)),
    "retained_messages": ("Retained messages the broker holds", ()),
    "crl_next_update_timestamp_seconds": ("nextUpdate of the CRL in force, per issuer, as Unix time", ("issuer",)),
    "crl_this_update_timestamp_seconds": ("thisUpdate of the CRL in force, per issuer, as Unix time", ("issuer",)),
    "crl_fresh": ("1 when the issuer's CRL admits devices under the staleness policy, else 0", ("issuer",)),
    "certificates": ("Device certificates in the inventory by lifecycle state", ("state",)),
    "certificate_soonest_expiry_days": ("Days until the soonest expiry of an active device certificate", ()),
    "uplink_queue_oldest_age_seconds": ("Age of the oldest message waiting in the uplink store-and-forward queue",
                                        ()),
    "uplink_queue_depth": ("Messages waiting in the uplink store-and-forward queue", ()),
    "uplink_queue_bytes": ("Bytes waiting in the uplink store-and-forward queue", ()),
    "uplink_cloud_connected": ("1 while the uplink's session to the cloud broker is up", ()),
    "uplink_local_connected": ("1 while the uplink's session to the local broker is up", ()),
    "services": ("Services the agent runs", ()),
}

#: help texts of counters services report by name (``<name>_total`` in ``Metrics.values``)
COUNTERS: Final[Mapping[str, str]] = {
    "uplink_forwarded": "Messages the uplink forwarded to the cloud broker",
    "uplink_resent": "Messages the uplink sent again after a reconnect",
    "uplink_local_redelivered": "Messages the local broker resent after an uplink crash, already queued (not twice)",
    "uplink_dropped": "Messages the uplink dropped (queue overflow)",
}

#: (event, reason) pairs the alert rules (configs/monitoring/alerts.yml) watch with increase()
BROKER_ALARMS: Final = (
    *(("crl.alarm", r) for r in ("expiring", "stale_past_next_update", "stale_too_old", "missing")),
    ("config.reload_failed", "invalid"), ("config.reload_failed", "unreadable"),
)
AGENT_ALARMS: Final = (
    *(("crl.stale", r) for r in ("expiring", "stale_past_next_update", "stale_too_old")),
    *(("crl.fetch_failed", r) for r in ("fetch_failed", "fetch_timeout", "http_status", "fetch_too_large")),
    *(("renewal.alarm", r) for r in ("cert_expired", "renewal_overdue", "renewal_failing")),
)

#: A reader returns one value (no labels) or a value per label tuple (a 1-tuple may be a plain string).
GaugeReading = float | Mapping[str, float] | Mapping[tuple[str, ...], float] | None


@dataclass(frozen=True)
class _Gauge:
    name: str
    documentation: str
    labels: tuple[str, ...]
    read: Callable[[], GaugeReading]
    counter: bool = False


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        ns = m.namespace
        events = CounterMetricFamily(f"{ns}_events", "Security events by event name and stable reason code",
                                     labels=["event", "reason"])
        counts = {(event, reason): count for event, reasons in m.events.snapshot().items()
                  for reason, count in reasons.items()}
        for pair in m.alarms:
            counts.setdefault(pair, 0)
        for (event, reason), count in sorted(counts.items()):
            events.add_metric([event, reason], count)
        yield events
        build = GaugeMetricFamily(f"{ns}_build_info", "Version of the running software (always 1)",
                                  labels=["version"])
        build.add_metric([m.version], 1)
        yield build
        for gauge in m.gauges():
            reading = gauge.read()
            if reading is None:
                continue  # the component has no value now (e.g. no CRL installed yet)
            kind = CounterMetricFamily if gauge.counter else GaugeMetricFamily
            family = kind(f"{ns}_{gauge.name}", gauge.documentation, labels=list(gauge.labels))
            if isinstance(reading, Mapping):
                for key, value in reading.items():
                    family.add_metric([key] if isinstance(key, str) else list(key), float(value))
            else:
                family.add_metric([], float(reading))
            yield family
        for source in m.sources():
            yield from _named_values(ns, source())


def _named_values(ns: str, values: Mapping[str, float]) -> Iterator[Metric]:
    for name, value in sorted(values.items()):
        if name.endswith("_total"):
            base = name.removesuffix("_total")
            counter = CounterMetricFamily(f"{ns}_{base}", COUNTERS.get(base, f"{base} (reported by a service)"))
            counter.add_metric([], float(value))
            yield counter
        else:
            known = GAUGES.get(name)
            gauge = GaugeMetricFamily(f"{ns}_{name}", known[0] if known else f"{name} (reported by a service)")
            gauge.add_metric([], float(value))
            yield gauge


class Metrics:
    """The metrics one component exposes on ``/metrics``."""

    def __init__(self, namespace: str, events: SecurityEvents, *, version: str = "unknown",
                 alarms: Iterable[tuple[str, str]] = (), process: bool = True) -> None:
        self.namespace = namespace
        self.events = events
        self.version = version
        self.alarms = tuple(alarms)
        self._gauges: dict[str, _Gauge] = {}
        self._sources: list[Callable[[], Mapping[str, float]]] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        if process:
            ProcessCollector(registry=self.registry)

    def gauge(self, name: str, read: Callable[[], GaugeReading], *, documentation: str | None = None,
              labels: tuple[str, ...] | None = None) -> None:
        """Fill in gauge ``name`` with ``read`` (called at every scrape, on the event loop: keep it cheap)."""
        known = GAUGES.get(name)
        if known is None and documentation is None:
            raise ValueError(f"gauge {name!r} is not in GAUGES: pass documentation= (and labels=)")
        doc = documentation if documentation is not None else known[0]  # type: ignore[index]
        names = labels if labels is not None else (known[1] if known else ())
        self._gauges[name] = _Gauge(name, doc, names, read)

    def counter(self, name: str, read: Callable[[], GaugeReading], *, documentation: str,
                labels: tuple[str, ...] = ()) -> None:
        """A counter the component keeps itself (a monotonic number), exposed as ``<ns>_<name>_total``."""
        self._gauges[name] = _Gauge(name, documentation, labels, read, counter=True)

    def values(self, read: Callable[[], Mapping[str, float]]) -> None:
        """Unlabelled values a service reports by name (``{"uplink_queue_depth": 3.0, ...}``), read at
        every scrape: a name ending in ``_total`` is a counter, every other a gauge."""
        self._sources.append(read)

    def gauges(self) -> list[_Gauge]:
        return list(self._gauges.values())

    def sources(self) -> list[Callable[[], Mapping[str, float]]]:
        return list(self._sources)

    def render(self) -> bytes:
        return generate_latest(self.registry)
