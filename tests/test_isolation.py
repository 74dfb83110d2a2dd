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
