"""The broker's revocation state: the installed CRL files, verified here too, and enforced.

The gateway agent fetches, verifies and installs CRLs; the broker does not trust the
file for that: it runs the same acceptance rules (``edge_core.crl_trust.accept_crl``)
against its configured issuer CAs, so a tampered or rolled-back file is refused and the
last good index stays in force. Parsing a large CRL runs in a worker thread and the new
index is swapped in with one assignment; then live sessions holding a now-revoked
certificate are cut (``RevocationConcern``). A file reload is all-or-nothing: one bad
block refuses the file.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from broker_plugins.watched import FileWatches
from edge_core.admission import Admitted, RevocationView, session_verdict
from edge_core.chain import PathRefused, TrustStore, ValidPath, build_path
from edge_core.crl import CrlUpdate, InstalledCrl, issuer_key, split_crl_bundle
from edge_core.crl_freshness import Freshness, StalenessPolicy
from edge_core.crl_trust import TrustedCrls, accept_crl
from edge_core.errors import CredentialError
from edge_core.revocation import RevocationIndex
from edge_runtime.pemfiles import load_ca_certificates

if TYPE_CHECKING:
    from broker_plugins.engine.core import Engine
    from broker_plugins.runtime import BrokerRuntime
    from edge_core.registry import Registry

__all__ = ["RevocationConcern", "RevocationSettings", "RevocationState", "load_issuer_certs"]

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
                TrustedCrls(installed).admits(update.installed)
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

    def verdict(self, admitted: Admitted, now: datetime, *, registry: Registry | None = None) -> str | None:
        """May this session live, as far as revocation goes (and the registry, if given)? None or a
        stable reason code.

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
        return session_verdict(admitted, now=now, registry=registry, revocation=view, path=path)

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


class RevocationConcern:
    """Revocation in the broker: the CRL files, the state in the runtime, reload, alarms and cuts.

    Each concern owns its settings, state, reload and enforcement; this one is started
    before the listener (an unreadable or refused CRL at start-up follows the staleness
    policy) and cuts live sessions when a reload revokes their certificate.
    """

    def __init__(self, settings: RevocationSettings, runtime: BrokerRuntime, *, settle: Callable[[], None]) -> None:
        self.settings = settings
        self.runtime = runtime
        self.events = runtime.events
        self.clock = runtime.clock
        self.engine: Engine | None = None
        self._settle = settle
        self._watches = FileWatches(runtime.events)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> RevocationState:
        state = RevocationState(self.settings, load_issuer_certs(self.settings.issuers))
        self.runtime.revocation = state
        await self._reload_crl(b"")
        return state

    def watch(self, interval: float) -> None:
        state = self.state
        for crl_file in self.settings.crl_files:
            # start from the bytes already loaded: no second parse of a large CRL at start-up
            self._watches.watch(crl_file, self._reload_crl, state.file_digests.get(str(crl_file), ""),
                                interval=interval)
        self._task = asyncio.create_task(self._freshness_loop(self.settings.check_interval), name="crl-freshness")

    async def reload(self) -> bool:
        """Re-read the CRL files now (SIGHUP); True if a new version was loaded."""
        return await self._watches.check_now()

    async def stop(self) -> None:
        await self._watches.stop()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    @property
    def state(self) -> RevocationState:
        state = self.runtime.revocation
        assert state is not None
        return state

    async def _reload_crl(self, _changed: bytes) -> None:
        """Re-read every configured CRL file (any one changed); all-or-nothing, then enforce."""
        state = self.state
        started = time.monotonic()
        try:
            index = await state.reload(self.clock.now())
        except CredentialError as exc:
            self.events.emit("crl.reload_failed", exc.reason, level="error", detail=str(exc)[:300],
                             kept=sorted(f"{i}#{c.crl_number}" for i, c in state.index.installed.items()))
            return
        if index.installed == state.index.installed:
            return
        state.index = index
        self._settle()
        for issuer, installed in index.installed.items():
            self.events.emit("crl.loaded", issuer=issuer, crl_number=installed.crl_number, revoked=installed.count,
                             next_update=installed.next_update.isoformat(),
                             load_ms=round((time.monotonic() - started) * 1000, 1))
        await self.enforce_revocation()

    async def enforce_revocation(self) -> int:
        """Cut live sessions whose certificate is revoked (or, under fail_closed, whose CRL is stale)."""
        if self.runtime.revocation is None or self.engine is None:
            return 0  # at start-up there are no sessions yet
        from broker_plugins.runtime import cut_refused_sessions  # runtime imports this module's state type

        return cut_refused_sessions(self.runtime, self.engine, "revocation")

    async def _freshness_loop(self, interval: float) -> None:
        state = self.state
        while True:
            self.check_freshness()
            if state.settings.staleness.mode == "fail_closed":
                await self.enforce_revocation()
            await asyncio.sleep(interval)

    def check_freshness(self) -> None:
        """Raise ``crl.alarm`` when an issuer's CRL freshness changes (and ``crl.recovered``)."""
        state = self.runtime.revocation
        if state is None:
            return
        for issuer, fresh in state.alarm_changes(self.clock.now()):
            if fresh.alarm:
                self.events.emit("crl.alarm", fresh.state, level="error" if not fresh.admit else "warning",
                                 issuer=issuer, admit=fresh.admit, detail=fresh.message,
                                 policy=state.settings.staleness.mode)
            else:
                self.events.emit("crl.recovered", fresh.state, issuer=issuer, detail=fresh.message)

    def status(self) -> dict[str, object]:
        state = self.state
        now = self.clock.now()
        return {
            "policy": state.settings.staleness.mode,
            "issuers": {
                issuer: {
                    "state": (fresh := state.freshness(issuer, now)).state,
                    "admit": fresh.admit,
                    "crl_number": (inst := state.index.installed.get(issuer)) and inst.crl_number,
                    "revoked": inst.count if inst else None,
                    "next_update": inst.next_update.isoformat() if inst else None,
                }
                for issuer in state.issuer_names
            },
        }
