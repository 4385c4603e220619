"""The broker process under an init system: signals, systemd notify and watchdog.

- SIGHUP: ``reload_all``: one reload per concern (registry, ACL, operators, CRLs, TLS
  certificate and key for new connections), each all-or-nothing; one ``broker.reloaded``
  event lists what changed, what was unchanged and what failed (the failed ones keep their
  last good state and log ``config.reload_failed`` with file and line). The broker keeps
  serving throughout.
- SIGTERM / SIGINT: drain (stop accepting, close sessions, the broker saves its state) and exit 0;
  no will fires (``will.suppressed reason=broker_shutdown`` with the count withheld).
- Every other signal keeps its default action.

``Type=notify``: READY=1 once the listeners accept, RELOADING=1 ... READY=1 around a
reload, STOPPING=1 when draining, WATCHDOG=1 from the event loop.
"""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING

from edge_runtime.sd_notify import Notifier

if TYPE_CHECKING:
    from broker_plugins.server import EdgeBroker, ReloadOutcome

__all__ = ["reload_all", "serve_until_stopped"]


async def reload_all(edge: EdgeBroker) -> dict[str, ReloadOutcome]:
    """Reload every reloadable concern now; returns ``{concern: changed|unchanged|failed}``."""
    outcomes: dict[str, ReloadOutcome] = {}
    for name, reload in edge.reloaders().items():
        try:
            outcomes[name] = await reload()
        except Exception as exc:  # noqa: BLE001 - one concern's bug must not stop the others' reload
            edge.events.emit("config.reload_failed", "error", level="error", concern=name,
                             detail=f"{type(exc).__name__}: {exc}"[:300])
            outcomes[name] = "failed"
    by = {kind: sorted(n for n, o in outcomes.items() if o == kind) for kind in ("changed", "unchanged", "failed")}
    edge.events.emit("broker.reloaded", "sighup", level="warning" if by["failed"] else "info", **by)
    return outcomes


async def serve_until_stopped(edge: EdgeBroker, notifier: Notifier | None = None) -> None:
    """Serve until SIGTERM/SIGINT; reload on SIGHUP. For ``edge-broker run``."""
    notify = notifier or Notifier()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()

    async def hup() -> None:
        notify.reloading()
        outcomes = await reload_all(edge)
        notify.ready(_summary(edge, outcomes))

    def on_hup() -> None:
        task = loop.create_task(hup(), name="sighup-reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    def on_stop(signum: int) -> None:
        edge.events.emit("broker.stopping", signal.Signals(signum).name)
        stop.set()

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    try:
        notify.ready(_summary(edge, None))
        notify.start_watchdog()
        closed = loop.create_task(edge.wait_closed())
        stopping = loop.create_task(stop.wait())
        await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in (closed, stopping):
            task.cancel()
        notify.stopping()
        if reloads:
            await asyncio.gather(*reloads, return_exceptions=True)
        await edge.close()
    finally:
        await notify.stop_watchdog()
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _summary(edge: EdgeBroker, outcomes: dict[str, ReloadOutcome] | None) -> str:
    text = f"serving on {edge.settings.listener.host}:{edge.port}"
    if outcomes is not None:
        failed = [n for n, o in outcomes.items() if o == "failed"]
        text += "; reloaded" + (f", kept last good {', '.join(failed)}" if failed else "")
    return text
