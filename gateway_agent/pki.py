"""Certificate building blocks and the development PKI.

``init_dev`` lays out a complete two-tier PKI for demos and tests::

    certs-dev/
      root-ca.crt / root-ca.key          self-signed root (ECDSA P-256, 10 years)
      issuing-ca.crt / issuing-ca.key    issues broker, device and operator certificates
      ca-chain.pem                       issuing + root: the trust bundle for brokers and devices
      broker.crt / broker.key            TLS server cert, SAN localhost, 127.0.0.1, ::1
      devices/<id>.crt / <id>.key        device certs (ECDSA P-256, 30 days by default)
      operators/<id>.crt / <id>.key      operator TLS client certs (role operator)
      operators/<id>-signing.key         operator command-signing keys (separate from TLS keys)
      operators.yaml                     operator public signing keys and scopes
      agent/gateway-agent.crt / .key     the gateway agent's own client cert (role gateway)
      registry.yaml                      the client registry with every pin

The device id is carried in the SubjectAltName URI ``urn:device:<id>`` (and, for humans,
in the subject CN). Private keys are written 0600. Nothing is overwritten without
``force``. The CA stays usable: ``FileCA.load`` reopens it to issue more.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_core.clock import Clock, SystemClock
from edge_core.errors import ConfigError, CredentialError
from edge_core.files import atomic_write_bytes, atomic_write_text
from edge_core.identity import IdentityPolicy, check_identity, spki_pin
from edge_core.registry import DeviceEntry, Registry, dump_registry, parse_registry

__all__ = [
    "DEVICE_URI_PREFIX",
    "FileCA",
    "Issued",
    "IssuingCA",
    "init_dev",
    "issue_leaf",
    "key_pem",
    "load_cert",
    "new_key",
    "registry_refusal",
]

DEVICE_URI_PREFIX = "urn:device:"
DEFAULT_DEVICE_LIFETIME = timedelta(days=30)
_BACKDATE = timedelta(minutes=5)  # tolerate small clock differences between CA and broker


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(path: Path | str) -> x509.Certificate:
    data = Path(path).read_bytes()
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CredentialError("cert_unparseable", f"{path}: not a PEM certificate: {exc}") from exc


def load_key(path: Path | str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialError("key_unsupported", f"{path}: only EC keys are supported")
    return key


@dataclass(frozen=True)
class IssuingCA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | None

    @property
    def pin(self) -> str:
        return spki_pin(self.cert)


def _name(cn: str, org: str = "Edge Gateway Dev PKI") -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _ca_cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: IssuingCA | None,
    now: datetime,
    lifetime: timedelta,
    path_length: int | None,
) -> x509.Certificate:
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    return builder.sign(signer_key, hashes.SHA256())


def new_root(cn: str, now: datetime, lifetime: timedelta = timedelta(days=3650)) -> IssuingCA:
    key = new_key()
    return IssuingCA(_ca_cert(_name(cn), key, None, now, lifetime, path_length=1), key)


def new_intermediate(root: IssuingCA, cn: str, now: datetime,
                     lifetime: timedelta = timedelta(days=1825)) -> IssuingCA:
    key = new_key()
    return IssuingCA(_ca_cert(_name(cn), key, root, now, lifetime, path_length=0), key)


def issue_leaf(
    ca: IssuingCA,
    *,
    identity: str,
    now: datetime,
    lifetime: timedelta = DEFAULT_DEVICE_LIFETIME,
    public_key: ec.EllipticCurvePublicKey | None = None,
    not_before: datetime | None = None,
    uri_prefix: str | None = DEVICE_URI_PREFIX,
    server_names: Iterable[str] = (),
    client: bool = True,
    serial: int | None = None,
    issuer_name: x509.Name | None = None,
) -> Issued:
    """Issue an end-entity certificate. Without ``public_key`` a fresh key is generated.

    ``issuer_name`` overrides the issuer field (default: the CA's subject, byte for byte);
    tests use it for an issuer spelled in another letter case, as some CAs encode it.
    """
    key = None
    if public_key is None:
        key = new_key()
        public_key = key.public_key()
    start = not_before if not_before is not None else now - _BACKDATE
    sans: list[x509.GeneralName] = []
    if uri_prefix is not None:
        sans.append(x509.UniformResourceIdentifier(uri_prefix + identity))
    for name in server_names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(identity))
        .issuer_name(issuer_name if issuer_name is not None else ca.cert.subject)
        .public_key(public_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def registry_refusal(path: Path, identity: str, *, unknown_refused: bool = False) -> CredentialError | None:
    """Why the registry at ``path`` forbids a certificate for ``identity``: disabled there
    (``device_disabled``), or with ``unknown_refused`` absent from it (``device_unknown``)."""
    entry = parse_registry(path.read_bytes(), source=str(path)).get(identity)
    if entry is None:
        return CredentialError("device_unknown", f"device {identity} is not in the registry {path}") \
            if unknown_refused else None
    if not entry.enabled:
        return CredentialError("device_disabled", f"device {identity} is disabled in the registry {path}; "
                               "the CA issues nothing for it",
                               hint=f"enable it in {path} first, or re-enrol it on purpose with "
                                    "`gateway-agent devices add|enroll ... --reinstate`")
    return None


class FileCA:
    """The development CA on disk (see module docstring for the layout).

    ``registry`` is the admins' registry the CA reads to refuse a disabled device (default:
    ``registry.yaml`` of the layout, when it exists).
    """

    def __init__(self, root: Path, *, clock: Clock | None = None, registry: Path | None = None) -> None:
        self.dir = Path(root)
        self.clock = clock or SystemClock()
        self.registry = Path(registry) if registry is not None else None

    # paths ---------------------------------------------------------------
    @property
    def chain_path(self) -> Path:
        return self.dir / "ca-chain.pem"

    @property
    def registry_path(self) -> Path:
        return self.dir / "registry.yaml"

    def device_paths(self, identity: str) -> tuple[Path, Path]:
        return self.dir / "devices" / f"{identity}.crt", self.dir / "devices" / f"{identity}.key"

    @property
    def issued_dir(self) -> Path:
        """The issuance ledger: ``issued/<serial hex>.crt``, every certificate this CA signed."""
        return self.dir / "issued"

    def record_issued(self, cert: x509.Certificate) -> None:
        atomic_write_bytes(self.issued_dir / f"{cert.serial_number:x}.crt", cert_pem(cert))

    def certificates_of(self, identity: str, policy: IdentityPolicy | None = None) -> list[x509.Certificate]:
        """Every certificate the CA issued for ``identity``, oldest first (ledger and ``devices/``)."""
        policy = policy or IdentityPolicy()
        found: dict[int, x509.Certificate] = {}
        files = sorted(self.issued_dir.glob("*.crt")) if self.issued_dir.is_dir() else []
        crt, _ = self.device_paths(identity)
        for path in [*files, *([crt] if crt.exists() else [])]:
            try:
                cert = load_cert(path)
                if policy.extract(cert) == identity:
                    found[cert.serial_number] = cert
            except CredentialError:
                continue
        return sorted(found.values(), key=lambda c: (c.not_valid_before_utc, c.serial_number))

    def issuance_refusal(self, identity: str) -> CredentialError | None:
        """Why this CA must not issue for ``identity`` now, or None: revoked as a device
        (``device_revoked``), or disabled in the registry (``device_disabled``)."""
        from gateway_agent.crl_issue import RevocationStore

        blocked = RevocationStore(self).revoked_devices().get(identity)
        if blocked is not None:
            return CredentialError("device_revoked", f"device {identity} was revoked ({blocked.reason}, "
                                   f"{blocked.revoked_at:%Y-%m-%d}); the CA issues nothing for it",
                                   hint=f"re-enrol it on purpose: `gateway-agent devices enroll {identity} "
                                        "--csr ... --reinstate`")
        path = self.registry or self.registry_path
        return registry_refusal(path, identity) if path.exists() else None

    # loading ---------------------------------------------------------------
    def issuing(self) -> IssuingCA:
        try:
            return IssuingCA(load_cert(self.dir / "issuing-ca.crt"), load_key(self.dir / "issuing-ca.key"))
        except FileNotFoundError as exc:
            raise ConfigError(
                f"no CA found in {self.dir}", hint=f"run `gateway-agent pki init-dev --out {self.dir}` first"
            ) from exc

    # issuing ---------------------------------------------------------------
    def issue_device(self, identity: str, *, lifetime: timedelta = DEFAULT_DEVICE_LIFETIME,
                     write: bool = True, public_key: ec.EllipticCurvePublicKey | None = None,
                     reinstate: bool = False) -> Issued:
        """Issue a device certificate (a fresh key, or ``public_key`` from a checked CSR).

        Refuses (``CredentialError``) a device revoked as a device (``device_revoked``) or
        disabled in the registry (``device_disabled``). ``reinstate``: an admin re-enrols it
        on purpose; its block at the CA is lifted (its revoked serials stay revoked) and a
        disabled entry does not refuse it (the enrolment enables it).
        """
        check_identity(identity)
        if reinstate:
            from gateway_agent.crl_issue import RevocationStore

            RevocationStore(self).reinstate(identity)
        else:
            refusal = self.issuance_refusal(identity)
            if refusal is not None:
                raise refusal
        issued = issue_leaf(self.issuing(), identity=identity, now=self.clock.now(), lifetime=lifetime,
                            public_key=public_key)
        self.record_issued(issued.cert)
        if write and issued.key is not None:
            crt, key = self.device_paths(identity)
            assert issued.key is not None
            atomic_write_bytes(key, key_pem(issued.key), mode=0o600)
            atomic_write_bytes(crt, cert_pem(issued.cert))
        return issued


def init_dev(
    out: Path | str,
    *,
    devices: int = 3,
    device_ids: Iterable[str] | None = None,
    operator_ids: Iterable[str] = ("alice",),
    agent_id: str = "gateway-agent",
    force: bool = False,
    clock: Clock | None = None,
    device_lifetime: timedelta = DEFAULT_DEVICE_LIFETIME,
    server_names: Iterable[str] = ("localhost", "127.0.0.1", "::1"),
) -> FileCA:
    """Create the dev PKI in ``out``. Refuses to overwrite an existing CA unless ``force``."""
    out_dir = Path(out)
    clock = clock or SystemClock()
    if (out_dir / "issuing-ca.key").exists() and not force:
        raise ConfigError(
            f"{out_dir} already holds a CA", hint="pass --force to replace it (all existing certificates die)"
        )
    if force:
        # A new CA starts with no revocations, no issuance ledger and CRL number 1.
        # The registry is written anew at the end: its old entries (disabled ones too) go now.
        for stale in ("revoked.json", "crl", "issued", "registry.yaml"):
            path = out_dir / stale
            if path.is_file():
                path.unlink()
            elif path.is_dir():
                for child in path.iterdir():
                    child.unlink()
    now = clock.now()
    root = new_root("Edge Dev Root CA", now)
    issuing = new_intermediate(root, "Edge Dev Issuing CA", now)
    atomic_write_bytes(out_dir / "root-ca.key", key_pem(root.key), mode=0o600)
    atomic_write_bytes(out_dir / "root-ca.crt", cert_pem(root.cert))
    atomic_write_bytes(out_dir / "issuing-ca.key", key_pem(issuing.key), mode=0o600)
    atomic_write_bytes(out_dir / "issuing-ca.crt", cert_pem(issuing.cert))
    atomic_write_bytes(out_dir / "ca-chain.pem", cert_pem(issuing.cert) + cert_pem(root.cert))
    broker = issue_leaf(
        issuing, identity="edge-broker", now=now, lifetime=timedelta(days=365),
        uri_prefix=None, server_names=server_names, client=False,
    )
    assert broker.key is not None
    atomic_write_bytes(out_dir / "broker.key", key_pem(broker.key), mode=0o600)
    atomic_write_bytes(out_dir / "broker.crt", cert_pem(broker.cert) + cert_pem(issuing.cert))
    ca = FileCA(out_dir, clock=clock)
    ids = list(device_ids) if device_ids is not None else [f"device-{n:03d}" for n in range(1, devices + 1)]
    entries: dict[str, DeviceEntry] = {}
    for identity in ids:
        issued = ca.issue_device(identity, lifetime=device_lifetime)
        entries[identity] = DeviceEntry(device_id=identity, pins=(issued.pin,), roles=frozenset({"sensor"}),
                                        attributes={"site": "plant-a", "line": "line-1"})
    operator_blocks: list[str] = []
    for operator in operator_ids:
        check_identity(operator)
        tls = issue_leaf(issuing, identity=operator, now=now, lifetime=timedelta(days=90))
        assert tls.key is not None
        atomic_write_bytes(out_dir / "operators" / f"{operator}.key", key_pem(tls.key), mode=0o600)
        atomic_write_bytes(out_dir / "operators" / f"{operator}.crt", cert_pem(tls.cert))
        signing = new_key()
        atomic_write_bytes(out_dir / "operators" / f"{operator}-signing.key", key_pem(signing), mode=0o600)
        public = signing.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        entries[operator] = DeviceEntry(device_id=operator, pins=(tls.pin,), roles=frozenset({"operator"}),
                                        attributes={"site": "plant-a"})
        indented = "".join(f"          {line}\n" for line in public.decode("ascii").splitlines())
        operator_blocks.append(
            f"  {operator}:\n    keys:\n      - pem: |\n{indented}    scope:\n      - roles: [sensor]\n"
            f"        attributes: {{site: plant-a}}\n"
        )
    if agent_id:
        agent = issue_leaf(issuing, identity=agent_id, now=now, lifetime=timedelta(days=365))
        assert agent.key is not None
        atomic_write_bytes(out_dir / "agent" / f"{agent_id}.key", key_pem(agent.key), mode=0o600)
        atomic_write_bytes(out_dir / "agent" / f"{agent_id}.crt", cert_pem(agent.cert))
        entries[agent_id] = DeviceEntry(device_id=agent_id, pins=(agent.pin,), roles=frozenset({"gateway"}),
                                        attributes={"site": "plant-a"})
    atomic_write_text(out_dir / "operators.yaml",
                      "# Operators' command-signing keys (generated by gateway-agent pki init-dev)\n"
                      "version: 1\noperators:\n" + ("".join(operator_blocks) or "  {}\n"))
    atomic_write_text(ca.registry_path, dump_registry(Registry(devices=entries)))
    return ca
