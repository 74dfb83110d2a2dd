"""Shared fixtures: the repo on sys.path, the team reference data (skipped where absent)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
REFERENCE_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def reference_data() -> Path:
    if not (REFERENCE_DATA / "tokenizers" / "fineweb_1024_bpe.model").is_file():
        pytest.skip("../shared/data reference files are absent")
    return REFERENCE_DATA
