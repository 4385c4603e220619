"""Signed command envelopes: JWS compact serialization, ES256 only (RFC 7515/7518).

An operator signs every command; the broker and then the device verify it::

    header  {"alg": "ES256", "typ": "edge-cmd+jwt", "kid": "alice"}
    claims  {"iss": "alice", "aud": "pump-17", "iat": 1767225600, "exp": 1767225660,
             "jti": "3q2-7wQ8T7mXk0b3Yc1N5A", "cmd": {"name": "set_speed", "rpm": 1200}}

``verify_envelope`` returns a ``VerifiedCommand`` or raises ``CommandRefused`` (an
``EnvelopeError``) with exactly one stable reason code from ``REASONS``. The checks run
in a fixed order, which the published test vectors pin:

1. ``oversized``, ``not_envelope``: size, then structure (ASCII, three canonical
   base64url parts, JSON objects without duplicate keys); no key is touched yet;
2. ``bad_algorithm``: the header says exactly ``ES256``; ``bad_header``: only ``alg``,
   ``typ`` (= policy typ) and ``kid`` are present. Embedded keys (``jwk``, ``jku``,
   ``x5c``...), ``crit`` and ``b64`` are refused here;
3. ``unknown_issuer``: the ``kid`` names a configured operator key;
4. ``bad_signature``: the signature verifies with that key, ES256 only;
5. ``missing_claim``, ``bad_claim``: the six claims, their types, nothing else;
   ``iss`` must be the operator who owns the key;
6. ``audience_mismatch``, ``issuer_not_authorized``: who may command whom;
7. ``ttl_too_long``, ``issued_in_future``, ``expired``, ``issued_before_restart``: when;
8. ``replayed``, ``replay_cache_full``: the nonce is recorded last, only when every other
   check passed, so refused envelopes never fill the cache; ``replay_store_unavailable``:
   a shared replay store could not answer, so the command is refused (fail closed).

Time rules, with ``skew = policy.max_skew``: accepted iff
``iat - skew <= now <= exp + skew``, ``0 < exp - iat <= max_ttl`` and
``iat >= replay.not_before + skew``. ``iat`` and ``exp`` are integers (seconds).

The replay key is the issuer and ``jti``, never the token bytes: ECDSA signatures are
malleable, so a replay with a re-encoded signature is still caught.

Steps 1, 2 and 4 are ``edge_core.jws``'s, shared with the validation service's answers.
No I/O: the token, the time, the keys and the replay store are handed in.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, NoReturn

from cryptography.hazmat.primitives.asymmetric import ec

from edge_core import jws
from edge_core.clock import as_utc
from edge_core.errors import EnvelopeError
from edge_core.identity import check_identity
from edge_core.operators import EnvelopePolicy, OperatorKeys
from edge_core.replay import ReplayCache, ReplayStoreUnavailable, ReplayVerdict, replay_key

__all__ = [
    "ACCEPTANCE_TOPIC",
    "ALGORITHM",
    "CLAIMS",
    "DEFAULT_TYP",
    "REASONS",
    "REJECTION_TOPIC",
    "STORE_REASONS",
    "CommandRefused",
    "VerifiedCommand",
    "acceptance_notice",
    "new_jti",
    "rejection_notice",
    "sign_command",
    "verify_envelope",
]

ALGORITHM = jws.ALGORITHM
DEFAULT_TYP = EnvelopePolicy().typ
CLAIMS = ("iss", "aud", "iat", "exp", "jti", "cmd")
REJECTION_TOPIC = "operators/{operator}/cmd-rejected"
ACCEPTANCE_TOPIC = "operators/{operator}/cmd-accepted"

#: Stable reason codes, in check order. Never renamed, only added to.
REASONS = (
    "oversized",
    "not_envelope",
    "bad_algorithm",
    "bad_header",
    "unknown_issuer",
    "bad_signature",
    "missing_claim",
    "bad_claim",
    "audience_mismatch",
    "issuer_not_authorized",
    "ttl_too_long",
    "issued_in_future",
    "expired",
    "issued_before_restart",
    "replayed",
    "replay_cache_full",
)
#: Refusals only a shared replay store causes (a broker's Redis, never a device's own cache),
#: so they are not in the published test vectors.
STORE_REASONS = ("replay_store_unavailable",)

#: 22 base64url characters carry 132 bits, enough for a 128-bit random nonce.
_JTI_RE = re.compile(r"[A-Za-z0-9_-]{22,128}")


class CommandRefused(EnvelopeError):
    """A command envelope was refused; ``reason`` is one of ``REASONS`` (or ``STORE_REASONS``).

    ``operator`` and ``jti`` are set only once the signature verified, so a rejection
    notice never goes to an operator on the word of a forger.
    """

    def __init__(
        self, reason: str, message: str, *, device: str | None = None,
        operator: str | None = None, jti: str | None = None,
    ) -> None:
        super().__init__(reason, message)
        self.device = device
        self.operator = operator
        self.jti = jti


@dataclass(frozen=True)
class VerifiedCommand:
    issuer: str
    kid: str
    device: str
    jti: str
    issued_at: datetime
    expires_at: datetime
    body: Mapping[str, Any]


def new_jti() -> str:
    """A fresh nonce: 128 random bits as 22 base64url characters."""
    return secrets.token_urlsafe(16)


def sign_command(
    private_key: ec.EllipticCurvePrivateKey,
    *,
    issuer: str,
    device: str,
    body: Mapping[str, Any],
    ttl: timedelta,
    now: datetime,
    kid: str | None = None,
    jti: str | None = None,
    typ: str = DEFAULT_TYP,
) -> bytes:
    """Sign ``body`` as a command from ``issuer`` to ``device``, valid ``ttl`` from ``now``."""
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise TypeError("ES256 needs an EC private key")
    if private_key.curve.name != "secp256r1":
        raise ValueError(f"ES256 needs a P-256 key, not {private_key.curve.name}")
    check_identity(issuer)
    check_identity(device)
    if kid is not None:
        check_identity(kid)
    ttl_seconds = ttl.total_seconds()
    if ttl_seconds < 1 or ttl_seconds != int(ttl_seconds):
        raise ValueError(f"ttl {ttl} must be a whole number of seconds, at least 1")
    if jti is None:
        jti = new_jti()
    elif not _JTI_RE.fullmatch(jti):
        raise ValueError("jti must be 22-128 base64url characters (at least 128 random bits)")
    if not isinstance(body, Mapping):
        raise TypeError("the command body must be a JSON object (a mapping)")
    iat = int(as_utc(now).timestamp())
    claims = {"iss": issuer, "aud": device, "iat": iat, "exp": iat + int(ttl_seconds), "jti": jti,
              "cmd": dict(body)}
    return jws.sign_compact({"typ": typ, "kid": kid or issuer}, claims, private_key)


def verify_envelope(
    token: bytes,
    *,
    topic_device: str,
    keys: OperatorKeys,
    policy: EnvelopePolicy,
    now: datetime,
    replay: ReplayCache,
) -> VerifiedCommand:
    """Verify a command published for ``topic_device``; see the module docstring for the order."""
    now = as_utc(now)
    try:
        parsed = jws.parse_compact(token, max_size=policy.max_size, typ=policy.typ, what="envelope")
    except jws.JwsError as exc:
        reason = "not_envelope" if exc.kind == "malformed" else exc.kind
        raise CommandRefused(reason, str(exc), device=topic_device) from exc
    kid, claims = parsed.kid, parsed.payload
    operator_key = keys.key(kid)
    if operator_key is None:
        raise CommandRefused("unknown_issuer", f"no operator key with kid {kid[:64]!r} is configured",
                             device=topic_device)
    try:
        parsed.verify(operator_key.public_key)
    except jws.JwsError as exc:
        raise CommandRefused("bad_signature", f"signature does not verify with key {kid!r}: {exc}",
                             device=topic_device) from exc
    # From here on the claims are the operator's own words.
    operator = operator_key.operator
    jti_value = claims.get("jti")
    jti = jti_value if isinstance(jti_value, str) and _JTI_RE.fullmatch(jti_value) else None

    def refuse(reason: str, message: str) -> NoReturn:
        raise CommandRefused(reason, message, device=topic_device, operator=operator, jti=jti)

    iat, exp, body = _check_claims(claims, operator=operator, kid=kid, refuse=refuse)
    if jti is None:
        refuse("bad_claim", "claim 'jti' must be 22-128 base64url characters (>= 128 random bits)")
    aud = claims["aud"]
    if aud != topic_device:
        refuse("audience_mismatch", f"envelope is for {aud!r:.80} but was published for {topic_device!r}")
    if not keys.may_command(operator, topic_device):
        refuse("issuer_not_authorized", f"operator {operator!r} may not command {topic_device!r}")
    try:
        _check_time(iat, exp, policy=policy, now=now, not_before=replay.not_before, refuse=refuse)
        # The nonce is recorded last, so refused envelopes never take room in the cache.
        keep_until = datetime.fromtimestamp(exp + int(policy.max_skew.total_seconds()), UTC)
        verdict = replay.remember(replay_key(operator, jti), keep_until=keep_until, now=now)
    except ReplayStoreUnavailable as exc:
        refuse("replay_store_unavailable", f"{exc}; refusing (fail closed)")
    if verdict is ReplayVerdict.REPLAYED:
        refuse("replayed", f"jti {jti} from {operator} was already used")
    if verdict is ReplayVerdict.FULL:
        refuse("replay_cache_full", "replay cache is full of live nonces; refusing (fail closed)")
    return VerifiedCommand(
        issuer=operator, kid=kid, device=topic_device, jti=jti,
        issued_at=datetime.fromtimestamp(iat, UTC), expires_at=datetime.fromtimestamp(exp, UTC),
        body=MappingProxyType(body),
    )


def _check_claims(
    claims: dict[str, Any], *, operator: str, kid: str, refuse: _Refuser
) -> tuple[int, int, dict[str, Any]]:
    for name in CLAIMS:
        if name not in claims:
            refuse("missing_claim", f"claim '{name}' is missing")
    extra = sorted(set(claims) - set(CLAIMS))
    if extra:
        refuse("bad_claim", f"claim {extra[0]!r:.40} is not allowed; only {', '.join(CLAIMS)}")
    iat, exp = claims["iat"], claims["exp"]
    for name, value in (("iat", iat), ("exp", exp)):
        if type(value) is not int or not 0 < value <= jws.MAX_NUMERIC_DATE:
            refuse("bad_claim", f"claim '{name}' must be an integer NumericDate, not {value!r:.40}")
    if not isinstance(claims["aud"], str):
        refuse("bad_claim", "claim 'aud' must be one device id (a string)")
    if claims["iss"] != operator:
        refuse("bad_claim", f"claim 'iss' {claims['iss']!r:.80} is not {operator!r}, who owns key {kid!r}")
    body = claims["cmd"]
    if not isinstance(body, dict):
        refuse("bad_claim", "claim 'cmd' must be a JSON object")
    if exp <= iat:
        refuse("bad_claim", f"exp {exp} must be after iat {iat}")
    return iat, exp, body


def _check_time(
    iat: int, exp: int, *, policy: EnvelopePolicy, now: datetime, not_before: datetime | None,
    refuse: _Refuser,
) -> None:
    skew = int(policy.max_skew.total_seconds())
    max_ttl = int(policy.max_ttl.total_seconds())
    now_ts = now.timestamp()
    if exp - iat > max_ttl:
        refuse("ttl_too_long", f"lifetime exp - iat = {exp - iat} s must be <= {max_ttl} s")
    if iat - skew > now_ts:
        refuse("issued_in_future", f"iat {_iso(iat)} is more than {skew} s after now {now.isoformat()}")
    if now_ts > exp + skew:
        refuse("expired", f"expired at {_iso(exp)} (+{skew} s skew); now {now.isoformat()}")
    if not_before is not None and iat < as_utc(not_before).timestamp() + skew:
        refuse(
            "issued_before_restart",
            f"iat {_iso(iat)} must be >= {(as_utc(not_before) + policy.max_skew).isoformat()}: "
            "the replay cache restarted then; re-send the command with a new iat",
        )


def rejection_notice(error: CommandRefused, *, at: datetime) -> tuple[str, bytes] | None:
    """Topic and JSON payload telling the operator a command was dropped, or ``None``.

    Only refusals after the signature verified name an operator; forgeries get no notice.
    """
    if error.operator is None:
        return None
    notice = {"jti": error.jti, "reason": error.reason, "device": error.device,
              "at": as_utc(at).isoformat().replace("+00:00", "Z")}
    topic = REJECTION_TOPIC.format(operator=check_identity(error.operator))
    return topic, json.dumps(notice, sort_keys=True, separators=(",", ":")).encode()


def acceptance_notice(command: VerifiedCommand, *, at: datetime) -> tuple[str, bytes]:
    """Topic and JSON payload telling the signing operator its command passed every check and is routed."""
    notice = {"jti": command.jti, "device": command.device, "status": "accepted",
              "expires": as_utc(command.expires_at).isoformat().replace("+00:00", "Z"),
              "at": as_utc(at).isoformat().replace("+00:00", "Z")}
    topic = ACCEPTANCE_TOPIC.format(operator=check_identity(command.issuer))
    return topic, json.dumps(notice, sort_keys=True, separators=(",", ":")).encode()


_Refuser = Callable[[str, str], NoReturn]


def _iso(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()
