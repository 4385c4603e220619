"""Every published vector through both verifiers: the broker's core and the device's."""

from __future__ import annotations

import base64
import importlib.util
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from device_client import DeviceCommandVerifier
from edge_core.clock import ManualClock
from edge_core.envelope import REASONS, CommandRefused, sign_command, verify_envelope
from edge_core.operators import (
    DeviceProfile,
    EnvelopePolicy,
    Grant,
    Operator,
    OperatorKey,
    OperatorKeys,
    load_public_key,
)
from edge_core.replay import MemoryReplayCache

VECTORS_DIR = Path(__file__).resolve().parents[1] / "vectors"
VECTORS = json.loads((VECTORS_DIR / "command_vectors.json").read_text("utf-8"))
CASES = VECTORS["cases"]


def _generator() -> ModuleType:
    path = VECTORS_DIR / "make_command_vectors.py"
    spec = importlib.util.spec_from_file_location("make_command_vectors", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _policy() -> EnvelopePolicy:
    p = VECTORS["policy"]
    return EnvelopePolicy(
        max_ttl=timedelta(seconds=p["max_ttl_seconds"]),
        max_skew=timedelta(seconds=p["max_skew_seconds"]),
        max_size=p["max_size_bytes"],
        command_topic=p["command_topic"],
        typ=p["typ"],
    )


def _keys() -> OperatorKeys:
    operators = {}
    for op in VECTORS["operators"]:
        keys = tuple(
            OperatorKey(kid=k["kid"], operator=op["id"],
                        public_key=load_public_key(k["public_key_pem"].encode(), what=k["kid"]))
            for k in op["keys"]
        )
        grants = tuple(
            Grant(devices=frozenset(g.get("devices", ())), roles=frozenset(g.get("roles", ())),
                  attributes=g.get("attributes", {}))
            for g in op["scope"]
        )
        operators[op["id"]] = Operator(operator_id=op["id"], keys=keys, grants=grants)
    return OperatorKeys(operators=operators)


def _profile() -> DeviceProfile:
    d = VECTORS["device"]
    return DeviceProfile(device_id=d["id"], roles=frozenset(d["roles"]), attributes=d["attributes"])


NOW = datetime.fromtimestamp(VECTORS["now_unix"], UTC)
NOT_BEFORE = datetime.fromtimestamp(VECTORS["replay_not_before_unix"], UTC)


def _verdict(call: Any) -> str:
    try:
        call()
    except CommandRefused as exc:
        return exc.reason
    return "ok"


def test_vector_file_header_is_consistent() -> None:
    assert datetime.fromisoformat(VECTORS["now"]) == NOW
    assert datetime.fromisoformat(VECTORS["replay_not_before"]) == NOT_BEFORE
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names))
    expected = {s["expect"] for c in CASES for s in c["steps"]}
    # Every reason code is published, and nothing else.
    assert expected == {"ok", *REASONS}


def test_vector_jwk_matches_pem() -> None:
    for op in VECTORS["operators"]:
        for key in op["keys"]:
            from_jwk = jwt.PyJWK(key["public_key_jwk"]).key
            from_pem = load_public_key(key["public_key_pem"].encode(), what=key["kid"])
            assert isinstance(from_jwk, ec.EllipticCurvePublicKey)
            assert from_jwk.public_numbers() == from_pem.public_numbers()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_vector_core_verifier(case: dict[str, Any]) -> None:
    policy = _policy()
    keys = _keys().for_device(_profile())
    replay = MemoryReplayCache(case["replay_capacity"], started_at=NOT_BEFORE)
    for step in case["steps"]:
        device = policy.device_from_topic(step["topic"])
        assert device == VECTORS["device"]["id"]
        token = step["token"].encode("utf-8")
        got = _verdict(lambda t=token, d=device: verify_envelope(
            t, topic_device=d, keys=keys, policy=policy, now=NOW, replay=replay))
        assert got == step["expect"], case["description"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_vector_device_verifier(case: dict[str, Any]) -> None:
    clock = ManualClock(NOW)
    verifier = DeviceCommandVerifier(
        VECTORS["device"]["id"], _keys(), _policy(), clock,
        MemoryReplayCache(case["replay_capacity"], started_at=NOT_BEFORE), profile=_profile(),
    )
    for step in case["steps"]:
        token = step["token"].encode("utf-8")
        got = _verdict(lambda t=token, s=step: verifier.verify(t, topic=s["topic"]))
        assert got == step["expect"], case["description"]


def test_vector_file_is_what_the_generator_writes() -> None:
    assert _generator().render() == (VECTORS_DIR / "command_vectors.json").read_text("utf-8")


def test_vector_valid_tokens_are_what_sign_command_emits() -> None:
    """Header and claims of the generator's valid tokens equal sign_command's, byte for byte."""
    gen = _generator()
    for label, kid, issuer in (("ok_basic", "alice", "alice"), ("ok_role_grant", "carol-2", "carol")):
        ours = sign_command(gen.KEYS[kid], issuer=issuer, device=VECTORS["device"]["id"],
                            body={"name": "set_speed", "rpm": 1200}, ttl=timedelta(seconds=gen.TTL),
                            now=NOW, kid=kid, jti=gen.nonce(label))
        case = next(c for c in CASES if c["name"] == label)
        theirs = case["steps"][0]["token"].encode()
        assert ours.split(b".")[:2] == theirs.split(b".")[:2]
        assert len(base64.urlsafe_b64decode(ours.split(b".")[2] + b"==")) == 64
