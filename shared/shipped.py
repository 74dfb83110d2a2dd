"""The one definition of the code that ships: what counts as code bytes, what the bundle carries.

The shipped code is the CUDA trainer (cuda_train.py), the top-level modules it
imports from this repo (SHIPPED_TOP_LEVEL) and every .py file under shared/,
found by scanning the folder so that a new module or subpackage ships without
editing a list. Tools that never run at training time live in tools/ and do
not ship. Stdlib only, so tools and the trainer import it for free. Inside a
bundled train_gpt.py (tools/bundle.py) that one file is the shipped code.

    files = code_files("cuda_train.py")     # trainer first, then by module name
    code_bytes(files)                       # bytes on disk, as the byte cap counts them
    shipped_code_bytes("cuda_train.py")     # what ships: the compressed bundle tools/bundle.py writes
    read_source(path)                       # a source file as text, by its coding cookie (latin-1 bundles too)
    source_digests(files)                   # {"shared/bpb.py": "3f2a...", ...}, for the log header
    git_commit(repo_root())                 # "abc123...+dirty"; None outside a git checkout or in a bundle
"""
from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tokenize
from pathlib import Path

TRAINER_NAME = "cuda_train.py"
# imported by cuda_train.py, beside it in the repo root
SHIPPED_TOP_LEVEL = ("torch_gptq", "torch_model", "torch_optim", "torch_ttt")
SHARED_PACKAGE = "shared"
DIGEST_HEX = 16
GIT_TIMEOUT_S = 5.0
BUNDLE_TIMEOUT_S = 120.0  # minifying and compressing the sources takes ~1 s


def _bundled() -> bool:
    # tools/bundle.py sets __bundled__ in every module it serves; such modules have no __file__.
    return bool(globals().get("__bundled__"))


def repo_root() -> Path | None:
    """The folder that holds cuda_train.py and shared/; None inside a bundle, which has no repo."""
    return None if _bundled() else Path(__file__).resolve().parents[1]


def shipped_modules(root: str | os.PathLike | None = None) -> dict[str, Path]:
    """Module name -> source file for everything that ships besides the trainer, sorted by name.

    Packages map to their __init__.py ("shared", "shared.quant"); a folder without one
    ships as a namespace package and has no entry of its own (see package_names).
    """
    root = Path(root).resolve() if root is not None else repo_root()
    if root is None:
        raise ValueError("a bundled train_gpt.py has no repo to scan: it is itself the shipped code")
    modules = {name: root / f"{name}.py" for name in SHIPPED_TOP_LEVEL}
    for path in (root / SHARED_PACKAGE).rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if any(not p.isidentifier() for p in parts):
            continue  # not importable as a module (a stray "x copy.py", a dotted folder)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return dict(sorted(modules.items()))


def package_names(module_names) -> list[str]:
    """Every name that has submodules, sorted: these must import as packages."""
    return sorted({name.rsplit(".", i)[0] for name in module_names for i in range(1, name.count(".") + 1)})


def code_files(trainer_path: str | os.PathLike) -> list[Path]:
    """The trainer, then every shipped module file, sorted by module name (the code that ships).

    Inside a bundled train_gpt.py (tools/bundle.py) every module lives in that one file.
    """
    trainer = Path(trainer_path).resolve()
    if _bundled():
        return [trainer]
    return [trainer] + list(shipped_modules().values())


def code_bytes(files: list[Path]) -> int:
    return sum(Path(f).stat().st_size for f in files)


def shipped_code_bytes(trainer_path: str | os.PathLike) -> int:
    """The code bytes an entry ships: inside a bundle, the bundle itself; from a repo, the compressed bundle of
    these sources (python -m tools.bundle --compress), since that is the train_gpt.py a record folder holds.

    tools/ does not ship, so it is asked in a child process, not imported; where it cannot answer (a copy of
    shared/ without tools/ beside it) the count falls back to the modules' own bytes.
    """
    files = code_files(trainer_path)
    root = repo_root()
    if _bundled() or root is None or not (root / "tools" / "bundle.py").is_file():
        return code_bytes(files)
    n = _compressed_bundle_bytes(str(root), str(files[0]), tuple(source_digests(files).items()))
    return code_bytes(files) if n is None else n


@functools.lru_cache(maxsize=4)
def _compressed_bundle_bytes(root: str, trainer: str, digests: tuple) -> int | None:
    # keyed by the sources' digests: a second report in one process costs nothing, an edited source recounts
    try:
        res = subprocess.run([sys.executable, "-m", "tools.bundle", "--size", "--trainer", trainer], cwd=root,
                             capture_output=True, text=True, timeout=BUNDLE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    out = res.stdout.split()
    return int(out[-1]) if res.returncode == 0 and out and out[-1].isdigit() else None


def read_source(path: str | os.PathLike) -> str:
    """A Python source as text, decoded by its PEP 263 cookie: a compressed bundle is latin-1, the rest UTF-8."""
    with tokenize.open(path) as f:
        return f.read()


def _relative_name(path: Path) -> str:
    root = repo_root()
    if root is not None and path.resolve().is_relative_to(root):
        return path.resolve().relative_to(root).as_posix()
    return path.name


def source_digests(files: list[Path]) -> dict[str, str]:
    """Path relative to the repo root -> first 16 hex of its sha256 (a log records every module it ran)."""
    return {_relative_name(Path(f)): hashlib.sha256(Path(f).read_bytes()).hexdigest()[:DIGEST_HEX] for f in files}


def _git(root: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=GIT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, ValueError, subprocess.SubprocessError):  # no git, a bad path, undecodable output
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git_commit(root: str | os.PathLike | None) -> str | None:
    """HEAD's commit, with "+dirty" when the work tree differs from it (untracked, unignored files count).

    None outside a git checkout (root None: inside a bundle), without git, or when git does not
    answer in time; never raises.
    """
    try:
        root = Path(root)
    except TypeError:
        return None
    commit = _git(root, "rev-parse", "--verify", "HEAD")
    if not commit:
        return None
    status = _git(root, "status", "--porcelain")
    return commit if status == "" else commit + "+dirty"
