"""Run a coroutine without a task when it does not need one.

Plugin hooks are coroutines (amqtt's plugin interface), but nearly every decision
(ACL, pins, envelope checks) completes without awaiting anything. ``run_eagerly`` steps
the coroutine at once, in the caller's frame; only when it really suspends is the rest
handed to an ``asyncio.Task``, so the hot path creates no task per message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

__all__ = ["run_eagerly"]

T = TypeVar("T")
Done = Callable[[Any, BaseException | None], None]


class _Rest:
    """The remainder of a suspended coroutine, awaitable inside a task."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        pending = self._first
        while True:
            try:
                sent = yield pending
            except BaseException as exc:  # noqa: BLE001 - cancellation and errors go into the coroutine
                try:
                    pending = self._coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                pending = self._coro.send(sent)
            except StopIteration as stop:
                return stop.value


def run_eagerly(coro: Coroutine[Any, Any, T], done: Callable[[T | None, BaseException | None], None]) -> bool:
    """Run ``coro``; call ``done(result, error)`` when it finishes. True if it finished right away."""
    try:
        first = coro.send(None)
    except StopIteration as stop:
        done(stop.value, None)
        return True
    except Exception as exc:  # noqa: BLE001 - reported to the caller, who fails closed
        done(None, exc)
        return True

    async def finish() -> None:
        try:
            result = await _Rest(coro, first)
        except Exception as exc:  # noqa: BLE001 - reported to the caller, who fails closed
            done(None, exc)
        else:
            done(result, None)

    task = asyncio.get_running_loop().create_task(finish())
    _pending.add(task)
    task.add_done_callback(_pending.discard)
    return False


_pending: set[asyncio.Task[None]] = set()
