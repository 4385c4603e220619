"""``gateway-agent command send``: sign a command, send it through the broker, wait for the answer.

``command send [-c operator.yaml] --device ID [--subtopic S] [--ttl N] [--wait N] [--json] BODY``.
The operator file (``configs/operator.yaml``) names the operator, its signing key and the
broker endpoint with the operator's TLS credentials.

Exit codes: 0 the broker accepted the command (``operators/<op>/cmd-accepted``) and routed
it; 1 the broker rejected it (``cmd-rejected``, the reason is printed); 5 no answer within
the wait (dropped without a notice, as a forged or malformed envelope is, or the broker is
not answering) or the broker is unreachable; 4 the operator file or key is unusable.
"""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from typing import Any

from edge_core.errors import ConfigError
from edge_runtime.cli_support import EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE, add_config_argument, print_json
from gateway_agent.commanding import load_operator_settings, load_signing_key, send_command

CONFIG_NAME = "operator.yaml"


def add_parser(sub: Any) -> None:
    command = sub.add_parser("command", help="signed commands to devices")
    verbs = command.add_subparsers(dest="verb", required=True)
    send = verbs.add_parser(
        "send", help="sign a command, publish it to the device's command topic, wait for the broker's answer",
        description="Exit codes: 0 accepted and routed, 1 rejected (reason printed), 5 no answer within --wait "
                    "(dropped without notice, e.g. a forged signature) or broker unreachable, 4 operator file "
                    "or key unusable.")
    add_config_argument(send, CONFIG_NAME, what="operator settings: identity, signing key, broker, TLS files")
    send.add_argument("--device", required=True, help="the device id")
    send.add_argument("--subtopic", default=None, help="last topic level (default: the file's, else exec)")
    send.add_argument("--ttl", type=int, default=None, help="seconds the command stays valid (default: the file's)")
    send.add_argument("--wait", type=float, default=None, help="seconds to wait for the answer (default: the file's)")
    send.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    send.add_argument("body", help='the command as JSON, e.g. \'{"op":"reboot"}\'')
    send.set_defaults(func=_send)


def _send(args: argparse.Namespace) -> int:
    try:
        body = json.loads(args.body)
    except ValueError as exc:
        raise ConfigError(f"command body is not JSON: {exc}",
                          hint="""quote it for the shell: '{"op":"reboot"}'""") from exc
    if not isinstance(body, dict):
        raise ConfigError("command body must be a JSON object", hint="""e.g. '{"op":"reboot"}'""")
    op = load_operator_settings(args.config)
    wait = args.wait if args.wait is not None else op.wait
    result = send_command(
        op.endpoint, operator=op.operator, signing_key=load_signing_key(op.signing_key), device=args.device,
        body=body, ttl=timedelta(seconds=args.ttl if args.ttl is not None else op.ttl),
        subtopic=args.subtopic or op.subtopic, kid=op.kid, wait=wait,
    )
    if args.json:
        print_json({"jti": result.jti, "topic": result.topic, "status": result.status, "reason": result.rejected,
                    "operator": op.operator, "device": args.device})
    elif result.ok:
        print(f"accepted jti={result.jti} on {result.topic}: the broker checked it and routed it to the device")
    elif result.rejected is not None:
        print(f"REJECTED jti={result.jti} reason={result.rejected}")
    else:
        print(f"NO ANSWER jti={result.jti} within {wait}s: the broker dropped it without a notice (a forged or "
              "malformed envelope gets none: see its command.rejected events) or is not answering")
    if result.ok:
        return EXIT_OK
    return EXIT_REFUSED if result.rejected is not None else EXIT_UNAVAILABLE
