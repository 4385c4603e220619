"""What both command lines share: running a handler with our exit codes, and reading a status endpoint.

Exit codes: the handler's own; 1 for a refused operation (``EdgeSecurityError``, printed
with its fix, a traceback only with ``-v``); 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request

from edge_core.errors import EdgeSecurityError
from edge_runtime.logsetup import configure_logging

__all__ = ["print_status", "run_handler"]


def run_handler(args: argparse.Namespace) -> int:
    configure_logging(json=True, level="DEBUG" if args.verbose else "INFO")
    try:
        return int(args.func(args))
    except EdgeSecurityError as exc:
        if args.verbose:
            raise
        print(f"error: {exc.diagnostics()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def print_status(what: str, host: str, port: int, *, metrics: bool) -> int:
    """GET the loopback status endpoint and print it; 1 when it is unreachable."""
    url = f"http://{host}:{port}/{'metrics' if metrics else 'status'}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode("utf-8")
    except OSError as exc:
        print(f"error: {what} status endpoint {url} unreachable: {exc}", file=sys.stderr)
        return 1
    print(body if metrics else json.dumps(json.loads(body), indent=2), end="" if metrics else "\n")
    return 0
