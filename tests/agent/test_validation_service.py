"""The validation service end to end: the real broker (TLS 1.3, mTLS, ACL), the agent's
service on aiomqtt, and the reference device client asking about certificates.

The session PKI is shared, so every test revokes in its own copy of the issuing CA.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_client.client import DeviceClient, DeviceConfig
from device_client.validation import ValidationTimeout, check_certificate
from edge_core.clock import ManualClock
from edge_core.crl_freshness import StalenessPolicy
from edge_core.crl_trust import accept_crl
from edge_core.errors import ConfigError
from edge_core.events import SecurityEvents
from edge_core.revocation import RevocationIndex
from edge_core.validation import (
    REQUEST_FILTER,
    TYP,
    Answer,
    IssuerSet,
    ResponseRefused,
    encode_request,
    gateway_key_id,
    issuer_hash,
    load_gateway_public_key,
    parse_request,
    request_topic,
    response_topic,
    sign_answer,
    verify_response,
)
from gateway_agent.commanding import BrokerEndpoint
from gateway_agent.crl_issue import issue_crl, revoke
from gateway_agent.pki import FileCA, IssuingCA, issue_leaf, new_key
from gateway_agent.validation_service import (
    RateLimiter,
    ValidationService,
    load_validation_key,
    make_validation_key,
)
from tests.broker.acl_fixture import write_acl
from tests.conftest import StartBroker
from tests.support.broker import BrokerThread
from tests.support.mqtt import Device
from tests.support.pki import DevPki

pytestmark = pytest.mark.integration

VALIDATION_ACL = """\
version: 1
roles:
  gateway:
    - allow subscribe gateway/validation/+/request
    - allow publish gateway/validation/+/response
  sensor:
    - allow publish gateway/validation/{device}/request
    - allow subscribe gateway/validation/{device}/response
"""
GATEWAY = "gateway-agent"
TIMEOUT = 5.0


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    ca: FileCA
    issuing: IssuingCA
    good: x509.Certificate
    revoked: x509.Certificate
    index: list[RevocationIndex]  # index[0] is what the daemon would have swapped in last
    key: ec.EllipticCurvePrivateKey

    def reissue_crl(self, *revoke_serials: int) -> None:
        """Revoke more and install the new CRL, as the daemon's CRL sync would."""
        for serial in revoke_serials:
            revoke(self.ca, serial, "key_compromise")
        der = issue_crl(self.ca, out=self.ca.dir / "crl.der")
        current = self.index[0].installed.get(next(iter(self.index[0].installed), ""))
        update = accept_crl(der, issuers=[self.issuing.cert], installed=current, now=datetime.now(UTC))
        self.index[0] = self.index[0].with_update(update)

    @property
    def hash(self) -> str:
        return issuer_hash(self.issuing.cert.subject)


@pytest.fixture
def world(tmp_path: Path, pki: DevPki) -> World:
    ca = pki.private_ca(tmp_path / "ca")
    issuing = ca.issuing()
    now = datetime.now(UTC)
    good = issue_leaf(issuing, identity="valve-good", now=now).cert
    revoked = issue_leaf(issuing, identity="valve-revoked", now=now).cert
    w = World(ca, issuing, good, revoked, [RevocationIndex()], new_key())
    w.reissue_crl(revoked.serial_number)
    return w


@pytest.fixture
def broker(start_broker: StartBroker, tmp_path: Path) -> BrokerThread:
    return start_broker(acl=write_acl(tmp_path, VALIDATION_ACL))


def agent_endpoint(broker: BrokerThread, pki: DevPki) -> BrokerEndpoint:
    return BrokerEndpoint("127.0.0.1", broker.port, pki.chain, pki.root / "agent" / f"{GATEWAY}.crt",
                          pki.root / "agent" / f"{GATEWAY}.key")


def make_service(broker: BrokerThread, pki: DevPki, world: World, **kw: Any) -> ValidationService:
    args: dict[str, Any] = {"gateway_id": GATEWAY, "signing_key": world.key, "issuers": [world.issuing.cert],
                            "current_index": lambda: world.index[0]}
    args.update(kw)
    return ValidationService(agent_endpoint(broker, pki), **args)


@contextlib.asynccontextmanager
async def serving(service: ValidationService) -> AsyncIterator[ValidationService]:
    async with service:
        task = asyncio.create_task(service.serve())
        try:
            yield service
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture
async def service(broker: BrokerThread, pki: DevPki, world: World) -> AsyncIterator[ValidationService]:
    async with serving(make_service(broker, pki, world)) as svc:
        yield svc


@contextlib.asynccontextmanager
async def device(broker: BrokerThread, pki: DevPki, identity: str = "sensor-01") -> AsyncIterator[DeviceClient]:
    cred = pki.device(identity)
    async with DeviceClient(DeviceConfig(identity, "127.0.0.1", broker.port, pki.chain, cred.cert, cred.key)) as dev:
        yield dev


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


async def ask(dev: DeviceClient, world: World, subject: bytes | tuple[str, int], **kw: Any) -> Answer:
    args: dict[str, Any] = {"gateway_public_key": world.key.public_key(), "timeout": TIMEOUT}
    args.update(kw)
    return await check_certificate(dev, subject, **args)


# --------------------------------------------------------------------------- answers end to end


async def test_good_revoked_and_unknown_by_certificate(broker: BrokerThread, pki: DevPki, world: World,
                                                       service: ValidationService) -> None:
    async with device(broker, pki) as dev:
        good = await ask(dev, world, der(world.good))
        revoked = await ask(dev, world, der(world.revoked))
        foreign = x509.load_pem_x509_certificate(pki.foreign("validation-foreign", "sensor-01").cert.read_bytes())
        unknown = await ask(dev, world, der(foreign))
    installed = next(iter(world.index[0].installed.values()))
    assert (good.status, good.serial, good.issuer_hash, good.device, good.gateway) == (
        "good", world.good.serial_number, world.hash, "sensor-01", GATEWAY)
    assert good.this_update == installed.this_update.replace(microsecond=0)
    assert good.crl_number == installed.crl_number == 1
    assert (revoked.status, revoked.reason) == ("revoked", None)
    assert (unknown.status, unknown.reason) == ("unknown", "unknown_issuer")
    answered = service.events.recent("validation.answered")
    assert [(e["device"], e["status"], e.get("reason")) for e in answered] == [
        ("sensor-01", "good", None), ("sensor-01", "revoked", None), ("sensor-01", "unknown", "unknown_issuer")]


async def test_good_revoked_and_unknown_by_issuer_hash_and_serial(broker: BrokerThread, pki: DevPki, world: World,
                                                                  service: ValidationService) -> None:
    async with device(broker, pki, "sensor-02") as dev:
        assert (await ask(dev, world, (world.hash, world.good.serial_number))).status == "good"
        assert (await ask(dev, world, (world.hash, world.revoked.serial_number))).status == "revoked"
        unknown = await ask(dev, world, ("ab" * 32, 5))
    assert (unknown.status, unknown.reason, unknown.serial) == ("unknown", "unknown_issuer", 5)


async def test_the_latest_crl_fed_by_the_daemon_is_used(broker: BrokerThread, pki: DevPki, world: World,
                                                        service: ValidationService) -> None:
    async with device(broker, pki) as dev:
        before = await ask(dev, world, der(world.good))
        world.reissue_crl(world.good.serial_number)  # the CRL sync swaps a new index in
        after = await ask(dev, world, der(world.good))
    assert (before.status, before.crl_number) == ("good", 1)
    assert (after.status, after.crl_number) == ("revoked", 2)


async def test_no_crl_yet_is_unknown(broker: BrokerThread, pki: DevPki, world: World) -> None:
    async with serving(make_service(broker, pki, world, current_index=RevocationIndex)), device(broker, pki) as dev:
        answer = await ask(dev, world, der(world.good))
    assert (answer.status, answer.reason) == ("unknown", "no_crl")


async def test_stale_crl_under_fail_closed_is_unknown(broker: BrokerThread, pki: DevPki, world: World) -> None:
    clock = ManualClock(datetime.now(UTC) + timedelta(days=8))  # past the CRL's nextUpdate
    svc = make_service(broker, pki, world, clock=clock, staleness=StalenessPolicy(mode="fail_closed"))
    async with serving(svc), device(broker, pki) as dev:
        answer = await ask(dev, world, der(world.good), clock=clock)
    assert (answer.status, answer.reason) == ("unknown", "crl_stale")


async def test_forged_certificate_with_a_real_serial_is_not_good(broker: BrokerThread, pki: DevPki, world: World,
                                                                 service: ValidationService) -> None:
    forger = IssuingCA(world.issuing.cert, new_key())  # the real CA's name, another key
    forged = issue_leaf(forger, identity="valve-good", now=datetime.now(UTC), serial=world.good.serial_number).cert
    async with device(broker, pki) as dev:
        answer = await ask(dev, world, der(forged))
    assert (answer.status, answer.reason, answer.serial) == ("unknown", "chain_invalid", world.good.serial_number)


async def test_malformed_request_gets_a_signed_unknown_with_the_reason(broker: BrokerThread, pki: DevPki,
                                                                       world: World,
                                                                       service: ValidationService) -> None:
    nonce = "bad-cert-nonce-0123456"
    async with device(broker, pki) as dev:
        await dev.mqtt.subscribe(response_topic("sensor-01"), qos=1)
        await dev.publish(request_topic("sensor-01"), json.dumps({"v": 1, "nonce": nonce, "cert": "AAAA"}).encode())
        async with asyncio.timeout(TIMEOUT):
            message = await anext(aiter(dev.mqtt.messages))
    assert isinstance(message.payload, bytes)
    answer = verify_response(message.payload, gateway_key=world.key.public_key(), expected_nonce=nonce,
                             expected_device="sensor-01", now=datetime.now(UTC))
    assert (answer.status, answer.reason, answer.serial) == ("unknown", "bad_cert", None)
    refused = service.events.recent("validation.refused")
    assert [(e["reason"], e["answered"], e["device"]) for e in refused] == [("bad_cert", True, "sensor-01")]


# --------------------------------------------------------------------------- forged answers


Crafter = Callable[[str, bytes], list[bytes]]


@contextlib.asynccontextmanager
async def rogue_gateway(broker: BrokerThread, pki: DevPki, craft: Crafter) -> AsyncIterator[None]:
    """Someone holding the agent's TLS credentials, but not its validation key, answers requests."""
    endpoint = agent_endpoint(broker, pki)
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=GATEWAY, tls_context=endpoint.tls_context(),
                              protocol=aiomqtt.ProtocolVersion.V311) as client:
        await client.subscribe(REQUEST_FILTER, qos=1)

        async def answer_all() -> None:
            async for message in client.messages:
                device_id = str(message.topic).split("/")[2]
                assert isinstance(message.payload, bytes)
                for token in craft(device_id, message.payload):
                    await client.publish(response_topic(device_id), token, qos=1)

        task = asyncio.create_task(answer_all())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def genuine_good(world: World, device_id: str, payload: bytes, *, nonce: str | None = None,
                 key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    request = parse_request(payload)
    installed = next(iter(world.index[0].installed.values()))
    answer = Answer("good", None, nonce or request.nonce, device_id, GATEWAY, datetime.now(UTC),
                    issuer_hash=request.issuer_hash, serial=request.serial, this_update=installed.this_update,
                    next_update=installed.next_update, crl_number=installed.crl_number)
    return sign_answer(answer, key or world.key)


def alg_none(world: World, device_id: str, payload: bytes) -> bytes:
    _, claims, _ = genuine_good(world, device_id, payload).split(b".")
    head = b64u(json.dumps({"alg": "none", "kid": gateway_key_id(world.key.public_key()), "typ": TYP}).encode())
    return head.encode() + b"." + claims + b"."


@pytest.mark.parametrize(("name", "expected"), [
    ("other_key", "unknown_key"),
    ("other_key_our_kid", "bad_signature"),
    ("nonce_swapped", "nonce_mismatch"),
    ("alg_none", "bad_algorithm"),
    ("for_another_device", "audience_mismatch"),
    ("old_answer", "too_old"),
])
async def test_forged_answers_are_refused_by_the_device(broker: BrokerThread, pki: DevPki, world: World,
                                                        name: str, expected: str) -> None:
    """A revoked certificate, and a rogue answer that says it is good: the device must not believe it."""
    rogue = new_key()

    def craft(device_id: str, payload: bytes) -> list[bytes]:
        if name == "other_key":
            return [genuine_good(world, device_id, payload, key=rogue)]
        if name == "other_key_our_kid":
            token = genuine_good(world, device_id, payload)
            forged = genuine_good(world, device_id, payload, key=rogue)
            return [b".".join(token.split(b".")[:2] + forged.split(b".")[2:])]
        if name == "nonce_swapped":  # a genuine answer captured for an earlier request
            return [genuine_good(world, device_id, payload, nonce="captured-earlier-000000")]
        if name == "alg_none":
            return [alg_none(world, device_id, payload)]
        if name == "for_another_device":
            return [genuine_good(world, "sensor-02", payload)]
        request = parse_request(payload)
        old = Answer("good", None, request.nonce, device_id, GATEWAY, datetime.now(UTC) - timedelta(minutes=5),
                     issuer_hash=request.issuer_hash, serial=request.serial, this_update=datetime.now(UTC),
                     next_update=datetime.now(UTC) + timedelta(days=1), crl_number=1)
        return [sign_answer(old, world.key)]

    events = SecurityEvents("test-device")
    async with rogue_gateway(broker, pki, craft), device(broker, pki) as dev:
        with pytest.raises(ResponseRefused) as info:
            await ask(dev, world, der(world.revoked), timeout=1.0, events=events)
    assert info.value.reason == expected
    assert [e["reason"] for e in events.recent("validation.response_rejected")] == [expected]
    assert events.count("validation.answer_accepted") == 0


async def test_a_forgery_only_delays_the_genuine_answer(broker: BrokerThread, pki: DevPki, world: World) -> None:
    def craft(device_id: str, payload: bytes) -> list[bytes]:
        request = parse_request(payload)
        revoked = Answer("revoked", None, request.nonce, device_id, GATEWAY, datetime.now(UTC),
                         issuer_hash=request.issuer_hash, serial=request.serial, this_update=datetime.now(UTC),
                         next_update=datetime.now(UTC) + timedelta(days=1), crl_number=9)
        return [alg_none(world, device_id, payload), genuine_good(world, device_id, payload, key=new_key()),
                sign_answer(revoked, world.key)]

    events = SecurityEvents("test-device")
    async with rogue_gateway(broker, pki, craft), device(broker, pki) as dev:
        answer = await ask(dev, world, der(world.revoked), events=events)
    assert (answer.status, answer.crl_number) == ("revoked", 9)
    assert [e["reason"] for e in events.recent("validation.response_rejected")] == ["bad_algorithm", "unknown_key"]


# --------------------------------------------------------------------------- the ACL confines devices


async def test_a_device_cannot_use_another_devices_topics(broker: BrokerThread, pki: DevPki, world: World,
                                                          service: ValidationService) -> None:
    spy = Device(broker.port, pki.chain, pki.device("sensor-02"), "sensor-02")
    assert spy.connect() == 0
    try:
        # sensor-02 cannot listen to sensor-01's answers, nor to everyone's
        assert spy.subscribe(response_topic("sensor-01")) == [0x80]
        assert spy.subscribe("gateway/validation/+/response") == [0x80]
        assert spy.subscribe(REQUEST_FILTER) == [0x80]
        # and cannot ask in sensor-01's name: the broker drops the request before the service sees it
        spy.publish(request_topic("sensor-01"),
                    encode_request("spoofed-nonce-000000000", issuer_hash=world.hash, serial=5))
        await asyncio.to_thread(broker.wait_event, "acl.denied", "no_grant")
    finally:
        spy.close()
    async with device(broker, pki) as dev:
        assert (await ask(dev, world, der(world.good))).good  # ordered after the spoofed publish
    answered = service.events.recent("validation.answered")
    assert [(e["device"], e["serial"]) for e in answered] == [("sensor-01", f"{world.good.serial_number:x}")]
    assert service.events.recent("validation.refused") == []


async def test_service_refuses_to_start_without_its_acl_grant(start_broker: StartBroker, tmp_path: Path,
                                                              pki: DevPki, world: World) -> None:
    only_devices = "version: 1\nroles:\n  sensor:\n    - allow publish gateway/validation/{device}/request\n"
    acl = write_acl(tmp_path, only_devices)
    broker = start_broker(acl=acl)
    with pytest.raises(ConfigError, match=r"gateway/validation/\+/request"):
        async with make_service(broker, pki, world):
            pass


# --------------------------------------------------------------------------- limits and lifecycle


async def test_rate_limit_per_device(broker: BrokerThread, pki: DevPki, world: World) -> None:
    clock = ManualClock(datetime.now(UTC))
    svc = make_service(broker, pki, world, clock=clock, limiter=RateLimiter(rate=1.0, burst=2, clock=clock))
    async with serving(svc), device(broker, pki) as dev, device(broker, pki, "sensor-02") as other:
        assert (await ask(dev, world, der(world.good), clock=clock)).good
        assert (await ask(dev, world, der(world.good), clock=clock)).good
        with pytest.raises(ValidationTimeout):
            await ask(dev, world, der(world.good), clock=clock, timeout=0.5)
        assert (await ask(other, world, der(world.good), clock=clock)).good  # buckets are per device
        clock.advance(timedelta(seconds=1))
        assert (await ask(dev, world, der(world.good), clock=clock)).good
    limited = svc.events.recent("validation.refused")
    assert [(e["reason"], e["device"], e["answered"]) for e in limited] == [("rate_limited", "sensor-01", False)]
    assert svc.events.count("validation.answered") == 4


async def test_no_service_means_timeout(broker: BrokerThread, pki: DevPki, world: World) -> None:
    async with device(broker, pki) as dev:
        with pytest.raises(ValidationTimeout) as info:
            await ask(dev, world, der(world.good), timeout=0.5)
    assert info.value.reason == "no_answer"


async def test_lifecycle_refuses_reentry_and_serve_before_enter(broker: BrokerThread, pki: DevPki,
                                                                 world: World) -> None:
    svc = make_service(broker, pki, world)
    with pytest.raises(RuntimeError, match="entered"):
        await svc.serve()
    async with svc:
        with pytest.raises(RuntimeError, match="twice"):
            await svc.__aenter__()
        task = asyncio.create_task(svc.serve())
        await asyncio.sleep(0)  # let serve() start
        with pytest.raises(RuntimeError, match="already running"):
            await svc.serve()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_constructor_validates_its_configuration(pki: DevPki, world: World) -> None:
    endpoint = BrokerEndpoint("127.0.0.1", 1, pki.chain, pki.root / "agent" / f"{GATEWAY}.crt",
                              pki.root / "agent" / f"{GATEWAY}.key")
    base: dict[str, Any] = {"gateway_id": GATEWAY, "signing_key": world.key, "issuers": [world.issuing.cert],
                            "current_index": RevocationIndex}
    with pytest.raises(ConfigError, match="gateway_id"):
        ValidationService(endpoint, **{**base, "gateway_id": "a/b"})
    with pytest.raises(ConfigError, match="P-256"):
        ValidationService(endpoint, **{**base, "signing_key": ec.generate_private_key(ec.SECP384R1())})
    with pytest.raises(ConfigError, match="rate"):
        RateLimiter(rate=0)


# --------------------------------------------------------------------------- handle() without a broker


@pytest.fixture
def offline(pki: DevPki, world: World) -> Iterator[ValidationService]:
    endpoint = BrokerEndpoint("127.0.0.1", 1, pki.chain, pki.root / "agent" / f"{GATEWAY}.crt",
                              pki.root / "agent" / f"{GATEWAY}.key")
    clock = ManualClock(datetime.now(UTC))
    yield ValidationService(endpoint, gateway_id=GATEWAY, signing_key=world.key,
                            issuers=IssuerSet.from_certificates([world.issuing.cert]),
                            current_index=lambda: world.index[0], clock=clock,
                            limiter=RateLimiter(rate=1.0, burst=1, clock=clock))


@pytest.mark.parametrize(("topic", "payload", "reason", "answered"), [
    ("gateway/validation/a+b/request", b"{}", "bad_topic", False),
    ("gateway/validation/pump-17/other", b"{}", "bad_topic", False),
    ("gateway/validation/pump-17/request", b"x" * 5000, "oversized", False),
    ("gateway/validation/pump-17/request", b"{}", "bad_nonce", False),
    ("gateway/validation/pump-17/request", b'{"v":2,"nonce":"q1Xr0b8HgC6kYV2mP3tJzA"}', "bad_version", True),
])
def test_handle_refusals_emit_one_event_each(offline: ValidationService, topic: str, payload: bytes, reason: str,
                                             answered: bool) -> None:
    reply = offline.handle(topic, payload)
    assert (reply is not None) == answered
    events = offline.events.recent()
    assert [(e["event"], e["reason"], e["answered"]) for e in events] == [("validation.refused", reason, answered)]


def test_handle_rate_limit_comes_before_parsing(offline: ValidationService, world: World) -> None:
    topic = request_topic("pump-17")
    payload = encode_request("q1Xr0b8HgC6kYV2mP3tJzA", cert_der=der(world.good))
    reply = offline.handle(topic, payload)
    assert reply is not None and reply[0] == response_topic("pump-17")
    assert offline.handle(topic, payload) is None
    assert offline.events.count("validation.refused", "rate_limited") == 1


def test_rate_limiter_refill_and_device_cap() -> None:
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    limiter = RateLimiter(rate=0.5, burst=2, clock=clock, max_devices=2)
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]
    clock.advance(timedelta(seconds=1))
    assert not limiter.allow("a")  # half a token
    clock.advance(timedelta(seconds=1))
    assert limiter.allow("a")
    assert limiter.allow("b")
    assert not limiter.allow("c")  # two buckets in use, none refilled: deny rather than grow
    clock.advance(timedelta(seconds=10))
    assert limiter.allow("c")  # refilled buckets are forgotten


# --------------------------------------------------------------------------- key material


def test_make_validation_key(tmp_path: Path) -> None:
    files = make_validation_key(tmp_path / "keys")
    assert files.private.stat().st_mode & 0o777 == 0o600
    public = load_gateway_public_key(files.public.read_bytes())
    private = load_validation_key(files.private)
    assert gateway_key_id(public) == gateway_key_id(private.public_key()) == files.kid
    with pytest.raises(ConfigError, match="already exists"):
        make_validation_key(tmp_path / "keys")
    assert make_validation_key(tmp_path / "keys", force=True).kid != files.kid
    (tmp_path / "bad.key").write_bytes(b"nope")
    with pytest.raises(ConfigError, match="cannot load"):
        load_validation_key(tmp_path / "bad.key")
