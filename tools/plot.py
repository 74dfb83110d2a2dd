"""Training curves of one or more runs, from their logs, and a summary table.

    python -m tools.plot logs/RUN1.txt logs/RUN2.txt ... --out curves.png

Left panel: training loss against step; right panel: the same against training wallclock (train_time: the timed
steps only, validation excluded, as shared/loop.py counts it). Validation val_bpb points (and the final
round-trip score, a star at the last step) sit on each panel's right-hand axis. One colour per run, labelled by
its run id and trainer (the log's backend: line), the line style by framework (MLX solid, torch dashed), so an
MLX and a torch run of one config overlay. Both trainers print the same lines (shared/runlog.py). A run that did
not finish is plotted as far as it got, and the table shows "-" for what it never logged. Needs matplotlib
(Agg: no display); the PNG is written atomically.
"""
from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared import runlog  # noqa: E402
from shared.fsutil import atomic_write_bytes  # noqa: E402

FIGSIZE, DPI = (12.0, 4.5), 100  # 1200 x 450 pixels


@dataclass
class Run:
    path: str
    run_id: str
    trainer: str  # the backend line's first word: torch-2.13.0, mlx-0.29.1
    train: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train_loss, train_time ms)
    val: list[tuple[int, float, float]] = field(default_factory=list)  # (step, val_bpb, train_time ms)
    final_bpb: float | None = None
    artifact_bytes: int | None = None

    @property
    def label(self) -> str:
        return f"{self.run_id} ({self.trainer})"

    @property
    def steps(self) -> int | None:
        return max((s for s, *_ in self.train + self.val), default=None)

    @property
    def ms_per_step(self) -> float | None:
        last = max(self.train, default=None)
        return last[2] / last[0] if last and last[0] else None


def parse_run(path: str) -> Run:
    """A run log's curves; ValueError naming the file when it is not one (no backend: and config: lines)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it as a run log ({exc})") from None
    lines = runlog.run_lines(text)
    backend, config = runlog.tagged(lines, "backend:", path), runlog.tagged(lines, "config:", path)
    if backend is None or config is None:
        raise ValueError(f"{path}: not a run log (no backend: and config: lines, as shared/runlog.py writes)")
    run_id = runlog.parse_config(lines, path).get("run_id") or Path(path).stem
    run = Run(path, run_id, backend.split()[0] if backend.split() else backend)
    n = lambda f, k: runlog.number(f, k, path)  # noqa: E731
    run.train = [(runlog.step_of(f), n(f, "train_loss"), n(f, "train_time")) for f in runlog.of_kind(lines, "train")]
    run.val = [(runlog.step_of(f), n(f, "val_bpb"), n(f, "train_time")) for f in runlog.of_kind(lines, "val")]
    finals, sizes = runlog.of_kind(lines, "final"), runlog.of_kind(lines, "artifact")
    run.final_bpb = n(finals[-1], "val_bpb") if finals else None
    run.artifact_bytes = int(n(sizes[-1], "artifact_bytes")) if sizes else None
    return run


def table(runs: list[Run]) -> str:
    """One row a run: run, trainer, final BPB, steps, ms/step, artifact bytes ("-": not logged)."""
    head = ("run", "trainer", "final_bpb", "steps", "ms/step", "artifact_bytes")
    rows = [head] + [(r.run_id, r.trainer, _fmt(r.final_bpb, "{:.4f}"), _fmt(r.steps, "{}"),
                      _fmt(r.ms_per_step, "{:.1f}"), _fmt(r.artifact_bytes, "{:,}")) for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def render(runs: list[Run]) -> bytes:
    """The two panels as PNG bytes."""
    import matplotlib
    matplotlib.use("Agg")  # files only, whatever display the machine has
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
    for ax, (x_index, xlabel) in zip(axes, ((0, "step"), (2, "training wallclock (s)"))):
        bpb_ax = ax.twinx()
        for i, run in enumerate(runs):
            color, style = f"C{i % 10}", "-" if run.trainer.startswith("mlx") else "--"
            scale = 1.0 if x_index == 0 else 1e-3
            ax.plot([p[x_index] * scale for p in run.train], [p[1] for p in run.train], style, color=color,
                    label=run.label, linewidth=1.2)
            bpb_ax.plot([p[x_index] * scale for p in run.val], [p[1] for p in run.val], "o", color=color,
                        markersize=4)
            if run.final_bpb is not None and (run.train or run.val):
                last = max(run.train + run.val)
                bpb_ax.plot([last[x_index] * scale], [run.final_bpb], "*", color=color, markersize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("train loss (nats/token), lines")
        bpb_ax.set_ylabel("val_bpb: o during training, * final round trip")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right")
    fig.suptitle("training loss and validation bits per byte", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    from data.cli import OneLineParser
    ap = OneLineParser(prog="python -m tools.plot", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", help="run logs (logs/RUN_ID.txt) of either trainer")
    ap.add_argument("--out", required=True, help="the PNG to write")
    args = ap.parse_args(argv)
    try:
        runs = [parse_run(p) for p in args.logs]
        png = render(runs)
        atomic_write_bytes(args.out, png)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(runs))
    print(f"plot:{args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
