"""What ships stays apart: shared/ needs neither torch nor mlx nor tools/, and the CUDA trainer
imports exactly the modules shared/shipped.py counts as code bytes."""
import ast
import hashlib
import subprocess
import sys

import pytest

from shared import shipped
from tests.conftest import ROOT

BLOCK = "import sys\nfor m in ('torch', 'mlx', 'mlx.core', 'tools'):\n    sys.modules[m] = None\n"

# Every repo file that `import cuda_train` loaded, relative to the repo root; the venv merely lives under it.
LOADED_REPO_FILES = """
import sys
from pathlib import Path
root, venv = Path.cwd().resolve(), Path(sys.prefix).resolve()
import cuda_train
for m in list(sys.modules.values()):
    f = getattr(m, "__file__", None)
    if f and Path(f).is_absolute():  # torch._ops and torch._classes carry bare names ("_ops.py")
        p = Path(f).resolve()
        if p.is_relative_to(root) and not p.is_relative_to(venv):
            print(p.relative_to(root).as_posix())
print("tools_modules:" + ",".join(sorted(n for n in sys.modules if n.split(".")[0] == "tools")))
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trainer_imports() -> subprocess.CompletedProcess:
    """One `import cuda_train` in a fresh interpreter: the repo files it loaded, then its tools.* modules."""
    return _run(LOADED_REPO_FILES)


def _shared_module_names() -> list[str]:
    """Scanned here, not taken from shared.shipped: the folder itself is the reference."""
    names = []
    for path in sorted((ROOT / "shared").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_shared_module_imports_without_torch_mlx_or_tools():
    names = _shared_module_names()
    res = _run(BLOCK + "import importlib\nfor n in %r:\n    importlib.import_module(n)\n" % (names,))
    assert res.returncode == 0, res.stderr
    assert len(names) >= 8


def test_shipped_is_stdlib_only():
    res = _run("import sys, shared.shipped\nprint(sorted(m for m in ('numpy', 'torch', 'mlx') if m in sys.modules))")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_data_tools_import_without_torch_or_mlx():
    res = _run(BLOCK + "import data.prepare")
    assert res.returncode == 0, res.stderr


def test_shipped_lists_the_trainer_its_top_level_modules_and_every_shared_file():
    files = shipped.code_files(ROOT / "cuda_train.py")
    rel = [f.relative_to(ROOT).as_posix() for f in files]
    assert rel[0] == "cuda_train.py"
    expected = {f"{m}.py" for m in shipped.SHIPPED_TOP_LEVEL}
    expected |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "shared").rglob("*.py")}
    assert sorted(rel[1:]) == sorted(expected) and len(set(rel)) == len(rel)
    assert not any(r.startswith("tools/") for r in rel)
    assert shipped.code_bytes(files) == sum(len(f.read_text(encoding="utf-8").encode()) for f in files)


def test_a_new_module_or_subpackage_ships_without_editing_a_list(tmp_path):
    for rel in ("shared/__init__.py", "shared/a.py", "shared/quant/__init__.py", "shared/quant/int8.py",
                "shared/ns/leaf.py", "shared/__pycache__/a.cpython-311.pyc", "torch_gptq.py", "torch_model.py",
                "torch_optim.py", "torch_ttt.py", "tools/bundle.py", "notes.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    modules = shipped.shipped_modules(tmp_path)
    assert list(modules) == ["shared", "shared.a", "shared.ns.leaf", "shared.quant", "shared.quant.int8",
                             "torch_gptq", "torch_model", "torch_optim", "torch_ttt"]
    assert modules["shared.quant"] == tmp_path / "shared" / "quant" / "__init__.py"
    assert shipped.package_names(modules) == ["shared", "shared.ns", "shared.quant"]


def test_source_digests_name_every_file_by_its_repo_path():
    files = shipped.code_files(ROOT / "cuda_train.py")
    digests = shipped.source_digests(files)
    assert list(digests) == [f.relative_to(ROOT).as_posix() for f in files]
    path = ROOT / "shared" / "shipped.py"
    assert digests["shared/shipped.py"] == hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_git_commit_is_none_outside_a_checkout_and_never_raises(tmp_path, monkeypatch):
    assert shipped.git_commit(tmp_path) is None
    assert shipped.git_commit(tmp_path / "missing") is None and shipped.git_commit(None) is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert shipped.git_commit(ROOT) is None


def test_git_commit_of_the_repo():
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout, or no git")
    commit = shipped.git_commit(ROOT)
    assert commit in (head.stdout.strip(), head.stdout.strip() + "+dirty")


def test_cuda_trainer_imports_exactly_the_shipped_modules(trainer_imports):
    assert trainer_imports.returncode == 0, trainer_imports.stderr[-3000:]
    loaded = {line for line in trainer_imports.stdout.split() if not line.startswith("tools_modules:")}
    loaded -= {"cuda_train.py"}
    shipped_files = {f.relative_to(ROOT).as_posix() for f in shipped.code_files(ROOT / "cuda_train.py")[1:]}
    assert loaded == shipped_files, (f"imported but not shipped: {sorted(loaded - shipped_files)}; "
                                     f"shipped but not imported: {sorted(shipped_files - loaded)}")


def test_no_shipped_source_imports_tools():
    for path in shipped.code_files(ROOT / "cuda_train.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad = [n for n in names if n.split(".")[0] == "tools"]
            assert not bad, f"{path.relative_to(ROOT)}:{node.lineno} imports {bad[0]}, which does not ship"


def test_cuda_trainer_does_not_import_tools(trainer_imports):
    assert trainer_imports.returncode == 0, trainer_imports.stderr[-3000:]
    line = trainer_imports.stdout.splitlines()[-1]
    assert line == "tools_modules:", f"cuda_train imported {line.split(':', 1)[1]}: tools/ does not ship"


def test_log_header_lists_only_real_repo_files(monkeypatch, tmp_path):
    """Some extension modules carry a bare relative __file__; from the repo root it must not become a path."""
    import sys
    import types

    from shared.runlog import loaded_repo_files
    fake = types.ModuleType("fake_ext")
    fake.__file__ = "_classes.py"
    monkeypatch.setitem(sys.modules, "fake_ext", fake)
    monkeypatch.chdir(ROOT)
    files = loaded_repo_files()
    assert files and all(f.is_file() for f in files), [f for f in files if not f.is_file()]
