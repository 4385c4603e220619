"""The Eclipse Paho MQTT 3.1.1 interoperability suite against our broker and mosquitto, over mTLS.

    python -m tests.conformance.paho                 # ours and mosquitto, side by side
    python -m tests.conformance.paho --broker ours

The suite (``interoperability/client_test.py`` of github.com/eclipse/paho.mqtt.testing) is
fetched, never committed. It is looked for in:

1. ``$PAHO_MQTT_TESTING``: a checkout of that repository, or its git directory;
2. ``tests/conformance/.cache/paho.mqtt.testing`` (gitignored), filled by ``git clone`` when absent.

Without it the runner says so and exits 3 (the pytest wrapper skips). The suite file is
never changed on disk: the runner imports it in a child process and patches, at import:

* socket creation in the suite's client: every connection is TLS 1.3 with the client
  certificate of its client id (``myclientid``, ``myclientid2``, the zero-length id);
* the client id of the suite's clean-up helper, ``"clean retained"``: a space is no valid
  device identity (identities become topic levels), so it connects as ``clean-retained``.

Both main clients have ``deny subscribe test/nosubscribe`` (the suite's subscribe-failure
test). Exit code 0 when all 10 passed against ours, 1 otherwise, 3 when the suite is unavailable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_URL = "https://github.com/eclipse/paho.mqtt.testing"
CACHE = Path(__file__).resolve().parent / ".cache" / "paho.mqtt.testing"
ROOT = Path(__file__).resolve().parents[2]

# client id in the suite -> identity of its certificate
IDENTITIES = {"myclientid": "myclientid", "myclientid2": "myclientid2", "clean retained": "clean-retained",
              "": "paho-anonymous"}
CLEANUP_ID = "clean retained"
SUITE_TESTS = 10

ACL = """\
version: 1
attributes: [site, line]
roles:
  sensor:
    - "allow both #"
devices:
  myclientid:
    - deny subscribe test/nosubscribe
  myclientid2:
    - deny subscribe test/nosubscribe
"""


class SuiteUnavailable(Exception):
    """The suite could not be found or fetched; the text says where it was looked for."""


# -- finding the suite ---------------------------------------------------------------------


def _export_git_dir(git_dir: Path, out: Path) -> Path:
    """``git archive`` of HEAD's interoperability/ from a (bare) git directory into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "suite.tar"
        subprocess.run(["git", "--git-dir", str(git_dir), "archive", "-o", str(archive), "HEAD", "interoperability"],
                       check=True, capture_output=True, timeout=60)
        with tarfile.open(archive) as tar:
            tar.extractall(out, filter="data")
    return out


def locate_suite() -> Path:
    """The directory holding ``interoperability/client_test.py``; raises SuiteUnavailable."""
    tried = []
    env = os.environ.get("PAHO_MQTT_TESTING")
    if env:
        path = Path(env)
        if (path / "interoperability" / "client_test.py").is_file():
            return path
        if (path / "HEAD").is_file() or (path / ".git").is_dir():  # a git dir: export HEAD into the cache
            git_dir = path / ".git" if (path / ".git").is_dir() else path
            try:
                return _export_git_dir(git_dir, CACHE)
            except (subprocess.SubprocessError, OSError, tarfile.TarError) as exc:
                tried.append(f"$PAHO_MQTT_TESTING={env}: git archive failed: {exc}")
        else:
            tried.append(f"$PAHO_MQTT_TESTING={env}: no interoperability/client_test.py there")
    if (CACHE / "interoperability" / "client_test.py").is_file():
        return CACHE
    if shutil.which("git") is None:
        tried.append("git is not installed, so it cannot be cloned")
    else:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["git", "clone", "--depth", "1", REPO_URL, str(CACHE)], capture_output=True,
                                text=True, timeout=120, check=False, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
        if result.returncode == 0 and (CACHE / "interoperability" / "client_test.py").is_file():
            return CACHE
        shutil.rmtree(CACHE, ignore_errors=True)
        tried.append(f"git clone {REPO_URL} failed: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
    raise SuiteUnavailable("the Paho interoperability suite is not available: " + "; ".join(tried)
                           + f". Set PAHO_MQTT_TESTING to a checkout of {REPO_URL}.")


# -- credentials and brokers ------------------------------------------------------------------


def make_credentials(directory: Path) -> Path:
    from gateway_agent.pki import init_dev

    init_dev(directory, device_ids=sorted(set(IDENTITIES.values())), force=True)
    (directory / "acl.yaml").write_text(ACL)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode}: {log.read_text()[-1500:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"broker did not listen on {port}: {log.read_text()[-1500:]}")
        time.sleep(0.05)


@contextlib.contextmanager
def running_broker(kind: str, certs: Path) -> Iterator[int]:
    port = free_port()
    log = certs / f"{kind}.log"
    if kind == "ours":
        config = certs / "broker.yaml"
        config.write_text(
            f"listener:\n  bind: 127.0.0.1:{port}\n  certfile: {certs / 'broker.crt'}\n"
            f"  keyfile: {certs / 'broker.key'}\n  client_ca: {certs / 'ca-chain.pem'}\n"
            f"registry: {certs / 'registry.yaml'}\nacl: {certs / 'acl.yaml'}\n"
            # the suite's ACL grants every topic, command topics included; no operators exist here
            "commands: disabled\n")
        script = Path(sys.executable).with_name("edge-broker")
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "broker_plugins.cli"]
        cmd += ["run", "-c", str(config)]
    elif kind == "mosquitto":
        acl = certs / "mosquitto.acl"
        acl.write_text("".join(
            f"user {identity}\n" + ("topic deny test/nosubscribe\n" if identity.startswith("myclientid") else "")
            + "topic readwrite #\n\n" for identity in sorted(set(IDENTITIES.values()))))
        config = certs / "mosquitto.conf"
        config.write_text(
            f"listener {port} 127.0.0.1\ncafile {certs / 'ca-chain.pem'}\ncertfile {certs / 'broker.crt'}\n"
            f"keyfile {certs / 'broker.key'}\nrequire_certificate true\nuse_identity_as_username true\n"
            f"tls_version tlsv1.3\nacl_file {acl}\nlog_type none\n"
            + ("user root\n" if os.geteuid() == 0 else ""))  # as root it would drop to 'mosquitto': 0600 keys
        cmd = ["mosquitto", "-c", str(config)]
    else:
        raise ValueError(kind)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, cwd=ROOT)
    try:
        _wait_listening(proc, port, log)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run_suite(suite: Path, port: int, certs: Path, timeout: float = 300) -> dict[str, bool]:
    """Run the suite in a child process; {test name: passed}."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.conformance.paho", "--child", "--suite", str(suite), "--port", str(port),
         "--certs", str(certs)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    outcomes: dict[str, bool] = {}
    for line in result.stdout.splitlines():
        if line.startswith("PAHO-RESULT "):
            record = json.loads(line.removeprefix("PAHO-RESULT "))
            outcomes[record["test"]] = record["passed"]
    if not outcomes:
        raise RuntimeError(f"the suite ran no test (exit {result.returncode}):\n{result.stdout[-3000:]}"
                           f"\n{result.stderr[-3000:]}")
    return outcomes


# -- the child: the suite, imported and wrapped in mTLS ---------------------------------------------


def _child(suite: Path, port: int, certs: Path) -> int:
    import unittest

    sys.path.insert(0, str(suite / "interoperability"))
    import mqtt.clients.V311 as v311
    import mqtt.clients.V311.main as client_main

    chain = certs / "ca-chain.pem"
    current: dict[str, str] = {"id": ""}

    def context_for(client_id: str) -> ssl.SSLContext:
        identity = IDENTITIES[client_id]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cafile=chain)
        ctx.load_cert_chain(certs / "devices" / f"{identity}.crt", certs / "devices" / f"{identity}.key")
        return ctx

    class TlsSocket:
        """What the suite's client sees as a socket: TCP connect plus the TLS handshake with the
        certificate of the client id being connected.

        The suite's client reads in one thread and writes in two (its receiver sends PUBACKs),
        which a plain socket allows and a TLS connection does not: one OpenSSL connection used
        from two threads at once corrupts its records (``DECRYPTION_FAILED_OR_BAD_RECORD_MAC``,
        seen here). After the handshake the TLS socket is non-blocking and every TLS call holds
        one lock; waiting for the network happens outside it, with the client's timeout.
        """

        def __init__(self, family: int, kind: int) -> None:
            self._raw = socket.socket(family, kind)
            self._timeout: float | None = None
            self._tls: ssl.SSLSocket | None = None
            self._lock = threading.Lock()

        def settimeout(self, value: float | None) -> None:
            self._timeout = value
            if self._tls is None:
                self._raw.settimeout(value)

        def connect(self, address: tuple[str, int]) -> None:
            self._raw.settimeout(10)
            self._raw.connect(address)
            self._tls = context_for(current["id"]).wrap_socket(self._raw, server_hostname="localhost")
            self._tls.setblocking(False)

        def _wait(self, *, write: bool) -> None:
            fd = self._tls or self._raw  # wrap_socket took the descriptor over
            ready = select.select([], [fd], [], self._timeout) if write else select.select([fd], [], [], self._timeout)
            if not any(ready):
                raise TimeoutError("timed out")

        def recv(self, size: int) -> bytes:
            tls = self._tls
            if tls is None:
                return self._raw.recv(size)
            while True:
                with self._lock:
                    try:
                        return tls.recv(size)
                    except ssl.SSLWantReadError:
                        pass
                self._wait(write=False)

        def send(self, data: bytes) -> int:
            tls = self._tls
            if tls is None:
                return self._raw.send(data)
            view = memoryview(data)
            while view:
                with self._lock:
                    try:
                        view = view[tls.send(view):]
                        continue
                    except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                        pass
                self._wait(write=True)
            return len(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._tls or self._raw, name)

    class SocketModule:
        """``socket`` as the suite's client module sees it: only ``socket()`` is ours."""

        socket = TlsSocket

        def __getattr__(self, name: str) -> Any:
            return getattr(socket, name)

    original_connect = client_main.Client.connect
    original_init = client_main.Client.__init__

    def init(self: Any, clientid: Any) -> None:
        text = clientid.decode("utf-8") if isinstance(clientid, bytes) else clientid
        if text == CLEANUP_ID:
            clientid = IDENTITIES[CLEANUP_ID].encode("utf-8")
        original_init(self, clientid)

    def connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        cid = self.clientid.decode("utf-8") if isinstance(self.clientid, bytes) else self.clientid
        current["id"] = next((k for k, v in IDENTITIES.items() if v == cid), cid)
        return original_connect(self, *args, **kwargs)

    client_main.socket = SocketModule()  # type: ignore[assignment]
    client_main.Client.__init__ = init  # type: ignore[method-assign]
    client_main.Client.connect = connect  # type: ignore[method-assign]
    assert v311.Client is client_main.Client

    import client_test

    client_test.host, client_test.port = "localhost", port
    client_test.topics = ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")
    client_test.wildtopics = ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")
    client_test.nosubscribe_topics = ("test/nosubscribe",)

    class Reporter(unittest.TextTestResult):
        def _report(self, test: unittest.TestCase, passed: bool) -> None:
            name = test.id().rsplit(".", 1)[-1]
            print("PAHO-RESULT " + json.dumps({"test": name, "passed": passed}), flush=True)

        def addSuccess(self, test: unittest.TestCase) -> None:
            super().addSuccess(test)
            self._report(test, True)

        def addFailure(self, test: unittest.TestCase, err: Any) -> None:
            super().addFailure(test, err)
            self._report(test, False)

        def addError(self, test: unittest.TestCase, err: Any) -> None:
            super().addError(test, err)
            if isinstance(test, unittest.TestCase):
                self._report(test, False)
            else:  # setUpClass failed: every test of the class fails
                for name in unittest.TestLoader().getTestCaseNames(client_test.Test):
                    print("PAHO-RESULT " + json.dumps({"test": name, "passed": False}), flush=True)

    tests = unittest.TestLoader().loadTestsFromTestCase(client_test.Test)
    outcome = unittest.TextTestRunner(resultclass=Reporter, verbosity=2, stream=sys.stderr).run(tests)
    return 0 if outcome.wasSuccessful() else 1


# -- command line -------------------------------------------------------------------------------


def print_outcomes(kind: str, outcomes: dict[str, bool]) -> None:
    passed = sum(outcomes.values())
    print(f"{kind}: {passed}/{len(outcomes)} passed")
    for name, ok in sorted(outcomes.items()):
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Paho MQTT 3.1.1 interoperability suite over mTLS")
    parser.add_argument("--broker", choices=["ours", "mosquitto", "both"], default="both")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--suite", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--certs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.suite, args.port, args.certs)
    try:
        suite = locate_suite()
    except SuiteUnavailable as exc:
        print(f"skipped: {exc}")
        return 3
    kinds = ["ours", "mosquitto"] if args.broker == "both" else [args.broker]
    if "mosquitto" in kinds and shutil.which("mosquitto") is None:
        print("mosquitto is not installed: running against ours only")
        kinds.remove("mosquitto")
    ours_ok = True  # the exit code is ours alone: mosquitto's figure is for comparison
    with tempfile.TemporaryDirectory() as tmp:
        certs = make_credentials(Path(tmp))
        for kind in kinds:
            with running_broker(kind, certs) as port:
                outcomes = run_suite(suite, port, certs)
            print_outcomes(kind, outcomes)
            if kind == "ours":
                ours_ok = all(outcomes.values()) and len(outcomes) == SUITE_TESTS
    return 0 if ours_ok else 1


if __name__ == "__main__":
    sys.exit(main())
