"""The agent's CRL sync: fetch, verify, install, remember.

``CrlSyncer.sync_once`` fetches every configured source, runs ``edge_core.revocation.accept_crl``
and, on acceptance, installs the CRLs to every install target (one agent can feed several
brokers). It is blocking: the daemon calls it through ``asyncio.to_thread``.

On any failure - network error, timeout, oversize, HTTP status, garbage, bad signature,
an older CRL - the last good CRL stays in force, and the reason is emitted as an event
(``crl.fetch_failed`` or ``crl.rejected``) and counted. Accepted CRLs give ``crl.installed``.

Files:

- each install target holds the current CRL of every issuer as concatenated PEM blocks
  (one issuer: a plain PEM CRL file; OpenSSL, Python's ``ssl`` and Mosquitto read it,
  and ``edge_core.revocation.split_crl_bundle`` splits it);
- the state file (JSON) records what is installed, so anti-rollback survives restarts::

      {"version": 1, "installed": {"CN=Edge Dev Issuing CA,O=...": {"issuer": ..., "crl_number": 4,
        "this_update": "...", "next_update": "...", "sha256": "...", "count": 2}}}

- ``<state stem>.d/<sha256(issuer)[:32]>.der``: the last good DER per issuer, from which the
  install bundle is rebuilt when one issuer's CRL changes.

Targets are written before the state: a crash in between re-installs on the next sync
instead of leaving a target behind a state that claims it is current.

Settings (a ``crl`` section of the agent YAML)::

    crl:
      sources:                       # tried in order; any mix of url/file
        - url: http://pki.plant.example/crl/issuing-ca.crl
        - file: /mnt/usb/issuing-ca.crl
      issuers: [certs/issuing-ca.crt]   # CA certificates (PEM) allowed to sign CRLs
      install_targets: [/var/lib/edge-broker/crl.pem]
      state: var/crl-state.json      # default <base_dir>/var/crl-state.json
      interval: 3600                 # seconds between syncs
      jitter: 0.1                    # +/- fraction of interval, spreads a fleet's requests
      timeout: 10                    # seconds, whole download
      max_bytes: 67108864            # size cap of one CRL download
      max_skew: 300                  # tolerated clock difference for thisUpdate, seconds
      staleness:                     # what the broker does with a stale CRL
        mode: fail_open_alarm        # or fail_closed
        max_age: 86400
        warn_fraction: 0.75
"""

from __future__ import annotations

import hashlib
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Literal, Protocol

from cryptography import x509

from edge_core.clock import Clock
from edge_core.errors import ConfigError, CredentialError, FetchError
from edge_core.events import SecurityEvents
from edge_core.files import atomic_write_bytes, atomic_write_text
from edge_core.revocation import (
    DEFAULT_MAX_SKEW,
    InstalledCrl,
    StalenessPolicy,
    accept_crl,
    crl_pem,
    parse_staleness,
)
from edge_core.yamlsrc import Section
from edge_runtime.pemfiles import load_ca_certificates

__all__ = [
    "CrlSource",
    "CrlSyncSettings",
    "CrlSyncer",
    "FileCrlSource",
    "HttpCrlSource",
    "MemoryCrlSource",
    "SourceResult",
    "SyncReport",
    "build_sources",
    "load_issuers",
    "parse_crl_settings",
]

DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # a million-entry CRL is ~36 MB DER
DEFAULT_TIMEOUT = 10.0
DEFAULT_INTERVAL = 3600.0
_STATE_VERSION = 1
_READ_CHUNK = 64 * 1024


# --------------------------------------------------------------------------- sources


class CrlSource(Protocol):
    """Where CRL bytes come from. ``fetch`` returns the bytes or raises ``FetchError``."""

    @property
    def name(self) -> str: ...

    def fetch(self) -> bytes: ...


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
        headers: http.client.HTTPMessage, newurl: str,
    ) -> None:
        fp.close()
        raise FetchError("http_status", f"HTTP {code} redirect to {newurl} refused",
                         hint="configure the final CRL URL; redirects are not followed")


@dataclass(frozen=True)
class HttpCrlSource:
    """HTTP(S) GET of one URL: no redirects, a size cap enforced while reading, one deadline."""

    url: str
    timeout: float = DEFAULT_TIMEOUT
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"CRL URL {self.url!r} must be http:// or https:// with a host")
        if self.timeout <= 0 or self.max_bytes <= 0:
            raise ConfigError("CRL source timeout and max_bytes must be positive")

    @property
    def name(self) -> str:
        return self.url

    def fetch(self) -> bytes:
        # Timeouts and size become FetchError here and only here.
        deadline = time.monotonic() + self.timeout
        opener = urllib.request.build_opener(_RefuseRedirects)
        request = urllib.request.Request(self.url, method="GET",  # noqa: S310 - scheme checked above
                                         headers={"Accept": "application/pkix-crl, */*"})
        try:
            with opener.open(request, timeout=self.timeout) as response:
                return self._read_capped(response, deadline)
        except FetchError:
            raise
        except urllib.error.HTTPError as exc:
            exc.close()  # the error carries the open response
            raise FetchError("http_status", f"{self.url}: HTTP {exc.code} {exc.reason}") from exc
        except TimeoutError as exc:
            raise FetchError("fetch_timeout", f"{self.url}: timed out after {self.timeout} s") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise FetchError("fetch_timeout", f"{self.url}: timed out after {self.timeout} s") from exc
            raise FetchError("fetch_failed", f"{self.url}: {exc.reason}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise FetchError("fetch_failed", f"{self.url}: {exc!r}") from exc

    def _read_capped(self, response: http.client.HTTPResponse, deadline: float) -> bytes:
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise FetchError("fetch_too_large",
                             f"{self.url}: Content-Length {length} exceeds {self.max_bytes} bytes")
        chunks: list[bytes] = []
        total = 0
        while chunk := response.read(_READ_CHUNK):
            total += len(chunk)
            if total > self.max_bytes:
                raise FetchError("fetch_too_large", f"{self.url}: more than {self.max_bytes} bytes")
            if time.monotonic() > deadline:
                raise FetchError("fetch_timeout", f"{self.url}: no complete answer in {self.timeout} s")
            chunks.append(chunk)
        return b"".join(chunks)


@dataclass(frozen=True)
class FileCrlSource:
    """A CRL file on local or removable storage (air-gapped sites)."""

    path: Path
    max_bytes: int = DEFAULT_MAX_BYTES

    @property
    def name(self) -> str:
        return f"file:{self.path}"

    def fetch(self) -> bytes:
        try:
            with self.path.open("rb") as handle:
                data = handle.read(self.max_bytes + 1)
        except OSError as exc:
            raise FetchError("fetch_failed", f"{self.path}: {exc.strerror or exc}") from exc
        if len(data) > self.max_bytes:
            raise FetchError("fetch_too_large", f"{self.path}: more than {self.max_bytes} bytes")
        return data


@dataclass
class MemoryCrlSource:
    """In-memory fake for tests: serves ``data`` or raises ``error``."""

    data: bytes = b""
    error: FetchError | None = None
    name: str = "memory"
    fetches: int = 0

    def fetch(self) -> bytes:
        self.fetches += 1
        if self.error is not None:
            raise self.error
        return self.data


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SourceSpec:
    kind: Literal["url", "file"]
    location: str


@dataclass(frozen=True)
class CrlSyncSettings:
    sources: tuple[SourceSpec, ...]
    issuers: tuple[Path, ...]
    install_targets: tuple[Path, ...]
    state_path: Path
    interval: timedelta = timedelta(seconds=DEFAULT_INTERVAL)
    jitter: float = 0.1
    timeout: float = DEFAULT_TIMEOUT
    max_bytes: int = DEFAULT_MAX_BYTES
    max_skew: timedelta = DEFAULT_MAX_SKEW
    staleness: StalenessPolicy = field(default_factory=StalenessPolicy)


def _paths(section: Section, key: str, base_dir: Path, *, required: bool) -> tuple[Path, ...]:
    raw = section.take(key, list, [], required=required)
    if required and not raw:
        raise section.error(key, f"{section.what}: '{key}' must list at least one path")
    out = []
    for item in raw:
        if not isinstance(item, str) or not item:
            raise section.error(key, f"{section.what}: '{key}' entries must be non-empty strings")
        path = Path(item)
        out.append(path if path.is_absolute() else base_dir / path)
    return tuple(out)


def _positive(section: Section, key: str, default: float) -> float:
    value = section.take(key, float, default)
    if value <= 0:
        raise section.error(key, f"{section.what}: '{key}' must be positive")
    return value


def parse_crl_settings(section: Section, base_dir: Path) -> CrlSyncSettings:
    """Validate the ``crl`` section into frozen settings; errors name file and line."""
    specs: list[SourceSpec] = []
    raw_sources = section.take("sources", list, required=True)
    if not raw_sources:
        raise section.error("sources", f"{section.what}: 'sources' must list at least one source")
    lines = getattr(raw_sources, "item_lines", [])
    for n, raw in enumerate(raw_sources):
        src = Section(raw, source=section.source, line=lines[n] if n < len(lines) else section.line,
                      what=f"{section.what}.sources[{n}]")
        url = src.take("url", str)
        file = src.take("file", str)
        src.done()
        if (url is None) == (file is None):
            raise src.error(None, f"{src.what}: give exactly one of 'url' or 'file'")
        if url is not None:
            try:
                HttpCrlSource(url)
            except ConfigError as exc:
                raise src.error("url", f"{src.what}: {exc}") from exc
            specs.append(SourceSpec("url", url))
        elif file is not None:
            path = Path(file)
            specs.append(SourceSpec("file", str(path if path.is_absolute() else base_dir / path)))
    issuers = _paths(section, "issuers", base_dir, required=True)
    targets = _paths(section, "install_targets", base_dir, required=True)
    state = section.take("state", str, "var/crl-state.json")
    state_path = Path(state) if Path(state).is_absolute() else base_dir / state
    interval = _positive(section, "interval", DEFAULT_INTERVAL)
    jitter = section.take("jitter", float, 0.1)
    if not 0.0 <= jitter < 1.0:
        raise section.error("jitter", f"{section.what}: 'jitter' must be in [0, 1)")
    timeout = _positive(section, "timeout", DEFAULT_TIMEOUT)
    max_bytes = section.take("max_bytes", int, DEFAULT_MAX_BYTES)
    if max_bytes <= 0:
        raise section.error("max_bytes", f"{section.what}: 'max_bytes' must be positive")
    max_skew = section.take("max_skew", float, DEFAULT_MAX_SKEW.total_seconds())
    if max_skew < 0:
        raise section.error("max_skew", f"{section.what}: 'max_skew' must not be negative")
    stale = section.sub("staleness")
    staleness = parse_staleness(stale) if stale is not None else StalenessPolicy()
    section.done()
    return CrlSyncSettings(
        sources=tuple(specs), issuers=issuers, install_targets=targets, state_path=state_path,
        interval=timedelta(seconds=interval), jitter=jitter, timeout=timeout, max_bytes=max_bytes,
        max_skew=timedelta(seconds=max_skew), staleness=staleness,
    )


def build_sources(settings: CrlSyncSettings) -> list[CrlSource]:
    sources: list[CrlSource] = []
    for spec in settings.sources:
        if spec.kind == "url":
            sources.append(HttpCrlSource(spec.location, timeout=settings.timeout,
                                         max_bytes=settings.max_bytes))
        else:
            sources.append(FileCrlSource(Path(spec.location), max_bytes=settings.max_bytes))
    return sources


def load_issuers(paths: Sequence[Path]) -> list[x509.Certificate]:
    """Every certificate in the given PEM files; ``ConfigError`` names an unreadable one."""
    return load_ca_certificates(paths, what="CRL issuer certificate")


# --------------------------------------------------------------------------- syncing

Outcome = Literal["installed", "unchanged", "rejected", "fetch_failed"]


@dataclass(frozen=True)
class SourceResult:
    source: str
    outcome: Outcome
    reason: str | None = None
    message: str = ""
    issuer: str | None = None
    crl_number: int | None = None


@dataclass(frozen=True)
class SyncReport:
    results: tuple[SourceResult, ...]
    installed: Mapping[str, InstalledCrl]

    @property
    def ok(self) -> bool:
        """True if no source failed (installed or unchanged everywhere)."""
        return all(r.outcome in ("installed", "unchanged") for r in self.results)

    @property
    def changed(self) -> bool:
        return any(r.outcome == "installed" for r in self.results)


class CrlSyncer:
    """Fetch, verify and install CRLs; the last good CRL survives every failure and restart."""

    def __init__(
        self,
        sources: Sequence[CrlSource],
        issuers: Sequence[x509.Certificate],
        install_targets: Sequence[Path],
        state_path: Path,
        clock: Clock,
        events: SecurityEvents,
        *,
        max_skew: timedelta = DEFAULT_MAX_SKEW,
        staleness: StalenessPolicy | None = None,
        interval: timedelta = timedelta(seconds=DEFAULT_INTERVAL),
        jitter: float = 0.1,
    ) -> None:
        if not sources or not issuers or not install_targets:
            raise ConfigError("CRL sync needs at least one source, one issuer CA and one install target")
        self.sources = list(sources)
        self.issuers = list(issuers)
        self.install_targets = [Path(t) for t in install_targets]
        self.state_path = Path(state_path)
        self.cache_dir = self.state_path.with_name(self.state_path.stem + ".d")
        self.clock = clock
        self.events = events
        self.max_skew = max_skew
        self.staleness = staleness or StalenessPolicy()
        self.interval = interval
        self.jitter = jitter
        self._installed: dict[str, InstalledCrl] = self._load_state()

    @property
    def installed(self) -> Mapping[str, InstalledCrl]:
        return dict(self._installed)

    # state ------------------------------------------------------------------
    def _load_state(self) -> dict[str, InstalledCrl]:
        try:
            doc = json.loads(self.state_path.read_text("utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # Refuse to start rather than forget the CRL numbers: that would reopen rollback.
            raise ConfigError(f"CRL state is unreadable: {exc}", source=str(self.state_path),
                              hint="restore it from backup; delete it only to reset anti-rollback") from exc
        if not isinstance(doc, dict) or doc.get("version") != _STATE_VERSION or not isinstance(
                doc.get("installed"), dict):
            raise ConfigError(f"CRL state must be a version {_STATE_VERSION} object with 'installed'",
                              source=str(self.state_path))
        try:
            records = [InstalledCrl.from_json(rec) for rec in doc["installed"].values()]
            return {record.issuer: record for record in records}
        except ValueError as exc:
            raise ConfigError(str(exc), source=str(self.state_path)) from exc

    def _save_state(self) -> None:
        doc = {"version": _STATE_VERSION,
               "installed": {k: v.to_json() for k, v in sorted(self._installed.items())}}
        atomic_write_text(self.state_path, json.dumps(doc, indent=2) + "\n", mode=0o600)

    def _cache_file(self, issuer: str) -> Path:
        return self.cache_dir / (hashlib.sha256(issuer.encode("utf-8")).hexdigest()[:32] + ".der")

    def _bundle(self, fresh: Mapping[str, bytes]) -> bytes:
        """PEM of the current CRL of every issuer: ``fresh`` ones and verified cached ones."""
        parts: list[bytes] = []
        for issuer, record in sorted(self._installed.items()):
            der = fresh.get(issuer)
            if der is None:
                try:
                    der = self._cache_file(issuer).read_bytes()
                except OSError:
                    der = b""
                if hashlib.sha256(der).hexdigest() != record.sha256:
                    self.events.emit("crl.cache_missing", "cache_mismatch", level="warning", issuer=issuer)
                    continue
            parts.append(crl_pem(der))
        return b"".join(parts)

    def _install(self, fresh: Mapping[str, bytes], records: Mapping[str, InstalledCrl]) -> None:
        previous = dict(self._installed)
        self._installed.update(records)
        try:
            for issuer, der in fresh.items():
                atomic_write_bytes(self._cache_file(issuer), der, mode=0o600)
            bundle = self._bundle(fresh)
            for target in self.install_targets:
                atomic_write_bytes(target, bundle)
            self._save_state()
        except BaseException:
            self._installed = previous
            raise

    # the sync ----------------------------------------------------------------
    def sync_once(self) -> SyncReport:
        """Fetch every source once; install what is new; never go back. Does not raise for
        source failures (they are reported); raises ``OSError`` if an install target or the
        state cannot be written, with the previous state kept."""
        results: list[SourceResult] = []
        fresh: dict[str, bytes] = {}
        records: dict[str, InstalledCrl] = {}
        for source in self.sources:
            try:
                data = source.fetch()
            except FetchError as exc:
                self.events.emit("crl.fetch_failed", exc.reason, level="warning", source=source.name,
                                 detail=str(exc))
                results.append(SourceResult(source.name, "fetch_failed", exc.reason, str(exc)))
                continue
            known = {**self._installed, **records}
            try:
                update = accept_crl(data, issuers=self.issuers, installed=known, now=self.clock.now(),
                                    max_skew=self.max_skew)
            except CredentialError as exc:
                self.events.emit("crl.rejected", exc.reason, level="warning", source=source.name,
                                 detail=str(exc))
                results.append(SourceResult(source.name, "rejected", exc.reason, str(exc)))
                continue
            record = update.installed
            if not update.changed:
                self.events.emit("crl.unchanged", source=source.name, issuer=record.issuer,
                                 crl_number=record.crl_number)
                results.append(SourceResult(source.name, "unchanged", issuer=record.issuer,
                                            crl_number=record.crl_number))
                continue
            fresh[record.issuer] = update.der
            records[record.issuer] = record
            results.append(SourceResult(source.name, "installed", issuer=record.issuer,
                                        crl_number=record.crl_number))
        if records:
            self._install(fresh, records)
            for record in records.values():
                self.events.emit("crl.installed", issuer=record.issuer, crl_number=record.crl_number,
                                 count=record.count, next_update=record.next_update.isoformat(),
                                 sha256=record.sha256[:16])
        elif self._installed and not all(t.exists() for t in self.install_targets):
            self._install({}, {})  # a target was deleted or added: restore it from the cache
        now = self.clock.now()
        for record in self._installed.values():
            fresh_state = self.staleness.evaluate(record, now)
            if fresh_state.alarm:
                self.events.emit("crl.stale", fresh_state.state, level="warning", issuer=record.issuer,
                                 crl_number=record.crl_number, detail=fresh_state.message)
        return SyncReport(tuple(results), self.installed)

    def next_delay(self, rand: float) -> float:
        """Seconds until the next sync for ``rand`` in [0, 1): interval +/- jitter (daemon helper)."""
        return max(1.0, self.interval.total_seconds() * (1.0 + self.jitter * (2.0 * rand - 1.0)))

    @classmethod
    def from_settings(cls, settings: CrlSyncSettings, clock: Clock, events: SecurityEvents) -> CrlSyncer:
        return cls(build_sources(settings), load_issuers(settings.issuers), settings.install_targets,
                   settings.state_path, clock, events, max_skew=settings.max_skew,
                   staleness=settings.staleness, interval=settings.interval, jitter=settings.jitter)
