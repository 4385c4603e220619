"""Which device serials are revoked: the revocation index the broker and the agent consult.

Immutable values built from accepted CRLs (``edge_core.crl_trust``); no I/O. Lookups are
one dict and one set lookup, cheap enough for every CONNECT and every live-session re-check.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from cryptography import x509

if TYPE_CHECKING:
    from edge_core.crl import CrlUpdate, InstalledCrl

__all__ = ["SHARDS", "RevocationIndex", "RevokedSerials"]

#: serials are spread over this many dicts by their low bits (see ``RevokedSerials``)
SHARDS = 64


class RevokedSerials(AbstractSet[int]):
    """An immutable set of serial numbers, built so that building and holding it never stalls.

    Serials live in 64 dicts (``serial -> None``) chosen by the low bits. Why not one
    frozenset: a million-entry set resizes in one C call (~40-90 ms with the GIL held),
    and sets are tracked by the garbage collector, so every full collection walks all
    entries (100+ ms) - in whatever thread it happens. Dicts holding only ints are
    untracked by the collector, and 64 shards keep each resize small. Lookup is one
    tuple index and one dict lookup.
    """

    __slots__ = ("_count", "_shards")

    def __init__(self, serials: Iterable[int] = ()) -> None:
        shards: tuple[dict[int, None], ...] = tuple({} for _ in range(SHARDS))
        for serial in serials:
            shards[serial & (SHARDS - 1)][serial] = None
        self._shards = shards
        self._count = sum(len(shard) for shard in shards)

    @classmethod
    def from_shards(cls, shards: tuple[dict[int, None], ...]) -> RevokedSerials:
        self = cls.__new__(cls)
        self._shards = shards
        self._count = sum(len(shard) for shard in shards)
        return self

    def __contains__(self, serial: object) -> bool:
        return isinstance(serial, int) and serial in self._shards[serial & (SHARDS - 1)]

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        for shard in self._shards:
            yield from shard

    def __repr__(self) -> str:
        return f"<RevokedSerials {self._count} serials>"


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

