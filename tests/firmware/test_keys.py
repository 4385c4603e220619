"""Release keys in a PKCS#11 token (SoftHSM2): non-extractable, sensitive, and they sign real releases."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from edge_core.errors import ConfigError, CredentialError
from edge_core.firmware import MANIFEST_TYPE, VersionFloor, make_manifest, make_offer, sign_envelope, verify_offer
from gateway_agent.firmware_keys import Pkcs11Token, UnsafeFileKey, generate_unsafe_file_key
from tests.firmware.release import CLASS, NOW, SOFTHSM_MODULE, Release

pytestmark = pytest.mark.integration


def test_token_key_is_sensitive_and_never_leaves_the_token(softhsm_token: str, label: str) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    token = Pkcs11Token(Path(SOFTHSM_MODULE), softhsm_token)
    token.generate(label)
    with token.session() as session:
        private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
        assert private[Attribute.SENSITIVE] is True
        assert private[Attribute.EXTRACTABLE] is False
        assert private[Attribute.NEVER_EXTRACTABLE] is True
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            private[Attribute.VALUE]  # reading the value must fail


def test_token_keys_sign_a_release_that_verifies(softhsm_token: str, label: str) -> None:
    token = Pkcs11Token(Path(SOFTHSM_MODULE), softhsm_token)
    labels = [f"{label}-a", f"{label}-b"]
    for name in labels:
        token.generate(name)
    hsm_keys = token.keys(labels)
    release = Release(release_keys=list(hsm_keys))  # type: ignore[arg-type]
    image = b"firmware image" * 100
    body = make_manifest(device_class=CLASS, version=2, image_sha256=hashlib.sha256(image).hexdigest(),
                         size=len(image), not_before=NOW, expires=NOW.replace(year=2027))
    offer = make_offer(sign_envelope(MANIFEST_TYPE, body, hsm_keys))
    got = verify_offer(offer, root=release.pinned_root(), device_class=CLASS, floor=VersionFloor(1), now=NOW)
    assert got.manifest.signers == {k.keyid for k in hsm_keys}


def test_a_second_key_with_the_same_label_is_refused(softhsm_token: str, label: str) -> None:
    token = Pkcs11Token(Path(SOFTHSM_MODULE), softhsm_token)
    token.generate(label)
    with pytest.raises(ConfigError, match="already holds"):
        token.generate(label)


def test_wrong_pin_and_missing_pin(softhsm_token: str, label: str, monkeypatch: pytest.MonkeyPatch) -> None:
    token = Pkcs11Token(Path(SOFTHSM_MODULE), softhsm_token)
    token.generate(label)
    monkeypatch.setenv("FIRMWARE_TOKEN_PIN", "00000000")
    with pytest.raises(CredentialError) as info:
        token.key(label)
    assert info.value.reason == "bad_pin"
    monkeypatch.delenv("FIRMWARE_TOKEN_PIN")
    with pytest.raises(ConfigError, match="FIRMWARE_TOKEN_PIN"):
        token.key(label)


def test_unsafe_file_key_warns_loudly(tmp_path: Path) -> None:
    with capture_logs() as logs:
        generate_unsafe_file_key(tmp_path / "dev.key")
        key = UnsafeFileKey(tmp_path / "dev.key")
    warnings = [e for e in logs if e["event"] == "firmware.unsafe_file_key"]
    assert len(warnings) == 2 and all(e["log_level"] == "warning" for e in warnings)
    assert "UNSAFE" in warnings[1]["detail"] and warnings[1]["keyid"] == key.keyid[:16]
    assert (tmp_path / "dev.key").stat().st_mode & 0o777 == 0o600


def test_an_extractable_key_on_the_token_is_refused_for_signing(softhsm_token: str, label: str) -> None:
    """A key someone imported or generated as extractable could have been copied: never sign with it."""
    from pkcs11 import Attribute, KeyType
    from pkcs11.util.ec import encode_named_curve_parameters

    from gateway_agent.firmware_keys import Pkcs11Key

    token = Pkcs11Token(Path(SOFTHSM_MODULE), softhsm_token)
    with token.session(rw=True) as session:
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
        params.generate_keypair(store=True, label=label, private_template={
            Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True, Attribute.SIGN: True})
    key = token.key(label)
    assert isinstance(key, Pkcs11Key)
    with pytest.raises(CredentialError) as info:
        key.sign(b"manifest")
    assert info.value.reason == "key_exportable"
