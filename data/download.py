"""Fetch the published challenge export from the Hugging Face dataset repo.

Same layout and overrides as the official downloader: MATCHED_FINEWEB_REPO_ID
(default willdepueoai/parameter-golf) and MATCHED_FINEWEB_REMOTE_ROOT_PREFIX
(default datasets). Files already present and valid are skipped; every shard
is checked against its header (and against the remote size when known). After a
complete download the dataset folder gets its manifest.json (the downloaded
tokenizer's sha256, see shared/manifest.py).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from shared.data import read_shard_header
from shared.manifest import write_manifest
from shared.tokenizer import load_tokenizer

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_PREFIX = "datasets"


def repo_settings() -> tuple[str, str]:
    return (os.environ.get("MATCHED_FINEWEB_REPO_ID", DEFAULT_REPO_ID),
            os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_PREFIX))


def dataset_dir_for_variant(variant: str) -> str:
    if variant == "byte260":
        return "fineweb10B_byte260"
    if variant.startswith("sp") and variant[2:].isdigit():
        return f"fineweb10B_{variant}"
    raise ValueError(f"--variant {variant!r} is not sp<VOCAB> or byte260")


def local_path_for_remote(remote: str, prefix: str, out_root: Path) -> Path:
    """datasets/... and tokenizers/... under the remote prefix map to out_root/datasets, out_root/tokenizers."""
    parts = Path(remote).parts
    if prefix and parts[:1] == (prefix,):
        parts = parts[1:]
    return out_root.joinpath(*parts)


def plan_files(manifest: dict, variant: str, train_shards: int, prefix: str) -> list[str]:
    """Remote paths to fetch for a variant: val shards, the first train_shards train shards, tokenizer files."""
    dataset_dir = dataset_dir_for_variant(variant)
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == dataset_dir), None)
    if entry is None:
        raise ValueError(f"manifest has no dataset {dataset_dir!r} (variant {variant})")
    stats = entry.get("stats") or {}
    n_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if not 0 <= train_shards <= n_train:
        raise ValueError(f"--train-shards={train_shards}: {dataset_dir} has {n_train} train shards")
    tok_name = entry.get("tokenizer_name")
    tok = next((t for t in manifest.get("tokenizers", []) if t.get("name") == tok_name), None)
    if tok is None:
        raise ValueError(f"manifest has no tokenizer {tok_name!r} for {dataset_dir}")
    base = f"{prefix}/datasets/{dataset_dir}" if prefix else f"datasets/{dataset_dir}"
    files = [f"{base}/fineweb_val_{i:06d}.bin" for i in range(n_val)]
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
    repo_id, prefix = repo_settings()
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
    write_download_manifest([local_path_for_remote(f, prefix, out_root) for f in files], variant, repo_id)
    print(f"done: {len(files)} files for {variant} under {out_root}")
    return 0


def write_download_manifest(local_files: list[Path], variant: str, repo_id: str) -> None:
    """manifest.json for the downloaded shards, recording the downloaded tokenizer's sha256."""
    shards = [p for p in local_files if p.suffix == ".bin"]
    toks = sorted((p for p in local_files if p.suffix != ".bin"), key=lambda p: p.suffix != ".model")
    if not toks or not shards:
        print(f"note: the {variant} export lists no tokenizer or no shards; no manifest.json written", flush=True)
        return
    tok = toks[0]
    # byte260 ships no SentencePiece model: its vocab size is in its name
    vocab = (load_tokenizer(str(tok)).vocab_size() if tok.suffix == ".model"
             else int(variant.removeprefix("byte").removeprefix("sp")))
    write_manifest(shards[0].parent, tok, vocab_size=vocab, name=shards[0].parent.name,
                   source=f"huggingface:{repo_id}")


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
