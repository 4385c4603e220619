"""Device authentication: certificate identity, client-id binding and key pinning.

The identity comes from the TLS client certificate (never the MQTT username); the
MQTT client id must equal it; the device must be in the registry with a pin for the
certificate's key. Every decision is one event: ``auth.accepted`` or
``auth.rejected reason=<code>`` (codes in ``edge_core.admission.REASONS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from broker_plugins.runtime import ADMITTED, REFUSAL, BrokerRuntime
from edge_core.admission import AdmissionRefused, admit
from edge_runtime.logsetup import bind_connection

__all__ = ["DeviceAuthPlugin"]


class DeviceAuthPlugin(BaseAuthPlugin):
    @dataclass
    class Config:
        runtime: Any = None

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
            admitted = admit(
                cert_der=der,
                client_id=session.client_id,
                registry=rt.registry,
                policy=rt.settings.identity,
                now=rt.clock.now(),
            )
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
