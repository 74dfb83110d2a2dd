"""One log schema: the line builders of shared/runlog.py and its one parser agree, on one number grammar, and no
tool keeps a parser of its own."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from shared import runlog

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text,value", [("1.5", 1.5), ("123ms", 123.0), ("0.28s", 0.28), ("1e-3", 1e-3),
                                        ("-2.5E+2", -250.0), (".5", 0.5), ("inf", math.inf), ("-inf", -math.inf)])
def test_the_number_grammar(text, value):
    assert runlog.number({"k": text}, "k") == value


def test_nan_is_a_number_too():
    assert math.isnan(runlog.number({"train_loss": "nan"}, "train_loss"))


@pytest.mark.parametrize("text", ["abc", "1.2.3", "12x", "", "1.5 ms"])
def test_a_malformed_number_is_one_line_naming_the_file(text):
    with pytest.raises(ValueError, match=r"^logs/r\.txt: k:.* is not a number$"):
        runlog.number({"k": text}, "k", "logs/r.txt")


def test_every_builder_round_trips_through_the_parser():
    lines = [runlog.step_line(7, 20, float("nan"), 1234.0), runlog.val_line(10, 20, 2.5, 1.25, 2000.0),
             *runlog.final_lines(1000, 4200, "artifact:a.bin artifact_bytes:5 code_bytes:6 total_bytes:11 limit:16",
                                 2.75, 1.125, 3456.0)]
    train, val = runlog.of_kind(lines, "train"), runlog.of_kind(lines, "val")
    assert [runlog.step_of(f) for f in train + val] == [7, 10]
    assert math.isnan(runlog.number(train[0], "train_loss")) and runlog.number(train[0], "train_time") == 1234.0
    assert runlog.number(val[0], "val_bpb") == 1.25
    final = runlog.of_kind(lines, "final")[0]
    assert [runlog.number(final, k) for k in ("val_loss", "val_bpb", "eval_time")] == [2.75, 1.125, 3456.0]
    counts = runlog.of_kind(lines, "val_counts")[0]
    assert (runlog.number(counts, "val_tokens"), runlog.number(counts, "val_bytes")) == (1000, 4200)
    assert runlog.parse_final("\n".join(lines)) == {"val_loss": 2.75, "val_bpb": 1.125}


def test_a_log_without_a_seed_is_one_line_not_a_traceback(tmp_path):
    log = tmp_path / "run.txt"
    log.write_text('backend:torch\nconfig:{"run_id": "r"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^log {log}: no config line with its fields"):
        runlog.parse_log(log)


def test_no_tool_parses_logs_with_its_own_patterns():
    """The tools read logs through shared/runlog.py: none compiles a pattern for a log line of its own, and the
    audit no longer reaches the submission tool for its parser (the old audit -> submission -> audit circle)."""
    for name in ("submission", "audit_logs", "plot"):
        tree = ast.parse((ROOT / "tools" / f"{name}.py").read_text(encoding="utf-8"))
        compiled = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") in
                    ("compile", "findall", "finditer") and getattr(n.func.value, "id", "") == "re"]
        assert not compiled, f"tools/{name}.py parses log lines itself at lines {compiled}"
    audit_logs = (ROOT / "tools" / "audit_logs.py").read_text(encoding="utf-8")
    assert "tools.submission" not in audit_logs
