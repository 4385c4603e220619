"""What the broker tells its operators: gauges for ``/metrics`` and the checks behind ``/readyz``.

Readiness means "send devices here":

- ``listeners``: the device listener accepts (and the test endpoint, when configured);
- ``crl``: under ``fail_closed`` every issuer's CRL is fresh; a stale or missing one
  refuses that issuer's devices, so the broker is not ready. Under ``fail_open_alarm``
  a stale CRL raises ``crl.alarm`` but the broker stays ready (the policy admits).
- ``store``: with ``persistence`` configured, the last commit of the session store
  succeeded (a failed one aborts the connections whose messages it held: PUBACK means
  stored, so a broker that cannot store is no place to send devices).

Every reader runs on the event loop at scrape time and only counts what is in memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker_plugins.revocation import RevocationState
from edge_runtime.metrics import Metrics
from edge_runtime.status_http import NotReady, StatusServer

if TYPE_CHECKING:
    from broker_plugins.server import EdgeBroker

__all__ = ["install_observability"]


def install_observability(edge: EdgeBroker, server: StatusServer, metrics: Metrics) -> None:
    server.add_readiness_check("listeners", lambda: _listeners_up(edge))
    server.add_readiness_check("crl", lambda: _crl_admits(edge))
    if edge.settings.persistence is not None:
        server.add_readiness_check("store", lambda: _store_writes(edge))
    metrics.gauge("connections", lambda: _connections(edge))
    metrics.gauge("sessions", lambda: _sessions(edge))
    metrics.gauge("queue_depth", lambda: _queue_depths(edge))
    metrics.gauge("retained_messages", lambda: _retained(edge))
    metrics.counter("messages", lambda: _messages(edge),
                    documentation="PUBLISH messages received from clients and sent to them", labels=("direction",))
    metrics.counter("messages_dropped", lambda: _dropped(edge),
                    documentation="Deliveries dropped because the receiving session's queue was full")
    metrics.gauge("crl_next_update_timestamp_seconds", lambda: _crl_next_update(edge))
    metrics.gauge("crl_this_update_timestamp_seconds", lambda: _crl_this_update(edge))
    metrics.gauge("crl_fresh", lambda: _crl_fresh(edge))


def _listeners_up(edge: EdgeBroker) -> None:
    for name, listener in (("devices", edge.listener), ("cert-test", edge.cert_test_listener)):
        if name == "cert-test" and edge.settings.cert_test_bind is None:
            continue
        if listener is None or not listener.accepting:
            raise NotReady(f"the {name} listener is not accepting connections")


def _crl_admits(edge: EdgeBroker) -> None:
    state = edge.runtime.revocation if edge.runtime else None
    if not isinstance(state, RevocationState):
        return  # no revocation configured: nothing to be stale
    if state.settings.staleness.mode != "fail_closed":
        return
    now = edge.clock.now()
    refused = [f"{issuer}: {fresh.state}" for issuer in state.issuer_names
               if not (fresh := state.freshness(issuer, now)).admit]
    if refused:
        raise NotReady("fail_closed and the CRL is not fresh, so these issuers' devices are refused: "
                       + "; ".join(refused))


def _store_writes(edge: EdgeBroker) -> None:
    store = edge.broker.engine.store if edge.broker is not None else None
    error = getattr(store, "last_error", None)  # only the durable store can fail to write
    if error is not None:
        raise NotReady(f"the session store's last write failed ({type(error).__name__}: {str(error)[:120]}); "
                       f"check the disk under persistence.path")


def _connections(edge: EdgeBroker) -> dict[str, float] | None:
    out = {}
    for name, listener in (("devices", edge.listener), ("cert-test", edge.cert_test_listener),
                           ("plaintext", edge.plaintext_listener)):
        if listener is not None:
            out[name] = float(listener.active)
    return out or None


def _sessions(edge: EdgeBroker) -> dict[str, float] | None:
    if edge.broker is None:
        return None
    engine = edge.broker.engine
    return {"connected": float(len(engine.connected_sessions())), "known": float(len(engine.sessions))}


def _queue_depths(edge: EdgeBroker) -> dict[str, float] | None:
    if edge.broker is None:
        return None
    sessions = list(edge.broker.engine.sessions.values())
    return {"outbound": float(sum(len(s.queue) for s in sessions if s.connection is not None)),
            "offline": float(sum(len(s.queue) for s in sessions if s.connection is None))}


def _retained(edge: EdgeBroker) -> float | None:
    return float(len(edge.broker.engine.retained)) if edge.broker is not None else None


def _messages(edge: EdgeBroker) -> dict[str, float] | None:
    if edge.broker is None:
        return None
    engine = edge.broker.engine
    return {"received": float(engine.messages_in), "sent": float(engine.messages_out)}


def _dropped(edge: EdgeBroker) -> float | None:
    return float(edge.broker.engine.messages_dropped) if edge.broker is not None else None


def _crl_next_update(edge: EdgeBroker) -> dict[str, float] | None:
    state = edge.runtime.revocation if edge.runtime else None
    if not isinstance(state, RevocationState):
        return None
    return {issuer: installed.next_update.timestamp() for issuer, installed in state.index.installed.items()}


def _crl_this_update(edge: EdgeBroker) -> dict[str, float] | None:
    state = edge.runtime.revocation if edge.runtime else None
    if not isinstance(state, RevocationState):
        return None
    return {issuer: installed.this_update.timestamp() for issuer, installed in state.index.installed.items()}


def _crl_fresh(edge: EdgeBroker) -> dict[str, float] | None:
    state = edge.runtime.revocation if edge.runtime else None
    if not isinstance(state, RevocationState):
        return None
    now = edge.clock.now()
    return {issuer: float(state.freshness(issuer, now).admit) for issuer in state.issuer_names}
