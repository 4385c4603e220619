"""Logging for the daemons and CLIs: every line on stderr is one JSON object.

structlog events and the standard library's records (amqtt, asyncio, warnings, uncaught
exceptions) all pass through one ``ProcessorFormatter`` with the same processor chain:
context variables (peer, device of the connection being served), level, logger name,
UTC timestamp, then ``redact_secrets``. A console renderer replaces the JSON renderer only
when stderr is a terminal (a human at a shell); under systemd, Docker or a pipe the
output is always JSON lines, so ``journalctl -o cat | jq`` works on every line.

Only programs call ``configure_logging``; the libraries just log.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["REDACTED", "bind_connection", "configure_logging", "redact_secrets", "reset_logging",
           "stderr_is_console"]

REDACTED: Final = "[redacted]"

# Field names whose value is a secret whatever it holds.
_SECRET_NAME: Final = re.compile(
    r"(password|passphrase|passwd|secret|token|authorization|cookie|private[_-]?key|api[_-]?key|credential)", re.I
)
# Secrets that may hide inside free text (a detail, an exception message, an amqtt record).
_PEM_PRIVATE: Final = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.S)
_BEARER: Final = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")
_ASSIGNED: Final = re.compile(r"(?i)\b((?:password|passwd|passphrase|secret|token)\s*[=:]\s*)[^\s,;'\"]+")
_handler: logging.Handler | None = None
# tracebacks as data, never with the frames' local variables (they may hold keys)
_exception_as_data: Final = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)
# Loggers of libraries we use whose INFO lines are noise for an operator.
_QUIET: Final = ("amqtt", "transitions", "asyncio", "paho")


def _scrub(text: str) -> str:
    text = _PEM_PRIVATE.sub(REDACTED, text)
    text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
    return _ASSIGNED.sub(lambda m: m.group(1) + REDACTED, text)


def _redact(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return _scrub(value)
    if depth > 4:
        return value
    if isinstance(value, Mapping):
        return {k: REDACTED if isinstance(k, str) and _SECRET_NAME.search(k) else _redact(v, depth + 1)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(item, depth + 1) for item in value]
    if isinstance(value, bytes):
        return _scrub(value.decode("utf-8", "replace"))
    return value


def redact_secrets(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """A processor: secret-named fields become ``[redacted]``; PEM private keys, bearer tokens
    and ``password=...`` inside any text are cut out. Runs last before rendering, on every record."""
    for key in list(event_dict):
        value = event_dict[key]
        if key.startswith("_"):
            continue
        if _SECRET_NAME.search(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact(value)
    return event_dict


def _rename_event_for_stdlib(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """A stdlib record's message is its ``event``; drop formatter internals."""
    event_dict.pop("color_message", None)
    return event_dict


def stderr_is_console(stream: TextIO | None = None) -> bool:
    target = stream if stream is not None else sys.stderr
    try:
        return bool(target.isatty())
    except (AttributeError, ValueError):
        return False


def bind_connection(**fields: str | None) -> None:
    """Bind per-connection fields (``peer``, ``device``) to every line logged from now on in this task.

    Call it at the top of the task that serves one connection: each asyncio task runs in its
    own copy of the context variables (and tasks it starts copy it in turn), so the fields
    reach that connection's lines only, never another's.
    """
    structlog.contextvars.bind_contextvars(**{k: v for k, v in fields.items() if v is not None})


def configure_logging(*, level: str = "INFO", stream: TextIO | None = None, console: bool | None = None) -> None:
    """Route structlog and the standard library to ``stream`` (stderr), one JSON object a line.

    ``console`` forces or forbids the human renderer; by default it is used only when the
    stream is a terminal.
    """
    out: TextIO = stream if stream is not None else sys.stderr
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    use_console = stderr_is_console(out) if console is None else console
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        structlog.stdlib.ExtraAdder(),
    ]
    renderer: Processor
    if use_console:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer(default=str)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _rename_event_for_stdlib,
            *([] if use_console else [_exception_as_data]),
            redact_secrets,
            renderer,
        ],
    )
    global _handler  # noqa: PLW0603 - one handler of ours on the root logger, replaced on reconfiguration
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    for other in list(root.handlers):
        if type(other) is logging.StreamHandler:  # a basicConfig() plain-text handler: it would break the JSON
            root.removeHandler(other)
    _handler = logging.StreamHandler(out)
    _handler.setFormatter(formatter)
    root.addHandler(_handler)
    root.setLevel(numeric)
    for name in _QUIET:
        logging.getLogger(name).setLevel(numeric if numeric <= logging.DEBUG else logging.WARNING)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger, so JSON too
    _route_uncaught()


def reset_logging() -> None:
    """Undo ``configure_logging`` (for tests that configure it in-process)."""
    global _handler  # noqa: PLW0603
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
        _handler = None
    logging.captureWarnings(False)
    sys.excepthook = sys.__excepthook__
    threading.excepthook = threading.__excepthook__
    structlog.reset_defaults()


def _route_uncaught() -> None:
    """An uncaught exception is one JSON line too (with the traceback as data), never raw text."""
    log = logging.getLogger("uncaught")

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        log.critical("uncaught_exception", exc_info=(exc_type, exc, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit or args.exc_value is None:
            return
        log.critical("uncaught_thread_exception", exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
                     extra={"thread": getattr(args.thread, "name", None)})

    sys.excepthook = hook
    threading.excepthook = thread_hook
