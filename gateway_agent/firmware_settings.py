"""Release tool settings: ``configs/firmware.yaml`` validated at the edge into frozen objects.

Relative paths are resolved against the directory of the settings file. The token PIN is
never in the file: it comes from the environment variable named by ``keys.pkcs11.pin_env``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from edge_core import yamlsrc
from edge_core.errors import ConfigError, CredentialError
from edge_core.firmware import Signer
from edge_core.firmware_rollout import RolloutPolicy
from edge_core.identity import check_identity
from gateway_agent.firmware_keys import Pkcs11Token, UnsafeFileKey

__all__ = ["FirmwareToolSettings", "PublishSettings", "load_firmware_settings"]


@dataclass(frozen=True)
class PublishSettings:
    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    client_id: str
    registry: Path
    class_attribute: str
    images_dir: Path
    http_bind: tuple[str, int]
    public_url: str
    http_cert: Path
    http_key: Path
    http_client_ca: Path
    rollout: RolloutPolicy


@dataclass(frozen=True)
class FirmwareToolSettings:
    token: Pkcs11Token | None
    unsafe_files: dict[str, Path]
    release_keys: tuple[str, ...]
    root_keys: tuple[str, ...]
    roots_dir: Path
    publish: PublishSettings | None
    source: str

    def signers(self, labels: tuple[str, ...]) -> list[Signer]:
        """The signers named by ``labels``: token keys, or development file keys (loud warning)."""
        if self.token is not None:
            return list(self.token.keys(labels))
        missing = [label for label in labels if label not in self.unsafe_files]
        if missing:
            raise ConfigError(f"key {missing[0]!r} is not under keys.unsafe_file_keys", source=self.source)
        return [UnsafeFileKey(self.unsafe_files[label]) for label in labels]

    def chain(self) -> list[bytes]:
        """Every root from version 1 (the pin) up: ``roots_dir/<version>.root.json``."""
        out = []
        version = 1
        while (path := self.roots_dir / f"{version}.root.json").exists():
            out.append(path.read_bytes())
            version += 1
        if not out:
            raise ConfigError(f"no root in {self.roots_dir} (1.root.json is the pin)", source=self.source,
                              hint="create it with `gateway-agent firmware root`")
        return out


def load_firmware_settings(path: Path | str) -> FirmwareToolSettings:
    return yamlsrc.load_settings_file(path, "firmware settings", parse_firmware_settings)


def _labels(sec: yamlsrc.Section, key: str) -> tuple[str, ...]:
    raw = sec.take(key, list, required=True)
    if not raw or not all(isinstance(x, str) and x for x in raw) or len(set(raw)) != len(raw):
        raise sec.error(key, f"keys.{key} must be a non-empty list of distinct key labels")
    return tuple(raw)


def parse_firmware_settings(text: bytes, *, source: str, base_dir: Path) -> FirmwareToolSettings:
    doc = yamlsrc.load(text, source=source)
    top = yamlsrc.Section(doc, source=source, what="firmware settings")

    def path(sec: yamlsrc.Section, key: str) -> Path:
        return (base_dir / sec.take(key, str, required=True)).resolve()

    ksec = top.sub("keys", required=True)
    assert ksec is not None
    token = None
    psec = ksec.sub("pkcs11")
    if psec is not None:
        token = Pkcs11Token(module=Path(psec.take("module", str, "/usr/lib/softhsm/libsofthsm2.so")),
                            token_label=psec.take("token_label", str, required=True),
                            pin_env=psec.take("pin_env", str, "FIRMWARE_TOKEN_PIN"))
        psec.done()
    unsafe: dict[str, Path] = {}
    usec = ksec.sub("unsafe_file_keys")
    if usec is not None:
        for label, value, line in usec.items():
            if not isinstance(value, str):
                raise ConfigError(f"keys.unsafe_file_keys.{label} must be a file path", source=source, line=line)
            unsafe[label] = (base_dir / value).resolve()
    if (token is None) == (not unsafe):
        raise ksec.error(None, "keys: configure exactly one of 'pkcs11' (production) or 'unsafe_file_keys' "
                               "(development only)")
    release, root = _labels(ksec, "release"), _labels(ksec, "root")
    ksec.done()
    roots_dir = path(top, "roots_dir")

    publish = None
    pub = top.sub("publish")
    if pub is not None:
        bsec = pub.sub("broker", required=True)
        assert bsec is not None
        client_id = bsec.take("client_id", str, "firmware-release")
        try:
            check_identity(client_id)
        except CredentialError as exc:
            raise bsec.error("client_id", f"publish.broker.client_id: {exc}") from exc
        host, port, ca, cert, key = (bsec.take("host", str, "127.0.0.1"), bsec.take("port", int, 8883),
                                     path(bsec, "ca"), path(bsec, "cert"), path(bsec, "key"))
        bsec.done()
        hsec = pub.sub("http", required=True)
        assert hsec is not None
        bind = hsec.take("bind", str, "127.0.0.1:8470")
        bhost, _, bport = bind.rpartition(":")
        if not bport.isdigit():
            raise hsec.error("bind", "publish.http.bind must be host:port")
        public_url = hsec.take("public_url", str, required=True).rstrip("/")
        if not public_url.startswith("https://"):
            raise hsec.error("public_url", "publish.http.public_url must be an https URL devices can reach: the "
                                           "image server serves HTTPS (TLS 1.3) only")
        http_cert, http_key, http_client_ca = path(hsec, "cert"), path(hsec, "key"), path(hsec, "client_ca")
        hsec.done()
        try:
            rollout = RolloutPolicy(
                canary_percent=pub.take("canary_percent", float, 10.0),
                rate_per_second=pub.take("rate_per_second", float, 2.0),
                max_failures=pub.take("max_failures", int, 0),
                report_timeout=timedelta(seconds=pub.take("report_timeout", float, 600.0)),
            )
        except ValueError as exc:
            raise pub.error(None, f"publish: {exc}") from exc
        publish = PublishSettings(
            host=host, port=port, ca=ca, cert=cert, key=key, client_id=client_id, registry=path(pub, "registry"),
            class_attribute=pub.take("class_attribute", str, "firmware_class"),
            images_dir=path(pub, "images_dir"), http_bind=(bhost.strip("[]"), int(bport)), public_url=public_url,
            http_cert=http_cert, http_key=http_key, http_client_ca=http_client_ca, rollout=rollout,
        )
        pub.done()
    top.done()
    return FirmwareToolSettings(token=token, unsafe_files=unsafe, release_keys=release, root_keys=root,
                                roots_dir=roots_dir, publish=publish, source=source)
