"""The gateway's image server over real HTTPS: Range for resuming, nothing but images by digest."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

import pytest

from device_client.firmware import HttpImageSource
from edge_core.errors import FetchError
from gateway_agent.firmware_publish import ImageServer
from tests.support.pki import DevPki

pytestmark = pytest.mark.integration

IMAGE = bytes(range(256)) * 500


def test_https_image_with_range(tmp_path: Path, pki: DevPki) -> None:
    digest = hashlib.sha256(IMAGE).hexdigest()
    (tmp_path / digest).write_bytes(IMAGE)
    (tmp_path / "secret.txt").write_text("not an image")
    server = ImageServer(tmp_path, "127.0.0.1", 0, cert=pki.root / "broker.crt", key=pki.root / "broker.key")
    ctx = ssl.create_default_context(cafile=str(pki.chain))
    with server.running():
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
