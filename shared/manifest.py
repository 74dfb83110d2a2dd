"""manifest.json in a dataset folder: which tokenizer (by sha256) its shards were built with.

Same vocab size is not same tokenizer: shards scored with other merges give a wrong
val_bpb without any error, so scoring checks the tokenizer file against this record.
data/build.py and data/download.py write it; `python data/prepare.py --adopt DIR
--tokenizer FILE` records one for a dataset built elsewhere.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os

from shared.data import read_shard_header, sidecar_pattern, train_pattern, val_pattern
from shared.fsutil import atomic_write_text

MANIFEST_NAME = "manifest.json"
FORMAT = "parameter-golf-dataset-v1"
BOS_ID = 1  # every document starts with <s>, id 1, as in the official export


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_stats(dataset_dir: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Shard and token counts per split, from validated shard headers."""
    stats = {}
    for split, pattern in (("train", train_pattern(str(dataset_dir))), ("val", val_pattern(str(dataset_dir))),
                           ("val_bytes", sidecar_pattern(str(dataset_dir)))):
        counts = [read_shard_header(f) for f in sorted(glob.glob(pattern))]
        if counts or split != "val_bytes":  # val_bytes: the CaseOps byte sidecar, only where there is one
            stats[split] = {"shards": len(counts), "tokens": sum(counts)}
    return stats


def write_manifest(dataset_dir: str | os.PathLike, tokenizer_path: str | os.PathLike, transform: str | None = None,
                   **extra) -> dict:
    """Record tokenizer_path's sha256, the text transform ("caseops_v1" or None) and the shards now in
    dataset_dir; extra needs vocab_size=."""
    if not isinstance(extra.get("vocab_size"), int):
        raise ValueError(f"write_manifest({dataset_dir}): vocab_size=<int> is required")
    stats = split_stats(dataset_dir)
    if not stats["val"]["shards"]:
        raise FileNotFoundError(f"{dataset_dir}: no fineweb_val_*.bin shards; a dataset needs a validation split")
    manifest = {"format": FORMAT, "tokenizer_sha256": file_sha256(tokenizer_path),
                "tokenizer": os.path.basename(tokenizer_path), "bos_id": BOS_ID, "splits": stats,
                "transform": transform, **extra}
    atomic_write_text(os.path.join(dataset_dir, MANIFEST_NAME), json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def read_manifest(data_path: str | os.PathLike) -> dict | None:
    """The dataset's manifest, or None when it has none; ValueError naming the file when it is unusable."""
    path = os.path.join(data_path, MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable dataset manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} manifest")
    sha = manifest.get("tokenizer_sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise ValueError(f"{path}: tokenizer_sha256 is missing or not a sha256 hex digest")
    return manifest


def dataset_transform(data_path: str | os.PathLike) -> str | None:
    """The text transform the manifest records (None: plain text, or no manifest / an older one without it)."""
    try:
        manifest = read_manifest(data_path)
    except ValueError:
        return None  # an unreadable manifest is check_tokenizer's to report
    return manifest.get("transform") if manifest else None


def check_tokenizer(data_path: str, tokenizer_path: str, enforce: bool = True) -> tuple[str, str]:
    """(sha256 of the tokenizer file, status for the log: "verified" or "unverified: <why>").

    With enforce, a manifest recording another tokenizer, no manifest, or an unreadable one
    raises ValueError; without, they are only reported. Missing paths always raise.
    """
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"DATA_PATH={data_path} is not a folder; build data with "
                                f"`python data/prepare.py --demo`")
    if os.path.isdir(tokenizer_path):
        raise ValueError(f"TOKENIZER_PATH={tokenizer_path} is a directory, not a SentencePiece .model file")
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"TOKENIZER_PATH={tokenizer_path} does not exist")
    sha = file_sha256(tokenizer_path)
    try:
        problem = _mismatch(data_path, tokenizer_path, sha)
    except ValueError as exc:  # an unreadable manifest proves nothing either way
        problem = str(exc)
    if problem is None:
        return sha, "verified"
    if enforce:
        raise ValueError(f"{problem}; set TOKENIZER_CHECK=0 to score anyway")
    return sha, f"unverified: {problem}"


def _mismatch(data_path: str, tokenizer_path: str, sha: str) -> str | None:
    manifest = read_manifest(data_path)
    if manifest is None:
        return (f"DATA_PATH={data_path} has no {MANIFEST_NAME} recording its tokenizer; record it with "
                f"`python data/prepare.py --adopt {data_path} --tokenizer FILE`")
    want = manifest["tokenizer_sha256"]
    if sha == want:
        return None
    return (f"TOKENIZER_PATH={tokenizer_path} (sha256 {sha[:8]}…) is not the tokenizer DATA_PATH={data_path} "
            f"was built with ({manifest.get('tokenizer', '?')}, sha256 {want[:8]}…)")
