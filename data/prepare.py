"""Build token shards in the official layout, from one of three sources.

    python data/prepare.py --demo                                   # offline, any machine
    python data/prepare.py --variant sp1024 --train-shards 10       # the published export
    python data/prepare.py --text a.txt --tokenizer tok.model --name mine
    python data/prepare.py --jsonl docs.jsonl --name mine --vocab-size 1024

Output: data/datasets/<name>/fineweb_{train,val}_NNNNNN.bin and
data/tokenizers/<name>.model. Local sources: the first --val-docs documents
are validation (default: min(50,000, 10% of the documents)); every document
is prefixed with BOS (id 1), no EOS, as in the official export.

--text splitting (--split): `line` (default) makes every non-empty line one
document (the layout of line-per-document exports and of FineWeb dumps whose
documents run together line by line); `blank` splits at blank lines; `file`
makes each file one document.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data import corpus, download  # noqa: E402
from data.build import build_dataset  # noqa: E402

DATA_DIR = ROOT / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--demo", action="store_true", help="embedded corpus: the Python stdlib's own documentation")
    src.add_argument("--variant", help="published export to download, e.g. sp1024")
    src.add_argument("--jsonl", nargs="+", type=Path, help="JSON-lines files with a 'text' field")
    src.add_argument("--text", nargs="+", type=Path, help="plain-text files (see --split)")
    ap.add_argument("--train-shards", type=int, default=80, help="--variant: train shards to fetch")
    ap.add_argument("--name", help="dataset/tokenizer name for local sources")
    ap.add_argument("--val-docs", type=int, help="first N documents are validation")
    ap.add_argument("--tokenizer", type=Path, help="reuse this SentencePiece .model instead of training one")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--split", choices=("line", "blank", "file"), default="line")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per train shard (official: 1e8)")
    ap.add_argument("--out", type=Path, default=DATA_DIR, help="root holding datasets/ and tokenizers/")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variant:
        return download.fetch_variant(args.variant, args.train_shards, args.out)
    if args.demo:
        docs, name = corpus.demo_documents(), args.name or "demo_sp1024"
        docs = deterministic_shuffle(docs)
    elif args.jsonl:
        docs, name = corpus.read_jsonl(args.jsonl), _need_name(args)
    else:
        docs, name = corpus.read_text(args.text, args.split), _need_name(args)
    summary = build_dataset(docs, name, args.out, val_docs=args.val_docs, tokenizer=args.tokenizer,
                            vocab_size=args.vocab_size, shard_tokens=args.shard_tokens)
    print(json.dumps(summary, indent=1))
    return 0


def deterministic_shuffle(docs: list[str]) -> list[str]:
    """Mix topics and modules so the validation head is not one kind of text."""
    docs = list(docs)
    random.Random(1337).shuffle(docs)
    return docs


def _need_name(args: argparse.Namespace) -> str:
    if not args.name:
        raise SystemExit("--name is required with --jsonl/--text")
    return args.name


if __name__ == "__main__":
    sys.exit(main())
