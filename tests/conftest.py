"""Shared fixtures. Real data lives outside the repo; tests needing it skip cleanly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    return Path(os.environ.get("NUCLI_TEST_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or $NUCLI_TEST_DATA); skips the test when absent."""
    d = _data_dir()
    if not d.is_dir():
        pytest.skip(f"real test data not available at {d} (set NUCLI_TEST_DATA)")
    return d


@pytest.fixture(scope="session")
def cmu_slide(shared_data: Path) -> Path:
    p = shared_data / "slides" / "CMU-1-Small-Region.svs"
    if not p.exists():
        pytest.skip(f"{p} not available")
    return p


@pytest.fixture(scope="session")
def dsb2018(shared_data: Path) -> Path:
    p = shared_data / "dsb2018"
    if not p.is_dir():
        pytest.skip(f"{p} not available")
    return p
