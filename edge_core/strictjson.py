"""Strict decoding for signed messages (command envelopes, validation answers).

One spelling only: base64url must be unpadded and canonical (unused trailing bits would
give one signature many encodings), JSON must be an object with unique keys (parsers
disagree on which duplicate wins) and without NaN or Infinity. Each function raises
``ValueError`` with a message naming the part; callers turn it into their own reason code.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, NoReturn

__all__ = ["b64url_canonical", "json_object", "loads"]

_B64URL = re.compile(rb"[A-Za-z0-9_-]*")


def b64url_canonical(part: bytes, name: str) -> bytes:
    if not _B64URL.fullmatch(part):
        raise ValueError(f"{name} is not unpadded base64url ASCII")
    try:
        raw = base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{name} is not valid base64url") from exc
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != part:
        raise ValueError(f"{name} is not canonical base64url")
    return raw


def loads(text: str | bytes) -> Any:
    """``json.loads`` that refuses duplicate keys and the non-JSON constants NaN and Infinity."""
    return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def json_object(raw: bytes, name: str) -> dict[str, Any]:
    try:
        value = loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{name} is not a UTF-8 JSON object: {str(exc)[:80]}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object")  # noqa: TRY004 - one error type for every bad input
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key[:40]!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")
