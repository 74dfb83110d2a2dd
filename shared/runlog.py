"""Logging shared by both trainers: one format, so one parser reads both.

Rank 0 appends to logs/{RUN_ID}.txt and prints; the log starts with the
trainer's source and the config, as the official script does.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import resource
import sys
from dataclasses import dataclass
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


# ---- the one parser: every tool reads a run log through these ----
SEPARATOR = "=" * 100  # RunLog.header: the trainer's source, this line, then the run's own lines
TIME_LIMIT_S = 600.0  # the challenge's budget for training, and again for evaluation, on 8xH100
NUMBER = re.compile(r"[-+]?(?:nan|inf|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?=(?:ms|s)?$)")
# A line's kind, by how it starts (the builders above and the loop's log calls write them)
KINDS = {"train": "step:", "val": "step:", "final": "final_roundtrip_exact ", "artifact": "artifact:",
         "val_counts": "val_tokens:", "export": "export ", "no_ttt": "no_ttt ", "ttt": "ttt val_loss:",
         "ttt_warmup": "ttt_warmup ", "backend": "backend:", "config": "config:"}


def run_lines(text: str) -> list[str]:
    """The run's own lines: the logged source before the header's separator is not the run's."""
    return text.split("\n" + SEPARATOR + "\n", 1)[-1].splitlines()


def line_fields(line: str) -> dict[str, str]:
    """The key:value tokens of a line (the value is what follows the first colon, up to a space)."""
    return dict(tok.split(":", 1) for tok in line.split() if ":" in tok)


def of_kind(lines: list[str], kind: str) -> list[dict[str, str]]:
    """Fields of every line of `kind` (KINDS), in order; train and val lines are the step lines with that loss.
    A final line may sit behind a prefix a launcher adds to output lines; the rest start their line."""
    tag = {"train": "train_loss", "val": "val_loss"}.get(kind)
    start = KINDS[kind]
    found = [ln[ln.find(start):] for ln in lines if ln.startswith(start) or (kind == "final" and start in ln)]
    return [f for f in map(line_fields, found) if tag is None or tag in f]


def number(fields: dict[str, str], key: str, where: str = "log") -> float:
    """fields[key] as a float: one grammar for every logged number (nan, inf and exponents included, an ms or s
    unit dropped). A missing key or a malformed value is one ValueError naming `where`."""
    value = fields.get(key)
    m = NUMBER.match(value or "")
    if m is None:
        raise ValueError(f"{where}: {key}:{value} is not a number" if value is not None else f"{where}: no {key}")
    return float(m.group(0))


def last(lines: list[str], kind: str, where: str) -> dict[str, str]:
    found = of_kind(lines, kind)
    if not found:
        raise ValueError(f"{where}: no {KINDS[kind].strip()} line (did the run finish?)")
    return found[-1]


def parse_final(text: str) -> dict[str, float]:
    """val_loss/val_bpb of the last final line in a log or stdout; ValueError if there is none."""
    final = last(run_lines(text), "final", "output")
    return {k: number(final, k, "final line") for k in ("val_loss", "val_bpb")}


def step_of(fields: dict[str, str]) -> int:
    """N of a step line's step:N/ITERATIONS."""
    return int(fields["step"].split("/", 1)[0])


def parse_train_losses(text: str) -> dict[int, float]:
    return {step_of(f): number(f, "train_loss") for f in of_kind(run_lines(text), "train")}


def tagged(lines: list[str], prefix: str, where: str) -> str | None:
    """What follows `prefix` on the last line that starts with it (None: no such line)."""
    found = [ln[len(prefix):] for ln in lines if ln.startswith(prefix)]
    return found[-1] if found else None


def parse_config(lines: list[str], where: str) -> dict:
    text = tagged(lines, "config:", where)
    try:
        return json.loads(text) if text is not None else {}
    except json.JSONDecodeError:
        raise ValueError(f"{where}: its config: line is not JSON") from None


@dataclass
class RunResult:
    """The numbers of one finished run that the submission and audit tools check."""
    log: str
    seed: int
    val_loss: float
    val_bpb: float
    val_tokens: int
    val_bytes: int
    artifact_bytes: int
    code_bytes: int
    train_ms: float
    eval_ms: float
    backend: str
    source: str


def parse_log(path: str | Path) -> RunResult:
    """One finished run's numbers from its log (logs/RUN_ID.txt); every error is one line naming the file."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines, where = run_lines(text), f"log {path}"
    source = text.split("\n" + SEPARATOR + "\n", 1)[0] if SEPARATOR in text else ""
    cfg, backend = parse_config(lines, where), tagged(lines, "backend:", where)
    if "seed" not in cfg or backend is None:
        raise ValueError(f"{where}: no {'backend' if backend is None else 'config'} line with its fields "
                         f"(did the run finish?)")
    final, counts = last(lines, "final", where), last(lines, "val_counts", where)
    size, train = last(lines, "artifact", where), last(lines, "train", where)
    n = lambda f, k: number(f, k, where)  # noqa: E731
    return RunResult(str(path), int(cfg["seed"]), n(final, "val_loss"), n(final, "val_bpb"),
                     int(n(counts, "val_tokens")), int(n(counts, "val_bytes")), int(n(size, "artifact_bytes")),
                     int(n(size, "code_bytes")), n(train, "train_time"), n(final, "eval_time"), backend, source)
