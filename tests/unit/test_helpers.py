"""tests/helpers.py: a missing ../shared fixture skips locally and fails under CI=true."""

import pytest

from tests.helpers import SHARED_FIXTURES, shared_fixture


def test_missing_shared_fixture_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-fixture"):
        shared_fixture("no-such-fixture")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-fixture"):
        shared_fixture("no-such-fixture")


def test_present_fixture_is_returned(monkeypatch):
    monkeypatch.setenv("CI", "true")
    if not SHARED_FIXTURES.is_dir():
        pytest.skip("no ../shared beside this checkout")
    assert shared_fixture() == SHARED_FIXTURES
