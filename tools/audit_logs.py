"""The compliance audit's budget checks (python -m tools.audit): time per training log, and code + artifact bytes.

train_time[LOG]: the last logged train_time (the timed steps; validation and checkpoint writes excluded, as
    shared/loop.py times them) plus every export phase after the wallclock cap that reads training data: GPTQ's
    Hessians, computed on the next GPTQ_CALIBRATION_BATCHES training micro-batches (shared/loop.export logs
    `export ... hessians:S.SSs`). The training data may only be read inside the 600 s. Quantization and coding
    (gptq:, lqer:, coding: on the same line) read only the weights and are not counted.
eval_time[LOG]: the final line's eval_time (with TTT_ENABLED, the TTT evaluation's time, also on the `ttt` line)
    plus, when the log has one, the `no_ttt` pass that runs before TTT in the same scoring phase, and TTT_COMPILE's
    `ttt_warmup` (compiling on random ids before TTT's clock starts): the shipped script spends them all inside the
    evaluation, so all count (the stricter reading; the record's timer leaves its compile warm-up out).
size: the shipped code (tools/bundle.py's train_gpt.py as `python -m tools.bundle --compress` writes it) plus the
    artifact's bytes, against shared.artifact.BYTE_LIMIT: the margin under the cap, or the bytes over it.
"""
from __future__ import annotations

import os
from pathlib import Path

from shared.artifact import BYTE_LIMIT, cap_detail
from shared.runlog import TIME_LIMIT_S, number, of_kind, parse_log, run_lines
from tools.auditcheck import Finding, verdict
from tools.bundle import bundle_bytes

TRAIN_DATA_PHASES = ("hessians",)  # export phases (shared/loop.export's timings) that read training shards
EXPORT_PHASES = ("hessians", "gptq", "lqer", "coding")  # the seconds an export line may carry


def check_time_budgets(log_paths: list[str]) -> list[Finding]:
    """train_time[LOG] and eval_time[LOG] for each log (see the module docstring); SKIP without logs."""
    if not log_paths:
        return [Finding("time_budgets", "SKIP", "no training logs given")]
    out = []
    for path in log_paths:
        out += log_findings(path)
    return out


def log_findings(path: str) -> list[Finding]:
    name = Path(path).name
    try:
        run = parse_log(path)
        text = Path(path).read_text(encoding="utf-8")
    except (ValueError, OSError) as exc:
        return [Finding(f"{k}[{name}]", "FAIL", f"unreadable: {exc}") for k in ("train_time", "eval_time")]
    phases = export_phases(run_lines(text))
    after_cap = {k: v for k, v in phases.items() if k in TRAIN_DATA_PHASES}
    train_s = run.train_ms / 1000 + sum(after_cap.values())
    parts = "".join(f" + {k} {v:.1f}s" for k, v in after_cap.items())
    train = verdict(f"train_time[{name}]", train_s <= TIME_LIMIT_S,
                    f"{train_s:.1f}s {vs(train_s, TIME_LIMIT_S)} (steps {run.train_ms / 1000:.1f}s{parts})")
    return [train, eval_finding(name, run_lines(text), run.eval_ms)]


def export_phases(lines: list[str]) -> dict[str, float]:
    """Seconds of each phase on the log's last export line ({} when the log has none)."""
    found = of_kind(lines, "export")
    return {k: number(found[-1], k) for k in EXPORT_PHASES if k in found[-1]} if found else {}


def eval_finding(name: str, lines: list[str], final_ms: float) -> Finding:
    no_ttt, ttt, warm = (of_kind(lines, k) for k in ("no_ttt", "ttt", "ttt_warmup"))
    scored_ms = max(final_ms, number(ttt[-1], "eval_time") if ttt else 0.0)  # with TTT the final line repeats it
    no_ttt_ms = number(no_ttt[-1], "eval_time") if no_ttt else 0.0
    warm_ms = 1000.0 * number(warm[-1], "seconds") if warm else 0.0
    total_ms = scored_ms + no_ttt_ms + warm_ms
    what = f"{'TTT' if ttt else 'final'} evaluation {scored_ms / 1000:.1f}s"
    what += f" + no_ttt pass {no_ttt_ms / 1000:.1f}s" if no_ttt else ""
    what += f" + TTT compile warm-up {warm_ms / 1000:.1f}s" if warm else ""
    return verdict(f"eval_time[{name}]", total_ms <= 1000 * TIME_LIMIT_S,
                   f"{total_ms / 1000:.1f}s {vs(total_ms / 1000, TIME_LIMIT_S)} ({what})")


def vs(seconds: float, limit: float) -> str:
    return f"{'<=' if seconds <= limit else '>'} {limit:.0f}s"


def check_size(artifact_path: str) -> list[Finding]:
    """`size`: the compressed train_gpt.py bundle's bytes + the artifact's bytes <= BYTE_LIMIT."""
    if not os.path.isfile(artifact_path):
        return [Finding("size", "FAIL", f"artifact {artifact_path} does not exist")]
    code = len(bundle_bytes(compress=True))
    artifact_bytes = os.path.getsize(artifact_path)
    figure = f"{cap_detail(code, artifact_bytes)}; code = the --compress train_gpt.py bundle ({len(bundle_bytes())} " \
             f"bytes uncompressed)"
    return [verdict("size", code + artifact_bytes <= BYTE_LIMIT, figure)]
