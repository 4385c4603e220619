"""Fixtures of the firmware tests: a private SoftHSM2 token for the whole run.

The PKCS#11 module reads ``SOFTHSM2_CONF`` once per process, so the token is created once
(session scope) in a temporary directory; each test uses key labels of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.firmware.release import SOFTHSM_MODULE, TOKEN_PIN


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A token labelled ``release`` under a private SOFTHSM2_CONF; returns the label."""
    assert shutil.which("softhsm2-util"), "softhsm2 is missing: run scripts/system-packages.sh"
    assert Path(SOFTHSM_MODULE).exists(), f"{SOFTHSM_MODULE} is missing: run scripts/system-packages.sh"
    base = tmp_path_factory.mktemp("softhsm")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    saved = {name: os.environ.get(name) for name in ("SOFTHSM2_CONF", "FIRMWARE_TOKEN_PIN")}
    os.environ["SOFTHSM2_CONF"] = str(conf)
    os.environ["FIRMWARE_TOKEN_PIN"] = TOKEN_PIN
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "release", "--so-pin", "5566",
                    "--pin", TOKEN_PIN], check=True, capture_output=True)
    yield "release"
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def label() -> str:
    """A key label no other test uses."""
    return f"release-{uuid.uuid4().hex[:8]}"
