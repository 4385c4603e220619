"""The status endpoint of a component: ``/healthz``, ``/readyz``, ``/status`` and ``/metrics``.

- ``/healthz``: live. 200 ``ok`` whenever the event loop answers.
- ``/readyz``: ready. 200 when every readiness check passes, else 503; the JSON body
  lists each check with its detail. Checks are plain callables that return ``None`` when
  ready or raise ``NotReady(why)``; any other exception counts as not ready (fail closed).
  Before the component calls ``mark_started()`` the answer is 503 ``starting``.
- ``/status``: the component's JSON status; ``/metrics``: Prometheus text with HELP/TYPE.

It answers GET only, reads at most one small request head (8 KiB, 5 s), and by default
binds to loopback. Beyond loopback the settings loader demands protection: mTLS with a
scraper certificate (``status.tls``) or a bearer token read from a file
(``status.bearer_token_file``; then ``/healthz`` alone stays open, for container health
checks, and says nothing but ``ok``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from edge_core import binds, yamlsrc
from edge_core.binds import is_loopback
from edge_core.errors import ConfigError

__all__ = [
    "NotReady",
    "ReadinessCheck",
    "StatusServer",
    "StatusSettings",
    "StatusTls",
    "is_loopback",
    "parse_status_section",
    "read_bearer_token",
    "split_bind",
]

_MAX_REQUEST: Final = 8192
_MIN_TOKEN: Final = 16
_REASONS: Final = {200: "OK", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
                   503: "Service Unavailable"}


class NotReady(Exception):
    """Raised by a readiness check: the component is up but must not get traffic yet."""


ReadinessCheck = Callable[[], None]


def split_bind(value: str, *, source: str, line: int | None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to (host, port), or a ``ConfigError`` naming the file and line."""
    host, port = binds.split_bind(value)
    if port is None:
        raise ConfigError(f"bind {value!r} must be host:port", source=source, line=line)
    if not 0 <= port <= 65535:
        raise ConfigError(f"bind {value!r}: port out of range", source=source, line=line)
    return host, port


@dataclass(frozen=True)
class StatusTls:
    """mTLS for the endpoint: our server certificate, and the CA that issued the scrapers' certificates."""

    certfile: Path
    keyfile: Path
    client_ca: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(self.certfile, self.keyfile)
        ctx.load_verify_locations(cafile=self.client_ca)
        return ctx


@dataclass(frozen=True)
class StatusSettings:
    host: str
    port: int
    bearer_token_file: Path | None = None
    tls: StatusTls | None = None

    @property
    def protected(self) -> bool:
        return self.bearer_token_file is not None or self.tls is not None


def parse_status_section(sec: yamlsrc.Section, *, base_dir: Path, default_bind: str) -> StatusSettings:
    """The ``status:`` section of a component's settings (the same keys for broker and agent)."""
    bind = sec.take("bind", str, default_bind)
    host, port = split_bind(bind, source=sec.source, line=sec.line_of("bind"))
    token_raw = sec.take("bearer_token_file", str, None)
    token = (base_dir / token_raw).resolve() if token_raw else None
    tls = None
    tsec = sec.sub("tls")
    if tsec is not None:
        def path(key: str) -> Path:
            return (base_dir / tsec.take(key, str, required=True)).resolve()

        tls = StatusTls(certfile=path("certfile"), keyfile=path("keyfile"), client_ca=path("client_ca"))
        tsec.done()
    sec.done()
    settings = StatusSettings(host=host, port=port, bearer_token_file=token, tls=tls)
    if not is_loopback(host) and not settings.protected:
        raise sec.error(
            "bind",
            f"status.bind {bind} must be a loopback address unless the endpoint is protected: set "
            "status.bearer_token_file (a file holding the scrapers' bearer token) or status.tls (certfile, "
            "keyfile, client_ca: scrapers present a client certificate), or bind to 127.0.0.1",
        )
    return settings


def read_bearer_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the status bearer token: {getattr(exc, 'strerror', None) or exc}",
                          source=str(path), hint="create the file (one line, at least 16 characters)") from exc
    if len(token) < _MIN_TOKEN or any(c.isspace() for c in token):
        raise ConfigError(f"the status bearer token must be one word of at least {_MIN_TOKEN} characters",
                          source=str(path), hint="e.g. `openssl rand -hex 32 > FILE`")
    return token


class StatusServer:
    def __init__(self, settings: StatusSettings, *, status: Callable[[], dict[str, Any]],
                 metrics: Callable[[], bytes]) -> None:
        self.settings = settings
        self.host, self.port = settings.host, settings.port
        self._status = status
        self._metrics = metrics
        self._checks: dict[str, ReadinessCheck] = {}
        self._started = False
        self._token: bytes | None = None
        self._server: asyncio.Server | None = None

    def add_readiness_check(self, name: str, check: ReadinessCheck) -> None:
        self._checks[name] = check

    def mark_started(self) -> None:
        self._started = True

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Every check's answer; ready only if the component started and every check passed."""
        results: dict[str, Any] = {}
        ready = self._started
        if not self._started:
            results["started"] = {"ok": False, "detail": "starting"}
        for name, check in self._checks.items():
            try:
                check()
            except NotReady as exc:
                results[name] = {"ok": False, "detail": str(exc)}
                ready = False
            except Exception as exc:  # noqa: BLE001 - a broken check means not ready, and says why
                results[name] = {"ok": False, "detail": f"check failed: {type(exc).__name__}: {exc}"}
                ready = False
            else:
                results[name] = {"ok": True}
        return ready, results

    async def start(self) -> None:
        s = self.settings
        if s.bearer_token_file is not None:
            self._token = read_bearer_token(s.bearer_token_file).encode()
        ssl_context = s.tls.server_context() if s.tls is not None else None
        # the stream limit caps the request head: a longer one raises LimitOverrunError
        self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True,
                                                  limit=_MAX_REQUEST, ssl=ssl_context,
                                                  ssl_handshake_timeout=5 if ssl_context else None)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _authorized(self, head: bytes) -> bool:
        if self._token is None:
            return True
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"authorization":
                scheme, _, given = value.strip().partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._token)
        return False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            method, target, _ = head.split(b"\r\n", 1)[0].decode("ascii").split(" ", 2)
            path = target.split("?", 1)[0]
            if method != "GET":
                await self._reply(writer, 405, "text/plain", b"GET only\n")
            elif path == "/healthz":
                await self._reply(writer, 200, "text/plain", b"ok\n")
            elif not self._authorized(head):
                await self._reply(writer, 401, "text/plain", b"bearer token required\n",
                                  extra="WWW-Authenticate: Bearer\r\n")
            elif path == "/readyz":
                ready, checks = self.readiness()
                body = json.dumps({"ready": ready, "checks": checks}, indent=2) + "\n"
                await self._reply(writer, 200 if ready else 503, "application/json", body.encode())
            elif path == "/status":
                body = json.dumps(self._status(), indent=2) + "\n"
                await self._reply(writer, 200, "application/json", body.encode())
            elif path == "/metrics":
                await self._reply(writer, 200, "text/plain; version=0.0.4; charset=utf-8", self._metrics())
            else:
                await self._reply(writer, 404, "text/plain", b"try /healthz, /readyz, /status or /metrics\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError,
                UnicodeDecodeError, ConnectionError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
                await writer.wait_closed()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, code: int, ctype: str, body: bytes, *, extra: str = "") -> None:
        writer.write(
            f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n".encode("ascii") + body
        )
        await writer.drain()
