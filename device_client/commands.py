"""The device's own check of every signed command.

The broker already verified the envelope, but the device trusts nothing in between:
it checks the signature against its own copy of the operator keys, that the command
is addressed to it (``aud`` and topic), that it is fresh by its own clock, and that it
has not seen the nonce before (its own replay cache). It uses the same
``edge_core.envelope.verify_envelope`` the broker uses, so the two cannot drift; the
published vectors (``tests/vectors/command_vectors.json``) pin both.

A device restarts more often than a broker. Its default replay cache starts empty
with ``not_before`` = construction time, so commands issued before the device booted
(plus the allowed skew) are refused as ``issued_before_restart`` and must be re-sent.
"""

from __future__ import annotations

from edge_core.clock import Clock
from edge_core.envelope import CommandRefused, VerifiedCommand, verify_envelope
from edge_core.events import SecurityEvents
from edge_core.identity import check_identity
from edge_core.operators import DeviceFacts, EnvelopePolicy, OperatorKeys
from edge_core.replay import MemoryReplayCache, ReplayCache

__all__ = ["DEFAULT_REPLAY_CAPACITY", "DeviceCommandVerifier"]

#: A device sees few commands; 4096 live nonces cover 13 commands/s at the default 300 s TTL.
DEFAULT_REPLAY_CAPACITY = 4096


class DeviceCommandVerifier:
    """Verifies commands for one device. ``verify`` returns the command or raises ``CommandRefused``."""

    def __init__(
        self,
        device_id: str,
        keys: OperatorKeys,
        policy: EnvelopePolicy,
        clock: Clock,
        replay: ReplayCache | None = None,
        *,
        profile: DeviceFacts | None = None,
        events: SecurityEvents | None = None,
    ) -> None:
        self.device_id = check_identity(device_id)
        if profile is not None:
            if profile.device_id != device_id:
                raise ValueError(f"profile is for {profile.device_id!r}, not {device_id!r}")
            keys = keys.for_device(profile)
        self.keys = keys
        self.policy = policy
        self.clock = clock
        self.replay: ReplayCache = (
            replay if replay is not None
            else MemoryReplayCache(DEFAULT_REPLAY_CAPACITY, started_at=clock.now())
        )
        self.events = events if events is not None else SecurityEvents("device_client")

    def verify(self, token: bytes, *, topic: str | None = None) -> VerifiedCommand:
        """Verify ``token``; if given, ``topic`` must be one of this device's command topics."""
        try:
            if topic is not None:
                self._check_topic(topic)
            command = verify_envelope(
                token, topic_device=self.device_id, keys=self.keys, policy=self.policy,
                now=self.clock.now(), replay=self.replay,
            )
        except CommandRefused as exc:
            self.events.emit("command.rejected", exc.reason, level="warning", device=self.device_id,
                             operator=exc.operator, jti=exc.jti)
            raise
        self.events.emit("command.accepted", device=self.device_id, operator=command.issuer, jti=command.jti)
        return command

    def _check_topic(self, topic: str) -> None:
        if self.policy.device_from_topic(topic) != self.device_id:
            raise CommandRefused(
                "audience_mismatch",
                f"topic {topic[:120]!r} is not a command topic of {self.device_id!r}",
                device=self.device_id,
            )
