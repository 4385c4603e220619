"""The conventions both command lines (``edge-broker``, ``gateway-agent``) share.

Exit codes (the one table; docs/ops.md repeats it):

====  ====================  =====================================================================
code  name                  meaning
====  ====================  =====================================================================
0     ``EXIT_OK``           done; for a check: clean; for ``acl explain``: allowed
1     ``EXIT_REFUSED``      the answer is no: a file refused, a decision denied, a command
                            rejected, a CRL source failed, an endpoint not ready, zone
                            violations found, a firmware rollout halted
2     ``EXIT_USAGE``        bad command line (argparse)
3     ``EXIT_WARNINGS``     a check passed with more warnings than ``--max-warnings``
4     ``EXIT_CONFIG``       a config or input file is missing, unreadable or invalid
5     ``EXIT_UNAVAILABLE``  something we need is not there: an endpoint unreachable, a port in
                            use, no answer in time
70    ``EXIT_INTERNAL``     a bug: one line, and ``-v`` shows the traceback
130   ``EXIT_INTERRUPTED``  Ctrl-C
====  ====================  =====================================================================

Errors are one line on stderr (``error: what (fix: how)``), never a traceback unless ``-v``.
The daemons' verbs (``run``) write every stderr line as JSON when stderr is not a terminal
(systemd, Docker, a pipe), their start-up errors included (``cli.error`` with ``detail``,
``hint`` and ``exit``), so ``journalctl -o cat | jq`` reads all of it. A closed stdout
(``--json | head``) drops the rest of the output quietly; the command still ends with its
own exit code (a failed check that nobody reads to the end is still a failed check).

Config discovery: ``-c FILE`` on every verb that reads a config (all but ``pki init-dev`` and
``pki pin``, which read none); without it ``$EDGE_GATEWAY_CONFIG_DIR/<name>``, else
``/etc/edge-gateway/<name>``, and the command says which file it used. Never the working
directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TextIO, cast

import structlog

from edge_core.errors import ConfigError, EdgeSecurityError, FetchError
from edge_runtime.logsetup import configure_logging, stderr_is_console
from edge_runtime.status_http import StatusSettings, read_bearer_token
from edge_runtime.version import DISTRIBUTION, version

__all__ = [
    "CONFIG_DIR",
    "CONFIG_DIR_ENV",
    "EXIT_CODES_HELP",
    "EXIT_CONFIG",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "EXIT_WARNINGS",
    "Unavailable",
    "add_config_argument",
    "add_status_arguments",
    "add_version_argument",
    "parse_args",
    "print_json",
    "print_status",
    "report",
    "resolve_config",
    "run_daemon",
    "run_handler",
]

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
EXIT_WARNINGS: Final = 3
EXIT_CONFIG: Final = 4
EXIT_UNAVAILABLE: Final = 5
EXIT_INTERNAL: Final = 70
EXIT_INTERRUPTED: Final = 130

EXIT_CODES_HELP: Final = (
    "exit codes: 0 ok/allowed, 1 refused/denied/rejected/not ready, 2 usage, 3 more warnings than "
    "--max-warnings, 4 config or input file missing or invalid, 5 unavailable (unreachable, port in use, "
    "timeout), 70 internal error (-v for the traceback), 130 interrupted"
)

CONFIG_DIR: Final = Path("/etc/edge-gateway")
_FILE_ERRNOS: Final = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR,
                                 errno.ELOOP, errno.ENAMETOOLONG})
CONFIG_DIR_ENV: Final = "EDGE_GATEWAY_CONFIG_DIR"


class Unavailable(EdgeSecurityError):
    """Something the command needs is not there (endpoint down, port taken, no answer in time): exit 5."""


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()} ({DISTRIBUTION})")


def add_config_argument(parser: argparse.ArgumentParser, name: str, *, what: str) -> None:
    """``-c/--config``; the default is found by ``resolve_config`` (never the working directory)."""
    parser.add_argument(
        "-c", "--config", type=Path, default=None, metavar="FILE",
        help=f"{what} (default: ${CONFIG_DIR_ENV}/{name}, else {CONFIG_DIR / name})",
    )
    parser.set_defaults(config_name=name)


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    """``--metrics`` / ``--ready`` / ``--health`` for a ``status`` verb (``args.path``, default ``/status``)."""
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--metrics", action="store_const", dest="path", const="/metrics",
                      help="Prometheus text (/metrics)")
    what.add_argument("--ready", action="store_const", dest="path", const="/readyz",
                      help="readiness with every check (/readyz); exit 1 when not ready")
    what.add_argument("--health", action="store_const", dest="path", const="/healthz",
                      help="liveness (/healthz), for container health checks")
    parser.set_defaults(path="/status")


def resolve_config(given: Path | None, name: str) -> Path:
    """The config file to use: ``-c`` as given, else the deployed one, saying which."""
    if given is not None:
        return given
    directory = Path(os.environ[CONFIG_DIR_ENV]) if os.environ.get(CONFIG_DIR_ENV) else CONFIG_DIR
    path = directory / name
    if not path.is_file():
        raise ConfigError(
            f"no -c/--config given, and {path} does not exist",
            hint=f"pass -c FILE, or install the config as {path} (examples: configs/{name})",
        )
    _note(f"no -c/--config given: using {path}", event="cli.config_default", config=str(path))
    return path


_as_log = False  # set by run_handler for daemon verbs: their stderr is a JSON log stream


def _note(text: str, *, event: str, **fields: Any) -> None:
    if _as_log and not stderr_is_console():
        structlog.get_logger("cli").info(event, detail=text, **fields)
    else:
        print(f"note: {text}", file=sys.stderr)


def report(message: str, *, code: int, hint: str | None = None) -> int:
    """One error line on stderr (a JSON line for a daemon verb off a terminal); returns ``code``."""
    if _as_log and not stderr_is_console():
        structlog.get_logger("cli").error("cli.error", detail=message, hint=hint, exit=code)
    else:
        text = f"error: {message}" + (f" (fix: {hint})" if hint else "")
        print(text, file=sys.stderr)
    return code


def _code_of(exc: EdgeSecurityError) -> int:
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, Unavailable | FetchError):
        return EXIT_UNAVAILABLE
    return EXIT_REFUSED


def _one_line(exc: EdgeSecurityError) -> tuple[str, str | None]:
    text = " ".join(str(exc).split())
    hint = exc.hint or None
    if isinstance(exc, ConfigError) and hint == ConfigError.hint:
        # that default speaks of a running daemon's reload; a command (or a start) has no last good version
        hint = "correct the file, then run the command again"
    return text, hint


def run_handler(args: argparse.Namespace) -> int:
    """Run ``args.func(args)`` under the conventions above."""
    global _as_log  # noqa: PLW0603 - one process runs one command
    verbose = bool(getattr(args, "verbose", False))
    _as_log = bool(getattr(args, "daemon", False))
    configure_logging(level="DEBUG" if verbose else "INFO")
    name = getattr(args, "config_name", None)
    try:
        with _stdout_guard():
            if name is not None:
                args.config = resolve_config(args.config, name)
            return int(args.func(args))
    except EdgeSecurityError as exc:
        if verbose:
            raise
        message, hint = _one_line(exc)
        return report(message, code=_code_of(exc), hint=hint)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except OSError as exc:
        if verbose:
            raise
        if exc.filename is not None and exc.errno in _FILE_ERRNOS:
            return report(f"cannot use {exc.filename}: {exc.strerror}", code=EXIT_CONFIG,
                          hint="check the path and its permissions")
        return report(" ".join(str(exc).split()), code=EXIT_UNAVAILABLE,
                      hint="is the service up, the address right, the port free?")
    except Exception as exc:
        if verbose:
            raise
        return report(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
                      code=EXIT_INTERNAL, hint="rerun with -v for the traceback and report it")


def run_daemon(main: Coroutine[Any, Any, None], *, config: Path, use_uvloop: bool = False) -> None:
    """Run a daemon's main coroutine to its end; a port already in use becomes ``Unavailable`` (exit 5)."""
    try:
        if use_uvloop:
            import uvloop

            uvloop.run(main)
        else:
            asyncio.run(main)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise Unavailable(" ".join(str(exc).split()),
                              hint="another process holds that port (another broker, mosquitto?): stop it or "
                                   f"change the bind (listener.bind, status.bind, ...) in {config}") from exc
        raise


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``; ``--help`` or ``--version`` into a closed pipe exits quietly too."""
    with _stdout_guard():
        return parser.parse_args(argv)


class _GuardedStdout:
    """``sys.stdout`` while a command runs. When the reader goes away (``--json | head``), the
    rest of the output goes nowhere instead of raising ``BrokenPipeError`` mid-command, so the
    command finishes and exits with its own code."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            _drop_stdout(self._stream)
            return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            _drop_stdout(self._stream)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _stdout_guard() -> Iterator[None]:
    real = sys.stdout
    guard = _GuardedStdout(real)
    sys.stdout = cast(TextIO, guard)
    try:
        yield
    finally:
        guard.flush()  # what is still buffered, now: a closed pipe shows here, not at interpreter exit
        sys.stdout = real


def _drop_stdout(stream: TextIO) -> None:
    """The reader of our stdout went away: point it at /dev/null, so that what is still buffered
    (and anything written later) goes nowhere and the interpreter does not complain at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def print_json(value: Any, *, lines: bool = False) -> None:
    """Print a JSON document (or one object per line with ``lines``); flush so a closed pipe shows here."""
    if lines:
        for item in value:
            sys.stdout.write(json.dumps(item, sort_keys=True) + "\n")
    else:
        sys.stdout.write(json.dumps(value, indent=2) + "\n")
    sys.stdout.flush()


def fetch_status(settings: StatusSettings, path: str, *, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``path`` from a component's status endpoint; (HTTP code, body)."""
    if settings.tls is not None:
        raise ConfigError(
            "the status endpoint requires a scraper client certificate (status.tls), which this command does not hold",
            hint=f"query it with curl --cacert ... --cert ... --key ... https://{settings.host}:{settings.port}{path}",
        )
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.host, settings.host)  # noqa: S104
    host = f"[{host}]" if ":" in host else host
    url = f"http://{host}:{settings.port}{path}"
    request = urllib.request.Request(url)
    if settings.bearer_token_file is not None:
        request.add_header("Authorization", f"Bearer {read_bearer_token(settings.bearer_token_file)}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unavailable(f"status endpoint {url} unreachable: {reason}",
                          hint="is the daemon running with this config? (systemctl status ...)") from exc


def print_status(what: str, settings: StatusSettings | None, *, source: str, path: str = "/status",
                 raw: bool = False) -> int:
    """Print one endpoint of a running component. 0 on 200; 1 when it answers not ready/unhealthy."""
    if settings is None:
        raise ConfigError(f"no 'status:' section, so the {what} exposes no status endpoint", source=source,
                          hint="add 'status: {bind: 127.0.0.1:PORT}' and restart the daemon")
    code, body = fetch_status(settings, path)
    if code == 401:
        raise ConfigError(f"the {what}'s status endpoint refused our bearer token", source=source,
                          hint="status.bearer_token_file must be the file the daemon reads")
    text = body.decode("utf-8", "replace")
    if raw or not text.lstrip().startswith(("{", "[")):
        sys.stdout.write(text)
    else:
        print_json(json.loads(text))
    sys.stdout.flush()
    return EXIT_OK if code == 200 else EXIT_REFUSED
