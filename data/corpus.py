"""Document sources: JSON lines, plain text, and the embedded demo corpus."""
from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

# Test suites and generated tables are not prose; leave them out of the demo corpus.
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}


def read_jsonl(paths: list[Path]) -> list[str]:
    docs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError(f"{path}:{lineno}: no string field 'text'")
                docs.append(obj["text"])
    return _nonempty(docs, paths)


def read_text(paths: list[Path], split: str) -> list[str]:
    docs = []
    for path in paths:
        text = Path(path).read_text(encoding="utf-8")
        if split == "file":
            docs.append(text)
        elif split == "line":
            docs.extend(line for line in text.splitlines() if line.strip())
        else:
            docs.extend(_blank_line_blocks(text))
    return _nonempty(docs, paths)


def _blank_line_blocks(text: str) -> list[str]:
    blocks, cur = [], []
    for line in text.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            blocks.append("\n".join(cur))
            cur = []
    if cur:
        blocks.append("\n".join(cur))
    return blocks


def _nonempty(docs: list[str], paths: list[Path]) -> list[str]:
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"no documents found in {', '.join(map(str, paths))}")
    return docs


def demo_documents() -> list[str]:
    """Real English prose shipped with every Python: pydoc topics and stdlib docstrings.

    One document per pydoc topic and one per stdlib module (its docstrings joined),
    in sorted order: deterministic for a given Python version.
    """
    from pydoc_data.topics import topics
    docs = [topics[k].strip() for k in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if _SKIP_PARTS.intersection(path.relative_to(stdlib).parts):
            continue
        doc = _module_docstrings(path)
        if len(doc) >= 200:
            docs.append(doc)
    return docs


def _module_docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = [ast.get_docstring(tree) or ""]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            parts.append(ast.get_docstring(node) or "")
    return "\n\n".join(p.strip() for p in parts if p.strip())
