"""README's "Adding a feature" recipe stays true: every file it names exists, and every other name it puts in
backticks (a table, a spec, a test) is defined in one of the files that bullet names."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START = "Adding a feature, the exact edits"


def recipe_bullets() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    if START not in text:
        pytest.fail(f"README.md lost its section starting {START!r}")
    section = text.split(START, 1)[1].split("\n## ", 1)[0].split("\n\n", 2)[1]
    return [b for b in re.split(r"\n- ", "\n" + section) if b.strip()]


def test_the_recipe_has_its_three_kinds_of_knob():
    assert len(recipe_bullets()) == 3


@pytest.mark.parametrize("index", range(3))
def test_every_name_in_a_bullet_is_defined_where_it_says(index):
    bullet = recipe_bullets()[index]
    names = re.findall(r"`([^`]+)`", bullet)
    files = [n for n in names if n.endswith(".py")]
    assert files, bullet
    for f in files:
        assert (ROOT / f).is_file(), f"README names {f}, which does not exist"
    sources = "\n".join((ROOT / f).read_text(encoding="utf-8") for f in files)
    examples = {"silu2", "mlp_act=silu2", "MUON_NESTEROV", "model", 'reads="optimizer"'}  # what the user adds
    for name in (n for n in names if not n.endswith(".py") and n not in examples):
        assert re.search(rf"\b{re.escape(name)}\b", sources), f"README's {name!r} is in none of {files}"
