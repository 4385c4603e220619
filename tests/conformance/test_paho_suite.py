"""The Paho MQTT 3.1.1 interoperability suite, all 10 tests, against our broker over mTLS.

Skips (with where it looked) when the suite is not available: see tests/conformance/paho.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conformance import paho

pytestmark = pytest.mark.integration


def test_paho_interoperability_suite_passes_against_our_broker(tmp_path: Path) -> None:
    try:
        suite = paho.locate_suite()
    except paho.SuiteUnavailable as exc:
        pytest.skip(str(exc))
    certs = paho.make_credentials(tmp_path / "certs")
    with paho.running_broker("ours", certs) as port:
        outcomes = paho.run_suite(suite, port, certs)
    failed = sorted(name for name, ok in outcomes.items() if not ok)
    assert len(outcomes) == paho.SUITE_TESTS, f"the suite ran {len(outcomes)} tests, not {paho.SUITE_TESTS}"
    assert not failed, f"{paho.SUITE_TESTS - len(failed)}/{paho.SUITE_TESTS} passed; failed: {failed}"
