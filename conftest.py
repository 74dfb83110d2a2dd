"""Fixtures for every suite: a tiny dataset built offline, and how to run a trainer on it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:  # mlx_cpu_ops must be the first to import mlx: it puts a fast BLAS under mlx[cpu] (see its docstring)
    import mlx_cpu_ops  # noqa: F401
except ImportError:
    pass

# 384, not the style guide's 128: a byte-fallback tokenizer needs 256 byte pieces + 4 specials.
TINY_VOCAB = 384

# The modules that take longest (most trainer runs), longest first. scripts/test.sh's workers (pytest-xdist,
# --dist loadscope) take whole modules in collection order, so one of these started last would leave the other
# worker idle for its length; every other module keeps its place after them. Speed only: any order passes.
HEAVY_MODULES = ("tests/test_trainers.py", "parity_tests/test_record_preset.py", "tests/test_submission.py",
                 "parity_tests/test_parity.py", "tests/test_ttt_eval.py", "tests/test_ttt_speed.py",
                 "parity_tests/test_parity_ttt.py", "tests/test_minify.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_MODULES)}
    items.sort(key=lambda item: rank.get(Path(os.path.relpath(str(item.fspath), ROOT)).as_posix(), len(rank)))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, str]:
    """Demo documents tokenized with a freshly trained 384-token BPE: DATA_PATH and TOKENIZER_PATH."""
    from data.build import build_dataset
    from data.corpus import demo_documents
    out = tmp_path_factory.mktemp("tinydata")
    build_dataset(demo_documents()[:160], "tiny", out, val_docs=8, tokenizer=None, vocab_size=TINY_VOCAB,
                  shard_tokens=60_000)
    return {"DATA_PATH": str(out / "datasets" / "tiny"), "TOKENIZER_PATH": str(out / "tokenizers" / "tiny.model")}


def tiny_env(tiny_data: dict, tmp_path: Path, **overrides) -> dict[str, str]:
    """2 layers, width 64, 4/2 heads, seq 32, 8 micro-batches of 8 sequences; fp32 on CPU."""
    env = dict(os.environ, PRESET="tiny", VOCAB_SIZE=str(TINY_VOCAB), TRAIN_SEQ_LEN="32", TRAIN_BATCH_TOKENS="2048",
               VAL_BATCH_SIZE="4096", MLX_MAX_MICROBATCH_TOKENS="128", ITERATIONS="20", WARMUP_STEPS="2",
               WARMDOWN_ITERS="5", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1", MAX_WALLCLOCK_SECONDS="0",
               COMPUTE_DTYPE="float32", RUN_ID="tiny", ARTIFACT_PATH=str(tmp_path / "tiny.int8.zst"),
               OMP_NUM_THREADS="1", PYTHONHASHSEED="0", **tiny_data)
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_script(args: list[str], env: dict, cwd: Path, check: bool = True, torchrun: int = 0) -> subprocess.CompletedProcess:
    """Run a trainer (optionally under torchrun with N processes); on failure show its output."""
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] + args
    else:
        cmd = [sys.executable] + args
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res
