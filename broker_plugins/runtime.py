"""The broker's live state that plugins read on every decision.

One ``BrokerRuntime`` per broker. Reloads replace whole frozen objects (registry,
ACL policy, ...) with one assignment, so a decision sees either the old or the new
state, never a mix. Plugins get the runtime through their ``Config`` dataclass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from broker_plugins.commands import CommandState
from broker_plugins.revocation import RevocationState
from broker_plugins.settings import BrokerSettings
from edge_core.acl import Policy, Subject
from edge_core.admission import Admitted, session_verdict
from edge_core.clock import Clock, SystemClock
from edge_core.events import SecurityEvents
from edge_core.registry import Registry

if TYPE_CHECKING:
    from broker_plugins.engine.core import Engine
    from broker_plugins.engine.session import Session

__all__ = ["ADMITTED", "REFUSAL", "BrokerRuntime", "admitted_of", "cut_refused_sessions"]

#: Session attribute holding the ``Admitted`` record of an authenticated connection.
ADMITTED = "edge.admitted"
#: Session attribute holding the reason code of a refused CONNECT (chooses the CONNACK code).
REFUSAL = "edge.refusal"
#: Session attribute set when the broker cuts a session (suppresses the will message).
CUT = "edge.cut"


@dataclass
class BrokerRuntime:
    settings: BrokerSettings
    registry: Registry
    clock: Clock = field(default_factory=SystemClock)
    events: SecurityEvents = field(default_factory=lambda: SecurityEvents("edge-broker"))
    acl: Policy | None = None
    commands: CommandState | None = None  # when commands are configured
    revocation: RevocationState | None = None  # when revocation is configured
    _subjects: dict[str, Subject] = field(default_factory=dict, repr=False)
    _subjects_of: Registry | None = field(default=None, repr=False)

    def verdict(self, admitted: Admitted, now: datetime) -> str | None:
        """May this session live? The broker's one verdict (``edge_core.admission.session_verdict``):
        the registry (device, enabled, pin, certificate validity), then revocation of the path."""
        if self.revocation is not None:
            return self.revocation.verdict(admitted, now, registry=self.registry)
        return session_verdict(admitted, now=now, registry=self.registry)

    def subject_of(self, identity: str) -> Subject | None:
        """The ACL subject of a device under the current registry (cached per registry object)."""
        registry = self.registry
        if self._subjects_of is not registry:
            self._subjects = {}
            self._subjects_of = registry
        subject = self._subjects.get(identity)
        if subject is None:
            entry = registry.get(identity)
            if entry is None:
                return None
            subject = self._subjects[identity] = Subject.from_entry(entry)
        return subject


#: Reasons that end a session for time's sake (the device may come back as it is): its persistent
#: state is kept. Every other reason refuses the device itself, and its state goes with it.
_KEEP_STATE = frozenset({"crl_stale", "cert_expired"})


def cut_refused_sessions(runtime: BrokerRuntime, engine: Engine, source: str, *,
                         only: Callable[[Admitted, datetime], bool] | None = None) -> int:
    """Cut every live session the broker's verdict no longer admits (registry, revocation, clock).

    ``only`` narrows which sessions are judged (the clock's sweep asks only about certificates
    past their validity). Each cut is one ``session.cut`` event with the reason and ``source``.
    """
    now = runtime.clock.now()
    cut = 0
    for session in engine.connected_sessions():
        admitted = admitted_of(session)
        if admitted is None or session.client_id is None or (only is not None and not only(admitted, now)):
            continue
        reason = runtime.verdict(admitted, now)
        if reason is not None:
            engine.cut_session(session.client_id, reason, drop_state=reason not in _KEEP_STATE, source=source,
                               serial=f"{admitted.cert.serial:x}")
            cut += 1
    return cut


def admitted_of(session: Session | None) -> Admitted | None:
    """The admitted identity of a session, or None if it never authenticated."""
    if session is None:
        return None
    value = session.attributes.get(ADMITTED)
    return value if isinstance(value, Admitted) else None
