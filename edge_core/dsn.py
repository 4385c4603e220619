"""Connection URLs of the shared stores (PostgreSQL, Redis): what may be logged of them.

A URL may carry a password (``postgresql://agent:secret@db/edge``); logs, status pages and
error messages only ever show ``redact(url)``.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact"]


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (unchanged if it has none)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable url>"
    if password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
