"""The broker's revocation state: the installed CRL files, verified here too, and enforced.

The gateway agent fetches, verifies and installs CRLs; the broker does not trust the
file for that: it runs the same acceptance rules (``edge_core.revocation.accept_crl``)
against its configured issuer CAs, so a tampered or rolled-back file is refused and the
last good index stays in force. Parsing a large CRL runs in a worker thread and the new
index is swapped in with one assignment; then live sessions holding a now-revoked
certificate are cut. A file reload is all-or-nothing: one bad block refuses the file.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509

from edge_core.admission import Admitted, RevocationView, session_verdict
from edge_core.chain import PathRefused, TrustStore, ValidPath, build_path
from edge_core.errors import CredentialError
from edge_core.revocation import (
    CrlUpdate,
    Freshness,
    InstalledCrl,
    RevocationIndex,
    StalenessPolicy,
    accept_crl,
    is_newer,
    issuer_key,
    split_crl_bundle,
)
from edge_runtime.pemfiles import load_ca_certificates

__all__ = ["RevocationSettings", "RevocationState", "load_issuer_certs"]

_PATH_CACHE = 100_000  # built paths kept (one per live certificate); cleared when full


@dataclass(frozen=True)
class RevocationSettings:
    crl_files: tuple[Path, ...]
    issuers: tuple[Path, ...]
    staleness: StalenessPolicy = field(default_factory=StalenessPolicy)
    max_skew: timedelta = timedelta(minutes=5)
    check_interval: float = 5.0
    #: the CA bundle device chains are built from (the listener's ``client_ca``)
    trust_bundle: Path | None = None


def load_issuer_certs(paths: Sequence[Path]) -> list[x509.Certificate]:
    return load_ca_certificates(paths, what="CRL issuer certificate")


def _accept_files(blobs: Mapping[str, bytes], issuers: Sequence[x509.Certificate],
                  installed: Mapping[str, InstalledCrl], now: datetime, max_skew: timedelta) -> list[CrlUpdate]:
    """Pure and thread-safe: every CRL block of every file, accepted or the first refusal raised."""
    updates: list[CrlUpdate] = []
    for name, blob in blobs.items():
        blocks = split_crl_bundle(blob)
        if not blocks:
            raise CredentialError("crl_unparseable", f"{name}: no CRL in the file")
        for block in blocks:
            # installed=None for a full re-read; anti-rollback is checked against ``installed`` below
            update = accept_crl(block, issuers=issuers, installed=None, now=now, max_skew=max_skew)
            try:
                is_newer(installed.get(update.issuer), update.installed.crl_number, update.installed.sha256)
            except CredentialError as exc:
                raise CredentialError(exc.reason, f"{name}: {exc}", hint=exc.hint) from exc
            updates.append(update)
    return updates


class RevocationState:
    def __init__(self, settings: RevocationSettings, issuers: Sequence[x509.Certificate]) -> None:
        self.settings = settings
        self.issuers = list(issuers)
        bundle = load_issuer_certs([settings.trust_bundle]) if settings.trust_bundle is not None else []
        #: every CA on a device's path whose issuer publishes a configured CRL is checked
        self.trust = TrustStore.from_bundle([*bundle, *self.issuers], crl_issuers=self.issuers)
        self.index = RevocationIndex()
        self._paths: dict[str, ValidPath | None] = {}
        self.issuer_names = [issuer_key(c.subject) for c in self.issuers]
        #: SHA-256 of each CRL file's bytes as last read, so file watchers start from what was loaded
        self.file_digests: dict[str, str] = {}
        self._alarmed: dict[str, str] = {}

    async def reload(self, now: datetime) -> RevocationIndex:
        """Read every CRL file, verify off the event loop, return the new index (not yet swapped in)."""
        blobs: dict[str, bytes] = {}
        for path in self.settings.crl_files:
            try:
                blobs[str(path)] = await asyncio.to_thread(path.read_bytes)
            except FileNotFoundError:
                continue  # not installed yet: the staleness policy decides ("missing")
            except OSError as exc:
                raise CredentialError("crl_unreadable", f"{path}: {exc.strerror}") from exc
        self.file_digests = {name: hashlib.sha256(blob).hexdigest() for name, blob in blobs.items()}
        updates = await asyncio.to_thread(_accept_files, blobs, self.issuers, self.index.installed, now,
                                          self.settings.max_skew)
        return RevocationIndex.from_updates(updates)

    def verdict(self, admitted: Admitted, now: datetime) -> str | None:
        """May this session live, as far as revocation goes? None or a stable reason code.

        The path is built once per certificate (TLS already checked its signatures) and kept,
        so re-checking every live session after a CRL reload costs lookups, not signatures.
        """
        cert = admitted.cert
        path = self._paths.get(cert.fingerprint)
        if path is None and cert.certificate is not None and cert.fingerprint not in self._paths:
            try:
                path = build_path(cert.certificate, trust=self.trust, now=now)
            except PathRefused:
                path = None  # CAs not all known here: the device's own certificate is still checked
            if len(self._paths) >= _PATH_CACHE:
                self._paths.clear()
            self._paths[cert.fingerprint] = path
        view = RevocationView(self.trust, self.index, self.settings.staleness)
        return session_verdict(admitted, now=now, revocation=view, path=path)

    def freshness(self, issuer: str, now: datetime) -> Freshness:
        return self.settings.staleness.evaluate(self.index.installed.get(issuer), now)

    def alarm_changes(self, now: datetime) -> list[tuple[str, Freshness]]:
        """Issuers whose freshness state changed since the last call (for alarm events)."""
        changed = []
        for issuer in self.issuer_names:
            fresh = self.freshness(issuer, now)
            previous = self._alarmed.get(issuer)
            if previous != fresh.state:
                self._alarmed[issuer] = fresh.state
                if previous is not None or fresh.alarm:  # a fresh CRL at start-up is no news
                    changed.append((issuer, fresh))
        return changed
