"""Debian's mosquitto command-line clients as outside clients: argument lists for TLS 1.3 mTLS."""

from __future__ import annotations

import shutil

import pytest

from tests.support.pki import Credential

needs_clients = pytest.mark.skipif(shutil.which("mosquitto_pub") is None or shutil.which("mosquitto_sub") is None,
                                   reason="mosquitto-clients not installed (scripts/system-packages.sh)")


def client_args(tool: str, port: int, chain: object, cred: Credential, client_id: str, *args: str) -> list[str]:
    return [tool, "-h", "127.0.0.1", "-p", str(port), "--cafile", str(chain), "--cert", str(cred.cert),
            "--key", str(cred.key), "--tls-version", "tlsv1.3", "-i", client_id, "-V", "mqttv311", *args]
