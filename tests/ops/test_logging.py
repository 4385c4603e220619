"""Every line on stderr is one JSON object: structlog events, amqtt's and the standard library's
records, warnings and uncaught exceptions; secrets are redacted; connection context is per task."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import warnings

import structlog

from edge_runtime.logsetup import REDACTED, bind_connection, configure_logging


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_structlog_and_stdlib_records_are_one_json_object_per_line() -> None:
    out = io.StringIO()
    configure_logging(stream=out)
    structlog.get_logger("edge-broker").info("auth.rejected", reason="pin_mismatch", device="pump-17")
    logging.getLogger("amqtt.broker").warning("plain %s text from amqtt", "formatted")
    logging.getLogger("some.library").error("multi\nline\nmessage")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(True)
        warnings.warn("deprecated thing", UserWarning, stacklevel=1)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("x").exception("failed")
    parsed = lines(out)
    assert [p["event"] for p in parsed][:3] == ["auth.rejected", "plain formatted text from amqtt",
                                                "multi\nline\nmessage"]
    assert parsed[0]["reason"] == "pin_mismatch" and parsed[0]["logger"] == "edge-broker"
    assert parsed[1]["logger"] == "amqtt.broker" and parsed[1]["level"] == "warning"
    assert all(str(p["ts"]).endswith("Z") for p in parsed)
    assert any("deprecated thing" in str(p["event"]) for p in parsed)
    failed = parsed[-1]
    assert failed["event"] == "failed" and failed["level"] == "error"
    (frame_info,) = failed["exception"]  # type: ignore[misc]
    assert frame_info["exc_type"] == "ValueError"
    assert all("locals" not in frame for frame in frame_info["frames"])  # locals may hold keys


def test_amqtt_info_is_quiet_unless_debugging() -> None:
    out = io.StringIO()
    configure_logging(stream=out)
    logging.getLogger("amqtt.broker").info("chatty")
    assert out.getvalue() == ""
    configure_logging(stream=out, level="DEBUG")
    logging.getLogger("amqtt.broker").info("chatty")
    assert lines(out)[0]["event"] == "chatty"


def test_secrets_are_redacted_by_name_and_inside_text() -> None:
    out = io.StringIO()
    configure_logging(stream=out)
    pem = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIB\n-----END EC PRIVATE KEY-----"
    structlog.get_logger("t").info(  # fake secrets, to see them redacted
        "x", password="hunter2", bearer_token="abc", nested={"api_key": "k", "fine": "ok"},  # noqa: S106
        detail=f"loaded {pem} then Authorization: Bearer eyJhbGciOi.abc.def and token=s3cr3t, done",
    )
    logging.getLogger("amqtt").warning("connect with password=hunter2 from 10.0.0.1")
    first, second = lines(out)
    text = out.getvalue()
    assert "hunter2" not in text and "MHcCAQEEIB" not in text and "s3cr3t" not in text and "eyJhbGciOi" not in text
    assert first["password"] == REDACTED and first["bearer_token"] == REDACTED
    assert first["nested"] == {"api_key": REDACTED, "fine": "ok"}
    assert str(first["detail"]).startswith(f"loaded {REDACTED} then Authorization: Bearer {REDACTED}")
    assert second["event"] == f"connect with password={REDACTED} from 10.0.0.1"


async def test_connection_context_is_bound_per_task() -> None:
    out = io.StringIO()
    configure_logging(stream=out)
    log = structlog.get_logger("edge-broker")
    both = asyncio.Event()

    async def serve(peer: str, device: str) -> None:
        bind_connection(peer=peer, listener="devices")
        log.info("tls.accepted")
        bind_connection(device=device)
        await both.wait()
        logging.getLogger("amqtt.mqtt.protocol").warning("amqtt line inside the connection")

    one = asyncio.create_task(serve("127.0.0.1:1000", "pump-17"))
    two = asyncio.create_task(serve("127.0.0.1:2000", "pump-18"))
    await asyncio.sleep(0.01)
    both.set()
    await asyncio.gather(one, two)
    log.info("outside")
    parsed = lines(out)
    by_peer = {(p.get("peer"), p["event"]): p for p in parsed}
    assert by_peer[("127.0.0.1:1000", "amqtt line inside the connection")]["device"] == "pump-17"
    assert by_peer[("127.0.0.1:2000", "amqtt line inside the connection")]["device"] == "pump-18"
    assert "device" not in by_peer[("127.0.0.1:1000", "tls.accepted")]
    assert "peer" not in parsed[-1] and parsed[-1]["event"] == "outside"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_rendering_only_on_a_terminal() -> None:
    tty = Tty()
    configure_logging(stream=tty)
    structlog.get_logger("edge-broker").info("broker.started", port=8883)
    line = tty.getvalue().strip()
    assert not line.startswith("{") and "broker.started" in line and "port=8883" in line
    pipe = io.StringIO()
    configure_logging(stream=pipe)
    structlog.get_logger("edge-broker").info("broker.started", port=8883)
    assert lines(pipe)[0]["port"] == 8883
