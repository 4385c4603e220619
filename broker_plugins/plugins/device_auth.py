"""Device authentication: certificate identity, client-id binding and key pinning.

The identity comes from the TLS client certificate (never the MQTT username); the
MQTT client id must equal it; the device must be in the registry with a pin for the
certificate's key. Every decision is one event: ``auth.accepted`` or
``auth.rejected reason=<code>`` (codes in ``edge_core.admission.REASONS``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from amqtt.plugins.base import BaseAuthPlugin

from broker_plugins.engine.session import Session
from broker_plugins.runtime import ADMITTED, REFUSAL, BrokerRuntime
from edge_core.admission import AdmissionRefused, Admitted, admit
from edge_core.registry import Registry
from edge_runtime.logsetup import bind_connection

#: Admissions remembered (a reconnect storm of a whole fleet parses each certificate once).
_ADMISSION_CACHE = 16384

__all__ = ["DeviceAuthPlugin"]


class DeviceAuthPlugin(BaseAuthPlugin):
    @dataclass
    class Config:
        runtime: Any = None

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._admitted: OrderedDict[tuple[bytes, str | None], Admitted] = OrderedDict()
        self._admitted_for: Registry | None = None

    def _admit(self, der: bytes | None, client_id: str | None, rt: BrokerRuntime) -> Admitted:
        """``admit``, remembered by certificate digest and client id for the current registry object.

        An admission depends on the certificate, the client id, the registry entry (a reload
        swaps the registry object, which empties this cache) and the time, which is checked
        again against the certificate's validity on every hit. Refusals are never remembered.
        """
        now = rt.clock.now()
        if self._admitted_for is not rt.registry:
            self._admitted = OrderedDict()
            self._admitted_for = rt.registry
        key = (hashlib.sha256(der).digest(), client_id) if der else None
        if key is not None:
            hit = self._admitted.get(key)
            if hit is not None and hit.cert.not_before <= now < hit.cert.not_after:
                self._admitted.move_to_end(key)
                return hit
        admitted = admit(cert_der=der, client_id=client_id, registry=rt.registry, policy=rt.settings.identity,
                         now=now)
        if key is not None:
            self._admitted[key] = admitted
            if len(self._admitted) > _ADMISSION_CACHE:
                self._admitted.popitem(last=False)
        return admitted

    @property
    def runtime(self) -> BrokerRuntime:
        runtime = self.config.runtime
        if not isinstance(runtime, BrokerRuntime):
            raise TypeError("DeviceAuthPlugin needs the broker runtime in its config")
        return runtime

    async def authenticate(self, *, session: Session) -> bool | None:
        rt = self.runtime
        ssl_object = session.ssl_object
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        peer = f"{session.remote_address}:{session.remote_port}"
        try:
            admitted = self._admit(der, session.client_id, rt)
        except AdmissionRefused as exc:
            session.attributes[REFUSAL] = exc.reason
            rt.events.emit(
                "auth.rejected", exc.reason, level="warning",
                device=exc.device, client_id=session.client_id, peer=peer, detail=str(exc),
            )
            return False
        session.attributes[ADMITTED] = admitted
        bind_connection(device=admitted.identity)  # this connection's later lines name the device
        rt.events.emit(
            "auth.accepted",
            device=admitted.identity,
            serial=f"{admitted.cert.serial:x}",
            fingerprint=admitted.cert.short_fingerprint,
            peer=peer,
        )
        return True
