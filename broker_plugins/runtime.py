"""The broker's live state that plugins read on every decision.

One ``BrokerRuntime`` per broker. Reloads replace whole frozen objects (registry,
ACL policy, ...) with one assignment, so a decision sees either the old or the new
state, never a mix. Plugins get the runtime through their ``Config`` dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker_plugins.commands import CommandState
from broker_plugins.revocation import RevocationState
from broker_plugins.settings import BrokerSettings
from edge_core.acl import Policy, Subject
from edge_core.admission import Admitted
from edge_core.clock import Clock, SystemClock
from edge_core.events import SecurityEvents
from edge_core.registry import Registry

if TYPE_CHECKING:
    from broker_plugins.engine.session import Session

__all__ = ["ADMITTED", "REFUSAL", "BrokerRuntime", "admitted_of"]

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


def admitted_of(session: Session | None) -> Admitted | None:
    """The admitted identity of a session, or None if it never authenticated."""
    if session is None:
        return None
    value = session.attributes.get(ADMITTED)
    return value if isinstance(value, Admitted) else None
