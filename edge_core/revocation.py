"""Which device serials are revoked: the revocation index the broker and the agent consult.

Immutable values built from accepted CRLs (``edge_core.crl_trust``); no I/O. Lookups are
one dict and one set lookup, cheap enough for every CONNECT and every live-session re-check.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from cryptography import x509

from edge_core.crl import CrlUpdate, InstalledCrl, RevokedSerials

__all__ = ["RevocationIndex"]

@dataclass(frozen=True)
class RevocationIndex:
    """Revoked serials per issuer (``issuer_key``). Immutable: updates build a new index.

    ``is_revoked`` is one dict lookup and one set lookup (well under a microsecond), so
    the broker can call it on every CONNECT. An issuer without a CRL is not covered:
    ``is_revoked`` answers False and ``covers`` tells the caller to apply its staleness
    policy instead.
    """

    by_issuer: Mapping[str, RevokedSerials] = field(default_factory=lambda: MappingProxyType({}))
    installed: Mapping[str, InstalledCrl] = field(default_factory=lambda: MappingProxyType({}))
    #: who signed the CRL in force, per issuer (path validation checks a separate CRL signer)
    signers: Mapping[str, x509.Certificate] = field(default_factory=lambda: MappingProxyType({}),
                                                    compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_issuer", MappingProxyType(dict(self.by_issuer)))
        object.__setattr__(self, "installed", MappingProxyType(dict(self.installed)))
        object.__setattr__(self, "signers", MappingProxyType(dict(self.signers)))

    def is_revoked(self, issuer: str, serial: int) -> bool:
        serials = self.by_issuer.get(issuer)
        return serials is not None and serial in serials

    def covers(self, issuer: str) -> bool:
        return issuer in self.by_issuer

    def with_update(self, update: CrlUpdate) -> RevocationIndex:
        """A new index with ``update`` in force for its issuer (unchanged updates keep the old set)."""
        if update.revoked is None:
            if not self.covers(update.issuer):
                raise ValueError(f"no serials for {update.issuer!r}: accept with installed=None first")
            return self
        by_issuer = dict(self.by_issuer)
        by_issuer[update.issuer] = update.revoked
        installed = dict(self.installed)
        installed[update.issuer] = update.installed
        signers = dict(self.signers)
        if update.signer is not None:
            signers[update.issuer] = update.signer
        else:
            signers.pop(update.issuer, None)
        return RevocationIndex(by_issuer, installed, signers)

    @classmethod
    def from_updates(cls, updates: Iterable[CrlUpdate]) -> RevocationIndex:
        index = cls()
        for update in updates:
            index = index.with_update(update)
        return index

