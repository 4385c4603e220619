"""The agent's /readyz (first sync, fail_closed freshness, writable stores) and its /metrics gauges."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_core.clock import ManualClock
from gateway_agent.crl_issue import crl_path, issue_crl
from gateway_agent.daemon import Agent
from gateway_agent.pki import FileCA, init_dev
from gateway_agent.settings import load_agent_settings

pytestmark = pytest.mark.integration


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback test endpoint
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_agent_readiness_follows_the_crl_under_fail_closed(tmp_path: Path) -> None:
    clock = ManualClock()
    ca = init_dev(tmp_path / "pki", device_ids=["pump-1"])
    issue_crl(FileCA(ca.dir, clock=clock), validity=timedelta(days=1))
    config = tmp_path / "agent.yaml"
    config.write_text(f"""agent_id: gateway-agent
status:
  bind: 127.0.0.1:0
crl:
  sources: [{{file: {crl_path(ca)}}}]
  issuers: [{ca.dir / 'issuing-ca.crt'}]
  install_targets: [{tmp_path / 'broker' / 'crl.pem'}]
  state: {tmp_path / 'state' / 'crl.json'}
  interval: 3600
  staleness: {{mode: fail_closed, max_age: 172800}}
""")
    async with Agent(load_agent_settings(config), clock=clock) as agent:
        assert agent.status_server is not None
        base = f"http://127.0.0.1:{agent.status_server.port}"
        for _ in range(200):
            code, body = await asyncio.to_thread(get, base + "/readyz")
            if code == 200:
                break
            await asyncio.sleep(0.02)
        assert code == 200, body
        assert set(json.loads(body)["checks"]) == {"crl", "stores"}
        text = (await asyncio.to_thread(get, base + "/metrics"))[1].decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["gateway_agent_crl_fresh"].samples[0].value == 1.0
        assert families["gateway_agent_crl_next_update_timestamp_seconds"].samples[0].value > 0
        zeros = {(s.labels["event"], s.labels["reason"]) for s in families["gateway_agent_events"].samples
                 if s.value == 0}
        assert ("crl.fetch_failed", "fetch_timeout") in zeros  # alarm counters exist before the first alarm
        clock.advance(timedelta(days=2))  # past nextUpdate
        code, body = await asyncio.to_thread(get, base + "/readyz")
        assert code == 503 and "stale_past_next_update" in json.loads(body)["checks"]["crl"]["detail"]
        assert json.loads(body)["checks"]["stores"] == {"ok": True}
