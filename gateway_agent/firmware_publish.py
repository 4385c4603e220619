"""Publish a signed release: serve the image, offer it to the devices of its class, staged.

``publish_release`` checks the release locally first (the manifest verifies against the
pinned root chain, the image matches its signed digest), copies the image into the images
directory under its SHA-256, serves that directory over HTTPS (TLS 1.3, device certificates
required) with Range support (so a device resumes after a power loss), and drives
``edge_core.firmware_rollout.Rollout`` over an MQTT session of its own: offers on
``devices/{device}/firmware/offer`` (the broker's firmware guard verifies each one again),
reports from ``devices/+/firmware/report``, matched to the offer they answer (``offer_id``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import shutil
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiomqtt

from edge_core import strictjson
from edge_core.clock import Clock
from edge_core.errors import ConfigError, FetchError
from edge_core.events import SecurityEvents
from edge_core.files import atomic_write_bytes
from edge_core.firmware import (
    OFFER_TOPIC,
    ImageCheck,
    Manifest,
    make_offer,
    offer_id,
    verify_release,
)
from edge_core.firmware_rollout import Rollout
from edge_core.registry import parse_registry
from edge_runtime.mqtt import suback_refused
from edge_runtime.tls import client_tls_context, server_tls_context
from gateway_agent.firmware_settings import PublishSettings

__all__ = ["ImageServer", "PublishResult", "check_release", "publish_release"]

REPORT_FILTER = "devices/+/firmware/report"
_REPORT_RE = re.compile(r"devices/([^/]+)/firmware/report")
_IMAGE_PATH = re.compile(r"/firmware/([0-9a-f]{64})")
_RANGE = re.compile(r"bytes=(\d+)-")


class _Refused(Exception):
    """A connection whose TLS handshake failed (already reported as an event)."""


class _TlsServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # refused handshakes are events already; a client hanging up mid-download is no error of ours


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "tls_handshake_timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "cert_verify_failed"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
            return "no_client_cert"
        if "CERTIFICATE_VERIFY_FAILED" in reason or "UNKNOWN_CA" in reason:
            return "cert_verify_failed"
        if "UNSUPPORTED_PROTOCOL" in reason or "VERSION" in reason:
            return "tls_version"
        if "HTTP_REQUEST" in reason:
            return "not_tls"
    return "tls_handshake_failed"


def check_release(chain: list[bytes], manifest_envelope: bytes, image: Path, *, clock: Clock) -> Manifest:
    """The manifest as a device would see it (pinned root, chain) and the image it names; raises if not."""
    manifest = verify_release(manifest_envelope, chain, now=clock.now()).manifest
    check = ImageCheck(manifest)
    try:
        with image.open("rb") as handle:
            while chunk := handle.read(1 << 16):
                check.update(chunk)
    except OSError as exc:
        raise ConfigError(f"cannot read image: {exc.strerror}", source=str(image)) from exc
    check.finish()
    return manifest


class ImageServer:
    """Serves ``images_dir/<sha256>`` at ``/firmware/<sha256>``, with ``Range: bytes=N-``; nothing else.

    HTTPS only: TLS 1.3, and every client presents a certificate chaining to ``client_ca`` (the
    devices' CA, as on the broker's listener). The handshake runs in the connection's own thread
    with a deadline, so a client that stalls it holds no one else up. A refused handshake is the
    event ``firmware.image_tls_rejected`` with a reason code.
    """

    def __init__(self, images_dir: Path, host: str, port: int, *, cert: Path, key: Path, client_ca: Path,
                 events: SecurityEvents | None = None, handshake_timeout: float = 10.0) -> None:
        self.images_dir = images_dir
        directory = images_dir
        try:
            ctx = server_tls_context(cert, key, client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the image server's TLS material ({cert}, {key}, {client_ca}): {exc}",
                              hint="check publish.http: cert, key, client_ca") from exc
        log = events if events is not None else SecurityEvents("firmware_publish")

        class Handler(BaseHTTPRequestHandler):
            server_version = "edge-firmware"
            sys_version = ""
            timeout = handshake_timeout

            def setup(self) -> None:
                self.request.settimeout(handshake_timeout)
                try:
                    self.request.do_handshake()
                except (OSError, ssl.SSLError) as exc:
                    log.emit("firmware.image_tls_rejected", _tls_reason(exc), level="warning",
                             peer=str(self.client_address[0]), detail=str(exc)[:200])
                    raise _Refused from exc
                super().setup()

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                match = _IMAGE_PATH.fullmatch(self.path)
                file = directory / match.group(1) if match else None
                if file is None or not file.is_file():
                    self.send_error(HTTPStatus.NOT_FOUND)
                    return
                size = file.stat().st_size
                offset = 0
                ranged = _RANGE.fullmatch(self.headers.get("Range", ""))
                if ranged:
                    offset = int(ranged.group(1))
                    if offset >= size:
                        self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                        return
                self.send_response(HTTPStatus.PARTIAL_CONTENT if ranged else HTTPStatus.OK)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size - offset))
                if ranged:
                    self.send_header("Content-Range", f"bytes {offset}-{size - 1}/{size}")
                self.end_headers()
                with file.open("rb") as handle:
                    handle.seek(offset)
                    shutil.copyfileobj(handle, self.wfile, 1 << 16)

        self.httpd = _TlsServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True, do_handshake_on_connect=False)
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="firmware-https", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @contextlib.contextmanager
    def running(self) -> Iterator[ImageServer]:
        self._thread.start()
        try:
            yield self
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()
            self._thread.join(5)


@dataclass(frozen=True)
class PublishResult:
    manifest: Manifest
    summary: dict[str, Any]

    @property
    def halted(self) -> bool:
        return bool(self.summary["phase"] == "halted")


def stage_image(images_dir: Path, image: Path, manifest: Manifest) -> Path:
    target = images_dir / manifest.sha256
    data = image.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest.sha256:
        raise ConfigError("the image changed since it was checked", source=str(image))
    atomic_write_bytes(target, data)
    return target


def targets(settings: PublishSettings, device_class: str) -> list[str]:
    registry = parse_registry(settings.registry.read_bytes(), source=str(settings.registry))
    return sorted(d for d, e in registry.devices.items()
                  if e.enabled and e.attributes.get(settings.class_attribute) == device_class)


async def publish_release(
    settings: PublishSettings, *, chain: list[bytes], manifest_envelope: bytes, image: Path, clock: Clock,
    events: SecurityEvents, devices: list[str] | None = None, poll: float = 0.05,
) -> PublishResult:
    """Run one staged rollout to the end (every device confirmed or failed) or until it halts."""
    manifest = check_release(chain, manifest_envelope, image, clock=clock)
    stage_image(settings.images_dir, image, manifest)
    devices = devices if devices is not None else targets(settings, manifest.device_class)
    if not devices:
        raise ConfigError(f"no device in the registry has {settings.class_attribute}: {manifest.device_class}",
                          source=str(settings.registry))
    release_id = manifest.digest
    rollout = Rollout(devices, settings.rollout, release_id=release_id, now=clock.now())
    server = ImageServer(settings.images_dir, *settings.http_bind, cert=settings.http_cert, key=settings.http_key,
                         client_ca=settings.http_client_ca, events=events)
    events.emit("firmware.rollout_started", device_class=manifest.device_class, version=manifest.version,
                devices=len(devices), canaries=list(rollout.canaries))
    with server.running():
        base = settings.public_url
        if settings.http_bind[1] == 0:  # an ephemeral port (tests): devices must be told the real one
            parts = urlsplit(base)
            base = urlunsplit(parts._replace(netloc=f"{parts.hostname}:{server.port}"))
        offer = make_offer(manifest_envelope, roots=chain[1:], url=f"{base}/firmware/{manifest.sha256}")
        await _drive(settings, rollout, offer, manifest, clock=clock, events=events, poll=poll)
    summary = rollout.summary()
    events.emit("firmware.rollout_halted" if rollout.halted else "firmware.rollout_done",
                "failure_reports" if rollout.halted else None, level="warning" if rollout.halted else "info",
                version=manifest.version, confirmed=len(rollout.succeeded), failed=len(rollout.failed),
                detail=rollout.halted)
    return PublishResult(manifest, summary)


async def _drive(settings: PublishSettings, rollout: Rollout, offer: bytes, manifest: Manifest, *,
                 clock: Clock, events: SecurityEvents, poll: float) -> None:
    tls = client_tls_context(settings.ca, settings.cert, settings.key)
    try:
        async with aiomqtt.Client(settings.host, settings.port, identifier=settings.client_id, tls_context=tls,
                                  protocol=aiomqtt.ProtocolVersion.V311, clean_session=True, timeout=10) as client:
            granted = await client.subscribe(REPORT_FILTER, qos=1)
            if any(suback_refused(code) for code in granted):
                raise ConfigError(f"the broker refused {REPORT_FILTER}",
                                  hint="grant the release publisher 'subscribe devices/+/firmware/report'")
            reader = asyncio.create_task(_read_reports(client, rollout, manifest, offer_id(offer), clock=clock,
                                                       events=events))
            try:
                while not rollout.finished:
                    if reader.done():
                        reader.result()
                    for device in rollout.due(clock.now()):
                        await client.publish(OFFER_TOPIC.format(device=device), offer, qos=1)
                        events.emit("firmware.offered", device=device, version=manifest.version,
                                    canary=device in rollout.canaries)
                    await asyncio.sleep(poll)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
    except aiomqtt.MqttError as exc:
        raise FetchError("broker_unreachable", f"release session to {settings.host}:{settings.port}: {exc}") from exc


async def _read_reports(client: aiomqtt.Client, rollout: Rollout, manifest: Manifest, offered: str | None, *,
                        clock: Clock, events: SecurityEvents) -> None:
    """Reports about this release: those naming our offer (``offer``, also refusals that carry no
    version because the device refused before the signatures verified), or, from a device that
    names no offer, those carrying the release's version."""
    async for message in client.messages:
        match = _REPORT_RE.fullmatch(str(message.topic))
        if match is None:
            continue
        device = match.group(1)  # the ACL lets only the device itself publish here
        try:
            report = strictjson.loads(message.payload if isinstance(message.payload, bytes) else b"")
            state, version, answered = str(report["state"]), report.get("version"), report.get("offer")
        except (ValueError, KeyError, TypeError, AttributeError):
            events.emit("firmware.bad_report", "malformed", level="warning", device=device)
            continue
        if answered is not None and answered != offered:
            continue  # about another offer
        if answered is None and version != manifest.version:
            continue  # about another release
        reason = report.get("reason")
        rollout.report(device, state, clock.now(), reason=str(reason) if reason is not None else None)
        events.emit("firmware.report", device=device, state=state, reason=reason, version=version,
                    level="warning" if state in ("failed", "refused", "rolled_back") else "info")
