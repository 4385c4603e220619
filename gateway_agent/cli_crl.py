"""``gateway-agent crl``: CRL sync; and the ``pki revoke`` / ``pki crl`` verbs of the dev CA.

``crl sync --config agent.yaml`` runs one sync with the ``crl`` section of the agent
config. Exit codes: 0 every source installed or confirmed the CRL in force, 1 a source
failed or was refused (the last good CRL stays; the message says why), 2 usage error.

``add_pki_verbs(verbs)`` is called by ``cli_pki`` to add ``revoke`` and ``crl`` to ``pki``.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path
from typing import Any

from edge_core import yamlsrc
from edge_core.clock import SystemClock
from edge_core.errors import ConfigError
from edge_core.events import SecurityEvents
from gateway_agent.crl_issue import REVOCATION_REASONS, crl_path, issue_crl, revoke
from gateway_agent.crl_sync import CrlSyncer, parse_crl_settings
from gateway_agent.pki import FileCA

__all__ = ["add_parser", "add_pki_verbs"]


def add_parser(sub: Any) -> None:
    crl = sub.add_parser("crl", help="certificate revocation lists: sync")
    verbs = crl.add_subparsers(dest="verb", required=True)
    sync = verbs.add_parser("sync", help="fetch, verify and install CRLs once (the daemon does this hourly)")
    sync.add_argument("--config", type=Path, required=True, help="agent YAML with a 'crl' section")
    sync.set_defaults(func=_sync)


def add_pki_verbs(verbs: Any) -> None:
    rev = verbs.add_parser("revoke", help="revoke a device certificate (device id or serial) in the dev CA")
    rev.add_argument("target", help="device id (devices/<id>.crt) or serial number (decimal or 0x hex)")
    rev.add_argument("--reason", default="key_compromise", choices=REVOCATION_REASONS)
    rev.add_argument("--ca-dir", type=Path, default=Path("certs-dev"))
    rev.set_defaults(func=_revoke)
    crl = verbs.add_parser("crl", help="issue a new CRL of the dev issuing CA")
    crl.add_argument("--ca-dir", type=Path, default=Path("certs-dev"))
    crl.add_argument("--days", type=float, default=7.0, help="validity: nextUpdate - thisUpdate (default 7)")
    crl.add_argument("--out", type=Path, default=None, help="default <ca-dir>/crl/issuing-ca.crl")
    crl.set_defaults(func=_issue)


def _target(ca: FileCA, text: str) -> int | str:
    """A device id if ``devices/<text>.crt`` exists, else a serial number."""
    if ca.device_paths(text)[0].exists():
        return text
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError as exc:
        raise ConfigError(f"{text!r} is neither a device in {ca.dir / 'devices'} "
                          "nor a serial number") from exc


def _revoke(args: argparse.Namespace) -> int:
    ca = FileCA(args.ca_dir)
    entry = revoke(ca, _target(ca, args.target), args.reason)
    who = f"device {entry.device} " if entry.device else ""
    print(f"revoked {who}serial {entry.serial:#x} ({entry.reason}); publish with `gateway-agent pki crl`")
    return 0


def _issue(args: argparse.Namespace) -> int:
    ca = FileCA(args.ca_dir)
    out = args.out if args.out is not None else crl_path(ca)
    issue_crl(ca, validity=timedelta(days=args.days), out=out)
    print(f"CRL written to {out}")
    return 0


def _sync(args: argparse.Namespace) -> int:
    path: Path = args.config
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read agent config: {exc.strerror or exc}", source=str(path)) from exc
    root = yamlsrc.Section(yamlsrc.load(text, source=str(path)), source=str(path), what="agent config")
    section = root.sub("crl", required=True)
    if section is None:  # required=True raises first; this narrows the type
        raise ConfigError("missing 'crl' section", source=str(path))
    settings = parse_crl_settings(section, path.parent)
    syncer = CrlSyncer.from_settings(settings, SystemClock(), SecurityEvents("gateway-agent.crl"))
    report = syncer.sync_once()
    for result in report.results:
        detail = f" crl_number={result.crl_number}" if result.crl_number is not None else ""
        reason = f" reason={result.reason}" if result.reason else ""
        print(f"{result.source}: {result.outcome}{reason}{detail}")
    return 0 if report.ok else 1
