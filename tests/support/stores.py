"""The machine's shared PostgreSQL and Redis, one private corner per test.

The URLs come from ``EDGE_TEST_POSTGRES_URL`` and ``EDGE_TEST_REDIS_URL`` (defaults: the
PostgreSQL and Redis this machine and CI start on loopback). Every test gets its own
PostgreSQL schema or Redis key prefix, dropped afterwards, so parallel runs never meet.
An unreachable store fails the test loudly: CI provides both, so a skip would hide a gap.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
import redis
from psycopg import sql

PG_URL = os.environ.get("EDGE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("EDGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unique_name(kind: str) -> str:
    return f"t_{kind}_{os.getpid()}_{secrets.token_hex(4)}"


def _pg_admin() -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {PG_URL} is unreachable ({exc}); CI provides it: start it or set "
                    "EDGE_TEST_POSTGRES_URL", pytrace=False)


@contextmanager
def pg_schema() -> Iterator[str]:
    """An inventory URL (``...?schema=t_...``) for a schema that exists only for this test."""
    schema = unique_name("inv")
    admin = _pg_admin()
    try:
        yield f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}&application_name={schema}"
    finally:
        # Sessions a test left behind (a killed agent) must not hold locks on the schema.
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                      "AND application_name = %s", (schema,))
        admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        admin.close()


def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {REDIS_URL} is unreachable ({exc}); CI provides it: start it or set "
                    "EDGE_TEST_REDIS_URL", pytrace=False)
    return client


@contextmanager
def redis_prefix() -> Iterator[str]:
    """A replay-store key prefix of this test; its keys are deleted afterwards."""
    prefix = unique_name("replay")
    client = redis_client()
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match=f"{{{prefix}}}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OwnRedis:
    """A private ``redis-server`` on a free loopback port, to stop and start at will.

    (The machine's shared Redis is never stopped: outages are staged on this one.)
    """

    def __init__(self, directory: str, *extra: str) -> None:
        import subprocess

        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                      "--appendonly", "no", "--dir", directory, *extra]
        self._popen: subprocess.Popen[bytes] | None = None
        self._subprocess = subprocess

    def start(self) -> OwnRedis:
        import time

        self._popen = self._subprocess.Popen(self._args, stdout=self._subprocess.DEVNULL,
                                             stderr=self._subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or self._popen.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)
        client.close()
        return self

    def kill(self) -> None:
        """SIGKILL: the store vanishes with everything in memory."""
        if self._popen is not None and self._popen.poll() is None:
            self._popen.kill()
            self._popen.wait(timeout=10)
        self._popen = None

    stop = kill


def check_reachable() -> int:
    """``python -m tests.support.stores``: say which stores the suite will use; 1 if one is missing."""
    missing = 0
    try:
        with psycopg.connect(PG_URL, connect_timeout=5) as conn:
            version = conn.execute("SHOW server_version").fetchone()
            print(f"PostgreSQL {version[0] if version else '?'} at {PG_URL}")
    except psycopg.Error as exc:
        print(f"PostgreSQL at {PG_URL} is unreachable: {exc}".strip(), file=sys.stderr)
        missing = 1
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
        print(f"Redis {client.info('server')['redis_version']} at {REDIS_URL}")
        client.close()
    except redis.RedisError as exc:
        print(f"Redis at {REDIS_URL} is unreachable: {exc}", file=sys.stderr)
        missing = 1
    if missing:
        print("the PostgreSQL and Redis tests need both (CI provides them); set EDGE_TEST_POSTGRES_URL / "
              "EDGE_TEST_REDIS_URL to point elsewhere", file=sys.stderr)
    return missing


if __name__ == "__main__":
    sys.exit(check_reachable())
