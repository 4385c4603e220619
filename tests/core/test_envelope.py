"""verify_envelope / sign_command: one test per reason, the edges, the order, fuzzing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_core.envelope import (
    REASONS,
    REJECTION_TOPIC,
    CommandRefused,
    VerifiedCommand,
    new_jti,
    rejection_notice,
    sign_command,
    verify_envelope,
)
from edge_core.errors import CredentialError, EnvelopeError
from edge_core.operators import DeviceProfile, EnvelopePolicy, Grant, Operator, OperatorKey, OperatorKeys
from edge_core.replay import MemoryReplayCache

NOW = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
T = int(NOW.timestamp())
DEVICE = "pump-17"
POLICY = EnvelopePolicy()
ALICE = ec.generate_private_key(ec.SECP256R1())
CAROL = ec.generate_private_key(ec.SECP256R1())
BOB = ec.generate_private_key(ec.SECP256R1())
MALLORY = ec.generate_private_key(ec.SECP256R1())
N_P256 = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _operator(name: str, key: ec.EllipticCurvePrivateKey, *grants: Grant) -> Operator:
    return Operator(name, (OperatorKey(kid=name, operator=name, public_key=key.public_key()),), grants)


KEYS = OperatorKeys(
    operators={
        "alice": _operator("alice", ALICE, Grant(devices=frozenset({DEVICE, "valve-3"}))),
        "carol": _operator("carol", CAROL, Grant(roles=frozenset({"pump"}))),
        "bob": _operator("bob", BOB, Grant(devices=frozenset({"valve-3"}))),
    },
    devices={DEVICE: DeviceProfile(DEVICE, roles=frozenset({"pump"}))},
)


def cache(capacity: int = 100, started_at: datetime = NOW - timedelta(hours=1)) -> MemoryReplayCache:
    return MemoryReplayCache(capacity, started_at=started_at)


def sign(key: ec.EllipticCurvePrivateKey = ALICE, *, issuer: str = "alice", device: str = DEVICE,
         ttl: int = 60, now: datetime = NOW, **kw: Any) -> bytes:
    return sign_command(key, issuer=issuer, device=device, body={"name": "set_speed", "rpm": 1200},
                        ttl=timedelta(seconds=ttl), now=now, **kw)


def verify(token: bytes, *, device: str = DEVICE, now: datetime = NOW,
           replay: MemoryReplayCache | None = None, policy: EnvelopePolicy = POLICY,
           keys: OperatorKeys = KEYS) -> VerifiedCommand:
    return verify_envelope(token, topic_device=device, keys=keys, policy=policy, now=now,
                           replay=replay if replay is not None else cache())


def reason(token: bytes, **kw: Any) -> str:
    with pytest.raises(CommandRefused) as info:
        verify(token, **kw)
    assert isinstance(info.value, EnvelopeError)
    assert info.value.reason in REASONS
    return info.value.reason


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def es256_sig(key: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
    def signer(data: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return signer


def craft(header: dict[str, Any] | bytes, claims: dict[str, Any] | bytes,
          signer: Callable[[bytes], bytes] | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    c = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    signing_input = b64(h) + b"." + b64(c)
    return signing_input + b"." + b64((signer or es256_sig(ALICE))(signing_input))


def header(**over: Any) -> dict[str, Any]:
    return {"alg": "ES256", "typ": "edge-cmd+jwt", "kid": "alice", **over}


def claims(**over: Any) -> dict[str, Any]:
    base = {"iss": "alice", "aud": DEVICE, "iat": T, "exp": T + 60, "jti": new_jti(), "cmd": {"name": "x"}}
    return {**base, **over}


# --------------------------------------------------------------------------- accepted


def test_valid_command_verifies_with_its_claims() -> None:
    jti = new_jti()
    command = verify(sign(jti=jti))
    assert command.issuer == "alice" and command.kid == "alice" and command.device == DEVICE
    assert command.jti == jti
    assert command.issued_at == NOW and command.expires_at == NOW + timedelta(seconds=60)
    assert dict(command.body) == {"name": "set_speed", "rpm": 1200}
    with pytest.raises(TypeError):
        command.body["rpm"] = 1  # type: ignore[index]


def test_header_is_es256_typ_kid() -> None:
    token = sign(kid="alice")
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "typ": "edge-cmd+jwt", "kid": "alice"}


def test_role_grant_authorizes_through_device_facts() -> None:
    assert verify(sign(CAROL, issuer="carol")).issuer == "carol"


def test_new_jti_has_128_bits() -> None:
    assert len(new_jti()) == 22
    assert new_jti() != new_jti()


# --------------------------------------------------------------------------- size and structure


def test_oversized_exactly_at_limit_passes_one_over_fails() -> None:
    token = sign()
    assert verify(token, policy=EnvelopePolicy(max_size=len(token))).jti
    assert reason(token, policy=EnvelopePolicy(max_size=len(token) - 1)) == "oversized"


def test_oversized_is_checked_before_parsing() -> None:
    assert reason(b"\xff" * (POLICY.max_size + 1)) == "oversized"


@pytest.mark.parametrize(
    "token",
    [
        b"",
        b"...",
        b"a.b",
        b"a.b.c.d",
        "ä.b.c".encode(),
        b"eyJ=.e30.AA",
        b"ey J.e30.AA",
        b"e+J.e30.AA",
        b"A.e30.AA",  # length 1 mod 4: not base64
        b64(b"not json") + b"." + b64(b"{}") + b".AA",
        b64(b"[]") + b"." + b64(b"{}") + b".AA",
        b64(b'{"alg":"ES256"}') + b"." + b64(b"\xff\xfe") + b".AA",
        b64(b'{"alg":"ES256"}') + b"." + b64(b"[" * 2000 + b"]" * 2000) + b".AA",
        b64(b'{"alg":"ES256","alg":"none"}') + b"." + b64(b"{}") + b".AA",
        b64(b'{"alg":"ES256"}') + b"." + b64(b'{"iat":Infinity}') + b".AA",
    ],
)
def test_not_envelope(token: bytes) -> None:
    assert reason(token, policy=EnvelopePolicy(max_size=65536)) == "not_envelope"


def test_not_envelope_for_str_and_whitespace() -> None:
    token = sign()
    assert reason(token.decode()) == "not_envelope"  # type: ignore[arg-type]
    assert reason(token + b"\n") == "not_envelope"
    assert reason(b" " + token) == "not_envelope"


def test_non_canonical_base64_signature_is_refused() -> None:
    token = sign()
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twisted = token[:-1] + bytes([alphabet[alphabet.index(token[-1]) ^ 1]])
    assert base64.urlsafe_b64decode(twisted.split(b".")[2] + b"==") == base64.urlsafe_b64decode(
        token.split(b".")[2] + b"==")
    assert reason(twisted) == "not_envelope"


# --------------------------------------------------------------------------- algorithm confusion

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()
P384 = ec.generate_private_key(ec.SECP384R1())
P521 = ec.generate_private_key(ec.SECP521R1())
K256 = ec.generate_private_key(ec.SECP256K1())
ALICE_PEM = ALICE.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _pyjwt(alg: str, key: Any) -> bytes:
    return jwt.encode(claims(), key, algorithm=alg, headers={"typ": "edge-cmd+jwt", "kid": "alice"}).encode()


def _hs256_public_key_as_secret() -> bytes:
    return craft(header(alg="HS256"), claims(), lambda d: hmac.new(ALICE_PEM, d, hashlib.sha256).digest())


ALG_ATTACKS: dict[str, Callable[[], bytes]] = {
    "none_empty_signature": lambda: craft(header(alg="none"), claims(), lambda _: b""),
    "none_with_signature": lambda: craft(header(alg="none"), claims()),
    "None": lambda: craft(header(alg="None"), claims(), lambda _: b""),
    "hs256_public_key_pem_secret": _hs256_public_key_as_secret,
    "hs256_public_key_der_secret": lambda: craft(header(alg="HS256"), claims(), lambda d: hmac.new(
        ALICE.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo),
        d, hashlib.sha256).digest()),
    "rs256": lambda: _pyjwt("RS256", RSA_KEY),
    "ps256": lambda: _pyjwt("PS256", RSA_KEY),
    "eddsa": lambda: _pyjwt("EdDSA", ED_KEY),
    "es384": lambda: _pyjwt("ES384", P384),
    "es512": lambda: _pyjwt("ES512", P521),
    "es256k": lambda: _pyjwt("ES256K", K256),
    "lowercase_es256": lambda: craft(header(alg="es256"), claims()),
    "es256_trailing_space": lambda: craft(header(alg="ES256 "), claims()),
    "missing": lambda: craft({"typ": "edge-cmd+jwt", "kid": "alice"}, claims()),
    "null": lambda: craft(header(alg=None), claims()),
    "list": lambda: craft(header(alg=["ES256"]), claims()),
}


class _KeysThatMustNotBeTouched(OperatorKeys):
    def key(self, kid: str) -> OperatorKey | None:
        raise AssertionError("a key was looked up before the algorithm was checked")


@pytest.mark.parametrize("attack", sorted(ALG_ATTACKS))
def test_bad_algorithm_before_any_key_use(attack: str) -> None:
    token = ALG_ATTACKS[attack]()
    untouchable = _KeysThatMustNotBeTouched(operators=KEYS.operators)
    assert reason(token, keys=untouchable) == "bad_algorithm"
    assert reason(token) == "bad_algorithm"


def test_hs256_confusion_would_verify_in_a_naive_hmac_check() -> None:
    """The attack token is well-formed: a verifier that trusted alg would accept it."""
    token = _hs256_public_key_as_secret()
    signing_input, _, sig = token.rpartition(b".")
    expected = hmac.new(ALICE_PEM, signing_input, hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(sig + b"=" * (-len(sig) % 4)) == expected


# --------------------------------------------------------------------------- header, key, signature


@pytest.mark.parametrize(
    "hdr",
    [
        {"alg": "ES256", "kid": "alice"},
        header(typ="JWT"),
        header(typ="EDGE-CMD+JWT"),
        {"alg": "ES256", "typ": "edge-cmd+jwt"},
        header(kid=7),
        header(kid=""),
        header(jwk={"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}),
        header(jku="https://evil.example/jwks"),
        header(x5u="https://evil.example/cert"),
        header(x5c=["MIIB"]),
        header(crit=["exp"]),
        header(b64=False, crit=["b64"]),
        header(cty="JWT"),
    ],
)
def test_bad_header(hdr: dict[str, Any]) -> None:
    assert reason(craft(hdr, claims())) == "bad_header"


def test_unknown_issuer_for_unconfigured_kid() -> None:
    token = craft(header(kid="mallory"), claims(iss="mallory"), es256_sig(MALLORY))
    assert reason(token) == "unknown_issuer"


@pytest.mark.parametrize(
    "token_factory",
    [
        lambda: craft(header(), claims(), es256_sig(MALLORY)),
        lambda: craft(header(), claims(), es256_sig(BOB)),
        lambda: craft(header(), claims(), lambda _: bytes(64)),
        lambda: craft(header(), claims(), lambda d: es256_sig(ALICE)(d)[:63]),
        lambda: craft(header(), claims(), lambda d: ALICE.sign(d, ec.ECDSA(hashes.SHA256()))),  # DER
        lambda: craft(header(), claims(), lambda d: es256_sig(ALICE)(d + b"x")),
    ],
    ids=["mallory_key", "bob_key", "zero", "truncated", "der_encoded", "other_input"],
)
def test_bad_signature(token_factory: Callable[[], bytes]) -> None:
    assert reason(token_factory()) == "bad_signature"


def test_tampered_payload_fails_signature() -> None:
    head, _, sig = sign().split(b".")
    forged = b64(json.dumps(claims(cmd={"name": "set_speed", "rpm": 9000})).encode())
    assert reason(head + b"." + forged + b"." + sig) == "bad_signature"


def test_bad_signature_gets_no_rejection_notice() -> None:
    with pytest.raises(CommandRefused) as info:
        verify(craft(header(), claims(), es256_sig(MALLORY)))
    assert info.value.operator is None and info.value.jti is None
    assert rejection_notice(info.value, at=NOW) is None


# --------------------------------------------------------------------------- claims


@pytest.mark.parametrize("claim", ["iss", "aud", "iat", "exp", "jti", "cmd"])
def test_missing_claim(claim: str) -> None:
    body = claims()
    del body[claim]
    assert reason(craft(header(), body)) == "missing_claim"


@pytest.mark.parametrize(
    "over",
    [
        {"nbf": T},
        {"iat": T + 0.5},
        {"iat": str(T)},
        {"iat": True},
        {"exp": None},
        {"iat": -5},
        {"exp": 10**20},
        {"exp": T},
        {"exp": T - 1},
        {"jti": "a" * 21},
        {"jti": "a" * 21 + "="},
        {"jti": "a" * 129},
        {"jti": 12345678901234567890123},
        {"aud": [DEVICE]},
        {"aud": None},
        {"iss": "bob"},
        {"iss": ["alice"]},
        {"cmd": "reboot"},
        {"cmd": ["reboot"]},
        {"cmd": None},
    ],
    ids=repr,
)
def test_bad_claim(over: dict[str, Any]) -> None:
    assert reason(craft(header(), claims(**over))) == "bad_claim"


def test_audience_mismatch() -> None:
    assert reason(sign(device="valve-3")) == "audience_mismatch"
    assert reason(sign(), device="valve-3") == "audience_mismatch"


def test_issuer_not_authorized() -> None:
    assert reason(sign(BOB, issuer="bob")) == "issuer_not_authorized"
    assert verify(sign(BOB, issuer="bob", device="valve-3"), device="valve-3").issuer == "bob"


def test_role_grant_does_not_cover_unknown_device() -> None:
    assert reason(sign(CAROL, issuer="carol", device="valve-3"), device="valve-3") == "issuer_not_authorized"


def test_operator_without_grants_commands_nothing() -> None:
    keys = OperatorKeys(operators={"alice": _operator("alice", ALICE)})
    assert reason(sign(), keys=keys) == "issuer_not_authorized"


# --------------------------------------------------------------------------- time


def test_ttl_at_limit_passes_one_over_fails() -> None:
    assert verify(sign(ttl=300)).jti
    assert reason(sign(ttl=301)) == "ttl_too_long"


def test_ttl_limit_follows_policy() -> None:
    assert reason(sign(ttl=61), policy=EnvelopePolicy(max_ttl=timedelta(seconds=60))) == "ttl_too_long"


def test_iat_in_future_exactly_at_skew_passes_one_second_past_fails() -> None:
    assert verify(sign(now=NOW + timedelta(seconds=30))).jti
    assert reason(sign(now=NOW + timedelta(seconds=31))) == "issued_in_future"


def test_exp_exactly_at_skew_passes_one_second_past_fails() -> None:
    token = sign(ttl=60)
    assert verify(token, now=NOW + timedelta(seconds=90)).jti
    assert reason(token, now=NOW + timedelta(seconds=91)) == "expired"
    assert reason(token, now=NOW + timedelta(seconds=90, microseconds=1)) == "expired"


def test_zero_skew_policy_is_exact() -> None:
    policy = EnvelopePolicy(max_skew=timedelta(0))
    token = sign(ttl=60)
    assert verify(token, now=NOW + timedelta(seconds=60), policy=policy).jti
    assert reason(token, now=NOW + timedelta(seconds=61), policy=policy) == "expired"
    assert reason(sign(now=NOW + timedelta(seconds=1)), policy=policy) == "issued_in_future"


def test_issued_before_restart_watermark_is_start_plus_skew() -> None:
    started = NOW - timedelta(seconds=100)
    at_edge = sign(now=started + timedelta(seconds=30))
    before = sign(now=started + timedelta(seconds=29))
    assert verify(at_edge, replay=cache(started_at=started)).jti
    assert reason(before, replay=cache(started_at=started)) == "issued_before_restart"


def test_restart_does_not_reopen_a_replay_window() -> None:
    """A token the old process accepted (iat up to now + skew) is refused by the new one."""
    old = cache(started_at=NOW - timedelta(hours=1))
    token = sign(now=NOW + timedelta(seconds=30))  # operator clock 30 s ahead
    assert verify(token, replay=old).jti
    restart = NOW + timedelta(seconds=1)
    assert reason(token, now=restart, replay=cache(started_at=restart)) == "issued_before_restart"


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        verify(sign(), now=NOW.replace(tzinfo=None))


# --------------------------------------------------------------------------- replay


def test_replayed_same_token() -> None:
    replay = cache()
    token = sign()
    verify(token, replay=replay)
    assert reason(token, replay=replay) == "replayed"
    assert reason(token, replay=replay, now=NOW + timedelta(seconds=89)) == "replayed"


def test_replayed_with_malleated_signature() -> None:
    replay = cache()
    token = sign()
    head, body, sig = token.split(b".")
    raw = base64.urlsafe_b64decode(sig + b"==")
    s = int.from_bytes(raw[32:], "big")
    twin = head + b"." + body + b"." + b64(raw[:32] + (N_P256 - s).to_bytes(32, "big"))
    assert twin != token
    assert verify(twin).jti  # a valid signature on its own
    verify(token, replay=replay)
    assert reason(twin, replay=replay) == "replayed"


def test_replayed_jti_reused_with_new_times() -> None:
    replay = cache()
    verify(sign(jti="A" * 22), replay=replay)
    assert reason(sign(jti="A" * 22, now=NOW + timedelta(seconds=5)), replay=replay,
                  now=NOW + timedelta(seconds=5)) == "replayed"


def test_same_jti_from_two_operators_are_two_commands() -> None:
    replay = cache()
    verify(sign(jti="B" * 22), replay=replay)
    assert verify(sign(CAROL, issuer="carol", jti="B" * 22), replay=replay).issuer == "carol"


def test_replay_cache_full_fails_closed() -> None:
    replay = cache(capacity=1)
    verify(sign(), replay=replay)
    assert reason(sign(), replay=replay) == "replay_cache_full"
    # once the first expires (exp + skew passed), there is room again
    later = NOW + timedelta(seconds=91)
    assert verify(sign(now=later), now=later, replay=replay).jti


def test_jti_recorded_only_after_every_other_check() -> None:
    replay = cache(capacity=1)
    token = sign()
    assert reason(token, device="valve-3", replay=replay) == "audience_mismatch"
    assert reason(sign(BOB, issuer="bob"), replay=replay) == "issuer_not_authorized"
    assert reason(sign(now=NOW - timedelta(seconds=200)), replay=replay) == "expired"
    assert len(replay) == 0
    assert verify(token, replay=replay).jti
    assert len(replay) == 1


# --------------------------------------------------------------------------- order and notices


@pytest.mark.parametrize(
    ("token_factory", "expected"),
    [
        (lambda: craft(header(alg="HS256", kid="nobody"), claims(exp=1)), "bad_algorithm"),
        (lambda: craft(header(kid="nobody", typ="x"), claims()), "bad_header"),
        (lambda: craft(header(kid="nobody"), claims(iat=T - 9999, exp=T - 9000)), "unknown_issuer"),
        (lambda: craft(header(), {"iat": 1}, es256_sig(MALLORY)), "bad_signature"),
        (lambda: craft(header(), {**claims(aud="valve-3"), "extra": 1}), "bad_claim"),
        (lambda: craft(header(), claims(aud="valve-3", iat=T - 9999, exp=T - 9000)), "audience_mismatch"),
        (lambda: sign(BOB, issuer="bob", ttl=9999), "issuer_not_authorized"),
        (lambda: sign(ttl=9999, now=NOW - timedelta(days=1)), "ttl_too_long"),
    ],
)
def test_first_failing_check_wins(token_factory: Callable[[], bytes], expected: str) -> None:
    assert reason(token_factory()) == expected


def test_rejection_notice_after_signature() -> None:
    replay = cache()
    token = sign(jti="C" * 22)
    verify(token, replay=replay)
    with pytest.raises(CommandRefused) as info:
        verify(token, replay=replay, now=NOW + timedelta(seconds=2))
    notice = rejection_notice(info.value, at=NOW + timedelta(seconds=2))
    assert notice is not None
    topic, payload = notice
    assert topic == REJECTION_TOPIC.format(operator="alice") == "operators/alice/cmd-rejected"
    assert json.loads(payload) == {"jti": "C" * 22, "reason": "replayed", "device": DEVICE,
                                   "at": "2026-03-01T08:00:02Z"}


def test_rejection_notice_operator_is_key_owner_not_claimed_iss() -> None:
    with pytest.raises(CommandRefused) as info:
        verify(craft(header(), claims(iss="ops/#")))
    assert info.value.reason == "bad_claim"
    notice = rejection_notice(info.value, at=NOW)
    assert notice is not None and notice[0] == "operators/alice/cmd-rejected"


# --------------------------------------------------------------------------- sign_command


def test_sign_command_refuses_bad_inputs() -> None:
    with pytest.raises(ValueError, match="P-256"):
        sign(P384)
    with pytest.raises(ValueError, match="ttl"):
        sign(ttl=0)
    with pytest.raises(ValueError, match="jti"):
        sign(jti="short")
    with pytest.raises(ValueError, match="naive"):
        sign(now=NOW.replace(tzinfo=None))
    with pytest.raises(CredentialError, match="widen"):
        sign(device="pump/#")


def test_sign_command_uses_kid() -> None:
    token = sign(kid="alice")
    assert jwt.get_unverified_header(token)["kid"] == "alice"


# --------------------------------------------------------------------------- fuzzing

VALID = sign(now=NOW)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_crash_and_never_verify(data: bytes) -> None:
    with pytest.raises(CommandRefused) as info:
        verify(data)
    assert info.value.reason in REASONS


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(VALID) - 1), st.integers(min_value=0, max_value=255))
def test_any_single_byte_change_of_a_valid_token_is_refused(position: int, value: int) -> None:
    mutated = bytearray(VALID)
    if mutated[position] == value:
        return
    mutated[position] = value
    with pytest.raises(CommandRefused):
        verify(bytes(mutated))


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["iss", "aud", "iat", "exp", "jti", "cmd", "nbf", "x"]), _json))
def test_arbitrary_signed_claims_never_crash(body: dict[str, Any]) -> None:
    token = craft(header(), json.dumps(body, allow_nan=True).encode())
    try:
        verify(token)
    except CommandRefused as exc:
        assert exc.reason in REASONS
