"""Test PKI: one dev PKI per session plus deliberately broken credentials."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from gateway_agent.pki import FileCA, Issued, cert_pem, init_dev, issue_leaf, key_pem, new_intermediate, new_root

DEVICES = ("pump-17", "pump-18", "sensor-01", "sensor-02")


@dataclass(frozen=True)
class Credential:
    cert: Path
    key: Path


@dataclass
class DevPki:
    root: Path
    ca: FileCA

    @property
    def chain(self) -> Path:
        return self.ca.chain_path

    def device(self, identity: str) -> Credential:
        crt, key = self.ca.device_paths(identity)
        return Credential(crt, key)

    def operator(self, identity: str) -> Credential:
        """An operator's TLS client credential (``alice`` in the dev PKI)."""
        directory = self.ca.dir / "operators"
        return Credential(directory / f"{identity}.crt", directory / f"{identity}.key")

    def client(self, identity: str) -> Credential:
        """A device's or an operator's credential, whichever the dev PKI holds."""
        cred = self.device(identity)
        return cred if cred.cert.exists() else self.operator(identity)

    def write(self, name: str, issued: Issued, *, extra_chain: bytes = b"") -> Credential:
        out = self.root / "extra"
        out.mkdir(exist_ok=True)
        crt, key = out / f"{name}.crt", out / f"{name}.key"
        crt.write_bytes(cert_pem(issued.cert) + extra_chain)
        assert issued.key is not None
        key.write_bytes(key_pem(issued.key))
        key.chmod(0o600)
        return Credential(crt, key)

    def private_ca(self, directory: Path) -> FileCA:
        """The issuing CA copied into ``directory``: same keys (the broker trusts what it issues),
        but a revocation store and CRL numbers of the test's own, so revocations never leak."""
        directory.mkdir(parents=True)
        for name in ("issuing-ca.crt", "issuing-ca.key", "root-ca.crt", "ca-chain.pem"):
            shutil.copy(self.root / name, directory / name)
        return FileCA(directory)

    def issue(self, name: str, identity: str, **kwargs: object) -> Credential:
        issued = issue_leaf(self.ca.issuing(), identity=identity, now=datetime.now(UTC), **kwargs)  # type: ignore[arg-type]
        return self.write(name, issued)

    def foreign(self, name: str, identity: str) -> Credential:
        """A certificate for ``identity`` from a different CA (same layout, other keys)."""
        now = datetime.now(UTC)
        other_root = new_root("Rogue Root CA", now)
        other_issuing = new_intermediate(other_root, "Rogue Issuing CA", now)
        issued = issue_leaf(other_issuing, identity=identity, now=now)
        return self.write(name, issued, extra_chain=cert_pem(other_issuing.cert))

    def expired(self, name: str, identity: str, *, same_key_as: str | None = None) -> Credential:
        now = datetime.now(UTC)
        return self._reuse_key(name, identity, same_key_as, not_before=now - timedelta(days=40),
                               lifetime=timedelta(days=30))

    def not_yet_valid(self, name: str, identity: str, *, same_key_as: str | None = None) -> Credential:
        now = datetime.now(UTC)
        return self._reuse_key(name, identity, same_key_as, not_before=now + timedelta(days=2),
                               lifetime=timedelta(days=30))

    def _reuse_key(self, name: str, identity: str, same_key_as: str | None, **kwargs: object) -> Credential:
        public_key = None
        key_obj = None
        if same_key_as is not None:
            key_obj = serialization.load_pem_private_key(self.device(same_key_as).key.read_bytes(), None)
            public_key = key_obj.public_key()
        issued = issue_leaf(self.ca.issuing(), identity=identity, now=datetime.now(UTC),
                            public_key=public_key, **kwargs)  # type: ignore[arg-type]
        if key_obj is not None:
            issued = Issued(issued.cert, key_obj)  # type: ignore[arg-type]
        return self.write(name, issued)


def make_pki(root: Path) -> DevPki:
    ca = init_dev(root, device_ids=DEVICES)
    return DevPki(root=root, ca=ca)
