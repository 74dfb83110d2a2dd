import subprocess
import sys

from tests.conftest import ROOT

BLOCK = "import sys\nfor m in ('torch', 'mlx', 'mlx.core'):\n    sys.modules[m] = None\n"


def test_shared_imports_without_torch_or_mlx():
    code = BLOCK + ("import pkgutil, importlib, shared\n"
                    "names = [m.name for m in pkgutil.iter_modules(shared.__path__)]\n"
                    "for n in names: importlib.import_module('shared.' + n)\n"
                    "print(len(names))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) >= 8


def test_data_tools_import_without_torch_or_mlx():
    res = subprocess.run([sys.executable, "-c", BLOCK + "import data.prepare"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_code_bytes_count_exactly_the_shared_modules_the_cuda_trainer_imports():
    from shared.artifact import RUNTIME_SHARED_MODULES
    code = ("import sys, cuda_train\n"
            "print(' '.join(sorted(m for m in sys.modules if m == 'shared' or m.startswith('shared.'))))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    imported = {m.split(".", 1)[1] + ".py" if "." in m else "__init__.py" for m in res.stdout.split()}
    assert imported == set(RUNTIME_SHARED_MODULES)
