"""CRL sync against a real HTTP server on loopback: failures keep the last good CRL."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge_core import yamlsrc
from edge_core.clock import ManualClock
from edge_core.errors import ConfigError, FetchError
from edge_core.events import SecurityEvents
from edge_core.revocation import accept_crl, issuer_key, split_crl_bundle
from gateway_agent import cli_crl
from gateway_agent.crl_sync import (
    CrlSyncer,
    FileCrlSource,
    HttpCrlSource,
    MemoryCrlSource,
    parse_crl_settings,
)
from gateway_agent.pki import IssuingCA, cert_pem, new_intermediate, new_root

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca() -> IssuingCA:
    yesterday = NOW - timedelta(days=1)
    return new_intermediate(new_root("Sync Root", yesterday), "Sync Issuing", yesterday)


def make_crl(ca: IssuingCA, number: int, serials: tuple[int, ...] = (), *,
             signer: ec.EllipticCurvePrivateKey | None = None, this_update: datetime = NOW) -> bytes:
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
               .last_update(this_update - timedelta(minutes=1))
               .next_update(this_update + timedelta(days=7))
               .add_extension(x509.CRLNumber(number), critical=False))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(this_update).build())
    return builder.sign(signer or ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


# --------------------------------------------------------------------------- a loopback CRL server


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    content_length: bool = True
    headers: dict[str, str] = field(default_factory=dict)


class CrlServer:
    """http.server in a thread; ``routes`` may be changed between syncs."""

    def __init__(self, port: int = 0) -> None:
        self.routes: dict[str, Route] = {}
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:
                outer.hits += 1
                route = outer.routes.get(self.path, Route(404, b"not found"))
                self.send_response(route.status)
                for key, value in route.headers.items():
                    self.send_header(key, value)
                if route.content_length:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                self.wfile.write(route.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def server() -> Iterator[CrlServer]:
    srv = CrlServer()
    yield srv
    srv.stop()


@dataclass
class Rig:
    syncer: CrlSyncer
    events: SecurityEvents
    targets: list[Path]
    state: Path
    clock: ManualClock


def make_rig(tmp_path: Path, ca: IssuingCA, sources: list, *, ntargets: int = 2,  # type: ignore[type-arg]
             clock: ManualClock | None = None, issuers: list[x509.Certificate] | None = None) -> Rig:
    clock = clock or ManualClock(NOW)
    events = SecurityEvents("test.crl")
    targets = [tmp_path / f"broker{i}" / "crl.pem" for i in range(ntargets)]
    state = tmp_path / "var" / "crl-state.json"
    syncer = CrlSyncer(sources, issuers or [ca.cert], targets, state, clock, events)
    return Rig(syncer, events, targets, state, clock)


def installed_number(rig: Rig, ca: IssuingCA) -> set[int]:
    """CRL numbers found in every target (all targets must agree)."""
    contents = {t.read_bytes() for t in rig.targets}
    assert len(contents) == 1, "targets differ"
    numbers = set()
    for der in split_crl_bundle(contents.pop()):
        update = accept_crl(der, issuers=[ca.cert], installed=None, now=rig.clock.now())
        numbers.add(update.installed.crl_number)
    return numbers


# --------------------------------------------------------------------------- tests


def test_installs_to_every_target_and_records_state(tmp_path: Path, ca: IssuingCA, server: CrlServer) -> None:
    server.routes["/ca.crl"] = Route(body=make_crl(ca, 3, (11, 12)))
    rig = make_rig(tmp_path, ca, [HttpCrlSource(server.url("/ca.crl"), timeout=5)], ntargets=3)
    with structlog.testing.capture_logs() as logs:
        rig.syncer.events = SecurityEvents("test.crl.capture")
        report = rig.syncer.sync_once()
    assert report.ok and report.changed
    assert [r.outcome for r in report.results] == ["installed"]
    assert installed_number(rig, ca) == {3}
    assert rig.targets[0].read_bytes().startswith(b"-----BEGIN X509 CRL-----")
    installed = [e for e in logs if e["event"] == "crl.installed"]
    assert installed and installed[0]["crl_number"] == 3 and installed[0]["count"] == 2
    state = rig.state.read_text()
    assert '"crl_number": 3' in state and '"version": 1' in state


def test_http_404_keeps_last_good(tmp_path: Path, ca: IssuingCA, server: CrlServer) -> None:
    server.routes["/ca.crl"] = Route(body=make_crl(ca, 3))
    rig = make_rig(tmp_path, ca, [HttpCrlSource(server.url("/ca.crl"), timeout=5)])
    assert rig.syncer.sync_once().ok
    del server.routes["/ca.crl"]
    report = rig.syncer.sync_once()
    assert not report.ok
    assert report.results[0].outcome == "fetch_failed" and report.results[0].reason == "http_status"
    assert rig.events.count("crl.fetch_failed", "http_status") == 1
    assert installed_number(rig, ca) == {3}


def test_unreachable_then_back(tmp_path: Path, ca: IssuingCA) -> None:
    srv = CrlServer()
    port = srv.port
    srv.routes["/ca.crl"] = Route(body=make_crl(ca, 1))
    rig = make_rig(tmp_path, ca, [HttpCrlSource(srv.url("/ca.crl"), timeout=5)])
    assert rig.syncer.sync_once().ok
    srv.stop()
    report = rig.syncer.sync_once()
    assert report.results[0].reason == "fetch_failed"
    assert rig.events.count("crl.fetch_failed", "fetch_failed") == 1
    assert installed_number(rig, ca) == {1}
    back = CrlServer(port)
    try:
        back.routes["/ca.crl"] = Route(body=make_crl(ca, 2, (99,)))
        report = rig.syncer.sync_once()
        assert report.ok and report.changed
        assert installed_number(rig, ca) == {2}
    finally:
        back.stop()


@pytest.mark.parametrize("content_length", [True, False])
def test_oversize_is_refused_while_reading(tmp_path: Path, ca: IssuingCA, server: CrlServer,
                                          content_length: bool) -> None:
    server.routes["/big.crl"] = Route(body=b"\x30" * 200_000, content_length=content_length)
    source = HttpCrlSource(server.url("/big.crl"), timeout=5, max_bytes=100_000)
    with pytest.raises(FetchError) as info:
        source.fetch()
    assert info.value.reason == "fetch_too_large"


def test_redirects_are_refused(server: CrlServer) -> None:
    server.routes["/moved"] = Route(status=302, headers={"Location": server.url("/ca.crl")})
    with pytest.raises(FetchError) as info:
        HttpCrlSource(server.url("/moved"), timeout=5).fetch()
    assert info.value.reason == "http_status" and "redirect" in str(info.value)


def test_timeout_when_the_server_never_answers() -> None:
    with socket.socket() as silent:  # listens, never accepts: connect succeeds, no answer
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/ca.crl"
        with pytest.raises(FetchError) as info:
            HttpCrlSource(url, timeout=0.2).fetch()
    assert info.value.reason == "fetch_timeout"


def test_source_url_must_be_http() -> None:
    with pytest.raises(ConfigError):
        HttpCrlSource("file:///etc/passwd")
    with pytest.raises(ConfigError):
        HttpCrlSource("ftp://host/x.crl")


def test_garbage_and_bad_signature_are_rejected_last_good_kept(tmp_path: Path, ca: IssuingCA,
                                                              server: CrlServer) -> None:
    server.routes["/ca.crl"] = Route(body=make_crl(ca, 5))
    rig = make_rig(tmp_path, ca, [HttpCrlSource(server.url("/ca.crl"), timeout=5)])
    rig.syncer.sync_once()
    server.routes["/ca.crl"] = Route(body=b"<html>captive portal</html>")
    assert rig.syncer.sync_once().results[0].reason == "crl_unparseable"
    forged = make_crl(ca, 6, signer=ec.generate_private_key(ec.SECP256R1()))
    server.routes["/ca.crl"] = Route(body=forged)
    assert rig.syncer.sync_once().results[0].reason == "crl_bad_signature"
    assert rig.events.count("crl.rejected") == 2
    assert installed_number(rig, ca) == {5}


def test_older_crl_is_refused_and_state_survives_restart(tmp_path: Path, ca: IssuingCA,
                                                         server: CrlServer) -> None:
    server.routes["/ca.crl"] = Route(body=make_crl(ca, 5, (1,)))
    rig = make_rig(tmp_path, ca, [HttpCrlSource(server.url("/ca.crl"), timeout=5)])
    rig.syncer.sync_once()
    server.routes["/ca.crl"] = Route(body=make_crl(ca, 4))
    report = rig.syncer.sync_once()
    assert report.results[0].reason == "crl_rollback"
    assert "new CRL number 4 must be >= installed 5" in report.results[0].message
    # a new agent process: anti-rollback comes from the state file
    again = make_rig(tmp_path, ca, [HttpCrlSource(server.url("/ca.crl"), timeout=5)])
    assert again.syncer.installed[issuer_key(ca.cert.subject)].crl_number == 5
    report = again.syncer.sync_once()
    assert report.results[0].reason == "crl_rollback"
    assert again.events.count("crl.rejected", "crl_rollback") == 1
    assert installed_number(again, ca) == {5}


def test_same_crl_again_is_unchanged(tmp_path: Path, ca: IssuingCA) -> None:
    crl_file = tmp_path / "usb" / "ca.crl"
    crl_file.parent.mkdir()
    crl_file.write_bytes(make_crl(ca, 2))
    rig = make_rig(tmp_path, ca, [FileCrlSource(crl_file)])
    assert rig.syncer.sync_once().changed
    before = rig.targets[0].stat().st_mtime_ns
    report = rig.syncer.sync_once()
    assert report.ok and not report.changed and report.results[0].outcome == "unchanged"
    assert rig.targets[0].stat().st_mtime_ns == before
    # a deleted target is restored from the agent's cache
    rig.targets[1].unlink()
    rig.syncer.sync_once()
    assert installed_number(rig, ca) == {2}


def test_missing_file_source_is_a_fetch_failure(tmp_path: Path, ca: IssuingCA) -> None:
    rig = make_rig(tmp_path, ca, [FileCrlSource(tmp_path / "nope.crl")])
    report = rig.syncer.sync_once()
    assert report.results[0].reason == "fetch_failed"
    assert not rig.targets[0].exists()


def test_two_issuers_share_one_bundle(tmp_path: Path, ca: IssuingCA) -> None:
    other = new_root("Second Site CA", NOW - timedelta(days=1))
    src_a, src_b = MemoryCrlSource(make_crl(ca, 3), name="a"), MemoryCrlSource(make_crl(other, 8), name="b")
    rig = make_rig(tmp_path, ca, [src_a, src_b], issuers=[ca.cert, other.cert])
    rig.syncer.sync_once()
    src_a.data = make_crl(ca, 4)
    src_b.error = FetchError("fetch_failed", "b is down")
    report = rig.syncer.sync_once()
    assert [r.outcome for r in report.results] == ["installed", "fetch_failed"]
    blocks = split_crl_bundle(rig.targets[0].read_bytes())
    numbers = {accept_crl(b, issuers=[ca.cert, other.cert], installed=None, now=NOW).installed.crl_number
               for b in blocks}
    assert numbers == {4, 8}  # b's last good CRL is kept in the bundle


def test_stale_crl_raises_an_alarm_event(tmp_path: Path, ca: IssuingCA) -> None:
    rig = make_rig(tmp_path, ca, [MemoryCrlSource(make_crl(ca, 1))])
    rig.syncer.sync_once()
    assert rig.events.count("crl.stale") == 0
    rig.clock.advance(timedelta(hours=25))  # older than max_age 24 h
    rig.syncer.sync_once()
    assert rig.events.count("crl.stale", "stale_too_old") == 1


def test_corrupt_state_refuses_to_start(tmp_path: Path, ca: IssuingCA) -> None:
    state = tmp_path / "var" / "crl-state.json"
    state.parent.mkdir()
    state.write_text("{broken")
    with pytest.raises(ConfigError, match="unreadable"):
        make_rig(tmp_path, ca, [MemoryCrlSource()])


# --------------------------------------------------------------------------- settings and CLI

SETTINGS = """\
crl:
  sources:
    - url: {url}
    - file: usb/ca.crl
  issuers: [ca.pem]
  install_targets: [out/a.pem, /tmp/abs-target.pem]
  interval: 600
  jitter: 0.2
  timeout: 3
  max_bytes: 1000000
  max_skew: 60
  staleness:
    mode: fail_closed
    max_age: 7200
"""


def _section(text: str, source: str = "agent.yaml") -> yamlsrc.Section:
    root = yamlsrc.Section(yamlsrc.load(text, source=source), source=source)
    section = root.sub("crl", required=True)
    assert section is not None
    return section


def test_parse_settings(tmp_path: Path) -> None:
    settings = parse_crl_settings(_section(SETTINGS.format(url="https://pki.example/ca.crl")), tmp_path)
    assert [s.kind for s in settings.sources] == ["url", "file"]
    assert settings.sources[1].location == str(tmp_path / "usb/ca.crl")
    assert settings.issuers == (tmp_path / "ca.pem",)
    assert settings.install_targets == (tmp_path / "out/a.pem", Path("/tmp/abs-target.pem"))
    assert settings.state_path == tmp_path / "var/crl-state.json"
    assert settings.interval == timedelta(seconds=600) and settings.jitter == 0.2
    assert settings.max_skew == timedelta(seconds=60)
    assert settings.staleness.mode == "fail_closed" and settings.staleness.max_age == timedelta(hours=2)


@pytest.mark.parametrize(("edit", "message", "line"), [
    (("  jitter: 0.2\n", "  jitter: 0.2\n  colour: red\n"), "unknown key 'colour'", 9),
    (("    - file: usb/ca.crl\n", "    - file: usb/ca.crl\n      url: http://x/y\n"), "exactly one", 4),
    (("https://pki.example/ca.crl", "ldap://pki.example/ca.crl"), "http", 3),
    (("    mode: fail_closed\n", "    mode: maybe\n"), "fail_closed", 13),
    (("  timeout: 3\n", "  timeout: -1\n"), "positive", 9),
])
def test_settings_errors_name_the_line(tmp_path: Path, edit: tuple[str, str], message: str,
                                       line: int) -> None:
    text = SETTINGS.format(url="https://pki.example/ca.crl").replace(*edit)
    with pytest.raises(ConfigError, match=message) as info:
        parse_crl_settings(_section(text), tmp_path)
    assert info.value.line == line, info.value


def test_cli_crl_sync(tmp_path: Path, ca: IssuingCA, server: CrlServer,
                      capsys: pytest.CaptureFixture[str]) -> None:
    now = datetime.now(UTC)  # the CLI uses the system clock
    server.routes["/ca.crl"] = Route(body=make_crl(ca, 9, this_update=now))
    (tmp_path / "ca.pem").write_bytes(cert_pem(ca.cert))
    config = tmp_path / "agent.yaml"
    config.write_text(f"""\
other_section: {{ignored: true}}
crl:
  sources: [{{url: "{server.url('/ca.crl')}"}}]
  issuers: [ca.pem]
  install_targets: [out/crl.pem]
""")
    parser = __import__("argparse").ArgumentParser()
    cli_crl.add_parser(parser.add_subparsers(dest="group"))
    args = parser.parse_args(["crl", "sync", "--config", str(config)])
    assert args.func(args) == 0
    assert "installed" in capsys.readouterr().out
    assert (tmp_path / "out/crl.pem").exists()
    del server.routes["/ca.crl"]
    assert args.func(args) == 1
    assert "reason=http_status" in capsys.readouterr().out
