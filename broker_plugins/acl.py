"""The topic ACL concern: its file, the compiled policy in the runtime, reload and enforcement.

Decisions themselves are the plugin's (``plugins/topic_acl.py``) and the core's
(``edge_core.acl``). This module loads the file (none configured: every publish and
subscribe is denied, ``broker.no_acl``), swaps a new policy in whole, and after a
reload removes live subscriptions the policy no longer grants (``subscription.removed``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from broker_plugins.engine.core import Engine
from broker_plugins.engine.session import Session
from broker_plugins.runtime import BrokerRuntime, admitted_of
from broker_plugins.watched import FileWatches, read_config_file
from edge_core.acl import parse_policy
from edge_core.errors import ConfigError

__all__ = ["AclConcern"]


class AclConcern:
    def __init__(self, path: Path | None, runtime: BrokerRuntime, *, settle: Callable[[], None]) -> None:
        self.path = path
        self.runtime = runtime
        self.engine: Engine | None = None
        self._settle = settle
        self._watches = FileWatches(runtime.events)

    def start(self) -> None:
        if self.path is not None:
            self.runtime.acl = parse_policy(read_config_file(self.path, "ACL file"), source=str(self.path))
        else:
            self.runtime.events.emit("broker.no_acl", "not_configured", level="warning",
                                     detail="no 'acl:' file configured: every publish and subscribe is denied")

    def watch(self, interval: float) -> None:
        if self.path is not None and self.runtime.acl is not None:
            self._watches.watch(self.path, self.load, self.runtime.acl.digest, interval=interval)

    async def reload(self) -> bool:
        """Re-read the ACL file now (SIGHUP); True if a new version was loaded."""
        return await self._watches.check_now()

    async def stop(self) -> None:
        await self._watches.stop()

    async def load(self, data: bytes) -> None:
        assert self.path is not None
        runtime = self.runtime
        path = str(self.path)
        old = runtime.acl
        try:
            policy = parse_policy(data, source=path)
        except ConfigError as exc:
            runtime.events.emit("config.reload_failed", "invalid", level="error", file=path, line=exc.line,
                                detail=exc.reason, kept=old.digest[:12] if old else None)
            return
        runtime.acl = policy
        self._settle()
        runtime.events.emit("config.reloaded", "acl", file=path, digest=policy.digest[:12])
        await self.prune_subscriptions("acl_reload")

    async def prune_subscriptions(self, reason: str) -> int:
        """Remove live subscriptions the current policy no longer grants; each removal is logged."""
        engine = self.engine
        if engine is None:
            return 0
        runtime = self.runtime
        policy = runtime.acl

        def revoked(session: Session, topic_filter: str) -> bool:
            if policy is None:
                return True
            admitted = admitted_of(session)
            # a session restored from the store has not reconnected yet: its client id is the
            # identity it was bound to when it was created
            subject = runtime.subject_of(admitted.identity if admitted else session.client_id)
            return subject is None or not policy.check_subscribe(subject, topic_filter).allowed

        return engine.remove_subscriptions(revoked, reason)

    def status(self) -> dict[str, object]:
        acl = self.runtime.acl
        return {"file": str(self.path) if self.path else None, "digest": acl.digest[:12] if acl else None}
