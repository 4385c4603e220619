"""Run one broker variant in its own process for bench_broker.py; prints READY <port>.

Variants:
  ours         the hardened broker (EdgeBroker, uvloop), full checks
  ours-noacl   BENCHMARK ONLY: the hardened broker with the topic ACL hook answering
               "allow" without a policy, to measure what the ACL costs
  amqtt        plain amqtt 0.12.1 with its own TLS listener (asyncio), anonymous auth
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path


async def run_ours(config: Path, *, acl: bool) -> None:
    from broker_plugins import server
    from broker_plugins.broker import HardenedBroker
    from broker_plugins.settings import load_settings

    if not acl:
        class NoAclBroker(HardenedBroker):
            # both decision paths: the coroutine chain (subscribe, wills) and the synchronous
            # one the engine uses for every publish and delivery
            async def _topic_filtering(self, session, topic, action):  # type: ignore[no-untyped-def]
                return True

            def _decide_sync(self, session, topic, kind):  # type: ignore[no-untyped-def]
                return True

        server.HardenedBroker = NoAclBroker  # type: ignore[attr-defined]  # the variant replaces the class
    async with server.EdgeBroker(load_settings(config)) as broker:
        print(f"READY {broker.port}", flush=True)
        await broker.wait_closed()


async def run_amqtt(port: int, certs: Path) -> None:
    from amqtt.broker import Broker

    broker = Broker({
        "listeners": {"default": {
            "type": "tcp", "bind": f"127.0.0.1:{port}", "ssl": True,
            "certfile": str(certs / "broker.crt"), "keyfile": str(certs / "broker.key"),
            "cafile": str(certs / "ca-chain.pem"),
        }},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })
    await broker.start()
    print(f"READY {port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    import logging

    import structlog

    logging.disable(logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    variant = sys.argv[1]
    if variant in ("ours", "ours-noacl"):
        import uvloop

        if os.environ.get("EDGE_BENCH_LOOP") == "asyncio":
            asyncio.run(run_ours(Path(sys.argv[2]), acl=variant == "ours"))
        else:
            uvloop.run(run_ours(Path(sys.argv[2]), acl=variant == "ours"))
    elif variant == "amqtt":
        asyncio.run(run_amqtt(int(sys.argv[2]), Path(sys.argv[3])))
    else:
        raise SystemExit(f"unknown variant {variant}")


if __name__ == "__main__":
    main()
