"""Fetch a published export from its Hugging Face dataset repo.

Variants by name (VARIANTS): sp1024 (the official export, willdepueoai/parameter-golf), sp8192
(kevclark/parameter-golf, the SP8192 records' data), sp8192_caseops (romeerp/parameter-golf-caseops-v1: the
CaseOps SP8192 shards of the 1.0611 record plus the val byte sidecar fineweb_val_bytes_NNNNNN.bin); any other
sp<VOCAB>/byte260 comes from the default repo. Same layout and overrides as the official downloader:
MATCHED_FINEWEB_REPO_ID and MATCHED_FINEWEB_REMOTE_ROOT_PREFIX (default datasets), which win over a variant's
own repo when set. The repo's manifest.json is fetched fresh on every run (never a local copy: the official
downloader reused a cached one, which hid sp8192). Files already present and valid are skipped; every shard
is checked against its header (and against the remote size when known), every sidecar shard against its token
shard. After a complete download the dataset folder gets its manifest.json (the downloaded tokenizer's sha256
and the text transform, see shared/manifest.py).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from shared import caseops
from shared.data import read_shard_header, sidecar_path
from shared.manifest import write_manifest
from shared.tokenizer import load_tokenizer

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_PREFIX = "datasets"


@dataclass(frozen=True)
class Variant:
    repo_id: str  # where it is published (MATCHED_FINEWEB_REPO_ID wins when set)
    dataset_dir: str  # datasets/<dataset_dir>/ remotely and under data/datasets/ here
    tokenizer: str | None = None  # remote path below the prefix, when the repo's manifest names none
    transform: str | None = None  # "caseops_v1": text transformed before tokenizing; val has a byte sidecar


CASEOPS_DIR = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
VARIANTS = {
    "sp1024": Variant(DEFAULT_REPO_ID, "fineweb10B_sp1024"),
    "sp8192": Variant("kevclark/parameter-golf", "fineweb10B_sp8192", "tokenizers/fineweb_8192_bpe.model"),
    "sp8192_caseops": Variant("romeerp/parameter-golf-caseops-v1", CASEOPS_DIR,
                              "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model", caseops.TRANSFORM),
}
VARIANTS["sp8192_lossless_caps_caseops_v1_reserved"] = VARIANTS["sp8192_caseops"]  # the official downloader's name


def variant_info(variant: str) -> Variant:
    if variant in VARIANTS:
        return VARIANTS[variant]
    return Variant(DEFAULT_REPO_ID, dataset_dir_for_variant(variant))


def repo_settings(variant: str = "sp1024") -> tuple[str, str]:
    """(repo id, remote prefix): the environment's overrides, else the variant's repo and "datasets"."""
    return (os.environ.get("MATCHED_FINEWEB_REPO_ID") or variant_info(variant).repo_id,
            os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_PREFIX))


def dataset_dir_for_variant(variant: str) -> str:
    if variant in VARIANTS:
        return VARIANTS[variant].dataset_dir
    if variant == "byte260":
        return "fineweb10B_byte260"
    if variant.startswith("sp") and variant[2:].isdigit():
        return f"fineweb10B_{variant}"
    raise ValueError(f"--variant {variant!r} is not {', '.join(VARIANTS)}, sp<VOCAB> or byte260")


def local_path_for_remote(remote: str, prefix: str, out_root: Path) -> Path:
    """datasets/... and tokenizers/... under the remote prefix map to out_root/datasets, out_root/tokenizers."""
    parts = Path(remote).parts
    if prefix and parts[:1] == (prefix,):
        parts = parts[1:]
    return out_root.joinpath(*parts)


def plan_files(manifest: dict, variant: str, train_shards: int, prefix: str) -> list[str]:
    """Remote paths to fetch for a variant: val shards (and their byte sidecar for CaseOps), the first
    train_shards train shards, tokenizer files."""
    info = variant_info(variant)
    dataset_dir = info.dataset_dir
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == dataset_dir), None)
    if entry is None:
        names = [d.get("name") for d in manifest.get("datasets", [])]
        raise ValueError(f"manifest has no dataset {dataset_dir!r} (variant {variant}); it lists {names}")
    stats = entry.get("stats") or {}
    n_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if not 0 <= train_shards <= n_train:
        raise ValueError(f"--train-shards={train_shards}: {dataset_dir} has {n_train} train shards")
    tok_name = entry.get("tokenizer_name")
    tok = next((t for t in manifest.get("tokenizers", []) if t.get("name") == tok_name), None)
    if tok is None and info.tokenizer:
        tok = {"model_path": info.tokenizer}
    if tok is None:
        raise ValueError(f"manifest has no tokenizer {tok_name!r} for {dataset_dir}")
    base = f"{prefix}/datasets/{dataset_dir}" if prefix else f"datasets/{dataset_dir}"
    files = [f"{base}/fineweb_val_{i:06d}.bin" for i in range(n_val)]
    if info.transform == caseops.TRANSFORM:  # one sidecar shard per val shard (RECORD_STACK.md §1.3)
        files += [f"{base}/{os.path.basename(sidecar_path('', i))}" for i in range(n_val)]
    files += [f"{base}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    for key in ("model_path", "vocab_path", "path"):
        if tok.get(key):
            files.append(f"{prefix}/{tok[key]}" if prefix else str(tok[key]))
    return files


def is_valid_local(path: Path, expected_size: int | None = None) -> bool:
    """Present, of the expected size if known, and (for shards) consistent with its header."""
    if not path.is_file():
        return False
    if expected_size is not None and path.stat().st_size != expected_size:
        return False
    if path.suffix == ".bin":
        try:
            read_shard_header(path)
        except ValueError:
            return False
    return True


def fetch_variant(variant: str, train_shards: int, out_root: Path) -> int:
    repo_id, prefix = repo_settings(variant)
    dataset_dir_for_variant(variant)  # an unknown name fails before any network call
    hub = _hub()
    manifest_remote = f"{prefix}/manifest.json" if prefix else "manifest.json"
    manifest_path = _fetch(hub, repo_id, manifest_remote, local_path_for_remote(manifest_remote, prefix, out_root))
    files = plan_files(json.loads(manifest_path.read_text(encoding="utf-8")), variant, train_shards, prefix)
    sizes = _remote_sizes(hub, repo_id, files)
    for i, remote in enumerate(files, 1):
        dest = local_path_for_remote(remote, prefix, out_root)
        if is_valid_local(dest, sizes.get(remote)):
            print(f"[{i}/{len(files)}] have {dest}", flush=True)
            continue
        print(f"[{i}/{len(files)}] fetching {remote}", flush=True)
        _fetch(hub, repo_id, remote, dest)
        if not is_valid_local(dest, sizes.get(remote)):
            raise ValueError(f"{dest}: downloaded file fails verification (size or shard header)")
    local = [local_path_for_remote(f, prefix, out_root) for f in files]
    check_sidecar_shards(local)
    write_download_manifest(local, variant, repo_id)
    print(f"done: {len(files)} files for {variant} under {out_root}")
    return 0


def write_download_manifest(local_files: list[Path], variant: str, repo_id: str) -> None:
    """manifest.json for the downloaded shards, recording the downloaded tokenizer's sha256."""
    shards = [p for p in local_files if p.suffix == ".bin" and "_bytes_" not in p.name]
    toks = sorted((p for p in local_files if p.suffix != ".bin"), key=lambda p: p.suffix != ".model")
    if not toks or not shards:
        print(f"note: the {variant} export lists no tokenizer or no shards; no manifest.json written", flush=True)
        return
    tok = toks[0]
    # byte260 ships no SentencePiece model: its vocab size is in its name
    vocab = (load_tokenizer(str(tok)).vocab_size() if tok.suffix == ".model"
             else int(variant.removeprefix("byte").removeprefix("sp")))
    write_manifest(shards[0].parent, tok, transform=variant_info(variant).transform if variant in VARIANTS else None,
                   vocab_size=vocab, name=shards[0].parent.name, source=f"huggingface:{repo_id}")


def check_sidecar_shards(local_files: list[Path]) -> None:
    """Every fineweb_val_bytes_i.bin counts exactly the tokens of fineweb_val_i.bin (a named error if not)."""
    for side in (p for p in local_files if p.name.startswith("fineweb_val_bytes_")):
        tokens = side.with_name(side.name.replace("_bytes_", "_"))
        n_side, n_tok = read_shard_header(side), read_shard_header(tokens)
        if n_side != n_tok:
            raise ValueError(f"{side}: the byte sidecar counts {n_side} tokens but {tokens.name} holds {n_tok}")


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise SystemExit("downloading needs huggingface-hub: pip install huggingface-hub") from None
    return huggingface_hub


def _fetch(hub, repo_id: str, remote: str, dest: Path) -> Path:
    sub, name = os.path.split(remote)
    try:
        cached = Path(hub.hf_hub_download(repo_id=repo_id, filename=name, subfolder=sub or None,
                                          repo_type="dataset")).resolve(strict=True)
    except Exception as exc:  # network, auth and missing-file errors all end here
        raise SystemExit(f"cannot download {remote} from the Hugging Face dataset {repo_id}: "
                         f"{type(exc).__name__}: {exc}\n(no network? build offline data with "
                         f"`python data/prepare.py --demo` or --text/--jsonl)") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        os.link(cached, tmp)
    except OSError:
        shutil.copy2(cached, tmp)
    os.replace(tmp, dest)
    return dest


def _remote_sizes(hub, repo_id: str, files: list[str]) -> dict[str, int]:
    """Remote file sizes where the hub reports them; {} if it cannot (verification then uses headers)."""
    try:
        infos = hub.HfApi().get_paths_info(repo_id, files, repo_type="dataset")
        return {i.path: int(i.size) for i in infos if getattr(i, "size", None) is not None}
    except Exception:
        return {}
