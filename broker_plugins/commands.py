"""The broker's command state: operators, envelope policy and the replay cache.

Operator keys are judged against the device registry (scopes by role or attribute), so
the bound key set is rebuilt whenever either the operators file or the registry
changes. The replay cache lives as long as the broker process: after a restart its
watermark refuses every command issued before the restart (plus the allowed skew),
so no replay window opens; see docs/commands.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_core.clock import Clock
from edge_core.operators import OperatorConfig, OperatorKeys
from edge_core.registry import Registry
from edge_core.replay import MemoryReplayCache

__all__ = ["CommandState"]


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
