"""Security events are data: one structlog event per decision, with a reason code.

``SecurityEvents`` emits through structlog and counts each (event, reason) pair so the
counters can be read by a status command or a metrics endpoint. It never logs keys or
whole certificates: callers pass identities, serials and short fingerprints only.
Configuring the output (JSON lines) is the CLI's job, not the library's.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any

import structlog

__all__ = ["SecurityEvents"]


class SecurityEvents:
    def __init__(self, component: str, *, keep_recent: int = 256) -> None:
        self.component = component
        self._log = structlog.get_logger(component)
        self._counts: Counter[tuple[str, str]] = Counter()
        self._recent: deque[dict[str, Any]] = deque(maxlen=keep_recent)
        self._lock = threading.Lock()

    def emit(self, event: str, reason: str | None = None, *, level: str = "info", **fields: Any) -> None:
        """Log ``event`` (e.g. ``auth.rejected``) with ``reason`` and count it."""
        key = (event, reason or "")
        if reason is not None:
            fields["reason"] = reason
        with self._lock:
            self._counts[key] += 1
            self._recent.append({"event": event, **fields})
        getattr(self._log, level)(event, **fields)

    def count(self, event: str, reason: str | None = None) -> int:
        with self._lock:
            if reason is None:
                return sum(n for (ev, _), n in self._counts.items() if ev == event)
            return self._counts[(event, reason)]

    def recent(self, event: str | None = None) -> list[dict[str, Any]]:
        """The last events (bounded), oldest first; optionally only one event name."""
        with self._lock:
            return [dict(e) for e in self._recent if event is None or e["event"] == event]

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Counters as ``{event: {reason: n}}``; events without reason use the key ``""``."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for (event, reason), n in sorted(self._counts.items()):
                out.setdefault(event, {})[reason] = n
        return out
