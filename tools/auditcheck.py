"""One finding of the compliance audit (python -m tools.audit): the line `audit:<name> <STATUS> <figure>`.

STATUS is PASS or FAIL for a rule the run must keep; INFO for a measurement the rules do not bind (a model
that does not claim document isolation); SKIP when the check does not apply (TTT off, no log given), with the
reason as its figure. The audit exits non-zero when any finding is FAIL.
"""
from __future__ import annotations

from dataclasses import dataclass

STATUSES = ("PASS", "FAIL", "INFO", "SKIP")


@dataclass(frozen=True)
class Finding:
    name: str
    status: str
    figure: str

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"audit finding {self.name}: status {self.status!r} is not one of {STATUSES}")

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    def line(self) -> str:
        return f"audit:{self.name} {self.status} {self.figure}"


def verdict(name: str, ok: bool, figure: str) -> Finding:
    return Finding(name, "PASS" if ok else "FAIL", figure)
