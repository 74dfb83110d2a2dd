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
        _check_file(path)
        with open(path, "rb") as f:  # bytes split at b"\n" only: JSON strings may hold raw U+2028
            for lineno, raw in enumerate(f, 1):
                line = _decode(raw, path, lineno)
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
        text = read_utf8(path)
        if split == "file":
            docs.append(text)
        elif split == "line":
            docs.extend(line for line in text.splitlines() if line.strip())
        else:
            docs.extend(_blank_line_blocks(text))
    return _nonempty(docs, paths)


def read_utf8(path: Path) -> str:
    _check_file(path)
    return _decode(Path(path).read_bytes(), path, 1)


def _check_file(path: Path) -> None:
    if Path(path).is_dir():
        raise ValueError(f"{path}: is a directory, not a text file")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")


def _decode(data: bytes, path: Path, first_line: int) -> str:
    """UTF-8 text; the error names the file and the place (a bare UnicodeDecodeError names neither)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        col = exc.start - data.rfind(b"\n", 0, exc.start)  # 1-based: rfind gives -1 on the first line
        raise ValueError(f"{path}: not UTF-8 text: line {line}, byte {col} is 0x{data[exc.start]:02x}") from None


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
