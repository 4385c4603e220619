"""The broker's command state: operators, envelope policy and the replay store.

Operator keys are judged against the device registry (scopes by role or attribute), so
the bound key set is rebuilt whenever either the operators file or the registry
changes.

The replay store is chosen by ``commands.replay_store``:

- ``memory`` (default): lives as long as the broker process; after a restart its watermark
  refuses every command issued before the restart (plus the allowed skew), so no replay
  window opens;
- a Redis URL: shared by every broker of the site (``broker_plugins.replay_redis``), so a
  command accepted by one broker is ``replayed`` on all of them. If the store cannot answer,
  commands are refused with ``replay_store_unavailable`` (fail closed) and an alarm is raised.
  Its round trip runs in a worker thread, never on the event loop.

See docs/commands.md and docs/scaling.md.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from broker_plugins.replay_redis import RedisReplayStore
from broker_plugins.watched import FileWatches, read_config_file
from edge_core.clock import Clock
from edge_core.envelope import VerifiedCommand, verify_envelope
from edge_core.errors import ConfigError
from edge_core.events import SecurityEvents
from edge_core.operators import OperatorConfig, OperatorKeys, parse_operators
from edge_core.registry import Registry
from edge_core.replay import MemoryReplayCache, ReplayCache

if TYPE_CHECKING:
    from broker_plugins.runtime import BrokerRuntime
    from broker_plugins.settings import CommandSettings

__all__ = ["CommandConcern", "CommandState", "open_replay_store"]


def open_replay_store(settings: CommandSettings, *, clock: Clock, events: SecurityEvents) -> ReplayCache:
    """The configured replay store; a Redis store is checked (eviction policy) if reachable."""
    if settings.replay_store == "memory":
        return MemoryReplayCache(settings.replay_capacity, started_at=clock.now())
    store = RedisReplayStore(settings.replay_store, prefix=settings.replay_prefix, clock=clock, events=events,
                             timeout=settings.replay_timeout)
    try:
        store.check_server()
    except BaseException:
        store.close()
        raise
    events.emit("replay_store.opened", store=store.url, prefix=store.prefix)
    return store


@dataclass
class CommandState:
    config: OperatorConfig
    replay: ReplayCache
    _bound: tuple[OperatorConfig, Registry, OperatorKeys] | None = field(default=None, repr=False)

    @classmethod
    def start(cls, config: OperatorConfig, *, settings: CommandSettings, clock: Clock,
              events: SecurityEvents) -> CommandState:
        return cls(config=config, replay=open_replay_store(settings, clock=clock, events=events))

    def keys_for(self, registry: Registry) -> OperatorKeys:
        bound = self._bound
        if bound is None or bound[0] is not self.config or bound[1] is not registry:
            keys = OperatorKeys.bind(self.config, registry)
            self._bound = bound = (self.config, registry, keys)
        return bound[2]

    async def verify(self, payload: bytes, *, device: str, registry: Registry, now: datetime) -> VerifiedCommand:
        """``verify_envelope`` with this state; a remote store's round trip leaves the event loop."""
        keys = self.keys_for(registry)
        policy = self.config.policy
        if isinstance(self.replay, MemoryReplayCache):
            return verify_envelope(payload, topic_device=device, keys=keys, policy=policy, now=now,
                                   replay=self.replay)
        return await asyncio.to_thread(verify_envelope, payload, topic_device=device, keys=keys, policy=policy,
                                       now=now, replay=self.replay)

    def close(self) -> None:
        if isinstance(self.replay, RedisReplayStore):
            self.replay.close()


class CommandConcern:
    """Signed commands: the operators file, the command state in the runtime, and its reload.

    A reload swaps the operators and keys; the replay cache is kept, so nonces already
    seen stay seen. The envelope check itself is the command guard plugin's.
    """

    def __init__(self, settings: CommandSettings, runtime: BrokerRuntime) -> None:
        self.settings = settings
        self.runtime = runtime
        self._watches = FileWatches(runtime.events)

    def start(self) -> CommandState:
        operators = self._parse(read_config_file(self.settings.operators_path, "operators file"))
        state = CommandState.start(operators, settings=self.settings, clock=self.runtime.clock,
                                   events=self.runtime.events)
        self.runtime.commands = state
        return state

    def watch(self, interval: float) -> None:
        state = self.runtime.commands
        assert state is not None
        self._watches.watch(self.settings.operators_path, self.load, state.config.digest, interval=interval)

    async def reload(self) -> bool:
        """Re-read the operators file now (SIGHUP); True if a new version was loaded."""
        return await self._watches.check_now()

    async def stop(self) -> None:
        await self._watches.stop()

    def close(self) -> None:
        """Let go of the replay store (the Redis connection); after the broker stopped."""
        if self.runtime.commands is not None:
            self.runtime.commands.close()

    def _parse(self, data: bytes) -> OperatorConfig:
        path = self.settings.operators_path

        def read_key(key_path: str) -> bytes:
            return read_config_file(Path(key_path), "operator key file")

        return parse_operators(data, source=str(path), read_key=read_key)

    async def load(self, data: bytes) -> None:
        state = self.runtime.commands
        assert state is not None
        path = str(self.settings.operators_path)
        try:
            config = self._parse(data)
        except ConfigError as exc:
            self.runtime.events.emit("config.reload_failed", "invalid", level="error", file=path, line=exc.line,
                                     detail=exc.reason, kept=state.config.digest[:12])
            return
        state.config = config  # the replay cache is kept: nonces already seen stay seen
        self.runtime.events.emit("config.reloaded", "operators", file=path, operators=len(config.operators),
                                 digest=config.digest[:12])
