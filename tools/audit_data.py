"""Placeholder until the data checks of the compliance audit land (byte accounting, no validation in training)."""
from __future__ import annotations

from tools.auditcheck import Finding


def check_accounting(data_path: str, tokenizer_path: str, plain_tokenizer: str | None = None,
                     max_docs: int | None = None) -> list[Finding]:
    return [Finding("byte_accounting", "SKIP", "not built yet")]


def check_no_val_in_train(data_path: str) -> list[Finding]:
    return [Finding("no_val_in_train", "SKIP", "not built yet")]
