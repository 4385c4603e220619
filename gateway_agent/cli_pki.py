"""``gateway-agent pki``: the development PKI and certificate pins."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edge_core.identity import spki_pin
from gateway_agent.crl_issue import crl_path, issue_crl
from gateway_agent.pki import init_dev, load_cert
from gateway_agent.validation_service import make_validation_key


def add_parser(sub: Any) -> None:
    pki = sub.add_parser("pki", help="development PKI: create, inspect")
    verbs = pki.add_subparsers(dest="verb", required=True)
    init = verbs.add_parser("init-dev", help="create a dev root CA, issuing CA, broker cert, device certs, registry")
    init.add_argument("--out", type=Path, default=Path("certs-dev"))
    init.add_argument("--devices", type=int, default=3, help="number of device certificates (default 3)")
    init.add_argument("--device-id", action="append", dest="device_ids",
                      help="explicit device id (repeatable); overrides --devices")
    init.add_argument("--force", action="store_true", help="replace an existing CA in --out")
    init.set_defaults(func=_init_dev)
    pin = verbs.add_parser("pin", help="print the SPKI SHA-256 pin of a PEM certificate")
    pin.add_argument("cert", type=Path)
    pin.set_defaults(func=_pin)
    from gateway_agent.cli_crl import add_pki_verbs

    add_pki_verbs(verbs)


def _init_dev(args: argparse.Namespace) -> int:
    ca = init_dev(args.out, devices=args.devices, device_ids=args.device_ids, force=args.force)
    if args.force:
        for stale in ("revoked.json", "crl"):  # a new CA starts with no revocations and CRL number 1
            path = ca.dir / stale
            if path.is_file():
                path.unlink()
            elif path.is_dir():
                for child in path.iterdir():
                    child.unlink()
    issue_crl(ca)
    validation = make_validation_key(ca.dir / "agent", force=True)
    print(f"dev PKI written to {ca.dir}")
    print(f"  trust bundle: {ca.chain_path}")
    print(f"  registry:     {ca.registry_path}")
    print(f"  first CRL:    {crl_path(ca)}")
    print(f"  validation key (gateway answers for MCUs): {validation.public} (kid {validation.kid})")
    for crt in sorted((ca.dir / "devices").glob("*.crt")):
        print(f"  device {crt.stem}: {spki_pin(load_cert(crt))}")
    return 0


def _pin(args: argparse.Namespace) -> int:
    print(spki_pin(load_cert(args.cert)))
    return 0
