"""Build token shards in the official layout, from one of three sources.

    python data/prepare.py --demo                                   # offline, any machine
    python data/prepare.py --variant sp1024 --train-shards 10       # the published export
    python data/prepare.py --variant sp8192                         # SP8192 (kevclark/parameter-golf)
    python data/prepare.py --variant sp8192_caseops                 # SP8192 CaseOps + byte sidecar (the record's)
    python data/prepare.py --text a.txt --name mine --caseops --tokenizer caseops.model
    python data/prepare.py --text a.txt --tokenizer tok.model --name mine
    python data/prepare.py --jsonl docs.jsonl --name mine --vocab-size 1024
    python data/prepare.py --adopt path/to/dataset --tokenizer tok.model   # record a manifest only

Output: data/datasets/<name>/fineweb_{train,val}_NNNNNN.bin, its manifest.json
(which tokenizer, by sha256, the shards were built with; see shared/manifest.py)
and data/tokenizers/<name>.model. Arguments are all checked first, and a dataset is
built whole in a temp folder and swapped in only when complete: a failed run leaves
the previous dataset and tokenizer as they were. Local sources: the first --val-docs documents
are validation (default: min(50,000, 10% of the documents)); every document
is prefixed with BOS (id 1), no EOS, as in the official export.

--text splitting (--split): `line` (default) makes every non-empty line one
document (the layout of line-per-document exports and of FineWeb dumps whose
documents run together line by line); `blank` splits at blank lines; `file`
makes each file one document.

--caseops (local sources): every document goes through the lossless case transform of shared/caseops.py
before SentencePiece; --tokenizer must then be a CaseOps model (the record's
fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model), or one is trained with the four operators reserved
at ids 4-7; the validation split gets the per-token byte sidecar fineweb_val_bytes_NNNNNN.bin and the manifest
records "transform": "caseops_v1".

--adopt DIR --tokenizer FILE writes DIR/manifest.json for shards built elsewhere
(after checking their headers), so the trainers' tokenizer check can verify them.

Exit status: 0 done, 1 bad input or failed build, 2 bad command line.
"""
from __future__ import annotations

import argparse
import glob
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data import corpus, download  # noqa: E402
from data.build import (build_dataset, check_caseops_tokenizer, check_name, read_tokenizer,  # noqa: E402
                        tokenizer_from_bytes)
from data.cli import OneLineParser, int_at_least  # noqa: E402
from shared import caseops  # noqa: E402
from shared.data import load_shard, sidecar_pattern, val_pattern  # noqa: E402
from shared.manifest import BOS_ID, file_sha256, read_manifest, write_manifest  # noqa: E402

DATA_DIR = ROOT / "data"


def _plain_name(text: str) -> str:
    try:
        return check_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--name ")) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--demo", action="store_true", help="embedded corpus: the Python stdlib's own documentation")
    src.add_argument("--variant", help="published export to download: sp1024, sp8192, sp8192_caseops "
                                       "(or any sp<VOCAB>/byte260 of MATCHED_FINEWEB_REPO_ID)")
    src.add_argument("--jsonl", nargs="+", type=Path, help="JSON-lines files with a 'text' field")
    src.add_argument("--text", nargs="+", type=Path, help="plain-text files (see --split)")
    src.add_argument("--adopt", type=Path, metavar="DIR",
                     help="write DIR/manifest.json for shards built with --tokenizer")
    ap.add_argument("--train-shards", type=int_at_least(0), default=80, help="--variant: train shards to fetch")
    ap.add_argument("--name", type=_plain_name, help="dataset/tokenizer name for local sources")
    ap.add_argument("--val-docs", type=int_at_least(1), help="first N documents are validation")
    ap.add_argument("--tokenizer", type=Path, help="reuse this SentencePiece .model instead of training one")
    ap.add_argument("--vocab-size", type=int_at_least(1), default=1024)
    ap.add_argument("--split", choices=("line", "blank", "file"), default="line")
    ap.add_argument("--caseops", action="store_true", help="local sources: apply the CaseOps case transform")
    ap.add_argument("--shard-tokens", type=int_at_least(1), default=100_000_000,
                    help="tokens per train shard (official: 1e8)")
    ap.add_argument("--out", type=Path, default=DATA_DIR, help="root holding datasets/ and tokenizers/")
    args = ap.parse_args(argv)
    if (args.jsonl or args.text) and not args.name:
        ap.error("--name is required with --jsonl/--text")
    if args.adopt and not args.tokenizer:
        ap.error("--adopt needs --tokenizer FILE, the tokenizer its shards were built with")
    if args.caseops and (args.variant or args.adopt):
        ap.error("--caseops applies to local sources (--demo/--text/--jsonl); use --variant sp8192_caseops")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as exc:  # bad input files, a failed build: one line, old data untouched
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    if args.adopt:
        return adopt(args.adopt, args.tokenizer)
    if args.variant:
        return download.fetch_variant(args.variant, args.train_shards, args.out)
    if args.tokenizer:  # before reading what may be gigabytes of text
        label = f"--tokenizer {args.tokenizer}"
        check_caseops_tokenizer(tokenizer_from_bytes(read_tokenizer(args.tokenizer), label), label, args.caseops)
    if args.demo:
        docs = deterministic_shuffle(corpus.demo_documents())
        name = args.name or ("demo_sp1024_caseops" if args.caseops else "demo_sp1024")
    elif args.jsonl:
        docs, name = corpus.read_jsonl(args.jsonl), args.name
    else:
        docs, name = corpus.read_text(args.text, args.split), args.name
    summary = build_dataset(docs, name, args.out, val_docs=args.val_docs, tokenizer=args.tokenizer,
                            vocab_size=args.vocab_size, shard_tokens=args.shard_tokens, caseops_transform=args.caseops)
    print(json.dumps(summary, indent=1))
    return 0


def deterministic_shuffle(docs: list[str]) -> list[str]:
    """Mix topics and modules so the validation head is not one kind of text."""
    docs = list(docs)
    random.Random(1337).shuffle(docs)
    return docs


def adopt(dataset_dir: Path, tokenizer: Path) -> int:
    """Record which tokenizer built an existing dataset, after checking its shards fit that tokenizer."""
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"--adopt {dataset_dir}: no such folder")
    sp = tokenizer_from_bytes(read_tokenizer(tokenizer), f"--tokenizer {tokenizer}")
    old = read_manifest(dataset_dir)
    if old and old["tokenizer_sha256"] != file_sha256(tokenizer):
        raise ValueError(f"--adopt {dataset_dir}: its manifest.json already records another tokenizer "
                         f"({old.get('tokenizer')}, sha256 {old['tokenizer_sha256'][:8]}…); "
                         f"delete that file first if the record is wrong")
    val = sorted(glob.glob(val_pattern(str(dataset_dir))))
    if not val:
        raise FileNotFoundError(f"--adopt {dataset_dir}: no fineweb_val_*.bin shards in it")
    for path in val:  # val is what gets scored: every id must exist in this tokenizer
        tokens = load_shard(path, sp.vocab_size())
        if path == val[0] and (not tokens.size or tokens[0] != BOS_ID):
            raise ValueError(f"{path}: does not start with BOS id {BOS_ID}; not built in the official layout")
    transform = caseops.TRANSFORM if caseops.is_caseops_tokenizer(sp) else None
    sidecar = sorted(glob.glob(sidecar_pattern(str(dataset_dir))))
    if transform and not sidecar:
        raise ValueError(f"--adopt {dataset_dir}: --tokenizer is a CaseOps tokenizer but the dataset has no byte "
                         f"sidecar fineweb_val_bytes_*.bin; its bits per byte could not be counted")
    download.check_sidecar_shards([Path(p) for p in sidecar])
    manifest = write_manifest(dataset_dir, tokenizer, transform=transform, vocab_size=sp.vocab_size(),
                              name=dataset_dir.name, source="adopted")
    splits = manifest["splits"]
    print(f"adopted {dataset_dir}: tokenizer {tokenizer.name} sha256 {manifest['tokenizer_sha256'][:12]} "
          f"val {splits['val']['shards']} shards / {splits['val']['tokens']} tokens, "
          f"train {splits['train']['shards']} shards / {splits['train']['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
