"""``gateway-agent firmware``: release keys, roots, signing, verifying and staged publishing.

Exit codes: 0 success; 1 refused, failed or halted by failure reports (one line says why);
2 usage error; 4 settings or an input file missing, unreadable or invalid.

The settings are ``-c/--config``, else ``$EDGE_GATEWAY_CONFIG_DIR/firmware.yaml``, else
``/etc/edge-gateway/firmware.yaml`` (never the working directory); relative paths in them
are relative to the file.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from edge_core.clock import SystemClock
from edge_core.errors import ConfigError
from edge_core.events import SecurityEvents
from edge_core.files import atomic_write_bytes
from edge_core.firmware import (
    MANIFEST_TYPE,
    ROOT_TYPE,
    FirmwareRefused,
    ImageCheck,
    VersionFloor,
    add_signatures,
    make_manifest,
    make_root,
    parse_root_document,
    sign_envelope,
    verify_release,
    verify_root_update,
)
from edge_runtime.cli_support import EXIT_OK, EXIT_REFUSED, add_config_argument
from gateway_agent.firmware_settings import FirmwareToolSettings, load_firmware_settings

CONFIG_NAME = "firmware.yaml"
EXIT_HALTED = EXIT_REFUSED  # the rollout stopped on failure reports: the answer is no


def add_parser(sub: Any) -> None:
    fw = sub.add_parser("firmware", help="signed firmware releases (docs/firmware.md)", description=__doc__)
    verbs = fw.add_subparsers(dest="verb", required=True)

    def verb(name: str, text: str) -> argparse.ArgumentParser:
        exits = " ".join(__doc__.split("\n\n")[1].split())
        p: argparse.ArgumentParser = verbs.add_parser(name, help=text, description=f"{text}. {exits}")
        add_config_argument(p, CONFIG_NAME, what="release tool settings")
        return p

    p = verb("keygen", "create release or root keys (on the token; never exported)")
    p.add_argument("labels", nargs="+")
    p.set_defaults(func=_keygen)

    p = verb("root", "sign the next root (the release-key list) from the keys in the settings")
    p.add_argument("--version", type=int, required=True, help="1 for the first (pinned) root, then N+1")
    p.add_argument("--expires-days", type=int, default=365)
    p.add_argument("--release-keys", nargs="+", help="the n release keys it lists (default: keys.release)")
    p.add_argument("--release-threshold", type=int, required=True, help="k of the release keys sign a manifest")
    p.add_argument("--root-threshold", type=int, default=1)
    p.add_argument("--unsafe-single-key", action="store_true",
                   help="accept --release-threshold 1 (one stolen release key could then ship firmware)")
    p.add_argument("--also-sign", nargs="*", default=[], help="old root keys that vouch for a rotated root")
    p.set_defaults(func=_root)

    p = verb("sign", "sign a firmware manifest for an image with the release keys")
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--class", dest="device_class", required=True, help="device class (registry firmware_class)")
    p.add_argument("--version", type=int, required=True, help="monotonic firmware version (the rollback counter)")
    p.add_argument("--valid-days", type=int, default=30)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_sign)

    p = verb("cosign", "add this signer's release-key signatures to a manifest another holder signed")
    p.add_argument("--manifest", type=Path, required=True, help="rewritten in place (atomically)")
    p.set_defaults(func=_cosign)

    p = verb("verify", "verify a manifest (and image) as a device would")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--image", type=Path)
    p.add_argument("--class", dest="device_class", help="the device's class (default: the manifest's)")
    p.add_argument("--floor", type=int, default=0, help="the device's anti-rollback counter")
    p.set_defaults(func=_verify)

    p = verb("publish", "serve the image and offer it to the devices of its class, staged")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--devices", help="comma-separated devices instead of every device of the class")
    p.set_defaults(func=_publish)


def _settings(args: argparse.Namespace) -> FirmwareToolSettings:
    return load_firmware_settings(args.config)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror}", source=str(path),
                          hint="check the path and its permissions") from exc


def _keygen(args: argparse.Namespace) -> int:
    s = _settings(args)
    for label in args.labels:
        if s.token is not None:
            public = s.token.generate(label)
        else:
            from gateway_agent.firmware_keys import generate_unsafe_file_key

            if label not in s.unsafe_files:
                raise ConfigError(f"label {label!r} is not under keys.unsafe_file_keys", source=s.source)
            public = generate_unsafe_file_key(s.unsafe_files[label])
        from edge_core.firmware import key_id

        print(f"{label} keyid={key_id(public)}")
    return 0


def _root(args: argparse.Namespace) -> int:
    if args.release_threshold < 2 and not args.unsafe_single_key:
        raise ConfigError("--release-threshold 1 lets one stolen release key ship firmware",
                          hint="use 2 or more (k of n), or pass --unsafe-single-key for a development root")
    s = _settings(args)
    release = s.signers(tuple(args.release_keys) if args.release_keys else s.release_keys)
    root = s.signers(s.root_keys)
    also = s.signers(tuple(args.also_sign)) if args.also_sign else []
    body = make_root(version=args.version, expires=SystemClock().now() + timedelta(days=args.expires_days),
                     keys=[k.public_key() for k in {x.keyid: x for x in (*root, *release)}.values()],
                     root_keyids=[k.keyid for k in root], root_threshold=args.root_threshold,
                     release_keyids=[k.keyid for k in release], release_threshold=args.release_threshold)
    envelope = sign_envelope(ROOT_TYPE, body, list({x.keyid: x for x in (*root, *also)}.values()))
    target = s.roots_dir / f"{args.version}.root.json"
    if target.exists():
        raise ConfigError(f"{target} exists; roots are never rewritten, sign version N+1")
    if args.version == 1:
        parse_root_document(envelope)
    else:
        chain = s.chain()
        if len(chain) != args.version - 1:
            raise ConfigError(f"the next root is version {len(chain) + 1}, not {args.version}")
        trusted = parse_root_document(chain[0])
        for link in chain[1:]:
            trusted = verify_root_update(trusted, link)
        verify_root_update(trusted, envelope)  # old root keys must vouch for it
    atomic_write_bytes(target, envelope)
    print(f"root v{args.version} written to {target}: {len(release)} release keys, "
          f"threshold {args.release_threshold}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    s = _settings(args)
    digest, size = hashlib.sha256(), 0
    try:
        with args.image.open("rb") as handle:
            while chunk := handle.read(1 << 16):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise ConfigError(f"cannot read image: {exc.strerror}", source=str(args.image),
                          hint="check the path and its permissions") from exc
    now = SystemClock().now()
    body = make_manifest(device_class=args.device_class, version=args.version, image_sha256=digest.hexdigest(),
                         size=size, not_before=now - timedelta(minutes=5),
                         expires=now + timedelta(days=args.valid_days))
    envelope = sign_envelope(MANIFEST_TYPE, body, s.signers(s.release_keys))
    atomic_write_bytes(args.out, envelope)
    print(f"signed {args.device_class} v{args.version} sha256={digest.hexdigest()[:16]}... "
          f"with {len(s.release_keys)} release key(s) -> {args.out}")
    return 0


def _cosign(args: argparse.Namespace) -> int:
    s = _settings(args)
    try:
        envelope = add_signatures(_read(args.manifest, "manifest"), s.signers(s.release_keys))
    except FirmwareRefused as exc:
        print(f"REFUSED reason={exc.reason}: {exc}")
        return 1
    atomic_write_bytes(args.manifest, envelope)
    print(f"{args.manifest}: {len(json.loads(envelope)['signatures'])} signature(s)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    s = _settings(args)
    try:
        verified = verify_release(_read(args.manifest, "manifest"), s.chain(), now=SystemClock().now(),
                                  device_class=args.device_class, floor=VersionFloor(args.floor))
    except FirmwareRefused as exc:
        print(f"REFUSED reason={exc.reason}: {exc}")
        return 1
    m = verified.manifest
    if args.image is not None:
        check = ImageCheck(m)
        try:
            with args.image.open("rb") as handle:
                while chunk := handle.read(1 << 16):
                    check.update(chunk)
            check.finish()
        except FirmwareRefused as exc:
            print(f"REFUSED reason={exc.reason}: {exc}")
            return 1
    print(f"ok {m.device_class} v{m.version} sha256={m.sha256[:16]}... size={m.size} "
          f"signers={len(m.signers)} root=v{verified.root.version} expires={m.expires.isoformat()}")
    return 0


def _publish(args: argparse.Namespace) -> int:
    from gateway_agent.firmware_publish import publish_release

    s = _settings(args)
    if s.publish is None:
        raise ConfigError("no 'publish' section in the firmware settings", source=s.source)
    devices = [d for d in args.devices.split(",") if d] if args.devices else None
    events = SecurityEvents("gateway-agent")
    try:
        result = asyncio.run(publish_release(s.publish, chain=s.chain(), manifest_envelope=_read(args.manifest,
                             "manifest"), image=args.image, clock=SystemClock(), events=events, devices=devices))
    except FirmwareRefused as exc:
        print(f"REFUSED reason={exc.reason}: {exc}")
        return 1
    summary = result.summary
    print(f"canaries first: {', '.join(summary['canaries'])}")
    print(f"{summary['phase']}: v{result.manifest.version} confirmed on {len(summary['confirmed'])} device(s), "
          f"failed on {len(summary['failed'])}" + (f"; halted: {summary['halted']}" if result.halted else ""))
    return EXIT_HALTED if result.halted else EXIT_OK
