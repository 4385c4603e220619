"""``gateway-agent crl``: CRL sync; and the ``pki crl`` verb of the dev CA.

``crl sync [-c agent.yaml]`` runs one sync with the ``crl`` section of the agent config.
Exit codes: 0 every source installed or confirmed the CRL in force, 1 a source failed or
was refused (the last good CRL stays; the message says why), 4 the config is missing or
invalid. ``--json`` prints one object per source.

``pki crl`` works on the CA directory named by ``lifecycle.ca_dir`` in the agent config
(``-c``, default ``/etc/edge-gateway/agent.yaml``), or ``--ca-dir``.

``add_pki_verbs(verbs)`` is called by ``cli_pki`` to add ``crl`` to ``pki`` (``pki revoke``
lives in ``cli_pki``).
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
from edge_runtime.cli_support import EXIT_OK, EXIT_REFUSED, add_config_argument, print_json, resolve_config
from gateway_agent.crl_issue import crl_path, issue_crl
from gateway_agent.crl_sync import CrlSyncer, parse_crl_settings
from gateway_agent.pki import FileCA
from gateway_agent.settings import load_agent_settings

CONFIG_NAME = "agent.yaml"

__all__ = ["add_parser", "add_pki_verbs"]


def add_parser(sub: Any) -> None:
    crl = sub.add_parser("crl", help="certificate revocation lists: sync")
    verbs = crl.add_subparsers(dest="verb", required=True)
    sync = verbs.add_parser("sync", help="fetch, verify and install CRLs once (the daemon does this hourly)")
    add_config_argument(sync, CONFIG_NAME, what="agent settings with a 'crl' section")
    sync.add_argument("--json", action="store_true", help="one JSON object per source")
    sync.set_defaults(func=_sync)


def add_pki_verbs(verbs: Any) -> None:
    crl = verbs.add_parser("crl", help="issue a new CRL of the dev issuing CA")
    _ca_arguments(crl)
    crl.add_argument("--days", type=float, default=7.0, help="validity: nextUpdate - thisUpdate (default 7)")
    crl.add_argument("--out", type=Path, default=None, help="default <ca-dir>/crl/issuing-ca.crl")
    crl.set_defaults(func=_issue)


def _ca_arguments(parser: Any) -> None:
    parser.add_argument("-c", "--config", type=Path, default=None, metavar="FILE",
                        help=f"agent settings; the CA is lifecycle.ca_dir (default /etc/edge-gateway/{CONFIG_NAME})")
    parser.add_argument("--ca-dir", type=Path, default=None, help="the CA directory (instead of the config's)")


def _ca_dir(args: argparse.Namespace) -> Path:
    if args.ca_dir is not None:
        return Path(args.ca_dir)
    config = resolve_config(args.config, CONFIG_NAME)
    settings = load_agent_settings(config)
    if settings.lifecycle is None:
        raise ConfigError("has no 'lifecycle' section naming the CA directory (lifecycle.ca_dir)",
                          source=str(config), hint="pass --ca-dir DIR")
    return settings.lifecycle.ca_dir


def _issue(args: argparse.Namespace) -> int:
    ca = FileCA(_ca_dir(args))
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
    # only the 'crl' section: a sync must not depend on the other services' sections
    root = yamlsrc.Section(yamlsrc.load(text, source=str(path)), source=str(path), what="agent config")
    section = root.sub("crl", required=True)
    if section is None:  # required=True raises first; this narrows the type
        raise ConfigError("missing 'crl' section", source=str(path))
    settings = parse_crl_settings(section, path.resolve().parent)
    syncer = CrlSyncer.from_settings(settings, SystemClock(), SecurityEvents("gateway-agent.crl"))
    report = syncer.sync_once()
    if args.json:
        print_json([{"source": r.source, "outcome": r.outcome, "reason": r.reason, "crl_number": r.crl_number}
                    for r in report.results], lines=True)
    else:
        for result in report.results:
            detail = f" crl_number={result.crl_number}" if result.crl_number is not None else ""
            reason = f" reason={result.reason}" if result.reason else ""
            print(f"{result.source}: {result.outcome}{reason}{detail}")
    return EXIT_OK if report.ok else EXIT_REFUSED
