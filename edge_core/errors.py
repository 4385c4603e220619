"""One small error tree, grouped by who is at fault.

- ``ConfigError``: a file an operator or admin wrote is wrong (YAML, registry, ACL, settings).
- ``CredentialError``: a certificate, key or CRL presented to us is wrong.
- ``EnvelopeError``: a signed command envelope is refused.
- ``FetchError``: fetching something from elsewhere failed (network, size, timeout).
- ``StateError``: a requested change would move state backwards or break an invariant.

Every error carries text a user can act on; ``diagnostics()`` adds the fix.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CredentialError",
    "EdgeSecurityError",
    "EnvelopeError",
    "FetchError",
    "StateError",
]


class EdgeSecurityError(Exception):
    """Base of every error this project raises on purpose."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def diagnostics(self) -> str:
        text = str(self)
        return f"{text}\n  fix: {self.hint}" if self.hint else text


class ConfigError(EdgeSecurityError):
    """A configuration, registry or ACL file is invalid. Names the file and line."""

    hint = "correct the file; the last good version stays in force until then"

    def __init__(
        self,
        reason: str,
        *,
        source: str | None = None,
        line: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.source = source
        self.line = line
        self.reason = reason
        where = None if source is None else (f"{source}:{line}" if line is not None else source)
        text = reason if where is None else f"{where}: {reason}"
        super().__init__(text, hint=hint)


class CredentialError(EdgeSecurityError):
    """A certificate, key, CSR or CRL is unusable. ``reason`` is a stable code."""

    def __init__(self, reason: str, message: str, *, hint: str | None = None) -> None:
        self.reason = reason
        super().__init__(message, hint=hint)


class EnvelopeError(EdgeSecurityError):
    """A signed command envelope was refused. ``reason`` is a stable code."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class FetchError(EdgeSecurityError):
    """Getting bytes from a source failed: network, timeout, size cap."""

    def __init__(self, reason: str, message: str, *, hint: str | None = None) -> None:
        self.reason = reason
        super().__init__(message, hint=hint)


class StateError(EdgeSecurityError):
    """A change would move state backwards or is not a legal transition."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)
