"""``gateway-agent command``: sign and send a command to a device through the broker."""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from edge_core.errors import ConfigError
from gateway_agent.commanding import BrokerEndpoint, load_signing_key, send_command


def add_parser(sub: Any) -> None:
    command = sub.add_parser("command", help="signed commands to devices")
    verbs = command.add_subparsers(dest="verb", required=True)
    send = verbs.add_parser("send", help="sign a command and publish it to the device's command topic",
                            description="Exit codes: 0 published and not refused by the broker, "
                                        "1 refused (the reason is printed) or failed.")
    send.add_argument("--key", type=Path, required=True, help="operator signing key (PEM, EC P-256)")
    send.add_argument("--operator", required=True, help="operator id (the iss claim and MQTT client id)")
    send.add_argument("--device", required=True)
    send.add_argument("--ttl", type=int, default=30, help="seconds the command stays valid (default 30)")
    send.add_argument("--kid", help="key id, when the operator has several keys")
    send.add_argument("--subtopic", default="exec", help="last topic level (default exec)")
    send.add_argument("--host", default="127.0.0.1")
    send.add_argument("--port", type=int, default=8883)
    send.add_argument("--ca", type=Path, required=True, help="broker trust bundle")
    send.add_argument("--cert", type=Path, required=True, help="operator TLS client certificate")
    send.add_argument("--tls-key", type=Path, required=True, help="operator TLS client key")
    send.add_argument("--wait", type=float, default=2.0, help="seconds to wait for a rejection notice")
    send.add_argument("body", help='the command as JSON, e.g. \'{"op":"reboot"}\'')
    send.set_defaults(func=_send)


def _send(args: argparse.Namespace) -> int:
    try:
        body = json.loads(args.body)
    except ValueError as exc:
        raise ConfigError(f"command body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ConfigError("command body must be a JSON object")
    result = send_command(
        BrokerEndpoint(args.host, args.port, args.ca, args.cert, args.tls_key),
        operator=args.operator, signing_key=load_signing_key(args.key), device=args.device, body=body,
        ttl=timedelta(seconds=args.ttl), subtopic=args.subtopic, kid=args.kid, wait=args.wait,
    )
    if result.ok:
        print(f"sent jti={result.jti} to {result.topic}; the broker raised no rejection within {args.wait}s")
        return 0
    print(f"REFUSED jti={result.jti} reason={result.rejected}")
    return 1
