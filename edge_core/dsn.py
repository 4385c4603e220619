"""Connection URLs of the shared stores (PostgreSQL, Redis): what may be logged of them.

A URL may carry a password (``postgresql://agent:secret@db/edge``); logs, status pages and
error messages only ever show ``redact(url)``. Plain string work: the core does no I/O and
needs no URL library for this.
"""

from __future__ import annotations

__all__ = ["redact"]


def redact(url: str) -> str:
    """The URL with the password of its ``user:password@`` part replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}{tail}"
