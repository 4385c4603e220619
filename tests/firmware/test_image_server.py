"""The gateway's image server over real HTTPS: TLS 1.3 with device certificates, Range, nothing but images."""

from __future__ import annotations

import hashlib
import ssl
import time
import urllib.request
from pathlib import Path

import pytest

from device_client.firmware import HttpImageSource
from edge_core.errors import ConfigError, FetchError
from edge_core.events import SecurityEvents
from edge_runtime.tls import client_tls_context
from gateway_agent.firmware_publish import ImageServer
from tests.support.mqtt import tls_context
from tests.support.pki import DevPki

pytestmark = pytest.mark.integration

IMAGE = bytes(range(256)) * 500


def _server(tmp_path: Path, pki: DevPki, events: SecurityEvents | None = None) -> ImageServer:
    return ImageServer(tmp_path, "127.0.0.1", 0, cert=pki.root / "broker.crt", key=pki.root / "broker.key",
                       client_ca=pki.chain, events=events)


def _wait_count(events: SecurityEvents, reason: str, count: int) -> None:
    """The server's handler thread emits the refusal; the client may see the failure first."""
    deadline = time.monotonic() + 5
    while events.count("firmware.image_tls_rejected", reason) < count:
        assert time.monotonic() < deadline, f"firmware.image_tls_rejected reason={reason}: {events.recent()[-3:]}"
        time.sleep(0.02)


def test_https_image_with_range(tmp_path: Path, pki: DevPki) -> None:
    digest = hashlib.sha256(IMAGE).hexdigest()
    (tmp_path / digest).write_bytes(IMAGE)
    (tmp_path / "secret.txt").write_text("not an image")
    device = pki.device("pump-17")
    ctx = client_tls_context(pki.chain, device.cert, device.key)
    with _server(tmp_path, pki).running() as server:
        base = f"https://127.0.0.1:{server.port}/firmware"
        assert b"".join(HttpImageSource(f"{base}/{digest}", ssl_context=ctx).read_from(0)) == IMAGE
        assert b"".join(HttpImageSource(f"{base}/{digest}", ssl_context=ctx).read_from(1000)) == IMAGE[1000:]
        for bad in (f"{base}/{'0' * 64}", f"{base}/../secret.txt", f"https://127.0.0.1:{server.port}/secret.txt"):
            with pytest.raises(FetchError):
                b"".join(HttpImageSource(bad, ssl_context=ctx).read_from(0))
        with pytest.raises(FetchError):
            b"".join(HttpImageSource(f"{base}/{digest}", ssl_context=ctx).read_from(len(IMAGE)))
        # a client that does not trust the gateway's CA gets nothing
        with pytest.raises(FetchError):
            b"".join(HttpImageSource(f"{base}/{digest}", ssl_context=ssl.create_default_context()).read_from(0))


def test_only_devices_with_our_certificates_get_images(tmp_path: Path, pki: DevPki) -> None:
    digest = hashlib.sha256(IMAGE).hexdigest()
    (tmp_path / digest).write_bytes(IMAGE)
    events = SecurityEvents("test")
    stranger = pki.foreign("stranger", "pump-17")  # right name, another CA
    with _server(tmp_path, pki, events).running() as server:
        url = f"https://127.0.0.1:{server.port}/firmware/{digest}"
        for ctx, reason in ((tls_context(pki.chain, None), "no_client_cert"),
                            (tls_context(pki.chain, stranger), "cert_verify_failed"),
                            (tls_context(pki.chain, pki.device("pump-17"), max_version=ssl.TLSVersion.TLSv1_2),
                             "tls_version")):
            before = events.count("firmware.image_tls_rejected", reason)
            with pytest.raises(FetchError):
                b"".join(HttpImageSource(url, ssl_context=ctx).read_from(0))
            _wait_count(events, reason, before + 1)
        # nothing in plaintext: the server speaks TLS only, the device fetches https only
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/firmware/{digest}", timeout=5).read()
        device = pki.device("pump-17")
        with pytest.raises(FetchError) as refused:
            next(HttpImageSource(f"http://127.0.0.1:{server.port}/firmware/{digest}",
                                 client_tls_context(pki.chain, device.cert, device.key)).read_from(0))
        assert refused.value.reason == "not_https"
        # the server still serves a device after all that
        ctx = client_tls_context(pki.chain, device.cert, device.key)
        assert b"".join(HttpImageSource(url, ssl_context=ctx).read_from(0)) == IMAGE


def test_unusable_tls_material_is_a_config_error(tmp_path: Path, pki: DevPki) -> None:
    with pytest.raises(ConfigError, match="image server's TLS material"):
        ImageServer(tmp_path, "127.0.0.1", 0, cert=tmp_path / "missing.crt", key=pki.root / "broker.key",
                    client_ca=pki.chain)
