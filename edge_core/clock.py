"""Injected clocks. Every time the core compares is an aware UTC datetime."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock", "as_utc"]


class Clock(Protocol):
    def now(self) -> datetime:
        """Current time, aware, in UTC."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock tests move by hand: time travel instead of sleeping."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = as_utc(start) if start is not None else datetime.now(UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta) -> None:
        if delta < timedelta(0):
            raise ValueError("a manual clock only moves forward")
        self._now += delta

    def set(self, when: datetime) -> None:
        self._now = as_utc(when)


def as_utc(value: datetime) -> datetime:
    """Force a datetime to aware UTC at the boundary; naive values are refused."""
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value.isoformat()} has no timezone; use aware UTC")
    return value.astimezone(UTC)
