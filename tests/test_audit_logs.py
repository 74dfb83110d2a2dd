"""tools/audit_logs.py: the time budgets and the byte cap pass within the rules and fail outside them."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from shared.artifact import BYTE_LIMIT, SizeReport
from shared.config import Hyperparameters
from shared.runlog import final_lines, step_line, val_line
from tools.audit_logs import check_size, check_time_budgets
from tools.bundle import bundle_bytes
from shared.runlog import SEPARATOR


def write_log(path: Path, train_s: float, eval_s: float = 100.0, hessians_s: float | None = None,
              no_ttt_s: float | None = None, warmup_s: float | None = None,
              backend: str = "torch-2.13.0 device:cpu gpu:none world:1 dtype:float32",
              steps: int = 20, finished: bool = True, val_every: int = 10, artifact_bytes: int = 60_000) -> Path:
    """A run log as shared/loop.py writes it (RunLog.header's layout, runlog's line functions), train_s spread
    evenly over the steps; hessians_s: a GPTQ export after the cap; no_ttt_s: a TTT evaluation after a plain one;
    warmup_s: with it, TTT_COMPILE's warm-up."""
    cfg = dataclasses.replace(Hyperparameters(), run_id=path.stem, seed=7, iterations=steps)
    lines = ["# the trainer's source", SEPARATOR, f"backend:{backend} python:3.12.0 platform:test pid:1",
             f"config:{cfg.to_json()}"]
    ms = lambda s: 1000.0 * train_s * s / steps  # noqa: E731
    for s in range(steps + 1):
        if s:
            lines.append(step_line(s, steps, 6.0 - 3.0 * s / steps, ms(s)))
        if s % val_every == 0:  # step 0 too, as shared/loop.py validates before the first step
            lines.append(val_line(s, steps, 5.0 - 2.0 * s / steps, 3.0 - s / steps, ms(s)))
    if finished:
        if hessians_s is not None:
            lines.append(f"export quant:gptq compressor:zstd calibrated:12/12 hessians:{hessians_s:.2f}s "
                         f"gptq:40.00s coding:3.00s")
        if no_ttt_s is not None:
            lines.append(f"no_ttt val_loss:3.1 val_bpb:1.9 eval_time:{1000 * no_ttt_s:.0f}ms")
            if warmup_s is not None:
                lines.append(f"ttt_warmup seconds:{warmup_s:.2f} widths:48,96,2048 (TTT_COMPILE: ...)")
            lines.append(f"ttt val_loss:3.0 val_bpb:1.8 eval_time:{1000 * eval_s:.0f}ms docs:50 legality:ok")
        size = SizeReport(artifact_bytes, 50_000).line(f"artifacts/{path.stem}.int8.zst")
        lines += final_lines(25_000, 60_000, size, 3.0, 1.8, 1000 * eval_s)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _status(findings) -> dict[str, str]:
    return {f.name: f.status for f in findings}


def test_no_logs_is_a_skip():
    (f,) = check_time_budgets([])
    assert f.status == "SKIP" and not f.failed


def test_runs_within_the_budgets_pass(tmp_path):
    logs = [write_log(tmp_path / "s1.txt", 590.0, eval_s=500.0),
            write_log(tmp_path / "s2.txt", 560.0, eval_s=300.0, hessians_s=30.0, no_ttt_s=200.0, warmup_s=90.0)]
    found = check_time_budgets([str(p) for p in logs])
    assert _status(found) == {"train_time[s1.txt]": "PASS", "eval_time[s1.txt]": "PASS",
                              "train_time[s2.txt]": "PASS", "eval_time[s2.txt]": "PASS"}, found
    assert "590.0s <= 600s" in found[0].figure and "hessians 30.0s" in found[2].figure
    assert "590.0s <= 600s (TTT evaluation 300.0s + no_ttt pass 200.0s + TTT compile warm-up 90.0s)" in found[3].figure


@pytest.mark.parametrize("kwargs,failing", [
    (dict(train_s=610.0), "train_time"),
    (dict(train_s=590.0, hessians_s=12.0), "train_time"),  # over only because of the Hessians after the cap
    (dict(train_s=500.0, eval_s=601.0), "eval_time"),
    (dict(train_s=500.0, eval_s=450.0, no_ttt_s=200.0), "eval_time"),  # TTT after a plain pass: both count
    (dict(train_s=500.0, eval_s=480.0, no_ttt_s=20.0, warmup_s=110.0), "eval_time"),  # over by the compile
], ids=["steps", "hessians_after_cap", "final_eval", "ttt_plus_plain", "ttt_compile_warmup"])
def test_a_run_over_a_budget_fails(tmp_path, kwargs, failing):
    log = write_log(tmp_path / "s1.txt", **kwargs)
    found = _status(check_time_budgets([str(log)]))
    assert found[f"{failing}[s1.txt]"] == "FAIL", found
    assert [k for k, v in found.items() if v == "FAIL"] == [f"{failing}[s1.txt]"]


def test_quantization_after_the_cap_is_not_training(tmp_path):
    """gptq: and coding: read only the weights: 590 s of steps + 40 s of GPTQ + 3 s of coding still pass."""
    log = write_log(tmp_path / "s1.txt", 590.0, hessians_s=5.0)
    assert _status(check_time_budgets([str(log)]))["train_time[s1.txt]"] == "PASS"


def test_an_unfinished_log_fails_naming_why(tmp_path):
    log = write_log(tmp_path / "s1.txt", 100.0, finished=False)
    found = check_time_budgets([str(log)])
    assert all(f.failed and "did the run finish" in f.figure for f in found), found


def _sized(path: Path, n: int) -> str:
    with open(path, "wb") as f:
        f.truncate(n)  # sparse: n bytes of size without writing them
    return str(path)


def test_size_counts_the_compressed_bundle_and_names_the_margin(tmp_path):
    code = len(bundle_bytes(compress=True))
    fits, over = _sized(tmp_path / "fits.zst", BYTE_LIMIT - code), _sized(tmp_path / "over.zst", BYTE_LIMIT - code + 7)
    (f,) = check_size(fits)
    assert f.status == "PASS" and f"= {BYTE_LIMIT} <= {BYTE_LIMIT} (0 under)" in f.figure, f.figure
    (f,) = check_size(over)
    assert f.status == "FAIL" and f"= {BYTE_LIMIT + 7} > {BYTE_LIMIT} (7 over)" in f.figure, f.figure
    assert check_size(str(tmp_path / "missing.zst"))[0].failed
