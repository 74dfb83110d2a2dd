"""From run logs to a records/ folder, with the byte cap, time limits and statistics checked.

    python -m tools.submission --logs L1 L2 L3 --artifact A --name NAME --author AUTHOR \\
        --github-id ID --out DIR [--sota BPB] [--track 10min_16mb|non_record_16mb] [--compress]
        [--audit-data-path DIR --audit-tokenizer-path FILE [--audit-backend torch|mlx] [--audit-plain-tokenizer F]]

Writes DIR/train_gpt.py (tools/bundle.py), DIR/submission.json (every number
parsed from the logs), DIR/README.md and the logs; prints one `check:` line per
rule and exits 1 when any fails. Run the seeds with the train_gpt.py this
writes (python -m tools.bundle first): each log starts with the source that
ran, and the check `logged_source` compares it with what ships.
With --audit-data-path it also runs the compliance audit (python -m tools.audit)
on the artifact and the logs: its `audit:` lines go into the README and the
output, and an audit FAIL fails the submission too.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from shared.artifact import BYTE_LIMIT, cap_detail
from shared.fsutil import atomic_write_bytes, atomic_write_text
from shared.runlog import TIME_LIMIT_S, RunResult, parse_log
from tools.bundle import bundle_bytes
from tools.stats import one_sided_t_test

MIN_SEEDS = 3
NAT_MARGIN = 0.005  # required improvement over SOTA, in nats
P_THRESHOLD = 0.01


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"check:{self.name} {'PASS' if self.ok else 'FAIL'} {self.detail}"


def check_runs(runs: list[RunResult], shipped: str, code: int, artifact_bytes: int, track: str) -> list[Check]:
    """shipped: train_gpt.py as text, decoded as a log records it (shared/shipped.read_source); code: its bytes."""
    checks = []
    timed = track == "10min_16mb"
    for r in runs:
        name = Path(r.log).name
        if timed:
            checks.append(Check(f"train_time[{name}]", r.train_ms <= 1000 * TIME_LIMIT_S, f"{r.train_ms / 1000:.1f}s <= {TIME_LIMIT_S:.0f}s"))
            checks.append(Check(f"eval_time[{name}]", r.eval_ms <= 1000 * TIME_LIMIT_S, f"{r.eval_ms / 1000:.1f}s <= {TIME_LIMIT_S:.0f}s"))
        checks.append(Check(f"bytes[{name}]", code + r.artifact_bytes <= BYTE_LIMIT, cap_detail(code, r.artifact_bytes)))
        checks.append(Check(f"logged_source[{name}]", r.source == shipped,
                            "the log's source is the shipped train_gpt.py" if r.source == shipped else
                            f"the log was produced by other code ({len(r.source.encode())} bytes, logged code_bytes "
                            f"{r.code_bytes}) than the shipped train_gpt.py ({code} bytes)"))
    checks.append(Check("bytes[artifact]", code + artifact_bytes <= BYTE_LIMIT, cap_detail(code, artifact_bytes)))
    seeds = sorted({r.seed for r in runs})
    checks.append(Check("seeds", len(seeds) >= MIN_SEEDS and len(seeds) == len(runs),
                        f"{len(seeds)} distinct seeds {seeds} in {len(runs)} logs (need >= {MIN_SEEDS}, one log each)"))
    counts = {(r.val_tokens, r.val_bytes) for r in runs}
    checks.append(Check("val_counts", len(counts) == 1, f"(tokens, bytes) across seeds: {sorted(counts)}"))
    return checks


def significance(runs: list[RunResult], sota_bpb: float) -> list[Check]:
    """Improvement over SOTA read both ways: nats per token (val_loss units) and nats per byte."""
    if len(runs) < 2:
        return [Check("significance", False, f"a t-test needs >= 2 seeds, got {len(runs)}")]
    per_byte = [(sota_bpb - r.val_bpb) * math.log(2.0) for r in runs]
    per_token = [d * r.val_bytes / r.val_tokens for d, r in zip(per_byte, runs)]
    out = []
    for name, deltas in (("improvement_nats_per_token", per_token), ("improvement_nats_per_byte", per_byte)):
        mean, t, p = one_sided_t_test(deltas, NAT_MARGIN)
        out.append(Check(name, p < P_THRESHOLD, f"mean {mean:.5f} nats vs margin {NAT_MARGIN} (SOTA {sota_bpb} bpb): "
                                                f"t={t:.3f} one-sided p={p:.4g} (need < {P_THRESHOLD})"))
    return out


def submission_json(args: argparse.Namespace, runs: list[RunResult], code: int, artifact_bytes: int,
                    checks: list[Check], code_uncompressed: int | None = None) -> dict:
    bpbs = [r.val_bpb for r in runs]
    torch_version = re.search(r"torch-(\S+)", runs[0].backend)
    ok = {c.name: c.ok for c in checks}
    return {
        "author": args.author, "github_id": args.github_id, "name": args.name,
        "date": datetime.date.today().isoformat(), "track": f"track_{args.track}",
        "val_bpb": statistics.fmean(bpbs), "val_bpb_std": statistics.stdev(bpbs) if len(bpbs) > 1 else 0.0,
        "val_loss": statistics.fmean(r.val_loss for r in runs), "seeds": [r.seed for r in runs],
        "seed_results": {str(r.seed): {"val_bpb": r.val_bpb, "val_loss": r.val_loss, "artifact_bytes": r.artifact_bytes,
                                       "train_time_s": r.train_ms / 1000, "eval_time_s": r.eval_ms / 1000,
                                       "log": Path(r.log).name} for r in runs},
        "bytes_total": code + artifact_bytes, "bytes_code": code,
        "bytes_code_uncompressed": code if code_uncompressed is None else code_uncompressed,
        "bytes_margin": BYTE_LIMIT - code - artifact_bytes, "hardware": runs[0].backend,
        "pytorch_version": torch_version.group(1) if torch_version else None,
        "technique_summary": args.summary,
        "compliance": {"train_under_600s": all(v for k, v in ok.items() if k.startswith("train_time")),
                       "eval_under_600s": all(v for k, v in ok.items() if k.startswith("eval_time")),
                       "under_16mb": all(v for k, v in ok.items() if k.startswith("bytes")),
                       "three_seeds": ok["seeds"], "logged_source_matches": all(
                           v for k, v in ok.items() if k.startswith("logged_source")),
                       "significant": ok.get("improvement_nats_per_token")},
    }


def readme(meta: dict, checks: list[Check], findings: list | None = None) -> str:
    rows = "\n".join(f"| {s} | {r['val_bpb']:.8f} | {r['val_loss']:.8f} | {r['artifact_bytes']} | "
                     f"{r['train_time_s']:.1f} | {r['eval_time_s']:.1f} |" for s, r in meta["seed_results"].items())
    return (f"# {meta['name']}\n\nval_bpb **{meta['val_bpb']:.5f}** ± {meta['val_bpb_std']:.5f} over "
            f"{len(meta['seeds'])} seeds; {meta['bytes_total']} bytes ({meta['bytes_code']} code).\n\n"
            f"## Technique\n\n{meta['technique_summary'] or 'TODO: describe what changed and why.'}\n\n"
            f"## Results\n\n| seed | val_bpb | val_loss | artifact bytes | train s | eval s |\n|---|---|---|---|---|---|\n"
            f"{rows}\n\n## Reproduce\n\n    torchrun --standalone --nproc_per_node=8 train_gpt.py   # SEED=... per run\n\n"
            f"## Checks\n\n" + "\n".join(f"- `{c.line()}`" for c in checks) + "\n"
            + ("\n## Compliance audit\n\n" + "\n".join(f"- `{f.line()}`" for f in findings) + "\n" if findings else ""))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tools.submission", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--logs", nargs="+", required=True)
    ap.add_argument("--artifact", required=True)
    for flag in ("--name", "--author", "--github-id", "--out"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--sota", type=float, help="current SOTA val_bpb to beat (runs the t-tests)")
    ap.add_argument("--track", choices=("10min_16mb", "non_record_16mb"), default="10min_16mb")
    ap.add_argument("--compress", action="store_true", help="ship the minified, compressed, self-extracting bundle "
                    "(tools/bundle.py); the runs must have been made with that same file")
    ap.add_argument("--summary", default="", help="technique summary for submission.json and the README")
    audit = ap.add_argument_group("compliance audit", "python -m tools.audit on the artifact and the logs")
    audit.add_argument("--audit-data-path", help="runs the audit: the dataset the artifact is scored on")
    audit.add_argument("--audit-tokenizer-path", help="the dataset's tokenizer (required with --audit-data-path)")
    audit.add_argument("--audit-backend", choices=("torch", "mlx"), default="torch")
    audit.add_argument("--audit-plain-tokenizer", help="CaseOps datasets: the plain tokenizer for byte accounting")
    return ap.parse_args(argv)


def audit_findings(args: argparse.Namespace) -> list:
    """tools.audit's findings on the artifact and the logs; none when --audit-data-path is not given."""
    if not args.audit_data_path:
        return []
    if not args.audit_tokenizer_path:
        raise ValueError("--audit-data-path needs --audit-tokenizer-path")
    from tools.audit import AuditInputs, audit  # builds the model in torch or mlx: imported only when asked
    return list(audit(AuditInputs(args.artifact, args.audit_data_path, args.audit_tokenizer_path, args.audit_backend,
                                  args.audit_plain_tokenizer, list(args.logs))))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = [parse_log(p) for p in args.logs]
    data = bundle_bytes(compress=args.compress)
    plain = data if not args.compress else bundle_bytes()
    shipped = data.decode("latin-1" if args.compress else "utf-8")  # as the bundle's coding cookie reads it
    compile(data, "train_gpt.py", "exec")  # the bundle must at least compile
    artifact_bytes = Path(args.artifact).stat().st_size
    checks = check_runs(runs, shipped, len(data), artifact_bytes, args.track)
    if args.sota is not None:
        checks += significance(runs, args.sota)
    findings = audit_findings(args)
    out = Path(args.out)
    atomic_write_bytes(out / "train_gpt.py", data)
    meta = submission_json(args, runs, len(data), artifact_bytes, checks, len(plain))
    atomic_write_text(out / "submission.json", json.dumps(meta, indent=2) + "\n")
    atomic_write_text(out / "README.md", readme(meta, checks, findings))
    for r in runs:
        shutil.copyfile(r.log, out / Path(r.log).name)
    for c in checks:
        print(c.line())
    for f in findings:
        print(f.line())
    failed = [c for c in checks if not c.ok] + [f for f in findings if f.failed]
    print(f"submission:{out} checks:{len(checks) + len(findings)} failed:{len(failed)} "
          f"code_bytes:{len(data)} uncompressed_code_bytes:{len(plain)} {cap_detail(len(data), artifact_bytes)}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
