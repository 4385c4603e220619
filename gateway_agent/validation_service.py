"""The validation service: answers MCUs' certificate questions over the local broker.

The agent connects to the broker with its own TLS identity (role ``gateway``), subscribes
to ``gateway/validation/+/request`` and answers each request on the requester's
``gateway/validation/<id>/response`` with an answer signed by the gateway validation key
(``edge_core.validation``; format in ``docs/validation.md``). The ``<id>`` level is the
requester's authenticated identity: the broker's ACL lets each device publish only to
its own request topic and receive only its own response topic.

    index_holder = [RevocationIndex()]          # the daemon swaps in each verified CRL
    service = ValidationService(endpoint, gateway_id="gateway-agent", signing_key=key,
                                issuers=issuer_certs, current_index=lambda: index_holder[0])
    async with service:
        await service.serve()

``handle`` is the whole decision for one message and does no I/O; ``serve`` only moves
bytes. Every request gives exactly one event: ``validation.answered`` (with ``status``
and, for ``unknown``, a reason) or ``validation.refused`` (with a ``REQUEST_REASONS``
code, ``rate_limited`` or ``internal_error``, and whether a signed ``unknown`` was sent).

The validation key is separate from the agent's TLS key: a leaked TLS key lets an
attacker talk to the broker as the agent, not sign answers devices believe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType

import aiomqtt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge_core.clock import Clock, SystemClock
from edge_core.errors import ConfigError, CredentialError, FetchError
from edge_core.events import SecurityEvents
from edge_core.files import atomic_write_bytes
from edge_core.identity import check_identity
from edge_core.revocation import RevocationIndex, StalenessPolicy
from edge_core.validation import (
    REQUEST_FILTER,
    IssuerSet,
    RequestRefused,
    decide,
    device_from_request_topic,
    gateway_key_id,
    parse_request,
    refusal_answer,
    response_topic,
    sign_answer,
)
from edge_runtime.mqtt import suback_refused
from gateway_agent.commanding import BrokerEndpoint

__all__ = [
    "PRIVATE_KEY_NAME",
    "PUBLIC_KEY_NAME",
    "RateLimiter",
    "ValidationKeyFiles",
    "ValidationService",
    "load_validation_key",
    "make_validation_key",
]

PRIVATE_KEY_NAME = "validation.key"
PUBLIC_KEY_NAME = "validation.pub"


# --------------------------------------------------------------------------- key material


@dataclass(frozen=True)
class ValidationKeyFiles:
    private: Path
    public: Path
    kid: str


def make_validation_key(out_dir: Path | str, *, force: bool = False) -> ValidationKeyFiles:
    """Create the gateway validation key pair (ECDSA P-256) in ``out_dir``.

    ``validation.key`` (PKCS#8 PEM, 0600) stays on the gateway; ``validation.pub``
    (SubjectPublicKeyInfo PEM) is provisioned into every device. Refuses to replace an
    existing key unless ``force``: devices pinned to the old key would refuse every answer.
    """
    out = Path(out_dir)
    private, public = out / PRIVATE_KEY_NAME, out / PUBLIC_KEY_NAME
    if private.exists() and not force:
        raise ConfigError(f"{private} already exists",
                          hint="devices trust the existing key; pass force=True only for a planned rotation")
    key = ec.generate_private_key(ec.SECP256R1())
    atomic_write_bytes(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()), mode=0o600)
    atomic_write_bytes(public, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    return ValidationKeyFiles(private, public, gateway_key_id(key.public_key()))


def load_validation_key(path: Path | str) -> ec.EllipticCurvePrivateKey:
    """The gateway validation private key; ``ConfigError`` naming the file otherwise."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load the validation key: {exc}", source=str(path)) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigError("the validation key must be an EC P-256 private key", source=str(path))
    return key


# --------------------------------------------------------------------------- rate limit


class RateLimiter:
    """A token bucket per device: ``burst`` requests at once, then ``rate`` per second.

    Tracks at most ``max_devices`` buckets; when full, buckets that have refilled (and so
    hold no state worth keeping) are forgotten, and if none has, new devices are refused
    rather than letting memory grow (deny by default).
    """

    def __init__(self, *, rate: float = 1.0, burst: int = 5, clock: Clock | None = None,
                 max_devices: int = 10_000) -> None:
        if rate <= 0 or burst < 1 or max_devices < 1:
            raise ConfigError("validation rate limit: rate > 0, burst >= 1 and max_devices >= 1 needed")
        self.rate = rate
        self.burst = burst
        self.max_devices = max_devices
        self.clock = clock or SystemClock()
        self._buckets: dict[str, tuple[float, datetime]] = {}

    def allow(self, device: str) -> bool:
        now = self.clock.now()
        tokens = self._tokens(device, now)
        if tokens is None:
            return False
        if tokens < 1.0:
            self._buckets[device] = (tokens, now)
            return False
        self._buckets[device] = (tokens - 1.0, now)
        return True

    def _tokens(self, device: str, now: datetime) -> float | None:
        entry = self._buckets.get(device)
        if entry is None:
            if len(self._buckets) >= self.max_devices:
                self._forget_refilled(now)
                if len(self._buckets) >= self.max_devices:
                    return None
            return float(self.burst)
        tokens, last = entry
        elapsed = max((now - last).total_seconds(), 0.0)
        return min(float(self.burst), tokens + elapsed * self.rate)

    def _forget_refilled(self, now: datetime) -> None:
        full = [d for d, (tokens, last) in self._buckets.items()
                if tokens + max((now - last).total_seconds(), 0.0) * self.rate >= self.burst]
        for device in full:
            del self._buckets[device]


# --------------------------------------------------------------------------- the service


class ValidationService:
    """Answers validation requests for as long as ``serve`` runs. See the module docstring.

    ``current_index`` is called for every request and returns the revocation index in
    force (``RevocationIndex`` holds the installed CRL records too, so nothing else is
    needed). The daemon passes a function that reads whatever its CRL sync last swapped in.
    ``issuers`` are the CA certificates the CRL sync trusts and ``anchors`` the trust
    bundle they chain to (the broker's ``client_ca``): every answer vouches for the whole
    path. ``staleness`` is the same policy the broker applies.
    """

    def __init__(
        self,
        endpoint: BrokerEndpoint,
        *,
        gateway_id: str,
        signing_key: ec.EllipticCurvePrivateKey,
        issuers: IssuerSet | Sequence[x509.Certificate],
        current_index: Callable[[], RevocationIndex],
        anchors: Sequence[x509.Certificate] = (),
        staleness: StalenessPolicy | None = None,
        clock: Clock | None = None,
        events: SecurityEvents | None = None,
        limiter: RateLimiter | None = None,
        client_id: str | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self.gateway_id = _checked_id(gateway_id, "gateway_id")
        self.client_id = _checked_id(client_id or gateway_id, "client_id")
        if not isinstance(signing_key, ec.EllipticCurvePrivateKey) or signing_key.curve.name != "secp256r1":
            raise ConfigError("the validation signing key must be an EC P-256 private key")
        self.endpoint = endpoint
        self.signing_key = signing_key
        self.kid = gateway_key_id(signing_key.public_key())
        self.issuers = issuers if isinstance(issuers, IssuerSet) else IssuerSet.from_certificates(issuers, anchors)
        self.current_index = current_index
        self.staleness = staleness or StalenessPolicy()
        self.clock = clock or SystemClock()
        self.events = events if events is not None else SecurityEvents("gateway_agent.validation")
        self.limiter = limiter if limiter is not None else RateLimiter(clock=self.clock)
        self.connect_timeout = connect_timeout
        self._client: aiomqtt.Client | None = None
        self._entered = False
        self._serving = False

    # ------------------------------------------------------------------ decisions (no I/O)

    def handle(self, topic: str, payload: bytes) -> tuple[str, bytes] | None:
        """The response (topic, token) to one request message, or None when none is sent."""
        try:
            device = device_from_request_topic(topic)
        except RequestRefused as exc:
            self.events.emit("validation.refused", exc.reason, level="warning", topic=topic[:120], answered=False)
            return None
        if not self.limiter.allow(device):
            self.events.emit("validation.refused", "rate_limited", level="warning", device=device, answered=False)
            return None
        now = self.clock.now()
        try:
            request = parse_request(payload)
        except RequestRefused as exc:
            refusal = refusal_answer(exc, device=device, gateway=self.gateway_id, now=now)
            self.events.emit("validation.refused", exc.reason, level="warning", device=device,
                             answered=refusal is not None, detail=str(exc)[:200])
            return None if refusal is None else (response_topic(device), sign_answer(refusal, self.signing_key))
        answer = decide(request, device=device, gateway=self.gateway_id, index=self.current_index(),
                        issuers=self.issuers, now=now, staleness=self.staleness)
        self.events.emit("validation.answered", answer.reason, device=device, status=answer.status,
                         serial=f"{request.serial:x}", issuer_hash=request.issuer_hash[:16],
                         crl_number=answer.crl_number, form="cert" if request.cert is not None else "hash")
        return response_topic(device), sign_answer(answer, self.signing_key)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> ValidationService:
        if self._entered:
            raise RuntimeError("ValidationService cannot be entered twice")
        self._entered = True
        client = aiomqtt.Client(
            self.endpoint.host, self.endpoint.port, identifier=self.client_id,
            tls_context=self.endpoint.tls_context(), protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=True, timeout=self.connect_timeout,
        )
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            raise FetchError("broker_unreachable", f"validation service cannot connect to "
                             f"{self.endpoint.host}:{self.endpoint.port}: {exc}") from exc
        self._client = client
        try:
            granted = await client.subscribe(REQUEST_FILTER, qos=1)
        except aiomqtt.MqttError as exc:
            await self._close(exc)
            raise FetchError("broker_refused", f"subscribe to {REQUEST_FILTER} failed: {exc}") from exc
        if any(suback_refused(code) for code in granted):
            await self._close(None)
            raise ConfigError(f"the broker refused the subscription {REQUEST_FILTER}",
                              hint="grant the gateway role 'subscribe gateway/validation/+/request' and "
                                   "'publish gateway/validation/+/response' in the ACL")
        self.events.emit("validation.started", gateway=self.gateway_id, kid=self.kid)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._close(exc)

    async def _close(self, exc: BaseException | None) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.__aexit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)

    async def serve(self) -> None:
        """Answer requests until cancelled; a lost broker connection raises ``aiomqtt.MqttError``."""
        if self._client is None:
            raise RuntimeError("serve() needs an entered ValidationService (async with)")
        if self._serving:
            raise RuntimeError("serve() is already running")
        self._serving = True
        client = self._client
        try:
            async for message in client.messages:
                payload = message.payload if isinstance(message.payload, bytes) else b""
                try:
                    reply = self.handle(str(message.topic), payload)
                except (CredentialError, ValueError, TypeError) as exc:
                    # A bug must not answer: no reply is a deny, and one request cannot stop the service.
                    self.events.emit("validation.refused", "internal_error", level="error",
                                     topic=str(message.topic)[:120], answered=False, detail=repr(exc)[:200])
                    continue
                if reply is not None:
                    await client.publish(reply[0], reply[1], qos=1)
        finally:
            self._serving = False


def _checked_id(value: str, what: str) -> str:
    try:
        return check_identity(value)
    except CredentialError as exc:
        raise ConfigError(f"{what}: {exc}") from exc
