"""Compliance audit of an artifact and its runs: one `audit:<name> PASS|FAIL|INFO|SKIP <figure>` line per check.

    python -m tools.audit ARTIFACT --data-path DIR --tokenizer-path FILE [--backend torch|mlx]
        [--plain-tokenizer FILE] [--log LOG ...] [--max-docs N] [--windows N]

The model checks run the artifact itself, decoded and built by the chosen trainer's backend in fp32 on the CPU
(tools/audit_model.py: causality, doc_isolation, normalization, ttt_order); the data checks read DATA_PATH
(tools/audit_data.py: byte_accounting, no_val_in_train); the log checks read the training logs and the artifact
file (tools/audit_logs.py: train_time/eval_time, size). Findings are tools/auditcheck.Finding.
Exit status 0 = no FAIL, 1 = at least one FAIL, 2 = bad arguments or unreadable inputs.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Iterator

from data.cli import OneLineParser, int_at_least
from tools import audit_data, audit_logs
from tools import audit_model as M
from tools.auditcheck import Finding


@dataclass
class AuditInputs:
    artifact: str
    data_path: str
    tokenizer_path: str
    backend: str = "torch"
    plain_tokenizer: str | None = None  # CaseOps: the plain tokenizer the byte accounting compares against
    logs: list[str] = field(default_factory=list)
    max_docs: int | None = None  # documents read by the byte accounting (default all) and TTT (default 32)
    windows: int = 4  # validation windows the model checks sample


def parse_args(argv: list[str] | None = None) -> AuditInputs:
    ap = OneLineParser(prog="python -m tools.audit", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--data-path", required=True)
    ap.add_argument("--tokenizer-path", required=True)
    ap.add_argument("--backend", choices=("torch", "mlx"), default="torch", help="whose model runs (fp32, CPU)")
    ap.add_argument("--plain-tokenizer", help="CaseOps datasets: the plain tokenizer the byte accounting checks")
    ap.add_argument("--log", nargs="+", action="extend", default=[], help="training logs (time budgets)")
    ap.add_argument("--max-docs", type=int_at_least(1), help="first N validation documents (default: all for "
                    f"the byte accounting, {M.TTT_DEFAULT_DOCS} for the TTT replay)")
    ap.add_argument("--windows", type=int_at_least(1), default=4, help="validation windows the model checks sample")
    a = ap.parse_args(argv)
    return AuditInputs(a.artifact, a.data_path, a.tokenizer_path, a.backend, a.plain_tokenizer, a.log, a.max_docs,
                       a.windows)


def audit(inp: AuditInputs) -> Iterator[Finding]:
    """Every check, in the README's order; each finding as soon as it is known (the model checks take a while)."""
    subject = M.load_subject(inp.artifact, inp.data_path, inp.tokenizer_path, inp.backend)
    yield M.check_causality(subject, inp.windows)
    yield M.check_doc_isolation(subject, inp.windows)
    yield M.check_normalization(subject, inp.windows)
    yield from audit_data.check_accounting(inp.data_path, inp.tokenizer_path, inp.plain_tokenizer, inp.max_docs)
    yield from audit_data.check_no_val_in_train(inp.data_path)
    yield M.check_ttt_order(subject, inp.max_docs)
    yield from audit_logs.check_time_budgets(list(inp.logs))
    yield from audit_logs.check_size(inp.artifact)


def main(argv: list[str] | None = None) -> int:
    inputs = parse_args(argv)
    failed = False
    try:
        for finding in audit(inputs):
            print(finding.line(), flush=True)
            failed |= finding.failed
    except (ValueError, OSError) as exc:  # a bad artifact, tokenizer or dataset: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
