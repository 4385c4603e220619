"""The broker's command state: operators, envelope policy and the replay cache.

Operator keys are judged against the device registry (scopes by role or attribute), so
the bound key set is rebuilt whenever either the operators file or the registry
changes. The replay cache lives as long as the broker process: after a restart its
watermark refuses every command issued before the restart (plus the allowed skew),
so no replay window opens; see docs/commands.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from broker_plugins.watched import FileWatches, read_config_file
from edge_core.clock import Clock
from edge_core.errors import ConfigError
from edge_core.operators import OperatorConfig, OperatorKeys, parse_operators
from edge_core.registry import Registry
from edge_core.replay import MemoryReplayCache

if TYPE_CHECKING:
    from broker_plugins.runtime import BrokerRuntime
    from broker_plugins.settings import CommandSettings

__all__ = ["CommandConcern", "CommandState"]


@dataclass
class CommandState:
    config: OperatorConfig
    replay: MemoryReplayCache
    _bound: tuple[OperatorConfig, Registry, OperatorKeys] | None = field(default=None, repr=False)

    @classmethod
    def start(cls, config: OperatorConfig, *, capacity: int, clock: Clock) -> CommandState:
        return cls(config=config, replay=MemoryReplayCache(capacity, started_at=clock.now()))

    def keys_for(self, registry: Registry) -> OperatorKeys:
        bound = self._bound
        if bound is None or bound[0] is not self.config or bound[1] is not registry:
            keys = OperatorKeys.bind(self.config, registry)
            self._bound = bound = (self.config, registry, keys)
        return bound[2]


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
        state = CommandState.start(operators, capacity=self.settings.replay_capacity, clock=self.runtime.clock)
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
