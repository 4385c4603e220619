"""The ACL used by broker integration tests (devices come from tests/support/pki.py)."""

from __future__ import annotations

from pathlib import Path

TEST_ACL = """\
version: 1
attributes: [site, line]
everyone:
  - allow publish devices/{device}/status
roles:
  sensor:
    - allow publish devices/{device}/telemetry/#
    - allow subscribe devices/{device}/cmd/#
    - allow both sites/{site}/broadcast
devices:
  pump-17:
    - allow subscribe devices/+/status
  sensor-02:
    - allow publish devices/+/cmd/#
    - allow subscribe sites/{site}/secret
"""


def write_acl(directory: Path, text: str = TEST_ACL) -> Path:
    path = directory / "acl.yaml"
    replace_file(path, text)
    return path


def replace_file(path: Path, text: str) -> None:
    """Save like an editor that writes a temp file and renames it over the original."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
