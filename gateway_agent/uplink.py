"""The uplink: Zone 2 -> Zone 3 over one outbound MQTT/TLS connection, with store-and-forward.

Two MQTT sessions, both initiated here (the uplink never listens):

- **local**: its own certificate identity on the local broker (a registry entry with role
  ``uplink``), so the broker's admission, ACL and command guard apply to it like to any client.
  It subscribes to the ``forward`` filters at QoS 1 on a persistent session
  (``clean_session=False``), with manual acknowledgement: a PUBACK goes to the broker only
  after the message is committed to the disk queue. If the uplink dies in between, the broker
  still holds the message for the session (at least once). What the broker then resends
  first on the resumed session, the uplink recognises by packet id and content among the
  messages still queued and does not queue twice (counted as ``local_redelivered``).
- **cloud**: TLS 1.3 with the gateway's cloud certificate to the cloud broker. The drain loop
  publishes queued messages in order at QoS 1 with a window of ``inflight`` unacknowledged
  messages and deletes each one only when its PUBACK arrived. After a disconnect it starts
  again from the oldest message still queued, so at most ``inflight`` messages per reconnect
  arrive twice (counted as ``resent``). Reconnects back off exponentially with jitter.
  Downlink: only the configured cloud filters are subscribed, on this same connection; each
  message is mapped to a device command topic and published to the local broker, whose command
  guard verifies the operator's signature (a forged command is refused there).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from edge_core.errors import ConfigError
from edge_core.events import SecurityEvents
from edge_core.uplink_rules import UplinkConfig, load_uplink_config
from edge_runtime.mqtt import suback_refused
from edge_runtime.tls import client_tls_context
from gateway_agent.uplink_queue import PutReport, StoreAndForwardQueue

__all__ = ["UplinkCounters", "UplinkService", "backoff_delay", "enable_manual_ack"]

#: largest batch written to the queue in one transaction
_BATCH = 256
#: how often the drain loop looks at the queue when nothing woke it (expiry, a missed wake-up)
_IDLE_POLL = 1.0


def backoff_delay(attempt: int, *, initial: float, most: float, rng: Callable[[], float]) -> float:
    """Exponential backoff with "equal jitter": half the step fixed, half random (never a tight loop)."""
    step = min(most, initial * float(2 ** min(attempt, 30)))
    return step / 2 + rng() * step / 2


def enable_manual_ack(client: aiomqtt.Client) -> Any:
    """Switch aiomqtt's paho client to manual PUBACK and return it (aiomqtt 2.x exposes no option for this).

    ``tests/uplink/test_uplink_library.py`` fails if an aiomqtt upgrade moves the attribute.
    """
    paho = client._client
    paho.manual_ack_set(True)
    return paho


def _origin(packet_id: int, topic: str, payload: bytes) -> str:
    """Who a queued message was, on the local session: packet id and a digest of what it said."""
    digest = hashlib.blake2b(topic.encode("utf-8") + b"\0" + payload, digest_size=8).hexdigest()
    return f"{packet_id}:{digest}"


@dataclass
class UplinkCounters:
    received: int = 0
    forwarded: int = 0
    resent: int = 0
    #: resent by the local broker after a crash, already queued: acknowledged, not queued twice
    local_redelivered: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    downlink_forwarded: int = 0
    downlink_refused: dict[str, int] = field(default_factory=dict)
    cloud_connects: int = 0
    local_connects: int = 0

    def drop(self, reason: str, n: int = 1, table: str = "dropped") -> None:
        target: dict[str, int] = getattr(self, table)
        target[reason] = target.get(reason, 0) + n


class _SocketTrackingContext(ssl.SSLContext):
    """Remembers the sockets it wrapped: paho leaves the socket of a failed TLS handshake open, and
    an uplink retrying a refusing cloud for hours would leak one per attempt."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.sockets: list[ssl.SSLSocket] = []

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        self.sockets.append(sock)
        return sock

    def close_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


class _Window:
    """The messages in flight to the cloud, and the acknowledged ones on their way out of the queue.

    Completions arrive by callback (no scan of the whole window per PUBACK); deletions run in
    one worker-thread call per batch, overlapped with publishing.
    """

    def __init__(self, queue: StoreAndForwardQueue, size: int) -> None:
        self.queue = queue
        self.size = size
        self.inflight: dict[int, asyncio.Task[None]] = {}
        self.done: list[int] = []
        self.changed = asyncio.Event()
        self._to_remove: list[int] = []
        self._remover: asyncio.Task[None] | None = None

    def add(self, seq: int, task: asyncio.Task[None]) -> None:
        self.inflight[seq] = task
        task.add_done_callback(functools.partial(self._completed, seq))

    def _completed(self, seq: int, _task: object) -> None:
        self.done.append(seq)
        self.changed.set()

    def take_done(self, *, everything: bool = False) -> tuple[list[int], aiomqtt.MqttError | None]:
        """The acknowledged sequence numbers, and an ``MqttError`` if a publish failed.

        Every acknowledged message is returned, also when a sibling failed, so the caller removes
        and counts it before giving up the connection; a failed one stays in ``inflight`` (it may
        have reached the cloud). ``everything`` also looks at completions whose callback has not
        run yet (a scan of the window, once per lost connection).
        """
        self.changed.clear()
        acked: list[int] = []
        failure: aiomqtt.MqttError | None = None
        done, self.done = self.done, []
        if everything:
            done += [seq for seq, task in self.inflight.items() if task.done()]
        for seq in done:
            task = self.inflight.get(seq)
            if task is None:
                continue
            if task.cancelled() or task.exception() is not None:
                if failure is None:
                    exc = None if task.cancelled() else task.exception()
                    failure = aiomqtt.MqttError(f"publish failed: {exc}")
                    failure.__cause__ = exc
                continue
            del self.inflight[seq]
            acked.append(seq)
        return acked, failure

    def remove_soon(self, seqs: list[int]) -> None:
        self._to_remove.extend(seqs)
        if self._to_remove and (self._remover is None or self._remover.done()):
            self._remover = asyncio.create_task(self._remove())

    async def _remove(self) -> None:
        while self._to_remove:
            batch, self._to_remove = self._to_remove, []
            await asyncio.to_thread(self.queue.remove, batch)

    async def flush(self) -> None:
        if self._remover is not None:
            with contextlib.suppress(Exception):
                await self._remover
        if self._to_remove:
            await self._remove()


class UplinkService:
    """An agent service (``run``/``status``/``gauges``); ``gateway-agent uplink run`` hosts it."""

    name = "uplink"

    def __init__(self, config: UplinkConfig, *, events: SecurityEvents,
                 rng: Callable[[], float] = random.random, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.events = events
        self.rng = rng
        self.clock = clock
        self.counters = UplinkCounters()
        self.queue: StoreAndForwardQueue | None = None
        self.cloud_up = False
        self.local_up = False
        self.last_cloud_error: str | None = None
        self._local: aiomqtt.Client | None = None
        self._wake = asyncio.Event()
        self._restart = asyncio.Event()
        self._high_water = False
        self._redelivery = False  # the local session just resumed: its first messages may be resends
        #: sequence numbers that were in flight when a cloud connection broke
        self._unconfirmed: set[int] = set()

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            if self.queue is None or self.queue.policy != self.config.queue:
                if self.queue is not None:
                    await asyncio.to_thread(self.queue.close)
                self.queue = await asyncio.to_thread(StoreAndForwardQueue, self.config.queue, clock=self.clock)
                depth = self.queue.stats().depth
                self.events.emit("uplink.queue_opened", path=str(self.config.queue.path), depth=depth)
            self._restart.clear()
            tasks = [asyncio.create_task(self._local_loop(), name="uplink:local"),
                     asyncio.create_task(self._cloud_loop(), name="uplink:cloud"),
                     asyncio.create_task(self._restart.wait(), name="uplink:restart")]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def reload(self, path: str | None = None) -> bool:
        """Re-read the settings file; all or nothing. On success both sessions restart with the new rules."""
        try:
            new = load_uplink_config(path or self.config.source)
        except ConfigError as exc:
            self.events.emit("uplink.reload_failed", "invalid", level="error", file=exc.source, line=exc.line,
                             detail=exc.reason)
            return False
        self.config = new
        self.events.emit("uplink.reloaded", forward=len(new.forward), downlink=len(new.downlink))
        self._restart.set()
        return True

    async def close(self) -> None:
        if self.queue is not None:
            await asyncio.to_thread(self.queue.close)
            self.queue = None

    # -- local side: broker -> disk ------------------------------------------------------------

    @staticmethod
    def _client(host: str, port: int, client_id: str, tls: ssl.SSLContext, keepalive: int, *, persistent: bool,
                max_inflight_messages: int | None = None) -> aiomqtt.Client:
        """MQTT 3.1.1 over our TLS context; ``persistent`` is ``clean_session=False``."""
        return aiomqtt.Client(host, port, identifier=client_id, tls_context=tls,
                              protocol=aiomqtt.ProtocolVersion.V311, clean_session=not persistent,
                              keepalive=keepalive, timeout=10, max_inflight_messages=max_inflight_messages)

    def _tls(self, ca: Any, cert: Any, key: Any) -> _SocketTrackingContext:
        ctx = client_tls_context(ca, cert, key, context_class=_SocketTrackingContext)
        assert isinstance(ctx, _SocketTrackingContext)
        return ctx

    async def _local_loop(self) -> None:
        link = self.config.local
        attempt = 0
        while True:
            tls = self._tls(link.ca, link.cert, link.key)
            client = self._client(link.host, link.port, link.client_id, tls, link.keepalive, persistent=True)
            paho = enable_manual_ack(client)  # before CONNECT: a resumed session delivers at once
            try:
                async with client:
                    attempt = 0
                    await self._drop_stale_subscriptions(client)
                    granted = await client.subscribe([(f, 1) for f in self.config.forward_filters()])
                    refused = [f for f, code in zip(self.config.forward_filters(), granted, strict=False)
                               if suback_refused(code)]
                    if refused:
                        self.events.emit("uplink.subscribe_refused", "local_acl", level="error", filters=refused)
                        raise ConfigError(f"the local broker refused the uplink's subscriptions {refused}",
                                          hint="grant role 'uplink' 'allow subscribe' on those filters "
                                               "(configs/acl.yaml)")
                    self._local = client
                    self.local_up = True
                    self.counters.local_connects += 1
                    self.events.emit("uplink.local_connected", client_id=link.client_id)
                    self._redelivery = True  # a resumed session starts with what the broker resends
                    await self._take(client, paho)
            except aiomqtt.MqttError as exc:
                self.events.emit("uplink.local_disconnected", "broker_unreachable", level="warning",
                                 detail=str(exc)[:200])
            finally:
                self._local = None
                self.local_up = False
                tls.close_all()
            await asyncio.sleep(backoff_delay(attempt, initial=0.5, most=10.0, rng=self.rng))
            attempt += 1

    async def _drop_stale_subscriptions(self, client: aiomqtt.Client) -> None:
        """The broker keeps a persistent session's subscriptions: drop those no rule wants any more."""
        assert self.queue is not None
        current = self.config.forward_filters()
        stored = await asyncio.to_thread(self.queue.get_meta, "local_filters")
        held = json.loads(stored) if stored else []
        stale = [f for f in held if f not in current]
        if stale:
            await client.unsubscribe(stale)
            self.events.emit("uplink.unsubscribed", "rules_changed", filters=stale)
        await asyncio.to_thread(self.queue.set_meta, "local_filters", json.dumps(current))

    async def _take(self, client: aiomqtt.Client, paho: Any) -> None:
        """Read messages in batches, commit each batch to disk, then acknowledge it to the broker."""
        messages = client.messages
        while True:
            batch = [await anext(messages)]
            while len(messages) > 0 and len(batch) < _BATCH:
                batch.append(await anext(messages))
            items: list[tuple[str, bytes, int]] = []
            origins: list[str | None] = []
            for message in batch:
                topic = str(message.topic)
                payload = message.payload if isinstance(message.payload, bytes) else b""
                target = self.config.cloud_topic(topic)
                if target is None:
                    self.counters.drop("no_rule")
                    self.events.emit("uplink.dropped", "no_rule", level="warning", topic=topic[:120])
                elif len(payload) > self.config.max_payload:
                    self.counters.drop("oversized")
                    self.events.emit("uplink.dropped", "oversized", level="warning", topic=topic[:120],
                                     size=len(payload))
                else:
                    items.append((target, payload, 1))
                    origins.append(_origin(message.mid, topic, payload) if message.qos > 0 else None)
            assert self.queue is not None
            report = await asyncio.to_thread(self.queue.put_many, items, origins=origins,
                                             skip_known_prefix=self._redelivery)
            if report.duplicates < len(items):
                self._redelivery = False  # the resent run is over: everything from here is new
            if report.duplicates:
                self.counters.local_redelivered += report.duplicates
                self.events.emit("uplink.redelivered", "already_queued", count=report.duplicates)
            self._account(report)
            for message in batch:
                if message.qos > 0:
                    paho.ack(message.mid, message.qos)
            self.counters.received += len(batch)
            self._wake.set()

    def _account(self, report: PutReport) -> None:
        for reason, n in (("drop_oldest", report.dropped_oldest), ("refuse_new", report.refused),
                          ("expired", report.expired)):
            if n:
                self.counters.drop(reason, n)
                event = "uplink.dropped" if reason == "expired" else "uplink.queue_overflow"
                self.events.emit(event, reason, level="error", count=n, policy=self.config.queue.overflow)
        assert self.queue is not None
        fill = self.queue.stats().bytes / self.config.queue.max_bytes
        if fill >= self.config.queue.alarm_fraction and not self._high_water:
            self._high_water = True
            self.events.emit("uplink.queue_alarm", "high_watermark", level="error", fill=round(fill, 3),
                             max_bytes=self.config.queue.max_bytes)
        elif fill < self.config.queue.alarm_fraction * 0.9:
            self._high_water = False

    # -- cloud side: disk -> cloud, and the downlink ------------------------------------------------

    async def _cloud_loop(self) -> None:
        link = self.config.cloud
        attempt = 0
        while True:
            ctx = self._tls(link.ca, link.cert, link.key)
            client = self._client(link.host, link.port, link.client_id, ctx, link.keepalive, persistent=False,
                                  max_inflight_messages=link.inflight)
            client.pending_calls_threshold = link.inflight + 10  # our window, not a leak: no warning per message
            try:
                async with client:
                    attempt = 0
                    filters = self.config.downlink_filters()
                    if filters:
                        granted = await client.subscribe([(f, 1) for f in filters])
                        refused = [f for f, code in zip(filters, granted, strict=False) if suback_refused(code)]
                        if refused:
                            self.events.emit("uplink.subscribe_refused", "cloud_acl", level="error",
                                             filters=refused)
                    self.cloud_up = True
                    self.counters.cloud_connects += 1
                    self.last_cloud_error = None
                    if self.queue is not None:  # nothing older than max_age goes out after an outage
                        self._account_expired(await asyncio.to_thread(self.queue.expire))
                    depth = self.queue.stats().depth if self.queue else 0
                    self.events.emit("uplink.cloud_connected", host=link.host, port=link.port, queued=depth)
                    watcher = asyncio.create_task(self._downlink(client), name="uplink:downlink")
                    try:
                        await self._drain(client, watcher)
                    finally:
                        watcher.cancel()
                        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                            await watcher
            except aiomqtt.MqttError as exc:
                self.last_cloud_error = str(exc)[:200]
                self.events.emit("uplink.cloud_unreachable", "disconnected" if self.cloud_up else "connect_failed",
                                 level="warning", host=link.host, port=link.port, detail=self.last_cloud_error,
                                 attempt=attempt)
            finally:
                self.cloud_up = False
                ctx.close_all()
            await asyncio.sleep(backoff_delay(attempt, initial=link.backoff_initial, most=link.backoff_max,
                                              rng=self.rng))
            attempt += 1

    async def _drain(self, client: aiomqtt.Client, watcher: asyncio.Task[None]) -> None:
        """Publish in order with a window of unacknowledged messages; delete each on its PUBACK."""
        assert self.queue is not None
        window = _Window(self.queue, self.config.cloud.inflight)
        try:
            await self._drain_loop(client, watcher, window)
        finally:
            # acknowledged: delete them now, or a reconnect would send them again
            with contextlib.suppress(aiomqtt.MqttError):
                self._settle(window, everything=True)
            await window.flush()
            # sent but not acknowledged: the cloud may have them already, so they may arrive twice
            self._unconfirmed |= set(window.inflight)
            for task in window.inflight.values():
                task.cancel()

    async def _drain_loop(self, client: aiomqtt.Client, watcher: asyncio.Task[None], window: _Window) -> None:
        publish_timeout = self.config.cloud.publish_timeout
        after = 0
        while True:
            room = window.size - len(window.inflight)
            if room > 0:
                # expiry first, before every batch: one index lookup of the oldest message
                expired, entries = await asyncio.to_thread(window.queue.peek_fresh, after, room)
                self._account_expired(expired)
                for entry in entries:
                    if entry.seq in self._unconfirmed:
                        self._unconfirmed.discard(entry.seq)
                        self.counters.resent += 1
                    # tasks start in creation order, so paho writes the PUBLISHes in queue order
                    window.add(entry.seq, asyncio.create_task(
                        client.publish(entry.topic, entry.payload, qos=1, timeout=publish_timeout)))
                    after = entry.seq
            if not window.done:
                self._wake.clear()
                waiters: list[asyncio.Future[Any]] = [watcher, asyncio.ensure_future(window.changed.wait())]
                if len(window.inflight) < window.size:
                    waiters.append(asyncio.ensure_future(self._wake.wait()))
                try:
                    await asyncio.wait(waiters, timeout=_IDLE_POLL, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waiters[1:]:
                        waiter.cancel()
            if watcher.done():
                watcher.result()  # raises the disconnect
                raise aiomqtt.MqttError("downlink reader stopped")
            self._settle(window)

    def _settle(self, window: _Window, *, everything: bool = False) -> None:
        """Count and remove every acknowledged message, then raise ``MqttError`` if a publish failed."""
        acked, failure = window.take_done(everything=everything)
        self.counters.forwarded += len(acked)
        window.remove_soon(acked)
        if failure is not None:
            raise failure

    def _account_expired(self, expired: int) -> None:
        if expired:
            self._account(PutReport(stored=0, expired=expired))

    async def _downlink(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = str(message.topic)
            payload = message.payload if isinstance(message.payload, bytes) else b""
            target = self.config.local_topic(topic)
            reason = None
            if target is None:
                reason = "no_rule"
            elif message.retain:
                reason = "retained"  # a retained command would replay itself to every new session
            elif len(payload) > self.config.max_payload:
                reason = "oversized"
            elif self._local is None:
                reason = "local_unavailable"
            if reason is not None or target is None:
                self.counters.drop(reason or "no_rule", table="downlink_refused")
                self.events.emit("uplink.downlink_refused", reason, level="warning", topic=topic[:120])
                continue
            local = self._local
            assert local is not None
            try:
                await local.publish(target, payload, qos=1, timeout=10)
            except aiomqtt.MqttError as exc:
                self.counters.drop("local_unavailable", table="downlink_refused")
                self.events.emit("uplink.downlink_refused", "local_unavailable", level="warning",
                                 topic=topic[:120], detail=str(exc)[:200])
                continue
            self.counters.downlink_forwarded += 1
            # the broker's command guard decides; its command.accepted/rejected event is the verdict
            self.events.emit("uplink.downlink_forwarded", topic=target[:120], size=len(payload))

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        stats = self.queue.stats() if self.queue is not None else None
        c = self.counters
        return {
            "cloud": {"connected": self.cloud_up, "host": self.config.cloud.host, "port": self.config.cloud.port,
                      "connects": c.cloud_connects, "last_error": self.last_cloud_error},
            "local": {"connected": self.local_up, "client_id": self.config.local.client_id,
                      "connects": c.local_connects},
            "queue": None if stats is None else {
                "depth": stats.depth, "bytes": stats.bytes, "max_bytes": self.config.queue.max_bytes,
                "oldest_age_s": round(stats.oldest_age_s, 3), "file_bytes": stats.file_bytes,
                "overflow": self.config.queue.overflow},
            "received": c.received, "forwarded": c.forwarded, "resent": c.resent,
            "local_redelivered": c.local_redelivered, "dropped": dict(c.dropped),
            "downlink": {"forwarded": c.downlink_forwarded, "refused": dict(c.downlink_refused)},
            "rules": {"forward": len(self.config.forward), "downlink": len(self.config.downlink)},
        }

    def gauges(self) -> dict[str, float]:
        stats = self.queue.stats() if self.queue is not None else None
        c = self.counters
        return {
            "uplink_queue_depth": float(stats.depth if stats else 0),
            "uplink_queue_bytes": float(stats.bytes if stats else 0),
            "uplink_queue_oldest_age_seconds": round(stats.oldest_age_s, 3) if stats else 0.0,
            "uplink_forwarded_total": float(c.forwarded),
            "uplink_resent_total": float(c.resent),
            "uplink_local_redelivered_total": float(c.local_redelivered),
            "uplink_dropped_total": float(sum(c.dropped.values())),
            "uplink_cloud_connected": 1.0 if self.cloud_up else 0.0,
            "uplink_local_connected": 1.0 if self.local_up else 0.0,
        }
