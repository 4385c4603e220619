"""The trusted CRL state: one owner of "newer than what I trust", for the agent, the broker and the daemon."""

from __future__ import annotations

from datetime import timedelta

import pytest

from edge_core import crl_trust
from edge_core.crl import verify_crl
from edge_core.crl_trust import TrustedCrls, accept_crl
from edge_core.errors import CredentialError
from gateway_agent.pki import IssuingCA, new_intermediate, new_root
from tests.core.test_revocation import NOW, build_crl


@pytest.fixture(scope="module")
def ca() -> IssuingCA:
    yesterday = NOW - timedelta(days=1)
    return new_intermediate(new_root("Trust Root", yesterday), "Trust Issuing CA", yesterday)


def update(trusted: TrustedCrls, ca: IssuingCA, der: bytes):  # type: ignore[no-untyped-def]
    return trusted.update(der, issuers=[ca.cert], now=NOW)


def test_the_first_crl_is_trusted_and_a_higher_number_replaces_it(ca: IssuingCA) -> None:
    trusted = TrustedCrls()
    first = update(trusted, ca, build_crl(ca, number=3, serials=[1]))
    assert first.changed and first.previous_number is None and first.revoked is not None and 1 in first.revoked
    second = update(trusted, ca, build_crl(ca, number=4, serials=[1, 2]))
    assert second.changed and second.previous_number == 3
    assert trusted.get(second.issuer) == second.installed
    assert trusted.installed[second.issuer].crl_number == 4 and trusted.installed[second.issuer].count == 2


def test_the_crl_in_force_again_changes_nothing_and_is_not_walked(ca: IssuingCA) -> None:
    der = build_crl(ca, number=5)
    trusted = TrustedCrls()
    installed = update(trusted, ca, der).installed
    again = update(trusted, ca, der)
    assert not again.changed and again.revoked is None and again.installed == installed
    assert again.previous_number == 5


@pytest.mark.parametrize(("number", "reason"), [(4, "crl_rollback"), (5, "crl_equivocation")])
def test_an_older_or_equivocating_crl_is_refused_and_the_trusted_one_stays(
        ca: IssuingCA, number: int, reason: str) -> None:
    trusted = TrustedCrls()
    installed = update(trusted, ca, build_crl(ca, number=5, serials=[7])).installed
    with pytest.raises(CredentialError) as info:
        update(trusted, ca, build_crl(ca, number=number, serials=[8]))
    assert info.value.reason == reason
    assert dict(trusted.installed) == {installed.issuer: installed}
    if reason == "crl_rollback":
        assert "new CRL number 4 must be >= installed 5" in str(info.value)


def test_a_crl_that_fails_verification_leaves_the_state_alone(ca: IssuingCA) -> None:
    other = new_intermediate(new_root("Other Root", NOW - timedelta(days=1)), "Trust Issuing CA",
                             NOW - timedelta(days=1))
    trusted = TrustedCrls()
    installed = update(trusted, ca, build_crl(ca, number=1)).installed
    with pytest.raises(CredentialError) as info:
        update(trusted, ca, build_crl(ca, number=9, signer=other.key))
    assert info.value.reason == "crl_bad_signature"
    assert dict(trusted.installed) == {installed.issuer: installed}


def test_check_judges_without_trusting_and_a_copy_is_independent(ca: IssuingCA) -> None:
    trusted = TrustedCrls()
    verdict = trusted.check(build_crl(ca, number=2), issuers=[ca.cert], now=NOW)
    assert verdict.changed and not trusted.installed
    staged = trusted.copy()
    update(staged, ca, build_crl(ca, number=2))
    assert not trusted.installed and len(staged.installed) == 1
    with pytest.raises(TypeError):
        trusted.installed["x"] = verdict.installed  # type: ignore[index]


def test_admits_judges_a_record_the_broker_re_read(ca: IssuingCA) -> None:
    trusted = TrustedCrls()
    installed = update(trusted, ca, build_crl(ca, number=6)).installed
    reread = verify_crl(build_crl(ca, number=6), issuers=[ca.cert], now=NOW)
    assert trusted.admits(installed) is False
    with pytest.raises(CredentialError) as info:
        trusted.admits(reread)  # another signature, so other bytes under the same number
    assert info.value.reason == "crl_equivocation"
    assert trusted.admits(verify_crl(build_crl(ca, number=7), issuers=[ca.cert], now=NOW)) is True


def test_state_is_keyed_by_issuer_and_a_mismatched_record_is_a_caller_bug(ca: IssuingCA) -> None:
    installed = accept_crl(build_crl(ca, number=1), issuers=[ca.cert], installed=None, now=NOW).installed
    with pytest.raises(ValueError, match="installed CRL is for"):
        TrustedCrls({"CN=someone else": installed})


def test_the_trusted_state_says_it_does_no_io() -> None:
    doc = crl_trust.__doc__ or ""
    assert "does no I/O" in doc
    assert not {"os", "pathlib", "socket", "asyncio", "urllib"} & set(vars(crl_trust))
