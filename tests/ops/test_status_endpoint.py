"""The status endpoint: liveness, readiness checks, metrics with HELP/TYPE, and protection beyond loopback."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_core import yamlsrc
from edge_core.errors import ConfigError
from edge_core.events import SecurityEvents
from edge_runtime.metrics import Metrics
from edge_runtime.status_http import NotReady, StatusServer, StatusSettings, StatusTls, parse_status_section
from tests.support.pki import DevPki


def section(text: str) -> yamlsrc.Section:
    doc = yamlsrc.load(text, source="broker.yaml")
    top = yamlsrc.Section(doc, source="broker.yaml", what="broker settings")
    sec = top.sub("status")
    assert sec is not None
    return sec


def get(url: str, *, token: str | None = None, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)  # noqa: S310 - http(s) to our own test server
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def events_with_counts() -> SecurityEvents:
    events = SecurityEvents("test")
    events.emit("auth.rejected", "pin_mismatch", level="warning")
    events.emit("auth.rejected", "pin_mismatch", level="warning")
    events.emit("tls.rejected", "unknown_ca", level="warning")
    events.emit("broker.started")
    return events


def test_non_loopback_bind_needs_a_token_or_mtls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_status_section(section("status:\n  bind: 0.0.0.0:9464\n"), base_dir=tmp_path, default_bind="")
    assert refused.value.line == 2 and "bearer_token_file" in refused.value.reason and "tls" in refused.value.reason
    token = parse_status_section(section("status:\n  bind: 0.0.0.0:9464\n  bearer_token_file: t\n"),
                                 base_dir=tmp_path, default_bind="")
    assert token.bearer_token_file == tmp_path / "t"
    mtls = parse_status_section(section("status:\n  bind: '[::]:9464'\n  tls: {certfile: a, keyfile: b, "
                                        "client_ca: c}\n"), base_dir=tmp_path, default_bind="")
    assert mtls.tls == StatusTls(tmp_path / "a", tmp_path / "b", tmp_path / "c") and mtls.host == "::"
    with pytest.raises(ConfigError, match="unknown key 'bind_all'"):
        parse_status_section(section("status:\n  bind_all: true\n"), base_dir=tmp_path, default_bind="127.0.0.1:0")


async def test_healthz_readyz_and_checks() -> None:
    events = events_with_counts()
    metrics = Metrics("edge_test", events, version="1.2.3")
    server = StatusServer(StatusSettings("127.0.0.1", 0), status=lambda: {"ok": True}, metrics=metrics.render)
    crl_fresh = True

    def crl() -> None:
        if not crl_fresh:
            raise NotReady("CRL stale")

    def broken() -> None:
        raise RuntimeError("bug in a check")

    server.add_readiness_check("crl", crl)
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        import asyncio

        code, body = await asyncio.to_thread(get, base + "/readyz")
        assert code == 503 and json.loads(body)["checks"]["started"]["detail"] == "starting"
        server.mark_started()
        code, body = await asyncio.to_thread(get, base + "/readyz")
        assert code == 200 and json.loads(body) == {"ready": True, "checks": {"crl": {"ok": True}}}
        crl_fresh = False
        code, body = await asyncio.to_thread(get, base + "/readyz")
        assert code == 503 and json.loads(body)["checks"]["crl"] == {"ok": False, "detail": "CRL stale"}
        crl_fresh = True
        server.add_readiness_check("broken", broken)
        code, body = await asyncio.to_thread(get, base + "/readyz")
        assert code == 503 and "bug in a check" in json.loads(body)["checks"]["broken"]["detail"]
        assert await asyncio.to_thread(get, base + "/healthz") == (200, b"ok\n")
        assert (await asyncio.to_thread(get, base + "/status"))[0] == 200
        assert (await asyncio.to_thread(get, base + "/nope"))[0] == 404
    finally:
        await server.close()


def test_metrics_have_help_and_type_and_parse() -> None:
    events = events_with_counts()
    metrics = Metrics("edge_test", events, version="1.2.3")
    metrics.gauge("crl_next_update_timestamp_seconds", lambda: {"CN=Issuing CA": 1.7e9})
    metrics.gauge("sessions", lambda: {"connected": 3.0, "known": 5.0})
    metrics.gauge("uplink_queue_oldest_age_seconds", lambda: None)  # no value now: absent, not a fake zero
    metrics.counter("messages", lambda: {"received": 7.0}, documentation="messages", labels=("direction",))
    text = metrics.render().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    events_family = families["edge_test_events"]
    assert events_family.type == "counter" and events_family.documentation
    samples = {(s.labels["event"], s.labels["reason"]): s.value for s in events_family.samples
               if s.name == "edge_test_events_total"}
    assert samples == {("auth.rejected", "pin_mismatch"): 2, ("tls.rejected", "unknown_ca"): 1,
                       ("broker.started", ""): 1}
    assert families["edge_test_sessions"].type == "gauge"
    assert {s.labels["state"]: s.value for s in families["edge_test_sessions"].samples} == {"connected": 3,
                                                                                             "known": 5}
    assert families["edge_test_crl_next_update_timestamp_seconds"].samples[0].labels == {"issuer": "CN=Issuing CA"}
    assert "edge_test_uplink_queue_oldest_age_seconds" not in families
    assert families["edge_test_build_info"].samples[0].labels == {"version": "1.2.3"}
    assert families["edge_test_messages"].type == "counter"
    assert [(s.name, s.value) for s in families["edge_test_messages"].samples] == [("edge_test_messages_total", 7)]
    for name in families:
        assert f"# HELP {name}" in text and f"# TYPE {name}" in text
    with pytest.raises(ValueError, match="not in GAUGES"):
        metrics.gauge("made_up", lambda: 1.0)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="Debian's prometheus package provides promtool")
def test_promtool_accepts_metrics() -> None:
    metrics = Metrics("edge_test", events_with_counts(), version="1.2.3")
    metrics.gauge("connections", lambda: {"devices": 2.0})
    result = subprocess.run(["promtool", "check", "metrics"], input=metrics.render(), capture_output=True,
                            check=False, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_bearer_token_protects_everything_but_healthz(tmp_path: Path) -> None:
    import asyncio

    token_file = tmp_path / "token"
    token_file.write_text("0123456789abcdef0123456789abcdef\n")
    server = StatusServer(StatusSettings("127.0.0.1", 0, bearer_token_file=token_file), status=lambda: {},
                          metrics=lambda: b"")
    await server.start()
    server.mark_started()
    base = f"http://127.0.0.1:{server.port}"
    right, wrong = token_file.read_text().strip(), "wrong-token-0123456789"
    try:
        for path in ("/status", "/metrics", "/readyz"):
            assert (await asyncio.to_thread(get, base + path))[0] == 401
            assert (await asyncio.to_thread(get, base + path, token=wrong))[0] == 401
            assert (await asyncio.to_thread(get, base + path, token=right))[0] == 200
        assert await asyncio.to_thread(get, base + "/healthz") == (200, b"ok\n")
    finally:
        await server.close()
    token_file.write_text("short")
    with pytest.raises(ConfigError, match="at least 16"):
        await StatusServer(StatusSettings("127.0.0.1", 0, bearer_token_file=token_file), status=dict,
                           metrics=lambda: b"").start()


async def test_mtls_needs_a_scraper_certificate(pki: DevPki) -> None:
    import asyncio

    tls = StatusTls(pki.root / "broker.crt", pki.root / "broker.key", pki.chain)
    server = StatusServer(StatusSettings("127.0.0.1", 0, tls=tls), status=lambda: {"ok": 1}, metrics=lambda: b"")
    await server.start()
    url = f"https://localhost:{server.port}/status"
    try:
        anonymous = ssl.create_default_context(cafile=str(pki.chain))
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            await asyncio.to_thread(get, url, context=anonymous)
        scraper = ssl.create_default_context(cafile=str(pki.chain))
        cred = pki.device("sensor-02")
        scraper.load_cert_chain(cred.cert, cred.key)
        code, body = await asyncio.to_thread(get, url, context=scraper)
        assert code == 200 and json.loads(body) == {"ok": 1}
    finally:
        await server.close()
