"""scripts/gpu_check.sh on a CPU with a tiny preset (the script itself), and its arithmetic (bench/gpu_check.py)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench import gpu_check as gc
from shared.data import load_shard

ROOT = Path(__file__).resolve().parents[1]


def test_script_runs_on_a_cpu_and_prints_every_figure(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PRESET="tiny_record", TRAIN_BATCH_TOKENS="2048",
               GPU_CHECK_WARMUP="1", GPU_CHECK_STEPS="1", GPU_CHECK_DATA_TOKENS="50000", GPU_CHECK_TTT_DOCS="2",
               GPU_CHECK_TTT_SECONDS="1", GPU_CHECK_SGD_STEPS="1", TTT_CHUNK_SIZE="64", OMP_NUM_THREADS="1")
    run = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert re.search(r"=== train rc=0", out) and re.search(r"=== ttt rc=0", out), out
    train = gc.parse_fields(out, "gpu_check_train")
    for key in ("ms_per_step_unlooped", "ms_per_step_looped", "tokens_per_s_gpu", "export_s", "compile_s"):
        assert float(train[key]) > 0, (key, train)
    assert train["mfu_pct"] == "n/a"  # no bf16 peak on a CPU: said, not invented
    assert float(gc.parse_fields(out, "ttt_gpu_projection")["projected_8gpu_s"]) > 0
    assert gc.peak_memory_mib(out) > 0
    assert re.search(r"^verdict: behind the record on tokens_per_s_gpu", out, re.M), out


def fields(**kw) -> dict[str, str]:
    return {k: str(v) for k, v in kw.items()}


def test_verdict_passes_a_record_pace_and_names_each_figure_behind():
    fast = fields(tokens_per_s_gpu=900_000, projected_8x_ms_per_step=109.2, export_s=30.0, mfu_pct=40.0)
    lines = gc.verdict_lines(fast, fields(projected_8gpu_s=480.0), peak_mib=50_000)
    assert lines[-1] == "verdict: at or past the record on every figure", lines
    slow = dict(fast, tokens_per_s_gpu="614000", projected_8x_ms_per_step="160.1")
    lines = gc.verdict_lines(slow, fields(projected_8gpu_s=520.0), peak_mib=90_000)
    assert lines[-1] == ("verdict: behind the record on tokens_per_s_gpu, projected_8x_ms_per_step, peak_gib, "
                         "ttt_projected_8x_s"), lines
    assert "tokens_per_s_gpu:614000/807757:BEHIND" in lines[0]


def test_a_missing_figure_is_not_applicable_never_a_pass():
    lines = gc.verdict_lines(fields(tokens_per_s_gpu=900_000), {}, None)
    assert "tokens_per_s_gpu:900000/807757:ok" in lines[0] and "ttt_projected_8x_s:n/a" in lines[0]
    assert lines[-1] == ("verdict: not measured: projected_8x_ms_per_step, peak_gib, export_s, "
                         "ttt_projected_8x_s"), lines


def test_mean_context_counts_keys_within_each_document():
    x = np.array([[gc.BOS, 5, 6, 7, gc.BOS, 5, 6, 7]])  # two documents of 4: 1+2+3+4 keys each
    assert gc.mean_context(x, seq_len=8) == 2.5
    assert gc.mean_context(x, seq_len=2) == 1.5  # pieces of at most 2 tokens


def test_synthetic_shards_have_the_split_mean_document(tmp_path):
    gc.write_synthetic_shards(str(tmp_path), vocab_size=8192, tokens=400_000, seed=3)
    tokens = load_shard(tmp_path / "fineweb_train_000000.bin", vocab_size=8192)
    starts = np.flatnonzero(tokens == gc.BOS)
    assert starts[0] == 0 and tokens.size == 400_000
    assert abs(np.diff(starts).mean() - 1 - gc.SYNTH_MEAN_TOKENS) < 0.15 * gc.SYNTH_MEAN_TOKENS


def test_looped_steps_count_more_flops():
    cfg = gc.Hyperparameters.from_env({"PRESET": "record"})
    off, on = gc.flops_per_token(cfg, False, 500.0), gc.flops_per_token(cfg, True, 500.0)
    assert on / off > 1.3  # 17 layer applications against 11
