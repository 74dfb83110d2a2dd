"""Fixtures for shared/ and data/ tests: the team reference data, skipped where absent."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def reference_data() -> Path:
    if not (REFERENCE_DATA / "tokenizers" / "fineweb_1024_bpe.model").is_file():
        pytest.skip("../shared/data reference files are absent")
    return REFERENCE_DATA
