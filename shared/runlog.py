"""Logging shared by both trainers: one format, so one parser reads both.

Rank 0 appends to logs/{RUN_ID}.txt and prints; the log starts with the
trainer's source and the config, as the official script does.
"""
from __future__ import annotations

import math
import os
import platform
import re
import resource
import sys
from pathlib import Path

from shared.config import Hyperparameters
from shared.shipped import git_commit, read_source, repo_root, source_digests


class RunLog:
    def __init__(self, run_id: str, enabled: bool = True, log_dir: str = "logs"):
        self.enabled = enabled
        self.path = Path(log_dir) / f"{run_id}.txt"
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, msg: str, console: bool = True) -> None:
        if not self.enabled:
            return
        if console:
            print(msg, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(msg + "\n")

    def header(self, source_path: str, cfg: Hyperparameters, backend: str) -> None:
        """The trainer's source, the hash of every repo module this process runs, the git commit, the config."""
        self(read_source(source_path), console=False)
        self("=" * 100, console=False)
        self(f"backend:{backend} python:{sys.version.split()[0]} platform:{platform.platform()} pid:{os.getpid()}")
        digests = source_digests([Path(source_path)] + loaded_repo_files())
        self("sources:" + " ".join(f"{name}={digest}" for name, digest in digests.items()), console=False)
        self(f"git_commit:{git_commit(repo_root()) or 'none'}", console=False)
        self(f"config:{cfg.to_json()}")


def loaded_repo_files() -> list[Path]:
    """Source files of the repo's modules loaded in this process (what ran, whichever trainer it was)."""
    root = repo_root()
    if root is None:  # a bundle: its one file is the trainer itself
        return []
    # Only absolute paths that exist: some extension modules carry a bare relative __file__ ("_classes.py").
    names = [getattr(m, "__file__", None) for m in list(sys.modules.values())]
    files = {Path(f).resolve() for f in names if isinstance(f, str) and os.path.isabs(f)}
    return sorted(f for f in files if f.is_relative_to(root) and ".venv" not in f.parts and f.suffix == ".py"
                  and f.is_file())


def rss_peak_line() -> str:
    """Peak memory where no allocator reports it (a CPU): the process's max resident set."""
    return f"peak memory (process max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB"


def step_line(step: int, iterations: int, train_loss: float, train_ms: float) -> str:
    return (f"step:{step}/{iterations} train_loss:{train_loss:.4f} train_time:{train_ms:.0f}ms "
            f"step_avg:{train_ms / max(step, 1):.2f}ms")


def val_line(step: int, iterations: int, val_loss: float, val_bpb: float, train_ms: float) -> str:
    return (f"step:{step}/{iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} train_time:{train_ms:.0f}ms "
            f"step_avg:{train_ms / max(step, 1):.2f}ms")


def final_lines(tokens: int, n_bytes: int, size_line: str, val_loss: float, val_bpb: float, eval_ms: float) -> list[str]:
    return [f"val_tokens:{tokens} val_bytes:{n_bytes}", size_line,
            f"final_roundtrip_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} eval_time:{eval_ms:.0f}ms"]


def log_final(log, acc, artifact_path: str, trainer_path: str, eval_ms: float) -> None:
    """The three closing lines of a run or an --eval; then a non-finite score or the byte cap is an error."""
    from shared.artifact import size_report
    report = size_report(artifact_path, trainer_path)
    for line in final_lines(acc.tokens, acc.bytes, report.line(artifact_path), acc.val_loss, acc.val_bpb, eval_ms):
        log(line)
    if not (math.isfinite(acc.val_loss) and math.isfinite(acc.val_bpb)):
        raise FloatingPointError(f"artifact {artifact_path} scores val_bpb {acc.val_bpb}: not a usable model")
    report.check(artifact_path)


_FINAL = re.compile(r"final_roundtrip_exact val_loss:(?P<val_loss>[0-9.]+) val_bpb:(?P<val_bpb>[0-9.]+)")
_TRAIN = re.compile(r"^step:(?P<step>\d+)/\d+ train_loss:(?P<loss>[0-9.naif]+)", re.M)


def parse_final(text: str) -> dict[str, float]:
    """val_loss/val_bpb of the last final line in a log or stdout; ValueError if there is none."""
    matches = list(_FINAL.finditer(text))
    if not matches:
        raise ValueError("no final_roundtrip_exact line found")
    return {k: float(v) for k, v in matches[-1].groupdict().items()}


def parse_train_losses(text: str) -> dict[int, float]:
    return {int(m["step"]): float(m["loss"]) for m in _TRAIN.finditer(text)}
