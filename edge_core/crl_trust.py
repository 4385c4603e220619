"""The trusted CRL state: the CRL in force per issuer, and the one rule for replacing it.

Like python-tuf's trusted metadata set, ``TrustedCrls`` owns "newer than what I trust" and
does no I/O: no files, no network, no clock of its own, no event loop. It verifies an
offered CRL with the pure ``edge_core.crl.verify_crl`` and then applies the rollback rule
against the CRL it trusts for that issuer:

- a higher CRL Number (or no CRL yet) replaces the one in force;
- the very CRL in force again changes nothing (``CrlUpdate.changed`` is False, and the
  revoked list is not walked);
- a lower number is refused as ``crl_rollback``;
- an equal number with other content is refused as ``crl_equivocation``: two different CRLs
  under one number mean the CA (or whoever holds its key) tells different parties different
  things, and swapping one in could un-revoke serials.

The CRL in force stays on every refusal. Callers own persistence: the agent's CRL sync
saves ``installed`` after writing its install targets, the broker and the daemon rebuild
their ``RevocationIndex`` from the updates. ``accept_crl`` is the one-shot form for a
caller that holds at most the installed records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Protocol

from cryptography import x509

from edge_core.crl import DEFAULT_MAX_SKEW, CrlUpdate, InstalledCrl, VerifiedCrl, refuse, verify_crl

__all__ = ["TrustedCrls", "accept_crl"]


class _Offered(Protocol):
    @property
    def issuer(self) -> str: ...
    @property
    def crl_number(self) -> int: ...
    @property
    def sha256(self) -> str: ...


class TrustedCrls:
    """The CRLs trusted per issuer (``issuer_key``); state moves only forward."""

    def __init__(self, installed: Mapping[str, InstalledCrl] | None = None) -> None:
        self._installed: dict[str, InstalledCrl] = dict(installed or {})
        for issuer, record in self._installed.items():
            if record.issuer != issuer:
                raise ValueError(f"installed CRL is for {record.issuer!r}, not {issuer!r}")

    @property
    def installed(self) -> Mapping[str, InstalledCrl]:
        """A read-only view of the CRL in force per issuer."""
        return MappingProxyType(self._installed)

    def get(self, issuer: str) -> InstalledCrl | None:
        return self._installed.get(issuer)

    def copy(self) -> TrustedCrls:
        """An independent copy: a caller stages a batch in it and keeps it only if persisting works."""
        return TrustedCrls(self._installed)

    def admits(self, offered: _Offered) -> bool:
        """The one rollback rule: may a verified CRL replace the one trusted for its issuer?

        True for a higher CRL Number (or nothing trusted), False for the very CRL in force;
        raises ``crl_rollback`` or ``crl_equivocation`` (see the module docstring).
        """
        current = self._installed.get(offered.issuer)
        number = offered.crl_number
        if current is None or number > current.crl_number:
            return True
        if number < current.crl_number:
            raise refuse("crl_rollback", f"new CRL number {number} must be >= installed {current.crl_number}")
        if offered.sha256 != current.sha256:
            raise refuse("crl_equivocation",
                         f"CRL number {number} of {current.issuer} is already installed with other content "
                         f"(sha256 {current.sha256[:16]}, offered {offered.sha256[:16]})")
        return False

    def decide(self, verified: VerifiedCrl) -> CrlUpdate:
        """The update a verified CRL makes (or does not make) to this state; the state is not changed."""
        current = self._installed.get(verified.issuer)
        if not self.admits(verified):
            assert current is not None  # admits() is True when nothing is trusted
            return CrlUpdate(changed=False, installed=current, der=verified.der,
                             previous_number=current.crl_number)
        serials, count = verified.entries()
        return CrlUpdate(changed=True, installed=verified.record(count), der=verified.der, revoked=serials,
                         previous_number=current.crl_number if current is not None else None,
                         signer=verified.signer)

    def check(self, crl_bytes: bytes, *, issuers: Sequence[x509.Certificate], now: datetime,
              max_skew: timedelta = DEFAULT_MAX_SKEW) -> CrlUpdate:
        """Verify one CRL (DER or PEM) and apply the rollback rule, without changing the state."""
        return self.decide(verify_crl(crl_bytes, issuers=issuers, now=now, max_skew=max_skew))

    def update(self, crl_bytes: bytes, *, issuers: Sequence[x509.Certificate], now: datetime,
               max_skew: timedelta = DEFAULT_MAX_SKEW) -> CrlUpdate:
        """``check``, then trust the CRL if it is newer. Raises ``CredentialError`` with the state kept."""
        update = self.check(crl_bytes, issuers=issuers, now=now, max_skew=max_skew)
        if update.changed:
            self._installed[update.issuer] = update.installed
        return update


def accept_crl(
    crl_bytes: bytes,
    *,
    issuers: Sequence[x509.Certificate],
    installed: InstalledCrl | Mapping[str, InstalledCrl] | None,
    now: datetime,
    max_skew: timedelta = DEFAULT_MAX_SKEW,
) -> CrlUpdate:
    """Verify one CRL and judge it against ``installed``; raise ``CredentialError`` or return.

    ``installed`` is the CRL in force for this CRL's issuer, or the installed CRLs by
    ``issuer_key`` (the caller need not know the issuer before parsing), or None for a
    first read. An ``InstalledCrl`` of a different issuer is a caller bug: ``ValueError``.
    """
    verified = verify_crl(crl_bytes, issuers=issuers, now=now, max_skew=max_skew)
    current = installed.get(verified.issuer) if isinstance(installed, Mapping) else installed
    if current is not None and current.issuer != verified.issuer:
        raise ValueError(f"installed CRL is for {current.issuer!r}, not {verified.issuer!r}")
    return TrustedCrls({current.issuer: current} if current is not None else None).decide(verified)
